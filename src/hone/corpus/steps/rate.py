"""QuRating: pairwise judgments → Bradley–Terry scores → a fast rater that scores every doc.

1. Sample pairs of documents (rated docs split into a training and a held-out group; pairs
   are drawn inside each group). A judge reads two excerpts and gives P(B better than A) on
   a criterion; both orders are asked and averaged, p = (p(A,B) + 1 − p(B,A)) / 2; only
   confident pairs (p ≤ 0.25 or ≥ 0.75 by default) are kept.
2. Bradley–Terry: P(j ≻ i) = σ(s_j − s_i), fitted by L-BFGS on binary cross-entropy against
   the soft labels p (with a small L2 term, so separable comparisons stay finite).
3. A ridge regression on hashed word uni+bigram features learns s from the text of the
   training group; it scores every document per chunk of ``chunk_words`` words, the chunk
   scores averaged weighted by their word counts. Its pairwise accuracy on the held-out
   group's confident pairs is the reported agreement.

Judges: ``LocalJudge`` (a causal LM of ours, from GGUF or an HF directory: the next-token
logits of the labels "A" and "B" after the prompt) and ``OpenAIJudge`` (any
OpenAI-compatible chat endpoint; logprobs when the server gives them, else the answer).

    hone data rate pool.jsonl -o rated/ --judge local:smollm2 --criterion educational_value --pairs 200
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from pydantic import model_validator

from hone.corpus.runner import whole_pool_step
from hone.corpus.steps.dsir import NgramHasher
from hone.errors import HoneError
from hone.model.gguf import load_gguf, smollm2_gguf_path
from hone.model.hf import load_hf
from hone.recipe import OneLineErrors, RateSettings

CRITERIA = {
    "writing_style": "Which text has a more polished and beautiful writing style?",
    "required_expertise": "Which text requires greater expertise and prerequisite knowledge to understand it?",
    "facts_and_trivia": "Which text contains more facts and trivia? Prefer specific facts and obscure trivia "
                        "over more common knowledge.",
    "educational_value": "Which text has more educational value, e.g. it contains material that would be useful "
                         "in a textbook or a school lesson?",
}
LABELS = ("A", "B")


def question(criterion: str) -> str:
    """A named criterion's question, or the user's own text used as the question."""
    key = criterion.strip().lower().replace(" ", "_").replace("&", "and").replace("-", "_")
    if key in CRITERIA:
        return CRITERIA[key]
    if len(criterion.split()) < 3:
        raise HoneError(f"criterion {criterion!r}: use one of {', '.join(CRITERIA)} or write a question "
                        f"(e.g. 'Which text is more about cardiology?')")
    return criterion.strip()


def prompt(a: str, b: str, q: str) -> str:
    return (f"Compare two text excerpts and answer the question.\n\nText A:\n{a}\n\nText B:\n{b}\n\n"
            f"Question: {q}\nAnswer with a single letter, A or B.")


class Judge(Protocol):
    name: str

    def __call__(self, pairs: list[tuple[str, str]], q: str) -> np.ndarray:
        """P(B better than A) per pair (NaN where the judge gave no usable answer)."""


# --- local causal LM judge ------------------------------------------------------------------

class LocalJudge:
    """Reads our Llama's next-token logits for "A" and "B" after the prompt (right-padded
    batches: a causal model's last real position never sees the padding)."""

    def __init__(self, model, tokenizer, excerpt_tokens: int = 256, batch_size: int = 4, name: str = "local"):
        self.model, self.tok, self.name = model.eval(), tokenizer, name
        self.excerpt_tokens, self.batch_size = excerpt_tokens, batch_size
        self.chat = tokenizer.token_to_id("<|im_start|>") is not None  # ChatML (SmolLM2-Instruct)
        self.label_ids = [self._label_id(x) for x in LABELS]

    def _label_id(self, label: str) -> int:
        tid = self.tok.token_to_id(label)
        return tid if tid is not None else self.tok.encode(label, add_special_tokens=False).ids[-1]

    def excerpt(self, text: str) -> str:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return text if len(ids) <= self.excerpt_tokens else self.tok.decode(ids[:self.excerpt_tokens])

    def render(self, a: str, b: str, q: str) -> str:
        body = prompt(self.excerpt(a), self.excerpt(b), q)
        if self.chat:
            return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
        return body + "\nAnswer: "

    def __call__(self, pairs: list[tuple[str, str]], q: str) -> np.ndarray:
        import torch

        out = []
        for start in range(0, len(pairs), self.batch_size):
            ids = [self.tok.encode(self.render(a, b, q), add_special_tokens=False).ids
                   for a, b in pairs[start:start + self.batch_size]]
            lengths = torch.tensor([len(x) for x in ids])
            batch = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
            for r, x in enumerate(ids):
                batch[r, :len(x)] = torch.tensor(x)
            with torch.inference_mode():
                logits = self.model(batch)[torch.arange(len(ids)), lengths - 1][:, self.label_ids].float()
            out.append(torch.sigmoid(logits[:, 1] - logits[:, 0]).numpy())
        return np.concatenate(out) if out else np.zeros(0)


