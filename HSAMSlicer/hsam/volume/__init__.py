"""Volume layer: file I/O, reorientation to the model's canonical slice layout and back, intensity windowing.

Uses numpy and SimpleITK only (slicerio for ``.seg.nrrd``); never torch.
"""

from hsam.volume.files import LABEL_SUFFIXES, check_writable, suffix_of
from hsam.volume.grid import onto_grid
from hsam.volume.intensity import looks_like_ct, window
from hsam.volume.io import (
    check_volume,
    read_image,
    read_labels,
    same_geometry,
    write_image,
    write_labels,
    write_segmentation,
)
from hsam.volume.orientation import Grid, Reorientation, code_from_direction, direction_from_code, from_canonical, to_canonical

__all__ = [
    "LABEL_SUFFIXES", "Grid", "Reorientation", "check_volume", "check_writable", "code_from_direction", "direction_from_code",
    "from_canonical", "looks_like_ct", "onto_grid", "read_image", "read_labels", "same_geometry", "suffix_of", "to_canonical",
    "window", "write_image", "write_labels", "write_segmentation",
]  # fmt: skip
