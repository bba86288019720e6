"""The transformers backend: any causal LM transformers builds (Gemma 2 / 3, Phi-3 / 4, OLMo,
Mixtral, Qwen2-MoE, ...) trained by Hone's own machinery, for every model Hone's Llama does
not build exactly (:func:`hone.model.llama.fast_path_refusal`).

:class:`HFCausalLM` wraps the transformers model and exposes what :class:`hone.model.llama.Llama`
does: ``forward(ids)`` -> logits, ``forward(ids, targets, token_weight=)`` -> (loss, per-token
losses) through the fused chunked loss (:mod:`hone.model.loss`), ``.model`` (the decoder body
and its ``activation_checkpointing`` switch), ``.lm_head``, ``.config`` and ``decoder_layers``
(what FSDP wraps one by one). Its parameter names are transformers' in-memory names, so DCP
checkpoints hold plain HF names; the export is transformers' own ``save_pretrained``.

    backend, why = choose_backend(json.loads(Path("gemma/config.json").read_text()), "auto")
    model = HFCausalLM.from_pretrained(Path("gemma"))      # ("transformers", "model_type 'gemma2' ...")
    loss, per_token = model(ids, targets)                   # ids, targets: [B, T]

transformers is an optional dependency (``pip install 'hone[transformers]'``), imported only here,
only when a model is built.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from hone.errors import HoneError
from hone.model.documents import document_positions
from hone.model.llama import fast_path_refusal
from hone.model.loss import fused_linear_cross_entropy
from hone.plan.shapes import ModelShape

__all__ = ["BACKENDS", "HFCausalLM", "choose_backend", "hf_shape", "transformers_available"]

BACKENDS = ("auto", "hone", "transformers")
INSTALL_HINT = "pip install 'hone[transformers]'"


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def choose_backend(config: dict[str, Any], requested: str = "auto") -> tuple[str, str]:
    """``(backend, one-line reason)`` for an HF ``config.json`` dict and the recipe's ``model.backend``.

    ``auto`` is ``hone`` when Hone's Llama builds the config exactly, else ``transformers``;
    ``hone`` on a config it cannot build, or ``transformers`` without the package, is a HoneError.
    """
    if requested not in BACKENDS:
        raise HoneError(f"model.backend {requested!r} is not one of {', '.join(BACKENDS)}")
    refusal = fast_path_refusal(config)
    model_type = config.get("model_type") or "llama"
    if requested == "hone":
        if refusal:
            raise HoneError(f"model.backend is 'hone' but Hone's own Llama does not build this model: {refusal} "
                            "(set model.backend to 'auto' or 'transformers')")
        return "hone", f"model.backend is 'hone': Hone's own Llama builds model_type {model_type!r}"
    if requested == "auto" and refusal is None:
        return "hone", f"Hone's own Llama builds model_type {model_type!r} exactly"
    if not transformers_available():
        why = "model.backend is 'transformers'" if requested == "transformers" else \
            f"model.backend 'auto' needs the transformers backend for {refusal}"
        raise HoneError(f"{why}, but transformers is not installed: {INSTALL_HINT}")
    if requested == "transformers":
        return "transformers", f"model.backend is 'transformers' (model_type {model_type!r})"
    return "transformers", f"{refusal} is not built by Hone's own Llama"


def hf_shape(config, name: str = "trained model") -> ModelShape | None:
    """The planner's shape of a transformers config from its common keys (for FLOPs per token and
    MFU), or None when they are missing. Gated MLPs count 3 matrices as in Hone's Llama; an MoE
    counts its active experts (``num_experts_per_tok`` x the expert width, plus a shared expert),
    so its FLOPs are right and its parameter count is not the model's."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, hidden, heads, vocab, ffn = (getattr(cfg, k, None) for k in (
        "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "intermediate_size"))
    if not all(isinstance(v, int) and v > 0 for v in (layers, hidden, heads, vocab)):
        return None
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if top_k and (getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)):
        width = getattr(cfg, "moe_intermediate_size", None) or ffn
        ffn = width * top_k + (getattr(cfg, "shared_expert_intermediate_size", None) or 0) if width else None
    if not isinstance(ffn, int) or ffn <= 0:
        return None
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return ModelShape(name, layers, hidden, heads, kv, ffn, vocab, "llama",
                      bool(getattr(cfg, "tie_word_embeddings", False)),
                      getattr(cfg, "max_position_embeddings", None) or 2048,
                      0 if head_dim * heads == hidden else head_dim)


