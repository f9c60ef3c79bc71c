"""Measure the orientation self-check on real scans: as given, mirrored left-right, mirrored front-back and turned
180 degrees (voxel arrays flipped in-plane, header kept: a scan whose header lies). Prints per case and copy the
check's scores, whether it fired, and its cost against the whole run; writes the table as JSON.

    python benchmarks/orientation/measure_check.py --model hsam-lite-demo -o benchmarks/orientation/results.json \\
        /work/shared/data/real/totalsegmentator/example_ct_sm.nii.gz ...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hsam.inference import segment_volume
from hsam.volume import read_image
from hsam.weights import load_named_model

COPIES = {"as given": (), "mirrored left-right": (2,), "mirrored front-back": (1,), "turned 180 degrees": (1, 2)}


def flipped(image: sitk.Image, axes: tuple[int, ...]) -> sitk.Image:
    """The same header with the voxel array flipped along numpy axes ``axes`` (1 = rows/y, 2 = columns/x)."""
    array = sitk.GetArrayFromImage(image)
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.flip(array, axis=axes)) if axes else array)
    out.CopyInformation(image)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scans", nargs="+")
    parser.add_argument("--model", default=None)
    parser.add_argument("--mode", default="auto", help="speed mode (default auto, as hsam segment)")
    parser.add_argument("--copies", default=",".join(COPIES), help="comma-separated subset of: " + ", ".join(COPIES))
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    model, card = load_named_model(args.model)
    rows = []
    for scan in args.scans:
        image = read_image(scan)
        for copy in args.copies.split(","):
            axes = COPIES[copy]
            started = time.perf_counter()
            result = segment_volume(flipped(image, axes), model, card, device="cpu", mode=args.mode)
            total = time.perf_counter() - started
            check = result.orientation_check or {}
            row = {"scan": Path(scan).name, "copy": copy, "slices": image.GetSize()[2], "run_s": round(total, 2),
                   "check_s": round(check.get("seconds", 0.0), 2), "checked_slices": check.get("slices"),
                   "fired": check.get("suspect"), "scores": check.get("scores")}
            rows.append(row)
            if args.output:  # after every run: a long measurement keeps what it has
                Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")
            share = 100 * row["check_s"] / total
            scores = "; ".join(f"{k}: {v['organ_voxels']} vx, conf {v['mean_confidence']:.3f}"
                               for k, v in (check.get("scores") or {}).items())
            print(f"{row['scan']:<26} {copy:<20} run {total:6.1f} s, check {row['check_s']:5.2f} s ({share:4.1f} %), "
                  f"slices {row['checked_slices']}, fired: {row['fired']}\n    {scores}", flush=True)


if __name__ == "__main__":
    main()
