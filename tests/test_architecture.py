"""The rules of docs/architecture.md, checked mechanically on the source (read with ``ast``, no
module is imported).

- No import cycles among tttlm modules. Every import that can run counts: module-level ones,
  lazy ones inside functions, and modules named by a string (``lazy_exports`` tables, the
  command line's ``importlib.import_module`` list), since a cycle closed at call time is still
  a cycle. Only ``if TYPE_CHECKING:`` imports, which never run, are left out. The implicit
  import of a module's parent package is not an edge.
- Dependencies point down the layer table: a module imports only from its own layer or those
  above it; the command-line modules (``tttlm.cli``, ``*/cli.py``) sit on top.
- The core (config, ops, ttt, model) imports nothing of inference, data, training, evaluation,
  conversion, benchmarks or the command line.
- No private name crosses packages: no ``from tttlm.x import _name`` or import of a private
  module (``tttlm.x._y``) from another package, and no ``obj._name`` of a private name
  that only another package defines. A package is ``tttlm.<name>`` (a subpackage) or a
  top-level module.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# docs/architecture.md, top to bottom: a layer imports only from itself and the layers above.
LAYERS = ("leaves", "config", "ops", "ttt", "model", "inference", "memory", "data", "eval",
          "train", "convert", "hf", "serve", "bench", "cli")
LEAVES = {"tttlm.errors", "tttlm.files", "tttlm.progress", "tttlm.lazy", "tttlm.devices",
          "tttlm.options"}
CORE = ("config", "ops", "ttt", "model")
OUTER = ("inference", "memory", "data", "eval", "train", "convert", "hf", "serve", "bench", "cli")

# Cross-package uses of private names that wait for a public API in a file another engineer
# owns: (importing module, private name or module) -> what is missing. An entry that no longer
# occurs fails the test, so that the list only shrinks.
PENDING_PRIVATE: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the tttlm module imported (the nearest module for a name inside one)
    path: str  # what the statement names: "tttlm.x.y" or "tttlm.x.y:name"
    name: str | None  # the name taken from the module (from-imports)
    line: int
    lazy: bool  # inside a function, or a module named by a string


@functools.cache
def modules() -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package)}`` of every module of src/tttlm."""
    found = {}
    for path in sorted((SRC / "tttlm").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def nearest_module(dotted: str) -> str:
    while dotted and dotted not in modules():
        dotted = dotted.rpartition(".")[0]
    return dotted


def package_of(module: str) -> str:
    """``tttlm.<name>`` for a module of a subpackage; a top-level module is its own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _absolute(node: ast.ImportFrom, module: str, package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(body: list[ast.stmt], lazy: bool) -> Iterator[tuple[ast.stmt, bool]]:
    """Every statement with whether it runs only when a function is called; the bodies of
    ``if TYPE_CHECKING:`` are left out."""
    for node in body:
        yield node, lazy
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _statements(node.orelse, lazy)
            continue
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for field in ("body", "orelse", "finalbody"):
            yield from _statements(getattr(node, field, None) or [], inner)
        for handler in getattr(node, "handlers", None) or []:
            yield from _statements(handler.body, inner)
        for case in getattr(node, "cases", None) or []:
            yield from _statements(case.body, inner)


@functools.cache
def imports() -> tuple[Import, ...]:
    found = []
    for module, (path, package) in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node, lazy in _statements(tree.body, False):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "tttlm":
                        found.append(Import(module, nearest_module(alias.name), alias.name,
                                            None, node.lineno, lazy))
            elif isinstance(node, ast.ImportFrom):
                origin = _absolute(node, module, package)
                if origin.split(".")[0] != "tttlm":
                    continue
                for alias in node.names:
                    sub = f"{origin}.{alias.name}"
                    target = sub if sub in modules() else nearest_module(origin)
                    name = None if sub in modules() else alias.name
                    found.append(Import(module, target, f"{origin}:{alias.name}", name,
                                        node.lineno, lazy))
        # Modules named by a string: lazy_exports tables, importlib.import_module("..."). Only
        # dotted names: a bare "tttlm" is the program's name far more often than the package.
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and "." in node.value and node.value in modules() and node.value != module:
                found.append(Import(module, node.value, node.value, None, node.lineno, True))
    return tuple(found)


def test_the_source_is_read() -> None:
    # The rules below hold vacuously if nothing is found: make sure something is.
    assert {"tttlm.cli", "tttlm.model.model", "tttlm.ops.attention"} <= set(modules())
    lazy = [i for i in imports() if i.lazy]
    assert any(i.source == "tttlm.cli" and i.target == "tttlm.train.cli" for i in lazy)
    assert any(i.source == "tttlm.model.model" and i.target == "tttlm.config"
               for i in imports())


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a path ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def test_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}}) is None


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], Import] = {}
    for imp in imports():
        if imp.target != imp.source:
            graph.setdefault(imp.source, set()).add(imp.target)
            where.setdefault((imp.source, imp.target), imp)
    cycle = _cycle(graph)
    if cycle is not None:
        steps = [f"{a} -> {b} (line {where[a, b].line}{', lazy' if where[a, b].lazy else ''})"
                 for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle: " + "; ".join(steps))


def layer_of(module: str) -> str:
    if module in LEAVES:
        return "leaves"
    if module == "tttlm.cli" or module.endswith(".cli"):
        return "cli"
    if module == "tttlm":
        return "model"  # the root package re-exports the model's public names
    name = module.split(".")[1]
    assert name in LAYERS, f"{module}: add its layer to docs/architecture.md and this test"
    return name


def test_dependencies_point_down_the_layers() -> None:
    wrong = [f"{i.source} ({layer_of(i.source)}) imports {i.path} ({layer_of(i.target)}) at "
             f"line {i.line}" for i in imports()
             if LAYERS.index(layer_of(i.target)) > LAYERS.index(layer_of(i.source))]
    assert not wrong, "imports from a lower layer:\n" + "\n".join(wrong)


@pytest.mark.parametrize("core", CORE)
def test_the_core_imports_nothing_outer(core: str) -> None:
    wrong = [f"{i.source} imports {i.path} at line {i.line}" for i in imports()
             if layer_of(i.source) == core and layer_of(i.target) in OUTER]
    assert not wrong, "\n".join(wrong)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@functools.cache
def private_definitions() -> dict[str, set[str]]:
    """Per package, the private names it defines (functions, classes, methods, variables,
    attributes it assigns)."""
    defined: dict[str, set[str]] = {}
    for module, (path, _) in modules().items():
        names = defined.setdefault(package_of(module), set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return {package: {n for n in names if _private(n)} for package, names in defined.items()}


def private_uses() -> list[tuple[str, str, int]]:
    """``(module, private name or module, line)`` of every use of another package's private
    name."""
    uses = []
    for imp in imports():
        if package_of(imp.target) == package_of(imp.source):
            continue
        if any(_private(part) for part in imp.target.split(".")):
            uses.append((imp.source, imp.target, imp.line))
        elif imp.name is not None and _private(imp.name):
            uses.append((imp.source, imp.name, imp.line))
    definitions = private_definitions()
    anywhere = set().union(*definitions.values())
    for module, (path, _) in modules().items():
        own = definitions[package_of(module)]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and _private(node.attr) \
                    and node.attr in anywhere and node.attr not in own:
                uses.append((module, node.attr, node.lineno))
    return uses


def test_no_private_names_across_packages() -> None:
    found = private_uses()
    wrong = [f"{module} uses {name} at line {line}" for module, name, line in found
             if (module, name) not in PENDING_PRIVATE]
    assert not wrong, "private names of another package:\n" + "\n".join(wrong)
    seen = {(module, name) for module, name, _ in found}
    stale = sorted(set(PENDING_PRIVATE) - seen)
    assert not stale, f"no longer used, drop from PENDING_PRIVATE: {stale}"


def test_private_use_finder_finds_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A small tree with each kind of cross-package private use, and the same uses inside
    # the owning package (allowed).
    pkg = tmp_path / "tttlm"
    for folder in (pkg, pkg / "ops", pkg / "bench"):
        folder.mkdir(exist_ok=True)
        (folder / "__init__.py").write_text("")
    (pkg / "ops" / "_hidden.py").write_text("def visible():\n    pass\n")
    (pkg / "ops" / "kernels.py").write_text(
        "def _helper():\n    pass\n\n\nclass K:\n    def _secret(self):\n        pass\n")
    (pkg / "ops" / "user.py").write_text(
        "from tttlm.ops._hidden import visible\nfrom tttlm.ops.kernels import K, _helper\n"
        "K()._secret()\n")
    (pkg / "bench" / "run.py").write_text(
        "from tttlm.ops._hidden import visible\nfrom tttlm.ops.kernels import K, _helper\n"
        "K()._secret()\n")
    caches = (modules, imports, private_definitions)
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    for cached in caches:
        cached.cache_clear()
    try:
        found = {(module, name) for module, name, _ in private_uses()}
    finally:
        for cached in caches:
            cached.cache_clear()
    assert found == {("tttlm.bench.run", "tttlm.ops._hidden"), ("tttlm.bench.run", "_helper"),
                     ("tttlm.bench.run", "_secret")}
