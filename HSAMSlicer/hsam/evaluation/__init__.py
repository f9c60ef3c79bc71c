"""Segmentation metrics and reports: Dice and HD95 (mm) per organ per volume, and H-SAM's reference protocol.

Only numpy/scipy/SimpleITK and :mod:`hsam.labels` are used, so training can import it for validation.
"""

from hsam.evaluation.metrics import PROTOCOLS, OrganScore, dice, dice_per_organ, hd95, score_organ, score_volume
from hsam.evaluation.report import (
    LabelVolume,
    Row,
    evaluate_files,
    evaluate_volumes,
    markdown_summary,
    pair_files,
    read_label_volume,
    resolve_label_map,
    summarize,
    write_csv,
    write_summary,
)

__all__ = [
    "PROTOCOLS", "OrganScore", "dice", "dice_per_organ", "hd95", "score_organ", "score_volume",
    "LabelVolume", "Row", "evaluate_files", "evaluate_volumes", "markdown_summary", "pair_files",
    "read_label_volume", "resolve_label_map", "summarize", "write_csv", "write_summary",
]
