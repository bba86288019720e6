"""The whole job for one recipe: pool → curate → tokenize → base model → eval → train →
eval → save → report. Each stage writes its artifact into the run directory and is
skipped when that artifact is already there, so an interrupted run picks up where it
stopped (training resumes from its newest checkpoint).
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer

from hone.corpus.datasource import prepare_source, source_inputs
from hone.corpus.pipeline import curate
from hone.corpus.read import Quarantine, StepStats, read_inputs
from hone.corpus.runner import quarantine_file
from hone.corpus.sources import build_demo_pool
from hone.corpus.tasks import PACKAGED_TASKS, build_packaged_tasks
from hone.errors import HoneError
from hone.evaluate import compare, evaluate_sets, read_texts
from hone.evaluate_tasks import compare_tasks, resolve_tasks, run_tasks
from hone.experts.branch import check_branch, run_branch
from hone.heal.supervisor import supervise as supervise_run
from hone.mix import budget, sweep as mix_sweep
from hone.model.generate import complete
from hone.model.gguf import smollm2_gguf_path
from hone.model.hf import save_hf
from hone.model.hf_backend import choose_backend
from hone.model.load import base_conventions, base_tokenizer, base_tokenizer_files, load_base_model
from hone.model.lora import merge_lora, save_adapter
from hone.model.tokenizer_files import with_pad_token
from hone.recipe import Recipe, device_settings, domain_ratio, training_streams
from hone.report import write_report
from hone.report.tasks import change_stderr
from hone.rundir import (
    BASE_DIR,
    CHECKPOINTS_DIR,
    CORPUS_DIR,
    EVAL_AFTER_FILE,
    EVAL_BEFORE_FILE,
    EVAL_FILE,
    EVAL_TASKS_FILE,
    FINAL_ADAPTER_DIR,
    FINAL_DIR,
    HELDOUT_DIR,
    POOL_DIR,
    REPORT_FILE,
    SAMPLES_TEXT_FILE,
    SOURCES_DIR,
    TASKS_AFTER_FILE,
    TASKS_BEFORE_FILE,
    TASKS_DIR,
    TOKENS_DIR,
    is_done,
    mark_done,
    read_json,
    source_train_dir,
    stream_tokens_dir,
    write_json,
)
from hone.tokens import token_ledger, tokenize_corpus
from hone.tokens.conventions import TokenConventions
from hone.train.checkpoint import STATE_FILE, latest_checkpoint
from hone.train.run import mixture_phases, plan_from_recipe, read_back, total_steps, train_recipe, trained_model
from hone.train.tracking import check_backends, finish_tracking, tracking_for
from hone.train.workdir import prepare_workdir

Log = Callable[[str], None]


@dataclass
class EvalSets:
    """The run's evaluation sets: name -> JSON-lines file, and where each came from."""

    paths: dict[str, Path]
    origin: dict[str, str]


PACKAGED_SETS = {"domain": ("heldout_domain", "held-out Gene Ontology definitions (packaged)"),
                 "general": ("heldout_general", "held-out Wikipedia summaries (packaged)"),
                 "unseen": ("heldout_unseen", "held-out Jane Austen chapters (packaged; no training source is like "
                                              "them)")}


