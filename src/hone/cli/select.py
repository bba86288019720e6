"""`hone data dsir / rate / select`: domain resampling, quality rating, selection under a budget.

``hone.cli.data`` calls ``register(data_app)``. Each command reads jsonl / Parquet / the
other input formats, writes ``OUTDIR/part-00000.parquet`` + ``OUTDIR/.hone/manifest.json``. CPU examples::

    hone data dsir pool.jsonl --target examples.txt -o dsir/ --k 2000
    hone data rate dsir/ -o rated/ --judge local:smollm2 --criterion educational_value --pairs 200
    hone data select rated/ -o picked/ --method quality --budget-tokens 200000 --temperature 1
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from hone.cli.common import INPUTS, OUTDIR, TEXT_FIELD, finish_step, log
from hone.corpus.steps.dsir import dsir_step
from hone.corpus.steps.rate import rate_step
from hone.corpus.steps.select import select_step
from hone.errors import HoneError

SEED = typer.Option(0, "--seed", help="Random seed (sampling, pairs).")


def dsir(inputs: List[Path] = INPUTS, output: Path = OUTDIR,
         target: Path = typer.Option(..., "--target",
                                     help="Example documents of the domain (.txt: one per paragraph; or "
                                          "jsonl/parquet)."),
         k: int = typer.Option(..., "--k", help="Documents to keep."),
         buckets: int = typer.Option(10_000, "--buckets", help="Hashed uni+bigram buckets."),
         min_words: int = typer.Option(5, "--min-words", help="Drop documents with fewer words (too_short)."),
         pseudo_count: float = typer.Option(0.1, "--pseudo-count", help="Added to every bucket's count (smoothing)."),
         length_norm: bool = typer.Option(True, "--length-norm/--sum",
                                          help="log w per n-gram × median length (default), or the paper's plain sum "
                                               "(favours long documents)."),
         deterministic: bool = typer.Option(False, "--deterministic", help="Top-k instead of Gumbel top-k sampling."),
         name: Optional[str] = typer.Option(None, "--name", help="Domain label written on kept documents."),
         seed: int = SEED, text_field: str = TEXT_FIELD):
    """Importance-resample the inputs toward target examples (DSIR: hashed n-grams, Gumbel top-k)."""
    m = dsir_step(inputs, output, text_field=text_field, target=str(target), k=k, buckets=buckets,
                  min_words=min_words, pseudo_count=pseudo_count, length_norm=length_norm, deterministic=deterministic,
                  name=name, seed=seed)
    finish_step("dsir", m, output)


def rate(inputs: List[Path] = INPUTS, output: Path = OUTDIR,
         judge: str = typer.Option(..., "--judge",
                                   help="local:smollm2, local:PATH (GGUF file or HF dir) or openai:URL (e.g. "
                                        "openai:http://localhost:8000/v1)."),
         criterion: str = typer.Option("educational_value", "--criterion",
                                       help="writing_style, required_expertise, facts_and_trivia, educational_value, "
                                            "or your own question."),
         pairs: int = typer.Option(200, "--pairs",
                                   help="Pairs judged (both orders each); a share is held out to measure the rater."),
         heldout: float = typer.Option(0.2, "--heldout", help="Share of rated documents and pairs held out."),
         excerpt_tokens: int = typer.Option(256, "--excerpt-tokens", help="Tokens of each document the judge reads."),
         column: str = typer.Option("quality", "--column", help="Name of the score column written."),
         judge_model: Optional[str] = typer.Option(None, "--judge-model",
                                                   help="openai: model name (default $HONE_JUDGE_MODEL or "
                                                        "gpt-4o-mini)."),
         api_key_env: str = typer.Option("HONE_JUDGE_KEY", "--api-key-env",
                                         help="openai: environment variable holding the API key (else "
                                              "OPENAI_API_KEY)."),
         seed: int = SEED, text_field: str = TEXT_FIELD):
    """Rate quality (QuRating): pairwise judgments → Bradley–Terry → a fast rater scores every document."""
    m = rate_step(inputs, output, text_field=text_field, log=log, judge=judge, criterion=criterion, pairs=pairs,
                  heldout=heldout, excerpt_tokens=excerpt_tokens, column=column, judge_model=judge_model,
                  api_key_env=api_key_env, seed=seed)
    info = m.get("rate", {})
    if info:
        log(f"rate: {info['pairs_confident']['train']}/{info['pairs_judged']['train']} confident training pairs; "
             f"rater agreement on held-out pairs {_pct(info['rater_heldout_accuracy'])} "
             f"({info['pairs_confident']['heldout']} pairs)")
    finish_step("rate", m, output)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _quotas(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, share = item.rpartition("=")
        try:
            out[name] = float(share)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise HoneError(f"--quota {item!r}: expected DOMAIN=SHARE (e.g. bio=0.7)")
    return out


def select(inputs: List[Path] = INPUTS, output: Path = OUTDIR,
           method: str = typer.Option("zip", "--method",
                                      help="zip (compression-ratio diversity), quality (needs a quality column) or "
                                           "random."),
           budget_tokens: Optional[int] = typer.Option(None, "--budget-tokens", help="Token budget of the selection."),
           max_docs: Optional[int] = typer.Option(None, "--max-docs",
                                                  help="Document budget (with or instead of --budget-tokens)."),
           temperature: float = typer.Option(1.0, "--temperature", help="quality: τ of P ∝ exp(z/τ); 0 = top-k."),
           quota: Optional[List[str]] = typer.Option(None, "--quota",
                                                     help="DOMAIN=SHARE of the budget (repeatable); other domains are "
                                                          "dropped."),
           tokenizer: Optional[str] = typer.Option(None, "--tokenizer",
                                                   help="Count tokens with smollm2 or a tokenizer.json (default: "
                                                        "whitespace words)."),
           k1: int = typer.Option(10_000, "--k1", help="zip: candidates by own compression ratio."),
           k2: int = typer.Option(200, "--k2", help="zip: candidates by ratio with the selected set."),
           k3: int = typer.Option(100, "--k3", help="zip: documents added per round."),
           column: str = typer.Option("quality", "--column", help="quality: the score column to sample by."),
           seed: int = SEED, text_field: str = TEXT_FIELD):
    """Select documents under a token budget: ZIP diversity, quality-temperature sampling or random."""
    if budget_tokens is None and max_docs is None:
        raise HoneError("select needs --budget-tokens N (or --max-docs N)")
    m = select_step(inputs, output, text_field=text_field, method=method, budget_tokens=budget_tokens,
                    max_docs=max_docs, temperature=temperature, quotas=_quotas(quota or []), tokenizer=tokenizer,
                    k1=k1, k2=k2, k3=k3, quality_column=column, seed=seed)
    info = m.get("select", {})
    if info:
        log(f"select: {info['tokens_selected']} of {info['tokens_in']} tokens selected"
             + (f", compression ratio {info['compression_ratio_selected']}"
                if "compression_ratio_selected" in info else ""))
    finish_step("select", m, output)


def register(data_app: typer.Typer) -> None:
    """Add ``dsir``, ``rate`` and ``select`` to ``hone data``."""
    data_app.command("dsir")(dsir)
    data_app.command("rate")(rate)
    data_app.command("select")(select)
