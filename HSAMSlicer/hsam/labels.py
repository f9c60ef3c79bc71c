"""The one label table of HSAMSlicer: the eight H-SAM organs, their colours and SNOMED CT terminology.

Label order follows H-SAM's ``test.py`` (``class_to_name``): 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder,
5 liver, 6 stomach, 7 aorta, 8 pancreas; 0 is background. Every type exists in Slicer's "DICOM master list"
terminology context, so no custom ``.term.json`` is needed. Left and right kidney get different display colours
(the terminology lists the same colour for both, which makes them indistinguishable on screen).

This module uses the standard library only (numpy is imported lazily by :func:`remap_labels`).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from hsam import atomic

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

# A code as DICOM/Slicer write it: (coding scheme designator, code value, code meaning).
Code = tuple[str, str, str]

TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE: Code = ("SCT", "123037004", "Anatomical Structure")
NO_CODE: Code = ("", "", "")


@dataclass(frozen=True)
class Organ:
    """One H-SAM output class: label value, names, display colour and terminology codes."""

    index: int
    name: str  # machine name, e.g. "kidney_right"
    display_name: str  # Slicer's label for the type+modifier, e.g. "right kidney"
    rgb: tuple[int, int, int]
    type_code: Code
    modifier_code: Code = NO_CODE

    @property
    def rgb_float(self) -> tuple[float, float, float]:
        """The colour as three floats in [0, 1] (what .seg.nrrd and VTK use)."""
        return tuple(round(c / 255.0, 6) for c in self.rgb)  # type: ignore[return-value]

    @property
    def terminology_entry(self) -> str:
        """Slicer's seven-part ``TerminologyEntry`` tag value (context~category~type~modifier~region context~...)."""
        parts = [
            TERMINOLOGY_CONTEXT,
            "^".join(ANATOMICAL_STRUCTURE),
            "^".join(self.type_code),
            "^".join(self.modifier_code),
            ANATOMIC_CONTEXT,
            "^".join(NO_CODE),
            "^".join(NO_CODE),
        ]
        return "~".join(parts)


_KIDNEY: Code = ("SCT", "64033007", "Kidney")

# Display colours: the terminology's recommended colours make liver, stomach, right kidney and aorta almost the same
# red-brown (CIE76 distance 3.7 between liver and stomach), so each organ gets its own hue here (smallest distance
# between any two: 37.8). The terminology codes, not the colours, say what a segment is.
ORGANS: tuple[Organ, ...] = (
    Organ(1, "spleen", "spleen", (157, 108, 162), ("SCT", "78961009", "Spleen")),
    Organ(2, "kidney_right", "right kidney", (240, 200, 60), _KIDNEY, ("SCT", "24028007", "Right")),
    Organ(3, "kidney_left", "left kidney", (111, 184, 210), _KIDNEY, ("SCT", "7771000", "Left")),
    Organ(4, "gallbladder", "gallbladder", (86, 172, 74), ("SCT", "28231008", "Gallbladder")),
    Organ(5, "liver", "liver", (221, 130, 101), ("SCT", "10200004", "Liver")),
    Organ(6, "stomach", "stomach", (64, 96, 200), ("SCT", "69695003", "Stomach")),
    Organ(7, "aorta", "aorta", (200, 30, 45), ("SCT", "15825003", "Aorta")),
    Organ(8, "pancreas", "pancreas", (220, 60, 180), ("SCT", "15776009", "Pancreas")),
)

CLASS_NAMES: tuple[str, ...] = ("background",) + tuple(o.name for o in ORGANS)
"""Names by label value, background at 0: what a model card's ``classes`` holds for the H-SAM organs."""

# Mappings from other label schemes to H-SAM label values; every label not listed maps to 0 (background).
LABEL_MAPS: dict[str, dict[int, int]] = {
    # BTCV/Synapse original labels -> H-SAM (H-SAM preprocess/README.md).
    "btcv": {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 11: 8},
    # TotalSegmentator v2 "total": only aorta (52) and pancreas (7) move.
    "totalseg_total": {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 52: 7, 7: 8},
    # TotalSegmentator "total_mr": aorta is 23.
    "totalseg_total_mr": {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 23: 7, 7: 8},
}

