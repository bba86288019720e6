"""Deterministic mixture loader over memory-mapped token streams.

One stream per domain walks its EOS-separated token array in order, one window of
``seq_len + 1`` tokens at a time (inputs and shifted targets), wrapping around at the end.
Each step's batch takes its domain sequences by an exact quota, not by coin flips:
after ``k`` steps the domain has supplied ``floor(k * batch * ratio)`` sequences, so the
realized mixture equals the recipe's ratio at every point of the run. The whole state is
a few integers, saved in every checkpoint, so a resumed run sees the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from hone.errors import HoneError


@dataclass
class TokenStream:
    tokens: np.ndarray
    seq_len: int
    pos: int = 0
    epoch: int = 0

    def __post_init__(self) -> None:
        if len(self.tokens) < self.seq_len + 1:
            raise HoneError(
                f"a token stream has {len(self.tokens)} tokens, fewer than one sequence of "
                f"{self.seq_len + 1}: lower train.seq_len or add data")

    def next_window(self) -> np.ndarray:
        if self.pos + self.seq_len + 1 > len(self.tokens):
            self.pos, self.epoch = 0, self.epoch + 1
        window = np.asarray(self.tokens[self.pos:self.pos + self.seq_len + 1], dtype=np.int64)
        self.pos += self.seq_len
        return window


@dataclass
class MixtureLoader:
    """Batches of ``batch_size`` windows: ``ratio`` of them from ``domain``, the rest from ``general``."""

    streams: dict[str, TokenStream]
    domain: str
    general: str
    batch_size: int
    ratio: float
    step: int = 0
    served: dict[str, int] = field(default_factory=dict)

    def domain_quota(self, step: int) -> int:
        total = self.batch_size * self.ratio
        return math.floor((step + 1) * total + 1e-9) - math.floor(step * total + 1e-9)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Return (inputs [B,T], targets [B,T], the domain of each row)."""
        n_domain = self.domain_quota(self.step)
        names = [self.domain] * n_domain + [self.general] * (self.batch_size - n_domain)
        windows = [self.streams[name].next_window() for name in names]
        for name in names:
            self.served[name] = self.served.get(name, 0) + 1
        self.step += 1
        batch = torch.from_numpy(np.stack(windows))
        return batch[:, :-1], batch[:, 1:], names

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "served": dict(self.served),
            "streams": {k: {"pos": s.pos, "epoch": s.epoch} for k, s in self.streams.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.served = dict(state["served"])
        for name, s in state["streams"].items():
            self.streams[name].pos, self.streams[name].epoch = s["pos"], s["epoch"]
