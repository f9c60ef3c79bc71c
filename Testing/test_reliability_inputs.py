"""Inputs users really open: MR instead of CT, 2-slice and 1000-slice volumes, every voxel type, extreme values, a
DICOM folder with two series, non-ASCII and space-containing paths. Real tiny H-SAM (seeded weights), real CT/MR.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.cli import main
from hsam.errors import HSAMError
from hsam.pipeline.options import SegmentOptions
from hsam.pipeline.run import segment_volume
from hsam.volume import read_image, read_labels, same_geometry

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fault_child import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    model, card = tiny_model(0)
    return model.eval(), card


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> Path:
    from hsam.model.checkpoint import save_model

    model, card = tiny_model(0)
    return save_model(model, card, tmp_path_factory.mktemp("saved") / "tiny")


@pytest.fixture()
def installed(saved_tiny) -> str:
    from hsam.weights.store import import_model

    import_model(saved_tiny)
    return "tiny"


@pytest.fixture(scope="module")
def ct(real_data) -> sitk.Image:
    return read_image(real_data / "totalsegmentator" / "example_ct_sm.nii.gz")


def labels_of(result) -> np.ndarray:
    return sitk.GetArrayFromImage(result.labels)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


# ------------------------------------------------------------------------------------------------------------ MR


def test_mr_is_refused_with_what_to_do_and_runs_when_asked(installed, real_data, tmp_path, capsys):
    mr = real_data / "totalsegmentator" / "example_mr_sm.nii.gz"
    out = tmp_path / "mr labels.nii.gz"
    assert main(["segment", str(mr), "-o", str(out), "--model", installed, "-q", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "--allow-non-ct" in err and "does not look like CT" in err, err
    assert not out.exists()

    assert main(["segment", str(mr), "-o", str(out), "--model", installed, "--device", "cpu", "--allow-non-ct"]) == 0
    err = capsys.readouterr().err
    assert "warning: the image does not look like CT" in err, err
    assert same_geometry(read_labels(out), read_image(mr), 0.0)


# ------------------------------------------------------------------------------------------------ slice counts


@pytest.mark.parametrize("slices", [1, 2])
def test_one_and_two_slice_volumes(tiny, ct, slices):
    model, card = tiny
    thin = ct[:, :, 10 : 10 + slices]
    result = segment_volume(thin, model, card, SegmentOptions(device="cpu"))
    assert same_geometry(result.labels, thin, 0.0) and labels_of(result).shape == (slices, 101, 122)
    # the same slices inside the full volume get the same labels: slices are segmented independently
    full = labels_of(segment_volume(ct[:, :, 8:14], model, card, SegmentOptions(device="cpu")))
    np.testing.assert_array_equal(labels_of(result), full[2 : 2 + slices])


def test_two_slice_dicom_series(tiny, real_data, tmp_path):
    folder = tmp_path / "two slices"
    folder.mkdir()
    for name in ("01.dcm", "02.dcm"):
        shutil.copy(real_data / "dcmqi" / "ct-3slice" / name, folder / name)
    image = read_image(folder)
    assert image.GetSize()[2] == 2
    model, card = tiny
    result = segment_volume(image, model, card, SegmentOptions(device="cpu", batch_size=2))
    assert same_geometry(result.labels, image, 0.0)


_LONG_SCAN = r"""
import json, sys, numpy as np, SimpleITK as sitk
sys.path.insert(0, sys.argv[1])
from fault_child import tiny_model
from hsam.pipeline.options import SegmentOptions
from hsam.pipeline.run import segment_volume

def peak_kib():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])

model, card = tiny_model(0)
model.eval()
rng = np.random.default_rng(0)

def scan(n, tissue_every):
    a = np.full((n, 64, 64), -1000, dtype=np.int16)  # air, as around a long scan's legs or head
    a[::tissue_every] = rng.normal(40, 150, size=a[::tissue_every].shape)  # tissue slices run the network
    return sitk.GetImageFromArray(a)

calls = []
segment_volume(scan(40, 20), model, card,
               SegmentOptions(device="cpu", batch_size=4))  # warm-up: engines, allocator pools
before = peak_kib()
result = segment_volume(scan(int(sys.argv[2]), int(sys.argv[3])), model, card,
                        SegmentOptions(device="cpu", batch_size=4), progress=lambda k, n: calls.append((k, n)))
after = peak_kib()
print(json.dumps({"grew_kib": after - before, "size": list(result.labels.GetSize()), "calls": calls[-1],
                  "first": calls[0], "labels_max": int(sitk.GetArrayViewFromImage(result.labels).max())}))
