"""Selection under a token budget: ZIP diversity, rating-temperature sampling, random.

- ``zip``: the entropy law's greedy (Yin et al. 2024). The compression ratio of a set is its
  raw bytes over its zlib-9 bytes (lower: less redundant). Each round (1) takes the ``k1``
  remaining documents with the lowest ratio alone, (2) keeps the ``k2`` of them whose
  addition to the selected set gives the lowest ratio, (3) adds ``k3`` of those one at a
  time, each the one that keeps the ratio of this round's local set lowest. Rounds repeat
  until the budget is spent. Adding ``x`` to a set is measured with a copy of the set's
  running zlib compressor: the cost is that of compressing ``x``, not the whole set.
- ``quality``: sampling without replacement with probability ∝ exp(z / τ), z = the
  standardized ``quality`` column (QuRating; Gumbel top-k; τ = 0 is plain top-k).
- ``random``: a uniform random order.

Documents are taken in the method's order while they fit the budget; the rest are dropped
(``over_budget``). With ``quotas`` (domain → share of the budget) each domain is selected
separately; documents of other domains are dropped (``not_in_quota``).

``whole_pool_step`` is the runner of the steps that need the whole pool at once (dsir, rate,
select): read every input, decide per document, write one Parquet shard and the manifest.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from hone.corpus.runner import whole_pool_step
from hone.corpus.steps.dsir import gumbel_top_k
from hone.errors import HoneError
from hone.model.gguf import smollm2_gguf_path, tokenizer_from_gguf
from hone.recipe import OneLineErrors, SelectSettings

METHODS = ("zip", "quality", "random")
SEP = b"\n\n"  # between documents of a set, as they will sit in a training stream


class SelectConfig(OneLineErrors, SelectSettings):
    """Selection settings (:class:`hone.recipe.SelectSettings`, the fields of the ``select`` step)."""


# --- token counts -------------------------------------------------------------------------

def count_tokens(texts: list[str], tokenizer: str | None = None) -> np.ndarray:
    """Tokens per text: whitespace-separated words, or a real tokenizer's count."""
    if tokenizer is None:
        return np.array([len(t.split()) for t in texts], dtype=np.int64)
    tok = load_tokenizer(tokenizer)
    return np.array([len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)], dtype=np.int64)


def load_tokenizer(spec: str):
    """``smollm2`` (the packaged GGUF's tokenizer) or a ``tokenizer.json`` file / its directory."""
    if spec == "smollm2":
        return tokenizer_from_gguf(smollm2_gguf_path())
    path = Path(spec)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise HoneError(f"{path}: tokenizer not found (give a tokenizer.json, its directory, or 'smollm2')")
    return Tokenizer.from_file(str(path))


# --- orders -------------------------------------------------------------------------------

def ratio(raw: int, packed: int) -> float:
    return raw / max(packed, 1)


def _packed_len(base, base_out: int, data: bytes) -> int:
    """zlib-9 size of (what ``base`` has seen) + ``data``, without touching ``base``."""
    c = base.copy()
    return base_out + len(c.compress(data)) + len(c.flush())


class _Stream:
    """A running zlib-9 compressor over a growing set: raw and emitted byte counts."""

    def __init__(self) -> None:
        self.z, self.raw, self.out = zlib.compressobj(9), 0, 0

    def packed_with(self, data: bytes) -> int:
        return _packed_len(self.z, self.out, data)

    def add(self, data: bytes) -> None:
        self.out += len(self.z.compress(data))
        self.raw += len(data)


def zip_order(texts: list[str], budget: "Budget | None" = None, k1: int = 10_000, k2: int = 200,
              k3: int = 100) -> list[int]:
    """ZIP's greedy order of the documents that fit ``budget`` (all of them without one)."""
    data = [t.encode("utf-8") + SEP for t in texts]
    alone = np.array([ratio(len(d), len(zlib.compress(d, 9))) for d in data])
    remaining = np.argsort(alone, kind="stable")  # by own ratio, best first
    chosen, taken, selected = [], np.zeros(len(texts), bool), _Stream()
    while len(remaining) and not (budget is not None and budget.full()):
        cand = remaining[:k1]
        with_sel = np.array([ratio(selected.raw + len(data[i]), selected.packed_with(data[i])) for i in cand])
        pool = list(cand[np.argsort(with_sel, kind="stable")[:k2]])
        local = _Stream()
        for _ in range(min(k3, len(pool))):
            j = int(np.argmin([ratio(local.raw + len(data[i]), local.packed_with(data[i])) for i in pool]))
            i = int(pool.pop(j))
            taken[i] = True  # tried: kept or over budget, never a candidate again
            if budget is not None and not budget.take(i):
                continue
            chosen.append(i)
            local.add(data[i])
            selected.add(data[i])
        remaining = remaining[~taken[remaining]]
    return chosen


