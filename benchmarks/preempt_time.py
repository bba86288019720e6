"""Time from SIGTERM to exit with a checkpoint (`hone train`, preemption) on the tiny recipe, CPU.

    python benchmarks/preempt_time.py             # 1 process and 2 gloo ranks, about 2 minutes on 2 cores

Each scenario copies a prepared run directory, starts `hone train RECIPE [--nproc N]` as a user
would (a long run, no scheduled checkpoint before the signal), sends SIGTERM to it once step 20 is
logged and measures: ``exit_s`` (signal to the process's exit, status 75), ``signal_to_checkpoint_s``
(rank 0's note of the signal to its checkpoint written, from events.jsonl; on 2 ranks the signal
reaches rank 0 through hone train and torchrun), ``step_s`` (median step time, the most the job can
still have to finish) and the checkpoint's size. Prints one JSON line.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

STEPS = 400     # far more than are run: the signal comes at step SIGNAL_AT
SIGNAL_AT = 20


def prepare(root: Path) -> Path:
    from hone.pipeline import run_recipe
    from hone.recipe import load_recipe
    from test_train_distributed import _recipe_text

    recipe = root / "bench.toml"
    recipe.write_text(_recipe_text(root / "base", max_tokens=STEPS * 8 * 64, checkpoint_every=10_000, log_every=10))
    run_recipe(load_recipe(recipe), root / "base", max_steps=1, log=lambda m: None)
    return recipe


def _steps(wd: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return []


def run(recipe: Path, root: Path, nproc: int) -> dict:
    wd = root / f"nproc{nproc}"
    shutil.copytree(root / "base", wd)
    argv = [sys.executable, "-m", "hone.cli", "train", str(recipe), "--workdir", str(wd), "--fresh",
            "--nproc", str(nproc)]
    env = {k: v for k, v in os.environ.items() if k != "HONE_FAULT"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    while len(_steps(wd)) < SIGNAL_AT and proc.poll() is None:
        time.sleep(0.01)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    exit_s = time.time() - t0
    if proc.returncode != 75:
        raise SystemExit(f"nproc {nproc}: status {proc.returncode}, not 75:\n{err[-2000:]}")
    events = [json.loads(line) for line in (wd / "events.jsonl").read_text().splitlines()]
    [pre] = [e for e in events if e["kind"] == "preempted"]
    ckpt = wd / "checkpoints" / pre["checkpoint"]
    return {"nproc": nproc, "signal_at_step": SIGNAL_AT, "stopped_after_step": pre["step"],
            "exit_s": round(exit_s, 3), "signal_to_checkpoint_s": pre["signal_to_checkpoint_s"],
            "step_s": round(statistics.median(m["step_s"] for m in _steps(wd)[1:]), 4),
            "checkpoint_mb": round(sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**20, 2),
            "last_line": err.strip().splitlines()[-1]}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recipe = prepare(root)
        results = [run(recipe, root, n) for n in (1, 2)]
    print(json.dumps({"benchmark": "preempt_time", "date": datetime.date.today().isoformat(),
                      "machine": f"{platform.machine()} {os.cpu_count()} cores", "results": results}))


if __name__ == "__main__":
    main()
