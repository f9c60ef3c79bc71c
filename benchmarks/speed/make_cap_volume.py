"""A 512x512x300 chest-abdomen-pelvis test CT for issue 30's end-to-end target, built from the shared real volumes.

No real 512x512x300 chest-abdomen-pelvis scan is here, so this is a **composite test volume, not a patient**: two
real CTs stacked along the body axis on one grid (0.703 mm pixels, the same slice spacing throughout):

- top (superior): LIDC-IDRI-0001, chest and upper abdomen (512x512x133 at 2.5 mm), resampled in z only;
- bottom (inferior): the TotalSegmentator ``example_ct``, upper abdomen to pelvis (122x101x112 at 3 mm), resampled
  to 0.703 mm pixels, centred in the 512x512 field of view.

The slice spacing is chosen so that both physical extents together make 300 slices (about 2.23 mm). The upper
abdomen appears in both parts (LIDC's lowest slices, example_ct's highest), so the organs span more slices than in
one real patient: the slab search encodes more than it would on a real scan (a conservative case for the time).
Linear interpolation, air (-1024 HU) outside each source, int16 (as Slicer holds a CT from DICOM). Deterministic:
the same inputs give the same voxels; ``cap_512x512x300.json`` beside the volume records the SHA-256 of the voxels
and geometry and where each slice comes from.

    python benchmarks/speed/make_cap_volume.py /path/to/cache            # -> /path/to/cache/cap_512x512x300.nrrd
    python benchmarks/speed/make_cap_volume.py /tmp/cap --slices 20      # a small version for tests

The cache folder must be outside the repository (the volume is ~60 MB compressed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPOSITORY = Path(__file__).resolve().parents[2]
DATA = REPOSITORY.parent / "shared" / "data" / "real"
TOP = "lidc-idri-0001/ct.nii.gz"
BOTTOM = "totalsegmentator/example_ct.nii.gz"
SIZE_XY = 512
AIR_HU = -1024


def z_extent_mm(image: sitk.Image) -> float:
    return image.GetSize()[2] * image.GetSpacing()[2]


def part_on_grid(image: sitk.Image, pixel_mm: float, slices: int, direction: tuple[float, ...]) -> np.ndarray:
    """``image`` resampled (linear) to [slices, 512, 512] int16: in plane centred on its own centre at ``pixel_mm``,
    in z over its whole extent; axes along ``direction`` (the output's)."""
    size = image.GetSize()
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size])
    step = z_extent_mm(image) / slices
    axes = np.asarray(direction, dtype=float).reshape(3, 3)
    spacing = np.array([pixel_mm, pixel_mm, step])
    half = np.array([(SIZE_XY - 1) / 2, (SIZE_XY - 1) / 2, (slices - 1) / 2])
    origin = np.asarray(centre) - axes @ (spacing * half)
    resampled = sitk.Resample(image, [SIZE_XY, SIZE_XY, slices], sitk.Transform(), sitk.sitkLinear,
                              origin.tolist(), spacing.tolist(), list(direction), float(AIR_HU), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(resampled)  # [z, y, x], z increasing along the output's third axis
    return np.clip(np.rint(array), -32768, 32767).astype(np.int16)


def build(data: Path, slices: int) -> tuple[sitk.Image, dict]:
    """The composite volume (``slices`` slices of 512x512) and its provenance record."""
    top, bottom = sitk.ReadImage(str(data / TOP)), sitk.ReadImage(str(data / BOTTOM))
    direction = top.GetDirection()  # LIDC's axes: x left, y anterior (flipped), z superior
    if np.asarray(direction).reshape(3, 3)[2, 2] <= 0:
        raise SystemExit(f"{TOP}: expected slices ordered from inferior to superior")
    pixel_mm = top.GetSpacing()[0]
    extent = z_extent_mm(top) + z_extent_mm(bottom)
    top_slices = int(round(slices * z_extent_mm(top) / extent))
    bottom_slices = slices - top_slices
    # z increases towards the head: the pelvis part first (lowest indices), the chest part above it
    array = np.concatenate([part_on_grid(bottom, pixel_mm, bottom_slices, direction),
                            part_on_grid(top, pixel_mm, top_slices, direction)])
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((pixel_mm, pixel_mm, extent / slices))
    image.SetDirection(direction)
    corner = top.TransformIndexToPhysicalPoint((0, 0, 0))  # LIDC's in-plane grid; its lowest slice moved down
    image.SetOrigin((corner[0], corner[1], corner[2] - z_extent_mm(bottom)))
    digest = hashlib.sha256(array.tobytes())
    digest.update(repr((image.GetSpacing(), image.GetOrigin(), image.GetDirection())).encode())
    record = {
        "what": "composite test volume, not a patient: LIDC-IDRI-0001 (chest, upper abdomen) stacked above "
                "TotalSegmentator example_ct (upper abdomen to pelvis); the upper abdomen appears in both parts",
        "size_xyz": list(image.GetSize()), "spacing_mm": [round(s, 4) for s in image.GetSpacing()],
        "slices_from": {f"0-{bottom_slices - 1}": BOTTOM, f"{bottom_slices}-{slices - 1}": TOP},
        "sha256_voxels_and_geometry": digest.hexdigest(),
        "command": "python benchmarks/speed/make_cap_volume.py " + " ".join(sys.argv[1:]),
    }
    return image, record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cache", type=Path, help="folder to write into (outside the repository)")
    parser.add_argument("--slices", type=int, default=300, help="slices of the volume (300: the issue's size)")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared real data folder")
    args = parser.parse_args()
    cache = args.cache.resolve()
    if cache == REPOSITORY or REPOSITORY in cache.parents:
        parser.error(f"the cache folder must be outside the repository ({REPOSITORY}): the volume is large")
    if args.slices < 2:
        parser.error("--slices must be at least 2")
    for name in (TOP, BOTTOM):
        if not (args.data / name).is_file():
            parser.error(f"{args.data / name} is missing: give the shared real data folder with --data")
    image, record = build(args.data, args.slices)
    cache.mkdir(parents=True, exist_ok=True)
    stem = f"cap_{SIZE_XY}x{SIZE_XY}x{args.slices}"
    sys.path.insert(0, str(REPOSITORY / "HSAMSlicer"))
    from hsam import atomic

    with atomic.replacing(cache / f"{stem}.nrrd", suffix=".nrrd") as temp:
        sitk.WriteImage(image, str(temp), True)
    (cache / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({"volume": str(cache / f"{stem}.nrrd"), **record}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
