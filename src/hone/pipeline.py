"""The whole job for one recipe: pool → curate → tokenize → base model → eval → train →
eval → save → report. Each stage writes its artifact into the run directory and is
skipped when that artifact is already there, so an interrupted run picks up where it
stopped (training resumes from its newest checkpoint).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer

from hone.corpus.pipeline import curate
from hone.corpus.sources import build_demo_pool
from hone.errors import HoneError
from hone.evaluate import compare, evaluate_sets, read_texts
from hone.experts.branch import check_branch, run_branch
from hone.heal.supervisor import supervise as supervise_run
from hone.mix import sweep as mix_sweep
from hone.model.hf import save_hf
from hone.model.load import load_base_model
from hone.recipe import Recipe
from hone.report import write_report
from hone.rundir import (
    CORPUS_DIR,
    EVAL_AFTER_FILE,
    EVAL_BEFORE_FILE,
    EVAL_FILE,
    FINAL_DIR,
    HELDOUT_DIR,
    POOL_DIR,
    TOKENS_DIR,
    is_done,
    mark_done,
    read_json,
    write_json,
)
from hone.tokens import tokenize_corpus
from hone.train.run import plan_from_recipe, read_back, train_recipe
from hone.train.workdir import forget_training, prepare_workdir

Log = Callable[[str], None]


def stage_pool(recipe: Recipe, workdir: Path, log: Log) -> tuple[list[Path], dict[str, Path]]:
    """Input files of the pool and the held-out evaluation sets."""
    inputs = [Path(p) for p in recipe.data.inputs]
    for p in inputs:
        if not p.exists():
            raise HoneError(f"data.inputs: {p}: file not found")
    eval_sets: dict[str, Path] = {}
    if recipe.data.packaged is not None:
        marker = workdir / POOL_DIR
        if not is_done(marker):
            log("pool: building the mixed pool from packaged corpora")
            summary = build_demo_pool(recipe.data.packaged, workdir, recipe.run.seed)
            mark_done(marker, summary)
        inputs = [workdir / POOL_DIR / "pool.jsonl"] + inputs
        eval_sets = {name: workdir / HELDOUT_DIR / f"{name}.jsonl" for name in ("domain", "general", "unseen")}
    for name, p in recipe.eval.sets.items():
        if not Path(p).exists():
            raise HoneError(f"eval.sets.{name}: {p}: file not found")
        eval_sets[name] = Path(p)
    if not eval_sets:
        raise HoneError("no evaluation sets: use data.packaged or give eval.sets")
    return inputs, eval_sets


def stage_curate(recipe: Recipe, workdir: Path, inputs: list[Path], log: Log) -> dict:
    t0 = time.perf_counter()
    manifest = curate(recipe.curate, inputs, workdir, text_field=recipe.data.text_field, log=log)
    counts = manifest.get("domains", {})
    log(f"curate: {counts} in {time.perf_counter() - t0:.1f}s")
    if (r := manifest.get("retrieval")):
        log(f"curate: retrieval of '{recipe.curate.domain.name}' precision {r['precision']:.3f} "
            f"recall {r['recall']:.3f} (against hidden labels)")
    return manifest


def stage_tokenize(recipe: Recipe, workdir: Path, tok: Tokenizer, log: Log) -> dict:
    t0 = time.perf_counter()
    summary = tokenize_corpus(workdir / CORPUS_DIR, tok, workdir / TOKENS_DIR, seed=recipe.run.seed)
    log("tokenize: " + ", ".join(f"{d} {s['tokens']:,} tokens" for d, s in summary.items())
        + f" in {time.perf_counter() - t0:.1f}s")
    return summary


def stage_eval(recipe: Recipe, model, tok: Tokenizer, eval_sets: dict[str, Path], out: Path, label: str,
               log: Log) -> dict:
    if out.exists():
        return read_json(out)
    log(f"eval ({label}):")
    t0 = time.perf_counter()
    texts = {name: read_texts(p) for name, p in eval_sets.items()}
    results = evaluate_sets(model, tok, texts, max_tokens=recipe.eval.max_tokens_per_set,
                            seq_len=recipe.eval.seq_len, batch_size=recipe.eval.batch_size, log=log)
    log(f"eval ({label}) done in {time.perf_counter() - t0:.1f}s")
    write_json(out, results)
    return results


def stage_train(recipe: Recipe, workdir: Path, model, max_steps: int | None, log: Log, nproc: int = 1,
                supervise: bool = False) -> dict:
    """Train in this process, or in ``nproc`` torchrun workers (under the self-healing
    supervisor with ``supervise``); the newest weights end up in ``model``."""
    if not supervise:
        return train_recipe(recipe, workdir, model, max_steps, log, nproc=nproc)
    plan_from_recipe(recipe.train, nproc)  # a bad tp fails here, before workers start
    supervise_run(recipe, workdir, nproc, max_steps, log)
    return read_back(recipe, workdir, model, log)


@dataclass
class Prepared:
    """What the data stages leave for training: pool inputs, evaluation sets, the curation
    manifest, the base model and its tokenizer (the corpus tokenized with it)."""

    inputs: list[Path]
    eval_sets: dict[str, Path]
    manifest: dict
    model: torch.nn.Module
    tokenizer: Tokenizer


def prepare(recipe: Recipe, workdir: Path, log: Log, *, fresh: bool = False, restart_training: bool = False,
            tokenize: bool = True, check_sets: Callable[[dict[str, Path]], None] | None = None) -> Prepared:
    """The run directory and every data stage (each skipped when its artifact is there):
    pool, curate, base model, tokenize. ``fresh`` starts the run directory over,
    ``restart_training`` removes what training wrote; ``check_sets`` sees the evaluation
    sets before any curation work."""
    prepare_workdir(recipe, workdir, fresh, log)
    if restart_training:
        forget_training(workdir, log)
    inputs, eval_sets = stage_pool(recipe, workdir, log)
    if check_sets is not None:
        check_sets(eval_sets)
    manifest = stage_curate(recipe, workdir, inputs, log)
    model, tok = load_base_model(recipe, workdir, log)
    if tokenize:
        stage_tokenize(recipe, workdir, tok, log)
    return Prepared(inputs, eval_sets, manifest, model, tok)


def sweep_mixture(recipe: Recipe, workdir: Path, log: Log = print) -> Path:
    """`hone mix sweep`: the data stages, then every proxy run of the recipe's ``[mix]``."""
    data = prepare(recipe, Path(workdir), log, check_sets=lambda sets: mix_sweep.check_sets(recipe, sets))
    return mix_sweep.run_sweep(recipe, Path(workdir), data.model, data.tokenizer, data.eval_sets, log=log)