def stage_pool(recipe: Recipe, workdir: Path, log: Log) -> tuple[list[Path], EvalSets]:
    """Input files of the pool (packaged corpora and data.inputs) and the evaluation sets that
    do not come from data sources: the packaged held-out sets and eval.sets."""
    inputs = [Path(p) for p in recipe.data.inputs]
    for p in inputs:
        if not p.exists():
            raise HoneError(f"data.inputs: {p}: file not found")
        check_readable(p, recipe.data.text_field)
    sets = EvalSets({}, {})
    if (packaged := recipe.data.packaged) is not None:
        marker = workdir / POOL_DIR
        if not is_done(marker):
            log("pool: building the mixed pool from packaged corpora")
            summary = build_demo_pool(packaged, workdir, recipe.run.seed)
            mark_done(marker, summary)
        inputs = [workdir / POOL_DIR / "pool.jsonl"] + inputs
        for name, (field, origin) in PACKAGED_SETS.items():
            if getattr(packaged, field):
                sets.paths[name], sets.origin[name] = workdir / HELDOUT_DIR / f"{name}.jsonl", origin
    sources = {s.name for s in recipe.data.sources}
    for name, p in recipe.eval.sets.items():
        if not Path(p).exists():
            raise HoneError(f"eval.sets.{name}: {p}: file not found")
        if name in sets.paths or name in sources:
            taker = "a data source" if name in sources else "a packaged set"
            raise HoneError(f"eval.sets.{name}: the name is taken by {taker}; pick another")
        sets.paths[name], sets.origin[name] = Path(p), f"eval.sets ({p})"
    return inputs, sets


def check_readable(path: Path, text_field: str) -> None:
    """Fail on a pool input with no readable document: the curation would quarantine it whole
    and build the pool without it."""
    stats = StepStats()
    if next(read_inputs([path], text_field, Quarantine(), stats), None) is None:
        why = ", ".join(f"{r} {d['docs']}" for r, d in stats.quarantined.items()) or "no input file in it"
        raise HoneError(f"data.inputs: {path}: no readable document ({why}; each line needs a '{text_field}' field)")


def log_quarantined(name: str, counts: dict[str, int], corpus_dir: Path, log: Log) -> None:
    """Unreadable input lines, counted and pointed at, so that none is lost without a word."""
    if (n := sum(counts.values())):
        why = ", ".join(f"{r} {k:,}" for r, k in counts.items())
        log(f"{name}: {n:,} unreadable input lines quarantined ({why}) -> {quarantine_file(corpus_dir)}")


def stage_curate(recipe: Recipe, workdir: Path, inputs: list[Path], log: Log) -> dict:
    """Curate the pool (when there is one) into corpus/; the retrieval's quality is printed
    only when the pool carries labels to measure it against."""
    if not recipe.data.uses_pool:
        return {}
    t0 = time.perf_counter()
    manifest = curate(recipe.curate, inputs, workdir, text_field=recipe.data.text_field, log=log)
    counts = manifest.get("domains", {})
    log(f"curate: {counts} in {time.perf_counter() - t0:.1f}s")
    log_quarantined("curate", manifest.get("quarantined", {}), workdir / CORPUS_DIR, log)
    if (r := manifest.get("retrieval")):
        log(f"curate: retrieval of '{recipe.curate.domain.name}' precision {r['precision']:.3f} "
            f"recall {r['recall']:.3f} (against the pool's hidden labels, {r['labelled_docs']:,} labelled documents)")
    return manifest


def stage_sources(recipe: Recipe, workdir: Path, sets: EvalSets, log: Log) -> dict[str, dict]:
    """Each data source curated and split; its held-out part joins the evaluation sets."""
    out = {}
    for i, source in enumerate(recipe.data.sources):
        summary = prepare_source(source, recipe, workdir, i, log)
        out[source.name] = summary
        log_quarantined(f"source {source.name}", summary.get("quarantined", {}),
                        workdir / SOURCES_DIR / source.name / CORPUS_DIR, log)
        if summary["heldout_file"]:
            sets.paths[source.name] = Path(summary["heldout_file"])
            sets.origin[source.name] = (f"held out of source '{source.name}' ({summary['docs_heldout']:,} of "
                                        f"{summary['docs_kept']:,} documents)")
    if not sets.paths:
        raise HoneError("no evaluation sets: give a data source a heldout share, use data.packaged, or give eval.sets")
    return out


