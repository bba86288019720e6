"""An ensemble of domain experts as one language model (Branch-Train-Merge inference).

The next-token distribution mixes the experts' by their domain posterior given the context:

    p(x_t | x<t) = Σ_e P(e | x<t) p_e(x_t | x<t),   P(e | x<t) ∝ prior_e Π_{s<t} p_e(x_s | x<s)

so an expert that predicted the context well takes over. Scored over a whole document, this
is Bayesian model averaging: the document's loss is at most the best expert's plus
log(1 / prior_best), whichever domain the document comes from. Two knobs from the BTM
paper's practice: ``prefix_cap`` counts only the last N context tokens (the posterior can
follow a change of domain inside a long context), and ``smoothing`` mixes the prior back in
(no expert's weight ever falls below ``smoothing * prior``).

``forward(input_ids)`` returns log-probabilities ``[B, T, V]``, which are valid logits, so
the evaluator and any sampler treat the ensemble like a single model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from hone.errors import HoneError
from hone.evaluate import cap_docs, encode_docs
from hone.experts.merge import ENSEMBLE_FILE, ENSEMBLE_FORMAT, is_ensemble, normalize_weights
from hone.model.hf import load_hf
from hone.rundir import read_json
from hone.tokens.conventions import TokenConventions


class EnsembleLM(nn.Module):
    def __init__(self, experts: list[nn.Module], prior: list[float], *, names: list[str] | None = None,
                 prefix_cap: int | None = None, smoothing: float = 0.0) -> None:
        super().__init__()
        if not experts:
            raise HoneError("an ensemble needs at least one expert")
        self.experts = nn.ModuleList(experts)
        self.names = names or [f"expert{i}" for i in range(len(experts))]
        self.register_buffer("log_prior", torch.tensor(normalize_weights(prior, len(experts), "prior")).log(),
                             persistent=False)
        self.prefix_cap = prefix_cap
        self.smoothing = smoothing
        self.config = getattr(experts[0], "config", None)

    def expert_log_probs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Each expert's next-token log-probabilities, ``[E, B, T, V]`` (float32)."""
        return torch.stack([torch.log_softmax(e(input_ids).float(), dim=-1) for e in self.experts])

    def log_posterior(self, input_ids: torch.Tensor, log_probs: torch.Tensor | None = None) -> torch.Tensor:
        """log P(e | x_0..x_t) for every position t, ``[E, B, T]``: the weights that mix the
        experts' predictions of x_{t+1}. Position t has seen the tokens x_1..x_t scored."""
        lp = self.expert_log_probs(input_ids) if log_probs is None else log_probs
        # Likelihood of each context token x_{s+1} (s < T-1) under each expert; x_0 is never scored.
        seen = lp[:, :, :-1].gather(-1, input_ids[:, 1:].unsqueeze(0).expand(lp.shape[0], -1, -1).unsqueeze(-1))
        seen = seen.squeeze(-1).double()  # [E, B, T-1]; sums over long contexts need the range
        cum = torch.cat([torch.zeros_like(seen[:, :, :1]), seen.cumsum(dim=2)], dim=2)  # [E, B, T]
        if self.prefix_cap is not None and self.prefix_cap < cum.shape[2]:
            cap = self.prefix_cap
            # Only the last `cap` scored tokens: subtract the running sum from `cap` positions back.
            cum = cum - torch.cat([torch.zeros_like(cum[:, :, :cap]), cum[:, :, :-cap]], dim=2)
        log_w = torch.log_softmax(cum + self.log_prior.double()[:, None, None], dim=0)
        if self.smoothing > 0:
            mixed = (1 - self.smoothing) * log_w.exp() + self.smoothing * self.log_prior.double().exp()[:, None, None]
            log_w = mixed.log()
        return log_w.float()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        lp = self.expert_log_probs(input_ids)
        log_w = self.log_posterior(input_ids, lp)
        return torch.logsumexp(lp + log_w.unsqueeze(-1), dim=0)


@torch.no_grad()
def cached_prior(model: EnsembleLM, tokenizer, texts: list[str], max_tokens: int = 4000,
                 seq_len: int = 512, conventions: TokenConventions | None = None, seed: int = 0) -> list[float]:
    """BTM's "cached prior": the experts' posterior at the end of each document of a sample of
    the data the ensemble will see (documents in a seeded order up to ``max_tokens``, each read
    to at most ``seq_len`` tokens after the model's document context), averaged over the
    documents. A skewed test mixture then starts every document with its skew instead of a
    uniform prior."""
    context = (conventions or TokenConventions.detect(tokenizer)).context()
    docs = [d for d in cap_docs(encode_docs(texts, tokenizer), max_tokens, seed) if d]
    if not docs:
        raise HoneError("--prior-data: no text to estimate the prior from")
    uniform = EnsembleLM(list(model.experts), [1.0] * len(model.experts), prefix_cap=model.prefix_cap)
    total = torch.zeros(len(model.experts), dtype=torch.float64)
    for ids in docs:
        x = torch.tensor([(context + ids)[:seq_len]], device=next(model.parameters()).device)
        total += uniform.log_posterior(x)[:, 0, -1].double().exp().cpu()
    return (total / len(docs)).tolist()


def load_ensemble(path: Path, dtype: torch.dtype | None = None):
    """(EnsembleLM, tokenizer) from a directory written by ``hone merge --method ensemble``."""

    path = Path(path)
    manifest = read_json(path / ENSEMBLE_FILE)
    if manifest.get("format") != ENSEMBLE_FORMAT:
        raise HoneError(f"{path / ENSEMBLE_FILE}: format is {manifest.get('format')!r}, expected {ENSEMBLE_FORMAT!r}")
    experts, names, prior = [], [], []
    for i, e in enumerate(manifest.get("experts") or []):
        try:
            where = (path / e["path"]).resolve()
            names.append(str(e.get("name", where.name)))
            prior.append(float(e.get("prior", 1.0)))
        except (KeyError, TypeError, ValueError):
            raise HoneError(f"{path / ENSEMBLE_FILE}: experts.{i}: needs a path and a numeric prior") from None
        if not where.is_dir():
            raise HoneError(f"{path / ENSEMBLE_FILE}: experts.{i}: {where}: expert directory not found")
        model, _ = load_hf(where, dtype)
        experts.append(model)
    if not experts:
        raise HoneError(f"{path / ENSEMBLE_FILE}: no experts listed")
    tok_path = path / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_path)) if tok_path.is_file() else None
    cap = manifest.get("prefix_cap")
    model = EnsembleLM(experts, prior, names=names, prefix_cap=int(cap) if cap else None,
                       smoothing=float(manifest.get("smoothing") or 0.0))
    return model, tok


def load_model(path: Path, dtype: torch.dtype | None = None):
    """(model, tokenizer) from an HF directory or an ensemble directory."""
    return load_ensemble(path, dtype) if is_ensemble(Path(path)) else load_hf(Path(path), dtype)

