"""Deterministic mixture loader over memory-mapped token streams.

One stream per domain walks its EOS-separated token array in order, one window of
``seq_len + 1`` tokens at a time (inputs and shifted targets), wrapping around at the end.
Each step's batch takes its domain sequences by an exact quota, not by coin flips:
after ``k`` steps the domain has supplied ``floor(k * batch * ratio)`` sequences, so the
realized mixture equals the recipe's ratio at every point of the run. The whole state is
a few integers, saved in every checkpoint, so a resumed run sees the same batches.

A schedule (phases of ``(start_step, ratio)``, e.g. a constant ratio then a domain
upsampling phase over the last steps) keeps the same exactness: after ``k`` steps the
domain has supplied ``floor(sum of batch * ratio(i) for i < k)`` sequences.
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
    eos_id: int | None = None  # the id that ends each document in ``tokens`` (None: not known)

    def __post_init__(self) -> None:
        if len(self.tokens) < self.seq_len + 1:
            raise HoneError(
                f"a token stream has {len(self.tokens)} tokens, fewer than one sequence of "
                f"{self.seq_len + 1}: lower train.seq_len or add data")

    def next_window(self) -> np.ndarray:
        if self.pos + self.seq_len + 1 > len(self.tokens):
            self.pos, self.epoch = 0, self.epoch + 1
        self.last = (self.epoch, self.pos)  # the window's identity, for sample accounting
        window = np.asarray(self.tokens[self.pos:self.pos + self.seq_len + 1], dtype=np.int64)
        self.pos += self.seq_len
        return window


Schedule = list[tuple[int, float]]


def schedule_phases(ratio: float, total_steps: int, upsample_fraction: float = 0.0,
                    upsample_ratio: float | None = None) -> Schedule:
    """Phases ``[(start_step, ratio), ...]``: ``ratio`` throughout, then ``upsample_ratio``
    over the last ``upsample_fraction`` of the ``total_steps`` (domain upsampling)."""
    if not 0.0 <= ratio <= 1.0:
        raise HoneError(f"domain ratio {ratio} is outside [0, 1]")
    if not upsample_fraction or upsample_ratio is None:
        return [(0, ratio)]
    if not 0.0 < upsample_fraction <= 1.0 or not 0.0 <= upsample_ratio <= 1.0:
        raise HoneError(f"upsampling: fraction {upsample_fraction} must be in (0, 1] and ratio "
                        f"{upsample_ratio} in [0, 1]")
    start = total_steps - round(upsample_fraction * total_steps)
    if start >= total_steps:  # the phase rounds to no step at all
        return [(0, ratio)]
    return [(0, ratio), (start, upsample_ratio)] if start > 0 else [(0, upsample_ratio)]


def _check_schedule(schedule: Schedule) -> Schedule:
    phases = [(int(s), float(r)) for s, r in schedule]
    if not phases or phases[0][0] != 0:
        raise HoneError(f"mixture schedule {schedule}: the first phase must start at step 0")
    if any(b[0] <= a[0] for a, b in zip(phases, phases[1:])):
        raise HoneError(f"mixture schedule {schedule}: phase start steps must increase")
    if any(not 0.0 <= r <= 1.0 for _, r in phases):
        raise HoneError(f"mixture schedule {schedule}: ratios must be in [0, 1]")
    return phases


@dataclass
class MixtureLoader:
    """Batches of ``batch_size`` windows: ``ratio`` of them from ``domain``, the rest from ``general``.

    With ``schedule`` (phases ``[(start_step, ratio), ...]``, the first at step 0) the
    domain share follows the phases instead; ``ratio`` is then the first phase's.

    ``domain`` and ``general`` may each name several streams (the user's sources of that role);
    a role's rows then go to its streams in proportion to ``weights`` (default equal), exactly:
    each row goes to the stream furthest below its share of the role's rows served so far, so
    the realized split follows the weights at every step and resumes from ``served`` alone.
    """

    streams: dict[str, TokenStream]
    domain: str | list[str]
    general: str | list[str]
    batch_size: int
    ratio: float
    step: int = 0
    served: dict[str, int] = field(default_factory=dict)
    schedule: Schedule | None = None
    weights: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.schedule is not None:
            self.schedule = _check_schedule(self.schedule)
            self.ratio = self.schedule[0][1]
        self.domain_streams = [self.domain] if isinstance(self.domain, str) else list(self.domain)
        self.general_streams = [self.general] if isinstance(self.general, str) else list(self.general)
        for name, w in (self.weights or {}).items():
            if not w > 0:
                raise HoneError(f"stream {name!r}: weight {w} must be > 0")

    def _split(self, names: list[str], n: int) -> list[str]:
        """``n`` rows among a role's streams by weight (largest deficit first, ties to the first listed)."""
        if n and not names:
            raise HoneError(f"a batch needs {n} rows from a role that has no stream (domain streams "
                            f"{self.domain_streams}, general {self.general_streams}): check the domain ratio")
        if len(names) <= 1:
            return names * n
        w = {k: (self.weights or {}).get(k, 1.0) for k in names}
        total_w = sum(w.values())
        served = {k: self.served.get(k, 0) for k in names}
        done = sum(served.values())
        out = []
        for _ in range(n):
            done += 1
            pick = max(names, key=lambda k: done * w[k] / total_w - served[k])
            served[pick] += 1
            out.append(pick)
        return out

    def _phases(self) -> Schedule:
        return self.schedule if self.schedule is not None else [(0, self.ratio)]

    def ratio_at(self, step: int) -> float:
        return next(r for s, r in reversed(self._phases()) if s <= step)

    def _domain_target(self, k: int) -> int:
        """Domain sequences the first ``k`` steps supply, in all: floor of the running sum."""
        phases = self._phases()
        done = 0.0
        for i, (start, r) in enumerate(phases):
            end = phases[i + 1][0] if i + 1 < len(phases) else None
            if end is None or k <= end:
                # One phase from step 0 reduces to floor(k * batch * ratio): the old quota.
                return math.floor(done + (k - start) * (self.batch_size * r) + 1e-9)
            done += (end - start) * (self.batch_size * r)
        raise AssertionError("unreachable")

    def domain_quota(self, step: int) -> int:
        return self._domain_target(step + 1) - self._domain_target(step)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Return (inputs [B,T], targets [B,T], the domain of each row)."""
        n_domain = self.domain_quota(self.step)
        names = (self._split(self.domain_streams, n_domain)
                 + self._split(self.general_streams, self.batch_size - n_domain))
        windows, self.last_ids = [], []
        for name in names:
            windows.append(self.streams[name].next_window())
            # "stream:epoch:position" of every row: sample accounting across restarts (hone.heal).
            self.last_ids.append("%s:%d:%d" % (name, *self.streams[name].last))
        for name in names:
            self.served[name] = self.served.get(name, 0) + 1
        self.step += 1
        batch = torch.from_numpy(np.stack(windows))
        return batch[:, :-1], batch[:, 1:], names

    @property
    def eos_id(self) -> int | None:
        """The end-of-document id every stream shares (None when one is unknown or they differ)."""
        ids = {s.eos_id for s in self.streams.values()}
        return ids.pop() if len(ids) == 1 else None

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "served": dict(self.served),
            "streams": {k: {"pos": s.pos, "epoch": s.epoch} for k, s in self.streams.items()},
            "schedule": [list(p) for p in self._phases()],
        }

    def load_state_dict(self, state: dict) -> None:
        # States saved before schedules existed have no "schedule": a constant ratio.
        saved = state.get("schedule")
        if saved is not None and [tuple(p) for p in _check_schedule(saved)] != self._phases():
            raise HoneError(f"the checkpoint's mixture schedule {saved} differs from this run's "
                            f"{[list(p) for p in self._phases()]}: train with --fresh to start over")
        self.step = state["step"]
        self.served = dict(state["served"])
        for name, s in state["streams"].items():
            self.streams[name].pos, self.streams[name].epoch = s["pos"], s["epoch"]
