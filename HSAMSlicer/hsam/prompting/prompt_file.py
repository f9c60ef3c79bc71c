"""The JSON prompt files of ``hsam prompt``: read, check, and turn into canonical per-slice prompts.

Format (every key but "prompts" optional)::

    {"space": "voxel",                 # or "ras" / "lps" (millimetres)
     "propagate": false,               # true: carry each organ's mask beyond its first and last prompted slice
     "limits": {"aorta": {"from": 0, "to": 62}},   # with "propagate": where it stops at the latest, per organ
     "prompts": [
       {"organ": "liver", "slice": 12, "box": [i0, j0, i1, j1]},         # voxel: corners inclusive, any order
       {"organ": "liver", "slice": 14, "point": [i, j], "positive": true},
       {"organ": 1, "z": -120.5, "box": [x0, y0, x1, y1]}                # ras/lps: "z" in mm, corners in mm
     ]}

Voxel positions are (i, j, k) indices of the input file's grid in SimpleITK order ("slice" is k); millimetres are
patient coordinates (RAS as Slicer shows them, LPS as DICOM stores them). Organs: names or label values of
:mod:`hsam.labels`. Between two boxed slices of one organ, the slices without a box get a box interpolated linearly.
"limits" bound propagation per organ, both ends inclusive, each optional: slice indices k in voxel space, axial
positions z in mm in ras/lps space. Every mistake is one :class:`~hsam.errors.HSAMError` line naming the file and the
prompt.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hsam.errors import HSAMError
from hsam.prompting.geometry import SPACES, canonical_shape, to_canonical_position, to_lps
from hsam.prompting.session import INTERPOLATED, Box, SlicePrompt
from hsam.volume.orientation import Reorientation


@dataclass
class PromptPlan:
    """Canonical prompts per (organ label, slice z), whether to propagate beyond each organ's prompted range, and
    how far at most: ``limits[organ]`` = (lowest, highest) canonical slice, None for the volume's end."""

    prompts: dict[tuple[int, int], SlicePrompt] = field(default_factory=dict)
    propagate: bool = False
    limits: dict[int, tuple[int | None, int | None]] = field(default_factory=dict)

    @property
    def organs(self) -> list[int]:
        return sorted({organ for organ, _ in self.prompts})