def branch_experts(recipe: Recipe, workdir: Path, *, recipe_path: Path | None = None, only: list[str] | None = None,
                   log: Log = print, **options) -> dict:
    """`hone branch`: the data stages (not tokenized: each expert tokenizes its own data),
    then Branch-Train-Merge (:func:`hone.experts.branch.run_branch`, which takes ``options``)."""
    check_branch(recipe, only, recipe_path)
    data = prepare(recipe, Path(workdir), log, tokenize=False)
    out = run_branch(recipe, Path(workdir), data.model, data.tokenizer, data.eval_sets, recipe_path=recipe_path,
                     only=only, log=log, **options)
    if out:
        log(f"report: {write_report(Path(workdir))} (section 'Domain experts')")
    return out


def run_recipe(recipe: Recipe, workdir: Path | None = None, *, fresh: bool = False,
               max_steps: int | None = None, log: Log = print, nproc: int = 1,
               restart_training: bool = False, supervise: bool = False) -> dict:
    """Run every stage of ``recipe``; return the comparison written to eval.json.

    ``fresh`` starts the whole run over; ``restart_training`` keeps the data stages and
    starts training over; ``nproc`` > 1 trains in that many torchrun workers; ``supervise``
    runs them under the self-healing supervisor (hone.heal.supervisor).
    """
    workdir = Path(workdir or recipe.run.workdir)
    torch.set_num_threads(recipe.train.threads or os.cpu_count() or 1)
    t_start = time.perf_counter()
    data = prepare(recipe, workdir, log, fresh=fresh, restart_training=restart_training)
    model, tok, eval_sets = data.model, data.tokenizer, data.eval_sets
    before = stage_eval(recipe, model, tok, eval_sets, workdir / EVAL_BEFORE_FILE, "before", log)
    summary = stage_train(recipe, workdir, model, max_steps, log, nproc=nproc, supervise=supervise)
    if summary["steps"] < summary["total_steps"]:
        log(f"stopped at step {summary['steps']} of {summary['total_steps']} (--max-steps); run again to resume")
        return {}
    after = stage_eval(recipe, model, tok, eval_sets, workdir / EVAL_AFTER_FILE, "after", log)
    table = compare(before, after)
    write_json(workdir / EVAL_FILE, table)
    save_hf(model, tok, workdir / FINAL_DIR)
    log(f"saved the trained model (HF format) to {workdir / FINAL_DIR}")
    report = write_report(workdir)
    log_table(table, log)
    log(f"done in {time.perf_counter() - t_start:.0f}s; report: {report}")
    return table


def log_table(table: dict[str, dict], log: Log) -> None:
    log(f"{'set':<10} {'ppl before':>11} {'ppl after':>10} {'change':>8} {'bpb before':>11} {'bpb after':>10}")
    for name, r in table.items():
        log(f"{name:<10} {r['ppl_before']:>11.3f} {r['ppl_after']:>10.3f} {r['ppl_change']:>+8.1%} "
            f"{r['bpb_before']:>11.4f} {r['bpb_after']:>10.4f}")


# The demo's promise (issue 2): a real specialization without forgetting.
DEMO_TARGETS = {"domain": ("fall", 0.15), "general": ("rise", 0.05), "unseen": ("rise", 0.05)}


def check_demo_targets(table: dict[str, dict], log: Log) -> bool:
    ok = True
    for name, (kind, limit) in DEMO_TARGETS.items():
        change = table[name]["ppl_change"]
        passed = change <= -limit if kind == "fall" else change <= limit
        ok &= passed
        want = f"falls by >= {limit:.0%}" if kind == "fall" else f"rises by <= {limit:.0%}"
        log(f"target: {name} perplexity {want}: {change:+.1%} {'OK' if passed else 'MISSED'}")
    return ok