def load_local_judge(path: str, excerpt_tokens: int = 256, batch_size: int = 4) -> LocalJudge:
    """``smollm2`` (the packaged GGUF), a ``.gguf`` file, or an HF model directory."""
    if path == "smollm2":
        model, tok = load_gguf(smollm2_gguf_path())
    elif path.endswith(".gguf"):
        if not Path(path).is_file():
            raise HoneError(f"{path}: GGUF file not found")
        model, tok = load_gguf(path)
    else:
        model, tok = load_hf(path)
        if tok is None:
            raise HoneError(f"{path}: no tokenizer.json beside the weights (the judge needs one)")
    return LocalJudge(model, tok, excerpt_tokens, batch_size, name=f"local:{path}")


# --- OpenAI-compatible endpoint judge ---------------------------------------------------------

class OpenAIJudge:
    """POST {url}/chat/completions; P(B) from the top logprobs of the one answer token when
    the server returns them, else 0 or 1 from the answer's first letter (NaN otherwise).
    The API key comes from the environment and never appears in a message."""

    def __init__(self, url: str, model: str, key: str = "", excerpt_chars: int = 1500, workers: int = 4,
                 timeout: float = 120.0):
        self.url, self.model, self._key = url.rstrip("/"), model, key
        self.excerpt_chars, self.workers, self.timeout = excerpt_chars, workers, timeout
        self.logprobs = True  # dropped after the first refusal of a server without them
        self.name = f"openai:{self.url} ({model})"

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json",
                   **({"Authorization": f"Bearer {self._key}"} if self._key else {})}
        req = urllib.request.Request(self.url + "/chat/completions", data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())

    def ask(self, a: str, b: str, q: str) -> float:
        body = {"model": self.model, "temperature": 0, "max_tokens": 1,
                "messages": [{"role": "user", "content": prompt(a[:self.excerpt_chars], b[:self.excerpt_chars], q)}]}
        try:
            if self.logprobs:
                try:
                    return p_b_from_response(self._post({**body, "logprobs": True, "top_logprobs": 5}))
                except urllib.error.HTTPError as e:
                    if e.code != 400:
                        raise
                    self.logprobs = False  # this server rejects logprobs: parse the answer instead
            return p_b_from_response(self._post(body))
        except Exception as e:  # network, HTTP status, odd JSON: one line, never the key
            raise HoneError(f"judge {self.url}: {type(e).__name__}: {str(e)[:200]}") from None

    def __call__(self, pairs: list[tuple[str, str]], q: str) -> np.ndarray:
        with ThreadPoolExecutor(self.workers) as pool:
            return np.array(list(pool.map(lambda ab: self.ask(ab[0], ab[1], q), pairs)), dtype=np.float64)


