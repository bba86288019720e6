"""`hone`: one subcommand per stage, thin wrappers over the stage packages.

    hone demo                                  # the embedded biomedical default, CPU
    hone run recipes/tiny-cpu.toml             # any recipe, every stage
    hone eval runs/demo/final --data bio=heldout.jsonl --base runs/demo/base

Each subcommand lives in its own module, imported only when that subcommand runs (every one
for ``hone --help``): importing them all pulls torch, transformers and matplotlib, 6-8 s
before ``hone plan`` could print anything and on every process a multi-process run starts.
"""

from __future__ import annotations

import importlib
import sys

import typer

from hone.errors import PREEMPT_SIGNALS, HoneError, Preempted, fast_exit

# name -> (module, attribute): a Typer is a command group, a function one command.
COMMANDS = {
    "demo": ("hone.cli.stages", "demo"),
    "run": ("hone.cli.stages", "run"),
    "train": ("hone.cli.stages", "train"),
    "tokenize": ("hone.cli.stages", "tokenize"),
    "report": ("hone.cli.stages", "report"),
    "fetch-data": ("hone.cli.fetch", "fetch_data"),
    "recipe": ("hone.cli.recipe", "recipe_app"),
    "data": ("hone.cli.data", "data_app"),
    "plan": ("hone.cli.plan", "plan_app"),
    "mix": ("hone.cli.mix", "mix_app"),
    "cluster": ("hone.cli.cluster", "cluster_app"),
    "branch": ("hone.cli.experts", "branch"),  # domain experts (Branch-Train-Merge)
    "merge": ("hone.cli.experts", "merge"),
    "eval": ("hone.cli.eval", "eval_cmd"),
    "generate": ("hone.cli.generate", "generate"),
}


def _no_options() -> None:
    pass


def build_app(names=None) -> typer.Typer:
    """The `hone` app with the commands ``names`` (default: all of them)."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                      pretty_exceptions_enable=False,
                      help="Turn a general LLM and a general corpus into a domain specialist.")
    app.callback()(_no_options)  # a group even with one command loaded: `hone NAME ...` keeps its NAME
    for name in names or COMMANDS:
        module, attribute = COMMANDS[name]
        target = getattr(importlib.import_module(module), attribute)
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=name)
        else:
            app.command(name)(target)
    return app


def __getattr__(name: str):
    if name == "app":  # `from hone.cli import app`: every command (tests, the help walk)
        return build_app()
    raise AttributeError(name)


def main(*, exit_fast: bool = True) -> None:
    """`hone`. ``exit_fast=False`` when another program calls it in its own process (the tests):
    the exit then leaves the garbage collector as it is (see :func:`hone.errors.fast_exit`)."""
    args = sys.argv[1:]
    # A known command loads its module alone; anything else (--help, a typo) gets every command.
    wanted = [args[0]] if args and args[0] in COMMANDS else None
    try:
        build_app(wanted)()
    except Preempted as e:  # not a mistake: the cluster asked the job to stop; its status says "requeue me"
        print(f"preempted: {e}", file=sys.stderr)
        raise fast_exit(e.exit_code, ignore=PREEMPT_SIGNALS) if exit_fast else SystemExit(e.exit_code)
    except HoneError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        raise SystemExit(130)
    except SystemExit as e:  # click's own exit, once the command is done: skip the final collection
        if not exit_fast:
            raise
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        raise fast_exit(e.code if isinstance(e.code, int) else int(e.code is not None)) from None


if __name__ == "__main__":
    main()