def stage_tokenize(recipe: Recipe, workdir: Path, tok: Tokenizer, conventions: TokenConventions, log: Log) -> dict:
    """Every training stream tokenized: the pool's corpus (one stream per domain label) and each source."""
    t0 = time.perf_counter()
    summary = {}
    if recipe.data.uses_pool:
        summary.update(tokenize_corpus(workdir / CORPUS_DIR, tok, workdir / TOKENS_DIR, seed=recipe.run.seed,
                                       conventions=conventions))
    for s in recipe.data.sources:
        summary.update(tokenize_corpus(source_train_dir(workdir, s.name), tok,
                                       workdir / TOKENS_DIR / SOURCES_DIR / s.name, seed=recipe.run.seed,
                                       conventions=conventions))
    log("tokenize: " + ", ".join(f"{d} {s['tokens']:,} tokens" for d, s in summary.items())
        + f" in {time.perf_counter() - t0:.1f}s")
    log_unused_sources(recipe, log)
    return summary


def log_unused_sources(recipe: Recipe, log: Log) -> None:
    """A data source whose role the domain ratio gives no share trains on nothing: say so."""
    ratios = [r for _, r in mixture_phases(recipe)]
    for s in recipe.data.sources:
        if (s.role == "domain" and max(ratios) == 0) or (s.role == "general" and min(ratios) == 1):
            log(f"source {s.name}: no training tokens: domain ratio {ratios[0]:g} gives the {s.role} role no share")


def stage_eval(recipe: Recipe, model, tok: Tokenizer, conventions: TokenConventions, sets: EvalSets, out: Path,
               label: str, log: Log) -> dict:
    if out.exists():
        return read_json(out)
    log(f"eval ({label}):")
    t0 = time.perf_counter()
    texts = {name: read_texts(p) for name, p in sets.paths.items()}
    results = evaluate_sets(model, tok, texts, max_tokens=recipe.eval.max_tokens_per_set,
                            seq_len=recipe.eval.seq_len, batch_size=recipe.eval.batch_size, log=log,
                            conventions=conventions, seed=recipe.run.seed, sources=sets.origin)
    log(f"eval ({label}) done in {time.perf_counter() - t0:.1f}s")
    write_json(out, results)
    return results


def build_tasks(recipe: Recipe, workdir: Path, log: Log) -> None:
    """The packaged tasks eval.tasks names, built once into WORKDIR/tasks/ from the held-out sets."""
    wanted = {s.name for s in PACKAGED_TASKS} & set(recipe.eval.tasks)
    marker = workdir / TASKS_DIR
    if not wanted or is_done(marker):
        return
    if recipe.data.packaged is None:
        raise HoneError(f"eval.tasks: {', '.join(sorted(wanted))}: built from data.packaged's held-out sets, and this "
                        f"recipe has no [data.packaged]")
    built = build_packaged_tasks(workdir / HELDOUT_DIR, workdir / TASKS_DIR, recipe.eval.task_items, recipe.run.seed)
    if missing := wanted - set(built):
        raise HoneError(f"eval.tasks: {', '.join(sorted(missing))}: its held-out set is empty (data.packaged."
                        f"heldout_domain / heldout_general is 0)")
    mark_done(marker, built)
    log(f"tasks: built {', '.join(f'{k} ({v} items)' for k, v in built.items())} into {workdir / TASKS_DIR}")


def stage_tasks(recipe: Recipe, workdir: Path, model, tok: Tokenizer, conventions: TokenConventions, out: Path,
                label: str, log: Log) -> dict:
    """eval.tasks through lm-evaluation-harness (multiple-choice accuracy), kept in ``out``."""
    if not recipe.eval.tasks:
        return {}
    if out.exists():
        return read_json(out)
    build_tasks(recipe, workdir, log)
    log(f"tasks ({label}):")
    results = run_tasks(model, tok, conventions, recipe.eval.tasks,
                        include=[workdir / TASKS_DIR, *map(Path, recipe.eval.task_dirs)], limit=recipe.eval.task_limit,
                        max_len=recipe.eval.seq_len, batch_size=2 * recipe.eval.batch_size, log=log)
    write_json(out, results)
    return results


