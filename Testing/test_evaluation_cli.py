"""``hsam evaluate`` on the real TotalSegmentator labels: file pairing, label maps, CSV and markdown outputs."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.cli import main
from hsam.errors import HSAMError
from hsam.evaluation import evaluate_files, pair_files
from hsam.labels import remap_labels


@pytest.fixture()
def seg(real_data):
    return real_data / "totalsegmentator" / "example_seg.nii.gz"


def _write_like(array: np.ndarray, like: sitk.Image, path) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(like)
    sitk.WriteImage(image, str(path))


def test_cli_perfect_prediction_with_label_map(tmp_path, seg, capsys):
    ref = sitk.ReadImage(str(seg))
    hsam_labels = remap_labels(sitk.GetArrayFromImage(ref), "totalseg_total")
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    _write_like(hsam_labels, ref, tmp_path / "pred" / "ct1_pred.nii.gz")
    sitk.WriteImage(ref, str(tmp_path / "ref" / "ct1.nii.gz"))
    out = tmp_path / "report.csv"
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                 "--label-map", "totalseg_total", "-o", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["organ_name"] for r in rows] == ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver",
                                               "stomach", "aorta", "pancreas"]
    assert all(float(r["dice"]) == 1.0 and float(r["hd95_mm"]) == 0.0 for r in rows)
    summary = out.with_suffix(".md").read_text()
    assert "| **mean** | **1.0000** | **0.00** |" in summary
    assert "protocol `mm`" in capsys.readouterr().out


def test_one_slice_shift_costs_dice_and_gives_hd95_in_mm(tmp_path, seg):
    ref = sitk.ReadImage(str(seg))
    labels = remap_labels(sitk.GetArrayFromImage(ref), "totalseg_total")
    shifted = np.zeros_like(labels)
    shifted[1:] = labels[:-1]  # one 3 mm slice towards +z
    _write_like(labels, ref, tmp_path / "ref.nii.gz")
    _write_like(shifted, ref, tmp_path / "pred.nii.gz")
    rows = evaluate_files(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz")
    for row in rows:
        assert 0.3 < row.score.dice < 1.0
        # A surface voxel moved by one slice has its image one slice (3 mm) away; only the top slice, pushed out of
        # the grid, can add more.
        assert 0.0 < row.score.hd95 <= 6.0 + 1e-9
    voxel_rows = evaluate_files(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", protocol="reference")
    for mm_row, vox_row in zip(rows, voxel_rows):
        assert vox_row.score.hd95 == pytest.approx(mm_row.score.hd95 / 3.0)  # isotropic 3 mm: voxels = mm / 3


def test_reference_protocol_reads_synapse_h5(tmp_path):
    h5py = pytest.importorskip("h5py")
    label = np.zeros((6, 16, 16), np.float32)
    label[1:4, 2:8, 2:8] = 1
    label[2:5, 9:14, 9:14] = 5
    with h5py.File(tmp_path / "case0001.npy.h5", "w") as handle:
        handle["image"] = np.zeros_like(label)
        handle["label"] = label
    pred = label.copy()
    pred[pred == 5] = 0  # liver missed
    np.savez(tmp_path / "case0001_pred.npz", label=pred)
    assert pair_files(tmp_path / "case0001_pred.npz", tmp_path / "case0001.npy.h5")[0][0] == "case0001"
    rows = {r.organ: r.score for r in evaluate_files(tmp_path / "case0001_pred.npz", tmp_path / "case0001.npy.h5",
                                                     protocol="reference")}
    assert (rows[1].dice, rows[1].hd95) == (1.0, 0.0)
    assert (rows[5].dice, rows[5].hd95) == (0.0, 0.0)
    assert (rows[2].dice, rows[2].hd95) == (0.0, 0.0)  # absent and not predicted: 0 under the released rules
    with pytest.raises(HSAMError, match="no voxel spacing"):
        evaluate_files(tmp_path / "case0001_pred.npz", tmp_path / "case0001.npy.h5", protocol="mm")


def test_mismatched_grids_and_unknown_label_map_are_user_errors(tmp_path, seg, capsys):
    ref = sitk.ReadImage(str(seg))
    small = sitk.GetArrayFromImage(ref)[:10]
    image = sitk.GetImageFromArray(small)
    sitk.WriteImage(image, str(tmp_path / "pred.nii.gz"))  # 1 mm voxels at the origin: nowhere near the reference
    with pytest.raises(HSAMError, match="do not overlap the reference image"):
        evaluate_files(tmp_path / "pred.nii.gz", seg)
    assert main(["evaluate", "--pred", str(seg), "--ref", str(seg), "--label-map", "nope",
                 "-o", str(tmp_path / "r.csv")]) == 2
    assert "unknown label map 'nope'" in capsys.readouterr().err


def test_slicer_segmentation_prediction_is_read_by_terminology(tmp_path, seg):
    from hsam.volume import write_segmentation

    ref = sitk.ReadImage(str(seg))
    labels = sitk.GetImageFromArray(remap_labels(sitk.GetArrayFromImage(ref), "totalseg_total"))
    labels.CopyInformation(ref)
    write_segmentation(labels, tmp_path / "ct1.seg.nrrd")
    rows = evaluate_files(tmp_path / "ct1.seg.nrrd", seg, label_map="totalseg_total")
    assert [r.score.dice for r in rows] == [1.0] * 8


def test_predictions_on_other_grids_are_placed_on_the_reference_grid(tmp_path, seg, capsys):
    """Stored with an axis reversed: the same voxels, placed exactly. On a finer grid: resampled, with a warning."""
    ref = sitk.ReadImage(str(seg))
    flipped = sitk.Flip(ref, [True, False, False])  # x stored the other way round, same physical image
    sitk.WriteImage(flipped, str(tmp_path / "flipped.nii.gz"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = evaluate_files(tmp_path / "flipped.nii.gz", seg, "totalseg_total", "totalseg_total")
    assert [r.score.dice for r in rows] == [1.0] * 8
    corner = ref.TransformContinuousIndexToPhysicalPoint([-0.25, -0.25, -0.25])  # half-size voxels, corners aligned
    finer = sitk.Resample(ref, [s * 2 for s in ref.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                          corner, [s / 2 for s in ref.GetSpacing()], ref.GetDirection())
    sitk.WriteImage(finer, str(tmp_path / "finer.nii.gz"))
    with pytest.warns(UserWarning, match=r"spacing \(1.5, 1.5, 1.5\) vs \(3, 3, 3\) mm\): resampled onto the "
                      "reference grid with nearest neighbour"):
        rows = evaluate_files(tmp_path / "finer.nii.gz", seg, "totalseg_total", "totalseg_total")
    assert min(r.score.dice for r in rows) > 0.99
    assert main(["evaluate", "--pred", str(tmp_path / "finer.nii.gz"), "--ref", str(seg), "--label-map",
                 "totalseg_total", "--pred-label-map", "totalseg_total", "-o", str(tmp_path / "r.csv")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: case ") and "nearest neighbour" in err and err.count("\n") == 1


def test_a_liver_only_dicom_seg_scores_only_the_liver(tmp_path, real_data, capsys):
    """The reference labelled the liver only: the prediction's spleen and aorta there are not 'Dice 0'."""
    from hsam.volume import read_image, read_labels

    dcmqi = real_data / "dcmqi"
    ct = read_image(dcmqi / "ct-3slice")
    liver = sitk.GetArrayFromImage(read_labels(dcmqi / "liver.dcm", reference=ct))
    prediction = liver.copy()
    prediction[:, 400:440, 100:140] = 1  # a spleen and an aorta the reference says nothing about
    prediction[:, 300:320, 250:270] = 7
    _write_like(prediction, ct, tmp_path / "pred.nii.gz")
    out = tmp_path / "report.csv"
    assert main(["evaluate", "--pred", str(tmp_path / "pred.nii.gz"), "--ref", str(dcmqi / "liver.dcm"),
                 "-o", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["organ_name"], float(r["dice"])) for r in rows] == [("liver", 1.0)]
    captured = capsys.readouterr()
    assert "did not label spleen, kidney_right, kidney_left, gallbladder, stomach, aorta, pancreas" in captured.err
    # the same labels as a plain NIfTI reference: every organ counts as labelled, the extra organs are false positives
    _write_like(liver, ct, tmp_path / "ref.nii.gz")
    rows = evaluate_files(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz")
    assert {r.organ_name: r.score.dice for r in rows if r.score.counted} == {"spleen": 0.0, "liver": 1.0, "aorta": 0.0}
