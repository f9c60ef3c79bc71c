"""The code's shape, read from the source with ``ast`` (nothing is imported): no import circles, a package root that
holds only its foundations (function length: test_function_length.py).

Import graph: every ``import``/``from ... import`` anywhere in a module (at the top, inside functions, under
``TYPE_CHECKING``) is an edge, because a circle hidden in a function still ties the two modules together.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from conftest import REPOSITORY

SOURCE = REPOSITORY / "HSAMSlicer"
PACKAGE = SOURCE / "hsam"
BENCHMARKS = REPOSITORY / "benchmarks"

FOUNDATIONS = {"__init__.py", "__main__.py", "atomic.py", "errors.py", "labels.py", "paths.py"}
"""What the package root may hold besides folders: what every layer imports."""


def _module_name(path: Path) -> str:
    """``HSAMSlicer/hsam/volume/io.py`` -> ``hsam.volume.io``; a package's ``__init__.py`` -> the package;
    ``benchmarks/lite/stress.py`` -> ``benchmarks/lite/stress`` (scripts, imported by file name from their folder)."""
    if BENCHMARKS in path.parents:
        return path.relative_to(REPOSITORY).with_suffix("").as_posix()
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    """Every module of HSAMSlicer/ (hsam, the Slicer module and its packages) and every benchmark script, by name."""
    files = [*SOURCE.rglob("*.py"), *BENCHMARKS.rglob("*.py")]
    return {_module_name(path): path for path in files if "__pycache__" not in path.parts}


def _imported(node: ast.AST, name: str, path: Path, modules: dict[str, Path]) -> list[str]:
    """The modules of ``modules`` that one import statement in module ``name`` (file ``path``) reaches."""
    if BENCHMARKS in path.parents:  # a script's sibling scripts: `import synth`, `from sources import ...`
        folder = path.parent.relative_to(REPOSITORY).as_posix()
        targets = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        return [f"{folder}/{t}" for t in targets if f"{folder}/{t}" in modules]
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importing module's package
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        # `from a import b` reaches module a.b when b is a module, else (a name defined in a) module a
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    found = []
    for target in targets:
        while target and target not in modules:  # `import hsam.x.y` where only hsam.x is ours
            target = target.rpartition(".")[0]
        if target and target != name:
            found.append(target)
    return found


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """``{module: the modules it imports}`` for HSAMSlicer/ (hsam, HSAMSlicerLib, the module script) and benchmarks/."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(_imported(node, name, path, modules))
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (``[a, b, ..., a]``) per group of modules that import each other (strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(start: str) -> None:  # Tarjan's algorithm, iterative (no recursion limit)
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_one_circle(graph, group) for group in groups]


def _one_circle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group (breadth first)."""
    start = min(group)
    paths = {child: [start, child] for child in sorted(graph[start] & group)}
    queue = list(paths)
    while queue:
        node = queue.pop(0)
        if node == start:
            break
        for child in sorted(graph[node] & group):
            if child not in paths:
                paths[child] = [*paths[node], child]
                queue.append(child)
    return paths[start]


def test_the_graph_sees_imports_in_functions_and_relative_ones():
    graph = import_graph()
    assert "hsam.volume.dicom_series" in graph["hsam.volume.io"]  # imported inside read_dicom_volume
    assert "hsam.model.tiny_vit" in graph["hsam.model.build"]  # imported inside register_builtin
    assert "benchmarks/lite/synth" in graph["benchmarks/lite/stress"]  # a script's sibling
    modules = _modules()
    relative = ast.parse("from .files import atomic_write\nfrom . import io\nfrom ..checks import body_mask").body
    reached = [_imported(node, "hsam.volume.grid", PACKAGE / "volume" / "grid.py", modules) for node in relative]
    assert reached == [["hsam.volume.files"], ["hsam.volume.io"], ["hsam.checks.body_mask"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles (make the imports run one way):\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_package_root_holds_only_its_foundations():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in FOUNDATIONS)
    assert not loose, f"hsam/ holds {loose}: put each module in the folder of its role (checks/, weights/, volume/, ...)"