class _Reader:
    """Checks one prompt file's entries against a volume; ``fail`` raises the one-line error."""

    def __init__(self, name: str, how: Reorientation, space: str) -> None:
        self.name, self.how, self.space = name, how, space
        self.shape = canonical_shape(how)
        self.where = ""

    def fail(self, text: str) -> None:
        raise HSAMError(f"{self.name}: {self.where}{text}")

    def numbers(self, entry: dict, key: str, count: int) -> list[float]:
        value = entry.get(key)
        if not isinstance(value, list) or len(value) != count or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            self.fail(f'"{key}" must be a list of {count} numbers, got {json.dumps(value)}')
        return [float(v) for v in value]

    def organ(self, entry: dict) -> int:
        from hsam.labels import ORGANS, organ

        key = entry.get("organ")
        try:
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise KeyError(key)
            return organ(key).index
        except KeyError:
            self.fail(f'unknown organ {json.dumps(key)}; use one of {", ".join(o.name for o in ORGANS)} or 1-8')
        raise AssertionError  # unreachable: fail raises

    def level(self, entry: dict) -> float:
        """The slice position: voxel k ("slice") or the axial position in mm ("z")."""
        key, other = ("slice", "z") if self.space == "voxel" else ("z", "slice")
        if key not in entry:
            hint = f' ("{other}" is for {"ras/lps" if other == "z" else "voxel"} space)' if other in entry else ""
            self.fail(f'needs "{key}"{hint}')
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(f'"{key}" must be a number, got {json.dumps(value)}')
        if self.space == "voxel" and value != int(value):
            self.fail(f'"slice" must be a whole voxel index, got {value}')
        return float(value)

    def limit(self, value: Any, key: str) -> int:
        """The canonical slice of a "limits" end: slice index k (voxel) or axial position z in mm (ras/lps)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(f'"{key}" must be a number, got {json.dumps(value)}')
        if self.space == "voxel":
            if value != int(value):
                self.fail(f'"{key}" must be a whole slice index k, got {value}')
            size = self.how.reference.size
            corners = [self.canonical(a, b, float(value)) for a, b in ((0, 0), (size[0] - 1, size[1] - 1))]
            return self.slice_of(*corners)
        size = np.array(self.how.reference.size, dtype=float)
        centre = to_lps((size - 1) / 2, "voxel", self.how)  # the volume's centre: only z matters here
        in_plane = centre[:2] * (np.array([-1.0, -1.0]) if self.space == "ras" else 1.0)
        position = self.canonical(float(in_plane[0]), float(in_plane[1]), float(value))
        return int(np.clip(round(position[0]), 0, self.shape[0] - 1))

    def canonical(self, a: float, b: float, level: float) -> np.ndarray:
        """[z, row, col] of in-slice position (a, b) on slice ``level``; checks it lies inside the volume."""
        position = to_canonical_position((a, b, level), self.space, self.how)
        if not all(-0.5 - 1e-6 <= position[d] <= self.shape[d] - 0.5 + 1e-6 for d in range(3)):
            unit = "voxel index" if self.space == "voxel" else f"{self.space.upper()} mm"
            self.fail(f"({a:g}, {b:g}, {level:g}) {unit} is outside the volume")
        return position

    def slice_of(self, *positions: np.ndarray) -> int:
        slices = {int(np.clip(round(p[0]), 0, self.shape[0] - 1)) for p in positions}
        if len(slices) != 1:
            self.fail("the box does not lie on one axial slice of this volume (its k axis is not axial): give it "
                      'in "ras" or "lps" millimetres with "z"')
        return slices.pop()

    def box(self, entry: dict, level: float) -> tuple[int, Box]:
        a0, b0, a1, b1 = self.numbers(entry, "box", 4)
        first, second = self.canonical(a0, b0, level), self.canonical(a1, b1, level)
        pad = 0.5 if self.space == "voxel" else 0.0  # inclusive voxel corners: the box reaches their far edges
        rows, cols = sorted((first[1], second[1])), sorted((first[2], second[2]))
        return self.slice_of(first, second), (cols[0] - pad, rows[0] - pad, cols[1] + pad, rows[1] + pad)

    def point(self, entry: dict, level: float) -> tuple[int, tuple[float, float, bool]]:
        a, b = self.numbers(entry, "point", 2)
        positive = entry.get("positive", True)
        if not isinstance(positive, bool):
            self.fail(f'"positive" must be true or false, got {json.dumps(positive)}')
        position = self.canonical(a, b, level)
        return self.slice_of(position), (float(position[2]), float(position[1]), positive)


def _add(plan: PromptPlan, reader: _Reader, entry: Any) -> None:
    if not isinstance(entry, dict):
        reader.fail(f"must be an object with organ, {'slice' if reader.space == 'voxel' else 'z'} and box or point")
    if "box" not in entry and "point" not in entry:
        reader.fail('needs "box" or "point"')
    organ, level = reader.organ(entry), reader.level(entry)
    if "box" in entry:
        z, box = reader.box(entry, level)
        prompt = plan.prompts.setdefault((organ, z), SlicePrompt())
        if prompt.box is not None:
            reader.fail(f"a second box for the same organ on slice {z}; give one box per organ and slice")
        prompt.box = box
    if "point" in entry:
        z, point = reader.point(entry, level)
        plan.prompts.setdefault((organ, z), SlicePrompt()).points.append(point)


def interpolate_boxes(plan: PromptPlan) -> None:
    """In place: between two boxed slices of one organ, give every slice without a box a linearly interpolated one."""
    for organ in plan.organs:
        boxed = sorted(z for (o, z), p in plan.prompts.items() if o == organ and p.box is not None)
        for low, high in zip(boxed, boxed[1:]):
            first, last = np.array(plan.prompts[(organ, low)].box), np.array(plan.prompts[(organ, high)].box)
            for z in range(low + 1, high):
                t = (z - low) / (high - low)
                prompt = plan.prompts.setdefault((organ, z), SlicePrompt(source=INTERPOLATED))
                prompt.box = tuple(float(v) for v in (1 - t) * first + t * last)  # type: ignore[assignment]


def parse_prompts(data: Any, how: Reorientation, name: str = "prompts") -> PromptPlan:
    """A loaded prompt file -> :class:`PromptPlan` (boxes interpolated) for the volume behind ``how``."""
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list) or not data["prompts"]:
        raise HSAMError(f'{name}: expected an object with a non-empty "prompts" list (see docs/prompting.md)')
    space = data.get("space", "voxel")
    if space not in SPACES:
        raise HSAMError(f'{name}: "space" must be one of {", ".join(SPACES)}, got {json.dumps(space)}')
    propagate = data.get("propagate", False)
    if not isinstance(propagate, bool):
        raise HSAMError(f'{name}: "propagate" must be true or false, got {json.dumps(propagate)}')
    plan = PromptPlan(propagate=propagate)
    reader = _Reader(name, how, space)
    for number, entry in enumerate(data["prompts"], start=1):
        reader.where = f"prompt {number}: "
        _add(plan, reader, entry)
    reader.where = ""
    plan.limits = _limits(data.get("limits"), plan, reader)
    interpolate_boxes(plan)
    return plan


def _limits(data: Any, plan: PromptPlan, reader: _Reader) -> dict[int, tuple[int | None, int | None]]:
    """The file's "limits" ({organ: {"from": a, "to": b}}) -> canonical (lowest, highest) slice per organ."""
    if data is None:
        return {}
    if not plan.propagate:
        reader.fail('"limits" bound propagation: add "propagate": true')
    if not isinstance(data, dict) or not data:
        reader.fail(f'"limits" must be an object like {{"aorta": {{"from": 0, "to": 62}}}}, got {json.dumps(data)}')
    limits = {}
    for key, ends in data.items():
        reader.where = f'limits of {json.dumps(key)}: '
        organ = reader.organ({"organ": int(key) if key.isdigit() else key})
        limits[organ] = _bounds(ends, reader, [z for o, z in plan.prompts if o == organ])
        reader.where = ""
    return limits


