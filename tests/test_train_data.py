"""Mixture loader: exact ratio, deterministic, state round-trips."""

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