def quality_order(scores: np.ndarray, temperature: float, seed: int = 0) -> np.ndarray:
    """Gumbel top-k order with P ∝ exp(z / τ), z the standardized scores (NaN scores last)."""
    s = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(s)
    z = np.full(len(s), -np.inf)
    if ok.any():
        std = s[ok].std()
        z[ok] = (s[ok] - s[ok].mean()) / (std if std > 0 else 1.0)
    if temperature == 0:
        return gumbel_top_k(z, len(s), deterministic=True)
    return gumbel_top_k(z / temperature, len(s), seed=seed)


class Budget:
    """Tokens and documents left; ``take(i)`` spends document i's tokens when it fits."""

    def __init__(self, tokens: np.ndarray, budget_tokens: int | None, max_docs: int | None):
        self.tokens, self.left, self.docs_left = tokens, budget_tokens, max_docs

    def full(self) -> bool:
        return self.left == 0 or self.docs_left == 0

    def take(self, i: int) -> bool:
        if self.full() or (self.left is not None and self.tokens[i] > self.left):
            return False
        if self.left is not None:
            self.left -= int(self.tokens[i])
        if self.docs_left is not None:
            self.docs_left -= 1
        return True


def select_indices(texts: list[str], tokens: np.ndarray, cfg: SelectConfig, quality: np.ndarray | None,
                   budget_tokens: int | None, max_docs: int | None) -> list[int]:
    """The selected documents of one group, in selection order."""
    budget = Budget(tokens, budget_tokens, max_docs)
    if cfg.method == "zip":
        return zip_order(texts, budget, cfg.k1, cfg.k2, cfg.k3)
    if cfg.method == "quality":
        order = quality_order(quality, cfg.temperature, cfg.seed)
    else:
        order = np.random.default_rng(cfg.seed).permutation(len(texts))
    chosen = []
    for i in order.tolist():
        if budget.full():
            break
        if budget.take(i):
            chosen.append(i)
    return chosen


def _quality_scores(docs: list[dict], column: str) -> np.ndarray:
    values = [d.get(column) for d in docs]
    if docs and all(v is None for v in values):
        raise HoneError(f"select --method quality needs a '{column}' column: run `hone data rate` first")
    return np.array([np.nan if v is None else float(v) for v in values])


def select_docs(docs: list[dict], cfg: SelectConfig = SelectConfig()) -> tuple[list, dict]:
    """Per document ``None`` (selected; ``select_rank`` and ``n_tokens`` set) or a drop reason."""
    texts = [d["text"] for d in docs]
    tokens = count_tokens(texts, cfg.tokenizer)
    quality = _quality_scores(docs, cfg.quality_column) if cfg.method == "quality" else None
    groups = {None: np.arange(len(docs))}
    if cfg.quotas:
        dom = np.array([d.get("domain") or "" for d in docs], dtype=object)
        groups = {name: np.flatnonzero(dom == name) for name in cfg.quotas}
    verdicts: list = ["not_in_quota" if cfg.quotas else "over_budget"] * len(docs)
    info: dict = {"groups": {}}
    rank = 0
    for name, idx in groups.items():
        share = cfg.quotas.get(name, 1.0) if name is not None else 1.0
        bt = None if cfg.budget_tokens is None else int(round(cfg.budget_tokens * share))
        md = None if cfg.max_docs is None else int(round(cfg.max_docs * share))
        for i in idx:
            verdicts[i] = "over_budget"
        local = select_indices([texts[i] for i in idx], tokens[idx], cfg,
                               None if quality is None else quality[idx], bt, md)
        for j in local:
            i = int(idx[j])
            verdicts[i] = None
            docs[i]["select_rank"], docs[i]["n_tokens"] = rank, int(tokens[i])
            if cfg.method == "zip":
                docs[i]["zip_rank"] = rank
            rank += 1
        info["groups"][name or "all"] = {"docs": len(idx), "selected": len(local),
                                         "budget_tokens": bt, "tokens": int(tokens[idx[local]].sum()) if local else 0}
    chosen = [i for i, v in enumerate(verdicts) if v is None]
    info["tokens_selected"] = int(tokens[chosen].sum()) if chosen else 0
    info["tokens_in"] = int(tokens.sum())
    if chosen:
        data = SEP.join(texts[i].encode("utf-8") for i in chosen)
        info["compression_ratio_selected"] = round(ratio(len(data), len(zlib.compress(data, 9))), 4)
    return verdicts, info


def select_step(inputs: list, out_dir: Path, *, text_field: str = "text", executor=None, **params) -> dict:
    """The ``select`` step of ``hone data build`` (``SelectConfig`` fields as keywords)."""
    cfg = SelectConfig(**params)
    return whole_pool_step("select", inputs, out_dir, text_field, cfg.model_dump(), lambda docs: select_docs(docs, cfg))
