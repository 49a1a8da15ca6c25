"""The import graph of toolkit/, schema/ and cli.py has no cycle (function-local imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("toolkit", "schema", "queries")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    mods = {"cli": ROOT / "cli.py"}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            mods[module_name(path)] = path
    return mods


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `name` imports anywhere in its body (top level, functions, TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name of pkg
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_finder_sees_a_cycle_through_function_local_imports(tmp_path):
    # the checker itself: an import inside a function is an edge, and a two-module circle is found
    mod = tmp_path / "taxonomy.py"
    mod.write_text("import os\n\ndef seed():\n    from toolkit.store import db\n    from .. import errors\n")
    assert imports_of("toolkit.labels.taxonomy", mod, {"toolkit", "toolkit.store.db", "toolkit.errors"}) == {
        "toolkit.store.db",
        "toolkit.errors",
    }
    graph = {"a": {"b"}, "b": set()}
    assert find_cycle(graph) is None
    graph["b"].add("a")
    assert find_cycle(graph) in (["a", "b", "a"], ["b", "a", "b"])


def test_graph_covers_the_project():
    graph = import_graph()
    assert {"cli", "toolkit", "toolkit.store.db", "schema"} <= set(graph)
    assert "toolkit.store.db" in graph["cli"] or any(m.startswith("toolkit.") for m in graph["cli"])


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# --------------------------------------------------------------- one copy of each helper, no leftover aliases


def test_one_sha256_file():
    """models and outdir each had their own copy of paths.sha256_file after the merges."""
    from toolkit.embed import models
    from toolkit.report import outdir
    from toolkit.store import artifacts, paths

    assert models.sha256_file is paths.sha256_file
    assert outdir.sha256_file is paths.sha256_file
    assert artifacts.sha256_file is paths.sha256_file
    assert not hasattr(outdir, "_sha256")


def test_no_leftover_aliases():
    """coco.load_karpathy (ingest calls load_karpathy_dataset now) and embed.embed_subset were called by nothing."""
    from toolkit.embed import stage as embed
    from toolkit.ingest import coco

    assert not hasattr(coco, "load_karpathy") and hasattr(coco, "load_karpathy_dataset")
    assert not hasattr(embed, "embed_subset")
