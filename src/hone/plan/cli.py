"""`hone plan`: the cluster planner's command (being built: issue 5)."""

from __future__ import annotations

import typer

plan_app = typer.Typer(no_args_is_help=True, help="Plan a cluster run: parallel configuration, memory, step time.")
