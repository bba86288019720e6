"""Planner: shapes, memory terms against hand-computed values, search pruning, CLI surface."""

import json

import numpy as np
import pytest

from hone.errors import HoneError
from hone.plan.api import make_plan
from hone.plan.config import Config, Constants, parse_fix
from hone.plan.hardware import load_cluster, parse_preset
from hone.plan.memory import (
    chunk_layout,
    held_layers,
    inflight,
    layer_activation_bytes,
    memory,
    op_kept_bytes,
    op_recompute_flops,
    stage_layout,
)
from hone.plan.placement import place_matrix
from hone.plan.search import search, structural_reason
from hone.plan.shapes import PRESETS, ModelShape, load_shape
from hone.plan.timing import step_time
from tiny_runs import hone_process


@pytest.mark.parametrize("name,billions,tol", [("llama3-8b", 8.03, 0.01), ("llama3-70b", 70.6, 0.1),
                                               ("llama3.1-405b", 405.9, 0.1), ("gpt3-175b", 175.0, 0.5),
                                               ("smollm2-135m", 0.1345, 0.001)])
def test_preset_parameter_counts(name, billions, tol):
    assert abs(PRESETS[name].params() / 1e9 - billions) < tol


def test_flops_per_token_equals_megatron_formula_for_gpt():
    m, s = PRESETS["gpt-1t"], 2048
    l, h, V = m.layers, m.hidden, m.vocab
    megatron = 72 * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h)) / s  # per token
    # ours also counts the biases' 6 FLOPs each; within 0.01%
    assert abs(m.flops_per_token(s) / megatron - 1) < 1e-4


def test_inline_and_hf_config(tmp_path):
    m = load_shape("layers=2,hidden=32,heads=4,kv_heads=2,ffn=64,vocab=256")
    assert (m.layers, m.kv_heads, m.arch) == (2, 2, "llama")
    cfg = {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336, "vocab_size": 128256}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_shape(str(tmp_path)).params() == PRESETS["llama3-8b"].params()
    with pytest.raises(HoneError, match="unknown model 'nope'"):
        load_shape("nope")
    with pytest.raises(HoneError, match="hidden 30 is not divisible by heads 4"):
        load_shape("layers=2,hidden=30,heads=4,vocab=10")
    with pytest.raises(HoneError, match="bad field"):
        load_shape("layers=2,hiden=32,heads=4,vocab=10")


GPT = PRESETS["gpt-22b"]  # h=6144, a=64, ffn=4h: the Korthikanti et al. formulas apply exactly
S, B = 2048, 1


def _sbh():
    return S * B * GPT.hidden


@pytest.mark.parametrize("cfg,expected", [
    (Config(1, 1, 1, B, "none", sequence_parallel=False), lambda: _sbh() * (34 + 5 * GPT.heads * S / GPT.hidden)),
    (Config(8, 1, 1, B, "none", sequence_parallel=False),
     lambda: _sbh() * (10 + 24 / 8 + 5 * GPT.heads * S / (GPT.hidden * 8))),
    (Config(8, 1, 1, B, "none", sequence_parallel=True),
     lambda: _sbh() * (34 / 8 + 5 * GPT.heads * S / (GPT.hidden * 8))),
    (Config(8, 1, 1, B, "selective", sequence_parallel=True), lambda: _sbh() * 34 / 8),
    (Config(8, 1, 1, B, "full", sequence_parallel=True), lambda: _sbh() * 2 / 8),
    (Config(1, 1, 1, B, "full", sequence_parallel=False), lambda: _sbh() * 2),
])
def test_activation_per_layer_matches_korthikanti(cfg, expected):
    assert layer_activation_bytes(GPT, S, B, cfg, flash=False) == pytest.approx(expected(), rel=1e-12)


TINY = ModelShape("tiny", 2, 64, 4, 2, 160, 256)  # h 64, 4 heads, 2 kv heads (kv_dim 32), ffn 160


