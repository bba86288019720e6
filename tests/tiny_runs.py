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
