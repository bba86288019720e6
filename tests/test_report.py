"""The report from a synthetic run directory: every section, self-contained, rendered by a
real browser (headless Chromium, skipped where it is not installed)."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from hone.report import write_report
from hone.rundir import write_json


def _points():
    rows = []
    for t in (1e4, 2e4, 4e4):
        for r in (0.0, 0.25, 0.5, 0.75, 1.0):
            rows.append({"model_params": 1000, "ratio": r, "tokens": t,
                         "general_loss": 4.0 + 0.3 * r ** 1.5 + 1e4 / t * 0.1,
                         "domain_loss": 4.5 - 0.8 * r ** 0.5 + 1e4 / t * 0.1})
    return rows + [{"model_params": 1000, "ratio": r, "tokens": 0, "general_loss": 4.1, "domain_loss": 5.0}
                   for r in (0.0, 0.5)]


@pytest.fixture(scope="module")
def rundir(tmp_path_factory):
    from hone.mix.laws import fit_mixture
    from hone.train.mixture import make_schedule

    d = tmp_path_factory.mktemp("run")
    write_json(d / "recipe.json", {"hash": "x", "recipe": {"run": {"name": "synthetic"}, "train": {}}})
    write_json(d / "corpus" / "manifest.json", {
        "steps": {"filters": {"docs_in": 100, "docs_out": 90,
                              "dropped": {"too_few_words": {"docs": 7}, "symbols": {"docs": 3}}},
                  "exact_dedup": {"docs_in": 90, "docs_out": 88, "dropped": {"duplicate": {"docs": 2}}}},
        "domains": {"biomedical": {"docs": 40}, "general": {"docs": 48}},
        "retrieval": {"precision": 0.8, "recall": 0.9, "f1": 0.85}})
    (d / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": i, "loss": 5 - i / 20, "loss_by_domain": {"biomedical": 5.1 - i / 20, "general": 4.9 - i / 25},
         "tokens": i * 1024, "tokens_per_s": 1000.0, "elapsed_s": i * 1.0}) + "\n" for i in range(1, 21)))
    write_json(d / "eval.json", {n: {"ppl_before": 40.0, "ppl_after": a, "bpb_before": 1.2, "bpb_after": 1.0,
                                     "ppl_change": a / 40 - 1, "tokens": 100, "docs": 3}
                                 for n, a in (("domain", 20.0), ("general", 41.0), ("unseen", 40.5))})
    mixture = fit_mixture(_points(), law="both", tolerance=0.05)
    mixture["schedule"] = make_schedule(mixture["chosen"]["ratio"], 0.1, 0.9)
    write_json(d / "mixture.json", mixture)
    write_json(d / "plan.json", {"model": {"name": "smollm2-135m"}, "cluster": {"name": "8xH100"}, "seq": 2048,
                                 "global_batch": 64, "configs": [
                                     {"tp": 1, "pp": 1, "dp": 8, "micro_batch": 1, "recompute": "none", "zero": 3,
                                      "vpp": 1,
                                      "memory_gib_per_gpu": 4.46, "step_time_s": 0.04, "tokens_per_s": 3.28e6,
                                      "mfu": 0.51},
                                     {"tp": 2, "pp": 1, "dp": 4, "micro_batch": 2, "recompute": "none", "zero": 1}]})
    write_report(d)
    return d, mixture


def test_every_section_is_there(rundir):
    d, mixture = rundir
    html = (d / "report.html").read_text()
    for table in ("eval-table", "funnel-table", "mix-table", "plan-table"):
        assert f'id="{table}"' in html, table
    # funnel, drop reasons, retrieval, loss curves, perplexity, mixture fits
    assert html.count("data:image/png;base64,") == 6
    assert f'{mixture["chosen"]["ratio"]:.3f}' in re.search(r'id="chosen-ratio">([^<]*)<', html).group(1)
    assert "over the last 10% of steps" in html and "smollm2-135m on 8xH100" in html


def test_self_contained_no_external_references(rundir):
    html = (rundir[0] / "report.html").read_text()
    assert not re.search(r"https?://", html)
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", html)


def test_points_only_and_partial_runs(tmp_path):
    from hone.mix.laws import validate_points

    (tmp_path / "mix").mkdir()
    (tmp_path / "mix" / "runs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in validate_points(_points())))
    html = write_report(tmp_path).read_text()
    assert "Proxy runs only" in html and html.count("data:image/png;base64,") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "Hone report" in write_report(empty).read_text()


def test_renders_in_headless_chromium(rundir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    d, mixture = rundir
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", (d / "report.html").as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert 'id="plan-table"' in dom and 'id="mix-table"' in dom and dom.count("<img") == 6
    shot = tmp_path / "report.png"
    subprocess.run(flags + ["--window-size=1100,3000", f"--screenshot={shot}", (d / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 20  # plots drawn, not a blank page
