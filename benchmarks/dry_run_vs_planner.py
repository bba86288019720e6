"""`hone train --dry-run` per-rank bytes against the planner's static memory, for Llama-3-8B and
-70B shapes on 2x8 and 8x8 GPUs (FSDP over every process, and tp=8 x FSDP), printed as JSON.

Writes each model's HF config.json (the published Llama 3 fields; no weights) to a temporary
directory and a recipe pointing at it; builds the sharded model on the meta device in this
process with a fake process group (nothing started, nothing allocated).

    python benchmarks/dry_run_vs_planner.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from hone.model.llama import LlamaConfig
from hone.model.shape import shape_of
from hone.plan.config import Config, Constants
from hone.plan.layout import ParallelPlan, fixed_fields
from hone.plan.memory import static_bytes
from hone.recipe import load_recipe
from hone.train.dry_run import dry_run

ROOT = Path(__file__).resolve().parents[1]
LLAMA3 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
          "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
          "initializer_range": 0.02, "max_position_embeddings": 8192, "mlp_bias": False, "pretraining_tp": 1,
          "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False,
          "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256}
SHAPES = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                  "num_hidden_layers": 32, "num_key_value_heads": 8},
    "llama3-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                   "num_hidden_layers": 80, "num_key_value_heads": 8},
}
LAYOUTS = [(2, 8, 1), (8, 8, 1), (2, 8, 8), (8, 8, 8)]  # (nodes, GPUs per node, tp)


def recipe_file(tmp: Path, model_dir: Path, tp: int) -> Path:
    text = (ROOT / "src" / "hone" / "recipes" / "tiny-cpu.toml").read_text()
    head, _, rest = text.partition("[model]\n")
    _, _, train = rest.partition("[train]\n")
    path = tmp / f"{model_dir.name}-tp{tp}.toml"
    path.write_text(head + f'[model]\nsource = "hf"\npath = "{model_dir}"\n\n[train]\ntp = {tp}\n'
                    f'data_parallel = "fsdp"\nbatch_size = 512\n'
                    + "\n".join(ln for ln in train.splitlines() if not ln.startswith(("batch_size", "tp ",
                                                                                      "data_parallel"))))
    return path


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="hone-dryrun-"))
    rows = []
    for name, fields in SHAPES.items():
        model_dir = tmp / name
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps({**LLAMA3, **fields}))
        for nodes, gpus, tp in LAYOUTS:
            recipe = load_recipe(recipe_file(tmp, model_dir, tp))
            t0 = time.perf_counter()
            r = dry_run(recipe, nodes * gpus, lambda m: print(m, file=sys.stderr))
            worst = max(sum(b.values()) for b in r["ranks"])
            planner = sum(r["planner"].values())
            # the planner's default constants (Megatron: bf16 weights + fp32 master, TP splits the vocabulary)
            c = Config(micro_batch=1, **fixed_fields(ParallelPlan(**r["plan"])))
            default = sum(static_bytes(shape_of(LlamaConfig.from_hf_dict({**LLAMA3, **fields})), c, Constants()))
            rows.append({"model": name, "nodes": nodes, "gpus_per_node": gpus, "tp": tp, "dp": r["plan"]["dp"],
                         "dry_run_gib_max_rank": round(worst / 2**30, 3),
                         "dry_run_gib_min_rank": round(min(sum(b.values()) for b in r["ranks"]) / 2**30, 3),
                         "planner_static_gib": round(planner / 2**30, 3),
                         "planner_vs_dry_run_pct": round((planner - worst) / worst * 100, 3),
                         "planner_default_constants_gib": round(default / 2**30, 3),
                         "default_vs_dry_run_pct": round((default - worst) / worst * 100, 2),
                         "seconds": round(time.perf_counter() - t0, 2)})
    print(json.dumps({"benchmark": "dry_run_vs_planner", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