COLOR_TABLE_COLUMNS: tuple[str, ...] = (
    "LabelValue", "Name", "Color_R", "Color_G", "Color_B", "Color_A",
    "Category_CodingScheme", "Category_CodeValue", "Category_CodeMeaning",
    "Type_CodingScheme", "Type_CodeValue", "Type_CodeMeaning",
    "TypeModifier_CodingScheme", "TypeModifier_CodeValue", "TypeModifier_CodeMeaning",
    "Region_CodingScheme", "Region_CodeValue", "Region_CodeMeaning",
    "RegionModifier_CodingScheme", "RegionModifier_CodeValue", "RegionModifier_CodeMeaning",
)  # fmt: skip
COLOR_TABLE_FILENAME = "hsam_labels.csv"


def organ(key: int | str) -> Organ:
    """The organ with this label value (1..8) or name (``"liver"``, ``"kidney_left"``, or its display name)."""
    for entry in ORGANS:
        if key == entry.index or key == entry.name or key == entry.display_name:
            return entry
    raise KeyError(f"no H-SAM organ {key!r}; known: {', '.join(o.name for o in ORGANS)}")


def remap_labels(array: "np.ndarray", mapping: Mapping[int, int] | str) -> "np.ndarray":
    """Map label values through ``mapping`` (a dict or a :data:`LABEL_MAPS` key); unlisted values become 0.

    Returns a new uint8 array of the same shape. Works for any integer array (e.g. TotalSegmentator's 0..117).
    """
    import numpy as np

    table = LABEL_MAPS[mapping] if isinstance(mapping, str) else dict(mapping)
    values = np.asarray(array)
    if values.dtype.kind not in "iub":
        if not np.all(np.mod(values, 1) == 0):
            raise ValueError("label arrays must hold whole numbers")
        values = values.astype(np.int64)
    lo = min(0, int(values.min()) if values.size else 0)
    hi = max([int(values.max()) if values.size else 0] + list(table))
    lut = np.zeros(hi - lo + 1, dtype=np.uint8)
    for source, target in table.items():
        lut[source - lo] = target
    return lut[values.astype(np.int64) - lo]


def color_table_rows() -> list[dict[str, str | int]]:
    """The label table as rows of a Slicer colour-table CSV (one per organ; background is not listed)."""
    rows: list[dict[str, str | int]] = []
    for entry in ORGANS:
        row: dict[str, str | int] = {
            "LabelValue": entry.index,
            "Name": entry.name,
            "Color_R": entry.rgb[0],
            "Color_G": entry.rgb[1],
            "Color_B": entry.rgb[2],
            "Color_A": 255,
        }
        for prefix, code in (
            ("Category", ANATOMICAL_STRUCTURE),
            ("Type", entry.type_code),
            ("TypeModifier", entry.modifier_code),
            ("Region", NO_CODE),
            ("RegionModifier", NO_CODE),
        ):
            row[f"{prefix}_CodingScheme"], row[f"{prefix}_CodeValue"], row[f"{prefix}_CodeMeaning"] = code
        rows.append(row)
    return rows


def color_table_csv() -> str:
    """The label table as the text of a Slicer colour-table CSV file with terminology columns (Slicer >= 5.10)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLOR_TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(color_table_rows())
    return buffer.getvalue()


def write_color_table(path: str | os.PathLike[str]) -> Path:
    """Write :func:`color_table_csv` to ``path`` atomically; returns the path."""
    return atomic.write_text(path, color_table_csv())


def segment_metadata(indices: list[int] | None = None) -> list[dict]:
    """Per-organ segment descriptions in slicerio's format (id, name, labelValue, colour, terminology dict)."""
    chosen = [organ(i) for i in indices] if indices is not None else list(ORGANS)
    segments = []
    for entry in chosen:
        terminology = {
            "contextName": TERMINOLOGY_CONTEXT,
            "category": list(ANATOMICAL_STRUCTURE),
            "type": list(entry.type_code),
            "anatomicContextName": ANATOMIC_CONTEXT,
        }
        if entry.modifier_code != NO_CODE:
            terminology["typeModifier"] = list(entry.modifier_code)
        segments.append(
            {
                "id": f"Segment_{entry.index}",
                "name": entry.display_name,
                "labelValue": entry.index,
                "layer": 0,
                "color": list(entry.rgb_float),
                "terminology": terminology,
            }
        )
    return segments


if __name__ == "__main__":  # regenerate Resources/hsam_labels.csv: python -m hsam.labels
    from hsam.paths import resources_dir

    print(write_color_table(resources_dir() / COLOR_TABLE_FILENAME))
