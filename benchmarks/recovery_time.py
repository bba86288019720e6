"""Recovery time of `hone train --supervise` on the CPU: failure to the next completed step,
for a worker killed with SIGKILL, a hung worker and a NaN loss, on the tiny recipe (gloo).

    python benchmarks/recovery_time.py            # about 4 minutes on 2 cores
    python benchmarks/recovery_time.py --quick    # kill only, 2 workers

Each scenario copies a prepared run directory, runs `hone train RECIPE --supervise --nproc N
--fault SPEC` as a user would, and reads events.jsonl: ``recovery_s`` (failure to the next
completed step), ``detect_s`` (failure to detection: ~0 for a crash or NaN, the hang timeout
for a hang), ``restart_s`` (launch to first step of the new attempt: process start, imports,
checkpoint load, one step), ``lost_steps`` (steps since the checkpoint, done again) and the
decision. A clean supervised run gives the launch-to-first-step baseline. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

STEPS = 12
SCENARIOS = [("kill", 4, "kill:step=7:rank=2"), ("hang", 2, "hang:step=7:rank=1"), ("nan", 2, "nan:step=7:rank=1")]


def prepare(root: Path) -> Path:
    from hone.pipeline import run_recipe
    from hone.recipe import load_recipe
    from test_train_distributed import _recipe_text

    recipe = root / "bench.toml"
    recipe.write_text(_recipe_text(root / "base", batch_size=12, max_tokens=STEPS * 12 * 64, checkpoint_every=4)
                      + "\n[heal]\nrepair_s = 3600\nhang_min_s = 5\nhang_factor = 10\n")
    run_recipe(load_recipe(recipe), root / "base", max_steps=1, log=lambda m: None)
    return recipe


def run(recipe: Path, root: Path, name: str, nproc: int, fault: str | None) -> dict:
    wd = root / name
    shutil.copytree(root / "base", wd)
    argv = [sys.executable, "-m", "hone.cli", "train", str(recipe), "--workdir", str(wd), "--supervise",
            "--nproc", str(nproc)] + (["--fault", fault] if fault else [])
    env = {k: v for k, v in os.environ.items() if k != "HONE_FAULT"}
    t0 = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{name}: hone train failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    events = [json.loads(line) for line in (wd / "events.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    out = {"scenario": name, "workers": nproc, "fault": fault, "wall_s": round(time.time() - t0, 1),
           "median_step_s": round(sorted(m["step_s"] for m in metrics)[len(metrics) // 2], 3)}
    decision = next((e for e in events if e["kind"] == "decision"), None)
    recovered = next((e for e in events if e["kind"] == "recovered"), None)
    if decision:
        out.update(failure=decision["failure"], decision=f"{decision['action']} on {decision['world']}",
                   options={o["action"]: o["cost_s"] for o in decision["options"]})
        if decision["action"] == "shrink":
            out["shrink_step_time"] = step_time_prediction(decision, metrics)
    finished = next(e for e in events if e["kind"] == "finished")
    out["launch_to_first_step_s"] = finished["launch_to_first_step_s"]
    if recovered:
        out.update({k: recovered[k] for k in ("recovery_s", "detect_s", "restart_s", "lost_steps")})
    return out


def step_time_prediction(decision: dict, metrics: list[dict]) -> dict:
    """The step time the supervisor expected on the smaller world (the planner's ratio on the
    measured time, and plain data-parallel scaling) against what the workers then measured."""
    new = decision["world"]
    measured = {int(k): v for k, v in decision["step_s"].items()}
    ref = min(measured, key=lambda w: abs(w - new))
    modeled = {int(k): v for k, v in decision.get("modeled_step_s", {}).items()}
    after = sorted(m["step_s"] for m in metrics if m.get("world") == new)
    out = {"from_world": ref, "to_world": new, "measured_before_s": round(measured[ref], 4),
           "dp_scaling_s": round(measured[ref] * ref / new, 4),
           "measured_after_s": round(after[len(after) // 2], 4) if after else None, "plan": decision["plan"]}
    if new in modeled and ref in modeled:
        out["planner_s"] = round(measured[ref] * modeled[new] / modeled[ref], 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="only the kill scenario, on 2 workers")
    args = p.parse_args()
    scenarios = [("kill", 2, "kill:step=7:rank=1")] if args.quick else SCENARIOS
    with tempfile.TemporaryDirectory(prefix="hone-recovery-") as tmp:
        root = Path(tmp)
        recipe = prepare(root)
        results = [run(recipe, root, "clean", 2, None)]
        results += [run(recipe, root, name, n, fault) for name, n, fault in scenarios]
    print(json.dumps({"benchmark": "recovery_time", "date": datetime.date.today().isoformat(),
                      "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
                      "steps": STEPS, "checkpoint_every": 4, "results": results}))


if __name__ == "__main__":
    main()
