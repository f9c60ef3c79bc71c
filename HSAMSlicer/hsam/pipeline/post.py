"""Post-process stage: optional clean-up of the labels after the body mask."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def keep_largest_components(labels: np.ndarray, values: Sequence[int] | None = None) -> np.ndarray:
    """In place: for each label value of ``labels`` [z,H,W] keep only its largest 26-connected component (the rest
    becomes 0)."""
    from scipy import ndimage

    present = [int(v) for v in (values if values is not None else np.unique(labels)) if v != 0]
    boxes = ndimage.find_objects(labels)  # bounding boxes per label value, cheap on a uint8 volume
    structure = np.ones((3, 3, 3), dtype=bool)
    for value in present:
        if value - 1 >= len(boxes) or boxes[value - 1] is None:
            continue
        box = boxes[value - 1]
        region = labels[box]
        components, count = ndimage.label(region == value, structure=structure)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        region[(components != 0) & (components != int(sizes.argmax()))] = 0
    return labels
