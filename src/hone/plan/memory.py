"""Memory per GPU, each term shown (GiB).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"): per layer ``s b h (34 + 5 a s / h)`` bytes for a GPT layer without
parallelism; with TP ``s b h (10 + 24/t + 5 a s/(h t))``; with sequence parallel everything
divided by t; flash attention or selective recompute removes the ``a s^2`` term; full recompute
keeps the ``2 s b h`` layer input; ``op``, torchtitan's per-op selective checkpointing, keeps the
outputs of every second matmul and of the attention kernel (``op_kept_bytes``). The terms are
written per tensor so that Llama layers (SwiGLU, GQA, no dropout) are counted by the same rule. Under 1F1B the
first stage holds
``min(m, p)`` micro-batches of its ``l/p`` layers; interleaving with v chunks multiplies that by
``1 + (p-1)/(p v)``. Each stage's count runs Megatron's schedule chunk by chunk (``held_layers``), so
that stages with an empty embedding or loss chunk, and the m == p all-forwards-first case, come out
right.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

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


def layer_matmuls(m: ModelShape) -> list[tuple[str, int, int, bool]]:
    """The layer's matmuls in forward order: (name, fan in, fan out, row-parallel). Under TP a
    column-parallel output is split over t; a row-parallel one (wo, w2) is a full-width partial
    sum on every GPU until its reduce-scatter (or all-reduce)."""
    h, kv, f = m.hidden, m.kv_dim, m.ffn
    if m.arch == "gpt":  # fused QKV, GeLU MLP
        return [("qkv", h, h + 2 * kv, False), ("proj", h, h, True), ("fc1", h, f, False), ("fc2", f, h, True)]
    # torchtitan's Llama: wq(x), wk(x), wv(x) ... wo(attn); w2(silu(w1(x)) * w3(x)), so w1 before w3
    return [("wq", h, h, False), ("wk", h, kv, False), ("wv", h, kv, False), ("wo", h, h, True),
            ("w1", h, f, False), ("w3", h, f, False), ("w2", f, h, True)]


def op_kept_bytes(m: ModelShape, s: int, b: int, t: int, sp: bool, flash: bool) -> float:
    """Bytes per layer per micro-batch kept by per-op selective checkpointing (``recompute=op``).

    The policy (torchtitan ``_apply_ac_to_transformer_block``, ``selective_ac_option = "op"``):
    save the outputs of ``aten.mm`` except every second one in forward order, of the flash /
    efficient attention kernels, and of reduce-scatters; recompute everything else (norms, RoPE,
    SiLU, products, all-gathers). The checkpoint also holds the layer input. Per token, bf16:

        layer input                         2h / (t if SP else 1)
        1st, 3rd, ... matmul (Llama: wq, wv, w1, w2)   2h/t + 2kv/t + 2f/t + 2h   (w2 row-parallel: full h)
        attention kernel (flash)            2h/t output + 4a/t fp32 log-sum-exp
        reduce-scatters (SP only)           2 * 2h/t  (after wo and after w2)

    Llama, t = 1: ``8h + 2kv + 2f + 4a`` bytes per token (Llama 3 8B: 63,616 B against 139,392 B
    with no recompute). GPT (fused QKV): the kept matmuls are qkv and fc1. Without flash attention
    the attention core is plain bmm / softmax, none of them on the save list: recomputed."""
    per_token = 2.0 * m.hidden / (t if sp else 1)
    per_token += sum(2.0 * (out if row else out / t) for i,
                     (_, _, out, row) in enumerate(layer_matmuls(m)) if i % 2 == 0)
    if flash:
        per_token += (2.0 * m.hidden + 4.0 * m.heads) / t
    if sp:
        per_token += 2 * 2.0 * m.hidden / t
    return s * b * per_token


def op_recompute_flops(m: ModelShape) -> float:
    """Forward FLOPs per token of the whole layer (all TP ranks) that ``recompute=op`` runs again
    in the backward pass: every second matmul (Llama: wk, wo, w3)."""
    return sum(2.0 * fan_in * out for i, (_, fan_in, out, _) in enumerate(layer_matmuls(m)) if i % 2 == 1)


def layer_activation_bytes(m: ModelShape, s: int, b: int, c: Config, flash: bool) -> float:
    """Bytes one layer keeps for one micro-batch until its backward pass."""
    t = c.tp
    sp = c.sequence_parallel and t > 1
    if c.recompute == "full":
        return 2.0 * s * b * m.hidden / (t if sp else 1)
    if c.recompute == "op":
        return op_kept_bytes(m, s, b, t, sp, flash)
    repl, split, score = act_terms(m, s, b, t, sp, flash)
    if c.recompute == "selective":
        score = 4.0 * m.heads * s * b if flash else 0.0
    return repl / (t if sp else 1) + (split + score) / t


def full_layer_bytes(m: ModelShape, s: int, b: int, c: Config, flash: bool) -> float:
    repl, split, score = act_terms(m, s, b, c.tp, c.sequence_parallel and c.tp > 1, flash)
    return repl / (c.tp if c.sequence_parallel and c.tp > 1 else 1) + (split + score) / c.tp


def stage_layout(m: ModelShape, c: Config) -> tuple[int, ...]:
    """Layers on each of the ``pp`` stages. The layers go to ``pp * vpp`` chunks as evenly as
    possible (sizes differ by one); the larger chunks sit on the middle stages, the smaller ones
    on the first and last stages, which also hold the embedding and the LM head + loss. 126
    layers on pp=16 give 7, 8 x 14, 7 (Llama 3's "one layer less on the first and last stage");
    with vpp=8 the first and last stages each hold one chunk with no layer (embedding only, loss
    only). Valid while ``pp * vpp <= layers + 2``."""
    return _layout(m.layers, c.pp, c.vpp)


@lru_cache(maxsize=4096)
def _layout(layers: int, p: int, v: int) -> tuple[int, ...]:
    if p == 1:
        return (layers,)
    base, extra = divmod(layers, p * v)
    counts = [v * base] * p
    for i in range(1, p - 1):
        take = min(v, extra)
        counts[i] += take
        extra -= take
    counts[0] += extra // 2
    counts[-1] += extra - extra // 2
    return tuple(counts)


def stage_params(m: ModelShape, c: Config, stage, vocab_parallel: bool = True) -> float:
    """Parameters on one GPU of a pipeline stage (an index, or 'first' / 'last'). TP splits every
    matrix of the layers; the embedding and LM head too with ``vocab_parallel`` (Megatron), else
    (Hone's trainer) they and the final norm are whole on every TP rank."""
    i = {"first": 0, "last": c.pp - 1}.get(stage, stage)
    layers = stage_layout(m, c)[i] * m.layer_params()
    n = 0.0
    if i == 0:
        n += m.embedding_params()
    if i == c.pp - 1:
        n += m.head_params()
        if m.tied_embeddings and c.pp > 1:
            n += m.vocab * m.hidden  # the last stage keeps its own copy of the tied embedding
    return (layers + n) / c.tp if vocab_parallel else layers / c.tp + n


def stage_layers(m: ModelShape, c: Config) -> int:
    """Layers on the busiest stage (ceil(l/p) for the first and middle stages of an uneven split)."""
    return max(stage_layout(m, c))


def chunk_layout(m: ModelShape, c: Config, i: int) -> tuple[int, ...]:
    """Layers in each of stage i's ``vpp`` chunks, in schedule order. Chunk sizes differ by at most
    one; the small chunks of the first stage come first (the embedding sits there), those of the
    other stages last (the last stage's loss). Llama 3 405B, pp 16, vpp 8: stage 0 (0, 1, 1, ...),
    stage 15 (..., 1, 1, 0)."""
    return _chunks(m.layers, c.pp, c.vpp, i)


@lru_cache(maxsize=65536)
def _chunks(layers: int, p: int, v: int, i: int) -> tuple[int, ...]:
    base = layers // (p * v)
    extra = _layout(layers, p, v)[i] - v * base
    plus = [1] * extra + [0] * (v - extra)
    if i == 0 and p > 1:
        plus.reverse()
    return tuple(base + x for x in plus)


def held_layers(m: ModelShape, c: Config, mbs: int, i: int) -> float:
    """Layer-micro-batches of activations stage i holds at its peak. 1F1B: its layers times
    ``min(m, p - i)``. Interleaved: Megatron's schedule run chunk by chunk (``_interleaved_peak``),
    which for equal chunks is ``inflight`` times the stage's layers, and for unequal ones (an empty
    embedding or loss chunk) counts which chunks are in flight."""
    if c.vpp == 1:
        return float(stage_layout(m, c)[i] * min(mbs, c.pp - i))
    return float(_interleaved_peak(c.pp, c.vpp, mbs, i, chunk_layout(m, c, i)))


@lru_cache(maxsize=65536)
def _interleaved_peak(p: int, v: int, mbs: int, i: int, chunks: tuple[int, ...]) -> int:
    """Megatron-LM's interleaved 1F1B on stage i: forward k runs chunk ``(k // p) % v``, backward k
    chunk ``v - 1 - (k // p) % v``; ``2 (p-i-1) + (v-1) p`` warm-up forwards (all of them when
    m == p), then one forward and one backward per step. The steady state repeats every ``p v``
    steps with zero net change, so one period past the warm-up holds the peak."""
    total = mbs * v
    warm = total if mbs == p else min(total, 2 * (p - i - 1) + (v - 1) * p)
    alive = sum(chunks[(k // p) % v] for k in range(warm))
    peak = alive
    for step in range(min(total - warm, p * v + 1)):
        alive += chunks[((warm + step) // p) % v]
        peak = max(peak, alive)
        alive -= chunks[v - 1 - (step // p) % v]
    return peak


def inflight(c: Config, mbs: int, i: int) -> float:
    """Micro-batches of stage i's activations alive at its peak, for equal chunks (the closed form;
    ``held_layers`` is what the memory model uses). 1F1B: ``min(m, p - i)``. Interleaved (Megatron's
    warm-up of ``2 (p-i-1) + (v-1) p`` chunks, plus the one in flight), in stage equivalents: for the
    first stage ``p (1 + (p-1)/(p v))`` as Korthikanti et al."""
    p, v = c.pp, c.vpp
    if v == 1:
        return float(min(mbs, p - i))
    return min(float(mbs), (2 * (p - i - 1) + (v - 1) * p + 1) / v)


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
        return (self.weights + self.grads + self.optimizer + self.activations + self.logits + self.zero3_buffers
                + self.overhead)

    def breakdown(self) -> dict:
        r = lambda x: round(x / GIB, 3)  # noqa: E731
        return {"weights": r(self.weights), "grads": r(self.grads), "optimizer": r(self.optimizer),
                "activations": r(self.activations), "logits": r(self.logits), "zero3_buffers": r(self.zero3_buffers),
                "overhead": r(self.overhead), "stage": self.stage,
                "inflight_microbatches": round(self.inflight_microbatches, 3)}


def memory(m: ModelShape, c: Config, seq: int, global_batch: int, k: Constants) -> Memory:
    """Peak memory of the worst pipeline stage: the first (most micro-batches in flight), the
    second (one fewer in flight but possibly more layers in an uneven split) or the last (LM head, logits)."""
    worst = None
    for i in sorted({0, min(1, c.pp - 1), c.pp - 1}):
        mem = _stage_memory(m, c, seq, global_batch, k, i)
        if worst is None or mem.total > worst.total:
            worst = mem
    return worst


def static_bytes(m: ModelShape, c: Config, k: Constants, i: int = 0) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes on one GPU of pipeline stage ``i``: what ZeRO
    shards over dp (stage 1: the optimizer state, 2: + gradients, 3: + weights)."""
    n, d = stage_params(m, c, i, k.vocab_parallel), c.dp
    return (k.weight_bytes * n / (d if c.zero >= 3 else 1), k.grad_bytes * n / (d if c.zero >= 2 else 1),
            k.optim_bytes * n / (d if c.zero >= 1 else 1))


def _stage_memory(m: ModelShape, c: Config, seq: int, global_batch: int, k: Constants, i: int) -> Memory:
    weights, grads, optim = static_bytes(m, c, k, i)
    d = c.dp
    mbs = global_batch // (c.dp * c.micro_batch)
    layers = stage_layout(m, c)[i]
    held_l = held_layers(m, c, mbs, i)
    held = held_l / layers if layers else inflight(c, mbs, i)  # in stage equivalents, as reported
    kept = layer_activation_bytes(m, seq, c.micro_batch, c, k.flash_attention)
    full = full_layer_bytes(m, seq, c.micro_batch, c, k.flash_attention)
    measured = c.tp == 1 and bool(k.act_bytes_per_token)
    if measured:  # measured on Hone's own layer (hone plan calibrate)
        full = k.act_bytes_per_token * seq * c.micro_batch
        kept = full if c.recompute == "none" else kept
        if c.recompute == "full" and k.ckpt_bytes_per_token:
            kept = k.ckpt_bytes_per_token * seq * c.micro_batch
    last = i == c.pp - 1
    logits = k.logits_bytes * seq * c.micro_batch * m.vocab / c.tp if last else 0.0
    acts = held_l * kept
    peak = 0.0  # the measured peak of Hone's layer's backward (activation gradients, or a recomputed layer)
    if measured and c.recompute in ("none", "full"):
        peak = (k.recompute_backward_bytes_per_token if c.recompute == "full" else k.backward_bytes_per_token)
        peak *= seq * c.micro_batch
    if peak and layers:
        # Hone's chunked loss computes its gradients in the forward: its buffers and the backward's
        # peak never coexist, so the stage peaks at the kept activations plus the larger of the two.
        acts += peak
        logits = max(0.0, logits - peak)
    elif c.recompute == "full" and layers:  # the layer being recomputed holds its full activations once
        acts += full
    elif c.recompute == "op" and layers:  # ... and under op, what it recomputes on top of what it kept
        acts += max(0.0, full - kept)
    # 2 gathered layers + grads
    z3 = 2 * (k.weight_bytes + 2) * m.layer_params() / c.tp if c.zero >= 3 and d > 1 else 0.0
    overhead = k.overhead_gib * GIB + k.fragmentation * (acts + logits + z3)
    stage = "first" if i == 0 else "last" if last else f"stage {i}"
    return Memory(weights, grads, optim, acts, logits, z3, overhead, stage, held)