"""


def _long_scan(slices: int, tissue_every: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _LONG_SCAN, str(HERE), str(slices), str(tissue_every)],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _bytes_per_voxel(report: dict) -> float:
    return report["grew_kib"] * 1024 / float(np.prod(report["size"]))


# The scan itself costs ~14 bytes per voxel at peak (int16 input + its canonical copy, uint8 labels and confidence
# and their copies on the input grid); keeping per-class float32 logits of the scan would add 36 (K = 9).
MAX_BYTES_PER_VOXEL = 20


def test_thousand_slice_volume_runs_with_bounded_memory():
    """1000 slices (50 with tissue, the rest air): the peak grows with the scan's own size, not with K x float."""
    report = _long_scan(1000, 20)
    assert report["size"] == [64, 64, 1000]
    assert report["first"] == [0, 1000] and report["calls"] == [1000, 1000]
    assert _bytes_per_voxel(report) < MAX_BYTES_PER_VOXEL, report


@pytest.mark.slow
def test_thousand_tissue_slices_run_with_bounded_memory():
    report = _long_scan(1000, 1)
    assert report["size"] == [64, 64, 1000] and report["calls"] == [1000, 1000]
    assert _bytes_per_voxel(report) < MAX_BYTES_PER_VOXEL, report


# ----------------------------------------------------------------------------------------- voxel types and values


