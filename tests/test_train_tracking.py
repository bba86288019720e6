"""Tracking backends: W&B (offline) and MLflow (local file store) receive exactly the scalars of
metrics.jsonl, then eval.json and report.html; a backend that is not installed is one line."""

import json
import struct
import sys

import pytest
import torch

from conftest import tiny_llama
from hone.errors import HoneError
from hone.recipe import TrainConfig
from hone.tokens import load_tokens
from hone.train.data import MixtureLoader, TokenStream
from hone.train.loop import train
from hone.train.tracking import Tracking, check_backends, finish_tracking, redact, scalars

CFG = TrainConfig(seq_len=16, batch_size=4, lr=3e-3, warmup_steps=2, log_every=100, checkpoint_every=2)
TABLE = {"domain": {"ppl_before": 12.5, "ppl_after": 10.0, "ppl_change": -0.2},
         "general": {"ppl_before": 20.0, "ppl_after": 21.0, "ppl_change": 0.05}}


def loader(token_dirs):
    streams = {n: TokenStream(load_tokens(d), CFG.seq_len) for n, d in token_dirs.items()}
    return MixtureLoader(streams, domain="biomedical", general="general", batch_size=4, ratio=0.5)


def run(token_dirs, workdir, tracking, steps=3, max_steps=None):
    torch.manual_seed(0)
    train(tiny_llama(), loader(token_dirs), CFG, workdir, total_steps=steps, max_steps=max_steps, resume=True,
          log=lambda m: None, tracking=tracking)