def _dtype_kwarg(dtype: torch.dtype | str) -> dict[str, Any]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}  # renamed in 4.56


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' per-load and per-save progress bars would interleave with Hone's log."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    """The repeated decoder blocks: the ModuleList of ``num_hidden_layers`` entries holding the most weights."""
    n = getattr(hf_model.config.get_text_config(), "num_hidden_layers", None)
    lists = [m for m in hf_model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not lists:
        raise HoneError(f"{type(hf_model).__name__}: no list of {n} decoder layers found to shard and checkpoint")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _router_balance(hf_model: nn.Module):
    """(load-balancing loss of a tuple of router logits, coefficient), or None for a dense model."""
    func = getattr(sys.modules.get(type(hf_model).__module__), "load_balancing_loss_func", None)
    coef, n, k = (getattr(hf_model, a, None) for a in ("router_aux_loss_coef", "num_experts", "num_experts_per_tok"))
    if func is None or not coef or not n or not k:
        return None
    return functools.partial(func, num_experts=n, top_k=k, attention_mask=None), float(coef)


class HFCausalLM(nn.Module):
    """A transformers causal LM with Hone's model interface (see the module docstring).

    The transformers model's own children are this module's children under the same names,
    so ``state_dict()`` names are transformers' and parallelism (FSDP2 per decoder layer, DDP,
    activation checkpointing, torch.compile of each layer) acts on the modules both share;
    ``hf_model`` (e.g. for ``generate``) sees every change.

    The loss: the final hidden states go through the fused chunked linear + cross-entropy with
    the LM head's weight (a head bias, transformers' ``logit_scale`` / ``logits_scaling`` and
    ``final_logit_softcapping`` included, as Gemma 2 / 3 need). A probe at construction checks
    this head against transformers' own logits; a model whose head does something else trains
    on transformers' full logits instead (exact, without the memory saving; ``fused_head`` False).

    MoE models: the router's load-balancing loss (the model's own ``load_balancing_loss_func``)
    is added to the loss times ``router_aux_loss_coef``, whether or not the config sets
    ``output_router_logits`` (transformers adds it only then); it is scaled like the per-token
    losses, so summed over micro-batches it is the coefficient times the mean over them. Like
    transformers' it is computed per forward, i.e. per micro-batch and data-parallel rank, so
    (unlike the cross-entropy) it depends on how a step's batch is split. The per-token losses
    stay pure cross-entropy. Models without that function (aux-loss-free balancing) train on
    the cross-entropy alone.

    Packed documents (``doc_eos_id``, as :class:`hone.model.llama.Llama`): the training forward
    passes position ids that restart at each document, from which transformers' masking utilities
    (``find_packed_sequence_indices``) build block-causal masks; a probe at construction checks that
    this model really keeps packed documents apart (:meth:`packed_documents_refusal`).
    """

    backend = "transformers"
    doc_eos_id: int | None = None

    def __init__(self, hf_model: nn.Module, reason: str = "") -> None:
        super().__init__()
        self.__dict__["_hf"] = hf_model  # not a child: its children are registered below instead
        for name, child in hf_model.named_children():
            self._modules[name] = child
        for name, param in hf_model.named_parameters(recurse=False):
            self._parameters[name] = param
        for name, buf in hf_model.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in hf_model._non_persistent_buffers_set)
        self.training = hf_model.training
        self.config = hf_model.config
        self.backend_reason = reason
        self.__dict__["_layers"] = _decoder_layers(hf_model)
        self.model.activation_checkpointing = False
        self._checkpointing = False
        text = self.config.get_text_config()
        self.softcap = getattr(text, "final_logit_softcapping", None) or None
        self.logit_factor = (getattr(text, "logit_scale", None) or 1.0) / (getattr(text, "logits_scaling", None) or 1.0)
        self.__dict__["_balance"] = _router_balance(hf_model)
        self.fused_head = self._head_matches()
        self._packing = self._packing_refusal()

    # ------------------------------------------------------------------ building and saving

    @classmethod
    def from_pretrained(cls, path: Path | str, dtype: torch.dtype | None = None, reason: str = "") -> HFCausalLM:
        """Load an HF directory with transformers (safetensors only, local files only, no remote code);
        ``dtype`` None keeps the stored dtype."""
        path = Path(path)
        if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
            raise HoneError(f"{path / 'model.safetensors'}: file not found (nor model.safetensors.index.json; "
                            "only safetensors weights are read)")
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise HoneError(f"the transformers backend needs transformers: {INSTALL_HINT}") from None
        try:
            with _no_progress_bars():
                hf_model, info = AutoModelForCausalLM.from_pretrained(
                    str(path), use_safetensors=True, local_files_only=True, trust_remote_code=False,
                    output_loading_info=True, **_dtype_kwarg(dtype or "auto"))
        except (ValueError, KeyError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise HoneError(f"{path}: transformers cannot build a causal LM from it ({first})") from None
        # transformers initializes what the files lack at random (and only warns): never train on that.
        for what in ("missing_keys", "mismatched_keys"):
            if bad := sorted(map(str, info.get(what) or ())):
                raise HoneError(f"{path}: weights do not fit the config: {what.replace('_', ' ')} {bad[0]!r} "
                                f"({len(bad)} in all)")
        return cls(hf_model, reason)

    @classmethod
    def on_meta(cls, path: Path | str, reason: str = "") -> HFCausalLM:
        """The directory's model from its config.json alone, on the meta device in fp32 (no weights
        read; :mod:`hone.model.weights` materializes and loads it, sharded or not)."""
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError:
            raise HoneError(f"the transformers backend needs transformers: {INSTALL_HINT}") from None
        try:
            config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
            with torch.device("meta"):
                hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except (ValueError, KeyError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise HoneError(f"{path}: transformers cannot build a causal LM from it ({first})") from None
        return cls(hf_model, reason)

    def save_pretrained(self, outdir: Path | str, max_shard_size: int | str = "5GB") -> None:
        """Weights (model.safetensors, sharded with an index beyond ``max_shard_size``) under HF names
        and the model's own config.json / generation_config.json, by transformers' ``save_pretrained``."""
        with _no_progress_bars():
            self.hf_model.save_pretrained(str(outdir), safe_serialization=True, max_shard_size=max_shard_size)

    # ------------------------------------------------------------------ Hone's model interface

    @property
    def hf_model(self) -> nn.Module:
        return self.__dict__["_hf"]

    @property
    def model(self) -> nn.Module:
        """The decoder body (embeddings, layers, final norm): ``hf_model.model`` for most families."""
        return self.hf_model.base_model

    @property
    def lm_head(self) -> nn.Module:
        return self.hf_model.get_output_embeddings()

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.__dict__["_layers"]

    def planner_shape(self, name: str = "trained model") -> ModelShape | None:
        return hf_shape(self.config, name)

    def train(self, mode: bool = True) -> HFCausalLM:
        super().train(mode)
        self.hf_model.training = mode  # the transformers module itself is not a child
        return self

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                token_weight: float | None = None):
        """Logits ``[B, T, V]`` (transformers' own); or, given ``targets``, ``(loss, per-token
        losses [B, T])`` where loss is the per-token losses summed times ``token_weight``
        (default: their mean), plus an MoE's weighted router balance loss."""
        self._sync_checkpointing()
        if targets is None:
            return self.hf_model(input_ids=input_ids, use_cache=False).logits
        weight = token_weight if token_weight is not None else 1.0 / targets.numel()
        extra = {"output_router_logits": True} if self._balance is not None else {}
        if self.doc_eos_id is not None and self._packing is None:
            extra["position_ids"] = document_positions(input_ids, self.doc_eos_id)[0]
        if self.fused_head:
            out = self.model(input_ids=input_ids, use_cache=False, **extra)
            head, hidden = self._head_weight(), out.last_hidden_state.flatten(0, 1)
            if self.lm_head.bias is not None:  # [h, 1] @ [W, b]^T = h W^T + b
                hidden = torch.cat([hidden, hidden.new_ones(hidden.shape[0], 1)], dim=1)
                head = torch.cat([head, self.lm_head.bias[:, None] * self.logit_factor], dim=1)
            loss, per_token = fused_linear_cross_entropy(hidden, head, targets.flatten(), token_weight=weight,
                                                         softcap=self.softcap)
        else:
            out = self.hf_model(input_ids=input_ids, use_cache=False, **extra)
            per_token = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
            loss, per_token = per_token.sum() * weight, per_token.detach()
        if self._balance is not None:
            balance, coef = self._balance
            loss = loss + coef * balance(out.router_logits) * (weight * targets.numel())
        return loss, per_token.view(targets.shape)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def packed_documents_refusal(self) -> str | None:
        """None when this model keeps packed documents apart (see the class docstring), else why not."""
        return self._packing

    # ------------------------------------------------------------------ internals

    def _head_weight(self) -> torch.Tensor:
        w = self.lm_head.weight
        return w * self.logit_factor if self.logit_factor != 1.0 else w

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the fused loss computes from the final hidden states, as plain logits."""
        bias = self.lm_head.bias
        logits = F.linear(hidden, self._head_weight(), None if bias is None else bias * self.logit_factor)
        return logits if self.softcap is None else self.softcap * torch.tanh(logits / self.softcap)

    @torch.no_grad()
    def _head_matches(self) -> bool:
        """Whether the fused loss's head reproduces transformers' logits (a few tokens, eval mode)."""
        ref = next(self.parameters())
        if ref.device.type == "meta":
            return True
        was = self.training
        self.eval()
        try:
            ids = torch.arange(min(8, self.lm_head.weight.shape[0]), device=ref.device)[None]
            theirs = self.hf_model(input_ids=ids, use_cache=False).logits.float()
            ours = self._head_logits(self.model(input_ids=ids, use_cache=False).last_hidden_state).float()
        finally:
            self.train(was)
        scale = max(1.0, float(theirs.abs().max()))
        return ours.shape == theirs.shape and bool(torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * scale))

    @torch.no_grad()
    def _packing_refusal(self) -> str | None:
        """Whether two documents packed in one row, given restarting position ids, give the second
        document the hidden states it has alone (a few tokens, eval mode); None when they do."""
        name = type(self.hf_model).__name__
        if "position_ids" not in inspect.signature(self.model.forward).parameters:
            return f"{name}'s forward takes no position_ids"
        ref = next(self.parameters())
        if ref.device.type == "meta":
            return None  # nothing to run yet: transformers' masking utilities decide, as for the other families
        was = self.training
        self.eval()
        try:
            n = min(4, self.lm_head.weight.shape[0] - 1)
            doc = torch.arange(1, n + 1, device=ref.device)[None]
            packed = self.model(input_ids=torch.cat([doc.flip(1), doc], dim=1), use_cache=False,
                                position_ids=torch.arange(n, device=ref.device).repeat(1, 2)).last_hidden_state
            alone = self.model(input_ids=doc, use_cache=False).last_hidden_state
        finally:
            self.train(was)
        scale = max(1.0, float(alone.abs().max()))
        if torch.allclose(packed[:, n:].float(), alone.float(), rtol=1e-3, atol=1e-3 * scale):
            return None
        impl = getattr(self.config, "_attn_implementation", None)
        return f"transformers' {name} (attention {impl!r}) does not keep packed documents apart"

    def _sync_checkpointing(self) -> None:
        """Follow ``self.model.activation_checkpointing`` (the switch Hone's Llama has, set by
        :func:`hone.train.parallelize.apply_activation_checkpointing`) with transformers' own
        per-layer recompute, non-reentrant (checkpointing ``forward``, so FSDP2 hooks stay outside)."""
        want = bool(getattr(self.model, "activation_checkpointing", False))
        if want == self._checkpointing:
            return
        if want and not getattr(self.hf_model, "supports_gradient_checkpointing", False):
            raise HoneError(f"train.activation_checkpointing: {type(self.hf_model).__name__} does not support it "
                            "in transformers")
        func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        for module in self.hf_model.modules():
            if hasattr(module, "gradient_checkpointing"):
                module._gradient_checkpointing_func = func
                module.gradient_checkpointing = want
        self._checkpointing = want
