"""The house's import order (docs/ARCHITECTURE.md): every module of dsp/ imports only from its own
layer or the layers below it, and no two modules import each other, directly or in a circle."""
from __future__ import annotations

import ast
from pathlib import Path


from dsp.architecture import LAYERS, layer_of

ROOT = Path(__file__).resolve().parents[1] / "dsp"


def _modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
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


def _against_order(root: Path = ROOT) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in _imports(_modules(root)).items() if m != "dsp"
                  for t in targets if layer_of(t) > layer_of(m))


def _circle(root: Path = ROOT) -> list[str] | None:
    edges = _imports(_modules(root))
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (found := visit(t, path + [t])):
                return found
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_imports_follow_the_written_order():
    against = _against_order()
    assert not against, "imports against the order of dsp.architecture.LAYERS:\n" + "\n".join(against)


def test_no_import_circle():
    circle = _circle()
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_checks_see_a_wrong_import_and_a_circle(tmp_path):
    """The checks are not vacuous: on a copy of the house where a model imports the trainer (lazily,
    inside a function) and two inference modules import each other, both report it."""
    house = tmp_path / "dsp"
    for package in ("", "models", "training", "inference"):
        (house / package).mkdir(exist_ok=True)
        (house / package / "__init__.py").write_text("")
    (house / "training" / "trainer.py").write_text("class Trainer:\n    pass\n")
    (house / "models" / "spen.py").write_text("def fit():\n    from dsp.training.trainer import Trainer\n")
    (house / "inference" / "gradient.py").write_text("from . import chain\n")
    (house / "inference" / "chain.py").write_text("from dsp.inference.gradient import x\n")
    assert _against_order(house) == ["dsp.models.spen -> dsp.training.trainer"]
    assert _circle(house) in (["dsp.inference.chain", "dsp.inference.gradient", "dsp.inference.chain"],
                              ["dsp.inference.gradient", "dsp.inference.chain", "dsp.inference.gradient"])
    assert layer_of("dsp.cli.train") == len(LAYERS) - 1
