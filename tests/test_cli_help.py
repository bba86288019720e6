"""Every command's --help shows the recipe section names its source help strings name ([build], [[steps]], [mix])."""

from __future__ import annotations

import re

import pytest
import typer.main
from typer.testing import CliRunner

from hone.cli import app

SECTION = re.compile(r"\[\[?[a-z_.]+\]\]?")


def _commands(cmd, path: tuple[str, ...] = ()):
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, path + (name,))


def _source_help(cmd) -> str:
    return " ".join([cmd.help or "", *(getattr(p, "help", None) or "" for p in cmd.params)])


COMMANDS = list(_commands(typer.main.get_command(app)))


def test_the_tree_is_walked():
    paths = {" ".join(p) for p, _ in COMMANDS}
    assert {"data build", "mix sweep", "plan", "run", "recipe check"} <= paths


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) or "hone" for p, _ in COMMANDS])
def test_help_keeps_bracketed_section_names(path, cmd):
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())
    for name in SECTION.findall(_source_help(cmd)):
        assert name in shown, f"hone {' '.join(path)} --help lost {name}"


def test_data_build_help_names_build_and_steps():
    out = CliRunner().invoke(app, ["data", "build", "--help"], terminal_width=200).output
    assert "[build] inputs/output and [[steps]]" in " ".join(out.split())