def p_b_from_response(resp: dict) -> float:
    """P(B) from a chat completion: the A/B top logprobs, else the answer's first letter."""
    choice = resp["choices"][0]
    content = ((choice.get("logprobs") or {}).get("content") or [])
    if content:
        top = content[0].get("top_logprobs") or [content[0]]
        lp: dict[str, float] = {}
        for t in top:
            label = str(t.get("token", "")).strip().upper()
            if label in LABELS and label not in lp:
                lp[label] = float(t["logprob"])
        if lp:
            floor = min(float(t["logprob"]) for t in top)  # an absent label is below every listed one
            la, lb = lp.get("A", floor - 1.0), lp.get("B", floor - 1.0)
            return 1.0 / (1.0 + math.exp(la - lb))
    text = str((choice.get("message") or {}).get("content") or "").strip().upper()
    return {"A": 0.0, "B": 1.0}.get(text[:1], float("nan"))


def make_judge(spec: str, *, excerpt_tokens: int = 256, batch_size: int = 4, model: str | None = None,
               api_key_env: str = "HONE_JUDGE_KEY") -> Judge:
    """``local:smollm2`` / ``local:PATH`` (GGUF or HF dir) / ``openai:URL`` (key from ``api_key_env``,
    falling back to OPENAI_API_KEY; model from ``model``, HONE_JUDGE_MODEL or gpt-4o-mini)."""
    kind, _, target = spec.partition(":")
    if kind == "local" and target:
        return load_local_judge(target, excerpt_tokens, batch_size)
    if kind == "openai" and target:
        key = os.environ.get(api_key_env) or os.environ.get("OPENAI_API_KEY") or ""
        name = model or os.environ.get("HONE_JUDGE_MODEL") or "gpt-4o-mini"
        return OpenAIJudge(target, name, key, excerpt_chars=excerpt_tokens * 6)
    raise HoneError(f"--judge {spec!r}: expected local:smollm2, local:PATH (GGUF file or HF dir) or openai:URL")


# --- pairs, Bradley–Terry, the fast rater ---------------------------------------------------

