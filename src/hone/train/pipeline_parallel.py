"""Pipeline parallelism with ``torch.distributed.pipelining``: 1F1B, interleaved 1F1B and GPipe.

Each pipeline rank keeps its own copy of the whole model and deletes the layers its stages do
not own (torchtitan's approach): the deleted entries become ``None`` in place, so every
parameter the rank keeps has its Hugging Face name (``model.layers.7.mlp.up_proj.weight``) and
the model's DCP state dict is a subset of the whole model's, whatever the number of stages; a
checkpoint written with one ``pp`` loads with another. The first stage keeps the embeddings, the
last the final norm and the head, where the model's own fused, chunked linear + cross-entropy
(:func:`hone.model.loss.fused_linear_cross_entropy`) makes the loss: the full logits never exist.

A :class:`StageModule` is one (virtual) stage: it refers to the layers of the rank's model copy
(no parameter of its own), so tensor parallelism, recompute and compile applied to the copy's
layers hold for the stages too, and FSDP2 shards each stage as one root. Every stage receives the
micro-batch's ``input_ids`` and ``targets`` as keyword arguments (int tensors, no gradient): a
stage after the first sees only hidden states, and anything per token (positions, document ids)
can be computed from the ids on every stage.

Layers split as the planner lays them out (:func:`hone.plan.layout.stage_layers`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn

from hone.errors import HoneError
from hone.model.documents import document_positions
from hone.model.loss import fused_linear_cross_entropy
from hone.plan.layout import ParallelPlan, stage_layers

__all__ = ["Pipeline", "StageModule", "split_stages"]


class StageModule(nn.Module):
    """One pipeline stage of Hone's Llama: embeddings (first stage), a run of decoder layers,
    final norm + head + fused loss (last stage). ``forward`` returns the hidden states, or on the
    last stage the micro-batch's loss (the per-token losses sum times ``token_weight``), keeping
    the per-token losses in ``per_token`` for the loop's logging.

    With tied embeddings the first and last stages both hold the one embedding/head tensor under
    both of its names, as the whole model does (so checkpoints keep the same keys); the pipeline
    sums its two gradients across those stages after each backward."""

    def __init__(self, model: nn.Module, layer_ids: range, *, first: bool, last: bool) -> None:
        super().__init__()
        body, tied = model.model, model.config.tie_word_embeddings
        self.first, self.last = first, last
        self.embed_tokens = body.embed_tokens if first or (last and tied) else None
        self.layers = nn.ModuleList(body.layers[i] for i in layer_ids)
        self.norm = body.norm if last else None
        self.lm_head = model.lm_head if last or (first and tied) else None
        # The body's rope tables and recompute switch, not its parameters (object.__setattr__
        # keeps it out of this module's children).
        object.__setattr__(self, "_body", body)
        object.__setattr__(self, "_top", model)  # its doc_eos_id: packed documents kept apart
        self.per_token: list[torch.Tensor] = []
        self.token_weight = 1.0

    def forward(self, h: torch.Tensor, *, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.first:
            h = self.embed_tokens(h)
        eos = self._top.doc_eos_id  # set when training starts (train.doc_mask)
        if eos is not None:  # every stage derives the documents from the micro-batch's ids
            position_ids, document_ids = document_positions(input_ids, eos)
            cos, sin, masks = self._body.document_inputs(position_ids, document_ids, h.dtype)
        else:
            (cos, sin), masks = self._body.rope(h.shape[1], h.dtype), {}
        for layer in self.layers:
            mask = masks.get(layer.self_attn.window)
            if self._body.activation_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, None, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, None, mask)
        if not self.last:
            return h
        h = self.norm(h)
        loss, per_token = fused_linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                                     token_weight=self.token_weight)
        self.per_token.append(per_token.view(targets.shape))
        return loss


def split_stages(model: nn.Module, plan: ParallelPlan, pp_rank: int) -> list[StageModule]:
    """Delete from ``model`` (in place) what the rank's stages do not own; return its stages."""
    if getattr(model, "backend", "hone") != "hone":
        raise HoneError(f"train.pp = {plan.pp}: the {model.backend} backend has no pipeline split; use train.pp = 1")
    cfg = model.config
    ranges = stage_layers(cfg.num_hidden_layers, plan.pp, plan.vpp)
    mine = list(range(pp_rank, plan.pp * plan.vpp, plan.pp))
    owned = {i for s in mine for i in ranges[s]}
    body = model.model
    for i in range(cfg.num_hidden_layers):
        if i not in owned:
            body.layers[i] = None  # the ModuleList keeps its numbering: names stay model.layers.N
    last = plan.pp * plan.vpp - 1
    first_rank, last_rank = 0 in mine, last in mine
    if not first_rank and not (last_rank and cfg.tie_word_embeddings):
        body.embed_tokens = None
    if not last_rank:
        body.norm = None
        if not (first_rank and cfg.tie_word_embeddings):
            model.lm_head = None
    return [StageModule(model, ranges[s], first=s == 0, last=s == last) for s in mine]


