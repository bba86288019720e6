"""`hone mix ...`: proxy sweep, law fits, predictions.

    hone mix sweep recipes/tiny-cpu.toml --workdir runs/tiny --dry-run
    hone mix sweep recipes/tiny-cpu.toml --workdir runs/tiny
    hone mix fit runs/tiny/mix/runs.jsonl -o runs/tiny/mixture.json --law both --tolerance 0.05
    hone mix predict runs/tiny/mixture.json --ratio 0.4 --tokens 61440
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from hone.cli.common import WORKDIR, load_recipe_and_workdir, log
from hone.errors import HoneError
from hone.mix.laws import fit_mixture, load_runs, mean_r2, predict as predict_losses
from hone.pipeline import sweep_mixture
from hone.rundir import read_json, write_json
from hone.train.mixture import make_schedule

mix_app = typer.Typer(no_args_is_help=True,
                      help="Choose the domain mixture: proxy sweep, CMR / D-CPT law fits, predictions.")


@mix_app.command("sweep")
def sweep(recipe: Path = typer.Argument(..., help="Recipe TOML file (its [mix] section sets ratios and budgets)."),
          workdir: Optional[Path] = WORKDIR,
          dry_run: bool = typer.Option(False, "--dry-run",
                                       help="Print only the estimate (proxy runs, tokens, time from a measured step, "
                                            "disk); runs the data stages it needs, trains no proxy.")):
    """Short proxy continual-pretraining runs at several domain ratios and token budgets -> mix/runs.jsonl.

    Prints an estimate first and the ETA after each point; a proxy run's checkpoints are removed
    once its points are recorded."""
    r, wd = load_recipe_and_workdir(recipe, workdir)
    out = sweep_mixture(r, wd, log=log, dry_run=dry_run)
    if dry_run:
        log(f"mix: dry run: no proxy trained; run without --dry-run to measure the points into {out}")
        return
    log(f"mix: runs in {out}; next: hone mix fit {out} -o {wd / 'mixture.json'}")


@mix_app.command("fit")
def fit(runs: Path = typer.Argument(..., help="runs.jsonl from hone mix sweep (or your own runs)."),
        out: Path = typer.Option(Path("mixture.json"), "-o", "--out", help="Where to write the fitted mixture."),
        law: str = typer.Option("both", "--law", help="cmr, dcpt, or both (the better-fitting one chooses)."),
        tolerance: float = typer.Option(0.05, "--tolerance", help="Allowed rise of general loss in nats (CMR: 0.05)."),
        tokens: Optional[float] = typer.Option(None, "--tokens",
                                               help="Planned token budget (default: the largest in the runs)."),
        upsample_fraction: float = typer.Option(0.0, "--upsample-fraction",
                                                help="Domain upsampling over the last fraction of steps (0: off)."),
        upsample_ratio: Optional[float] = typer.Option(None, "--upsample-ratio",
                                                       help="Ratio during upsampling (default: twice the chosen, at "
                                                            "most 1).")):
    """Fit the mixture laws (robust loss, R^2, residuals), choose the ratio, write mixture.json with its schedule."""
    result = fit_mixture(load_runs(runs), law=law, tolerance=tolerance, target_tokens=tokens, source=str(runs))
    result["source"] = str(runs)
    result["schedule"] = make_schedule(result["chosen"]["ratio"], upsample_fraction, upsample_ratio)
    write_json(out, result)
    c = result["chosen"]
    for name, fitted in result["laws"].items():
        log(f"{name}: mean R^2 {mean_r2(fitted):.4f}; ratio {fitted['choice']['ratio']:.3f} "
            f"(general {fitted['choice']['general_loss']:.4f}, domain {fitted['choice']['domain_loss']:.4f})")
    note = "" if c["feasible"] else " (no ratio keeps general loss within the tolerance: least general loss)"
    log(f"chosen ratio {c['ratio']:.3f} by {c['law']} at {c['tokens']:,.0f} tokens{note}; wrote {out}")


@mix_app.command("predict")
def predict(mixture: Path = typer.Argument(..., help="mixture.json from hone mix fit."),
            ratio: float = typer.Option(..., "--ratio", help="Domain ratio in [0, 1]."),
            tokens: Optional[float] = typer.Option(None, "--tokens",
                                                   help="Continual-pretraining tokens (default: the fit's target)."),
            params: Optional[float] = typer.Option(None, "--params",
                                                   help="Model parameters (D-CPT with several sizes)."),
            law: Optional[str] = typer.Option(None, "--law",
                                              help="cmr or dcpt (default: the one that chose the ratio).")):
    """Print {"general_loss", "domain_loss"} predicted by the fitted laws, as JSON."""
    data = read_json(mixture)
    if not isinstance(data, dict) or "laws" not in data:
        raise HoneError(f"{mixture}: not a mixture file with fitted laws (write one with hone mix fit)")
    print(json.dumps(predict_losses(data, ratio, tokens, params, law)))
