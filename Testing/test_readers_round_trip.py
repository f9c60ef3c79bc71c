"""Every file hsam writes, read back by the tools users open it with: Slicer's own MRML library (slicer-core's
segmentation storage node) and slicerio for ``.seg.nrrd``, nibabel and SimpleITK for NIfTI, pynrrd for NRRD, ITK for
MHA. Each must give the labels in memory voxel for voxel, at the same physical place, for RAS-stored, LPS, permuted
and oblique grids.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.labels import ORGANS, remap_labels
from hsam.volume import write_image, write_labels
from real_readers import ijk_to_lps, read_itk, read_nibabel, read_pynrrd, read_simpleitk, read_slicer_mrml, read_slicerio


def _rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    z, x = np.radians(degrees_z), np.radians(degrees_x)
    about_z = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return about_z @ about_x


@pytest.fixture(scope="module")
def organ_labels(real_data) -> sitk.Image:
    """The real example_seg (122 x 101 x 30, 3 mm) in H-SAM label values, as the NIfTI stores it (RAS axes)."""
    seg = sitk.ReadImage(str(real_data / "totalsegmentator" / "example_seg.nii.gz"))
    labels = sitk.GetImageFromArray(remap_labels(sitk.GetArrayViewFromImage(seg), "totalseg_total"))
    labels.CopyInformation(seg)
    return labels


def geometry(labels: sitk.Image, kind: str) -> sitk.Image:
    """The same labels on a grid of the given kind: ras (as stored), lps, permuted (axes S, L, P) or oblique."""
    if kind == "ras":
        return labels
    if kind in ("lps", "permuted"):
        return sitk.DICOMOrient(labels, "LPS" if kind == "lps" else "SLP")
    oblique = sitk.Image(labels)
    oblique.SetDirection(_rotation(25.0, 10.0).flatten().tolist())
    oblique.SetSpacing((0.8, 0.9, 2.5))
    oblique.SetOrigin((-12.5, 40.25, -310.0))
    return oblique


LABEL_MAP_READERS = {".nii.gz": (read_nibabel, read_simpleitk), ".nii": (read_nibabel, read_simpleitk),
                     ".nrrd": (read_pynrrd,), ".mha": (read_itk,)}
GEOMETRIES = ("ras", "lps", "permuted", "oblique")


def _same_place(found: np.ndarray, expected: np.ndarray) -> None:
    # NIfTI stores its affine in float32: a few micrometres at 300 mm from the origin
    np.testing.assert_allclose(found, expected, atol=1e-3, rtol=1e-6)


@pytest.mark.parametrize("kind", GEOMETRIES)
def test_seg_nrrd_loads_complete_in_slicer_and_slicerio(organ_labels, tmp_path, kind):
    labels = geometry(organ_labels, kind)
    array = sitk.GetArrayFromImage(labels)
    path = write_labels(labels, tmp_path / "organs.seg.nrrd")
    for reader in (read_slicer_mrml, read_slicerio):
        segments = reader(path)
        assert sorted(segments) == [o.index for o in ORGANS], reader.__name__
        for organ in ORGANS:
            mask, matrix = segments[organ.index]
            expected = array == organ.index
            assert mask.sum() == expected.sum() > 0, (reader.__name__, organ.name, int(mask.sum()), int(expected.sum()))
            np.testing.assert_array_equal(mask, expected)
            _same_place(matrix, ijk_to_lps(labels))


@pytest.mark.parametrize("kind", GEOMETRIES)
@pytest.mark.parametrize("suffix", list(LABEL_MAP_READERS))
def test_label_maps_read_back_with_the_real_readers(organ_labels, tmp_path, suffix, kind):
    labels = geometry(organ_labels, kind)
    path = write_labels(labels, tmp_path / f"organs{suffix}")
    for reader in LABEL_MAP_READERS[suffix]:
        array, matrix = reader(path)
        np.testing.assert_array_equal(array, sitk.GetArrayViewFromImage(labels), err_msg=reader.__name__)
        _same_place(matrix, ijk_to_lps(labels))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_confidence_map_reads_back_with_the_real_readers(organ_labels, tmp_path, suffix):
    """The confidence map (uint8, 0..255) as ``hsam segment --confidence`` writes it, oblique grid."""
    labels = geometry(organ_labels, "oblique")
    rng = np.random.default_rng(0)
    confidence = sitk.GetImageFromArray(rng.integers(0, 256, sitk.GetArrayViewFromImage(labels).shape, dtype=np.uint8))
    confidence.CopyInformation(labels)
    path = write_image(confidence, tmp_path / f"confidence{suffix}")
    for reader in LABEL_MAP_READERS[suffix]:
        array, matrix = reader(path)
        assert array.dtype == np.uint8, reader.__name__
        np.testing.assert_array_equal(array, sitk.GetArrayViewFromImage(confidence), err_msg=reader.__name__)
        _same_place(matrix, ijk_to_lps(confidence))


@pytest.mark.parametrize("kind", ["ras", "oblique"])
def test_ct_image_as_exported_reads_back_in_nibabel(real_data, tmp_path, kind):
    """A case exported for fine-tuning holds the CT written by the same writer (hsam.volume.write_image)."""
    ct = geometry(sitk.ReadImage(str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz")), kind)
    path = write_image(ct, tmp_path / "image.nii.gz")
    for reader in LABEL_MAP_READERS[".nii.gz"]:
        array, matrix = reader(path)
        np.testing.assert_array_equal(array, sitk.GetArrayViewFromImage(ct), err_msg=reader.__name__)
        _same_place(matrix, ijk_to_lps(ct))