def log_task_table(table: dict[str, dict], log: Log) -> None:
    for name, r in table.items():
        norm = (f"; acc_norm {r['acc_norm_before']:.3f} -> {r['acc_norm_after']:.3f}"
                if "acc_norm_before" in r else "")
        se = change_stderr(r)  # of the change, as the report shows it
        log(f"task {name}: acc {r['acc_before']:.3f} -> {r['acc_after']:.3f} ({r['acc_change']:+.3f}"
            f"{f' ± {se:.3f}' if se is not None else ''}, {r['n']} items){norm}")


def stage_train(recipe: Recipe, workdir: Path, model, max_steps: int | None, log: Log, nproc: int = 1,
                supervise: bool = False, on_step: Callable[[dict], None] | None = None) -> dict:
    """Train ``model`` in this process, or in ``nproc`` torchrun workers (under the self-healing
    supervisor with ``supervise``; ``model`` None: this process holds no weights meanwhile)."""
    if not supervise:
        return train_recipe(recipe, workdir, model, max_steps, log, nproc=nproc, on_step=on_step)
    plan_from_recipe(recipe.train, nproc)  # a bad tp fails here, before workers start
    supervise_run(recipe, workdir, nproc, max_steps, log)
    return read_back(recipe, workdir, model, log)


@dataclass
class Prepared:
    """What the data stages leave for training: pool inputs, evaluation sets, the curation
    manifest, each source's summary, the base model, its tokenizer and the document
    conventions the corpus was tokenized with, and the tokenizer files every export carries."""

    inputs: list[Path]
    sets: EvalSets
    manifest: dict
    sources: dict[str, dict]
    model: torch.nn.Module | None  # None when prepared without it (torchrun workers load their own)
    tokenizer: Tokenizer
    conventions: TokenConventions
    tokenizer_files: dict[str, bytes]

    @property
    def eval_sets(self) -> dict[str, Path]:
        return self.sets.paths


def prepare(recipe: Recipe, workdir: Path, log: Log, *, fresh: bool = False, fresh_training: bool = False,
            tokenize: bool = True, check_sets: Callable[[dict[str, Path]], None] | None = None,
            load_model: bool = True) -> Prepared:
    """The run directory and every data stage (each skipped when its artifact is there):
    pool, curate, sources, base model, tokenize. ``fresh`` starts the run directory over,
    ``fresh_training`` removes what training wrote (see :func:`prepare_workdir`); ``check_sets``
    sees the evaluation sets before the base model loads; ``load_model`` False: only its tokenizer."""
    prepare_workdir(recipe, workdir, fresh, log, fresh_training=fresh_training)
    inputs, sets = stage_pool(recipe, workdir, log)
    manifest = stage_curate(recipe, workdir, inputs, log)
    sources = stage_sources(recipe, workdir, sets, log)
    if check_sets is not None:
        check_sets(sets.paths)
    model, tok = load_base_model(recipe, workdir, log) if load_model else (None, base_tokenizer(recipe, workdir))
    files = base_tokenizer_files(recipe, tok)
    conventions = base_conventions(recipe, tok, files)
    files = with_pad_token(files, conventions)
    log(f"documents: {'BOS ' + repr(conventions.bos_token) + ' + ' if conventions.add_bos else ''}text + "
        f"{conventions.eos_token!r}")
    if tokenize:
        stage_tokenize(recipe, workdir, tok, conventions, log)
    return Prepared(inputs, sets, manifest, sources, model, tok, conventions, files)


def needs_base_dir(recipe: Recipe, workdir: Path) -> bool:
    return recipe.model.source in ("smollm2", "gguf") and not (workdir / BASE_DIR).exists()


