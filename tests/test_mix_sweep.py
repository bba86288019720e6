"""`hone mix sweep` on the tiny recipe: the estimate line and --dry-run, runs.jsonl lines,
the ETA, checkpoints removed once recorded (a killed run keeps its own and resumes), resume
skips finished points, a lost point is measured again with the same value; the mixture
plot's y-limits follow the points. Needs the packaged demo data (not the plot tests)."""

import json
import re

import pytest

from hone.corpus.sources import data_dir
from hone.recipe import load_recipe, shipped_recipe

needs_data = pytest.mark.skipif(
    not (data_dir() / "r-bioc-go.db.done").exists() or not (data_dir() / "r-cran-janeaustenr.done").exists(),
    reason="demo data not fetched (bash setup.sh test fetches it)")



class Stop(Exception):
    pass


@needs_data
def test_sweep_estimates_cleans_up_and_resumes(tmp_path, monkeypatch):
    from hone.mix import sweep as mix_sweep
    from hone.pipeline import sweep_mixture as run_sweep

    recipe = load_recipe(shipped_recipe("tiny-cpu"), {"mix.ratios": [0.0, 0.5, 1.0], "mix.tokens": [1024, 2048],
                                                     "mix.base_tokens": 1024, "eval.max_tokens_per_set": 300,
                                                     "data.packaged.wikipedia": 100, "data.packaged.gene_ontology": 100,
                                                     "curate.domain.top_k": 100, "model.random.vocab": 512})
    mixdir = tmp_path / "mix"
    lines = []
    out = run_sweep(recipe, tmp_path, log=lines.append, dry_run=True)
    estimate = [m for m in lines if m.startswith("mix: estimate:")]
    assert len(estimate) == 1, lines
    assert re.search(r"3 of 3 proxy runs to do \(3 ratios x 1 order\), 2,048 tokens = 2 steps each "
                     r"\+ 1 general-only base step, 6 points \| [0-9.e-]+ s/step measured", estimate[0])
    assert re.search(r"about \d+(m\d\ds|s) \| proxy checkpoints [0-9.]+ [KM]B at a time", estimate[0])
    assert not out.exists() and not (mixdir / "runs").exists() and not (mixdir / "base").exists()
    assert not (mixdir / ".estimate").exists()

    # Killed after the ratio-0.5 run trained 2,048 tokens, before recording that point.
    real_append = mix_sweep.append_jsonl

    def dies(path, row):
        if row.get("ratio") == 0.5 and row.get("tokens") == 2048:
            raise Stop
        real_append(path, row)

    monkeypatch.setattr(mix_sweep, "append_jsonl", dies)
    with pytest.raises(Stop):
        run_sweep(recipe, tmp_path, log=lambda m: None)
    monkeypatch.setattr(mix_sweep, "append_jsonl", real_append)
    assert not (mixdir / "runs" / "r0.0000").exists()  # recorded: removed
    assert list((mixdir / "runs" / "r0.5000" / "checkpoints").glob("step_*"))  # not recorded: kept to resume

    lines = []
    run_sweep(recipe, tmp_path, log=lines.append)
    assert any(m.startswith("mix: estimate: 2 of 3 proxy runs to do") for m in lines), lines
    assert any(re.search(r"\| point \d/3 \| \d+(m\d\ds|s) \| ETA ", m) for m in lines), lines
    assert any(re.fullmatch(r"mix: removed 2 recorded proxy runs under .*runs \(checkpoints, [0-9.]+ [KM]B freed\); "
                            r"base weights kept in .*base", m) for m in lines), lines
    assert not list((mixdir / "runs").iterdir()) and (mixdir / "base" / "model.pt").exists()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 * 3  # tokens 0 (the base) and two budgets per ratio
    assert all(set(r) == {"model_params", "ratio", "tokens", "general_loss", "domain_loss"} for r in rows)
    assert sorted({r["tokens"] for r in rows}) == [0, 1024, 2048]
    base = [r for r in rows if r["tokens"] == 0]
    assert len({(r["general_loss"], r["domain_loss"]) for r in base}) == 1
    text = out.read_text()
    lines = []
    run_sweep(recipe, tmp_path, log=lines.append)
    assert out.read_text() == text  # nothing re-run
    assert lines[-1].startswith("mix: every point of the sweep is already in")
    lost = [line for line in text.splitlines()
            if json.loads(line)["ratio"] == 0.5 and json.loads(line)["tokens"] == 1024]
    out.write_text("".join(line + "\n" for line in text.splitlines() if line not in lost))
    run_sweep(recipe, tmp_path, log=lambda m: None)
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(again) == len(rows)
    redone = next(r for r in again if r["ratio"] == 0.5 and r["tokens"] == 1024)
    assert redone == pytest.approx(json.loads(lost[0]), rel=1e-5)
    assert not list((mixdir / "runs").iterdir())


