"""The laterality check: liver/gallbladder on the patient's right and spleen on the left in patient coordinates,
whatever the storage order; a warning only when both are clearly on the wrong side."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.labels import CLASS_NAMES
from hsam.checks.laterality import check_laterality

NAMES = list(CLASS_NAMES)
SPLEEN, GALLBLADDER, LIVER = NAMES.index("spleen"), NAMES.index("gallbladder"), NAMES.index("liver")


def body_and_labels(swap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """[z, y, x] arrays stored in LPS order (column index grows to the patient's left): a body of soft tissue, a
    liver on the patient's right that reaches a little across the midline, a gallbladder under it, a spleen on the
    left; ``swap``: the same anatomy mirrored left-right (what an appearance-driven model labels on a scan whose
    header swaps left and right)."""
    ct = np.full((10, 64, 64), -1000, dtype=np.int16)
    ct[:, 8:56, 4:60] = 40
    labels = np.zeros(ct.shape, dtype=np.uint8)
    labels[:, 12:40, 6:36] = LIVER  # midline at x = 31.5: the liver's "left lobe" reaches x 32-35
    labels[3:6, 36:42, 14:20] = GALLBLADDER
    labels[:, 20:40, 46:58] = SPLEEN
    if swap:
        labels = labels[:, :, ::-1].copy()
    return ct, labels


def images(ct: np.ndarray, labels: np.ndarray, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> tuple[sitk.Image, sitk.Image]:
    out = []
    for array in (ct, labels):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((2.0, 2.0, 5.0))
        image.SetDirection(direction)
        image.SetOrigin((-60.0, -50.0, 10.0))
        out.append(image)
    return out[0], out[1]


def test_silent_on_normal_anatomy():
    ct, labels = images(*body_and_labels())
    check = check_laterality(labels, ct, NAMES)
    assert check.warning is None
    assert check.groups["liver and gallbladder"]["share_on_right"] > 0.8 and check.groups["spleen"]["share_on_right"] == 0


def test_fires_on_swapped_sides_and_names_situs_inversus():
    ct, labels = images(*body_and_labels(swap=True))
    check = check_laterality(labels, ct, NAMES)
    assert check.warning is not None and "orientation" in check.warning and "situs inversus" in check.warning
    assert check.groups["spleen"]["share_on_right"] == 1.0


def test_patient_coordinates_not_storage_order():
    """The same patient stored RAS (columns grow to the patient's right): the arrays are mirrored, the header says
    so, and the verdicts do not change."""
    ras = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    for swap in (False, True):
        ct, labels = body_and_labels(swap)
        stored = [np.ascontiguousarray(a[:, ::-1, ::-1]) for a in (ct, labels)]
        check = check_laterality(*reversed(images(*stored, direction=ras)), NAMES)
        assert (check.warning is not None) == swap


def test_no_spleen_or_a_speck_is_no_evidence():
    ct, labels = body_and_labels(swap=True)
    for spleen in (np.zeros_like(labels, bool), np.zeros_like(labels, bool)):
        kept = np.where(labels == SPLEEN, 0, labels).astype(np.uint8)
        spleen[0, 30, 10] = True  # one voxel on the "wrong" side is 0.02 ml
        kept[spleen] = SPLEEN
        assert check_laterality(*reversed(images(ct, kept)), NAMES).warning is None
    assert check_laterality(*reversed(images(ct, np.zeros_like(labels))), NAMES).groups == {}
    assert check_laterality(*reversed(images(ct, labels)), ["background", "kidney"]).warning is None


def test_organs_near_the_midline_are_not_clearly_opposite():
    """A spleen reaching well over the midline (e.g. an enlarged one, or a mislabelled stomach) keeps it silent."""
    ct, labels = body_and_labels(swap=True)
    labels[:, 44:54, 24:50] = SPLEEN  # on the swapped side plus a large part across the midline
    check = check_laterality(*reversed(images(ct, labels)), NAMES)
    assert check.groups["spleen"]["share_on_right"] < 0.8 and check.warning is None


def reference_labels(real_data, name: str) -> sitk.Image:
    """TotalSegmentator's labels of a real scan mapped to H-SAM's classes."""
    mapping = json.loads((real_data / "label_maps.json").read_text())["totalseg_total_to_hsam"]
    image = sitk.ReadImage(str(real_data / "totalsegmentator" / name))
    lookup = np.zeros(256, dtype=np.uint8)
    for source, target in mapping.items():
        lookup[int(source)] = target
    out = sitk.GetImageFromArray(lookup[sitk.GetArrayFromImage(image)])
    out.CopyInformation(image)
    return out


def mirrored(image: sitk.Image) -> sitk.Image:
    """The voxel array mirrored left-right under the same header: a scan whose header swaps left and right."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayFromImage(image)[:, :, ::-1]))
    out.CopyInformation(image)
    return out


@pytest.mark.parametrize("ct_name, seg_name", [("example_ct_sm.nii.gz", "example_seg.nii.gz"),
                                               ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz")])
def test_real_scans_silent_as_given_and_flagged_when_the_header_swaps_sides(real_data, ct_name, seg_name):
    """TotalSegmentator labels (organs found by appearance) on the real sample scans (stored RAS), and the same scan
    and labels mirrored under the same header, as an appearance-driven model would label a header-swapped scan."""
    ct = sitk.ReadImage(str(real_data / "totalsegmentator" / ct_name))
    labels = reference_labels(real_data, seg_name)
    assert check_laterality(labels, ct, NAMES).warning is None
    swapped = check_laterality(mirrored(labels), mirrored(ct), NAMES)
    assert swapped.warning is not None and "orientation" in swapped.warning
