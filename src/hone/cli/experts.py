"""`hone branch` and `hone merge`: thin wrappers over hone.experts."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from hone.cli.common import WORKDIR, load_recipe_and_workdir, log
from hone.errors import HoneError
from hone.evaluate import read_texts
from hone.experts.ensemble import cached_prior, load_ensemble
from hone.experts.merge import ENSEMBLE_FILE, average, ensemble, parse_weights
from hone.pipeline import branch_experts
from hone.rundir import read_json, write_json


def merge(experts: List[Path] = typer.Argument(..., help="Expert HF directories (e.g. runs/x/experts/bio/final)."),
          out: Path = typer.Option(..., "-o", "--out", help="Output directory."),
          weights: Optional[str] = typer.Option(None, "--weights",
                                                help="w1,w2,... one per expert, normalized (default: uniform). The "
                                                     "prior for an ensemble."),
          method: str = typer.Option("average", "--method",
                                     help="average: one HF checkpoint of averaged parameters; ensemble: mix the "
                                          "experts' predictions by domain posterior."),
          prefix_cap: Optional[int] = typer.Option(None, "--prefix-cap",
                                                   help="Ensemble: posterior from the last N context tokens only."),
          smoothing: float = typer.Option(0.0, "--smoothing",
                                          help="Ensemble: share of the prior mixed into the posterior."),
          prior_data: Optional[List[Path]] = typer.Option(None, "--prior-data",
                                                          help="Ensemble: JSON-lines sample of the target data; the "
                                                               "prior becomes the experts' mean posterior on it (BTM's "
                                                               "cached prior). Repeat.")):
    """Merge experts into one checkpoint (parameter average) or an ensemble `hone eval` can score."""
    w = parse_weights(weights, len(experts))
    if method == "average":
        if prefix_cap is not None or smoothing:
            raise HoneError("--prefix-cap and --smoothing apply to --method ensemble only")
        average(experts, out, w)
    elif method == "ensemble":
        if prior_data and weights is not None:
            raise HoneError("give --weights or --prior-data, not both")
        texts = [t for p in prior_data or [] for t in read_texts(p)]  # a missing file fails before writing
        ensemble(experts, out, w, prefix_cap=prefix_cap, smoothing=smoothing)
        if prior_data:
            w = _cache_prior(out, texts, prior_data)
    else:
        raise HoneError(f"--method {method!r}: expected average or ensemble")
    log(f"{method} of {len(experts)} experts (weights {', '.join(f'{x:.3g}' for x in w)}) -> {out}")


def _cache_prior(out: Path, texts: list[str], prior_data: List[Path]) -> list[float]:
    """Rewrite the ensemble's prior as its mean posterior on ``texts`` (read from ``prior_data``)."""
    model, tok = load_ensemble(out)
    prior = cached_prior(model, tok, texts)
    manifest = read_json(out / ENSEMBLE_FILE)
    for e, w in zip(manifest["experts"], prior):
        e["prior"] = w
    manifest["prior_from"] = [str(p) for p in prior_data]
    write_json(out / ENSEMBLE_FILE, manifest)
    return prior


def branch(recipe: Path = typer.Argument(..., help="Recipe TOML file with an experts section (experts.domain tables)."),
           workdir: Optional[Path] = WORKDIR,
           only: Optional[List[str]] = typer.Option(None, "--only",
                                                    help="Train only this expert (repeat); others are left as they "
                                                         "are."),
           resume: bool = typer.Option(False, "--resume",
                                       help="Continue unfinished experts from their newest checkpoint (default: start "
                                            "them over)."),
           with_joint: bool = typer.Option(False, "--with-joint",
                                           help="Also train one model on the union of the domains with the experts' "
                                                "total token budget."),
           max_steps: Optional[int] = typer.Option(None, "--max-steps",
                                                   help="Stop each expert after N steps (resume later)."),
           no_eval: bool = typer.Option(False, "--no-eval", help="Skip merging and the per-domain comparison."),
           prepare_only: bool = typer.Option(False, "--prepare-only",
                                             help="Build the seed and each expert's run directory, print the torchrun "
                                                  "/ Slurm command per expert, train nothing.")):
    """Branch-Train-Merge: one expert per experts.domain table of the recipe, each an independent, resumable job.

    Finished experts are never retrained; a domain added to the recipe later trains only its
    own expert. Each expert's directory is a run directory the training engine can resume on
    a cluster: the torchrun and Slurm commands are printed.
    """
    r, wd = load_recipe_and_workdir(recipe, workdir)
    branch_experts(r, wd, recipe_path=recipe, only=only or None, resume=resume, with_joint=with_joint,
               max_steps=max_steps, evaluate=not no_eval, prepare_only=prepare_only, log=log)
