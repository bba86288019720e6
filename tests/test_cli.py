"""The CLI surface: documented subcommands, --help everywhere, one-line errors."""

import subprocess
import sys

import pytest

from hone.cli import app

DOCUMENTED = ["demo", "run", "train", "fetch-data", "data", "plan", "mix", "tokenize", "eval", "report", "recipe",
              "cluster", "branch", "merge", "generate"]


def hone(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hone.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_subcommands_are_the_documented_ones():
    import typer.main

    group = typer.main.get_command(app)
    assert sorted(group.commands) == sorted(DOCUMENTED)
    assert sorted(group.commands["data"].commands) == ["build", "curate", "dedup", "dsir", "pool", "rate", "retrieve",
                                                       "select"]
    assert sorted(group.commands["plan"].commands) == ["calibrate"]
    assert sorted(group.commands["recipe"].commands) == ["check", "fields"]


@pytest.mark.parametrize("args", [[], ["demo"], ["run"], ["train"], ["fetch-data"], ["data"], ["data", "pool"],
                                  ["data", "curate"], ["tokenize"], ["eval"], ["report"], ["recipe", "check"],
                                  ["branch"], ["merge"], ["generate"]])
def test_every_subcommand_has_help(args):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_bad_recipe_is_one_line_no_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[data.packaged]\nwikipedia = 1\n[curate.domain]\nkeywords = ['x']\n[train]\nbatch_size = 0\n")
    r = hone("run", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {bad}: train.batch_size: Input should be greater than or equal to 1 (got 0)"]
    assert "Traceback" not in r.stderr + r.stdout


def test_missing_recipe_and_unwritable_workdir(tmp_path):
    r = hone("run", str(tmp_path / "none.toml"))
    assert r.returncode == 2 and "recipe file not found" in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = hone("run", "recipes/tiny-cpu.toml", "--workdir", str(blocker / "run"),
             cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: run directory {blocker / 'run'} is not writable")


def test_eval_bad_data_argument():
    r = hone("eval", "somewhere", "--data", "no-equals-sign")
    assert r.returncode == 2
    assert "--data 'no-equals-sign': expected NAME=PATH" in r.stderr