def test_op_recompute_bytes_by_hand():
    s, b, h, kv, f, a = 64, 2, 64, 32, 160, 4
    # tp=1: layer input, wq, wv, attention output (bf16) + fp32 log-sum-exp, w1, w2 outputs
    hand = s * b * (2 * h + 2 * h + 2 * kv + 2 * h + 4 * a + 2 * f + 2 * h)
    assert layer_activation_bytes(TINY, s, b, Config(1, 1, 1, b, "op"), flash=True) == hand
    # tp=2 + SP: column-parallel outputs halve, w2's output is a full-width partial sum, 2 reduce-scatters kept
    t = 2
    hand_tp = s * b * (2 * h / t + 2 * h / t + 2 * kv / t + 2 * h / t + 4 * a / t + 2 * f / t + 2 * h + 2 * 2 * h / t)
    assert layer_activation_bytes(TINY, s, b, Config(t, 1, 1, b, "op"), flash=True) == hand_tp
    assert op_kept_bytes(PRESETS["llama3-8b"], 1, 1, 1, False, True) == 63616  # 8h + 2kv + 2f + 4a
    # recomputed in backward: wk, wo, w3 forward, 2 FLOPs per weight
    assert op_recompute_flops(TINY) == 2 * (h * kv + h * h + h * f)


def test_recompute_ordering():
    m, s, b = PRESETS["llama3-8b"], 8192, 2
    by = {rc: layer_activation_bytes(m, s, b, Config(1, 1, 1, b, rc), flash=True) for rc in ("none", "selective", "op",
                                                                                             "full")}
    # flash already drops what Megatron's selective recomputes
    assert by["none"] == by["selective"] > by["op"] > by["full"]
    nf = {rc: layer_activation_bytes(m, s, b, Config(1, 1, 1, b, rc), flash=False) for rc in ("none", "selective", "op",
                                                                                              "full")}
    assert nf["none"] > nf["selective"] > nf["op"] > nf["full"]
    # Under TP the kept w2 output is a full-width partial sum on every rank: for 405B at tp=8, op keeps more than none.
    big = PRESETS["llama3.1-405b"]
    op = layer_activation_bytes(big, s, 1, Config(8, 1, 1, 1, "op"), True)
    assert op > layer_activation_bytes(big, s, 1, Config(8, 1, 1, 1, "none"), True)


def test_step_time_charges_op_recompute():
    m, cl, k = PRESETS["llama3-8b"], parse_preset("8xH100"), Constants()
    t = {rc: step_time(m, Config(1, 1, 8, 2, rc, zero=3), 8192, 16, cl, k) for rc in ("none", "op", "full")}
    assert t["none"].step_time_s < t["op"].step_time_s < t["full"].step_time_s
    rate = cl.gpu.peak_tflops * 1e12 * t["op"].efficiency
    extra = 16 // 8 * 8192 * m.layers * op_recompute_flops(m) / rate  # 2 sequences per GPU, every layer
    assert t["op"].compute_s - t["none"].compute_s == pytest.approx(extra, rel=1e-9)
    assert t["op"].tflops_per_gpu < t["none"].tflops_per_gpu  # model FLOPs do not count recompute


def test_op_recompute_matches_torch_selective_checkpointing():
    """Parity with torch: a torchtitan-style Llama block under torch's selective checkpointing with
    torchtitan's op policy keeps exactly op_kept_bytes (live op outputs counted after forward)."""
    torch = pytest.importorskip("torch")
    from torch.utils.checkpoint import checkpoint

    blocks, x = _tiny_blocks(torch, TINY), None
    s, b = 64, 2
    for mode, expected in (("op", op_kept_bytes(TINY, s, b, 1, False, True)), ("full", 2.0 * s * b * TINY.hidden)):
        x = torch.randn(b, s, TINY.hidden, dtype=torch.bfloat16, requires_grad=True)
        live = _LiveBytes(torch, [p for blk in blocks for p in blk.parameters()] + [x])
        with live:
            y = x
            for blk in blocks:
                y = checkpoint(blk, y, use_reentrant=False,
                               **({"context_fn": _op_policy(torch)} if mode == "op" else {}))
            kept = live.bytes  # the checkpoints keep their inputs and the saved ops; the last output replaces x
            y.float().sum().backward()
        assert kept / len(blocks) == expected, mode


