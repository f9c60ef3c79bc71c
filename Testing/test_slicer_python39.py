"""The module's code under Python 3.9 rules: the declared minimum Slicer (5.6) runs Python 3.9, in Slicer's process
(the Logic and what it imports) and in the child (``PythonSlicer -m hsam``, the whole package).

No 3.9 interpreter is available here, so the rules are checked on the source: the 3.9 grammar
(``ast.parse(feature_version=(3, 9))``: no ``match``, no parenthesised context managers, no ``except*``), ``X | Y`` in
annotations only where ``from __future__ import annotations`` keeps them unevaluated (never in HSAMSlicer.py, whose
parameterNodeWrapper evaluates them), and none of the 3.10+ runtime calls ``zip(strict=)``, ``isinstance(x, A | B)``,
``dataclass(slots=/kw_only=)``.
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[1] / "HSAMSlicer"
FILES = sorted(p for p in MODULE.rglob("*.py") if ".egg-info" not in str(p))


def _has_future_annotations(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
               and any(alias.name == "annotations" for alias in node.names) for node in tree.body)  # fmt: skip


def _annotations(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            arguments += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
            yield from (a.annotation for a in arguments if a.annotation is not None)
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


def _union(node: ast.AST) -> bool:
    return any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(node))


def _parenthesised(lines: list[str], node: ast.AST) -> bool:
    """``with (a as x, b as y):``: the parenthesis after ``with`` closes right before the header's colon."""
    header = [line[node.col_offset:] for line in lines[node.lineno - 1 : max(node.body[0].lineno - 1, node.lineno)]]
    tokens = [t for t in tokenize.generate_tokens(io.StringIO("\n".join(header) + "\n").readline)
              if t.type == tokenize.OP or t.type == tokenize.NAME]  # fmt: skip
    start = 2 if tokens[0].string == "async" else 1
    if len(tokens) <= start or tokens[start].string != "(":
        return False
    depth = 0
    for index in range(start, len(tokens)):
        depth += {"(": 1, ")": -1}.get(tokens[index].string, 0)
        if depth == 0:
            return index + 1 < len(tokens) and tokens[index + 1].string == ":"
    return False


def python39_problems(path: Path) -> list[str]:
    """What would fail on Python 3.9 in ``path`` (empty: nothing found)."""
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source, filename=str(path), feature_version=(3, 9))
    except SyntaxError as error:
        return [f"{path.name}:{error.lineno}: not 3.9 syntax ({error.msg})"]
    problems = []
    if not _has_future_annotations(tree):
        problems += [f"{path.name}:{a.lineno}: X | Y annotation is evaluated on 3.9" for a in _annotations(tree)
                     if _union(a)]  # fmt: skip
    lines = source.splitlines()
    for node in ast.walk(tree):
        if isinstance(node, (ast.With, ast.AsyncWith)) and len(node.items) > 1 and _parenthesised(lines, node):
            problems.append(f"{path.name}:{node.lineno}: parenthesised context managers need 3.10")
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        keywords = {k.arg for k in node.keywords}
        if name == "zip" and "strict" in keywords:
            problems.append(f"{path.name}:{node.lineno}: zip(strict=) needs 3.10")
        if name in ("isinstance", "issubclass") and len(node.args) == 2 and _union(node.args[1]):
            problems.append(f"{path.name}:{node.lineno}: {name}(x, A | B) needs 3.10")
        if name == "dataclass" and keywords & {"slots", "kw_only"}:
            problems.append(f"{path.name}:{node.lineno}: dataclass(slots=/kw_only=) needs 3.10")
    return problems


def test_every_module_file_follows_python_39_rules():
    assert len(FILES) > 50 and MODULE / "HSAMSlicer.py" in FILES
    problems = [problem for path in FILES for problem in python39_problems(path)]
    assert problems == []


def test_the_checks_catch_what_breaks_on_39(tmp_path):
    """Each rule finds its case (so the test above can fail)."""
    cases = {
        "match.py": "match x:\n    case 1:\n        pass\n",
        "with.py": "with (open('a') as a, open('b') as b):\n    pass\n",
        "with2.py": "with (\n    open('a') as a,\n    open('b') as b,\n):\n    pass\n",
        "union.py": "def f(x: int | None) -> None:\n    pass\n",
        "zip.py": "zip([1], [2], strict=True)\n",
        "isinstance.py": "isinstance(1, int | str)\n",
        "slots.py": "from dataclasses import dataclass\n@dataclass(slots=True)\nclass A:\n    x: int\n",
    }
    for name, source in cases.items():
        (tmp_path / name).write_text(source)
        assert python39_problems(tmp_path / name), name
    (tmp_path / "fine.py").write_text("from __future__ import annotations\ndef f(x: int | None) -> list[int]:\n"
                                      "    with (open('a')) as a, open('b') as b:\n        return [x or 0]\n")
    assert python39_problems(tmp_path / "fine.py") == []


def test_what_slicers_process_imports_follows_python_39_rules():
    """The Logic's import path, as Slicer's process runs it (headless MRML): every file it loads is checked."""
    pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install -e '.[test]')")
    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "import slicer_headless\n"
        "import HSAMSlicerLib.logic, HSAMSlicerLib.export, HSAMSlicerLib.results, HSAMSlicerLib.process\n"
        "import HSAMSlicerLib.dependencies, HSAMSlicerLib.geometry\n"
        "import hsam.volume.intensity, hsam.labels, hsam.weights.store, hsam.weights.fetch\n"
        "print('\\n'.join(m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)))\n"
    ) % str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = {Path(line).resolve() for line in done.stdout.splitlines() if line.endswith(".py")}
    ours = sorted(p for p in loaded if MODULE in p.parents)
    assert MODULE / "HSAMSlicerLib" / "logic.py" in ours and len(ours) > 5
    assert [problem for path in ours for problem in python39_problems(path)] == []
