"""Pipeline parallel on the CPU with gloo: pp=2 and pp=2 x dp=2 against one process on the same
batches, kill -9 + resume under pp=2, and the step time of each layout.

The tiny-cpu recipe with 4 layers, 8 sequences of 64 tokens per step in micro-batches of 2 (4
micro-batches, so pp=2 runs 1F1B with 4 in flight), ``--steps`` steps, fp32. Each run is a fresh
``hone train`` in a copy of one prepared run directory. Printed JSON: the largest absolute
difference of the per-step losses and of the final weights against one process, whether the
killed-and-resumed pp=2 run is bitwise identical to the uninterrupted one, and the median step
time of each layout divided by one process's (on CPU processes that share cores this is
overhead, not speed-up: the point of pp on a CPU is the test, not the time).

    python benchmarks/pipeline_parallel.py --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def recipe_text(workdir: Path, steps: int, **train) -> str:
    text = (ROOT / "recipes" / "tiny-cpu.toml").read_text().replace("layers = 2", "layers = 4")
    text = text.replace('workdir = "runs/tiny"', f'workdir = "{workdir}"')
    fields = {"seq_len": 64, "batch_size": 8, "micro_batch": 2, "max_tokens": steps * 8 * 64,
              "checkpoint_every": 4, "threads": 1, "log_every": 1, **train}
    head, _, tail = text.partition("[train]\n")
    body, _, rest = tail.partition("\n[eval]")
    lines = [ln for ln in body.splitlines() if ln.split(" = ")[0] not in fields] + \
        [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    return head + "[train]\n" + "\n".join(lines) + "\n\n[eval]" + rest


def hone(*args, env=None, check=True) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "HONE_FAULT"} | (env or {})
    proc = subprocess.run([sys.executable, "-m", "hone.cli", *map(str, args)], capture_output=True, text=True,
                          env=full)
    if check and proc.returncode:
        raise SystemExit(f"hone {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def run(root: Path, recipe: str, name: str, nproc: int, *extra, env=None, check=True) -> Path:
    wd = root / name
    if not wd.exists():
        shutil.copytree(root / "base", wd)
    hone("train", root / f"{recipe}.toml", "--workdir", wd, *extra, *(("--nproc", nproc) if nproc > 1 else ()),
         env=env, check=check)
    return wd


def metrics(wd: Path) -> list[dict]:
    return [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]


def compare(a: Path, b: Path) -> dict:
    ma, mb = metrics(a), metrics(b)
    wa, wb = (load_file(str(w / "final" / "model.safetensors")) for w in (a, b))
    return {"max_loss_diff": max(abs(x["loss"] - y["loss"]) for x, y in zip(ma, mb)),
            "max_weight_diff": max(float((wa[k] - wb[k]).abs().max()) for k in wa),
            "same_batches": [m["batch"] for m in ma] == [m["batch"] for m in mb],
            "bitwise": [m["loss"] for m in ma] == [m["loss"] for m in mb] and all(wa[k].equal(wb[k]) for k in wa)}


def median_step_s(wd: Path) -> float:
    return statistics.median(m["step_s"] for m in metrics(wd)[1:])  # step 1 includes warm-up


def main() -> None:
    from hone.pipeline import run_recipe
    from hone.recipe import load_recipe

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hone-pp-"))
    layouts = {"one": {}, "pp2": {"pp": 2}}
    for name, fields in layouts.items():
        (root / f"{name}.toml").write_text(recipe_text(root / "base", args.steps, **fields))
    run_recipe(load_recipe(root / "one.toml"), root / "base", max_steps=1, log=lambda m: None)
    one = run(root, "one", "one", 1, "--fresh")
    pp2 = run(root, "pp2", "pp2", 2, "--fresh")
    pp2dp2 = run(root, "pp2", "pp2dp2", 4, "--fresh")
    killed = run(root, "pp2", "killed", 2, "--fresh", env={"HONE_FAULT": f"kill:step={args.steps // 2 + 1}:rank=1"},
                 check=False)
    run(root, "pp2", "killed", 2)
    out = {"steps": args.steps, "pp2_vs_one": compare(one, pp2), "pp2dp2_vs_one": compare(one, pp2dp2),
           "killed_resumed_vs_pp2": compare(pp2, killed),
           "step_s_median": {"one": median_step_s(one), "pp2": median_step_s(pp2), "pp2dp2": median_step_s(pp2dp2)}}
    out["step_time_ratio"] = {k: v / out["step_s_median"]["one"] for k, v in out["step_s_median"].items()}
    print(json.dumps(out, indent=2))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
