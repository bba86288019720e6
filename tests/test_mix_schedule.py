"""The mixture schedule from recipe to loader: train.mixture, train.upsample_*, the hash
that decides whether training starts over, and mixture files with bad content."""

import json

import pytest

from hone.errors import HoneError
from hone.recipe import load_recipe, shipped_recipe
from hone.train.mixture import load_mixture, make_schedule


def tiny(**overrides):
    return load_recipe(shipped_recipe("tiny-cpu"), overrides)


def write_mixture(path, schedule):
    path.write_text(json.dumps({"version": 1, "schedule": schedule}))
    return str(path)


def test_phases_from_the_recipe_and_the_mixture_file(tmp_path):
    from hone.train.run import mixture_phases, total_steps

    n = total_steps(tiny().train)  # 60 steps
    assert mixture_phases(tiny()) == [(0, 0.5)]
    assert mixture_phases(tiny(**{"train.upsample_fraction": 0.2})) == [(0, 0.5), (n - 12, 1.0)]
    path = write_mixture(tmp_path / "m.json", make_schedule(0.3, 0.1, 0.9))
    assert mixture_phases(tiny(**{"train.mixture": path})) == [(0, 0.3), (n - 6, 0.9)]
    # The recipe's upsampling overrides the file's.
    assert mixture_phases(tiny(**{"train.mixture": path, "train.upsample_fraction": 0.5,
                                  "train.upsample_ratio": 0.6})) == [(0, 0.3), (n - 30, 0.6)]


def test_relative_mixture_path_is_read_beside_the_recipe(tmp_path, monkeypatch):
    from hone.train.run import mixture_phases

    (tmp_path / "recipes").mkdir()
    write_mixture(tmp_path / "recipes" / "fitted.json", make_schedule(0.4, 0.0, None))
    text = shipped_recipe("tiny-cpu").read_text().replace("[train]\n", '[train]\nmixture = "fitted.json"\n', 1)
    (tmp_path / "recipes" / "r.toml").write_text(text)
    monkeypatch.chdir(tmp_path)  # the file is not in the working directory
    recipe = load_recipe("recipes/r.toml")
    assert recipe.train.mixture == str((tmp_path / "recipes" / "fitted.json").resolve())
    assert mixture_phases(recipe) == [(0, 0.4)]


def test_loader_follows_the_mixture_file(tmp_path, token_dirs):
    from hone.train.run import build_loader

    workdir = token_dirs["general"].parents[2]
    path = write_mixture(tmp_path / "m.json", make_schedule(0.25, 0.25, 1.0))
    loader = build_loader(tiny(**{"train.mixture": path, "train.seq_len": 16, "train.max_tokens": 60 * 8 * 16}),
                          workdir)
    counts = [loader.next_batch()[2].count("biomedical") for _ in range(60)]
    assert counts == [2] * 45 + [8] * 15  # batch 8: 25% then all domain over the last quarter


def test_train_hash_keeps_old_runs_and_follows_the_file_content(tmp_path):
    import hashlib

    from hone.train.workdir import LAYOUT_FIELDS, train_hash

    r = tiny()
    # Fields added after the first runs (mixture, upsampling, nan_skip_batches) keep the old hash at their defaults.
    old = json.loads(r.train.model_dump_json(exclude=LAYOUT_FIELDS | {"mixture", "upsample_fraction", "upsample_ratio",
                                                                      "nan_skip_batches"}
                                             | {"schedule", "decay_fraction", "warmup_from", "reset_optimizer"}
                                             | {"lora", "float8"}))
    assert train_hash(r) == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    path = tmp_path / "m.json"
    write_mixture(path, make_schedule(0.3))
    first = train_hash(tiny(**{"train.mixture": str(path)}))
    write_mixture(path, make_schedule(0.4))
    assert train_hash(tiny(**{"train.mixture": str(path)})) != first != train_hash(r)


@pytest.mark.parametrize("content,match", [
    ({"schedule": {"ratio": 1.4}}, r"schedule.ratio must be a number in \[0, 1\]"),
    ({"schedule": {"ratio": 0.4, "upsample": {"fraction": 0, "ratio": 0.8}}}, r"schedule.upsample.fraction"),
    ({"laws": {}}, "not a mixture file"),
])
def test_bad_mixture_files(tmp_path, content, match):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(content))
    with pytest.raises(HoneError, match=match):
        load_mixture(path)
    with pytest.raises(HoneError, match="file not found"):
        load_mixture(tmp_path / "none.json")


def test_mix_section_is_validated_and_not_part_of_the_data_hash():
    from hone.train.workdir import recipe_hash

    with pytest.raises(HoneError, match=r"mix.ratios.1: Input should be less than or equal to 1 \(got 1.5\)"):
        tiny(**{"mix.ratios": [0.1, 1.5]})
    assert recipe_hash(tiny(**{"mix.ratios": [0.2, 0.4, 0.6, 0.8]})) == recipe_hash(tiny())