def _tied_pair_group(plan: ParallelPlan, mesh):
    """The process group of this rank and its counterpart on the other end of the pipeline (same
    dp and tp coordinates), for the tied embedding's gradient; every rank creates every pair."""
    if plan.pp == 2:
        return mesh["pp"].get_group()
    width, mine = plan.dp * plan.tp, None
    for j in range(width):
        group = dist.new_group([j, (plan.pp - 1) * width + j])
        if dist.get_rank() in (j, (plan.pp - 1) * width + j):
            mine = group
    return mine


class Pipeline:
    """The rank's stages and their schedule: :meth:`step` runs one optimizer step's forward and
    backward over the micro-batches (the optimizer step stays the loop's)."""

    def __init__(self, stages: list[StageModule], plan: ParallelPlan, mesh, device: torch.device, *,
                 tied: bool) -> None:
        from torch.distributed.pipelining import PipelineStage

        self.plan, self.stages, self.group = plan, stages, mesh["pp"].get_group()
        pp_rank = mesh["pp"].get_local_rank()
        n = plan.pp * plan.vpp
        indices = range(pp_rank, n, plan.pp)
        self._pipe_stages = [PipelineStage(m, s, n, device, group=self.group) for m, s in zip(stages, indices)]
        self.first = 0 in indices
        self.last = stages[-1] if n - 1 in indices else None
        self._schedules: dict[int, object] = {}
        self.poison = False
        # Tied embeddings: the one tensor lives on the first and the last stage (see StageModule).
        holder = next((m for m in stages if m.embed_tokens is not None and m.lm_head is not None), None)
        self.tied = holder.lm_head.weight if holder is not None else None
        self._tied_group = _tied_pair_group(plan, mesh) if tied else None

    def _loss(self, output: torch.Tensor, _target) -> torch.Tensor:
        # The last stage's output is already its micro-batch's loss (the fused head + loss).
        return output * float("nan") if self.poison else output

    def _schedule(self, n_micro: int):
        if n_micro not in self._schedules:
            from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

            # scale_grads=False: each micro-batch's loss is already weighted by 1 / (rows x seq_len).
            kind = self.plan.pp_schedule
            if kind == "interleaved":
                self._schedules[n_micro] = ScheduleInterleaved1F1B(self._pipe_stages, n_micro, loss_fn=self._loss,
                                                                   scale_grads=False)
            else:
                cls = Schedule1F1B if kind == "1f1b" else ScheduleGPipe
                self._schedules[n_micro] = cls(self._pipe_stages[0], n_micro, loss_fn=self._loss, scale_grads=False)
        return self._schedules[n_micro]

    def step(self, x: torch.Tensor, y: torch.Tensor, *, micro: int, token_weight: float,
             poison: bool = False) -> torch.Tensor:
        """Forward and backward of the rank's rows ``x``/``y`` in micro-batches of ``micro``; the
        per-sequence mean losses ``[rows]`` on the last stage's ranks, zeros elsewhere."""
        for stage in self.stages:
            stage.per_token.clear()
            stage.token_weight = token_weight
        self.poison = poison
        n_micro = x.shape[0] // micro
        schedule = self._schedule(n_micro)
        args = (x,) if self.first else ()
        schedule.step(*args, target=y, input_ids=x, targets=y, return_outputs=False)
        self._sum_tied_grad()
        if self.last is None:
            return torch.zeros(x.shape[0], device=x.device)
        # The last n_micro forwards: the first step also runs one forward (without gradients) to
        # learn the shapes the stages exchange.
        return torch.cat(self.last.per_token[-n_micro:]).mean(dim=1)

    def _sum_tied_grad(self) -> None:
        """The tied tensor's gradient is its embedding use (first stage) plus its head use (last
        stage): sum the two so both copies take the same optimizer step, as the one tensor would."""
        if self._tied_group is None or self.tied is None:
            return
        grad = self.tied.grad
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        dist.all_reduce(local, group=self._tied_group)

    def uncounted(self) -> list[torch.Tensor]:
        """Parameters whose gradient the global norm must not count again: the tied tensor's
        copy on the last stage (the first stage's counts it)."""
        return [self.tied] if self.tied is not None and self.last is not None and not self.first else []

    def total_params(self, model: nn.Module) -> int:
        """The whole model's parameter count (every stage's, each counted in its global size)."""
        n = torch.tensor(sum(p.numel() for p in model.parameters() if all(p is not u for u in self.uncounted())),
                         dtype=torch.float64)  # DTensors count their global size
        dist.all_reduce(n, group=self.group)
        return int(n)

