"""DICOM SEG encodings: size on disk and which readers open each (issue 29; README's DICOM section quotes it).

A 20-slice DICOM CT series is made from the unseen patient lidc-idri-0001 (slices z 30-49: spleen, kidneys, liver,
stomach, pancreas, aorta), its TotalSegmentator labels (mapped to H-SAM) written by ``write_dicom_seg`` in each
encoding, and each SEG opened by: hsam's reader, highdicom, pydicom (pixel decode), dcmqi's segimage2itkimage
(voxel-equal to the labels), and dciodvfy (errors; deflated SEGs are inflated first, since the Debian dicom3tools
reads no deflated file). The label map as .nii.gz and .seg.nrrd are sized too.

    python benchmarks/dicom_seg_encodings.py [--out benchmarks/results/dicom_seg_encodings.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))

from seg_validators import dciodvfy_errors, dcmqi_labels  # noqa: E402
from test_dicom_series import write_series  # noqa: E402

from hsam.volume import read_image, read_labels, write_labels  # noqa: E402
from hsam.volume.dicom_seg import Algorithm, SegOptions, algorithm_version, write_dicom_seg  # noqa: E402
from hsam.volume.dicom_series import choose_series  # noqa: E402

ENCODINGS = [("binary", "none"), ("binary", "deflate"), ("labelmap", "none"), ("labelmap", "rle"),
             ("labelmap", "deflate")]


def make_case(shared: Path, work: Path) -> tuple[Path, sitk.Image]:
    """The 20-slice series folder and the H-SAM labels on the grid hsam reads it with."""
    ct = sitk.DICOMOrient(sitk.ReadImage(str(shared / "lidc-idri-0001" / "ct.nii.gz")), "LPS")
    labels_ts = sitk.DICOMOrient(sitk.ReadImage(str(shared / "lidc-idri-0001" / "labels_totalsegmentator.nii.gz")), "LPS")
    mapping = json.loads((shared / "label_maps.json").read_text())["totalseg_total_to_hsam"]
    lookup = np.zeros(256, dtype=np.uint8)
    for ts, hsam in mapping.items():
        lookup[int(ts)] = int(hsam)
    # the slices 30-49 counted from the most inferior (the README's z), whatever the stored order
    size = ct.GetSize()[2]
    order = range(size - 50, size - 30) if ct.GetDirection()[8] < 0 else range(30, 50)
    start, stop = min(order), max(order) + 1
    folder = work / "series"
    write_series(sitk.Cast(ct[:, :, start:stop], sitk.sitkInt16), folder, "1.2.826.0.1.3680043.8.498.42169",
                 "1.2.826.0.1.3680043.8.498.42160", 2, "LIDC-IDRI-0001 z30-49")
    image = read_image(folder)
    labels = sitk.GetImageFromArray(lookup[sitk.GetArrayFromImage(labels_ts[:, :, start:stop]).astype(np.int64)])
    labels.CopyInformation(ct[:, :, start:stop])
    labels = sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return folder, labels


def measure(folder: Path, labels: sitk.Image, work: Path) -> list[dict]:
    import highdicom as hd

    files = choose_series(folder)[0].files
    algorithm = Algorithm("hsam-lite-demo", algorithm_version("hsam-lite-demo", "0" * 64), "0" * 64, demo=True)
    expected = sitk.GetArrayFromImage(labels)
    rows = []
    for seg_type, compress in ENCODINGS:
        out = write_dicom_seg(labels, work / f"{seg_type}-{compress}.dcm", files, algorithm,
                              options=SegOptions(seg_type=seg_type, compress=compress))
        row = {"encoding": f"{seg_type.upper()} {compress}", "bytes": out.stat().st_size}
        row["hsam"] = bool(np.array_equal(sitk.GetArrayFromImage(read_labels(out, reference=labels)), expected))
        try:
            hd.seg.segread(out)
            row["highdicom"] = True
        except Exception as error:  # noqa: BLE001 (report what the reader said)
            row["highdicom"] = f"{type(error).__name__}: {str(error)[:80]}"
        row["pydicom pixel_array"] = pydicom.dcmread(out).pixel_array.size > 0
        theirs = dcmqi_labels(out, labels, work)
        row["dcmqi voxel-equal"] = None if theirs is None else bool(np.array_equal(theirs, expected))
        errors = dciodvfy_errors(out, work)
        row["dciodvfy errors"] = "IOD unknown to dicom3tools 2022" if errors is None else len(errors)
        rows.append(row)
    for suffix in (".nii.gz", ".seg.nrrd"):
        rows.append({"encoding": suffix, "bytes": write_labels(labels, work / f"labels{suffix}").stat().st_size})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data" / "real")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        folder, labels = make_case(args.shared, Path(temp))
        rows = measure(folder, labels, Path(temp))
    for row in rows:
        print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
