"""The layering rules, checked on the source (README: Architecture): no import cycle; only the
catalog package touches SQLite; the FUSE layer sees the catalog and the blobs through their
protocols only; the mount commands work without pyfuse3 and trio; every `type: ignore` says why."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "artifactfs"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(mod: str, *, lazy: bool = True) -> set[str]:
    """The modules `mod` imports at run time (not under TYPE_CHECKING); with `lazy`, also the
    imports inside functions."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text(), str(path))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, in_function)
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import) and (lazy or not in_function):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and (lazy or not in_function):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.add(target)
                for a in child.names:  # `from . import names` imports a module
                    if f"{target}.{a.name}" in MODULES:
                        found.add(f"{target}.{a.name}")
            visit(child, inner)

    visit(tree, False)
    return found


def own(names: set[str]) -> set[str]:
    return {n for n in names if n in MODULES}


def test_the_checks_see_every_layer() -> None:
    for mod in ("artifactfs.catalog.sqlite", "artifactfs.blobs.local", "artifactfs.refs.file",
                "artifactfs.fuse.view", "artifactfs.fuse.ops", "artifactfs.mount.commands"):
        assert mod in MODULES
    assert "sqlite3" in imports("artifactfs.catalog.sqlite")  # the parser finds what is there


def test_no_import_cycle() -> None:
    """Module-level imports form no cycle (a cycle makes import order matter and the layers
    meaningless); imports inside functions, which break cycles on purpose, are left out."""
    graph = {m: own(imports(m, lazy=False)) - {m} for m in MODULES}
    # A package imports its own __init__ on the way: an edge to the parent package is not a cycle.
    for m, deps in graph.items():
        deps -= {p for p in deps if m.startswith(p + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = [*stack[stack.index(d):], d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                dfs(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)


def test_only_the_catalog_package_imports_sqlite3() -> None:
    users = sorted(m for m in MODULES if "sqlite3" in imports(m) and not m.startswith("artifactfs.catalog"))
    assert users == []


@pytest.mark.parametrize("layer", ["artifactfs.fuse", "artifactfs.refs"])
def test_a_layer_uses_the_catalog_and_the_blobs_through_their_protocols(layer: str) -> None:
    implementations = {"artifactfs.catalog.sqlite", "artifactfs.catalog._db", "artifactfs.catalog.host",
                       "artifactfs.blobs.local", "artifactfs.blobs.memory", "artifactfs.store"}
    for m in MODULES:
        if m == layer or m.startswith(layer + "."):
            assert imports(m) & implementations == set(), m


def test_fsck_checks_the_store_it_is_given_without_importing_it() -> None:
    assert "artifactfs.store" not in imports("artifactfs.fsck")  # TYPE_CHECKING only


def test_the_mount_commands_and_the_view_work_without_pyfuse3_and_trio() -> None:
    for m in ("artifactfs.mount.commands", "artifactfs.mount.service", "artifactfs.fuse.view",
              "artifactfs.cli", "artifactfs.store"):
        module_level = imports(m, lazy=False)
        assert not module_level & {"pyfuse3", "trio"}, m
        assert not module_level & {"artifactfs.mount.daemon", "artifactfs.fuse.ops"}, m
    assert "pyfuse3" not in imports("artifactfs.fuse.handles")  # trio only: testable without a mount


def test_every_type_ignore_says_why() -> None:
    """A `# type: ignore[code]` has a reason: a comment after it, or a comment line just above."""
    bare = []
    for m, path in MODULES.items():
        lines = path.read_text().splitlines()
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type != tokenize.COMMENT or "type: ignore" not in tok.string:
                continue
            after = tok.string.split("type: ignore", 1)[1]
            has_code = after.startswith("[")
            reason_here = "#" in after
            row = tok.start[0]
            above = lines[row - 2].strip() if row >= 2 else ""
            if not has_code or not (reason_here or above.startswith("#")):
                bare.append(f"{m}:{row}: {tok.string}")
    assert bare == []