def save_base(recipe: Recipe, workdir: Path, data: Prepared, log: Log) -> None:
    """A base that came from a GGUF file also goes to base/ in HF format (dequantized), so that
    `hone eval --base` and any HF tool can read the model the run started from."""
    if not needs_base_dir(recipe, workdir):
        return
    save_hf(data.model, data.tokenizer, workdir / BASE_DIR, tokenizer_files=data.tokenizer_files)
    log(f"saved the base model (dequantized from GGUF, HF format) to {workdir / BASE_DIR}")


def sweep_mixture(recipe: Recipe, workdir: Path, log: Log = print, *, dry_run: bool = False) -> Path:
    """`hone mix sweep`: the data stages, then every proxy run of the recipe's ``[mix]`` (``dry_run``:
    the estimate only)."""
    data = prepare(recipe, Path(workdir), log, check_sets=lambda sets: mix_sweep.check_sets(recipe, sets))
    return mix_sweep.run_sweep(recipe, Path(workdir), data.model, data.tokenizer, data.eval_sets, log=log,
                               dry_run=dry_run)


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
               fresh_training: bool = False, supervise: bool = False) -> dict:
    """Run every stage of ``recipe``; return the comparison written to eval.json.

    Training resumes from the newest checkpoint, and a finished run is left as it is;
    ``fresh`` starts the whole run over; ``fresh_training`` keeps the data stages and
    starts training over; ``nproc`` > 1 trains in that many torchrun workers; ``supervise``
    runs them under the self-healing supervisor (hone.heal.supervisor).
    """
    workdir = Path(workdir or recipe.run.workdir)
    torch.set_num_threads(recipe.train.threads or os.cpu_count() or 1)
    t_start = time.perf_counter()
    check_backends(tracking_for(recipe))  # a [log] backend that is not installed stops the run before any work
    prepare_workdir(recipe, workdir, fresh, log, fresh_training=fresh_training)
    if all((workdir / name).exists() for name in (FINAL_DIR, EVAL_FILE, REPORT_FILE)):
        log(f"training is already finished in {workdir}: nothing to do (--fresh to train again)")
        return read_json(workdir / EVAL_FILE)
    workers = nproc > 1 or supervise
    if recipe.budget is not None and workers:
        raise HoneError("budget: the decision stage trains in this process (no --nproc / --supervise yet); "
                        "price the layout with `hone plan --recipe` and give it in [train]")
    # With workers, this process loads the base weights only for what is still to do before
    # training (the "before" evaluation, base/), and lets go of them before the workers start.
    data = prepare(recipe, workdir, log, load_model=not workers or needs_base_weights(recipe, workdir))
    model, tok, conv = data.model, data.tokenizer, data.conventions
    save_base(recipe, workdir, data, log)
    before = stage_eval(recipe, model, tok, conv, data.sets, workdir / EVAL_BEFORE_FILE, "before", log)
    tasks_before = stage_tasks(recipe, workdir, model, tok, conv, workdir / TASKS_BEFORE_FILE, "before", log)
    prompts = completion_prompts(recipe, data.sets)
    stage_completions(model, tok, conv, prompts, recipe.eval.completion_tokens, workdir, "before", log)
    decision = None
    if recipe.budget is not None:  # the decision stage: layout, tokens and ratio from the budget
        decision = budget.decide_run(recipe, workdir, model, tok, data.eval_sets, log)
        if decision["layout"]["gpus"] > nproc:
            raise HoneError(f"cluster.spec: the decision ({budget.decision_path(workdir)}) lays training out on "
                            f"{decision['layout']['gpus']} GPUs; `hone run` trains here in one process: launch its "
                            "[train] layout with torchrun on the cluster, or decide for cluster.spec = \"local\"")
        recipe = budget.decided_recipe(recipe, decision)
        budget.reset_peak_rss()
    log_training_start(recipe, workdir, log)
    if workers:
        model = data.model = None
        gc.collect()
    on_step = budget.Redecide(recipe, workdir, decision, log) if decision is not None else None
    summary = stage_train(recipe, workdir, model, max_steps, log, nproc=nproc, supervise=supervise, on_step=on_step)
    # On the CPU the prediction is per process: the peak RSS of training (reset before it).
    peak_gib = budget.peak_rss_gib() if decision is not None and not torch.cuda.is_available() else None
    if summary["steps"] < summary["total_steps"]:
        log(f"stopped at step {summary['steps']} of {summary['total_steps']} (--max-steps); run again to resume")
        return {}
    if model is None:
        model = trained_model(recipe, workdir, tok, log)
    write_ledger(recipe, workdir, log)
    after = stage_eval(recipe, model, tok, conv, data.sets, workdir / EVAL_AFTER_FILE, "after", log)
    tasks_after = stage_tasks(recipe, workdir, model, tok, conv, workdir / TASKS_AFTER_FILE, "after", log)
    stage_completions(model, tok, conv, prompts, recipe.eval.completion_tokens, workdir, "after", log)
    table = compare(before, after)
    write_json(workdir / EVAL_FILE, table)
    if recipe.train.lora is not None:
        model = export_adapter(recipe, model, workdir, log)  # the adapter, then the merged model for final/
    if recipe.eval.tasks:
        write_json(workdir / EVAL_TASKS_FILE, compare_tasks(tasks_before, tasks_after))
    save_hf(model, tok, workdir / FINAL_DIR, tokenizer_files=data.tokenizer_files)
    log(f"saved the trained model (HF format, with the base's tokenizer files) to {workdir / FINAL_DIR}")
    if decision is not None:
        budget.finish_decision(recipe, workdir, log, peak_gib)
    report = write_report(workdir)
    finish_tracking(tracking_for(recipe), workdir, table, [report], log)
    log_table(table, log)
    if recipe.eval.tasks:
        log_task_table(read_json(workdir / EVAL_TASKS_FILE), log)
    log(f"done in {time.perf_counter() - t_start:.0f}s; report: {report}")
    return table


