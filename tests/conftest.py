"""Shared fixtures: tiny token streams and a tiny Llama, all CPU, all seconds."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads():
    # Tests run on 2-core CI machines; oversubscription only slows them.
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny12(tmp_path_factory):
    """The tiny recipe of 12 steps, data stages done, and its one- and two-process reference runs
    (tests/tiny_runs.py TinyRuns), shared by the multi-process test modules."""
    from tiny_runs import TinyRuns

    return TinyRuns(tmp_path_factory.mktemp("tiny12"))


def tiny_llama(vocab: int = 256, seed: int = 0):
    from hone.model.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    model = Llama(cfg)
    model.init_weights(seed=seed)
    return model


@pytest.fixture
def token_dirs(tmp_path):
    """Two domains of synthetic EOS-separated token shards written as the tokenize stage does."""
    from hone.rundir import write_json

    rng = np.random.default_rng(0)
    dirs = {}
    for name, (lo, hi) in {"biomedical": (1, 128), "general": (128, 256)}.items():
        d = tmp_path / "tokens" / "train" / name
        d.mkdir(parents=True)
        # A learnable pattern (a cycle) with a little noise, in this domain's id range.
        toks = (lo + (np.arange(5000) * 7) % 37 + rng.integers(0, 2, size=5000)).astype("<u2")
        toks[::50] = 0
        toks.tofile(d / "shard-00000.bin")
        write_json(d / "index.json",
                   {"dtype": "<u2", "shards": [{"file": "shard-00000.bin", "tokens": 5000, "docs": 100}],
                                      "tokens": 5000, "docs": 100, "doc_offsets": [], "eos_id": 0,
                    "tokenizer_hash": "x"})
        dirs[name] = d
    return dirs


def run_hone(capsys, *args) -> tuple[int, str, str]:
    """Run the `hone` entry point in this process (no torch import per call): (status, stdout, stderr)."""
    from hone.cli import main

    argv, sys.argv = sys.argv, ["hone", *map(str, args)]
    capsys.readouterr()
    try:
        main(exit_fast=False)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err
