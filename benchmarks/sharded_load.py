"""Peak host memory (RSS) per rank when 2 and 4 gloo ranks load a ~0.5B-parameter HF checkpoint
with FSDP, printed as JSON: the sharded path (meta device -> FSDP2 -> materialize -> each rank
reads only its slices) beside the path before it (every rank builds the whole model from the
files, then FSDP2 shards it), and the fixed overhead of a rank that imports torch and Hone,
joins the process group and builds nothing.

Writes a random Llama-shaped checkpoint (Qwen2.5-0.5B's shape, tied embeddings, fp32, sharded
with an index) to a temporary directory first, one shard at a time.

    python benchmarks/sharded_load.py            # ~2 GB of disk in /tmp, ~10 GB of RAM for the old path at 4 ranks
    python benchmarks/sharded_load.py --ranks 4 --paths sharded
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Qwen2.5-0.5B's shape (494M parameters), as a Llama config
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 896,
          "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
          "vocab_size": 151936, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
          "tie_word_embeddings": True, "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 0}
SHARD_BYTES = 500 * 10**6


def peak_rss() -> int:
    """This process's peak resident set (VmHWM, bytes). Not getrusage's ru_maxrss: Linux carries
    that over exec from the parent at fork time, so a fresh rank would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status (Linux only)")


def write_checkpoint(path: Path) -> int:
    """Random weights (N(0, 0.02)) under HF names, written shard by shard; returns the model's bytes."""
    import torch
    from safetensors.torch import save_file

    from hone.model.hf import INDEX_FILE, shard_file_names, shard_plan
    from hone.model.llama import Llama, LlamaConfig

    with torch.device("meta"):
        meta = Llama(LlamaConfig.from_hf_dict(CONFIG))
    shapes = {k: v.shape for k, v in meta.state_dict().items() if k != "lm_head.weight"}  # tied
    sizes = {k: 4 * s.numel() for k, s in shapes.items()}
    shards = shard_plan(sizes, SHARD_BYTES)
    files = shard_file_names(len(shards))
    gen = torch.Generator().manual_seed(0)
    for names, file in zip(shards, files):
        tensors = {k: (torch.ones(shapes[k]) if k.endswith("norm.weight")
                       else torch.randn(shapes[k], generator=gen) * 0.02) for k in names}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": sum(sizes.values())},
                                               "weight_map": {k: f for ns, f in zip(shards, files) for k in ns}}))
    (path / "config.json").write_text(json.dumps(CONFIG))
    return sum(sizes.values())


def rank_main(mode: str, model_dir: str) -> None:
    """One gloo rank (RANK / WORLD_SIZE from the environment): load as ``mode`` says, print peak RSS."""
    import torch
    import torch.distributed as dist

    from hone.model.hf import load_hf, meta_hf
    from hone.model.weights import SafetensorsDir, load_weights
    from hone.train.parallelize import ParallelPlan, init_distributed, parallelize

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    plan = ParallelPlan(dp=world, data_parallel="fsdp")
    ctx = init_distributed(plan, "cpu")
    t0 = time.perf_counter()
    if mode == "sharded":
        model = parallelize(meta_hf(model_dir), plan, ctx, load=lambda m: load_weights(m, SafetensorsDir(model_dir)))
    elif mode == "whole":  # every rank builds the whole model from the files, then FSDP2 shards it
        model, _ = load_hf(model_dir, dtype=torch.float32)
        model = parallelize(model, plan, ctx)
    else:
        model = None
    held = sum(p.to_local().numel() * 4 for p in model.parameters()) if model is not None else 0
    dist.barrier()
    print(json.dumps({"rank": ctx.rank, "peak_rss": peak_rss(), "held_param_bytes": held,
                      "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
    dist.destroy_process_group()


def run_ranks(mode: str, world: int, model_dir: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank", mode, str(model_dir)], env=env,
                                      stdout=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=1200)
        if p.returncode != 0:
            raise SystemExit(f"rank failed ({mode}, {world} ranks): status {p.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return sorted(out, key=lambda r: r["rank"])


def main(worlds: tuple[int, ...] = (2, 4), paths: tuple[str, ...] = ("sharded", "whole")) -> None:
    with tempfile.TemporaryDirectory(prefix="hone-sharded-load-") as tmp:
        model_dir = Path(tmp)
        model_bytes = write_checkpoint(model_dir)
        rows = []
        for world in worlds:
            overhead = max(r["peak_rss"] for r in run_ranks("none", world, model_dir))
            for mode in paths:
                ranks = run_ranks(mode, world, model_dir)
                peak = max(r["peak_rss"] for r in ranks)
                target = 1.2 * model_bytes / world + overhead
                rows.append({"ranks": world, "path": mode, "peak_rss_gb_max_rank": round(peak / 1e9, 3),
                             "overhead_gb": round(overhead / 1e9, 3),
                             "above_overhead_gb": round((peak - overhead) / 1e9, 3),
                             "model_gb_per_rank": round(model_bytes / world / 1e9, 3),
                             "target_gb": round(target / 1e9, 3), "within_target": peak <= target,
                             "held_param_gb": round(max(r["held_param_bytes"] for r in ranks) / 1e9, 3),
                             "seconds": max(r["seconds"] for r in ranks)})
                print(json.dumps(rows[-1]), file=sys.stderr)
        print(json.dumps({"benchmark": "sharded_load", "model_gb": round(model_bytes / 1e9, 3),
                          "params": model_bytes // 4, "rows": rows}, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank"]:
        rank_main(sys.argv[2], sys.argv[3])
    else:
        ap = argparse.ArgumentParser()
        ap.add_argument("--ranks", default="2,4", help="comma-separated world sizes")
        ap.add_argument("--paths", default="sharded,whole", help="sharded, whole or both")
        a = ap.parse_args()
        main(tuple(int(w) for w in a.ranks.split(",")), tuple(a.paths.split(",")))
