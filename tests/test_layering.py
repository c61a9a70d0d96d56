"""The data flows one way: no import cycles, and each layer imports only the layers below it.

Every ``import`` statement counts, module-level or inside a function (a cycle hidden in a function
is still a cycle). Layers, bottom to top::

    errors, _deprecation -> _layout -> wasserstein -> neighborhoods -> heads -> loss -> attach
    ctxpred -> reference_models -> benchmarks
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ctxpred", "reference_models", "benchmarks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in files else base)
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _layer(module: str) -> int:
    order = ["ctxpred.errors", "ctxpred._deprecation", "ctxpred._layout", "ctxpred.wasserstein",
             "ctxpred.neighborhoods", "ctxpred.heads", "ctxpred.loss", "ctxpred.attach",
             "ctxpred.functional", "ctxpred", "reference_models", "benchmarks"]
    for rank, prefix in reversed(list(enumerate(order))):
        if module == prefix or module.startswith(prefix + "."):
            return rank
    raise AssertionError(module)


def test_no_import_cycles_anywhere():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_every_import_points_down_the_layers():
    up = [
        f"{src} imports {dst}"
        for src, dsts in _graph().items() for dst in dsts
        if _layer(dst) > _layer(src) and not (dst == "ctxpred" and _layer(src) > _layer(dst))
    ]
    assert not up, "\n".join(up)


def test_reference_models_never_import_benchmarks():
    bad = [f"{s} -> {d}" for s, ds in _graph().items() if s.startswith("reference_models")
           for d in ds if d.startswith("benchmarks")]
    assert not bad, bad


def test_loss_names_no_concrete_head():
    text = (ROOT / "ctxpred/loss.py").read_text()
    for name in ("GaussianSamplingHead", "NaiveHead", "MomentHead", "CategoricalHead",
                 "CategoricalPrediction", "MomentPrediction"):
        code = [line for line in text.splitlines()
                if name in line and not line.lstrip().startswith(("#", ">>>", "..."))
                and "``" not in line and ":class:" not in line and '"' not in line]
        assert not code, (name, code)


def test_every_top_level_name_is_on_an_api_page():
    import importlib
    import re

    import ctxpred

    targets = set()
    for page in (ROOT / "docs/api").glob("*.md"):
        targets |= set(re.findall(r"^:::\s+([\w.]+)", page.read_text(), flags=re.MULTILINE))
    assert 15 <= len(ctxpred.__all__) <= 20, ctxpred.__all__
    for name in ctxpred.__all__:
        if name == "__version__":
            continue
        obj = getattr(ctxpred, name)
        module = obj.__name__ if isinstance(obj, type(ctxpred)) else obj.__module__
        assert module in targets, f"ctxpred.{name} ({module}) has no ::: block under docs/api/"
        if not isinstance(obj, type(ctxpred)):
            assert name in importlib.import_module(module).__all__, (name, module)
