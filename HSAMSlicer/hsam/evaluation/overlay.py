"""A PNG preview of a segmentation: organ labels over a few axial CT slices (``hsam segment --overlay``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from hsam import atomic
from hsam import labels as label_table


def pick_slices(labels: np.ndarray, count: int = 4) -> list[int]:
    """``count`` axial indices spread over the slices that contain any organ (or over the whole volume)."""
    occupied = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    first, last = (int(occupied[0]), int(occupied[-1])) if occupied.size else (0, labels.shape[0] - 1)
    picks = np.linspace(first, last, count + 2)[1:-1] if last > first else np.array([first])
    return sorted({int(round(p)) for p in picks})


def render_overlay(
    image: sitk.Image,
    labels: sitk.Image,
    path: str | os.PathLike[str],
    class_names: Sequence[str] = label_table.CLASS_NAMES,
    count: int = 4,
    title: str | None = None,
) -> Path:
    """Save a row of ``count`` axial slices (radiological view: patient right on the left, anterior up) as PNG.

    The CT is shown with an abdominal window [-160, 240] HU; labels use the colours of :mod:`hsam.labels` (other
    class names get matplotlib's tab10 colours). Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    ct = sitk.DICOMOrient(image, "LPS")  # array [z, y, x]: rows anterior->posterior, columns right->left
    seg = sitk.DICOMOrient(labels, "LPS")
    ct_array = sitk.GetArrayViewFromImage(ct)
    label_array = sitk.GetArrayViewFromImage(seg)
    # array z runs inferior->superior; show superior slices first
    indices = pick_slices(label_array, count)[::-1]
    colours = np.zeros((max(len(class_names), 2), 4))
    fallback = plt.get_cmap("tab10")
    for index, name in enumerate(class_names):
        if index == 0:
            continue
        try:
            rgb = np.array(label_table.organ(name).rgb) / 255.0
        except KeyError:
            rgb = np.array(fallback(index % 10)[:3])
        colours[index] = [*rgb, 0.55]
    cmap = ListedColormap(colours)
    spacing = ct.GetSpacing()
    figure, axes = plt.subplots(1, len(indices), figsize=(3.2 * len(indices), 3.6), squeeze=False)
    for axis, z in zip(axes[0], indices):
        axis.imshow(ct_array[z], cmap="gray", vmin=-160, vmax=240, aspect=spacing[1] / spacing[0], interpolation="bilinear")
        axis.imshow(label_array[z], cmap=cmap, vmin=0, vmax=len(colours) - 1, aspect=spacing[1] / spacing[0],
                    interpolation="nearest")
        axis.set_title(f"slice {z}", fontsize=9)
        axis.axis("off")
    present = [i for i in np.unique(label_array) if 0 < i < len(class_names)]
    if present:
        handles = [Patch(color=colours[i][:3], label=class_names[i]) for i in present]
        figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.08 if present else 0, 1, 1))
    try:
        with atomic.replacing(path, suffix=".png") as temp:
            figure.savefig(temp, dpi=110)
    finally:
        plt.close(figure)
    return Path(path)
