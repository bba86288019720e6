"""Mixture laws: recovery of known parameters from noisy synthetic points, the ratio
choice, predictions, and one-line errors for bad input through the CLI."""

import json

import numpy as np
import pytest

from hone.errors import HoneError
from hone.mix.laws import (
    dcpt_value,
    fit_dcpt,
    fit_mixture,
    fit_ratio_curve,
    fit_token_curve,
    power_curve,
    predict,
    validate_points,
)
from tiny_runs import hone_process

RATIOS = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
BUDGETS = [1e5, 2e5, 4e5, 1e6]
DCPT_G = {"E": 1.8, "A": 0.5, "alpha": 0.35, "B": 0.6, "eta": 0.8, "beta": 0.4, "C": 0.3, "gamma": 0.5,
          "epsilon": 0.05, "n0": 1e8, "d0": 1e6}
DCPT_D = {"E": 1.5, "A": 0.4, "alpha": 0.3, "B": 0.9, "eta": 0.6, "beta": 0.5, "C": 0.2, "gamma": 0.7,
          "epsilon": 0.08, "n0": 1e8, "d0": 1e6}


def test_ratio_curve_recovers_parameters():
    rng = np.random.default_rng(0)
    for a, s, b in [(-1.2, 0.5, 4.0), (0.8, 2.0, 3.1), (-0.4, 1.3, 5.5)]:
        y = power_curve(RATIOS, a, s, b) + rng.normal(0, 0.004, len(RATIOS))
        fit = fit_ratio_curve(RATIOS, y)
        assert fit["r2"] > 0.99
        assert fit["a"] == pytest.approx(a, rel=0.1) and fit["s"] == pytest.approx(s, rel=0.15)
        assert fit["b"] == pytest.approx(b, abs=0.02)
        assert len(fit["residuals"]) == len(RATIOS)


def test_token_curve_recovers_parameters():
    rng = np.random.default_rng(1)
    t = np.array([1e4, 2e4, 5e4, 1e5, 2e5, 5e5])
    y = 2.0 * (t / 5e5) ** -0.35 + 3.0 + rng.normal(0, 0.003, len(t))
    fit = fit_token_curve(t, y)
    assert fit["r2"] > 0.99
    assert fit["alpha"] == pytest.approx(2.0, rel=0.1) and fit["s"] == pytest.approx(-0.35, rel=0.1)
    assert fit["beta"] == pytest.approx(3.0, abs=0.1)


def test_robust_loss_ignores_one_bad_point():
    x = np.array(RATIOS + [0.4, 0.6])
    y = power_curve(x, -1.0, 0.6, 4.0)
    y[3] += 1.0  # one diverged proxy run
    fit = fit_ratio_curve(x, y)
    assert fit["s"] == pytest.approx(0.6, rel=0.05) and fit["b"] == pytest.approx(4.0, abs=0.02)


def _grid(sizes):
    n, d, r = (v.ravel() for v in np.meshgrid(sizes, BUDGETS, RATIOS + [0.05]))
    return n, d, r


@pytest.mark.parametrize("sizes", [[1e8], [2.5e7, 5e7, 1e8]])
def test_dcpt_recovers_parameters(sizes):
    rng = np.random.default_rng(2)
    n, d, r = _grid(sizes)
    truth = dict(DCPT_G) if len(sizes) > 1 else dict(DCPT_G, A=None, alpha=None)
    y = dcpt_value(truth, n, d, r) + rng.normal(0, 0.002, len(n))
    fit = fit_dcpt(n, d, r, y)
    assert fit["r2"] > 0.99
    for key in ("alpha", "B", "eta", "beta", "C", "gamma", "epsilon") if len(sizes) > 1 else ("B", "eta", "beta", "C",
                                                                                              "gamma", "epsilon"):
        assert fit["params"][key] == pytest.approx(truth[key], rel=0.2), key
    assert fit["params"]["E"] == pytest.approx(truth["E"], abs=0.1)
    assert (fit["params"]["A"] is None) == (len(sizes) == 1)


