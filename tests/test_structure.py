"""The package's import graph has no cycle, counting imports inside functions too.

A cycle hidden by a function-local import still couples the modules: neither can be read,
tested or moved without the other, and the import order decides whether it works. So every
``import`` statement anywhere in a module counts, and so do the registry's
``"selfconsist.module:Class"`` strings (imported on demand).

Edges, for a module M:

* ``import selfconsist.a.b`` → ``selfconsist.a.b``;
* ``from X import n`` (relative ones resolved against M's package) → ``X.n`` when that is a
  module, else ``X`` (``n`` is a name defined in X, so X's body must have run); and ``X``
  itself too unless X is a package that contains M (always imported before M, so naming it
  adds nothing: ``from . import sibling`` depends on the sibling only).

A package ``__init__`` that imports a submodule which in turn takes a name from the
``__init__`` (``from . import app``) is therefore a cycle: put the name in a leaf module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import selfconsist

ROOT = Path(selfconsist.__file__).resolve().parent
PACKAGE = "selfconsist"
_REGISTRY_STRING = re.compile(rf"^({PACKAGE}(?:\.\w+)+):\w+$")


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package's ``__init__`` under its own)."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that module ``name`` imports, anywhere in its body."""
    own_package = name if _is_package(path) else name.rpartition(".")[0]
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    if _is_package(path):
        ancestors.add(name)
    found: set[str] = set()

    def deepest(dotted: str) -> str | None:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in modules:
                return ".".join(parts[:i])
        return None

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE and (mod := deepest(alias.name)):
                    found.add(mod)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = own_package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE or base not in modules:
                continue
            if base not in ancestors:
                found.add(base)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = _REGISTRY_STRING.match(node.value)
            if m and m.group(1) in modules:
                found.add(m.group(1))
    return found


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    modules = module_files() if modules is None else modules
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, and modules importing
    themselves (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _describe(comp: list[str], graph: dict[str, set[str]]) -> str:
    members = set(comp)
    edges = [f"{a} → {b}" for a in comp for b in sorted(graph[a] & members)]
    return "{" + ", ".join(comp) + "}: " + "; ".join(edges)


def test_no_module_is_in_an_import_cycle() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(_describe(c, graph) for c in found)


def test_the_graph_builder_sees_local_relative_and_package_imports(tmp_path: Path) -> None:
    """The rules above on a toy package, so the real test cannot pass by seeing nothing."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import A\n__version__ = '0'\n",
        "a.py": "def f():\n    from . import __version__\nA = 1\n",  # the package's own name
        "b.py": "from . import a\nfrom .sub import helper\n",  # sibling; package + submodule
        "c.py": "import selfconsist.sub.helper\nX = 'selfconsist.b:B'\n",
        "sub/__init__.py": "from ..c import X\n",
        "sub/helper.py": "from . import other\n",  # `other` is no module: the package itself
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    graph = import_graph(module_files(pkg, PACKAGE))
    assert graph == {
        PACKAGE: {f"{PACKAGE}.a"},
        f"{PACKAGE}.a": {PACKAGE},
        f"{PACKAGE}.b": {f"{PACKAGE}.a", f"{PACKAGE}.sub", f"{PACKAGE}.sub.helper"},
        f"{PACKAGE}.c": {f"{PACKAGE}.sub.helper", f"{PACKAGE}.b"},
        f"{PACKAGE}.sub": {f"{PACKAGE}.c"},
        f"{PACKAGE}.sub.helper": {f"{PACKAGE}.sub"},
    }
    assert sorted(cycles(graph)) == [[PACKAGE, f"{PACKAGE}.a"],
                             [f"{PACKAGE}.b", f"{PACKAGE}.c", f"{PACKAGE}.sub",
                              f"{PACKAGE}.sub.helper"]]
