"""`hone eval`: perplexity and bits per byte of a model on your evaluation sets, every
document whole, and the change against a base model.

    hone eval runs/demo/final --data bio=heldout.jsonl --base runs/demo/base
    hone eval smollm2 --data notes=notes.parquet --window 256 --max-tokens 20000
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch
import typer
from tokenizers import Tokenizer

from hone.cli.common import TEXT_FIELD, log
from hone.corpus.read import read_inputs
from hone.errors import HoneError
from hone.evaluate import compare, evaluate_sets, read_texts
from hone.experts.ensemble import load_model
from hone.model.gguf import load_gguf, smollm2_gguf_path
from hone.model.load import pick_device
from hone.model.tokenizer_files import conventions_of, gguf_tokenizer_files, hf_tokenizer_files
from hone.rundir import write_json
from hone.tokens.conventions import TokenConventions

MODEL_HELP = "an HF model directory, an ensemble directory (hone merge --method ensemble), a .gguf file, or smollm2"


def parse_data(items: list[str]) -> dict[str, Path]:
    """``NAME=FILE`` options → {name: path}, every file checked before any model loads."""
    sets: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise HoneError(f"--data {item!r}: expected NAME=PATH")
        if name in sets:
            raise HoneError(f"--data {item!r}: set {name!r} given twice")
        if not Path(path).is_file():
            raise HoneError(f"--data {name}={path}: file not found")
        sets[name] = Path(path)
    return sets


def read_set(path: Path, text_field: str) -> list[str]:
    """A set's texts: JSON lines (every line must be readable), or a Parquet file."""
    if path.suffix == ".parquet":
        return [d["text"] for d in read_inputs([path], text_field)]
    return read_texts(path, text_field)


def check_model(source: str, option: str) -> None:
    if source != "smollm2" and not Path(source).exists():
        raise HoneError(f"{option} {source}: file not found (want {MODEL_HELP})")


def load_scored_model(source: str) -> tuple[torch.nn.Module, Tokenizer, TokenConventions]:
    """The model, its tokenizer and its document conventions, from any kind of ``source``."""
    if source == "smollm2" or (Path(source).is_file() and Path(source).suffix == ".gguf"):
        path = smollm2_gguf_path() if source == "smollm2" else Path(source)
        model, tok = load_gguf(path)
        return model, tok, conventions_of(tok, gguf_tokenizer_files(path, tok))
    path = Path(source)
    if not path.is_dir():
        raise HoneError(f"{source}: not a model (want {MODEL_HELP})")
    model, tok = load_model(path)
    if tok is None:
        raise HoneError(f"{path}: no tokenizer.json beside the weights")
    config = getattr(model, "config", None)
    ids = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id")}
    return model, tok, conventions_of(tok, hf_tokenizer_files(path), model_config=ids)


def eval_cmd(model: str = typer.Argument(..., help=f"The model to score: {MODEL_HELP}."),
             data: List[str] = typer.Option(..., "--data", help="NAME=FILE of an evaluation set (JSON lines or "
                                                                "Parquet); repeat."),
             base: Optional[str] = typer.Option(None, "--base", help=f"Base model to compare with (forgetting): "
                                                                     f"{MODEL_HELP}."),
             out: Path = typer.Option(Path("eval.json"), "-o", "--out", help="Where to write the results."),
             text_field: str = TEXT_FIELD,
             window: int = typer.Option(512, "--window", "--seq-len", min=2,
                                        help="Tokens the model reads at once; longer documents are scored in "
                                             "strided windows."),
             stride: Optional[int] = typer.Option(None, "--stride", min=1,
                                                  help="Tokens between window starts (default: half the window); "
                                                       "each token sees at least window - stride of context."),
             max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1,
                                                      help="Cap on the tokens scored per set, documents taken in a "
                                                           "seeded random order (default: every document, whole)."),
             seed: int = typer.Option(0, "--seed", help="Seed of the document order under --max-tokens."),
             batch_size: int = typer.Option(4, "--batch-size", min=1, help="Full windows per forward pass."),
             device: str = typer.Option("auto", "--device", help="auto, cpu or cuda.")):
    """Perplexity and bits per byte per set, every document scored whole, and the change against --base."""
    if stride is not None and stride > window:
        raise HoneError(f"--stride {stride}: must be at most --window ({window})")
    if device not in ("auto", "cpu", "cuda"):
        raise HoneError(f"--device {device!r}: expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise HoneError("--device cuda: torch sees no CUDA device")
    paths = parse_data(data)
    check_model(model, "MODEL")
    if base is not None:
        check_model(base, "--base")
    sets = {name: read_set(p, text_field) for name, p in paths.items()}
    dev = pick_device(device)

    def scored(source: str) -> dict:
        m, tok, conv = load_scored_model(source)
        log(f"{source}:")
        return evaluate_sets(m.to(dev), tok, sets, max_tokens=max_tokens, seq_len=window, stride=stride,
                             batch_size=batch_size, seed=seed, conventions=conv,
                             sources={name: str(p) for name, p in paths.items()}, cap_name="--max-tokens", log=log)

    after = scored(model)
    result = compare(scored(base), after) if base is not None else after
    write_json(out, result)
    log(f"wrote {out}")
