"""Memory per GPU, each term shown (GiB).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"): per layer ``s b h (34 + 5 a s / h)`` bytes for a GPT layer without
parallelism; with TP ``s b h (10 + 24/t + 5 a s/(h t))``; with sequence parallel everything
divided by t; flash attention or selective recompute removes the ``a s^2`` term; full recompute
keeps the ``2 s b h`` layer input. The terms are written per tensor so that Llama layers
(SwiGLU, GQA, no dropout) are counted by the same rule. Under 1F1B the first stage holds
``min(m, p)`` micro-batches of its ``l/p`` layers; interleaving with v chunks multiplies that by
``1 + (p-1)/(p v)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hone.plan.config import Config, Constants
from hone.plan.shapes import ModelShape

GIB = float(1 << 30)


def act_terms(m: ModelShape, s: int, b: int, t: int, sp: bool, flash: bool) -> tuple[float, float, float]:
    """(replicated, tp-split, attention-score) activation bytes of one layer, one micro-batch,
    before dividing by t: replicated parts are divided by t only under sequence parallelism."""
    sbh = s * b * m.hidden
    if m.arch == "gpt":
        repl = 10 * sbh  # 2 LayerNorm inputs (4), QKV and MLP inputs (4), 2 dropout masks (2)
        split = 2 * s * b * (m.hidden + 2 * m.kv_dim) + 2 * sbh + 4 * s * b * m.ffn  # Q,K,V; proj input; GeLU in/out
        score = 5.0 * m.heads * s * s * b  # softmax out (2), dropout mask (1), dropout out (2)
    else:
        repl = 8 * sbh  # 2 RMSNorm inputs, QKV and MLP inputs
        split = 2 * s * b * (m.hidden + 2 * m.kv_dim) + 2 * sbh + 6 * s * b * m.ffn  # SwiGLU: gate, up, product
        score = 2.0 * m.heads * s * s * b  # softmax output (no dropout)
    if flash:
        score = 4.0 * m.heads * s * b  # fp32 log-sum-exp only
    return float(repl), float(split), score


def layer_activation_bytes(m: ModelShape, s: int, b: int, c: Config, flash: bool) -> float:
    """Bytes one layer keeps for one micro-batch until its backward pass."""
    t = c.tp
    sp = c.sequence_parallel and t > 1
    if c.recompute == "full":
        return 2.0 * s * b * m.hidden / (t if sp else 1)
    repl, split, score = act_terms(m, s, b, t, sp, flash)
    if c.recompute == "selective":
        score = 4.0 * m.heads * s * b if flash else 0.0
    return repl / (t if sp else 1) + (split + score) / t


def full_layer_bytes(m: ModelShape, s: int, b: int, c: Config, flash: bool) -> float:
    repl, split, score = act_terms(m, s, b, c.tp, c.sequence_parallel and c.tp > 1, flash)
    return repl / (c.tp if c.sequence_parallel and c.tp > 1 else 1) + (split + score) / c.tp


def stage_params(m: ModelShape, c: Config, stage: str) -> float:
    """Parameters on one GPU of the first or last pipeline stage (TP splits every matrix)."""
    n = stage_layers(m, c) * m.layer_params()
    if stage == "first" or c.pp == 1:
        n += m.embedding_params()
    if stage == "last" or c.pp == 1:
        n += m.head_params()
        if m.tied_embeddings and c.pp > 1:
            n += m.vocab * m.hidden  # the last stage keeps its own copy of the tied embedding
    return n / c.tp


def stage_layers(m: ModelShape, c: Config) -> int:
    """Layers on the busiest stage: uneven splits (126 layers on 16 stages) put ceil(l/p) on some."""
    return math.ceil(m.layers / c.pp)


@dataclass
class Memory:
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    zero3_buffers: float
    overhead: float
    stage: str
    inflight_microbatches: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits + self.zero3_buffers + self.overhead

    def breakdown(self) -> dict:
        r = lambda x: round(x / GIB, 3)  # noqa: E731
        return {"weights": r(self.weights), "grads": r(self.grads), "optimizer": r(self.optimizer),
                "activations": r(self.activations), "logits": r(self.logits), "zero3_buffers": r(self.zero3_buffers),
                "overhead": r(self.overhead), "stage": self.stage, "inflight_microbatches": round(self.inflight_microbatches, 3)}


def memory(m: ModelShape, c: Config, seq: int, global_batch: int, k: Constants) -> Memory:
    """Peak memory of the worse of the first and last pipeline stage."""
    first = _stage_memory(m, c, seq, global_batch, k, "first")
    if c.pp == 1:
        return first
    last = _stage_memory(m, c, seq, global_batch, k, "last")
    return first if first.total >= last.total else last


def _stage_memory(m: ModelShape, c: Config, seq: int, global_batch: int, k: Constants, stage: str) -> Memory:
    n = stage_params(m, c, stage)
    d = c.dp
    weights = k.weight_bytes * n / (d if c.zero >= 3 else 1)
    grads = k.grad_bytes * n / (d if c.zero >= 2 else 1)
    optim = k.optim_bytes * n / (d if c.zero >= 1 else 1)
    mbs = global_batch // (c.dp * c.micro_batch)
    layers = stage_layers(m, c)
    if stage == "first":
        inflight = min(mbs, c.pp) * (1 + (c.pp - 1) / (c.pp * c.vpp) if c.vpp > 1 else 1.0)
    else:
        inflight = 1.0
    acts = layers * inflight * layer_activation_bytes(m, seq, c.micro_batch, c, k.flash_attention)
    if c.recompute == "full":  # the layer being recomputed holds its full activations once
        acts += full_layer_bytes(m, seq, c.micro_batch, c, k.flash_attention)
    logits = k.logits_bytes * seq * c.micro_batch * m.vocab / c.tp if stage == "last" or c.pp == 1 else 0.0
    z3 = 2 * (k.weight_bytes + 2) * m.layer_params() / c.tp if c.zero >= 3 and d > 1 else 0.0  # 2 gathered layers + grads
    overhead = k.overhead_gib * GIB + k.fragmentation * (acts + logits + z3)
    return Memory(weights, grads, optim, acts, logits, z3, overhead, stage, inflight)