def export_adapter(recipe: Recipe, model, workdir: Path, log: Log):
    """Under train.lora: final-adapter/ in PEFT's format, then the adapters folded into the weights
    (the model final/ holds, which transformers loads with no adapter code)."""
    base = str(workdir / BASE_DIR) if (workdir / BASE_DIR).exists() else recipe.model.path
    save_adapter(model, recipe.train.lora, workdir / FINAL_ADAPTER_DIR, base_path=base)
    log(f"saved the LoRA adapter (PEFT format) to {workdir / FINAL_ADAPTER_DIR}; final/ is the merged model")
    return merge_lora(model)


def needs_base_weights(recipe: Recipe, workdir: Path) -> bool:
    """Whether the base model's weights are still needed before training: for the "before"
    evaluation or completions, or to write base/."""
    samples = workdir / SAMPLES_TEXT_FILE
    done_before = samples.exists() and "before" in read_json(samples)
    tasks_to_do = bool(recipe.eval.tasks) and not (workdir / TASKS_BEFORE_FILE).exists()
    return (not (workdir / EVAL_BEFORE_FILE).exists() or not done_before or needs_base_dir(recipe, workdir)
            or tasks_to_do)


def log_training_start(recipe: Recipe, workdir: Path, log: Log) -> None:
    """One line: whether training resumes (from which step) or starts."""
    newest = latest_checkpoint(workdir / CHECKPOINTS_DIR, log=lambda m: None)
    if newest is None:
        log("starting training")
    else:
        log(f"resuming from step {read_json(newest / STATE_FILE)['step']} of {total_steps(recipe.train)}")


def completion_prompts(recipe: Recipe, sets: EvalSets, n: int = 3, words: int = 12) -> list[str]:
    """eval.prompts, or the openings of the first held-out documents of the first domain set."""
    if recipe.eval.prompts is not None:
        return list(recipe.eval.prompts)
    domain_names = [s.name for s in recipe.data.sources if s.role == "domain"]
    name = next((x for x in ["domain", *domain_names] if x in sets.paths), next(iter(sets.paths), None))
    if name is None:
        return []
    texts = read_texts(sets.paths[name])[:n]
    return [" ".join(t.split()[:words]) for t in texts if t.split()]


