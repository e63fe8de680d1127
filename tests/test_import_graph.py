"""The arrows between the project's modules point one way: no import cycle, no import upwards.

``convert/`` and the CLI -> ``gptoss_jax`` -> ``pallas_kernels`` (docs/development.md's Layout);
``benchmarks/`` and ``tests/`` stand on all of them, and no cycle runs through them either.
Every import statement counts, wherever it stands (in a function, under ``TYPE_CHECKING``):
deferring an import hides a cycle from Python, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gptoss_jax", "pallas_kernels", "convert", "benchmarks")


def helper_modules(root: Path) -> dict[str, Path]:
    """The modules of ``root/tests``, by the top-level names pytest imports them under."""
    return {path.stem: path for path in sorted((root / "tests").glob("*.py"))}


# Folders whose code nothing of the packages may import; tests/ also holds top-level helper
# modules (pytest puts tests/ on sys.path), so each of its module names counts as well.
NEVER_IMPORTED = ("convert", "benchmarks", "tests", *helper_modules(REPO))


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Every module of ``packages`` under ``root``, by dotted name (a package by its own name)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    """The dotted names of everything ``module`` (the file ``path``) imports, anywhere in it.

    ``from package import name`` gives ``package.name``, which :func:`import_graph` takes for the
    submodule ``name`` where there is one and for ``package`` where ``name`` is defined in it.
    """
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                parents = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(parents + ([node.module] if node.module else []))
            else:
                base = node.module
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules among ``modules`` that it imports (a name's longest module prefix)."""
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(module, path):
            parts = name.split(".")
            prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
            target = next((prefix for prefix in prefixes if prefix in modules), None)
            if target is not None and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order, the first repeated last), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            cycle = visit(target)
            if cycle is not None:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle is not None:
            return cycle
    return None


def imports_from(modules: dict[str, Path], package: str, forbidden: tuple[str, ...]) -> list[str]:
    """``module -> name`` for each import in ``package`` of a name under one of ``forbidden``."""
    found = []
    for module, path in modules.items():
        if module.split(".")[0] != package:
            continue
        for name in sorted(imported_names(module, path)):
            if name.split(".")[0] in forbidden:
                found.append(f"{module} -> {name}")
    return found


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return module_files(REPO, PACKAGES) | helper_modules(REPO)


def test_the_project_has_no_import_cycle(modules):
    graph = import_graph(modules)
    assert {"gptoss_jax.checkpoints.loading", "pallas_kernels.mxfp4_moe", "convert.__main__",
            "benchmarks.gpu.e2e", "benchmarks.memory.budget", "harmony_cases", "test_engine"} <= set(graph)
    assert "benchmarks.gpu.e2e" in graph["benchmarks.memory.budget"]
    assert "harmony_cases" in graph["test_harmony_openai"]
    assert "pallas_kernels.mxfp4" in graph["gptoss_jax.config"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_kernels_import_nothing_of_the_library(modules):
    assert imports_from(modules, "pallas_kernels", ("gptoss_jax", *NEVER_IMPORTED)) == []


def test_the_library_imports_no_script_benchmark_or_test(modules):
    assert imports_from(modules, "gptoss_jax", NEVER_IMPORTED) == []


def test_the_conversion_script_stands_on_the_library(modules):
    assert "gptoss_jax.cli" in import_graph(modules)["convert.__main__"]


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg.sub import b\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("def late():\n    from ..a import name\n")
    (tmp_path / "pkg" / "c.py").write_text("import pkg.a\n")
    graph = import_graph(module_files(tmp_path, ("pkg",)))
    assert graph["pkg.c"] == {"pkg.a"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (tmp_path / "pkg" / "sub" / "b.py").write_text("import os\n")
    assert find_cycle(import_graph(module_files(tmp_path, ("pkg",)))) is None
