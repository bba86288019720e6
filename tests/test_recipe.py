"""Every shipped recipe parses; bad fields give one-line errors naming the field."""

import pytest

from hone.errors import HoneError
from hone.recipe import RECIPES_DIR, describe_fields, load_recipe, shipped_recipe


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_recipes_parse(path):
    recipe = load_recipe(path)
    assert recipe.curate.domain.keywords or recipe.curate.domain.examples


def test_demo_and_tiny_are_shipped():
    assert shipped_recipe("demo-biomed").exists()
    assert shipped_recipe("tiny-cpu").exists()
    with pytest.raises(HoneError, match="no shipped recipe named 'nope'"):
        shipped_recipe("nope")


def test_demo_trains_on_its_fitted_mixture():
    """The demo's ratio is the one the laws chose on its SmolLM2 sweep; refitting the shipped
    points gives the same choice, and the file ships with the package."""
    import tomllib
    from pathlib import Path

    from hone.mix.laws import fit_mixture
    from hone.train.mixture import load_mixture

    recipe = load_recipe(shipped_recipe("demo-biomed"))
    assert Path(recipe.train.mixture).parent == RECIPES_DIR
    mixture = load_mixture(Path(recipe.train.mixture))
    refit = fit_mixture(mixture["points"], law="both", tolerance=mixture["tolerance"],
                        target_tokens=mixture["target_tokens"], source="test")
    assert mixture["schedule"]["ratio"] == refit["chosen"]["ratio"] == mixture["chosen"]["ratio"]
    pyproject = tomllib.loads((RECIPES_DIR.parents[2] / "pyproject.toml").read_text())
    assert "recipes/*.json" in pyproject["tool"]["setuptools"]["package-data"]["hone"]


def _write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


BASE = """
[data.packaged]
wikipedia = 10
[curate.domain]
keywords = ["gene"]
"""


@pytest.mark.parametrize("extra, message", [
    ("[train]\nlr = -1\n", "train.lr: Input should be greater than 0 (got -1)"),
    ("[train]\nlrr = 1\n", "train.lrr: unknown field"),
    ("[train]\ndomain_ratio = 1.5\n", "train.domain_ratio: Input should be less than or equal to 1 (got 1.5)"),
    ("[model]\nsource = \"hf\"\n", "model: model.path is required when model.source = 'hf'"),
    ("[model]\nsource = \"bert\"\n", "model.source: Input should be"),
    ("[model.random]\nhidden = 30\nheads = 4\n", "hidden (30) must be divisible by heads (4)"),
])
def test_bad_field_names_it(tmp_path, extra, message):
    with pytest.raises(HoneError) as e:
        load_recipe(_write(tmp_path, BASE + extra))
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith(str(tmp_path / "r.toml"))
    assert message in text


def test_missing_required_section(tmp_path):
    with pytest.raises(HoneError, match=r"r.toml: curate.domain: required with data.packaged or data.inputs"):
        load_recipe(_write(tmp_path, "[data.packaged]\nwikipedia = 1\n"))
    with pytest.raises(HoneError, match=r"r.toml: data: give data.sources, data.packaged or data.inputs"):
        load_recipe(_write(tmp_path, "[data]\ntext_field = 'x'\n"))


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(HoneError, match="invalid TOML"):
        load_recipe(_write(tmp_path, "[train\n"))
    with pytest.raises(HoneError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.toml")


def test_overrides_apply_and_validate(tmp_path):
    r = load_recipe(_write(tmp_path, BASE), {"train.lr": 0.5})
    assert r.train.lr == 0.5
    with pytest.raises(HoneError, match="train.seq_len"):
        load_recipe(_write(tmp_path, BASE), {"train.seq_len": 1})


def test_every_field_is_documented():
    lines = describe_fields()
    fields = [l for l in lines if not l.startswith("[")]
    assert len(fields) > 30
    assert all(l.split("# ", 1)[1].strip() for l in fields), [l for l in fields if not l.split("# ", 1)[1].strip()]
