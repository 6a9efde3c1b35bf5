"""Tests of the package's architecture: the import graph of ``wecolora`` (no cycle, no upward import),
an import of the API and of the command line that reads no torch, and the names ``wecolora.config``
accepts against the registries they name.

The graph is read from the source with ``ast``: module-level and function-level imports,
``import wecolora.x``, ``from wecolora.x import y`` and relative imports; ``from wecolora.pkg import mod``
counts as an import of the module ``wecolora.pkg.mod`` when ``mod`` is one.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import wecolora

PACKAGE = "wecolora"
ROOT = Path(wecolora.__file__).parent  # this checkout's src/wecolora
SRC = ROOT.parent

# The layers, lowest first: a module may import its own layer and those below it, never one above.
# A name is a top-level module, a sub-package (all its modules) or "__init__" (the package itself).
LAYERS = (
    ("errors", "files", "config", "distributed", "runtime"),  # 0 ground
    ("teachers",),  # 1
    ("method", "data"),  # 2
    ("cache", "evaluation", "export"),  # 3
    ("train",),  # 4
    ("bench", "grid"),  # 5
    ("api", "__init__"),  # 6
    ("cli", "__main__"),  # 7
)
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_key(module: str) -> str:
    """The table's name for a module: ``__init__`` for the package, else its first part below it."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: Path) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names
                         if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_relative(module, is_package, node.level, node.module) if node.level else node.module
            if target != PACKAGE and not (target or "").startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module: imports_of(module, path) - {module} for module, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


# ---------------------------------------------------------------------------------------------
# The graph reader itself, on literal cases (so that an empty graph cannot pass the checks below)

@pytest.mark.parametrize("module, is_package, level, name, expected", [
    ("wecolora.train.distill", False, 1, "setup", "wecolora.train.setup"),
    ("wecolora.train.distill", False, 2, "method.plan", "wecolora.method.plan"),
    ("wecolora.train.distill", False, 1, None, "wecolora.train"),
    ("wecolora.train", True, 1, "setup", "wecolora.train.setup"),
    ("wecolora.train", True, 2, None, "wecolora"),
])
def test_relative_imports_resolve(module, is_package, level, name, expected):
    assert _resolve_relative(module, is_package, level, name) == expected


def test_the_graph_sees_known_imports():
    graph = import_graph()
    assert len(MODULES) > 40
    assert "wecolora.errors" in graph["wecolora.method.blocks"]
    assert "wecolora.config" in graph["wecolora.method.blocks"]
    assert "wecolora.api" in graph["wecolora"]  # from wecolora.api import (...)
    assert "wecolora.api" in graph["wecolora.cli"]  # from wecolora import __version__, api: api is a module
    assert "wecolora" in graph["wecolora.cli"]  # ... and __version__ is the package's
    assert "wecolora.train.distill" in graph["wecolora.api"]  # a function-level import


def test_cycle_finder_on_literal_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# ---------------------------------------------------------------------------------------------
# The architecture

def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if layer_key(m) not in LAYER_OF)
    assert not unplaced, f"modules missing from the layer table in tests/test_layers.py: {unplaced}"


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = [f"{m} (layer {LAYER_OF[layer_key(m)]}) imports {t} (layer {LAYER_OF[layer_key(t)]})"
              for m, targets in import_graph().items() for t in sorted(targets)
              if layer_key(m) in LAYER_OF and layer_key(t) in LAYER_OF
              and LAYER_OF[layer_key(t)] > LAYER_OF[layer_key(m)]]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


# ---------------------------------------------------------------------------------------------
# What an import costs: the API and the command line read no torch

def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120, check=False)


@pytest.mark.parametrize("module", ["wecolora", "wecolora.api", "wecolora.cli", "wecolora.config"])
def test_import_does_not_read_torch(module):
    done = _python("-c", f"import sys, {module}; print(sorted(m for m in sys.modules "
                         f"if m == 'torch' or m.startswith('torch.'))[:5])")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"import {module} imports torch: {done.stdout.strip()}"


def test_help_exits_0_without_torch():
    script = ("import sys\nfrom wecolora.cli import main\ntry:\n    main(['--help'])\n    code = 'returned'\n"
              "except SystemExit as exit:\n    code = exit.code\nprint(code, 'torch' in sys.modules)")
    done = _python("-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0 False"
    assert "usage: wecolora" in done.stdout


def test_python_m_wecolora_help_does_not_import_torch():
    done = _python("-X", "importtime", "-m", "wecolora", "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: wecolora" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "wecolora.cli" in imported  # the timing lines were read
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}


# ---------------------------------------------------------------------------------------------
# The names config accepts are the registries' keys (config reads no torch, so it spells them out)

def test_config_names_equal_the_registries():
    import torch
    from conftest import tiny_vit

    from wecolora import config
    from wecolora.errors import UserError
    from wecolora.method import block_search, blocks, losses, plan

    assert config.MODE_NAMES == tuple(plan.MODES)
    assert config.LOSS_NAMES == tuple(losses.LOSSES)
    assert config.MATCH_NAMES == tuple(losses.MATCHES)
    # one keep vocabulary: the rules select_blocks applies, then the searches choose_blocks runs
    assert config.KEEP_NAMES == config.KEEP_RULES + config.KEEP_SEARCHES
    assert all(blocks.select_blocks(6, 2, rule) for rule in config.KEEP_RULES)
    for search in config.KEEP_SEARCHES:
        with pytest.raises(UserError, match="chooses blocks from images"):
            blocks.select_blocks(6, 2, search)
    teacher = tiny_vit(depth=4).eval()
    images = torch.randn(6, 3, 16, 16)
    assert all(len(block_search.choose_blocks(teacher, 2, search, images).kept) == 2
               for search in config.KEEP_SEARCHES)
