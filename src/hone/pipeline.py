"""The whole job for one recipe: pool → curate → tokenize → base model → eval → train →
eval → save → report. Each stage writes its artifact into the run directory and is
skipped when that artifact is already there, so an interrupted run picks up where it
stopped (training resumes from its newest checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer

from hone.errors import HoneError
from hone.recipe import Recipe
from hone.rundir import ensure_dir, is_done, mark_done, read_json, write_json, write_text
from hone.tokens import load_tokens, read_corpus, tokenize_corpus, train_bpe

Log = Callable[[str], None]


# Train fields that change how the work is laid out, not what is computed: changing them
# resumes (on another world size, with or without compile, ...) instead of starting over.
LAYOUT_FIELDS = {"data_parallel", "tp", "activation_checkpointing", "compile", "device", "threads",
                 "log_every", "checkpoint_every", "micro_batch", "worker_mtbf_hours"}


def recipe_hash(recipe: Recipe) -> str:
    """Hash of everything but the train section (and [mix] / [experts], read only by `hone mix` /
    `hone branch`, so adding an expert keeps the run): a change redoes the data stages."""
    data = json.loads(recipe.model_dump_json(exclude={"train", "mix", "experts", "heal"}))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def train_hash(recipe: Recipe) -> str:
    """Hash of the train fields that change the result: a change starts training over."""
    data = json.loads(recipe.train.model_dump_json(exclude=LAYOUT_FIELDS))
    # Mixture fields at their defaults keep the hash runs had before they existed; a
    # mixture file counts by the schedule it holds, not by its path.
    for key, default in (("mixture", None), ("upsample_fraction", 0.0), ("upsample_ratio", None),
                         ("nan_skip_batches", 1)):
        if data.get(key) == default:
            data.pop(key, None)
    if recipe.train.mixture:
        from hone.mix.schedule import load_mixture

        data["mixture"] = load_mixture(Path(recipe.train.mixture))["schedule"]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def prepare_workdir(recipe: Recipe, workdir: Path, fresh: bool, log: Log) -> None:
    """Create the run directory; start over when asked or when the recipe changed."""
    stamp = workdir / "recipe.json"
    train_changed = False
    if workdir.exists() and stamp.exists() and not fresh:
        old = read_json(stamp)
        if old.get("hash") != recipe_hash(recipe):
            log(f"recipe changed since the last run in {workdir}: starting over")
            fresh = True
        elif old.get("train_hash") != train_hash(recipe):
            log(f"recipe's [train] changed since the last run in {workdir}: training starts over")
            train_changed = True
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    ensure_dir(workdir)
    if train_changed:
        forget_training(workdir, log)
    write_json(stamp, {"hash": recipe_hash(recipe), "train_hash": train_hash(recipe),
                       "recipe": json.loads(recipe.model_dump_json())})


def stage_pool(recipe: Recipe, workdir: Path, log: Log) -> tuple[list[Path], dict[str, Path]]:
    """Input files of the pool and the held-out evaluation sets."""
    inputs = [Path(p) for p in recipe.data.inputs]
    for p in inputs:
        if not p.exists():
            raise HoneError(f"data.inputs: {p}: file not found")
    eval_sets: dict[str, Path] = {}
    if recipe.data.packaged is not None:
        from hone.corpus.sources import build_demo_pool

        marker = workdir / "pool"
        if not is_done(marker):
            log("pool: building the mixed pool from packaged corpora")
            summary = build_demo_pool(recipe.data.packaged, workdir, recipe.run.seed)
            mark_done(marker, summary)
        inputs = [workdir / "pool" / "pool.jsonl"] + inputs
        eval_sets = {name: workdir / "heldout" / f"{name}.jsonl" for name in ("domain", "general", "unseen")}
    for name, p in recipe.eval.sets.items():
        if not Path(p).exists():
            raise HoneError(f"eval.sets.{name}: {p}: file not found")
        eval_sets[name] = Path(p)
    if not eval_sets:
        raise HoneError("no evaluation sets: use data.packaged or give eval.sets")
    return inputs, eval_sets


def stage_curate(recipe: Recipe, workdir: Path, inputs: list[Path], log: Log) -> dict:
    from hone.corpus.pipeline import curate

    t0 = time.perf_counter()
    manifest = curate(recipe.curate, inputs, workdir, text_field=recipe.data.text_field)
    counts = manifest.get("domains", {})
    log(f"curate: {counts} in {time.perf_counter() - t0:.1f}s")
    if (r := manifest.get("retrieval")):
        log(f"curate: retrieval of '{recipe.curate.domain.name}' precision {r['precision']:.3f} "
            f"recall {r['recall']:.3f} (against hidden labels)")
    return manifest


def stage_base_model(recipe: Recipe, workdir: Path, log: Log) -> tuple[torch.nn.Module, Tokenizer]:
    from hone.train import checkpoint_io
    from hone.train.model import Llama, LlamaConfig

    src = recipe.model
    t0 = time.perf_counter()
    if src.source == "smollm2":
        model, tok = checkpoint_io.load_gguf(checkpoint_io.smollm2_gguf_path())
    elif src.source == "gguf":
        if not Path(src.path).exists():
            raise HoneError(f"model.path: {src.path}: GGUF file not found")
        model, tok = checkpoint_io.load_gguf(Path(src.path))
    elif src.source == "hf":
        model, tok = checkpoint_io.load_hf(Path(src.path))
        if tok is None:
            raise HoneError(f"model.path: {src.path}: no tokenizer.json beside the weights")
    else:
        tok = _random_tokenizer(recipe, workdir)
        r = src.random
        cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=r.hidden, intermediate_size=r.ffn,
                          num_hidden_layers=r.layers, num_attention_heads=r.heads, num_key_value_heads=r.kv_heads,
                          max_position_embeddings=max(recipe.train.seq_len, recipe.eval.seq_len) + 1,
                          tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
        model = Llama(cfg)
        model.init_weights(seed=recipe.run.seed)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    device = pick_device(recipe.train.device)
    model.to(device)
    log(f"model: {src.source} ({n:.1f}M params, vocab {tok.get_vocab_size()}) loaded in "
        f"{time.perf_counter() - t0:.1f}s, on {device}")
    return model, tok


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise HoneError("train.device is 'cuda' but torch sees no CUDA device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def _random_tokenizer(recipe: Recipe, workdir: Path) -> Tokenizer:
    """Train (once) a BPE on the curated corpus for the tiny random model."""
    path = workdir / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    texts = [t for group in read_corpus(workdir / "corpus").values() for t in group]
    tok = train_bpe(texts, recipe.model.random.vocab)
    write_text(path, tok.to_str())
    return tok


def stage_tokenize(recipe: Recipe, workdir: Path, tok: Tokenizer, log: Log) -> dict:
    t0 = time.perf_counter()
    summary = tokenize_corpus(workdir / "corpus", tok, workdir / "tokens", seed=recipe.run.seed)
    log("tokenize: " + ", ".join(f"{d} {s['tokens']:,} tokens" for d, s in summary.items())
        + f" in {time.perf_counter() - t0:.1f}s")
    return summary


def stage_eval(recipe: Recipe, model, tok: Tokenizer, eval_sets: dict[str, Path], out: Path, label: str, log: Log) -> dict:
    from hone.evaluate import evaluate_sets, read_texts

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


def mixture_phases(recipe: Recipe) -> list[tuple[int, float]]:
    """The run's domain-ratio phases: train.mixture's schedule (fitted ratio and upsampling)
    or train.domain_ratio, with train.upsample_* overriding the upsampling phase."""
    from hone.train.data import schedule_phases
    from hone.train.launch import total_steps

    t = recipe.train
    ratio, frac, up = t.domain_ratio, 0.0, None
    if t.mixture:
        from hone.mix.schedule import load_mixture

        s = load_mixture(Path(t.mixture))["schedule"]
        ratio = s["ratio"]
        if s.get("upsample"):
            frac, up = s["upsample"]["fraction"], s["upsample"]["ratio"]
    if t.upsample_fraction:
        frac, up = t.upsample_fraction, t.upsample_ratio if t.upsample_ratio is not None else min(1.0, 2 * ratio)
    return schedule_phases(ratio, total_steps(t), frac, up)


def build_loader(recipe: Recipe, workdir: Path):
    from hone.train.data import MixtureLoader, TokenStream

    domain, general = recipe.curate.domain.name, "general"
    phases = mixture_phases(recipe)
    ratio = phases[0][1]
    streams = {}
    for name, share in ((domain, max(r for _, r in phases)), (general, 1 - min(r for _, r in phases))):
        if share <= 0:
            continue
        path = workdir / "tokens" / "train" / name
        if not (path / "index.json").exists():
            raise HoneError(f"train.domain_ratio is {ratio} but the corpus has no '{name}' documents")
        streams[name] = TokenStream(load_tokens(path), recipe.train.seq_len)
    return MixtureLoader(streams, domain=domain, general=general, batch_size=recipe.train.batch_size, ratio=ratio,
                         schedule=phases if len(phases) > 1 else None)


def stage_train(recipe: Recipe, workdir: Path, model, max_steps: int | None, log: Log, nproc: int = 1,
                supervise: bool = False) -> dict:
    """Train in this process, or in ``nproc`` torchrun workers (under the self-healing
    supervisor with ``supervise``) and then read the newest checkpoint's weights back into
    ``model`` (for evaluation and the HF export)."""
    from hone.train.launch import plan_from_recipe, total_steps

    t = recipe.train
    total = total_steps(t)
    if nproc > 1 or supervise:
        from hone.train.checkpoint import latest_checkpoint, load_model_weights
        from hone.train.launch import launch_local

        plan_from_recipe(t, nproc)  # a bad tp fails here, before workers start
        if supervise:
            from hone.heal.supervisor import supervise as run_supervised

            run_supervised(recipe, workdir, nproc, max_steps, log)
        else:
            launch_local(workdir, nproc, max_steps, log)
        newest = latest_checkpoint(workdir / "checkpoints", log)
        if newest is None:
            raise HoneError(f"{workdir / 'checkpoints'}: the workers left no checkpoint")
        state = load_model_weights(newest, model)
        return {"steps": int(state["step"]), "total_steps": total}
    from hone.train.loop import train
    from hone.train.parallelize import DistContext, parallelize

    loader = build_loader(recipe, workdir)
    # One process: only activation checkpointing and compile apply; both keep the model's
    # parameter names, so evaluation and the HF export use the same object afterwards.
    parallelize(model, plan_from_recipe(t, 1), DistContext(device=next(model.parameters()).device))
    torch.manual_seed(recipe.run.seed)
    try:
        return train(model, loader, t, workdir, total_steps=total, resume=True, max_steps=max_steps, log=log)
    finally:
        model.model.activation_checkpointing = False


# What training writes; `hone train` without --resume removes these and keeps the data stages.
TRAINING_ARTIFACTS = ("checkpoints", "metrics.jsonl", "train_summary.json", "eval_after.json", "eval.json",
                      "final", "report.html", "tensorboard", "heal", "events.jsonl", "samples.jsonl")


def forget_training(workdir: Path, log: Log) -> None:
    removed = []
    for name in TRAINING_ARTIFACTS:
        path = workdir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        log(f"training from scratch (no --resume): removed {', '.join(removed)}")


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
    prepare_workdir(recipe, workdir, fresh, log)
    if restart_training:
        forget_training(workdir, log)
    inputs, eval_sets = stage_pool(recipe, workdir, log)
    manifest = stage_curate(recipe, workdir, inputs, log)
    model, tok = stage_base_model(recipe, workdir, log)
    stage_tokenize(recipe, workdir, tok, log)
    before = stage_eval(recipe, model, tok, eval_sets, workdir / "eval_before.json", "before", log)
    summary = stage_train(recipe, workdir, model, max_steps, log, nproc=nproc, supervise=supervise)
    if summary["steps"] < summary["total_steps"]:
        log(f"stopped at step {summary['steps']} of {summary['total_steps']} (--max-steps); run again to resume")
        return {}
    from hone.evaluate import compare
    from hone.train.checkpoint_io import save_hf

    after = stage_eval(recipe, model, tok, eval_sets, workdir / "eval_after.json", "after", log)
    table = compare(before, after)
    write_json(workdir / "eval.json", table)
    save_hf(model, tok, workdir / "final")
    log(f"saved the trained model (HF format) to {workdir / 'final'}")
    from hone.report import write_report

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
