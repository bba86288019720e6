"""`hone plan`: choose a parallel configuration for a model on a cluster.

    hone plan --model llama3-70b --cluster 4x8xH100 --seq 8192 --global-batch 512
    hone plan --model llama3-8b --cluster 8xH100 --seq 8192 --global-batch 32 \
        --fix tp=1,pp=1,mb=1,recompute=none,zero=3 --json
    hone plan calibrate -o profile.json
    hone plan --model hone-125m --cluster profile.json --seq 2048 --global-batch 16
    hone plan --model llama3-8b --cluster 2x8xH100 --seq 8192 --global-batch 64 --recipe-out train.toml
    hone plan --model llama3-8b --cluster 2x8xH100 --seq 8192 --global-batch 64 --trainer hone  # what hone train runs
    hone plan --recipe recipe.toml -o decision.json     # the decision of `hone run` with its [budget], priced
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import List, Optional

import typer

from hone.errors import HoneError
from hone.mix.decision import decide, format_decision, recipe_cluster, recipe_shape
from hone.plan.api import format_text, make_plan
from hone.plan.commands import recipe_section
from hone.recipe import load_recipe
from hone.rundir import write_json, write_text
from hone.train.mixture import load_mixture

plan_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, invoke_without_command=True,
                       help="Plan a cluster run: parallel configuration, memory, step time.")

CALIBRATION = "hone.train.calibrate"  # `hone plan calibrate`'s measurements (torch)
CONSTANT_HELP = "Override a planner constant, e.g. --const eff_max=0.6 (see hone.plan.config.Constants)."


@plan_app.callback()
def plan(ctx: typer.Context,
         model: Optional[str] = typer.Option(None, "--model",
                                             help="Preset (llama3-8b, llama3-70b, llama3.1-405b, gpt3-175b, "
                                                  "smollm2-135m, hone-125m, hone-1b, ...), an HF config.json, or "
                                                  "layers=..,hidden=..,heads=..,kv_heads=..,ffn=..,vocab=..[,arch=gpt|llama]."),
         cluster: Optional[str] = typer.Option(None, "--cluster",
                                               help="Preset GPUSxTYPE or NODESxGPUSxTYPE (8xH100, 4x8xA100-80GB), a "
                                                    "cluster .toml, or a profile .json from `hone plan calibrate`."),
         seq: int = typer.Option(2048, "--seq", help="Sequence length in tokens."),
         global_batch: int = typer.Option(None, "--global-batch", help="Global batch in sequences."),
         fix: Optional[str] = typer.Option(None, "--fix",
                                           help="Fix fields: "
                                                "tp=8,pp=8,dp=4,mb=1,recompute=none|selective|op|full,zero=0..3,vpp=V. "
                                                "recompute: none; selective = Megatron's (attention core); op = "
                                                "torchtitan's per-op (keeps every second matmul output, recomputes the "
                                                "rest); full = whole layers. All of tp,pp,mb,recompute,zero given: "
                                                "evaluate exactly that configuration."),
         top: int = typer.Option(10, "--top", help="How many configurations to print and keep."),
         as_json: bool = typer.Option(False, "--json", help="Print the configurations as a JSON list."),
         out: Optional[str] = typer.Option(None, "-o", "--out",
                                           help="Write the plan here (ranked configs, launch commands; default "
                                                "plan.json, with --recipe decision.json); '' writes nothing."),
         rank: str = typer.Option("throughput", "--rank",
                                  help="throughput, or cost (also tries fewer nodes; needs --tokens)."),
         tokens: Optional[float] = typer.Option(None, "--tokens",
                                                help="Token budget of the run: adds days, GPU-hours and cost."),
         price: float = typer.Option(2.0, "--price", help="Price per GPU-hour for --tokens."),
         place: bool = typer.Option(False, "--placement",
                                    help="Also assign ranks to GPUs from the cluster's link matrix."),
         const: Optional[List[str]] = typer.Option(None, "--const", help=CONSTANT_HELP),
         recipe_out: Optional[Path] = typer.Option(None, "--recipe-out",
                                                   help="Write the chosen configuration's [train] section (a recipe "
                                                        "fragment for hone train) to this file."),
         trainer: Optional[str] = typer.Option(None, "--trainer",
                                               help="hone: only the layouts hone train runs (recompute none/full, "
                                                    "ddp or fsdp), with its memory (fp32 weights, gradients and "
                                                    "AdamW moments), as the decision stage; megatron: every "
                                                    "configuration with Megatron-LM's constants. Default: hone with "
                                                    "--recipe-out, else megatron."),
         pick: int = typer.Option(1, "--pick", min=1,
                                  help="Which printed configuration --recipe-out writes (1: the best)."),
         recipe: Optional[Path] = typer.Option(None, "--recipe",
                                               help="Decide for this recipe without training: layout, tokens and "
                                                    "domain ratio from its [budget] and [cluster] (the model read "
                                                    "from its config alone), written to decision.json.")):
    """Search every valid tp / pp / dp / micro-batch / recompute / ZeRO / vpp; print the best."""
    if ctx.invoked_subcommand is not None:
        return
    if recipe is not None:
        _decide(recipe, "decision.json" if out is None else out, as_json)
        return
    out = "plan.json" if out is None else out
    if not model or not cluster or global_batch is None:
        raise HoneError("hone plan needs --model, --cluster and --global-batch (see hone plan --help)")

    trainer = trainer or ("hone" if recipe_out is not None else "megatron")
    if recipe_out is not None and trainer != "hone":
        raise HoneError(f"--recipe-out {recipe_out}: a recipe is for hone train; plan it with --trainer hone "
                        "(the default with --recipe-out)")
    result = make_plan(model, cluster, seq=seq, global_batch=global_batch, fix=fix, top=top, rank=rank,
                       tokens=tokens, price=price, placement=place, constants=_constants(const or []),
                       trainer=trainer)
    if out:
        write_json(Path(out), result)
    if recipe_out is not None:
        write_text(recipe_out, _chosen_section(result, pick, seq, global_batch))
    if as_json:
        print(json.dumps(result["configs"], indent=2))
    else:
        print(format_text(result))
        if out:
            print(f"wrote {out}")
        if recipe_out is not None:
            print(f"wrote {recipe_out} ([train] of configuration #{pick})")


def _decide(recipe_path: Path, out: str, as_json: bool) -> None:
    """`hone plan --recipe`: the decision of `hone run` as a dry run (no weights, no sweep)."""
    recipe = load_recipe(recipe_path)
    if recipe.budget is None:
        raise HoneError(f"{recipe_path}: budget: the recipe has no [budget] section (gpu_hours, tokens or days)")
    mixture = load_mixture(Path(recipe.train.mixture)) if recipe.train.mixture else None
    result = decide(recipe, recipe_shape(recipe), recipe_cluster(recipe), mixture=mixture)
    if mixture is None and "mix" in recipe.model_fields_set:
        result["notes"].append("the [mix] sweep runs in `hone run` (its cost counted there); this dry run keeps "
                               "the recipe's ratio")
    if out:
        write_json(Path(out), result)
    print(json.dumps(result, indent=2) if as_json else format_decision(result))
    if out and not as_json:
        print(f"wrote {out}")


def _chosen_section(result: dict, pick: int, seq: int, global_batch: int) -> str:
    configs = result["configs"]
    if pick > len(configs):
        raise HoneError(f"--pick {pick}: the plan printed {len(configs)} configuration(s)")
    rec = configs[pick - 1]
    if not rec["fits"] or rec["memory_gib_per_gpu"] is None:
        raise HoneError(f"--pick {pick}: configuration #{pick} ({rec['reason']}) cannot be written as a recipe")
    return recipe_section(rec, seq, global_batch, pick)


def _constants(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise HoneError(f"--const {it!r}: expected NAME=VALUE")
        try:
            out[k.strip()] = float(v) if v.strip().lower() not in ("true", "false") else v.strip().lower() == "true"
        except ValueError:
            raise HoneError(f"--const {it!r}: value must be a number") from None
    return out


@plan_app.command()
def calibrate(output: Path = typer.Option(Path("hw-profile.json"), "-o", "--output", help="Hardware profile to write."),
              model: Optional[str] = typer.Option(None, "--model",
                                                  help="Measure GEMMs at this model's shapes (default hone-1b)."),
              seq: int = typer.Option(2048, "--seq", help="Tokens per GEMM row block (micro-batch x sequence)."),
              device: str = typer.Option("auto", "--device", help="auto (CUDA if visible), cuda or cpu."),
              quick: bool = typer.Option(False, "--quick", help="Small sizes, few repeats (seconds on a CPU)."),
              compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                                     help="Time Hone's layer torch.compile'd as train.compile runs it "
                                                          "(default: on with CUDA, as the trainer).")):
    """Measure this machine (GEMM FLOP/s, memory bandwidth, device-to-device bandwidth) into a profile."""
    # Resolved when the command runs, as a lazily loaded subcommand: the calibration needs torch
    # and Hone's model, which `hone plan` itself (the planner, the decision) never imports.
    run_calibration = importlib.import_module(CALIBRATION).run_calibration
    prof = run_calibration(model or "hone-1b", seq=seq, device=device, quick=quick, compile=compile)

    write_json(output, prof)
    c = prof["cluster"]
    print(f"{c['gpus_per_node']} x {c['gpu']['name']}: GEMM {prof['measured']['gemm_tflops']:.2f} TFLOP/s "
          f"(efficiency {c['efficiency']:.2f} of {c['gpu']['peak_tflops']:g}), memory "
          f"{prof['measured']['memory_gbps']:.1f} GB/s, "
          f"links {c['intra_gbps']:.1f} GB/s")
    if (t := c.get("trainer")) is not None:
        (b, s), ms = t["points"][1], 1e3 * t["measured"]["layer_fwd_bwd_s"][1]
        print(f"Hone's layer at this shape: {ms:.2f} ms forward + backward for {b} x {s} tokens; keeps "
              f"{t['act_bytes_per_token']:.0f} B per token ({t['ckpt_bytes_per_token']:.0f} B with activation "
              "checkpointing)")
    print(f"wrote {output}  (use: hone plan --cluster {output} ...)")
