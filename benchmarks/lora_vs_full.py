"""LoRA CPT vs full training of the demo on the same tokens: domain / general / unseen perplexity
after, peak memory (the training process's peak RSS on the CPU, CUDA's allocator peak on a GPU),
parameter + gradient + AdamW bytes, tokens/s and wall time. Prints one JSON object.

    python benchmarks/lora_vs_full.py                          # the demo recipes as shipped (40 steps)
    python benchmarks/lora_vs_full.py --steps 8 --eval-tokens 8192   # shortened, for a loaded CPU
    python benchmarks/lora_vs_full.py --tiny --repeats 2            # the tiny random model (a smoke test)

The data stages and the "before" evaluation run once (``hone run --max-steps 1`` on
recipes/demo-biomed.toml); each variant then trains with ``hone train --fresh`` in a copy of that
run directory, in its own process (peak RSS is per process), on the same loader batches: full
(recipes/demo-biomed.toml) and LoRA (recipes/demo-biomed-lora.toml), alternating their order over
``--repeats``. Task accuracy (lm-evaluation-harness, [eval] tasks) joins eval.json when that
feature is there; the script reports whatever eval.json holds per set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"full": ROOT / "recipes" / "demo-biomed.toml", "lora": ROOT / "recipes" / "demo-biomed-lora.toml"}
# --tiny: the tiny random model of recipes/tiny-cpu.toml, with the demo's [train.lora] section added.
TINY = ROOT / "recipes" / "tiny-cpu.toml"


def _toml_value(v) -> str:
    return json.dumps(v) if not isinstance(v, bool) else str(v).lower()


def write_recipe(src: Path, dest: Path, workdir: Path, train: dict, eval_: dict) -> Path:
    """``src`` with [run] workdir, and [train] / [eval] fields replaced or added (line edits: the
    recipe stays the shipped one otherwise)."""
    lines, section = [], None
    seen: set[str] = set()
    updates = {"run": {"workdir": str(workdir)}, "train": train, "eval": eval_}

    def flush(sec):
        for k, v in updates.get(sec, {}).items():
            if (sec, k) not in seen:
                lines.append(f"{k} = {_toml_value(v)}")

    for line in src.read_text().splitlines():
        if line.startswith("["):
            flush(section)
            section = line.strip("[] ")
        key = line.split("=")[0].strip() if "=" in line and not line.startswith("#") else None
        if key and key in updates.get(section, {}):
            seen.add((section, key))
            line = f"{key} = {_toml_value(updates[section][key])}"
        if key == "mixture":  # the copy lives elsewhere: point at the shipped file
            line = f'mixture = "{(src.parent / tomllib.loads(line)["mixture"]).resolve()}"'
        lines.append(line)
    flush(section)
    dest.write_text("\n".join(lines) + "\n")
    return dest


def hone(*args) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hone.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"hone {' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def summarize(workdir: Path, wall_s: float) -> dict:
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    table = json.loads((workdir / "eval.json").read_text())
    steady = metrics[1:] or metrics  # step 1 pays one-time costs
    step_s = sum(m["step_s"] for m in steady) / len(steady)
    tokens = metrics[-1]["tokens"]
    return {"steps": len(metrics), "tokens": tokens, "train_s": round(metrics[-1]["elapsed_s"], 1),
            "tokens_per_s": round(metrics[0]["tokens"] / step_s, 1),  # tokens per step / mean step time
            "peak_mem_gib": metrics[-1]["mem_gib"], "process_wall_s": round(wall_s, 1),
            "final_loss": round(metrics[-1]["loss"], 4), "eval": table}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-lora")
    p.add_argument("--steps", type=int, default=0, help="training steps (0: the recipe's max_tokens)")
    p.add_argument("--eval-tokens", type=int, default=0, help="eval.max_tokens_per_set (0: every document)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="the tiny random model instead of SmolLM2 (a loaded CPU)")
    args = p.parse_args()
    root = args.workdir
    root.mkdir(parents=True, exist_ok=True)
    sources = dict(RECIPES)
    if args.tiny:
        lora = RECIPES["lora"].read_text().partition("[train.lora]")[2].partition("\n[eval]")[0]
        text = TINY.read_text()
        (root / "tiny-lora-src.toml").write_text(text.replace("\n[eval]", "\n[train.lora]" + lora + "\n[eval]", 1))
        sources = {"full": TINY, "lora": root / "tiny-lora-src.toml"}
    base_train = tomllib.loads(sources["full"].read_text())["train"]
    train = {"max_tokens": args.steps * base_train["seq_len"] * base_train["batch_size"]} if args.steps else {}
    eval_ = {"max_tokens_per_set": args.eval_tokens} if args.eval_tokens else {}
    recipes = {name: write_recipe(src, root / f"{name}.toml", root / "base", train, eval_)
               for name, src in sources.items()}
    prepare_s = hone("run", recipes["full"], "--workdir", root / "base", "--max-steps", 1)
    results: dict[str, list[dict]] = {"full": [], "lora": []}
    for i in range(args.repeats):
        for name in (["full", "lora"] if i % 2 == 0 else ["lora", "full"]):
            wd = root / f"{name}-{i}"
            shutil.rmtree(wd, ignore_errors=True)
            shutil.copytree(root / "base", wd)
            wall = hone("train", recipes[name], "--workdir", wd, "--fresh")
            results[name].append(summarize(wd, wall))
            results[name][-1]["adapter"] = (wd / "final-adapter").exists()
    full, lora = results["full"][0], results["lora"][0]
    ratios = {
        "tokens_per_s_lora_over_full": round(lora["tokens_per_s"] / full["tokens_per_s"], 3),
        "peak_mem_lora_over_full": round(lora["peak_mem_gib"] / full["peak_mem_gib"], 3),
        "train_s_lora_over_full": round(lora["train_s"] / full["train_s"], 3),
    }
    print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
                      "model": "tiny random (recipes/tiny-cpu.toml)" if args.tiny else "SmolLM2-135M (demo)",
                      "steps": args.steps or "recipe", "eval_tokens_per_set": args.eval_tokens or "all",
                      "prepare_s": round(prepare_s, 1), "results": results, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
