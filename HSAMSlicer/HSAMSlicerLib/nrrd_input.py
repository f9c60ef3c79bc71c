"""Write a volume node's voxels for the child as a raw NRRD, straight from Slicer's own buffer.

A 512x512x600 CT is 300 MiB of int16 (600 MiB as float32). Going through SimpleITK costs a full copy in Slicer's
process (``GetImageFromArray``) before the write; this writes the header and then the array's memory as it is, in
the volume's own type, so the peak memory of Slicer stays what the scene already holds. ITK (the child's reader)
reads the file with the full geometry: ``space directions`` and ``space origin`` in LPS.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
_NRRD_TYPES = {
    np.dtype(np.int8): "signed char", np.dtype(np.uint8): "uchar", np.dtype(np.int16): "short",
    np.dtype(np.uint16): "ushort", np.dtype(np.int32): "int", np.dtype(np.uint32): "uint",
    np.dtype(np.int64): "longlong", np.dtype(np.uint64): "ulonglong", np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
}  # fmt: skip


def _vector(values) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def write_volume_nrrd(array_kji: np.ndarray, ijk_to_ras: np.ndarray, path: Path) -> Path:
    """Write ``array_kji`` ([K, J, I], any NRRD scalar type) placed by the 4x4 ``ijk_to_ras`` matrix as a raw NRRD.
    No copy of the voxels is made when the array is C-contiguous (Slicer's are)."""
    kind = _NRRD_TYPES.get(array_kji.dtype.newbyteorder("="))
    if kind is None:
        raise ValueError(f"voxel type {array_kji.dtype} cannot be written to NRRD")
    matrix = np.asarray(ijk_to_ras, dtype=float)
    axes = RAS_TO_LPS @ matrix[:3, :3]  # column n: the LPS step of voxel index n (i, j, k)
    size_k, size_j, size_i = array_kji.shape
    byte_order = array_kji.dtype.byteorder
    little = byte_order == "<" or (byte_order in ("=", "|") and sys.byteorder == "little")
    header = "\n".join([
        "NRRD0004", f"type: {kind}", "dimension: 3", "space: left-posterior-superior",
        f"sizes: {size_i} {size_j} {size_k}",
        "space directions: " + " ".join(_vector(axes[:, n]) for n in range(3)),
        "kinds: domain domain domain", f"endian: {'little' if little else 'big'}", "encoding: raw",
        "space origin: " + _vector(RAS_TO_LPS @ matrix[:3, 3]),
    ]) + "\n\n"  # fmt: skip
    with open(path, "wb") as handle:
        handle.write(header.encode("ascii"))
        handle.write(memoryview(np.ascontiguousarray(array_kji)).cast("B"))
    return path
