"""hsam.volume.onto_grid on the real labels: exact placement of shifted and reoriented grids, what it drops, refusals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.errors import HSAMError
from hsam.volume import onto_grid
from hsam.volume.grid import index_map, is_exact


@pytest.fixture(scope="module")
def labels(real_data) -> sitk.Image:
    return sitk.ReadImage(str(real_data / "totalsegmentator" / "example_seg.nii.gz"))


def test_a_grid_shifted_by_whole_voxels_is_placed_exactly_and_says_what_it_drops(labels):
    array = sitk.GetArrayFromImage(labels)
    shifted = sitk.Image(labels)
    shifted.SetOrigin(labels.TransformIndexToPhysicalPoint((5, -3, 2)))  # file voxel (0,0,0) = reference (5,-3,2)
    expected = np.zeros_like(array)
    expected[2:, :-3, 5:] = array[:-2, 3:, :-5]
    lost = int(np.count_nonzero(array)) - int(np.count_nonzero(expected))
    assert lost > 0
    with pytest.warns(UserWarning, match=f"{lost} labelled voxels lie outside the reference grid"):
        placed = onto_grid(shifted, labels)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(placed), expected)
    assert placed.GetPixelID() == labels.GetPixelID()


def test_reoriented_storage_is_exact_and_silent(labels):
    for code in ("LPS", "SAR", "IRP"):
        stored = sitk.DICOMOrient(labels, code)
        assert is_exact(index_map(stored, labels))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            placed = onto_grid(stored, labels)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(placed), sitk.GetArrayViewFromImage(labels))


def test_half_voxel_shift_is_not_exact_and_far_away_labels_are_refused(labels):
    half = sitk.Image(labels)
    half.SetOrigin(labels.TransformContinuousIndexToPhysicalPoint((0.5, 0, 0)))
    assert not is_exact(index_map(half, labels))
    with pytest.warns(UserWarning, match=r"origin shifted by a fraction of a voxel\): resampled .* nearest neighbour"):
        onto_grid(half, labels)
    tilted = sitk.Image(labels)
    turn = np.array([[np.cos(0.1), -np.sin(0.1), 0], [np.sin(0.1), np.cos(0.1), 0], [0, 0, 1]])
    tilted.SetDirection((turn @ np.array(labels.GetDirection()).reshape(3, 3)).flatten().tolist())
    with pytest.warns(UserWarning, match="axes at an angle to the reference's"):
        onto_grid(tilted, labels)
    far = sitk.Image(labels)
    far.SetOrigin((5000.0, 0.0, 0.0))
    with pytest.raises(HSAMError, match="do not overlap the reference image"):
        onto_grid(far, labels, "the labels")
