"""Evaluate stage: perplexity and bits per byte of a model on held-out text sets.

Every document is scored whole, framed as the model frames documents: the context before
it is ``conventions.context()`` (the end-of-text token that ends the document before it,
then BOS where the model starts documents with one), and the scored tokens are the
document's own, so its first token is predicted too. Bits per byte divides the summed
negative log-likelihood by the UTF-8 bytes those tokens decode to: it compares models
with different tokenizers; perplexity is per token of this tokenizer.

A document longer than the window W (``eval.seq_len``) is scored in strided windows, the
standard sliding-window perplexity: windows start every S tokens (S = W / 2 by default),
each scores only the tokens no earlier window scored, so every token is scored exactly
once, and every token after the first window sees at least W - S tokens of context.

By default every document of a set is scored (``max_tokens`` None). A cap takes documents
in a seeded random order, whole, until the next one would pass the cap; only when the very
first document alone is longer than the cap is a document cut (to its first ``max_tokens``
tokens), so a capped set is never empty. Each result says what it covers: ``tokens`` of
``tokens_total`` and ``docs`` of ``docs_total``, and ``capped``.

    results = evaluate_sets(model, tok, {"bio": texts}, seq_len=512, conventions=conv)
    # {"bio": {"ppl", "bpb", "nll", "tokens", "bytes", "docs", "docs_total", "tokens_total",
    #          "capped", "source", "window", "stride"}}
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from hone.errors import HoneError
from hone.model.llama import Llama
from hone.model.loss import fused_linear_cross_entropy
from hone.tokens.conventions import TokenConventions

Log = Callable[[str], None]
# A window: the tokens it covers (the model reads all but the last, predicts all but the
# first) and the index of the first prediction it scores (earlier ones are context).
Window = tuple[list[int], int]


def read_texts(path: Path, text_field: str = "text") -> list[str]:
    """Texts of a JSON-lines evaluation set (every line must be readable: it is a reference)."""
    path = Path(path)
    if not path.exists():
        raise HoneError(f"{path}: evaluation set not found")
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                texts.append(row[text_field])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise HoneError(f"{path}:{lineno}: not a JSON object with a {text_field!r} field") from None
    return texts


def encode_docs(texts: list[str], tokenizer: Tokenizer) -> list[list[int]]:
    """Each document's own token ids, whole (no special tokens: the framing is the context's)."""
    return [enc.ids for enc in tokenizer.encode_batch(texts, add_special_tokens=False)]


def cap_docs(docs: list[list[int]], max_tokens: int | None, seed: int = 0) -> list[list[int]]:
    """The documents scored under a cap of ``max_tokens``: all of them when None; else whole
    documents in a seeded random order until the next would pass the cap. Only a first
    document longer than the cap on its own is cut, to its first ``max_tokens`` tokens."""
    if max_tokens is None:
        return list(docs)
    if max_tokens < 1:
        raise HoneError(f"max_tokens {max_tokens} must be at least 1 (or none: every document)")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total + len(docs[i]) > max_tokens:
            if not chosen:
                chosen.append(docs[i][:max_tokens])
            break
        chosen.append(docs[i])
        total += len(docs[i])
    return chosen


def doc_bytes(tokenizer: Tokenizer, docs: list[list[int]]) -> int:
    """UTF-8 bytes the documents' tokens decode to (the denominator of bits per byte)."""
    return sum(len(t.encode("utf-8")) for t in tokenizer.decode_batch(docs, skip_special_tokens=False))