def stage_completions(model, tok: Tokenizer, conv: TokenConventions, prompts: list[str], new_tokens: int,
                      workdir: Path, label: str, log: Log) -> None:
    """Greedy completions of the fixed prompts, kept in completions.json for the report."""
    path = workdir / SAMPLES_TEXT_FILE
    done = read_json(path) if path.exists() else {}
    if not prompts or done.get("prompts") == prompts and label in done:
        return
    if done.get("prompts") != prompts:
        done = {"prompts": prompts}
    done[label] = complete(model, tok, conv, prompts, max_new_tokens=new_tokens)
    write_json(path, done)
    log(f"completions ({label}): {done[label][0][:80]!r}" + (" ..." if len(prompts) > 1 else ""))


def write_ledger(recipe: Recipe, workdir: Path, log: Log) -> dict:
    """tokens/ledger.json: per stream, the tokens in = trained (distinct) + cut at sequence ends +
    left unused, and how many were trained in all (repeats counted), from the final loader state."""
    newest = latest_checkpoint(workdir / CHECKPOINTS_DIR, log=lambda m: None)
    if newest is None:
        return {}
    state = read_json(newest / STATE_FILE)
    streams = state["loader"]["streams"]
    ledger = {}
    for s in training_streams(recipe):
        index_path = stream_tokens_dir(workdir, s.name, s.from_pool) / "index.json"
        if not index_path.exists():
            continue
        tokens_in = int(read_json(index_path)["tokens"])
        pos = streams.get(s.name, {"pos": 0, "epoch": 0})
        ledger[s.name] = {"role": s.role, "weight": s.weight,
                          **token_ledger(tokens_in, recipe.train.seq_len, int(pos["pos"]), int(pos["epoch"]))}
    write_json(workdir / TOKENS_DIR / "ledger.json", ledger)
    for name, row in ledger.items():
        log(f"tokens {name}: {row['tokens_in']:,} in = {row['distinct']:,} seen + {row['cut']:,} cut at sequence ends "
            f"+ {row['unused']:,} unused; {row['trained']:,} trained, repeats counted ({row['passes']:.2f} passes)")
    return ledger


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


