"""Nothing silent: each trap as the user met it (the command or function, what is on disk, the message)."""

import json

import pytest
from typer.testing import CliRunner

from hone.cli import app
from hone.errors import HoneError
from hone.pipeline import log_unused_sources, stage_curate, stage_pool
from hone.recipe import parse_recipe

TEXTS = [f"Document {i} is about proteins, genes and the cell membrane, in plain words for everyone."
         for i in range(12)]


def write_jsonl(path, texts, extra: bytes = b""):
    path.write_bytes(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts) + extra)
    return path


def pool_recipe(tmp_path, *inputs):
    return parse_recipe({"run": {"workdir": str(tmp_path / "run")}, "data": {"inputs": [str(p) for p in inputs]},
                         "curate": {"domain": {"name": "bio", "keywords": ["protein"], "top_k": 4}}})


def test_an_empty_pool_input_is_an_error_naming_the_file(tmp_path):
    good, empty = write_jsonl(tmp_path / "good.jsonl", TEXTS), tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(HoneError, match=r"data.inputs: .*empty.jsonl: no readable document \(empty_file 1"):
        stage_pool(pool_recipe(tmp_path, good, empty), tmp_path / "run", print)


def test_a_pool_input_of_only_bad_lines_is_an_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"body": "no text field"}\nnot json\n')
    with pytest.raises(HoneError, match=r"bad.jsonl: no readable document \(.*missing_text 1"):
        stage_pool(pool_recipe(tmp_path, bad), tmp_path / "run", print)


def test_quarantined_lines_are_counted_with_the_file(tmp_path):
    src = write_jsonl(tmp_path / "pool.jsonl", TEXTS, extra=b'{"text": "unterminated\n')
    recipe, logs = pool_recipe(tmp_path, src), []
    inputs, _ = stage_pool(recipe, tmp_path / "run", logs.append)
    stage_curate(recipe, tmp_path / "run", inputs, logs.append)
    quarantine = tmp_path / "run" / "corpus" / ".hone" / "quarantine" / "quarantine.jsonl"
    assert quarantine.exists()
    assert f"curate: 1 unreadable input lines quarantined (bad_json 1) -> {quarantine}" in logs


def test_top_k_beyond_the_pool_says_how_many_were_taken(tmp_path):
    src = write_jsonl(tmp_path / "pool.jsonl", TEXTS)
    out = CliRunner().invoke(app, ["data", "retrieve", str(src), "-o", str(tmp_path / "out"), "--query", "protein",
                                   "--top-k", "1000", "--expand", "none"]).output
    assert "top_k 1,000 is more than the 12 documents read: took 12 (those with a positive score)" in out


def test_a_source_whose_role_gets_no_share_is_named(tmp_path):
    recipe = parse_recipe({"data": {"sources": [{"name": "kernel", "inputs": ["k.jsonl"]},
                                                {"name": "wiki", "inputs": ["w.jsonl"], "role": "general"}]},
                           "train": {"domain_ratio": 1.0}})
    logs = []
    log_unused_sources(recipe, logs.append)
    assert logs == ["source wiki: no training tokens: domain ratio 1 gives the general role no share"]