def _crop(ct: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(ct)[12:15, 20:84, 30:94].astype(np.int32)  # [3, 64, 64] HU


def _with_geometry(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(like.GetSpacing())
    image.SetDirection(like.GetDirection())
    image.SetOrigin(like.GetOrigin())
    return image


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [
        (np.int8, -128, 127),
        (np.uint8, 0, 255),
        (np.int16, -32768, 32767),
        (np.uint16, 0, 65535),
        (np.int32, None, None),
        (np.uint32, 0, None),
        (np.int64, None, None),
        (np.float32, None, None),
        (np.float64, None, None),
    ],
)
def test_every_voxel_type_gives_the_labels_of_the_same_values(tiny, ct, dtype, low, high):
    """The same HU values stored as int8 ... float64 give identical labels (values clipped to what the type holds)."""
    model, card = tiny
    hu = np.clip(_crop(ct), low, high)
    reference = labels_of(segment_volume(_with_geometry(hu.astype(np.float32), ct), model, card,
                                         SegmentOptions(device="cpu")))
    image = _with_geometry(hu.astype(dtype), ct)
    result = segment_volume(image, model, card, SegmentOptions(device="cpu"))
    assert same_geometry(result.labels, image, 0.0)
    np.testing.assert_array_equal(labels_of(result), reference)


@pytest.mark.parametrize(
    ("dtype", "extreme"),
    [(np.int16, 32767), (np.int32, 2**31 - 1), (np.float32, 3.0e38), (np.float64, 1.0e300)],
)
def test_extreme_values_behave_like_the_window_bounds(tiny, ct, dtype, extreme):
    """Metal streaks and padding values far outside the window act exactly like the window's bounds."""
    model, card = tiny
    hu = _crop(ct).astype(np.float64)
    hu[:, :8] = extreme  # a band of metal
    hu[:, -8:] = -extreme - (1 if np.issubdtype(dtype, np.integer) else 0)  # a band of padding
    lo, hi = card.window
    image = _with_geometry(hu.astype(dtype), ct)
    result = segment_volume(image, model, card, SegmentOptions(device="cpu"))
    clipped = segment_volume(_with_geometry(np.clip(hu, lo, hi).astype(np.float32), ct), model, card,
                             SegmentOptions(device="cpu"))
    np.testing.assert_array_equal(labels_of(result), labels_of(clipped))
    assert set(result.volumes_ml) == set(card.classes[1:])
    assert all(np.isfinite(v) for v in result.volumes_ml.values())


def test_nan_and_inf_are_refused(tiny, ct):
    model, card = tiny
    for bad in (np.nan, np.inf, -np.inf):
        hu = _crop(ct).astype(np.float32)
        hu[1, 5, 5] = bad
        with pytest.raises(HSAMError, match="NaN or infinite"):
            segment_volume(_with_geometry(hu, ct), model, card, SegmentOptions(device="cpu"))


# ---------------------------------------------------------------------------------------------------- DICOM


def write_dicom_series(image: sitk.Image, folder: Path, series_uid: str, first_number: int = 1) -> None:
    """Write a 3-D int16 image as a CT DICOM series (one file per slice, our own UIDs)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    for k in range(image.GetSize()[2]):
        slice_ = sitk.Cast(image[:, :, k], sitk.sitkInt16)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.8.498.1",
            "0020|000e": series_uid,
            "0020|0013": str(first_number + k),
            "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                         direction[1], direction[4], direction[7])),  # fmt: skip
            "0028|0030": f"{image.GetSpacing()[1]:.4f}\\{image.GetSpacing()[0]:.4f}",
            "0018|0050": f"{image.GetSpacing()[2]:.4f}",
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{series_uid[-6:]}_{k:03d}.dcm"))
        writer.Execute(slice_)


def test_dicom_folder_with_two_series_takes_the_largest_and_says_so(installed, ct, real_data, tmp_path, capsys):
    folder = tmp_path / "mixed study"
    for name in ("01.dcm", "02.dcm", "03.dcm"):  # a real 3-slice CT series
        (folder / "x").mkdir(parents=True, exist_ok=True)
        shutil.copy(real_data / "dcmqi" / "ct-3slice" / name, folder / name)
    shutil.rmtree(folder / "x")
    write_dicom_series(ct[:, :, 5:11], folder, "1.2.826.0.1.3680043.8.498.77")  # 6 slices of the real CT
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(folder)
    assert image.GetSize() == (122, 101, 6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(ct[:, :, 5:11]))
    messages = [str(w.message) for w in caught]
    assert any("2 DICOM series" in m and "6 slices" in m and "3 slices" in m for m in messages), messages

    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(folder), "-o", str(out), "--model", installed, "-q", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "warning: mixed study holds 2 DICOM series: using series (CT, 6 slices, 3 mm apart)" in err, err
    assert same_geometry(read_labels(out), image, 1e-4)


# ------------------------------------------------------------------------------------------------------ paths


def test_non_ascii_and_space_paths_everywhere(saved_tiny, ct, real_data, tmp_path, monkeypatch, capsys):
    """Input file, DICOM folder, output, model folder and HSAM_HOME all under names with spaces and non-ASCII."""
    from hsam.weights.store import import_model

    root = tmp_path / "Patiënt Ünïcødé 日本 (copy)"
    monkeypatch.setenv("HSAM_HOME", str(root / "hsam home ñ"))
    model_folder = root / "modèles" / "tiny ö"
    shutil.copytree(saved_tiny, model_folder)
    import_model(model_folder, "tiny")
    source = root / "données" / "ct scan #1 ☃.nii.gz"
    source.parent.mkdir(parents=True)
    shutil.copy(real_data / "totalsegmentator" / "example_ct_sm.nii.gz", source)
    dicom = root / "DICOM série ü"
    write_dicom_series(ct[:, :, 3:7], dicom, "1.2.826.0.1.3680043.8.498.78")
    out_dir = root / "résultats 結果"
    out_dir.mkdir()
    for model in ("tiny", str(model_folder)):
        for name, source_path in (("from file", source), ("from dicom", dicom)):
            out = out_dir / f"labels {name} ✓.seg.nrrd"
            stats = out_dir / f"volumes {name} ✓.csv"
            argv = ["segment", str(source_path), "-o", str(out), "--stats", str(stats), "--model", model, "-q",
                    "--device", "cpu"]  # fmt: skip
            assert main(argv) == 0, capsys.readouterr().err
            assert same_geometry(read_labels(out), read_image(source_path), 1e-4)
            assert stats.read_text(encoding="utf-8").startswith("label,organ")
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"{kind} {name} ✓.{ext}" for kind, ext in (("labels", "seg.nrrd"), ("volumes", "csv"))
        for name in ("from file", "from dicom")
    )  # fmt: skip


def test_cohort_refuses_the_mr_case_and_segments_the_ct_case(installed, ct, real_data, tmp_path, capsys):
    folder = tmp_path / "cohort"
    folder.mkdir()
    sitk.WriteImage(ct[:, :, 10:13], str(folder / "ct_case.nii.gz"))
    sitk.WriteImage(read_image(real_data / "totalsegmentator" / "example_mr_sm.nii.gz")[:, :, 8:11],
                    str(folder / "mr_case.nii.gz"))  # fmt: skip
    out = tmp_path / "labels"
    argv = ["segment", str(folder), "-o", str(out), "--model", installed, "--device", "cpu"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "mr_case.nii.gz does not look like CT" in err and "--allow-non-ct" in err, err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["ct_case.nii.gz"]
    assert main([*argv, "--allow-non-ct"]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["ct_case.nii.gz", "mr_case.nii.gz"]
