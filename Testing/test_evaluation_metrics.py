"""Dice and HD95 on shapes whose answers are known by hand, plus the reference protocol's empty-case rules."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from hsam.evaluation import dice, hd95, score_organ, score_volume, summarize
from hsam.evaluation.report import Row


def cube(shape=(32, 32, 32), start=(10, 10, 10), size=10) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Independent HD95: surface = voxels with a face neighbour outside the mask (or outside the array); all pairwise
    distances between the two surfaces."""

    def surface_points(mask):
        padded = np.pad(mask, 1)
        inner = padded[1:-1, 1:-1, 1:-1].copy()
        for axis, step in itertools.product(range(3), (-1, 1)):
            inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.asarray(spacing, dtype=float)

    pa, pb = surface_points(a), surface_points(b)
    dist = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([dist.min(1), dist.min(0)]), 95))


def test_identical_masks_score_dice_one_and_hd95_zero():
    mask = cube()
    assert dice(mask, mask) == 1.0
    assert hd95(mask, mask, (2.0, 0.5, 0.5)) == 0.0


def test_shifted_cube_hd95_in_mm_by_hand():
    # A 10-voxel cube shifted 3 voxels along x. Every surface voxel has a surface voxel of the other cube at most 3
    # voxels away along x (the x-faces are exactly 3 away: 200 of the 976 pooled distances), so the 95th percentile
    # is the shift itself: 3 voxels * 0.8 mm = 2.4 mm. Overlap 7 of 10 columns: Dice 0.7.
    a = cube(start=(10, 10, 10))
    b = cube(start=(10, 10, 13))
    spacing = (2.5, 0.7, 0.8)  # [z, y, x]
    assert dice(a, b) == pytest.approx(0.7)
    assert hd95(a, b, spacing) == pytest.approx(2.4)
    assert hd95(a, b, None) == pytest.approx(3.0)  # voxels
    assert hd95(a, b, spacing) == pytest.approx(brute_force_hd95(a, b, spacing))


def test_anisotropic_spacing_uses_the_axis_of_the_shift():
    # The same 3-voxel shift along z (2.5 mm slices) is 7.5 mm; along y (0.7 mm) 2.1 mm.
    a = cube()
    spacing = (2.5, 0.7, 0.8)
    assert hd95(a, cube(start=(13, 10, 10)), spacing) == pytest.approx(7.5)
    assert hd95(a, cube(start=(10, 13, 10)), spacing) == pytest.approx(2.1)


def test_hd95_matches_brute_force_on_irregular_shapes():
    rng = np.random.default_rng(3)
    from scipy import ndimage

    for _ in range(3):
        a = ndimage.binary_opening(rng.random((14, 18, 16)) > 0.55)
        b = ndimage.binary_opening(rng.random((14, 18, 16)) > 0.55)
        spacing = tuple(rng.uniform(0.5, 3.0, 3))
        assert hd95(a, b, spacing) == pytest.approx(brute_force_hd95(a, b, spacing), rel=1e-9)


def test_masks_touching_the_volume_edge():
    # Erosion treats outside the array as background, so an edge face is a surface (cropping must not change that).
    a = np.zeros((8, 8, 8), bool)
    a[:, :, :4] = True
    b = np.zeros((8, 8, 8), bool)
    b[:, :, :6] = True
    assert hd95(a, b, (1, 1, 1)) == pytest.approx(brute_force_hd95(a, b, (1, 1, 1)))


def test_our_protocol_does_not_count_absent_organs():
    empty = np.zeros((8, 8, 8), bool)
    organ = cube((8, 8, 8), (2, 2, 2), 3)
    absent = score_organ(empty, empty, 4, (1, 1, 1))
    assert absent.status == "absent" and math.isnan(absent.dice) and not absent.counted
    missed = score_organ(empty, organ, 4, (1, 1, 1))
    assert (missed.status, missed.dice) == ("missed", 0.0) and math.isnan(missed.hd95)
    false_positive = score_organ(organ, empty, 4, (1, 1, 1))
    assert (false_positive.status, false_positive.dice) == ("false_positive", 0.0)


def test_reference_protocol_empty_case_rules_and_voxel_hd95():
    empty = np.zeros((32, 32, 32), bool)
    a, b = cube(), cube(start=(13, 10, 10))
    both = score_organ(a, b, 1, (2.5, 0.7, 0.8), protocol="reference")
    assert both.dice == pytest.approx(0.7) and both.hd95 == pytest.approx(3.0)  # voxels: spacing ignored
    fp = score_organ(a, empty, 1, None, protocol="reference")
    assert (fp.dice, fp.hd95) == (1.0, 0.0)  # prediction of an absent organ: (1, 0)
    missed = score_organ(empty, a, 1, None, protocol="reference")
    assert (missed.dice, missed.hd95) == (0.0, 0.0)
    absent = score_organ(empty, empty, 1, None, protocol="reference")
    assert (absent.dice, absent.hd95) == (0.0, 0.0)  # an absent organ, correctly not predicted, scores 0


def test_summary_averages_volumes_then_organs():
    # Two volumes, organs 1 and 2; organ 2 absent from volume B in both masks.
    ref_a = np.zeros((20, 20, 20), np.uint8)
    ref_a[cube((20, 20, 20), (2, 2, 2), 5)] = 1
    ref_a[cube((20, 20, 20), (10, 10, 10), 5)] = 2
    ref_b = np.zeros_like(ref_a)
    ref_b[cube((20, 20, 20), (2, 2, 2), 5)] = 1
    rows = [Row("A", s.organ, str(s.organ), s) for s in score_volume(ref_a, ref_a, (1, 2), (1, 1, 1))]
    rows += [Row("B", s.organ, str(s.organ), s) for s in score_volume(ref_b, ref_b, (1, 2), (1, 1, 1))]
    organs, mean_dice, _ = summarize(rows)
    assert [(o.organ, o.dice_mean, o.n_dice) for o in organs] == [(1, 1.0, 2), (2, 1.0, 1)]
    assert mean_dice == 1.0
    rows_ref = [Row("A", s.organ, "", s) for s in score_volume(ref_a, ref_a, (1, 2), None, "reference")]
    rows_ref += [Row("B", s.organ, "", s) for s in score_volume(ref_b, ref_b, (1, 2), None, "reference")]
    organs, mean_dice, _ = summarize(rows_ref)
    assert [o.dice_mean for o in organs] == [1.0, 0.5]  # the released protocol counts the absent organ as 0
    assert mean_dice == 0.75