def expected(workdir) -> dict[tuple[str, int], float]:
    """(name, step) -> value of every scalar metrics.jsonl holds."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.update({(k, row["step"]): v for k, v in scalars(row).items()})
    return out


def test_scalars_are_the_metrics_numbers():
    row = {"step": 3, "loss": 2.5, "loss_by_domain": {"bio": 2.0, "gen": 3}, "lr": 1e-3, "mfu": None,
           "batch": "abc123", "world": 1, "tokens_per_s": float("nan")}
    assert scalars(row) == {"loss": 2.5, "loss_by_domain/bio": 2.0, "loss_by_domain/gen": 3.0, "lr": 1e-3,
                            "world": 1.0}


def test_credentials_in_a_tracking_uri_are_never_shown():
    assert redact("https://alice:s3cret@mlflow.example:5000/path") == "https://***@mlflow.example:5000/path"
    assert redact("file:///tmp/mlruns") == "file:///tmp/mlruns"


def wandb_records(workdir) -> list:
    """Every record of the offline runs W&B wrote under ``workdir/wandb`` (its LevelDB-style log:
    32 KiB blocks of [crc32 u32, length u16, type u8] chunks; wandb.proto's Record in each)."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted((workdir / "wandb").glob("offline-run-*/run-*.wandb")):
        raw, pos, chunk = path.read_bytes(), 7, b""
        assert raw[:4] == b":W&B"
        while pos + 7 <= len(raw):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
            if n == 0 and kind == 0:  # zero padding up to the block's end
                pos += left
                continue
            chunk += raw[pos + 7:pos + 7 + n]
            pos += 7 + n
            if kind in (1, 4):  # a whole record, or the last chunk of one
                record = pb.Record()
                record.ParseFromString(chunk)
                records.append(record)
                chunk = b""
    return records


def test_wandb_offline_gets_every_metric_then_eval_and_report(token_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = tmp_path / "run"
    tracking = Tracking(backends=("wandb",), project="p", run_name="tiny")
    run(token_dirs, workdir, tracking)
    (workdir / "report.html").write_text("<html>report</html>")
    finish_tracking(tracking, workdir, TABLE, [workdir / "report.html"], lambda m: None)

    run_id = json.loads((workdir / "tracking.json").read_text())["wandb"]["id"]
    records = wandb_records(workdir)
    assert {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"} == {run_id}
    sent, table_logged = {}, False
    for r in records:
        if r.WhichOneof("record_type") != "history":
            continue
        for item in r.history.item:
            key = item.key or "/".join(item.nested_key)
            if key == "eval" or key.startswith("eval/"):  # the table (W&B stores it as a file reference)
                table_logged = True
            elif not key.startswith("_"):
                sent[(key, r.history.step.num)] = json.loads(item.value_json)
    assert sent == expected(workdir)
    assert table_logged
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert any(a.type == "report" for a in artifacts)


def test_mlflow_file_store_gets_every_metric_once_across_a_resume(token_dirs, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    workdir = tmp_path / "run"
    tracking = Tracking(backends=("mlflow",), project="p", run_name="tiny")
    run(token_dirs, workdir, tracking, steps=4, max_steps=3)  # stopped after step 3; checkpoint at step 3
    first = expected(workdir)
    (workdir / "checkpoints" / "step_000003").rename(workdir / "checkpoints" / "old")  # resume from step 2
    # As after a crash: the trackers were not closed, tracking.json never got the last step sent.
    state = json.loads((workdir / "tracking.json").read_text())
    (workdir / "tracking.json").write_text(json.dumps({k: v for k, v in state.items() if k != "sent_step"}))
    run(token_dirs, workdir, tracking, steps=4)
    (workdir / "report.html").write_text("<html>report</html>")
    finish_tracking(tracking, workdir, TABLE, [workdir / "report.html"], lambda m: None)

    state = json.loads((workdir / "tracking.json").read_text())["mlflow"]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as the backend did for its own default store
    assert state["tracking_uri"] == (workdir / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    metrics = client.get_run(state["run_id"]).data.metrics
    sent = {}
    for key in metrics:
        for m in client.get_metric_history(state["run_id"], key):
            assert (m.key, m.step) not in sent, f"{m.key} step {m.step} sent twice"
            sent[(m.key, m.step)] = m.value
    # Step 3, run twice, is sent once: with its first values (the same loss and lr; other timings).
    want = {**expected(workdir), **first}
    assert all(want[(k, 3)] == v for (k, step), v in expected(workdir).items() if step == 3 and k in ("loss", "lr"))
    want.update({(f"eval/{s}/{k}", 4): v for s, row in TABLE.items() for k, v in row.items()})
    assert sent == want
    assert {a.path for a in client.list_artifacts(state["run_id"])} == {"eval.json", "recipe.json", "report.html"}
    assert len(client.search_runs([client.get_experiment_by_name("p").experiment_id])) == 1


@pytest.mark.parametrize("backend, extra", [("wandb", "wandb"), ("mlflow", "mlflow"), ("tensorboard", "tensorboard")])
def test_a_backend_not_installed_is_one_line(monkeypatch, backend, extra):
    monkeypatch.setitem(sys.modules, backend, None)  # `import wandb` now fails as if not installed
    with pytest.raises(HoneError) as err:
        check_backends(Tracking(backends=(backend,)))
    msg = str(err.value)
    assert "log.backends" in msg and f"hone[{extra}]" in msg and "\n" not in msg
    if backend == "tensorboard":  # log.backends unset: tensorboard only when installed, as before [log] existed
        assert check_backends(None) == []


def test_run_refuses_a_missing_backend_before_any_work(monkeypatch, tmp_path):
    from hone.pipeline import run_recipe
    from hone.recipe import parse_recipe

    monkeypatch.setitem(sys.modules, "mlflow", None)
    recipe = parse_recipe({"run": {"workdir": str(tmp_path / "run")}, "data": {"packaged": {}},
                           "curate": {"domain": {"keywords": ["gene"]}}, "log": {"backends": ["mlflow"]}})
    with pytest.raises(HoneError, match=r"log.backends: 'mlflow' needs the mlflow package: pip install 'hone\[mlflow"):
        run_recipe(recipe, log=lambda m: None)
    assert not (tmp_path / "run").exists()
