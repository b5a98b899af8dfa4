"""The package layout is the architecture: ``app/core`` (errors, settings, the image loader: what every layer
uses) < ``app/storage`` (the store tree, cards, heads on disk) < ``app/serving`` (extractor, inference core,
batcher, the service) < ``app/learning`` (features, training, export, jobs; and ``app/batch``, offline jobs) < the fronts
(``app/api``, ``app/grpc``, ``app/cli``, ``app/console``, ``app/main.py``, ``app/server.py``).

Checked from the source, every ``import`` counted (module level and inside functions; only
``if TYPE_CHECKING:`` blocks, which never run, are left out): no module imports a higher layer, and the
import graph has no circle."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

LAYERS = {"app.core": 0, "app.storage": 1, "app.serving": 2, "app.learning": 3, "app.batch": 3}
"""``app/batch`` (Ray and in-process batch jobs) sits with learning: offline work over photo folders that training
reads back (``tlserve train --features``); no front imports it but the CLI."""
FRONT = 4  # app.api, app.grpc, app.cli, app.console, app.main, app.server, app.client, app


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((REPO / "app").rglob("*.py")):
        if "_pb2" in path.name:
            continue
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _layer(module: str) -> int:
    return next((n for prefix, n in LAYERS.items() if module == prefix or module.startswith(prefix + ".")), FRONT)


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        unreached = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                     for n in ast.walk(node)}  # fmt: skip
        for node in ast.walk(tree):
            if id(node) in unreached:
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "app":
                targets = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "app"]
            for target in targets:
                resolved = resolve(target)
                if resolved and resolved != module and resolved != "app":
                    graph[module].add(resolved)
    return graph


def test_no_module_imports_a_higher_layer() -> None:
    upward = sorted(f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
                    for m, targets in _graph().items() for t in targets if _layer(t) > _layer(m))  # fmt: skip
    assert upward == []


def test_the_import_graph_has_no_circle() -> None:
    graph, index, low, stack, on, circles = _graph(), {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on.discard(w)
                component.append(w)
            on.discard(v)
            if component:
                circles.append(sorted([v, *component]))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert circles == []


def test_every_layer_package_says_what_it_holds() -> None:
    for package in LAYERS:
        init = REPO / package.replace(".", "/") / "__init__.py"
        assert (ast.get_docstring(ast.parse(init.read_text())) or "").strip(), f"{init} has no docstring"
