"""Bounded-time fuzzing of every file reader (Testing/fuzz_readers.py, hypothesis-driven mutations of valid seeds),
each target in its own process so that a crash in native code (ITK, GDCM, torch's zip reader) is caught and its
input kept. Default budget 2 s per target; set HSAM_FUZZ_SECONDS for longer campaigns. Plus regression tests for
what the fuzzer found.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SECONDS = float(os.environ.get("HSAM_FUZZ_SECONDS", "2"))
TARGETS = ["nifti", "nifti-gz-inner", "nrrd", "mha", "dicom", "seg-nrrd", "dicom-seg", "model-card", "safetensors",
           "pth-zip", "pth-legacy", "manifest"]  # fmt: skip


@pytest.mark.parametrize("target", TARGETS)
def test_reader_survives_mutated_files(target, tmp_path, request):
    out = tmp_path / target
    if target == "dicom-seg":  # its seed is the real dcmqi SEG: skipped, like every real-data test, without the data
        os.environ.setdefault("HSAM_REAL_DATA", str(request.getfixturevalue("real_data")))
    try:
        done = subprocess.run(
            [sys.executable, str(HERE / "fuzz_readers.py"), target, str(SECONDS), str(out)],
            capture_output=True, text=True, timeout=SECONDS * 10 + 120,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"{target}: the reader hung on {out / 'last_input'}")
    if done.returncode < 0:
        pytest.fail(f"{target}: the reader crashed the process ({signal.Signals(-done.returncode).name}) on "
                    f"{out / 'last_input'}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # the budget bought real work (a safetensors example re-reads and hashes a 49 MB model: few fit in 2 s)
    assert report["examples"] >= (2 if target == "safetensors" else 10), report
    assert report["findings"] == [], json.dumps(report, indent=1)


# ----------------------------------------------------------------------------------- regressions from fuzzing


def _seed_mha(tmp_path: Path) -> bytes:
    import SimpleITK as sitk

    sys.path.insert(0, str(HERE))
    from fuzz_readers import _seed_image

    path = tmp_path / "seed.mha"
    sitk.WriteImage(_seed_image(tmp_path), str(path), useCompression=True)
    return path.read_bytes()


def _read_in_child(path: Path, reader: str) -> subprocess.CompletedProcess:
    code = (
        f"import sys\nfrom hsam.errors import HSAMError\nfrom hsam.volume import {reader}\n"
        f"try:\n    {reader}(sys.argv[1])\nexcept HSAMError as e:\n    print('error:', e)\n"
    )
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        (b"NDims = 3", b"NDims = 2147483648", "NDims"),  # SimpleITK segfaulted
        # ITK hung on this one
        (b"TransformMatrix = 0 -1 0 1 0 0 0 0 1", b"TransformMatrix = 0 -1 0 1 0 0 0 1e308 1", "TransformMatrix"),
        (b"DimSize = 8 8 4", b"DimSize = 8 -8 4", "DimSize"),
        (b"ElementSpacing = ", b"ElementSpacing = nan ", "ElementSpacing"),
    ],
)
def test_hostile_metaimage_headers_are_refused_before_itk_sees_them(tmp_path, old, new, field):
    data = _seed_mha(tmp_path)
    assert old in data
    path = tmp_path / "hostile.mha"
    path.write_bytes(data.replace(old, new, 1))
    for reader in ("read_image", "read_labels"):
        done = _read_in_child(path, reader)
        assert done.returncode == 0, f"{reader} crashed: {done.returncode} {done.stderr[-500:]}"
        assert done.stdout.startswith("error: could not read hostile.mha: its MetaImage header is invalid")
        assert field in done.stdout


def test_evaluation_reader_refuses_hostile_metaimage_headers(tmp_path):
    data = _seed_mha(tmp_path)
    path = tmp_path / "case0001.mha"
    path.write_bytes(data.replace(b"NDims = 3", b"NDims = 2147483648", 1))
    code = (
        "import sys\nfrom hsam.errors import HSAMError\nfrom hsam.evaluation.report import read_label_volume\n"
        "try:\n    read_label_volume(sys.argv[1])\nexcept HSAMError as e:\n    print('error:', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"crashed: {done.returncode} {done.stderr[-500:]}"
    assert "MetaImage header is invalid" in done.stdout


def test_segmentation_with_damaged_terminology_fields(tmp_path):
    """A .seg.nrrd with a one-element terminology code, a non-numeric label value or a layer that does not exist
    (IndexError/ValueError before) gets a one-line HSAMError or is read with that segment unmatched."""
    import numpy as np
    import SimpleITK as sitk

    from hsam.errors import HSAMError
    from hsam.volume import read_labels, write_labels

    labels = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6) % 9)
    path = tmp_path / "labels.seg.nrrd"
    write_labels(labels, path)
    text = path.read_bytes()
    header_end = text.index(b"\n\n")
    header = text[:header_end].decode()
    damaged = header.replace("~SCT^24028007^Right~", "~X~", 1)  # a one-element modifier code: IndexError before
    assert damaged != header
    for variant in (damaged, header.replace("Segment0_LabelValue:=1", "Segment0_LabelValue:=x"),
                    header.replace("Segment0_Layer:=0", "Segment0_Layer:=7")):  # fmt: skip
        path.write_bytes(variant.encode() + text[header_end:])
        try:
            read_labels(path)
        except HSAMError as error:
            assert "\n" not in str(error)


@pytest.mark.parametrize(
    "manifest",
    [
        {"models": [{"title": "no id"}]},
        {"models": "not a list"},
        {"models": [{"id": "x", "files": [{"nme": "typo"}]}]},
        {"models": [{"id": "x", "priority": "high"}]},
        [],
        {"models": [{"id": "../../escape", "files": []}]},
        {"models": [{"id": "x", "files": [{"name": "../../.bashrc", "url": "http://127.0.0.1/x",
                                           "sha256": "0" * 64}]}]},  # fmt: skip
        {"models": [{"id": "x", "files": [{"name": ".hidden"}]}]},
    ],
)
def test_malformed_or_hostile_manifest_gets_one_line_error(tmp_path, manifest):
    """A mirror's manifest (HSAM_MANIFEST) that is malformed, or names files outside the cache, is refused."""
    from hsam.errors import HSAMError
    from hsam.weights.manifest import load_manifest

    path = tmp_path / "models.json"
    path.write_text(json.dumps(manifest))
    with pytest.raises(HSAMError) as caught:
        load_manifest(path)
    assert "\n" not in str(caught.value) and "manifest" in str(caught.value)


def test_a_nifti_header_whose_voxel_offset_is_not_a_number_is_left_to_itk(tmp_path):
    """A fuzz finding: vox_offset NaN made the completeness check raise ValueError instead of a clear answer."""
    import gzip
    import struct

    from hsam.volume import read_image
    from hsam.volume.files import check_nifti_complete

    sample = Path(__file__).resolve().parents[1] / "HSAMSlicer" / "hsam" / "sample_data" / "abdomen_ct.nii.gz"
    raw = bytearray(gzip.decompress(sample.read_bytes()))
    for value in (float("nan"), float("inf")):
        raw[108:112] = struct.pack("<f", value)
        damaged = tmp_path / "damaged.nii"
        damaged.write_bytes(bytes(raw))
        check_nifti_complete(damaged)  # no ValueError/OverflowError: ITK's reader decides
        assert read_image(str(damaged)).GetSize() == (122, 101, 30)
