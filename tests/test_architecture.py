"""The house's import order (docs/ARCHITECTURE.md): every module of dsp/ imports only from its own
layer or the layers below it, and no two modules import each other, directly or in a circle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dsp.architecture import LAYERS, layer_of

ROOT = Path(__file__).resolve().parents[1] / "dsp"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the dsp modules it imports (at any depth of its code, lazy imports included)."""
    edges = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target not in (name, "dsp"):  # the root package: __version__ only
                    edges[name].add(target)
    return edges


def test_every_module_has_a_layer():
    unplaced = [m for m in _modules() if m != "dsp" and layer_of(m) is None]
    assert not unplaced, f"place these modules in dsp.architecture.LAYERS: {unplaced}"


def test_imports_follow_the_written_order():
    modules = _modules()
    against = sorted(f"{m} -> {t}" for m, targets in _imports(modules).items() if m != "dsp"
                     for t in targets if layer_of(t) > layer_of(m))
    assert not against, "imports against the order of dsp.architecture.LAYERS:\n" + "\n".join(against)


def test_no_import_circle():
    edges = _imports(_modules())
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_the_check_sees_a_wrong_import(tmp_path):
    """The order test would fail on a model importing the trainer (the check is not vacuous)."""
    assert layer_of("dsp.training.trainer") > layer_of("dsp.models.spen")
    assert layer_of("dsp.cli.train") == len(LAYERS) - 1
