"""Issue 15: resume is the default and nothing a user made is deleted silently, as a new user
meets it on the command line: the same command started again continues (hone train and hone
run alike), a finished run is left as it is, a changed recipe refuses while checkpoints or a
finished model are there (naming the changed fields), and only --fresh discards training."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from hone.corpus.sources import data_dir
from tiny_runs import hone_process

ROOT = Path(__file__).resolve().parents[1] / "src" / "hone"

pytestmark = pytest.mark.skipif(
    not (data_dir() / "r-bioc-go.db.done").exists() or not (data_dir() / "r-cran-janeaustenr.done").exists(),
    reason="demo data not fetched (bash setup.sh test fetches it)")

STEPS = 12  # of 8 x 128 tokens


def _recipe(path: Path, **edits: str) -> Path:
    """tiny-cpu with STEPS steps and a checkpoint every 4; ``edits`` replace whole lines."""
    text = (ROOT / "recipes" / "tiny-cpu.toml").read_text()
    text = text.replace("max_tokens = 61440", f"max_tokens = {STEPS * 8 * 128}")
    text = text.replace("checkpoint_every = 20", "checkpoint_every = 4").replace("log_every = 10", "log_every = 1")
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


def _hone(*args, env=None, check=True) -> subprocess.CompletedProcess:
    return hone_process(*args, env=env, check=check, timeout=600)


def _checkpoints(wd: Path) -> list[str]:
    return sorted(p.name for p in (wd / "checkpoints").iterdir())


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> tuple[Path, Path]:
    """`hone train RECIPE --max-steps 3`: data stages done, training stopped at step 3."""
    root = tmp_path_factory.mktemp("resume")
    recipe = _recipe(root / "tiny.toml")
    out = _hone("train", recipe, "--workdir", root / "base", "--max-steps", 3).stdout
    assert "starting training" in out and f"stopped at step 3 of {STEPS}" in out
    return root, recipe


@pytest.fixture(scope="module")
def finished(stopped) -> Path:
    """The stopped run, finished by `hone run` started again without a flag."""
    root, recipe = stopped
    wd = shutil.copytree(root / "base", root / "finished")
    out = _hone("run", recipe, "--workdir", wd).stdout
    assert f"resuming from step 3 of {STEPS}" in out
    assert (wd / "final" / "model.safetensors").exists() and (wd / "report.html").exists()
    return wd


def _copy(stopped, name: str) -> Path:
    root, _ = stopped
    return shutil.copytree(root / "base", root / name)


def test_train_started_again_resumes_instead_of_deleting(stopped):
    _, recipe = stopped
    wd = _copy(stopped, "again")
    out = _hone("train", recipe, "--workdir", wd, "--max-steps", 6).stdout
    assert f"resuming from step 3 of {STEPS}" in out
    assert "removed" not in out and "from scratch" not in out
    assert "step_000006" in _checkpoints(wd)
    steps = [json.loads(line)["step"] for line in (wd / "metrics.jsonl").read_text().splitlines()
             if '"step"' in line]
    assert steps[:3] == [1, 2, 3] and steps[-1] == 6  # the first three steps' metrics are kept
    # --resume is still accepted (a no-op: resuming is the default); with --fresh it contradicts.
    out = _hone("train", recipe, "--workdir", wd, "--max-steps", 8, "--resume").stdout
    assert "resuming from step 6 of" in out
    error = _one_line_error(_hone("train", recipe, "--workdir", wd, "--fresh", "--resume", check=False))
    assert "--fresh" in error and "--resume" in error
    assert "step_000008" in _checkpoints(wd)


def test_finished_run_is_left_as_it_is(stopped, finished):
    _, recipe = stopped
    model = finished / "final" / "model.safetensors"
    before = model.stat().st_mtime_ns, (finished / "eval.json").read_text()
    for command in ("train", "run"):
        out = _hone(command, recipe, "--workdir", finished).stdout
        assert "training is already finished" in out and "nothing to do (--fresh to train again)" in out
        assert "step " not in out and "removed" not in out
    assert (model.stat().st_mtime_ns, (finished / "eval.json").read_text()) == before


def test_changed_train_fields_refuse_and_keep_the_finished_model(stopped, finished):
    root, _ = stopped
    changed = _recipe(root / "lr.toml", **{"lr = 3e-3": "lr = 1e-3", "warmup_steps = 5": "warmup_steps = 2"})
    listing = sorted(p.name for p in finished.iterdir())
    for command in ("train", "run"):
        error = _one_line_error(_hone(command, changed, "--workdir", finished, check=False))
        assert "train.lr 0.003 -> 0.001" in error and "train.warmup_steps 5 -> 2" in error
        assert "final/" in error and "eval.json" in error
        assert "--fresh" in error and "--workdir" in error
    assert sorted(p.name for p in finished.iterdir()) == listing  # nothing was deleted


def test_changed_train_fields_refuse_on_checkpoints_then_fresh_removes_what_it_says(stopped):
    root, _ = stopped
    wd = _copy(stopped, "lr")
    changed = _recipe(root / "lr2.toml", **{"lr = 3e-3": "lr = 1e-3"})
    error = _one_line_error(_hone("train", changed, "--workdir", wd, check=False))
    assert "checkpoints (step 3)" in error and "train.lr 0.003 -> 0.001" in error
    assert _checkpoints(wd) == ["step_000003"]

    out = _hone("train", changed, "--workdir", wd, "--fresh", "--max-steps", 2).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("--fresh: removed"))
    assert "checkpoints" in line and "metrics.jsonl" in line and "(the data stages are kept)" in line
    assert "starting training" in out and "resumed from" not in out
    assert _checkpoints(wd) == ["step_000002"]
    assert (wd / "corpus.done").exists() and (wd / "tokens").is_dir()  # the data stages are kept
    assert json.loads((wd / "recipe.json").read_text())["recipe"]["train"]["lr"] == 0.001
    # Now the directory belongs to the new recipe: started again, it resumes.
    assert "resuming from step 2 of" in _hone("train", changed, "--workdir", wd, "--max-steps", 3).stdout


def test_changed_data_fields_refuse_while_training_results_exist(stopped):
    root, _ = stopped
    wd = _copy(stopped, "data")
    changed = _recipe(root / "topk.toml", **{"top_k = 360": "top_k = 300"})
    error = _one_line_error(_hone("run", changed, "--workdir", wd, check=False))
    assert "curate.domain.top_k 360 -> 300" in error and "checkpoints (step 3)" in error
    assert _checkpoints(wd) == ["step_000003"] and (wd / "corpus.done").exists()


def test_changed_train_fields_without_results_just_start_over(stopped, tmp_path):
    """No checkpoint and no model yet: nothing to lose, so the changed recipe simply trains."""
    from hone.pipeline import prepare
    from hone.recipe import load_recipe
    from hone.train.workdir import prepare_workdir

    root, recipe = stopped
    wd = tmp_path / "data-only"
    logs = []
    prepare(load_recipe(recipe), wd, logs.append, tokenize=False)
    (wd / "metrics.jsonl").write_text("")  # a run that died before its first checkpoint
    changed = load_recipe(_recipe(root / "lr3.toml", **{"lr = 3e-3": "lr = 1e-3"}))
    prepare_workdir(changed, wd, False, logs.append)
    assert logs[-1] == ("recipe's [train] changed (train.lr 0.003 -> 0.001): removed metrics.jsonl "
                        "(the data stages are kept)")
    assert not (wd / "metrics.jsonl").exists() and (wd / "corpus.done").exists()