def test_cross_entropy_backward_peaks_at_12_bytes_per_logit():
    """Why the torchtitan cases count 12 B per vocab entry per token: fp32 log-softmax output (saved),
    its incoming gradient and its input gradient are alive together at the start of backward."""
    torch = pytest.importorskip("torch")
    n, h, v = 256, 32, 1000
    hid = torch.randn(n, h, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(v, h, dtype=torch.bfloat16, requires_grad=True)
    live = _LiveBytes(torch, [hid, w])
    with live:
        pred = (hid @ w.t()).float()
        loss = torch.nn.functional.cross_entropy(pred, torch.randint(0, v, (n,)))
        forward_peak = live.peak
        del pred
        loss.backward()
    assert forward_peak / (n * v) == pytest.approx(8, abs=0.3)
    assert live.peak / (n * v) == pytest.approx(12, abs=0.3)  # + the bf16 weight gradient (small here)


class _LiveBytes:
    """Bytes of op outputs still alive (storage freed -> uncounted); ``ignore`` tensors created outside."""

    def __init__(self, torch, ignore):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outer._track(out)
                return out

        self.torch, self.mode, self.bytes, self.peak = torch, Mode(), 0, 0
        self.seen = {t.untyped_storage().data_ptr() for t in ignore}

    def _track(self, out):
        import weakref

        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if not isinstance(t, self.torch.Tensor):
                continue
            st = t.untyped_storage()
            key, n = st.data_ptr(), st.nbytes()
            if key in self.seen or n == 0:
                continue
            self.seen.add(key)
            self.bytes += n
            self.peak = max(self.peak, self.bytes)
            weakref.finalize(st, self._free, key, n)

    def _free(self, key, n):
        self.bytes -= n
        self.seen.discard(key)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _op_policy(torch):
    """torchtitan's op-level policy: save mm outputs except every second one, and attention kernels."""
    from collections import defaultdict

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def context_fn():
        count = defaultdict(int)

        def policy(ctx, func, *args, **kwargs):
            key = "recompute" if ctx.is_recompute else "forward"
            if func == torch.ops.aten.mm.default:
                count[key] += 1
            save = (func == torch.ops.aten.mm.default and count[key] % 2 == 1) or "scaled_dot_product" in str(func)
            return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(policy)

    return context_fn


def _tiny_blocks(torch, m: ModelShape):
    nn, F = torch.nn, torch.nn.functional
    h, a, kv, hd, f = m.hidden, m.heads, m.kv_heads, m.head_dim, m.ffn

    class Block(nn.Module):  # torchtitan's Llama block order: wq, wk, wv, sdpa, wo; w1, w3, w2
        def __init__(self):
            super().__init__()
            lin = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731
            self.wq, self.wk, self.wv, self.wo = lin(h, h), lin(h, kv * hd), lin(h, kv * hd), lin(h, h)
            self.w1, self.w2, self.w3 = lin(h, f), lin(f, h), lin(h, f)
            self.n1, self.n2 = nn.RMSNorm(h), nn.RMSNorm(h)

        def attention(self, x):
            b, s, _ = x.shape
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
            q = q.view(b, s, a, hd).transpose(1, 2)
            k = k.view(b, s, kv, hd).repeat_interleave(a // kv, dim=2).transpose(1, 2)
            v = v.view(b, s, kv, hd).repeat_interleave(a // kv, dim=2).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.wo(o.transpose(1, 2).contiguous().view(b, s, h))

        def forward(self, x):
            x = x + self.attention(self.n1(x))
            y = self.n2(x)
            return x + self.w2(F.silu(self.w1(y)) * self.w3(y))

    torch.manual_seed(0)
    return [Block().to(torch.bfloat16) for _ in range(m.layers)]


def test_memory_terms_by_hand():
    # llama3-8b, tp=1 pp=1 dp=8, ZeRO-1: weights 2N, grads 4N, optimizer 12N/8.
    m, k = PRESETS["llama3-8b"], Constants()
    c = Config(1, 1, 8, 1, "full", zero=1)
    mem = memory(m, c, 8192, 64, k)
    n = m.params()
    assert mem.weights == pytest.approx(2 * n)
    assert mem.grads == pytest.approx(4 * n)
    assert mem.optimizer == pytest.approx(12 * n / 8)
    assert mem.logits == pytest.approx(6 * 8192 * m.vocab)
    # ZeRO-3 shards all three over dp
    mem3 = memory(m, Config(1, 1, 8, 1, "full", zero=3), 8192, 64, k)
    assert mem3.weights == pytest.approx(2 * n / 8) and mem3.grads == pytest.approx(4 * n / 8)


def test_pipeline_inflight_1f1b_and_interleaved():
    m, k = PRESETS["gpt-1t"], Constants()
    one = memory(m, Config(8, 8, 1, 1, "selective"), 2048, 64, k)
    inter = memory(m, Config(8, 8, 1, 1, "selective", vpp=2), 2048, 64, k)
    assert one.stage == "first" and one.inflight_microbatches == 8
    assert inter.inflight_microbatches == pytest.approx(8 * (1 + 7 / 16))
    few = memory(m, Config(8, 8, 1, 1, "selective"), 2048, 3, k)  # m=3 < p: only 3 in flight
    assert few.inflight_microbatches == 3


def _simulate_interleaved(p, v, mbs, chunks, i):
    """Megatron-LM's interleaved 1F1B on stage i, step by step: layer-micro-batches alive at the peak."""
    fwd = [(k // p) % v for k in range(mbs * v)]
    bwd = [v - 1 - (k // p) % v for k in range(mbs * v)]
    warm = len(fwd) if mbs == p else min(len(fwd), 2 * (p - i - 1) + (v - 1) * p)
    alive = sum(chunks[c] for c in fwd[:warm])
    peak = alive
    for k in range(len(fwd) - warm):
        alive += chunks[fwd[warm + k]]
        peak = max(peak, alive)
        alive -= chunks[bwd[k]]
    return peak


def test_interleaved_inflight_counts_chunks():
    m = PRESETS["llama3.1-405b"]  # 126 layers in 16 x 8 one-layer chunks, embedding and loss chunks empty
    c = Config(8, 16, 64, 1, "none", 2, 8)
    assert chunk_layout(m, c, 0) == (0,) + (1,) * 7 and chunk_layout(m, c, 15) == (1,) * 7 + (0,)
    assert [held_layers(m, c, 32, i) for i in (0, 1, 15)] == [112, 141, 113]
    assert [held_layers(m, c, 16, i) for i in (0, 1, 15)] == [112, 128, 112]  # m == p: all forwards first
    for i in range(16):
        assert held_layers(m, c, 32, i) == _simulate_interleaved(16, 8, 32, chunk_layout(m, c, i), i)
    # equal chunks: the closed form (Korthikanti et al. for the first stage) times the stage's layers
    even = PRESETS["gpt-1t"]  # 128 layers
    for p, v, mbs in [(8, 2, 64), (8, 4, 16), (16, 8, 32), (4, 2, 8)]:
        ce = Config(8, p, 1, 1, vpp=v)
        for i in range(p):
            assert held_layers(even, ce, mbs, i) == pytest.approx(inflight(ce, mbs, i) * stage_layout(even, ce)[i])
    ce = Config(8, 8, 1, 1, vpp=2)  # m == p: every stage holds all its micro-batches (Megatron's all-warm-up case)
    assert [held_layers(even, ce, 8, i) for i in range(8)] == [8 * 16] * 8


def test_pruning_reasons():
    m = PRESETS["llama3-8b"]
    assert structural_reason(m, Config(3, 1, 1, 1), 8192, 8, 3) == "tp=3 does not divide 32 heads"
    assert structural_reason(m, Config(16, 1, 1, 1), 8192, 8, 16) == "tp=16 does not divide 8 kv heads"
    assert structural_reason(m, Config(1, 64, 1, 1), 8192, 8, 64) == "pp=64 exceeds 32 layers"
    assert structural_reason(m, Config(2, 2, 4, 1), 8192, 8, 8) == "dp(4) * tp(2) * pp(2) = 16 != 8 GPUs"
    assert "global batch 6 is not divisible" in structural_reason(m, Config(1, 1, 4, 1), 8192, 6, 4)
    res = search(m, parse_preset("3x8xH100"), 8192, 48)
    assert "tp=3 does not divide 32 heads" in res.rejected
    assert res.plans and all(p["fits"] for p in res.plans)
    tps = [p["tokens_per_s"] for p in res.plans]
    assert tps == sorted(tps, reverse=True)


def test_fix_memory_failure_has_reason():
    r = make_plan("llama3-70b", "8xH100", seq=8192, global_batch=8, fix="tp=1,pp=1,mb=1,recompute=none,zero=0")
    rec = r["configs"][0]
    assert rec["fits"] is False and rec["reason"].startswith("needs ") and rec["reason"].endswith("> 80 GiB")
    assert float(rec["reason"].split()[1]) == pytest.approx(rec["memory_gib_per_gpu"], abs=0.06)
    bad = make_plan("llama3-8b", "8xH100", seq=8192, global_batch=8, fix="tp=3,pp=1,mb=1,recompute=none,zero=0")
    assert bad["configs"][0]["reason"] == "tp=3 does not divide 32 heads"


def test_nothing_fits_names_smallest_memory_and_gpu_count():
    with pytest.raises(HoneError, match=r"nothing fits in 80 GiB.*needs [\d.]+ GiB.*or on \d+ H100 GPUs"):
        make_plan("llama3.1-405b", "8xH100", seq=8192, global_batch=64)


JSON_FIELDS = {"tp", "pp", "dp", "micro_batch", "recompute", "zero", "fits", "memory_gib_per_gpu", "memory_breakdown",
               "step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu"}


def test_cli_json_fields_and_plan_file(tmp_path):
    out = tmp_path / "plan.json"
    p = hone_process("plan", "--model", "llama3-8b", "--cluster", "8xH100", "--seq", "4096",
                     "--global-batch", "64", "--top", "3", "--json", "--out", out, check=False)
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert len(rows) == 3 and all(JSON_FIELDS <= r.keys() for r in rows)
    plan = json.loads(out.read_text())
    assert plan["configs"] == rows and "torchrun" in plan["launch"] and "#SBATCH --nodes=1" in plan["launch"]["slurm"]
    assert "--tensor-model-parallel-size" in plan["launch"]["megatron_args"]
    fail = hone_process("plan", "--model", "llama3-8b", "--cluster", "8xH100", "--global-batch", "8",
                        "--fix", "tp=3,pp=1,mb=1,recompute=none,zero=0", "--json", "--out", "", check=False)
    assert fail.returncode == 0 and json.loads(fail.stdout)[0]["reason"] == "tp=3 does not divide 32 heads"


def test_cli_fix_recompute_op():
    base = ["plan", "--model", "llama3-8b", "--cluster", "8xH100", "--seq", "8192", "--global-batch", "16", "--json",
            "--out", ""]
    rows = {}
    for rc in ("selective", "op"):
        p = hone_process(*base, "--fix", f"tp=1,pp=1,mb=2,recompute={rc},zero=3", check=False)
        assert p.returncode == 0, p.stderr
        rows[rc] = json.loads(p.stdout)[0]
    op, sel = rows["op"], rows["selective"]
    assert op["recompute"] == "op" and JSON_FIELDS <= op.keys()
    assert op["memory_breakdown"]["activations"] < 0.5 * sel["memory_breakdown"]["activations"]
    assert op["step_time_s"] > 0 and op["fits"] is True
    res = search(PRESETS["llama3-8b"], parse_preset("8xH100"), 8192, 16,
                 fixed={"tp": 1, "pp": 1, "micro_batch": 2, "zero": 3})
    assert "op" in {p["recompute"] for p in res.plans}  # the search tries it too


@pytest.mark.parametrize("args,msg", [
    (["--model", "nope", "--cluster", "8xH100", "--global-batch", "8"], "error: unknown model 'nope'"),
    (["--model", "llama3-8b", "--cluster", "8xQ100", "--global-batch", "8"], "error: unknown GPU 'Q100'"),
    (["--model", "llama3-8b", "--cluster", "lots", "--global-batch", "8"], "error: cluster 'lots'"),
    (["--model", "llama3-8b", "--cluster", "8xH100", "--global-batch", "8", "--fix", "tp=x"],
     "error: --fix: tp must be an integer"),
    (["--model", "llama3-8b", "--cluster", "8xH100"], "needs --model, --cluster and --global-batch"),
])
def test_bad_input_one_line(args, msg):
    p = hone_process("plan", *args, "--out", "", check=False)
    assert p.returncode == 2 and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_parse_fix():
    assert parse_fix("tp=8,pp=8,dp=4,mb=1,recompute=full,zero=1,vpp=2") == {
        "tp": 8, "pp": 8, "dp": 4, "micro_batch": 1, "recompute": "full", "zero": 1, "vpp": 2}
    assert parse_fix("recompute=op") == {"recompute": "op"}
    with pytest.raises(HoneError, match="recompute must be"):
        parse_fix("recompute=some")


def test_cluster_toml_with_matrix_and_slow_node(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('gpu = "A100-80GB"\nnodes = 2\ngpus_per_node = 2\nintra_gbps = 300\ninter_gbps = 25\nnode_inter_gbps '
                 '= [25, 5]\n')
    cl = load_cluster(str(f))
    assert cl.link_gbps(0, 1) == 300 and cl.link_gbps(0, 2) == 5
    assert cl.group_link(2, 2)[0] == 5  # the DP ring across nodes is bounded by the slow node
    mat = [[0, 100, 10, 10], [100, 0, 10, 10], [10, 10, 0, 100], [10, 10, 100, 0]]
    f.write_text(f'gpu = "H100"\nnodes = 1\ngpus_per_node = 4\nmatrix = {mat}\n')
    cl = load_cluster(str(f))
    assert cl.group_link(1, 2)[0] == 100 and cl.group_link(1, 4)[0] == 10
    f.write_text('gpu = "H100"\nnodes = 1\ngpus_per_node = 4\nmatrix = [[1, 2], [3, 4]]\n')
    with pytest.raises(HoneError, match="matrix must be 4 x 4"):
        load_cluster(str(f))


def test_placement_beats_rank_order_on_planted_matrix():
    n, rng = 64, np.random.default_rng(0)
    node = rng.permutation(n) % 8  # GPU i physically sits in node[i]; ids are shuffled
    same = node[:, None] == node[None, :]
    bw = np.where(same, 450.0, 25.0)
    bw[((node[:, None] == 3) | (node[None, :] == 3)) & ~same] = 12.0  # one node with a slow NIC
    r = place_matrix(bw, 8, 4, 2, {"tp": 100.0, "dp": 50.0, "pp": 5.0}, budget_s=4.5)
    assert r["gain"] > 1.0  # TP groups moved onto NVLink
    perm = np.array(r["rank_to_gpu"]).reshape(2, 4, 8)
    assert all(len(set(node[g])) == 1 for g in perm.reshape(-1, 8))