def dcpt_points(sizes=(1e8,), noise=0.002, seed=3):
    """runs.jsonl rows from the D-CPT law: general with r = 1 - R, domain with r = R."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        g = dict(DCPT_G) if len(sizes) > 1 else dict(DCPT_G, A=None)
        dd = dict(DCPT_D) if len(sizes) > 1 else dict(DCPT_D, A=None)
        for t in BUDGETS:
            for ratio in RATIOS:
                rows.append({"model_params": n, "ratio": ratio, "tokens": t,
                             "general_loss": float(dcpt_value(g, n, t, 1 - ratio) + rng.normal(0, noise)),
                             "domain_loss": float(dcpt_value(dd, n, t, ratio) + rng.normal(0, noise))})
    return rows


def cmr_truth(ratio, tokens):
    """A CMR-law world: at each budget L(R) = a·R^s + b; b falls with tokens as a power law."""
    x = np.asarray(tokens, float) / 1e6
    general = 0.3 * np.power(ratio, 1.5) + 3.0 + 1.0 * x ** -0.3
    domain = -0.8 * np.power(ratio, 0.5) + 3.5 + 1.2 * x ** -0.3
    return {"general_loss": general, "domain_loss": domain}


def cmr_points(noise=0.003, seed=4, before=4.05):
    rng = np.random.default_rng(seed)
    rows = [{"model_params": 1e8, "ratio": r, "tokens": 0, "general_loss": before, "domain_loss": 5.0} for r in RATIOS]
    for t in BUDGETS:
        truth = cmr_truth(np.array(RATIOS), t)
        for i, r in enumerate(RATIOS):
            rows.append({"model_params": 1e8, "ratio": r, "tokens": t,
                         **{k: float(truth[k][i] + rng.normal(0, noise)) for k in truth}})
    return rows


def test_cmr_recovers_parameters_and_the_critical_ratio():
    m = fit_mixture(cmr_points(), law="cmr", tolerance=0.05)
    cmr = m["laws"]["cmr"]
    assert [s["tokens"] for s in cmr["by_tokens"]] == BUDGETS
    for s in cmr["by_tokens"]:
        g, d = s["general_loss"], s["domain_loss"]
        assert g["r2"] > 0.99 and d["r2"] > 0.99
        assert g["a"] == pytest.approx(0.3, rel=0.15) and g["s"] == pytest.approx(1.5, rel=0.2)
        assert d["a"] == pytest.approx(-0.8, rel=0.1) and d["s"] == pytest.approx(0.5, rel=0.1)
        assert g["b"] == pytest.approx(3.0 + (s["tokens"] / 1e6) ** -0.3, abs=0.01)
    # General loss 4.0 + 0.3·R^1.5 at 1e6 tokens, before 4.05: R* = (0.1 / 0.3)^(2/3) = 0.481.
    assert m["chosen"]["ratio"] == pytest.approx((0.1 / 0.3) ** (2 / 3), abs=0.03)
    assert m["chosen"]["feasible"] and m["target_tokens"] == 1e6 and m["loss_before"]["general_loss"] == 4.05
    crit = cmr["critical_ratio_by_tokens"]
    assert len(crit["points"]) == len(BUDGETS) and "fit" in crit
    # Between budgets, the per-ratio power law in tokens predicts the truth.
    got = predict(m, 0.3, 6e5)
    truth = cmr_truth(0.3, 6e5)
    assert got["general_loss"] == pytest.approx(float(truth["general_loss"]), abs=0.01)
    assert got["domain_loss"] == pytest.approx(float(truth["domain_loss"]), abs=0.01)


def test_dcpt_choice_matches_the_generating_law():
    from hone.mix.laws import choose_ratio

    rows = dcpt_points()
    before = 2.6
    rows += [{"model_params": 1e8, "ratio": r, "tokens": 0, "general_loss": before,
              "domain_loss": None} for r in RATIOS]
    m = fit_mixture(rows, law="dcpt", tolerance=0.05)
    assert m["laws"]["dcpt"]["general_loss"]["r2"] > 0.99 and m["laws"]["dcpt"]["domain_loss"]["r2"] > 0.99
    g, d = dict(DCPT_G, A=None), dict(DCPT_D, A=None)
    truth = choose_ratio(lambda r,
                         t: {"general_loss": dcpt_value(g, 1e8, t, 1 - r), "domain_loss": dcpt_value(d, 1e8, t, r)},
                         1e6, 0.05, before)
    assert m["chosen"]["law"] == "dcpt"
    assert m["chosen"]["ratio"] == pytest.approx(truth["ratio"], abs=0.03)


def test_predict_matches_the_law_and_several_sizes_use_dcpt():
    rows = dcpt_points(sizes=(2.5e7, 5e7, 1e8))
    m = fit_mixture(rows, law="dcpt")
    for ratio, tokens, n in [(0.3, 4e5, 5e7), (0.7, 1e6, 2.5e7)]:
        got = predict(m, ratio, tokens, n)
        assert got["general_loss"] == pytest.approx(float(dcpt_value(DCPT_G, n, tokens, 1 - ratio)), abs=0.01)
        assert got["domain_loss"] == pytest.approx(float(dcpt_value(DCPT_D, n, tokens, ratio)), abs=0.01)
    with pytest.raises(HoneError, match="no fitted 'cmr' law"):
        predict(m, 0.5, law="cmr")


def test_nulls_are_allowed_each_fit_uses_its_points():
    rows = cmr_points()
    for row in rows[::5]:
        row["general_loss"] = None
    m = fit_mixture(rows, law="cmr")
    assert m["laws"]["cmr"]["by_tokens"][0]["general_loss"]["n"] < m["laws"]["cmr"]["by_tokens"][0]["domain_loss"]["n"]


@pytest.mark.parametrize("row,match", [
    ({"ratio": 1.5, "tokens": 10, "general_loss": 1.0, "domain_loss": 1.0}, r"runs:1: ratio 1.5 is outside \[0, 1\]"),
    ({"ratio": 0.5, "tokens": 10, "general_loss": float("nan"), "domain_loss": 1.0},
     "general_loss must be a finite number"),
    ({"ratio": 0.5, "tokens": -1, "general_loss": 1.0, "domain_loss": 1.0}, "tokens -1 is negative"),
    ({"ratio": "a", "tokens": 1}, "ratio must be a finite number"),
])
def test_bad_points(row, match):
    with pytest.raises(HoneError, match=match):
        validate_points([row])


def test_too_few_points():
    rows = [{"model_params": 1, "ratio": r, "tokens": 100, "general_loss": 2.0, "domain_loss": 2.0} for r in (0.1, 0.5,
                                                                                                              0.9)]
    with pytest.raises(HoneError,
                       match="too few points to fit the CMR law for general_loss: need >= 4 distinct ratios"):
        fit_mixture(rows, law="cmr")
    with pytest.raises(HoneError, match="too few points to fit the D-CPT law"):
        fit_mixture(rows, law="dcpt")


# ---------------------------------------------------------------- CLI

def hone(*args):
    return hone_process("mix", *args, check=False)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_fit_predict_round_trip(tmp_path):
    runs = _write(tmp_path / "runs.jsonl", dcpt_points())
    out = tmp_path / "mixture.json"
    r = hone("fit", str(runs), "-o", str(out), "--law", "both", "--tolerance", "0.05", "--upsample-fraction", "0.1")
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    assert m["schedule"]["ratio"] == m["chosen"]["ratio"]
    assert m["schedule"]["upsample"] == {"fraction": 0.1, "ratio": min(1.0, 2 * m["chosen"]["ratio"])}
    assert "chosen ratio" in r.stdout
    r = hone("predict", str(out), "--ratio", str(m["chosen"]["ratio"]))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["general_loss"] == pytest.approx(m["chosen"]["general_loss"], abs=1e-6)
    assert got["domain_loss"] == pytest.approx(m["chosen"]["domain_loss"], abs=1e-6)
    from hone.train.mixture import load_mixture

    assert load_mixture(out)["schedule"]["ratio"] == m["chosen"]["ratio"]


@pytest.mark.parametrize("rows,match", [
    ([{"ratio": 0.5, "tokens": 10, "general_loss": 1.0, "domain_loss": 1.0}] * 3, "too few points"),
    ([{"ratio": 0.5, "tokens": 10, "general_loss": "NaN", "domain_loss": 1.0}], "general_loss must be a finite number"),
    ([{"ratio": -0.2, "tokens": 10, "general_loss": 1.0, "domain_loss": 1.0}], r"ratio -0.2 is outside \[0, 1\]"),
])
def test_cli_bad_runs_one_line_exit_2(tmp_path, rows, match):
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r).replace('"NaN"', "NaN") + "\n" for r in rows))
    r = hone("fit", str(runs), "-o", str(tmp_path / "m.json"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(runs) in lines[0], r.stderr
    assert __import__("re").search(match, lines[0])
    assert "Traceback" not in r.stderr + r.stdout


def test_cli_missing_files_and_bad_predict(tmp_path):
    r = hone("fit", str(tmp_path / "none.jsonl"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'none.jsonl'}: file not found"
    r = hone("predict", str(tmp_path / "none.json"), "--ratio", "0.5")
    assert r.returncode == 2 and "file not found" in r.stderr and "Traceback" not in r.stderr
    runs = _write(tmp_path / "runs.jsonl", cmr_points())
    assert hone("fit", str(runs), "-o", str(tmp_path / "m.json"), "--law", "cmr").returncode == 0
    r = hone("predict", str(tmp_path / "m.json"), "--ratio", "1.5")
    assert r.returncode == 2 and r.stderr.strip() == "error: --ratio 1.5 is outside [0, 1]"
    r = hone("fit", str(runs), "--law", "magic", "-o", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "--law 'magic'" in r.stderr


def test_choice_stays_inside_the_measured_ratios_and_needs_positive_losses():
    import numpy as np

    from hone.mix.laws import choose_ratio

    # A law that extrapolates to a negative domain loss below its lowest measured ratio.
    def predict(r, t):
        r = np.asarray(r, dtype=float)
        return {"general_loss": np.full_like(r, 2.5),
                "domain_loss": 2.0 + 8.0 * (r - 0.25) ** 2 - 0.5 / (r + 0.01) ** 0.2 * (r < 0.2)}

    unbounded = choose_ratio(predict, 1e4, 0.05, 2.5)
    assert unbounded["ratio"] < 0.25
    bounded = choose_ratio(predict, 1e4, 0.05, 2.5, measured=(0.25, 1.0))
    assert bounded["ratio"] == 0.25 and bounded["ratio_range"] == [0.25, 1.0] and bounded["physical"]
    negative = choose_ratio(lambda r, t: {"general_loss": np.full_like(np.asarray(r, float), 2.5),
                                          "domain_loss": np.asarray(r, float) - 0.5}, 1e4, 0.05, 2.5)
    assert not negative["physical"]