def sample_pairs(n: int, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n_pairs`` distinct unordered pairs of 0..n-1 (each doc in about as many pairs)."""
    if n < 2 or n_pairs < 1:
        return np.zeros((0, 2), dtype=np.int64)
    n_pairs = min(n_pairs, n * (n - 1) // 2)
    seen: set[tuple[int, int]] = set()
    while len(seen) < n_pairs:
        perm = rng.permutation(n)  # a random matching: every doc once per sweep
        for a, b in zip(perm[0::2], perm[1::2]):
            seen.add((int(min(a, b)), int(max(a, b))))
            if len(seen) == n_pairs:
                break
    return np.array(sorted(seen), dtype=np.int64)


def judge_both_orders(judge: Judge, texts: list[str], pairs: np.ndarray, q: str) -> np.ndarray:
    """p = (p(A,B) + 1 − p(B,A)) / 2: P(second doc of the pair is better), order bias averaged out."""
    if not len(pairs):
        return np.zeros(0)
    fwd = judge([(texts[a], texts[b]) for a, b in pairs], q)
    rev = judge([(texts[b], texts[a]) for a, b in pairs], q)
    return (np.asarray(fwd, np.float64) + 1.0 - np.asarray(rev, np.float64)) / 2.0


def confident(p: np.ndarray, margin: float = 0.25) -> np.ndarray:
    return np.isfinite(p) & ((p <= margin) | (p >= 1.0 - margin))


def fit_bradley_terry(n: int, pairs: np.ndarray, p: np.ndarray, l2: float = 1e-2) -> np.ndarray:
    """Scores s (mean 0) minimizing mean BCE(σ(s_b − s_a), p) + l2·mean(s²)."""
    from scipy.optimize import minimize

    a, b = pairs[:, 0], pairs[:, 1]

    def loss(s: np.ndarray) -> tuple[float, np.ndarray]:
        d = s[b] - s[a]
        # BCE with logits, stable: log(1 + e^d) − p·d
        val = np.mean(np.logaddexp(0.0, d) - p * d) + l2 * np.mean(s ** 2)
        g_d = (1.0 / (1.0 + np.exp(-d)) - p) / len(d)
        grad = np.bincount(b, g_d, n) - np.bincount(a, g_d, n) + 2 * l2 * s / n
        return float(val), grad

    if not len(pairs):
        return np.zeros(n)
    s = minimize(loss, np.zeros(n), jac=True, method="L-BFGS-B").x
    return s - s.mean()


def pairwise_accuracy(scores: np.ndarray, pairs: np.ndarray, p: np.ndarray) -> float | None:
    """Share of pairs whose score order agrees with the judge (ties count half)."""
    if not len(pairs):
        return None
    d = scores[pairs[:, 1]] - scores[pairs[:, 0]]
    want = p > 0.5
    return float(np.mean(np.where(d == 0, 0.5, (d > 0) == want)))


def chunks(text: str, chunk_words: int) -> list[tuple[str, int]]:
    """Chunks of at most ``chunk_words`` whitespace words, with their word counts."""
    w = text.split()
    if not w:
        return [("", 0)]
    return [(" ".join(w[i:i + chunk_words]), len(w[i:i + chunk_words])) for i in range(0, len(w), chunk_words)]


class NgramRater:
    """Ridge regression on L2-normalized log(1 + count) hashed word uni+bigram features
    (solved in the dual: few rated documents, many buckets)."""

    def __init__(self, buckets: int = 1 << 18, alpha: float = 1.0):
        self.hasher, self.alpha = NgramHasher(buckets), alpha
        self.w: np.ndarray | None = None
        self.bias = 0.0

    def fit(self, texts: list[str], y: np.ndarray) -> "NgramRater":
        x = _features(self.hasher, texts)
        self.bias = float(np.mean(y))
        k = (x @ x.T).toarray()
        alpha_dual = np.linalg.solve(k + self.alpha * np.eye(len(texts)), y - self.bias)
        self.w = np.asarray(x.T @ alpha_dual).ravel()
        return self

    def predict(self, texts: list[str]) -> np.ndarray:
        assert self.w is not None, "fit first"
        return np.asarray(_features(self.hasher, texts) @ self.w).ravel() + self.bias

    def score_docs(self, texts: list[str], chunk_words: int = 256) -> np.ndarray:
        """Per document: chunk scores averaged, weighted by the chunks' word counts."""
        pieces, owner, weight = [], [], []
        for i, t in enumerate(texts):
            for chunk, n in chunks(t, chunk_words):
                pieces.append(chunk)
                owner.append(i)
                weight.append(max(n, 1))
        s = self.predict(pieces) if pieces else np.zeros(0)
        owner_a, weight_a = np.array(owner, dtype=np.int64), np.array(weight, dtype=np.float64)
        return np.bincount(owner_a, s * weight_a, len(texts)) / np.maximum(np.bincount(owner_a, weight_a, len(texts)),
                                                                           1e-12)


def _features(hasher, texts: list[str]):
    x = hasher.features(texts)
    x.data = np.log1p(x.data)
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    inv = 1.0 / np.maximum(norms, 1e-12)
    return x.multiply(inv[:, None]).tocsr()


# --- the step -----------------------------------------------------------------------------

class RateConfig(OneLineErrors, RateSettings):
    """QuRating settings (:class:`hone.recipe.RateSettings`, the fields of the ``rate`` step); the
    criterion must be a named one or a question."""

    @model_validator(mode="after")
    def _criterion(self) -> "RateConfig":
        question(self.criterion)
        return self


def rate_docs(docs: list[dict], judge: Judge, cfg: RateConfig = RateConfig(),
              log: Callable[[str], None] | None = None) -> tuple[list, dict]:
    """Judge pairs, fit Bradley–Terry and the rater; every doc kept with ``cfg.column`` set."""
    rng, q = np.random.default_rng(cfg.seed), question(cfg.criterion)
    texts = [d["text"] for d in docs]
    excerpts = [" ".join(t.split()[:cfg.chunk_words]) for t in texts]  # what the rater learns from
    n_rated = min(len(docs), max(8, cfg.pairs // 2))  # about four comparisons per rated doc
    rated = rng.choice(len(docs), n_rated, replace=False)
    n_held = max(2, int(round(n_rated * cfg.heldout)))
    groups = {"train": rated[n_held:], "heldout": rated[:n_held]}
    pairs_of = {"heldout": max(1, int(round(cfg.pairs * cfg.heldout)))}
    pairs_of["train"] = cfg.pairs - pairs_of["heldout"]
    res: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    for name, idx in groups.items():
        local = sample_pairs(len(idx), pairs_of[name], rng)
        if log:
            log(f"rate: judging {len(local)} {name} pairs in both orders with {judge.name}")
        pairs = idx[local] if len(local) else np.zeros((0, 2), np.int64)
        p = judge_both_orders(judge, excerpts, pairs, q)
        keep = confident(p, cfg.margin)
        res[name] = (pairs[keep], p[keep], len(pairs))
    tr_pairs, tr_p, tr_n = res["train"]
    if len(tr_pairs) < 2:
        raise HoneError(f"rate: only {len(tr_pairs)} of {tr_n} training pairs were confident (p <= {cfg.margin} or "
                        f">= {1 - cfg.margin}) with {judge.name} on {cfg.criterion!r}: use more --pairs, a stronger "
                        f"judge or another criterion")
    in_train = np.unique(tr_pairs)
    pos = {int(i): k for k, i in enumerate(in_train)}
    local_pairs = np.vectorize(pos.get)(tr_pairs) if len(tr_pairs) else tr_pairs
    bt = fit_bradley_terry(len(in_train), local_pairs, tr_p)
    rater = NgramRater(alpha=cfg.ridge_alpha).fit([excerpts[i] for i in in_train], bt)
    scores = rater.score_docs(texts, cfg.chunk_words)
    for d, s in zip(docs, scores):
        d[cfg.column] = float(s)
    ho_pairs, ho_p, ho_n = res["heldout"]
    ex_scores = rater.predict(excerpts)
    info = {"judge": judge.name, "criterion": cfg.criterion, "question": q, "rated_docs": int(n_rated),
            "pairs_judged": {"train": tr_n, "heldout": ho_n},
            "pairs_confident": {"train": int(len(tr_pairs)), "heldout": int(len(ho_pairs))},
            "bt_train_accuracy": pairwise_accuracy(np.bincount(in_train, bt, len(docs)), tr_pairs, tr_p),
            "rater_train_accuracy": pairwise_accuracy(ex_scores, tr_pairs, tr_p),
            "rater_heldout_accuracy": pairwise_accuracy(ex_scores, ho_pairs, ho_p),
            "score": {"mean": float(scores.mean()), "std": float(scores.std())}}
    return [None] * len(docs), info


def rate_step(inputs: list, out_dir: Path, *, text_field: str = "text", executor=None, judge_obj: Judge | None = None,
              log: Callable[[str], None] | None = None, **params) -> dict:
    """The ``rate`` step of ``hone data build``: adds the ``quality`` column, drops nothing."""
    cfg = RateConfig(**params)

    def decide(docs: list[dict]):
        judge = judge_obj or make_judge(cfg.judge, excerpt_tokens=cfg.excerpt_tokens, batch_size=cfg.batch_size,
                                        model=cfg.judge_model, api_key_env=cfg.api_key_env)
        return rate_docs(docs, judge, cfg, log)

    config = cfg.model_dump()
    if judge_obj is not None:
        config["judge"] = judge_obj.name
    return whole_pool_step("rate", inputs, out_dir, text_field, config, decide)