def check_recipe(recipe: Recipe, workdir: Path) -> list[str]:
    """`hone recipe check`: every path the recipe names exists and the model directory has what
    it needs (a one-line HoneError otherwise); returns lines saying what the run will do."""
    lines = []
    for p in recipe.data.inputs:
        if not Path(p).exists():
            raise HoneError(f"data.inputs: {p}: file not found")
    for name, p in recipe.eval.sets.items():
        if not Path(p).exists():
            raise HoneError(f"eval.sets.{name}: {p}: file not found")
    if recipe.train.mixture and not Path(recipe.train.mixture).is_file():
        raise HoneError(f"train.mixture: {recipe.train.mixture}: file not found")
    lines.append(f"model: {describe_model(recipe)}")
    ratio = domain_ratio(recipe)
    if recipe.data.uses_pool:
        d = recipe.curate.domain
        pool = "packaged corpora" + (f" + {len(recipe.data.inputs)} input path(s)" if recipe.data.inputs else "") \
            if recipe.data.packaged else f"{len(recipe.data.inputs)} input path(s)"
        lines.append(f"pool: {pool}; curate finds '{d.name}' (top {d.top_k:,} by BM25), the rest is replay 'general'")
    for i, s in enumerate(recipe.data.sources):
        files = source_inputs(s, i)
        held = f", {s.heldout} held out" if s.heldout else ", nothing held out"
        lines.append(f"source {s.name}: {s.role}, weight {s.weight:g}, {len(files)} input path(s){held}")
    streams = training_streams(recipe)
    for role, share in (("domain", ratio), ("general", 1 - ratio)):
        names = [s.name for s in streams if s.role == role]
        if names:
            lines.append(f"mixture: {share:.0%} {role} ({', '.join(names)})"
                         + (" from train.mixture's schedule" if recipe.train.mixture and role == "domain" else ""))
    t = recipe.train
    lines.append(f"training: {t.max_tokens:,} tokens = {total_steps(t):,} steps of {t.batch_size} x {t.seq_len} "
                 f"tokens")
    lines.append(f"learning rate: {t.schedule} schedule" + (f" (decay over the last {t.decay_fraction:.0%})"
                                                            if t.schedule == "wsd" else "")
                 + f"; tracking: {', '.join(check_backends(tracking_for(recipe))) or 'metrics.jsonl only'}")
    device = t.device if t.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    lines.append(f"training on {device}: {device_settings(t, device)[1]}; document masks "
                 + ("on (attention within each packed document)" if t.doc_mask else "off (train.doc_mask = false)"))
    sets = [n for n, (field, _) in PACKAGED_SETS.items() if recipe.data.packaged and getattr(recipe.data.packaged,
                                                                                            field)]
    sets += [s.name for s in recipe.data.sources if s.heldout] + list(recipe.eval.sets)
    if not sets:
        raise HoneError("no evaluation sets: give a data source a heldout share, use data.packaged, or give eval.sets")
    cap = recipe.eval.max_tokens_per_set
    lines.append(f"evaluation sets: {', '.join(sets)} ({'whole' if cap is None else f'at most {cap:,} tokens each'})")
    if recipe.eval.tasks:
        resolve_tasks(recipe.eval.tasks)  # a task file that is missing or not an lm-eval task: one line here
        lines.append(f"tasks (lm-evaluation-harness, before and after): {', '.join(recipe.eval.tasks)}")
    lines.append(f"run directory {workdir}: {describe_progress(workdir)}")
    return lines


def describe_model(recipe: Recipe) -> str:
    """The base model and the backend it trains with; a one-line HoneError if its files are missing."""
    m = recipe.model
    if m.source == "smollm2":
        smollm2_gguf_path()
        return "SmolLM2-135M-Instruct (packaged GGUF, Q4_1 weights dequantized to fp32); backend hone"
    if m.source == "random":
        r = m.random
        return f"random Llama ({r.layers} layers, hidden {r.hidden}, BPE vocab {r.vocab} trained on the corpus)"
    path = Path(m.path)
    if m.source == "gguf":
        if not path.is_file():
            raise HoneError(f"model.path: {path}: GGUF file not found")
        return f"GGUF {path} (dequantized); backend hone"
    if not (path / "config.json").is_file():
        raise HoneError(f"model.path: {path}: no config.json (not a Hugging Face model directory?)")
    if not (path / "tokenizer.json").is_file():
        raise HoneError(f"model.path: {path}: no tokenizer.json beside the weights")
    if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
        raise HoneError(f"model.path: {path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                        f"weights are read)")
    config = read_json(path / "config.json")
    backend, why = choose_backend(config, m.backend)
    return f"{config.get('model_type', '?')} from {path}; backend {backend} ({why})"


def describe_progress(workdir: Path) -> str:
    """What is already done in the run directory."""
    if not Path(workdir).exists():
        return "new"
    done = [name for name, path in (("pool", workdir / POOL_DIR), ("corpus", workdir / CORPUS_DIR),
                                    ("tokens", workdir / TOKENS_DIR / "train")) if is_done(path)]
    done += [name for name, path in (("base eval", workdir / EVAL_BEFORE_FILE), ("final model", workdir / FINAL_DIR),
                                     ("eval", workdir / EVAL_FILE)) if path.exists()]
    newest = latest_checkpoint(workdir / CHECKPOINTS_DIR, log=lambda m: None)
    if newest is not None:
        done.append(f"checkpoint at step {read_json(newest / STATE_FILE)['step']}")
    return "done: " + ", ".join(done) if done else "exists, nothing done yet"