def check_window(window: int, stride: int | None, context: list[int]) -> int:
    """The stride (W // 2 when None), after checking the window can score past its context."""
    if not context:
        raise HoneError("evaluation needs a context token in front of each document (the end-of-text token)")
    if window < len(context) + 1:
        raise HoneError(f"evaluation window {window} is too short: it needs more than the {len(context)} "
                        f"context token(s) in front of each document")
    stride = max(1, window // 2) if stride is None else stride
    if not 1 <= stride <= window:
        raise HoneError(f"evaluation stride {stride} must be between 1 and the window ({window})")
    return stride


def windows(ids: list[int], context: list[int], window: int, stride: int) -> list[Window]:
    """Strided windows over ``context + ids`` that score each token of ``ids`` exactly once.

    Window k reads positions kS .. kS+W-1 and predicts kS+1 .. kS+W; it scores those past
    the last one window k-1 scored, each with at least W - S + 1 tokens of context."""
    seq = list(context) + list(ids)
    last_target = len(seq) - 1
    done = len(context) - 1  # position of the last token scored so far (the context is never scored)
    out, start = [], 0
    while done < last_target:
        end = min(start + window, last_target)  # the last position this window predicts
        out.append((seq[start:end + 1], done + 1 - (start + 1)))
        done = end
        start += stride
    return out


@torch.no_grad()
def _window_nll(model: torch.nn.Module, wins: list[Window], budget: int, pad_id: int, device) -> tuple[float, int]:
    """Summed NLL and count of the scored predictions of every window, in batches of at most
    ``budget`` tokens (longest first, so padding wastes little; padding is never scored)."""
    ordered = sorted(wins, key=lambda w: -len(w[0]))
    nll, count, i = 0.0, 0, 0
    while i < len(ordered):
        width = len(ordered[i][0]) - 1
        chunk = ordered[i:i + max(1, budget // width)]
        i += len(chunk)
        batch = torch.full((len(chunk), width + 1), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        for row, (toks, first) in enumerate(chunk):
            batch[row, :len(toks)] = torch.tensor(toks)
            mask[row, first:len(toks) - 1] = True
        batch, mask = batch.to(device), mask.to(device)
        losses = _token_losses(model, batch[:, :-1], batch[:, 1:])
        nll += float(losses[mask].double().sum())
        count += int(mask.sum())
    return nll, count


def _token_losses(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-prediction cross-entropy ``[B, T]``. For Hone's Llama the fused loss never builds the
    whole ``[B, T, V]`` logits tensor (its head detached: no gradient buffers in evaluation)."""
    if isinstance(model, Llama):
        hidden = model.model(inputs)
        _, per_token = fused_linear_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight.detach(),
                                                  targets.flatten(), token_weight=1.0)
        return per_token.float().view(targets.shape)
    logits = model(inputs).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def score(model: torch.nn.Module, docs: list[list[int]], *, n_bytes: int, context: list[int], window: int,
          stride: int | None = None, batch_size: int = 4, pad_id: int = 0) -> dict:
    """Summed NLL of every token of ``docs`` (each after ``context``) → perplexity and bits per
    byte. A batch holds up to ``batch_size`` full windows' worth of tokens."""
    stride = check_window(window, stride, context)
    wins = [w for ids in docs for w in windows(ids, context, window, stride)]
    was_training = model.training
    device = next(model.parameters(), torch.empty(0)).device
    model.eval()
    try:
        nll, n_tokens = _window_nll(model, wins, batch_size * window, pad_id, device)
    finally:
        model.train(was_training)
    if n_tokens == 0:
        raise HoneError("evaluation set is empty: nothing to score")
    return {"ppl": math.exp(nll / n_tokens), "bpb": nll / (math.log(2) * max(n_bytes, 1)),
            "nll": nll / n_tokens, "tokens": n_tokens, "bytes": n_bytes, "docs": len(docs)}


def evaluate_sets(model, tokenizer: Tokenizer, sets: dict[str, list[str]], *, max_tokens: int | None = None,
                  seq_len: int = 512, stride: int | None = None, batch_size: int = 4, seed: int = 0,
                  conventions: TokenConventions | None = None, sources: dict[str, str] | None = None,
                  cap_name: str = "eval.max_tokens_per_set", log: Log = print) -> dict[str, dict]:
    """Score each set whole (or capped at ``max_tokens`` per set, documents in the order
    ``seed`` shuffles them) in windows of ``seq_len`` tokens with ``stride``. ``sources`` says
    where each set came from (kept as ``source``); ``cap_name`` is the option the log line
    names when a cap leaves documents out."""
    conv = conventions if conventions is not None else TokenConventions.detect(tokenizer)
    context = conv.context()
    stride = check_window(seq_len, stride, context)
    results = {}
    for name, texts in sets.items():
        docs = encode_docs(texts, tokenizer)
        chosen = cap_docs(docs, max_tokens, seed)
        source = (sources or {}).get(name)
        if not any(chosen):
            where = f" ({source})" if source else ""
            raise HoneError(f"evaluation set {name!r}{where}: no tokens to score in its {len(texts):,} documents")
        r = score(model, chosen, n_bytes=doc_bytes(tokenizer, chosen), context=context, window=seq_len,
                  stride=stride, batch_size=batch_size, pad_id=conv.pad)
        tokens_total = sum(len(d) for d in docs)
        r.update(docs_total=len(docs), tokens_total=tokens_total, capped=r["tokens"] < tokens_total,
                 source=source, window=seq_len, stride=stride)
        results[name] = r
        long_docs = sum(len(d) + len(context) - 1 > seq_len for d in chosen)
        log(_summary(name, r, cap_name, long_docs))
    return results


def _summary(name: str, r: dict, cap_name: str, long_docs: int) -> str:
    if r["capped"]:
        counts = (f"{r['tokens']:,} of {r['tokens_total']:,} tokens, {r['docs']:,} of {r['docs_total']:,} docs "
                  f"(capped by {cap_name})")
    else:
        counts = f"{r['tokens']:,} tokens, {r['docs']:,} docs"
    if long_docs:
        counts += f", {long_docs:,} in {r['window']:,}-token windows (stride {r['stride']:,})"
    return f"  {name:<10} ppl {r['ppl']:8.3f} | bpb {r['bpb']:.4f} | {counts}"


# What of a set's result an eval.json row carries besides the scores: what was scored, and from where.
COVERAGE_FIELDS = ("tokens", "docs", "tokens_total", "docs_total", "capped", "source", "window", "stride")


def compare(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """eval.json rows: ppl/bpb before and after, and their relative changes (forgetting where
    they rise), with what was scored (tokens and docs of the totals, capped, source). Sets
    present on one side only are left out."""
    out = {}
    for name in before:
        if name not in after:
            continue
        b, a = before[name], after[name]
        out[name] = {"ppl_before": b["ppl"], "ppl_after": a["ppl"], "bpb_before": b["bpb"], "bpb_after": a["bpb"],
                     "ppl_change": a["ppl"] / b["ppl"] - 1, "bpb_change": a["bpb"] / b["bpb"] - 1,
                     **{k: a[k] for k in COVERAGE_FIELDS if k in a}}
    return out
