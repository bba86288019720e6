"""The tiny CPU recipe as the multi-process tests run it, and `hone` as a user runs it.

    text = tiny_recipe_text(workdir, steps=12, tp=2)      # recipes/tiny-cpu.toml, [train] fields set
    proc = hone_process("train", recipe, "--nproc", 2)    # AssertionError with its output on failure
    runs = TinyRuns(root)                                 # data stages once; runs.one(), runs.two()
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

import hone.train.run as train_run
from hone.cli import main as hone_main
from hone.pipeline import run_recipe
from hone.recipe import load_recipe

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


# What needs a process of its own: the supervisor and --fault change the environment, and a
# fault injected through ``env`` may kill the process it runs in.
OWN_PROCESS = ("--supervise", "--fault")


def hone_process(*args, env: dict | None = None, check: bool = True, timeout: int = 300,
                 subprocess_only: bool = False) -> subprocess.CompletedProcess:
    """`hone ARGS`, output captured (its torchrun workers' too): in this process when that is the
    same as a fresh one (nothing injected: it saves the 5-8 s a new process spends importing), else
    in a subprocess."""
    strs = [str(a) for a in args]
    if subprocess_only or env or any(a in OWN_PROCESS for a in strs):
        proc = subprocess.run([sys.executable, "-m", "hone.cli", *strs], capture_output=True, text=True,
                              env=clean_env(**(env or {})), timeout=timeout)
    else:
        proc = hone_here(*strs)
    if check and proc.returncode != 0:
        raise AssertionError(f"hone {' '.join(strs)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def hone_here(*args: str) -> subprocess.CompletedProcess:
    """`hone ARGS` run by the CLI's entry point in this process. Standard output and error are
    captured at the file descriptors, so that what the processes it starts (torchrun and its
    workers) write is captured too, in the order it was written."""
    argv, sys.argv = sys.argv, ["hone", *args]
    fault = os.environ.pop("HONE_FAULT", None)
    code = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            with open(1, "w", closefd=False, buffering=1) as o, open(2, "w", closefd=False, buffering=1) as e, \
                    contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
                try:
                    hone_main(exit_fast=False)
                except SystemExit as stop:
                    code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sys.argv = argv
            if fault is not None:
                os.environ["HONE_FAULT"] = fault
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(["hone", *args], code, out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace"))


def run_metrics(workdir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (none before its first step)."""
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


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


class TinyRuns:
    """The tiny recipe of ``steps`` steps with its data stages done in ``root/base`` (``fsdp.toml``
    points there), and its one-process and two-process FSDP runs, each trained once on first use:
    the reference runs every multi-process test module compares with (the session's conftest
    fixture ``tiny12``)."""

    def __init__(self, root: Path, steps: int = 12):
        self.root, self.steps = root, steps
        self.recipe = root / "fsdp.toml"
        self.recipe.write_text(tiny_recipe_text(root / "base", steps=steps))
        run_recipe(load_recipe(self.recipe), root / "base", max_steps=1, log=lambda m: None)
        self._one: Path | None = None
        self._two: tuple[Path, list[int]] | None = None

    def workdir(self, name: str) -> Path:
        """A copy of the prepared run directory (data stages done) named ``name``."""
        dest = self.root / name
        if not dest.exists():
            shutil.copytree(self.root / "base", dest)
        return dest

    def one(self) -> Path:
        """`hone train fsdp.toml` in one process."""
        if self._one is None:
            wd = self.workdir("one")
            hone_process("train", self.recipe, "--workdir", wd, "--fresh")
            self._one = wd
        return self._one

    def two(self) -> tuple[Path, list[int]]:
        """`hone train --nproc 2` on FSDP, logging to MLflow (project "dist"), run by the pipeline
        in this process as the CLI runs it; with how many models holding real weights this process
        kept when torchrun started."""
        if self._two is None:
            recipe = self.root / "tracked.toml"
            recipe.write_text(self.recipe.read_text() + '\n[log]\nbackends = ["mlflow"]\nproject = "dist"\n')
            real_launch, seen = train_run.launch_local, []

            def launch(*args, **kwargs):
                seen.append(len(live_models()))
                return real_launch(*args, **kwargs)

            wd = self.workdir("fsdp2")
            train_run.launch_local = launch
            try:
                table = run_recipe(load_recipe(recipe), wd, nproc=2, fresh_training=True, log=lambda m: None)
            finally:
                train_run.launch_local = real_launch
            assert table and (wd / "final" / "model.safetensors").is_file()
            self._two = (wd, seen)
        return self._two


def live_models() -> list:
    """Models in this process whose parameters are not all on the meta device."""
    gc.collect()
    return [o for o in gc.get_objects() if type(o).__name__ in ("Llama", "HFCausalLM")
            and any(not p.is_meta for p in o.parameters(recurse=True))]
