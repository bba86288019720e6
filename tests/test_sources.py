"""Data sources: the recipe's [[data.sources]], the weighted mixture over them, held-out sets."""

import json

import numpy as np
import pytest

from hone.errors import HoneError
from hone.recipe import domain_ratio, parse_recipe, training_streams
from hone.train.data import MixtureLoader, TokenStream


def stream(value: int, n: int = 4000, seq: int = 8) -> TokenStream:
    return TokenStream(np.full(n, value, dtype=np.uint16), seq)


def test_weighted_sources_split_each_role_exactly_at_every_step():
    weights = {"a": 1.0, "b": 2.0, "c": 1.0, "g1": 3.0, "g2": 1.0}
    streams = {k: stream(i) for i, k in enumerate(weights)}
    loader = MixtureLoader(streams, domain=["a", "b", "c"], general=["g1", "g2"], batch_size=8, ratio=0.5,
                           weights=weights)
    for step in range(1, 101):
        _, _, names = loader.next_batch()
        assert names[:4] == [n for n in names if n in ("a", "b", "c")]  # domain rows first, as before
        role_rows = step * 4  # ratio 0.5 of 8 rows per step for each role
        for role in (["a", "b", "c"], ["g1", "g2"]):
            total = sum(weights[k] for k in role)
            for k in role:
                assert abs(loader.served.get(k, 0) - role_rows * weights[k] / total) <= 1, (step, k, loader.served)


def test_weighted_loader_resumes_from_its_state():
    weights = {"a": 1.0, "b": 3.0, "g": 1.0}

    def make():
        return MixtureLoader({k: stream(i) for i, k in enumerate(weights)}, domain=["a", "b"], general="g",
                             batch_size=5, ratio=0.6, weights=weights)

    a = make()
    for _ in range(13):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_batch()[2] for _ in range(30)]
    b = make()
    b.load_state_dict(state)
    assert [b.next_batch()[2] for _ in range(30)] == expected


def test_one_stream_per_role_is_unchanged():
    old = MixtureLoader({"d": stream(1), "g": stream(2)}, domain="d", general="g", batch_size=7, ratio=0.3)
    new = MixtureLoader({"d": stream(1), "g": stream(2)}, domain=["d"], general=["g"], batch_size=7, ratio=0.3,
                        weights={"d": 5.0, "g": 0.1})
    for _ in range(20):
        assert old.next_batch()[2] == new.next_batch()[2]


def test_a_role_without_streams_is_a_clear_error():
    loader = MixtureLoader({"d": stream(1)}, domain="d", general=[], batch_size=4, ratio=0.5)
    with pytest.raises(HoneError, match="role that has no stream"):
        loader.next_batch()


def recipe(sources, **extra):
    return parse_recipe({"data": {"sources": sources}, **extra})


def test_sources_without_a_pool_need_no_curate_section():
    r = recipe([{"name": "kernel", "inputs": ["docs/"], "heldout": 30},
                {"name": "web", "inputs": ["web.parquet"], "role": "general", "weight": 3}])
    assert [(s.name, s.role, s.weight) for s in training_streams(r)] == [("kernel", "domain", 1.0),
                                                                         ("web", "general", 3.0)]
    assert domain_ratio(r) == pytest.approx(0.25)  # the weights decide the split between roles
    r = recipe([{"name": "kernel", "inputs": ["docs/"]}, {"name": "web", "inputs": ["w"], "role": "general"}],
               train={"domain_ratio": 0.8})
    assert domain_ratio(r) == 0.8
    assert domain_ratio(recipe([{"name": "kernel", "inputs": ["docs/"]}])) == 1.0  # nothing to replay


@pytest.mark.parametrize("sources,extra,message", [
    ([{"name": "a", "inputs": ["x"]}, {"name": "a", "inputs": ["y"]}], {}, "the name 'a' appears twice"),
    ([{"name": "a", "inputs": ["x"], "heldout": 1.5}], {}, "whole number of documents or a fraction"),
    ([{"name": "a", "inputs": []}], {}, "data.sources.0.inputs"),
    ([{"name": "a", "inputs": ["x"], "weight": 0}], {}, "data.sources.0.weight"),
    ([{"name": "bad name", "inputs": ["x"]}], {}, "data.sources.0.name"),
    ([], {"data": {"packaged": {}}}, "curate.domain: required with data.packaged"),
])
def test_bad_sources_are_one_line_errors(sources, extra, message):
    data = {"data": {"sources": sources}} if sources else {}
    data.update(extra)
    with pytest.raises(HoneError, match=message) as e:
        parse_recipe(data, "r.toml")
    assert "\n" not in str(e.value)


def test_pool_and_sources_together():
    r = parse_recipe({"data": {"packaged": {}, "sources": [{"name": "kernel", "inputs": ["d"]}]},
                      "curate": {"domain": {"name": "bio", "keywords": ["gene"]}}})
    assert [s.name for s in training_streams(r)] == ["bio", "general", "kernel"]
    assert training_streams(r)[0].from_pool and not training_streams(r)[2].from_pool
    with pytest.raises(HoneError, match="pool's replay stream"):
        parse_recipe({"data": {"packaged": {}, "sources": [{"name": "general", "inputs": ["d"]}]},
                      "curate": {"domain": {"name": "bio", "keywords": ["gene"]}}})
