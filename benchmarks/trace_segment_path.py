"""Count how one CT travels through ``hsam segment`` (issue 31): modules its data passes through, calls back up.

Method (rerun: ``python benchmarks/trace_segment_path.py SAMPLE.nii.gz [hsam segment options]``):

* **Layers** come from the package's import order: every ``import``/``from ... import`` in ``HSAMSlicer/hsam``
  (module level and inside functions; ``if TYPE_CHECKING:`` blocks left out) is an edge "A needs B". Import circles
  are merged into one node; a module's layer is the length of the longest chain of modules it needs (0: needs no
  other ``hsam`` module). A **call back up** is a call from module A into module B where B needs A (directly or
  through other modules) and the two are not in one import circle: the lower module calls the one built on it,
  which can only happen through a callback or an object handed down (progress, status, a predictor).
* **The path**: ``hsam.cli.main(["segment", ...])`` runs under ``sys.setprofile``; from the moment
  ``hsam.cli.segment.run`` is entered until it returns, every Python call from one ``hsam`` module into another is
  recorded as an edge (caller function -> callee function). A **step** is such an edge whose callee receives the CT's
  data as an argument (a SimpleITK image, a numpy array or a torch tensor: the CT, its slices, or the labels made from
  them), counted once per distinct edge (a loop over batches counts once). Modules: every ``hsam`` module on either
  end of a step. Calls back up: steps from a lower layer into a higher one.

Prints one JSON object (also the counts over all cross-module calls, data or not).
"""

from __future__ import annotations

import ast
import json
import sys
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "HSAMSlicer" / "hsam"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The ``hsam`` modules ``tree`` imports at run time (TYPE_CHECKING blocks left out)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base in known:
                found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


def layers() -> tuple[dict[str, int], dict[str, set[str]]]:
    """``{module: layer}`` for every module of the package (see the module docstring), and what each module needs."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    needs = {m: _imports(ast.parse(p.read_text()), m, p.name == "__init__.py", known) for m, p in files.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    component: dict[str, int] = {}
    counter = [0]

    def strongconnect(node: str) -> None:  # Tarjan: import circles become one component
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        for other in needs[node]:
            if other not in index:
                strongconnect(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            while True:
                member = stack.pop()
                component[member] = index[node]
                if member == node:
                    break

    sys.setrecursionlimit(10000)
    for module in sorted(files):
        if module not in index:
            strongconnect(module)
    members: dict[int, set[str]] = {}
    for module, comp in component.items():
        members.setdefault(comp, set()).add(module)
    depth: dict[int, int] = {}

    def layer_of(comp: int) -> int:
        if comp not in depth:
            below = {component[o] for m in members[comp] for o in needs[m]} - {comp}
            depth[comp] = 1 + max((layer_of(c) for c in below), default=-1)
        return depth[comp]

    return {module: layer_of(component[module]) for module in files}, needs


def _carries_data(frame) -> bool:  # noqa: ANN001
    """True when one of the frame's arguments is image data (SimpleITK image, numpy array, torch tensor)."""
    code = frame.f_code
    names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    for name in names:
        value = frame.f_locals.get(name)
        kind = type(value).__module__ + "." + type(value).__name__
        if kind in ("SimpleITK.SimpleITK.Image", "numpy.ndarray", "torch.Tensor", "torch.nn.parameter.Parameter"):
            if getattr(value, "ndim", 2) >= 2:
                return True
    return False


def trace(argv: list[str]) -> dict:
    """Run ``hsam segment`` with ``argv`` under the profiler and count the path (module docstring)."""
    from hsam.cli import main

    by_file = {str(p.resolve()): _module_name(p) for p in PACKAGE.rglob("*.py")}
    layer, needs = layers()

    def needs_up(callee: str, caller: str) -> bool:
        """True when ``callee`` needs ``caller`` (import chain) and ``caller`` does not need ``callee``."""
        def reaches(start: str, goal: str) -> bool:
            seen, todo = set(), [start]
            while todo:
                module = todo.pop()
                if module == goal:
                    return True
                if module not in seen:
                    seen.add(module)
                    todo.extend(needs.get(module, ()))
            return False
        return reaches(callee, caller) and not reaches(caller, callee)
    edges: dict[tuple[str, str], bool] = {}
    active = [False]

    def profile(frame, event, arg):  # noqa: ANN001, ANN202
        if event != "call":
            return
        callee = by_file.get(frame.f_code.co_filename)
        if callee == "hsam.cli.segment" and frame.f_code.co_name == "run" and not active[0]:
            active[0] = True
            return  # the path starts here: the call into run is not one of its steps
        if not active[0] or callee is None or frame.f_back is None:
            return
        caller = by_file.get(frame.f_back.f_code.co_filename)
        if caller is None or caller == callee:
            return
        key = (f"{caller}:{frame.f_back.f_code.co_name}", f"{callee}:{frame.f_code.co_name}")
        edges[key] = edges.get(key, False) or _carries_data(frame)

    sys.setprofile(profile)
    try:
        code = main(argv)
    finally:
        sys.setprofile(None)

    def counts(chosen: list[tuple[str, str]]) -> dict:
        modules = sorted({side.split(":")[0] for edge in chosen for side in edge})
        up = [e for e in chosen if needs_up(e[1].split(":")[0], e[0].split(":")[0])]
        return {"steps": len(chosen), "modules": len(modules), "calls_back_up": len(up),
                "module_list": modules, "back_up": [f"{a} -> {b}" for a, b in up]}

    data = [e for e, carries in edges.items() if carries]
    return {"argv": argv, "exit_code": code, "data_path": counts(data), "all_cross_module_calls": counts(list(edges)),
            "layers": max(layer.values()) + 1,
            "layer_of": {m: layer[m] for m in sorted({s.split(":")[0] for e in edges for s in e})},
            "edges": [f"{a} -> {b}" + (" (data)" if carries else "") for (a, b), carries in edges.items()]}


if __name__ == "__main__":
    sample = sys.argv[1]
    with tempfile.TemporaryDirectory() as folder:
        report = trace(["segment", sample, "-o", str(Path(folder) / "labels.nii.gz"), "-q", *sys.argv[2:]])
    print(json.dumps(report, indent=1))
