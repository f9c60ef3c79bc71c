"""No function in HSAMSlicer/ is over 100 lines (issue 31: functions fit on a screen).

``python Testing/test_function_length.py`` lists every function with its length, longest first, so a reader can see
how close the longest ones are.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "HSAMSlicer"
LIMIT = 100


def function_lengths(root: Path = ROOT) -> list[tuple[int, str]]:
    """(lines from ``def`` to the last line of the body, "path:line name") of every function and method under
    ``root`` (nested ones included), longest first."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if ".venv" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                where = f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"
                found.append((node.end_lineno - node.lineno + 1, where))
    return sorted(found, reverse=True)


def test_no_function_is_over_100_lines() -> None:
    too_long = [f"{where} ({length} lines)" for length, where in function_lengths() if length > LIMIT]
    assert not too_long, "split these into named steps: " + "; ".join(too_long)


def test_the_count_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    lengths = dict((where.split()[-1], length) for length, where in function_lengths(tmp_path))
    assert lengths == {"long": LIMIT + 1, "short": 2}


if __name__ == "__main__":
    for length, where in function_lengths()[: int(sys.argv[1]) if len(sys.argv) > 1 else 10]:
        print(f"{length:4d}  {where}")