def test_recorded_runs_removed_open_runs_kept(tmp_path):
    from hone.mix.sweep import _remove_recorded

    recipe = load_recipe(shipped_recipe("tiny-cpu"), {"mix.ratios": [0.0, 0.5], "mix.tokens": [1024, 2048]})
    for name in ("r0.0000", "r0.5000"):
        (tmp_path / "runs" / name / "checkpoints" / "step_000008").mkdir(parents=True)
        (tmp_path / "runs" / name / "checkpoints" / "step_000008" / "x.distcp").write_bytes(b"0" * 1000)
    freed = [0, 0]
    _remove_recorded(recipe, tmp_path, [(0.5, 0, [2048])], freed)
    assert freed == [1, 1000]
    assert not (tmp_path / "runs" / "r0.0000").exists() and (tmp_path / "runs" / "r0.5000").exists()


def test_loss_limits_follow_points():
    from hone.report.plots import loss_limits

    assert loss_limits([]) is None
    lo, hi = loss_limits([5.0, 5.5, None, float("nan")])
    assert lo == pytest.approx(4.95) and hi == pytest.approx(5.55)
    lo, hi = loss_limits([5.0])
    assert lo == pytest.approx(4.98) and hi == pytest.approx(5.02)


def test_mixture_plot_y_limits_follow_points(monkeypatch):
    """A CMR domain curve rising to ~57 near ratio 0 must not set the axis range."""
    from hone.report import plots

    figs = []
    monkeypatch.setattr(plots, "_png", lambda fig: figs.append(fig) or "")
    points = [{"ratio": r, "tokens": 2048, "general_loss": 4.0 + 0.2 * r, "domain_loss": 5.0 - 0.5 * r}
              for r in (0.1, 0.5, 1.0)] + [{"ratio": 0.0, "tokens": 0, "general_loss": 4.1, "domain_loss": 5.2}]
    law = {"by_tokens": [{"tokens": 2048, "general_loss": {"a": 0.2, "s": 1.0, "b": 4.0},
                          "domain_loss": {"a": 1.0, "s": -1.5, "b": 4.4}}]}  # 1 / r^1.5: 57 at r = 0.07
    plots.mixture_fits(points, {"laws": {"cmr": law}, "tolerance": 0.05,
                                "chosen": {"ratio": 0.5, "reference_general_loss": 4.1}})
    general, domain = figs[0].axes[:2]
    assert domain.get_ylim() == pytest.approx(plots.loss_limits([5.0 - 0.05, 5.0 - 0.25, 4.5, 5.2]))
    assert domain.get_ylim()[1] < 5.5
    assert general.get_ylim() == pytest.approx(plots.loss_limits([4.02, 4.1, 4.2, 4.1, 4.15]))


@needs_data
def test_sweep_bad_eval_set_name(tmp_path):
    from hone.errors import HoneError
    from hone.pipeline import sweep_mixture as run_sweep

    recipe = load_recipe(shipped_recipe("tiny-cpu"), {"mix.domain_set": "nope"})
    with pytest.raises(HoneError, match="mix.domain_set: no evaluation set named 'nope'"):
        run_sweep(recipe, tmp_path, log=lambda m: None)
