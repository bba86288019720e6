"""The tiny-cpu recipe end to end: every artifact a user and later stages rely on.

Uses the packaged corpora (installed by `bash setup.sh test`); runs in well under a minute.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hone.corpus.sources import data_dir
from hone.recipe import load_recipe, shipped_recipe

needs_data = pytest.mark.skipif(
    not (data_dir() / "r-bioc-go.db.done").exists() or not (data_dir() / "r-cran-janeaustenr.done").exists(),
    reason="demo data not fetched (bash setup.sh test fetches it)")

pytestmark = needs_data


def tiny(**overrides):
    return load_recipe(shipped_recipe("tiny-cpu"), overrides)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from hone.pipeline import run_recipe

    workdir = tmp_path_factory.mktemp("tiny")
    logs = []
    table = run_recipe(tiny(), workdir, log=logs.append)
    return workdir, table, logs


def test_artifacts_are_where_other_tools_read_them(tiny_run):
    workdir, table, _ = tiny_run
    for rel in ["corpus/.hone/manifest.json", "metrics.jsonl", "eval.json", "report.html", "final/model.safetensors",
                "final/config.json", "final/tokenizer.json", "tokens/train/biomedical/index.json"]:
        assert (workdir / rel).exists(), rel
    ev = json.loads((workdir / "eval.json").read_text())
    assert set(ev) == {"domain", "general", "unseen"}
    for row in ev.values():
        assert {"ppl_before", "ppl_after", "bpb_before", "bpb_after"} <= set(row)
        assert row["ppl_after"] < row["ppl_before"]  # a random model learns everything
    assert ev == table


def test_manifest_accounts_for_every_document(tiny_run):
    workdir, _, logs = tiny_run
    m = json.loads((workdir / "corpus" / ".hone" / "manifest.json").read_text())
    for name, step in m["steps"].items():
        dropped = sum(d["docs"] for d in step["dropped"].values())
        assert step["docs_in"] == step["docs_out"] + dropped, name
    assert m["retrieval"]["precision"] > 0.7 and m["retrieval"]["recall"] > 0.7
    assert any("precision" in line for line in logs)


def test_final_model_loads_in_transformers(tiny_run):
    transformers = pytest.importorskip("transformers")
    import torch

    from hone.model.hf import load_hf

    workdir, _, _ = tiny_run
    ours, tok = load_hf(workdir / "final")
    hf = transformers.AutoModelForCausalLM.from_pretrained(workdir / "final")
    ids = torch.tensor([tok.encode("The protein binds DNA.").ids])
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-4)


def test_report_has_plots(tiny_run):
    workdir, _, _ = tiny_run
    html = (workdir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert "http://" not in html and "https://" not in html
    assert 'id="eval-table"' in html and 'id="funnel-table"' in html


def test_rerun_skips_finished_stages(tiny_run):
    from hone.pipeline import run_recipe

    workdir, table, _ = tiny_run
    logs = []
    again = run_recipe(tiny(), workdir, log=logs.append)
    assert again == table
    assert not any(line.startswith("step ") for line in logs)  # no training step was redone


def test_interrupted_run_resumes_to_the_same_weights(tiny_run, tmp_path):
    from hone.pipeline import run_recipe

    workdir, table, _ = tiny_run
    assert run_recipe(tiny(), tmp_path, max_steps=25, log=lambda m: None) == {}
    assert not (tmp_path / "final").exists()
    resumed = run_recipe(tiny(), tmp_path, log=lambda m: None)
    a = load_file(str(workdir / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert resumed == table


def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    workdir, _, _ = tiny_run
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,2400",
                    f"--screenshot={shot}", (workdir / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.exists() and shot.stat().st_size > 50_000  # plots drawn, not a blank page


# Rows of the README's run-directory table that a plain `hone run` of tiny-cpu does not write:
# other commands' outputs, and what needs data sources, a GGUF base or a failure.
OTHER_COMMANDS = ("mix/", "experts/", "plan.json", "mixture.json", "launch/", "logs/", "heal/", "sources/", "base/",
                  "tokens/sources/", "heldout/NAME", "plan/",
                  # written when it happens: an unreadable input line (tests/test_silent.py), a failure or decision
                  "corpus/.hone/quarantine/", "events.jsonl",
                  # written only with [log] backends (tests/test_train_tracking.py)
                  "tracking.json", "wandb/", "mlruns/",
                  # written only with eval.tasks (tests/test_eval_tasks.py)
                  "tasks/", "eval_tasks",
                  # written only under train.lora (tests/test_lora.py)
                  "final-adapter")


def readme_run_directory_paths() -> list[str]:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("## The run directory", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return [p for row in rows for p in re.findall(r"`([^`]+)`", row)]


def test_every_artifact_the_readme_lists_is_written(tiny_run):
    workdir = tiny_run[0]
    paths = [p for p in readme_run_directory_paths() if not p.startswith(OTHER_COMMANDS)]
    if importlib.util.find_spec("tensorboard") is None:
        paths.remove("tensorboard/")
    assert "train_summary.json" in paths and "corpus/part-*.parquet" in paths
    for p in paths:
        pattern = re.sub(r"<[^>]+>|\bNAME\b|(?<=_)N\b|(?<=rank)R\b", "*", p).rstrip("/")
        assert list(workdir.glob(pattern)), f"README lists {p}; a plain `hone run` did not write it"
    summary = json.loads((workdir / "train_summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] and summary["world_size"] == 1
