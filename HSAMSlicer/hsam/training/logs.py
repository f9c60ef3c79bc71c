"""Training logs: a CSV of per-epoch metrics, a PNG training curve (matplotlib, headless), optional TensorBoard."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

from hsam import atomic


def write_csv(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """One row per epoch; columns are the union of keys in first-seen order (validation columns appear later)."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    atomic.write_bytes(path, buffer.getvalue().encode("utf-8"))


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def plot_curve(path: Path, history: Sequence[dict[str, Any]], title: str = "") -> None:
    """Loss per epoch (and stage losses) on the left, training/validation Dice on the right."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4), dpi=100)
    left, right = figure.subplots(1, 2)
    for key, label in (("loss", "total"), ("loss_stage1", "stage 1"), ("loss_stage2", "stage 2")):
        left.plot(epochs, [row.get(key, math.nan) for row in history], label=label)
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    left.grid(alpha=0.3)
    right.plot(epochs, [row.get("train_dice", math.nan) for row in history], label="train (augmented batches)")
    val = [(row["epoch"], row["val_dice"]) for row in history if not _missing(row.get("val_dice"))]
    if val:
        right.plot(*zip(*val), marker="o", label="validation")
    right.set_xlabel("epoch")
    right.set_ylabel("mean organ Dice")
    right.set_ylim(0, 1)
    right.legend()
    right.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic.write_bytes(path, buffer.getvalue())


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class TensorBoard:
    """Scalars to TensorBoard when ``torch.utils.tensorboard`` works (the ``tensorboard`` package); else a no-op."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(folder))
            except Exception:  # not installed (ImportError) or a broken install: logging is optional
                self.writer = None

    def log(self, row: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "epoch" and not _missing(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
