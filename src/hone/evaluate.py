"""Evaluate stage: perplexity and bits per byte of a model on held-out text sets.

Each document is scored on its own: the EOS token (the training separator) is put in
front, so every token of the document is predicted, and bits per byte divides the
summed negative log-likelihood by the UTF-8 bytes those tokens decode to. Bits per byte
compares models with different tokenizers; perplexity is per token of this tokenizer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from hone.errors import HoneError
from hone.tokens import eos_id


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


def encode_docs(texts: list[str], tokenizer: Tokenizer, max_tokens: int, seq_len: int) -> list[tuple[list[int], int]]:
    """[(ids with EOS in front, bytes of the scored tokens)] until ``max_tokens`` are scored."""
    eos = eos_id(tokenizer)
    docs, total = [], 0
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids = enc.ids[: min(seq_len - 1, max_tokens - total)]
        if not ids:
            break
        n_bytes = len(tokenizer.decode(ids, skip_special_tokens=False).encode("utf-8"))
        docs.append(([eos] + ids, n_bytes))
        total += len(ids)
        if total >= max_tokens:
            break
    return docs


@torch.no_grad()
def score(model: torch.nn.Module, docs: list[tuple[list[int], int]], batch_size: int) -> dict:
    """Summed NLL over the documents → perplexity and bits per byte."""
    was_training = model.training
    device = next(model.parameters(), torch.empty(0)).device
    model.eval()
    nll, n_tokens, n_bytes = 0.0, 0, 0
    # Longest first, so each padded batch wastes little compute.
    ordered = sorted(docs, key=lambda d: -len(d[0]))
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width - 1, dtype=torch.bool)
        for row, (ids, nb) in enumerate(chunk):
            batch[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids) - 1] = True
            n_bytes += nb
        batch = batch.to(device)
        logits = model(batch[:, :-1]).float()
        losses = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        nll += float(losses[mask.flatten().to(device)].sum())
        n_tokens += int(mask.sum())
    model.train(was_training)
    if n_tokens == 0:
        raise HoneError("evaluation set is empty: nothing to score")
    return {"ppl": math.exp(nll / n_tokens), "bpb": nll / (math.log(2) * n_bytes),
            "nll": nll / n_tokens, "tokens": n_tokens, "bytes": n_bytes, "docs": len(docs)}


def evaluate_sets(model, tokenizer: Tokenizer, sets: dict[str, list[str]], *, max_tokens: int,
                  seq_len: int, batch_size: int, log=print) -> dict[str, dict]:
    results = {}
    for name, texts in sets.items():
        docs = encode_docs(texts, tokenizer, max_tokens, seq_len)
        results[name] = score(model, docs, batch_size)
        r = results[name]
        log(f"  {name:<10} ppl {r['ppl']:8.3f} | bpb {r['bpb']:.4f} | {r['tokens']} tokens, {r['docs']} docs")
    return results


def compare(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """eval.json rows: ppl/bpb before and after, and their relative changes (forgetting where
    they rise). Sets present on one side only are left out."""
    out = {}
    for name in before:
        if name not in after:
            continue
        b, a = before[name], after[name]
        out[name] = {"ppl_before": b["ppl"], "ppl_after": a["ppl"], "bpb_before": b["bpb"], "bpb_after": a["bpb"],
                     "ppl_change": a["ppl"] / b["ppl"] - 1, "bpb_change": a["bpb"] / b["bpb"] - 1,
                     "tokens": a["tokens"], "docs": a["docs"]}
    return out
