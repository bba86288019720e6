"""Downstream tasks: multiple-choice accuracy through lm-evaluation-harness, on local task files.

lm-eval scores each choice by the log-likelihood of its text after the question; ``acc`` takes
the likeliest choice, ``acc_norm`` the likeliest per byte of choice text. Hone hands lm-eval
its own model through :class:`HoneLM`, a small ``lm_eval.api.model.LM``: the log-likelihoods
come from the model already in memory (Hone's Llama, the transformers backend, a GGUF-loaded
base) and its tokenizer, framed as Hone frames documents (``conventions.context()`` first), so
the run evaluates before and after training without exporting an HF directory for lm-eval's
HFLM to load a second time.

Tasks are lm-eval task names (from the task files found in ``include`` directories, or any lm-eval
task whose data is already on this machine) or paths of task YAML files. Nothing is downloaded:
the Hugging Face hub and datasets are switched offline before lm-eval loads.

    results = run_tasks(model, tok, conv, ["hone_go_term"], include=[workdir / "tasks"])
    # {"hone_go_term": {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "source"}}
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from hone.errors import HoneError
from hone.model.llama import KVCache, Llama
from hone.tokens.conventions import TokenConventions

Log = Callable[[str], None]
METRICS = ("acc", "acc_norm")
FIX_EXTRA = "install the eval extra: pip install 'hone[eval]'"


def _lm_eval():
    """lm_eval, imported with the hub and datasets offline (they read these when imported)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    try:
        import datasets
        import lm_eval
        import lm_eval.api.model  # noqa: F401  (LM, subclassed below)
        import lm_eval.evaluator  # noqa: F401
    except ImportError as e:
        raise HoneError(f"eval.tasks needs lm-evaluation-harness ({e.name} is not installed): {FIX_EXTRA}") from None
    datasets.disable_progress_bars()  # "Generating test split" bars for local task files say nothing to a user
    return lm_eval


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and ``continuation`` as lm-eval's HFLM splits them: the pair is
    encoded whole (so a merge across the boundary is the tokenizer's own), and the context's
    trailing spaces move to the continuation."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False).ids
    ctx = tok.encode(context, add_special_tokens=False).ids
    return whole[:len(ctx)], whole[len(ctx):]


def _shared_context_scores(model: Llama, ctx: list[int], conts: list[list[int]], pad_id: int
                           ) -> list[tuple[float, bool]]:
    """Scores of the continuations ``conts`` of one context with Hone's Llama: the context is read
    once into a KV cache that every continuation row shares, so a 4-way multiple-choice item costs
    one context instead of four (the choices are short, the question is long)."""
    cache = KVCache(model.config.num_hidden_layers)
    device = model.lm_head.weight.device
    hidden = model.model(torch.tensor([ctx], device=device), cache)
    first = F.log_softmax(model.lm_head(hidden[0, -1]).float(), -1)  # predicts each continuation's first token
    rows = len(conts)
    cache.keys = [k.expand(rows, -1, -1, -1) for k in cache.keys]
    cache.values = [v.expand(rows, -1, -1, -1) for v in cache.values]
    batch = torch.full((rows, max(map(len, conts))), pad_id, dtype=torch.long)
    for row, cont in enumerate(conts):
        batch[row, :len(cont)] = torch.tensor(cont)
    hidden = model.model(batch.to(device), cache)  # right padding: causal, never seen by a real token
    out = []
    for row, cont in enumerate(conts):
        rest = F.log_softmax(model.lm_head(hidden[row, :len(cont) - 1]).float(), -1)
        lp, target = torch.cat([first[None], rest]).cpu(), torch.tensor(cont)
        out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
    return out


def _span_logprobs(model: torch.nn.Module, ids: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Log-probabilities ``[b - a, V]`` of each row's positions ``a:b``, from the model's logits."""
    logits = model(ids)
    return [F.log_softmax(logits[r, a:b].float(), -1) for r, (a, b) in enumerate(spans)]


@torch.no_grad()
def continuation_scores(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], *, prefix: list[int],
                        max_len: int, batch_size: int, pad_id: int) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-probability of the continuation
    after ``prefix`` + context, and whether greedy decoding would produce it. Sequences longer
    than ``max_len`` lose context from the left. Hone's Llama reads each context once for all its
    continuations, ``batch_size`` contexts at a time; any other model reads every (context,
    continuation) whole, in batches of ``batch_size``, longest first."""
    device = next(model.parameters(), torch.empty(0)).device
    if isinstance(model, Llama):
        return _llama_scores(model, pairs, prefix=prefix, max_len=max_len, pad_id=pad_id, batch_size=batch_size)
    seqs = [(prefix + ctx + cont)[-(max_len + 1):] for ctx, cont in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(seqs[i]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = len(seqs[chunk[0]]) - 1
            batch = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            for row, i in enumerate(chunk):
                batch[row, :len(seqs[i]) - 1] = torch.tensor(seqs[i][:-1])
            # a continuation longer than the window is scored on what fits
            n = {i: min(len(pairs[i][1]), len(seqs[i]) - 1) for i in chunk}
            spans = [(len(seqs[i]) - 1 - n[i], len(seqs[i]) - 1) for i in chunk]
            for i, lp in zip(chunk, _span_logprobs(model, batch.to(device), spans)):
                lp, target = lp.cpu(), torch.tensor(seqs[i][-n[i]:])
                out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
    finally:
        model.train(was_training)
    return out


def _tree_rows(items: list[tuple[list[int], list[list[int]]]], pad_id: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[list[int]]]]:
    """One row per (context, continuations) item: the context, then every continuation but its last
    token, each continuation seeing the context and itself only, at the positions it would have
    after the context alone. (ids, position ids, boolean attention mask ``[B, 1, T, T]``, and for
    each item and continuation the row positions whose outputs predict its tokens), right-padded;
    a padding position attends to itself alone."""
    width = max(len(ctx) + sum(len(c) - 1 for c in conts) for ctx, conts in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(items), width), dtype=torch.long)
    mask = torch.eye(width, dtype=torch.bool).repeat(len(items), 1, 1)
    reads = []
    for row, (ctx, conts) in enumerate(items):
        n = len(ctx)
        ids[row, :n], pos[row, :n] = torch.tensor(ctx), torch.arange(n)
        mask[row, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        at, item_reads = n, []
        for cont in conts:
            m = len(cont) - 1  # the last token is predicted, never read
            ids[row, at:at + m], pos[row, at:at + m] = torch.tensor(cont[:-1], dtype=torch.long), torch.arange(n, n + m)
            mask[row, at:at + m, :n] = True
            mask[row, at:at + m, at:at + m] = torch.ones(m, m, dtype=torch.bool).tril()
            item_reads.append([n - 1, *range(at, at + m)])
            at += m
        reads.append(item_reads)
    return ids, pos, mask[:, None], reads


def _tree_scores(model: Llama, items: list[tuple[list[int], list[list[int]]]], pad_id: int
                 ) -> list[list[tuple[float, bool]]]:
    """Scores of each item's continuations from one forward over the batch of items (:func:`_tree_rows`):
    the same numbers as :func:`_shared_context_scores` item by item, in larger matmuls."""
    ids, pos, mask, reads = _tree_rows(items, pad_id)
    device = model.lm_head.weight.device
    hidden = model.model(ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device))
    out = []
    for row, ((_, conts), item_reads) in enumerate(zip(items, reads)):
        scores = []
        for cont, at in zip(conts, item_reads):
            lp, target = F.log_softmax(model.lm_head(hidden[row, at]).float(), -1).cpu(), torch.tensor(cont)
            scores.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        out.append(scores)
    return out


def _llama_scores(model: Llama, pairs: list[tuple[list[int], list[int]]], *, prefix: list[int], max_len: int,
                  pad_id: int, batch_size: int) -> list[tuple[float, bool]]:
    """:func:`continuation_scores` for Hone's Llama: requests grouped by context, each context read
    once with all its continuations, cut from the left so context + continuation fit ``max_len + 1``;
    ``batch_size`` contexts per forward (:func:`_tree_scores`), or one at a time through a KV cache
    (:func:`_shared_context_scores`) on a model with sliding windows."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        groups.setdefault(tuple(ctx), []).append(i)
    items, members = [], []
    for ctx, group in groups.items():
        conts = [pairs[i][1][-max_len:] for i in group]
        items.append(((prefix + list(ctx))[-(max_len + 1 - max(map(len, conts))):], conts))
        members.append(group)
    windowed = model.config.has_windows
    order = sorted(range(len(items)), key=lambda j: len(items[j][0]) + sum(map(len, items[j][1])))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        step = 1 if windowed else max(1, batch_size)
        for start in range(0, len(order), step):
            chunk = order[start:start + step]
            if windowed:
                scored = [_shared_context_scores(model, *items[chunk[0]], pad_id)]
            else:
                scored = _tree_scores(model, [items[j] for j in chunk], pad_id)
            for j, scores in zip(chunk, scored):
                for i, score in zip(members[j], scores):
                    out[i] = score
    finally:
        model.train(was_training)
    return out


def hone_lm(model: torch.nn.Module, tok: Tokenizer, conventions: TokenConventions, *, max_len: int = 1024,
            batch_size: int = 8):
    """An lm-eval ``LM`` over Hone's ``model`` and ``tok`` (log-likelihood tasks only)."""
    lm_eval = _lm_eval()

    class HoneLM(lm_eval.api.model.LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            pairs = []
            for req in requests:
                context, continuation = req.args[0], req.args[1]
                if not continuation:
                    raise HoneError("an lm-eval request with an empty continuation: nothing to score")
                pairs.append(encode_pair(tok, context, continuation))
            return continuation_scores(model, pairs, prefix=conventions.context(), max_len=max_len,
                                       batch_size=batch_size, pad_id=conventions.pad)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise HoneError("eval.tasks: Hone scores multiple-choice (loglikelihood) tasks; perplexity tasks belong "
                            "in eval.sets")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise HoneError("eval.tasks: Hone scores multiple-choice (loglikelihood) tasks, not generation tasks")

    return HoneLM()


def check_task_file(path: Path) -> str:
    """The task name of an lm-eval task YAML file; a one-line HoneError when it is not one."""
    _lm_eval()
    from lm_eval.tasks._index import TaskIndex

    try:
        entry = TaskIndex.entry_from_path(Path(path))
    except Exception as e:  # yaml's and lm-eval's own errors: any of them means "not a task file"
        raise HoneError(f"{path}: not an lm-eval task file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        ) from None
    if entry is None or not isinstance(entry.name, str):
        raise HoneError(f"{path}: not an lm-eval task file (no 'task' or 'group' name)")
    return entry.name


def resolve_tasks(tasks: Iterable[str], include: Iterable[Path] = ()) -> tuple[list[str], list[Path]]:
    """Task names and the directories lm-eval searches: a ``.yaml`` path is read for its task name
    and its directory searched; any other entry is a task name."""
    names, dirs = [], [Path(d) for d in include]
    for t in tasks:
        if t.endswith((".yaml", ".yml")) or os.sep in t:
            if not Path(t).is_file():
                raise HoneError(f"task file {t}: not found")
            names.append(check_task_file(Path(t)))
            dirs.append(Path(t).resolve().parent)
        else:
            names.append(t)
    return names, list(dict.fromkeys(dirs))


def task_manager(names: list[str], dirs: list[Path]):
    """lm-eval's TaskManager over ``dirs``, with lm-eval's own tasks only when a name needs them
    (indexing them all takes seconds); a one-line error for a name found nowhere."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(d) for d in dirs if d.is_dir()]
    tm = TaskManager(include_path=paths or None, include_defaults=False)
    if not set(names) <= set(tm.all_tasks):
        tm = TaskManager(include_path=paths or None, include_defaults=True)
    missing = [n for n in names if n not in tm.all_tasks]
    if missing:
        where = f" in {', '.join(paths)}" if paths else ""
        raise HoneError(f"eval.tasks: {', '.join(map(repr, missing))}: no such lm-eval task{where} or among "
                        f"lm-eval's own")
    return tm


def _load_tasks(names: list[str], tm) -> dict:
    """lm-eval's loaded tasks (a group's leaf tasks), their data read, zero-shot unless a task
    file says otherwise; a one-line error when lm-eval cannot load one."""
    try:
        loaded = tm.load(names)
    except HoneError:
        raise
    except Exception as e:  # a config lm-eval cannot build, a data file it cannot read
        first = str(e).splitlines()[0] if str(e) else ""
        raise HoneError(f"eval.tasks {', '.join(names)}: lm-eval could not load it: {type(e).__name__}: {first}"
                        ) from None
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)
    return loaded


def _row(metrics: dict, n: int, source: str | None) -> dict:
    row: dict = {"n": n, "source": source}
    for m in METRICS:
        if f"{m},none" in metrics:
            stderr = metrics.get(f"{m}_stderr,none")
            row[m], row[f"{m}_stderr"] = metrics[f"{m},none"], stderr if isinstance(stderr, float) else None
    return row


def run_tasks(model: torch.nn.Module, tok: Tokenizer, conventions: TokenConventions, tasks: list[str], *,
              include: Iterable[Path] = (), limit: int | None = None, max_len: int = 1024, batch_size: int = 8,
              log: Log = print) -> dict[str, dict]:
    """Accuracy (and acc_norm where the task has it) with standard errors on each task, zero-shot."""
    lm_eval = _lm_eval()
    names, dirs = resolve_tasks(tasks, include)
    tm = task_manager(names, dirs)
    loaded = _load_tasks(names, tm)
    t0 = time.perf_counter()
    # evaluate(), not simple_evaluate(): the latter also collects pip's and torch's environment
    # report for its log (seconds of subprocesses on every call).
    out = lm_eval.evaluator.evaluate(hone_lm(model, tok, conventions, max_len=max_len, batch_size=batch_size),
                                     loaded, limit=limit, log_samples=False, verbosity="ERROR")
    results = {}
    for name, metrics in out["results"].items():
        if not any(f"{m},none" in metrics for m in METRICS):
            continue  # a group's own row, or a task without accuracy
        n = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
        source = getattr(getattr(tm, "_index", {}).get(name), "yaml_path", None)  # the task file, where lm-eval says
        results[name] = _row(metrics, n, str(source) if source else None)
        r = results[name]
        norm = f", acc_norm {r['acc_norm']:.3f}" if "acc_norm" in r else ""
        log(f"  task {name}: acc {r['acc']:.3f} ± {r['acc_stderr'] or 0:.3f}{norm} ({n} items)")
    log(f"  tasks done in {time.perf_counter() - t0:.1f}s")
    return results


def compare_tasks(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Rows of eval_tasks.json: each metric before and after, its standard errors, and the change
    (after - before, in accuracy points of 1); tasks on one side only are left out."""
    out = {}
    for name, b in before.items():
        if name not in after:
            continue
        a, row = after[name], {"n": after[name]["n"], "source": after[name].get("source")}
        for m in METRICS:
            if m in a and m in b:
                row.update({f"{m}_before": b[m], f"{m}_after": a[m], f"{m}_change": a[m] - b[m],
                            f"{m}_stderr_before": b.get(f"{m}_stderr"), f"{m}_stderr_after": a.get(f"{m}_stderr")})
        out[name] = row
    return out
