"""The tiny CPU recipe as the multi-process tests run it, and `hone` in a subprocess.

    text = tiny_recipe_text(workdir, steps=12, tp=2)      # recipes/tiny-cpu.toml, [train] fields set
    proc = hone_process("train", recipe, "--nproc", 2)    # AssertionError with its output on failure
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe_text(workdir: Path, *, steps: int, layers: int | None = None, **train) -> str:
    """recipes/tiny-cpu.toml writing into ``workdir``: ``steps`` steps of 8 x 64 tokens, a
    checkpoint every 4, one thread, every step logged; ``train`` sets (or adds) [train] fields."""
    text = (ROOT / "recipes" / "tiny-cpu.toml").read_text()
    if layers is not None:
        text = text.replace("layers = 2", f"layers = {layers}")
    text = text.replace('workdir = "runs/tiny"', f'workdir = "{workdir}"')
    fields = {"seq_len": 64, "batch_size": 8, "max_tokens": steps * 8 * 64, "checkpoint_every": 4,
              "threads": 1, "log_every": 1, **train}
    head, _, tail = text.partition("[train]\n")
    body, _, rest = tail.partition("\n[eval]")
    lines = [ln for ln in body.splitlines() if ln.split(" = ")[0] not in fields]
    lines += [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    return head + "[train]\n" + "\n".join(lines) + "\n\n[eval]" + rest


def clean_env(**extra) -> dict:
    """This process's environment without a fault-injection spec, plus ``extra``."""
    return {k: v for k, v in os.environ.items() if k != "HONE_FAULT"} | extra


def hone_process(*args, env: dict | None = None, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """`hone ARGS` in a subprocess (torchrun workers need one), output captured."""
    proc = subprocess.run([sys.executable, "-m", "hone.cli", *map(str, args)], capture_output=True, text=True,
                          env=clean_env(**(env or {})), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"hone {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def run_metrics(workdir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, *, steps: int, exact: bool, grad_norm: bool = False) -> None:
    """Runs ``a`` and ``b`` took the same ``steps`` steps on the same batches and reached the same
    losses (and gradient norms with ``grad_norm``) and final weights: bitwise when ``exact``, else
    within 1e-4."""
    ma, mb = run_metrics(a), run_metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(1, steps + 1))
    assert [m["batch"] for m in ma] == [m["batch"] for m in mb], "the loader served different batches"
    wa, wb = (load_file(str(w / "final" / "model.safetensors")) for w in (a, b))
    assert wa.keys() == wb.keys()
    if exact:
        assert [m["loss"] for m in ma] == [m["loss"] for m in mb]
        if grad_norm:
            assert [m["grad_norm"] for m in ma] == [m["grad_norm"] for m in mb]
        for k in wa:
            assert wa[k].equal(wb[k]), f"{k} differs"
    else:
        for x, y in zip(ma, mb):
            assert abs(x["loss"] - y["loss"]) < 1e-4, (x["step"], x["loss"], y["loss"])
            if grad_norm:
                assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-4, (x["step"], x["grad_norm"], y["grad_norm"])
        for k in wa:
            assert (wa[k] - wb[k]).abs().max() < 1e-4, k
