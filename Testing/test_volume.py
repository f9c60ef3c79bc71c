"""hsam.volume: reading real CT (NIfTI RAS-stored, DICOM LPS), reorientation exactness, bad inputs, label writing."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.errors import HSAMError
from hsam.volume import (
    code_from_direction,
    direction_from_code,
    from_canonical,
    read_image,
    read_labels,
    same_geometry,
    to_canonical,
    window,
    write_labels,
)
from hsam.volume.intensity import looks_like_ct


@pytest.fixture(scope="module")
def ct_path(real_data) -> Path:
    return real_data / "totalsegmentator" / "example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def ct(ct_path) -> sitk.Image:
    return read_image(ct_path)


def _flip_and_permute(image: sitk.Image, order: list[int], flips: list[bool]) -> sitk.Image:
    """A copy stored with permuted/flipped axes but the same voxels in physical space."""
    return sitk.Flip(sitk.PermuteAxes(image, order), flips)


def test_reads_ras_nifti_and_dicom_series(ct, real_data):
    assert ct.GetSize() == (122, 101, 30)
    assert code_from_direction(np.array(ct.GetDirection()).reshape(3, 3)) == "RAS"
    dicom = read_image(real_data / "dcmqi" / "ct-3slice")
    assert dicom.GetSize() == (512, 512, 3)
    assert code_from_direction(np.array(dicom.GetDirection()).reshape(3, 3)) == "LPS"
    assert np.isclose(dicom.GetSpacing()[2], 1.0, atol=0.05)


@pytest.mark.parametrize("code", ["LPS", "RAS", "PIR", "SLA"])
def test_canonical_array_equals_dicomorient_and_round_trip_is_exact(ct, code):
    canonical, how = to_canonical(ct, code)
    expected = sitk.GetArrayFromImage(sitk.DICOMOrient(ct, code))
    np.testing.assert_array_equal(canonical, expected)
    assert not how.resampled
    back = from_canonical(canonical.copy(), how)
    assert same_geometry(back, ct, 0.0)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(ct))
    oriented = sitk.DICOMOrient(ct, code)
    assert np.allclose(how.canonical_spacing, oriented.GetSpacing())


@pytest.mark.parametrize(
    "order,flips", [([0, 1, 2], [True, False, False]), ([2, 0, 1], [False, True, True]), ([1, 2, 0], [True, True, True])]
)
def test_flipped_and_permuted_copies_give_the_same_canonical_array(ct, order, flips):
    reference, _ = to_canonical(ct, "LPS")
    copy = _flip_and_permute(ct, order, flips)
    canonical, how = to_canonical(copy, "LPS")
    np.testing.assert_array_equal(canonical, reference)
    # a label computed on the canonical array lands on the same physical voxels of each copy
    label = (reference > 100).astype(np.uint8)
    on_copy = from_canonical(np.ascontiguousarray(label), how)
    assert same_geometry(on_copy, copy, 0.0)
    expected = _flip_and_permute(sitk.GetImageFromArray((sitk.GetArrayFromImage(ct) > 100).astype(np.uint8)), order, flips)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(on_copy), sitk.GetArrayViewFromImage(expected))


def _rotated(image: sitk.Image, degrees: float) -> sitk.Image:
    """The same voxels with the grid rotated about z (an oblique acquisition)."""
    angle = np.radians(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    oblique = sitk.Image(image)
    oblique.SetDirection((rotation @ np.array(image.GetDirection()).reshape(3, 3)).flatten().tolist())
    return oblique


def test_small_tilt_is_treated_as_axis_aligned(ct):
    canonical, how = to_canonical(_rotated(ct, 0.5), "LPS")
    assert not how.resampled
    np.testing.assert_array_equal(canonical, to_canonical(ct, "LPS")[0])


def test_oblique_volume_is_resampled_to_canonical_grid_and_back(ct):
    oblique = _rotated(ct, 25.0)
    canonical, how = to_canonical(oblique, "LPS")
    assert how.resampled and how.canonical_grid is not None
    assert np.allclose(np.array(how.canonical_grid.direction).reshape(3, 3), direction_from_code("LPS"))
    # body mask computed on the canonical grid, mapped back with nearest neighbour, matches the mask on the input
    body = (canonical > -300).astype(np.uint8)
    back = from_canonical(body, how)
    assert same_geometry(back, oblique, 0.0) and back.GetPixelID() == sitk.sitkUInt8
    truth = sitk.GetArrayViewFromImage(oblique) > -300
    agreement = (sitk.GetArrayViewFromImage(back).astype(bool) == truth).mean()
    assert agreement > 0.97


def test_window_matches_synapse_preprocessing():
    values = np.array([-1000, -125, 75, 275, 3000], dtype=np.int16)
    np.testing.assert_allclose(window(values, -125, 275), [0, 0, 0.5, 1, 1])
    assert window(values, -125, 275).dtype == np.float32


def test_ct_heuristic_flags_mr(real_data, ct):
    assert looks_like_ct(sitk.GetArrayViewFromImage(ct))
    mr = read_image(real_data / "totalsegmentator" / "example_mr_sm.nii.gz")
    assert not looks_like_ct(sitk.GetArrayViewFromImage(mr))


# ---------------------------------------------------------------- bad inputs: each with its own message


def _expect(path, *words):
    with pytest.raises(HSAMError) as info:
        read_image(path)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_bad_inputs_have_clear_messages(tmp_path, ct_path, ct):
    _expect(tmp_path / "missing.nii.gz", "not found")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    _expect(tmp_path / "empty.nii.gz", "empty")
    data = ct_path.read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(data[: len(data) // 3])
    _expect(tmp_path / "truncated.nii.gz", "truncated")
    raw = gzip.decompress(data)  # truncated inside the voxel data, not the gzip stream
    (tmp_path / "truncated.nii").write_bytes(raw[: len(raw) // 2])
    _expect(tmp_path / "truncated.nii", "truncated")
    sitk.WriteImage(ct[:, :, 5], str(tmp_path / "slice.nii.gz"))
    _expect(tmp_path / "slice.nii.gz", "2-D")
    four = sitk.JoinSeries([sitk.Cast(ct, sitk.sitkFloat32)] * 2)
    sitk.WriteImage(four, str(tmp_path / "four.nii.gz"))
    _expect(tmp_path / "four.nii.gz", "4-D")
    array = sitk.GetArrayFromImage(ct).astype(np.float32)
    array[3, 10, 10] = np.nan
    nan = sitk.GetImageFromArray(array)
    nan.CopyInformation(ct)
    sitk.WriteImage(nan, str(tmp_path / "nan.nrrd"))
    _expect(tmp_path / "nan.nrrd", "NaN")
    sitk.WriteImage(sitk.Compose([ct, ct, ct]), str(tmp_path / "rgb.mha"))
    _expect(tmp_path / "rgb.mha", "components")
    (tmp_path / "dicomless").mkdir()
    _expect(tmp_path / "dicomless", "no DICOM series")


def test_single_time_point_4d_is_accepted(tmp_path, ct):
    sitk.WriteImage(sitk.JoinSeries([ct]), str(tmp_path / "one.nii.gz"))
    assert read_image(tmp_path / "one.nii.gz").GetDimension() == 3


def _unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root ignores permission bits; sysfs refuses new files even to root
        return Path("/sys")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


def test_unwritable_and_unsupported_outputs(tmp_path, ct):
    labels = sitk.Cast(ct > 0, sitk.sitkUInt8)
    with pytest.raises(HSAMError, match="not writable"):
        write_labels(labels, _unwritable_folder(tmp_path) / "out.nii.gz")
    with pytest.raises(HSAMError, match="does not exist"):
        write_labels(labels, tmp_path / "nowhere" / "out.nii.gz")
    with pytest.raises(HSAMError, match="extension"):
        write_labels(labels, tmp_path / "out.png")
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".seg.nrrd"])
def test_label_round_trip_keeps_values_and_geometry(tmp_path, real_data, suffix):
    seg = sitk.ReadImage(str(real_data / "totalsegmentator" / "example_seg.nii.gz"))
    from hsam.labels import remap_labels

    hsam_labels = sitk.GetImageFromArray(remap_labels(sitk.GetArrayViewFromImage(seg), "totalseg_total"))
    hsam_labels.CopyInformation(seg)
    path = write_labels(hsam_labels, tmp_path / f"labels{suffix}")
    back = read_labels(path)
    assert same_geometry(back, hsam_labels, 1e-4)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(hsam_labels))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_seg_nrrd_has_names_colours_and_terminology(tmp_path, ct):
    import slicerio.segmentation as sio

    from hsam.labels import ORGANS

    labels = sitk.Cast(sitk.Clamp(sitk.Cast(ct, sitk.sitkInt16) // 200, lowerBound=0, upperBound=8), sitk.sitkUInt8)
    path = write_labels(labels, tmp_path / "organs.seg.nrrd")
    segmentation = sio.read_segmentation(str(path))
    segments = {s["labelValue"]: s for s in segmentation["segments"]}
    assert sorted(segments) == list(range(1, 9))
    for organ in ORGANS:
        segment = segments[organ.index]
        assert segment["name"] == organ.display_name
        assert np.allclose(segment["color"], organ.rgb_float, atol=1e-5)
        assert segment["terminology"]["type"][1] == organ.type_code[1]
    assert segments[3]["terminology"]["typeModifier"][1] == "7771000"
    lps = np.array(segmentation["ijkToLPS"])
    assert np.allclose(lps[:3, 3], ct.GetOrigin())


def test_seg_nrrd_loads_in_slicer_mrml(tmp_path, ct):
    mrml = pytest.importorskip("slicer")
    labels = sitk.Cast(sitk.Clamp(sitk.Cast(ct, sitk.sitkInt16) // 200, lowerBound=0, upperBound=8), sitk.sitkUInt8)
    path = write_labels(labels, tmp_path / "organs.seg.nrrd")
    scene = mrml.vtkMRMLScene()
    node = mrml.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = mrml.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 8
    names = sorted(segmentation.GetNthSegment(i).GetName() for i in range(8))
    assert "left kidney" in names and "liver" in names
