"""The package's import graph: every module imports in a fresh interpreter, no two modules import each other,
directly or through others, and no package imports one at its own level or above in the package order of
``docs/architecture.md`` (a package-level loop such as ``config.cli`` -> ``models.x`` -> ``config.schema`` is no
module cycle, but is an upward import).

The graph is read from the source (``ast``), so it sees every import a module can execute: at module level and
inside functions. A function-level import that closes a loop is a cycle put off until call time, so it counts
(it usually exists to dodge the ``ImportError`` of a partially initialized module). Imports under
``if TYPE_CHECKING:`` never execute and are left out. An import of ``pkg.sub`` is an edge to ``pkg.sub`` only,
not to ``pkg/__init__.py``: a package initializer that re-exports its submodules is not a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import megatron_muon

PACKAGE = "megatron_muon"
ROOT = Path(megatron_muon.__file__).resolve().parent
ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
ORDER_HEADING = "The package order, lowest first"


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under ``root`` (``pkg/__init__.py`` is ``pkg``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking_guard(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree`` that can execute, at any depth, except under ``if TYPE_CHECKING``."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking_guard(node):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
    return found


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the package that ``module`` (source ``path``) imports when it runs."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            if node.level:  # relative: from the module's own package, one level up per extra dot
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one, otherwise a name of pkg.
            names = [
                f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix
                for alias in node.names
            ]
        for name in names:
            # `import a.b.c` of a name that is not a module (an attribute) lands on its longest module prefix.
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {module: imported_modules(module, path, modules) for module, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted; sorted by first name."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = lowlink[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                lowlink[node] = min(lowlink[node], lowlink[successor])
            elif successor in on_stack:
                lowlink[node] = min(lowlink[node], index[successor])
        if lowlink[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def describe_cycle(component: list[str], graph: dict[str, set[str]]) -> str:
    """One line: the component's modules and the imports between them."""
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return f"import cycle among {', '.join(component)}: " + "; ".join(edges)


def package_levels(text: str) -> dict[str, int]:
    """Package (or top-level module) -> its line in the package order, 0 the lowest: the first ```text block after
    the sentence ``ORDER_HEADING`` of ``text`` (docs/architecture.md), one line per level, names apart by spaces."""
    start = text.index(ORDER_HEADING)
    opening = text.index("```text\n", start) + len("```text\n")
    block = text[opening : text.index("```", opening)]
    levels: dict[str, int] = {}
    for level, line in enumerate(line for line in block.splitlines() if line.strip()):
        for name in line.split():
            assert name not in levels, f"{name} is on two lines of the package order"
            levels[name] = level
    return levels


def _package(module: str) -> str | None:
    """``megatron_muon.config.cli`` -> ``config``; ``megatron_muon.mup`` -> ``mup``; the root package -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(graph: dict[str, set[str]], levels: dict[str, int]) -> list[str]:
    """One line per import of a package at the importer's own level or above (the root package, which only holds
    the version, is no level and imports nothing of ours)."""
    found = []
    for module in sorted(graph):
        source = _package(module)
        for target in sorted(graph[module]):
            imported = _package(target)
            if source is None or imported is None or imported == source:
                continue
            if levels[imported] >= levels[source]:
                where = "on its line" if levels[imported] == levels[source] else "above it"
                found.append(f"{module} -> {target}: {imported} is {where} in the package order of {source}")
    return found


def test_the_graph_reader_finds_function_level_cycles_and_ignores_type_checking_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg.a import A\n")
    (package / "a.py").write_text("from pkg.sub import b\nA = 1\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import A\n    return A\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\nimport pkg.sub.b\n"
    )
    modules = module_files(package, "pkg")
    graph = import_graph(modules)
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.a"},
        "pkg.c": {"pkg.sub.b"},
    }
    assert import_cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_the_order_check_finds_upward_and_sideways_imports():
    levels = package_levels(f"{ORDER_HEADING}:\n\n```text\nops  mup\nconfig\nmodels  data\n```\n")
    assert levels == {"ops": 0, "mup": 0, "config": 1, "models": 2, "data": 2}
    graph = {
        "pkg.config.cli": {"pkg.models.count", "pkg.config.schema", "pkg.ops.rules"},  # upward: models
        "pkg.config.schema": {"pkg.mup"},
        "pkg.models.count": {"pkg.config.schema", "pkg.data.files"},  # sideways: data
        "pkg.ops.rules": {"pkg"},
        "pkg": set(),
    }
    assert upward_imports(graph, levels) == [
        "pkg.config.cli -> pkg.models.count: models is above it in the package order of config",
        "pkg.models.count -> pkg.data.files: data is on its line in the package order of models",
    ]
    assert import_cycles(graph) == []  # the loop config -> models -> config runs through different modules


def test_every_package_has_a_place_in_the_documented_order():
    levels = package_levels(ARCHITECTURE.read_text())
    packages = {_package(module) for module in module_files()} - {None}
    assert packages == set(levels), (
        f"not in the package order of docs/architecture.md: {sorted(packages - set(levels))}; "
        f"in it but not a package: {sorted(set(levels) - packages)}"
    )


def test_imports_point_down_the_package_order():
    """docs/architecture.md's package order holds for every import that can execute."""
    upward = upward_imports(import_graph(module_files()), package_levels(ARCHITECTURE.read_text()))
    assert not upward, "\n".join(upward)


def test_no_import_cycle_in_the_package():
    graph = import_graph(module_files())
    cycles = [describe_cycle(component, graph) for component in import_cycles(graph)]
    assert not cycles, "\n".join(cycles)


def test_every_module_imports_in_a_fresh_interpreter():
    modules = sorted(module_files())
    script = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc().strip().splitlines()[-1])\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"modules that do not import:\n{result.stdout}{result.stderr[-3000:]}"
