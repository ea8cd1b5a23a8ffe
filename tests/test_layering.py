"""The package's layering is true: its import graph, lazy imports inside functions included, has no cycle.

Nodes are visedit's parts (``visedit.models``, ``visedit.attribution``, ``visedit.hooks``, …: the
sub-packages and the top-level modules); an edge a → b is any ``import`` in a module of a that names b.
"""

from __future__ import annotations

import ast
from pathlib import Path

import visedit

ROOT = Path(visedit.__file__).parent


def _part(module: str) -> str:
    """``visedit.editing.vead.train`` → ``visedit.editing``; ``visedit.hooks`` → ``visedit.hooks``."""
    return ".".join(module.split(".")[:2])


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every visedit module ``path`` imports, at the top or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "visedit"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "visedit":
                out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names if (ROOT.parent / f"{target}.{a.name}".replace(".", "/")).exists()}
    return out


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        src = _part(_module_name(path))
        for target in _imports(path):
            dst = _part(target)
            if dst != src and dst != "visedit":
                graph.setdefault(src, set()).add(dst)
            graph.setdefault(dst, set())
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_walker_sees_lazy_imports_and_finds_a_planted_cycle():
    graph = import_graph()
    assert "visedit.attribution" in graph["visedit.editing"]  # lazy: VEAD chooses its layer by attribution
    assert find_cycle({**graph, "visedit.models": graph["visedit.models"] | {"visedit.editing"}})


def test_attribution_and_editing_see_only_the_model_interface():
    """Architecture-specific code lives in visedit.models: no attribution or editing module imports
    transformers' model code (they reach the decoder math through the backbone adapter)."""
    for part in ("attribution", "editing"):
        for path in (ROOT / part).rglob("*.py"):
            assert "transformers.models" not in path.read_text(), path


def test_config_and_the_fit_loop_are_the_lowest_layer():
    """``visedit.config`` and ``visedit.fit`` import no other part: models and editing both build on them."""
    graph = import_graph()
    assert graph["visedit.config"] == set() and graph["visedit.fit"] == set()
    assert "visedit.fit" in graph["visedit.models"] and "visedit.fit" in graph["visedit.editing"]
