"""`hone eval`: perplexity and bits per byte of a model on your evaluation sets, every
document whole, multiple-choice task accuracy through lm-evaluation-harness, and the change
against a base model.

    hone eval runs/demo/final --data bio=heldout.jsonl --base runs/demo/base
    hone eval smollm2 --data notes=notes.parquet --window 256 --max-tokens 20000
    hone eval runs/demo/final --tasks runs/demo/tasks/hone_go_term.yaml --base runs/demo/base
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
from hone.evaluate_tasks import compare_tasks, resolve_tasks, run_tasks
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
             data: List[str] = typer.Option([], "--data", help="NAME=FILE of an evaluation set (JSON lines or "
                                                               "Parquet); repeat."),
             tasks: List[str] = typer.Option([], "--tasks", help="lm-eval multiple-choice tasks: task YAML files or "
                                                                 "task names (comma-separated or repeated)."),
             include: List[Path] = typer.Option([], "--include", help="Directory of lm-eval task files that --tasks "
                                                                      "names are looked up in; repeat."),
             limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Items per task (default: all)."),
             tasks_out: Optional[Path] = typer.Option(None, "--tasks-out",
                                                      help="Where to write the task results (default: "
                                                           "eval_tasks.json beside --out)."),
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
    """Perplexity and bits per byte per set, every document scored whole, task accuracy, and the change
    against --base."""
    if stride is not None and stride > window:
        raise HoneError(f"--stride {stride}: must be at most --window ({window})")
    if device not in ("auto", "cpu", "cuda"):
        raise HoneError(f"--device {device!r}: expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise HoneError("--device cuda: torch sees no CUDA device")
    task_names = [t for item in tasks for t in item.split(",") if t]
    if not data and not task_names:
        raise HoneError("nothing to evaluate: give --data NAME=FILE and/or --tasks TASK")
    paths = parse_data(data)
    resolve_tasks(task_names, include)  # every task file checked before any model loads
    check_model(model, "MODEL")
    if base is not None:
        check_model(base, "--base")
    sets = {name: read_set(p, text_field) for name, p in paths.items()}
    dev = pick_device(device)

    def scored(source: str) -> tuple[dict, dict]:
        m, tok, conv = load_scored_model(source)
        m = m.to(dev)
        log(f"{source}:")
        ppl = evaluate_sets(m, tok, sets, max_tokens=max_tokens, seq_len=window, stride=stride,
                            batch_size=batch_size, seed=seed, conventions=conv,
                            sources={name: str(p) for name, p in paths.items()}, cap_name="--max-tokens",
                            log=log) if sets else {}
        acc = run_tasks(m, tok, conv, task_names, include=include, limit=limit, batch_size=batch_size * 2,
                        log=log) if task_names else {}
        return ppl, acc

    after, tasks_after = scored(model)
    if base is not None:
        before, tasks_before = scored(base)
        after, tasks_after = compare(before, after), compare_tasks(tasks_before, tasks_after)
    if sets:
        write_json(out, after)
        log(f"wrote {out}")
    if task_names:
        tasks_path = tasks_out or out.with_name("eval_tasks.json")
        write_json(tasks_path, tasks_after)
        log(f"wrote {tasks_path}")
