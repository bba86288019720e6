"""Mixture loader: exact ratio, deterministic, state round-trips."""

import json
import math

import numpy as np
import pytest

from hone.errors import HoneError
from hone.tokens import load_tokens
from hone.train.data import MixtureLoader, TokenStream


def make_loader(token_dirs, ratio=0.75, batch=4, seq=16):
    streams = {n: TokenStream(load_tokens(d), seq) for n, d in token_dirs.items()}
    return MixtureLoader(streams, domain="biomedical", general="general", batch_size=batch, ratio=ratio)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75, 1.0])
def test_realized_ratio_is_exact(token_dirs, ratio):
    loader = make_loader(token_dirs, ratio=ratio, batch=4)
    for step in range(1, 41):
        _, _, names = loader.next_batch()
        served = loader.served.get("biomedical", 0)
        assert served == int(np.floor(step * 4 * ratio + 1e-9))


def test_targets_are_inputs_shifted(token_dirs):
    inputs, targets, names = make_loader(token_dirs).next_batch()
    assert inputs.shape == targets.shape == (4, 16)
    assert (inputs[:, 1:] == targets[:, :-1]).all()
    # Domain rows come from the domain's token range (1..127), general rows from 128..255.
    for row, name in zip(inputs, names):
        nz = row[row != 0]
        assert ((nz < 128) if name == "biomedical" else (nz >= 128)).all()


def test_state_round_trip_gives_same_batches(token_dirs):
    a = make_loader(token_dirs)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(400)]  # crosses the end of the streams: wraps
    b = make_loader(token_dirs)
    b.load_state_dict(state)
    for (xi, yi, ni), (xj, yj, nj) in zip(expected, (b.next_batch() for _ in range(400))):
        assert ni == nj and (xi == xj).all() and (yi == yj).all()
    assert a.streams["general"].epoch >= 1


def test_stream_shorter_than_one_sequence(token_dirs):
    with pytest.raises(HoneError, match="fewer than one sequence"):
        TokenStream(np.zeros(10, dtype=np.uint16), 16)


def test_constant_quota_is_the_old_formula():
    from hone.train.data import MixtureLoader

    for batch, ratio in [(4, 0.3), (8, 0.7), (7, 1 / 3), (16, 0.55)]:
        loader = MixtureLoader({}, domain="d", general="g", batch_size=batch, ratio=ratio)
        total = batch * ratio
        for step in range(500):
            old = math.floor((step + 1) * total + 1e-9) - math.floor(step * total + 1e-9)
            assert loader.domain_quota(step) == old


@pytest.mark.parametrize("batch,ratio,up,frac,total", [(4, 0.3, 0.9, 0.2, 50), (8, 0.5, 1.0, 0.1, 33),
                                                        (7, 1 / 3, 0.8, 0.25, 40), (4, 0.0, 0.5, 1.0, 10)])
def test_upsampling_schedule_quotas_are_exact(batch, ratio, up, frac, total):
    from hone.train.data import MixtureLoader, schedule_phases

    phases = schedule_phases(ratio, total, frac, up)
    start = total - round(frac * total)
    assert phases == ([(0, ratio), (start, up)] if start else [(0, up)])
    loader = MixtureLoader({}, domain="d", general="g", batch_size=batch, ratio=0.123, schedule=phases)
    served = 0
    for k in range(total):
        served += loader.domain_quota(k)
        expected = batch * (ratio * min(k + 1, start) + up * max(0, k + 1 - start))
        assert served == math.floor(expected + 1e-9), k
        assert loader.ratio_at(k) == (ratio if k < start else up)


def test_schedule_is_followed_and_resume_equal(token_dirs):
    from hone.train.data import schedule_phases

    phases = schedule_phases(0.25, 40, 0.25, 1.0)  # last 10 of 40 steps all domain
    streams = lambda: {n: TokenStream(load_tokens(d), 16) for n, d in token_dirs.items()}  # noqa: E731
    a = MixtureLoader(streams(), domain="biomedical", general="general", batch_size=4, ratio=0.25, schedule=phases)
    names = [a.next_batch()[2] for _ in range(17)]
    assert all(n.count("biomedical") == 1 for n in names)
    state = a.state_dict()
    assert state["schedule"] == [[0, 0.25], [30, 1.0]]
    rest = [a.next_batch() for _ in range(23)]
    assert [r[2].count("biomedical") for r in rest] == [1] * 13 + [4] * 10
    b = MixtureLoader(streams(), domain="biomedical", general="general", batch_size=4, ratio=0.25, schedule=phases)
    b.load_state_dict(json.loads(json.dumps(state)))  # checkpoints store it as JSON
    for (x1, y1, n1), (x2, y2, n2) in zip(rest, (b.next_batch() for _ in range(23))):
        assert n1 == n2 and (x1 == x2).all() and (y1 == y2).all()


def test_old_states_load_and_mismatched_schedules_are_refused(token_dirs):
    a = make_loader(token_dirs, ratio=0.5)
    for _ in range(3):
        a.next_batch()
    old = a.state_dict()
    del old["schedule"]  # a checkpoint written before schedules existed
    b = make_loader(token_dirs, ratio=0.5)
    b.load_state_dict(old)
    assert b.step == 3 and b.next_batch()[2] == a.next_batch()[2]
    c = make_loader(token_dirs, ratio=0.75)
    with pytest.raises(HoneError, match="mixture schedule"):
        c.load_state_dict(a.state_dict())


def test_bad_schedules():
    from hone.train.data import schedule_phases

    with pytest.raises(HoneError, match="first phase"):
        MixtureLoader({}, domain="d", general="g", batch_size=4, ratio=0.5, schedule=[(3, 0.5)])
    with pytest.raises(HoneError, match="ratios must be in"):
        MixtureLoader({}, domain="d", general="g", batch_size=4, ratio=0.5, schedule=[(0, 0.5), (5, 1.5)])
    with pytest.raises(HoneError, match="outside"):
        schedule_phases(1.2, 10)