def _bounds(ends: Any, reader: _Reader, prompted: list[int]) -> tuple[int | None, int | None]:
    """{"from": a, "to": b} (either optional) -> canonical (lowest, highest) slice around the ``prompted`` ones."""
    if not isinstance(ends, dict) or not ends or set(ends) - {"from", "to"}:
        reader.fail(f'must be an object with "from" and/or "to", got {json.dumps(ends)}')
    slices = [reader.limit(ends[end], end) for end in ("from", "to") if end in ends]
    if len(slices) == 2 and ends["from"] > ends["to"]:
        reader.fail(f'"from" ({ends["from"]}) must not be above "to" ({ends["to"]})')
    if not prompted:
        reader.fail("this organ has no prompt to propagate from")
    if len(slices) == 2:
        low, high = min(slices), max(slices)
    else:  # one end (canonical slices may run against k or z): it bounds the side of the prompts it lies on
        low, high = (slices[0], None) if slices[0] <= min(prompted) else (None, slices[0])
    if (low is not None and min(prompted) < low) or (high is not None and max(prompted) > high):
        reader.fail(f"the prompted slices (canonical {min(prompted)}-{max(prompted)}) lie outside the limits")
    return low, high


def propagation_limits(ends: Any, how: Reorientation, space: str, start: int,
                       name: str = "request") -> tuple[int | None, int | None]:
    """``hsam serve``'s {"from": a, "to": b} in ``space`` -> canonical (lowest, highest) slice around ``start``."""
    if space not in SPACES:
        raise HSAMError(f'{name}: "space" must be one of {", ".join(SPACES)}, got {json.dumps(space)}')
    return _bounds(ends, _Reader(name, how, space), [start])


def read_prompt_file(path: str | Path, how: Reorientation) -> PromptPlan:
    """Read and check a JSON prompt file for the volume behind ``how``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HSAMError(f"prompt file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise HSAMError(f"could not read the prompt file {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise HSAMError(
            f"{path.name} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from None
    return parse_prompts(data, how, path.name)
