"""Reference cases of the forgetting guard: labelled cases a base model was validated on, shipped with the package.

``hsam finetune`` scores the starting model and the new one on them, so the user sees what a fine-tune cost on the
data the base model was good at. A model's reference set is the folder ``reference_cases/<name>/`` (case folders as
the Slicer export writes them) named by its card's ``extra.reference_case``, else by the model's own name; fine-tuned
models inherit the name, so a second fine-tune is guarded by the same cases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "reference_cases"


def reference_cases(card: Any) -> dict[str, Any] | None:
    """The ``reference`` data source (``cases`` format, with its set ``name``) for a model card, or None."""
    extra = getattr(card, "extra", None) or {}
    name = extra.get("reference_case") or getattr(card, "name", None)
    if not name or "/" in name or "\\" in name:
        return None
    folder = REFERENCE_DIR / name
    return {"format": "cases", "root": str(folder), "name": name} if folder.is_dir() else None
