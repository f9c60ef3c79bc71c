"""Property-based tests (hypothesis) of the geometry layer: any direction (axis permutations, flips, oblique, improper),
spacing, origin and size; canonical arrays agree with SimpleITK's own physical-space maths; labels come back onto
the input grid exactly, in memory, through every label file format, and through ``segment_volume``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hsam.volume import from_canonical, read_labels, same_geometry, to_canonical, write_labels
from hsam.volume.orientation import _nearest_permutation, direction_from_code

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

SIGNED_PERMUTATIONS = [
    np.array([[signs[c] if perm[c] == r else 0.0 for c in range(3)] for r in range(3)])
    for perm in itertools.permutations(range(3))
    for signs in itertools.product((1.0, -1.0), repeat=3)
]
CODES = ["".join(c) for c in itertools.product("LR", "PA", "SI")]
CODES = sorted({"".join(p) for code in CODES for p in itertools.permutations(code)})


@st.composite
def rotations(draw) -> np.ndarray:
    """A uniformly spread rotation (from a random quaternion), possibly made improper by flipping one column."""
    q = np.array([draw(st.floats(-1, 1, allow_nan=False)) for _ in range(4)])
    assume(np.linalg.norm(q) > 0.1)
    w, x, y, z = q / np.linalg.norm(q)
    matrix = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    if draw(st.booleans()):
        matrix[:, draw(st.integers(0, 2))] *= -1
    return matrix


directions = st.one_of(st.sampled_from(SIGNED_PERMUTATIONS), rotations())
spacings = st.tuples(*[st.floats(0.25, 6.0, allow_nan=False) for _ in range(3)])
origins = st.tuples(*[st.floats(-600.0, 600.0, allow_nan=False) for _ in range(3)])
sizes = st.tuples(st.integers(1, 7), st.integers(1, 6), st.integers(1, 5))


def _image(array: np.ndarray, direction: np.ndarray, spacing, origin) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetDirection(direction.flatten().tolist())
    image.SetSpacing(list(spacing))
    image.SetOrigin(list(origin))
    return image


def _as_image(grid) -> sitk.Image:
    """An empty image on ``grid`` (a SimpleITK image or the volume layer's pixel-less Grid) for physical maths."""
    if isinstance(grid, sitk.Image):
        return grid
    image = sitk.Image([int(s) for s in grid.size], sitk.sitkUInt8)
    image.SetSpacing(list(grid.spacing))
    image.SetOrigin(list(grid.origin))
    image.SetDirection(list(grid.direction))
    return image


def _oblique(direction: np.ndarray) -> bool:
    return _nearest_permutation(direction)[0] > 1.0


@SETTINGS
@given(direction=directions, spacing=spacings, origin=origins, size=sizes, seed=st.integers(0, 2**31 - 1))
def test_labels_round_trip_onto_the_input_grid(direction, spacing, origin, size, seed):
    """from_canonical(to_canonical(labels)) gives back the exact grid; for axis-aligned inputs the exact voxels."""
    labels = np.random.default_rng(seed).integers(0, 9, size=size[::-1], dtype=np.uint8)
    image = _image(labels, direction, spacing, origin)
    canonical, how = to_canonical(image)
    if not how.resampled:
        back = from_canonical(canonical, how)
        assert back.GetSize() == image.GetSize()
        assert back.GetSpacing() == image.GetSpacing() and back.GetOrigin() == image.GetOrigin()
        assert back.GetDirection() == image.GetDirection()
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), labels)
    # whatever the direction: a constant canonical label volume must cover every input voxel (no field-of-view loss)
    constant = from_canonical(np.full(canonical.shape, 7, dtype=np.uint8), how)
    assert same_geometry(constant, image, 0.0) and constant.GetPixelID() == sitk.sitkUInt8
    assert (sitk.GetArrayViewFromImage(constant) == 7).all()


@SETTINGS
@given(
    perm=st.sampled_from(SIGNED_PERMUTATIONS), code=st.sampled_from(CODES), spacing=spacings, origin=origins,
    size=sizes, seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_axis_aligned_canonical_array_is_dicomorient(perm, code, spacing, origin, size, seed):
    """For any card orientation code, the canonical array is SimpleITK's DICOMOrient of the input, voxel for voxel."""
    values = np.random.default_rng(seed).integers(-1024, 3000, size=size[::-1]).astype(np.int16)
    image = _image(values, perm, spacing, origin)
    canonical, how = to_canonical(image, code)
    assert not how.resampled
    expected = sitk.DICOMOrient(image, code)
    np.testing.assert_array_equal(canonical, sitk.GetArrayViewFromImage(expected))
    assert canonical.dtype == np.int16
    assert np.allclose(how.canonical_spacing, expected.GetSpacing())
    np.testing.assert_allclose(np.array(expected.GetDirection()).reshape(3, 3), direction_from_code(code))


@SETTINGS
@given(direction=rotations(), spacing=spacings, origin=origins, size=sizes, seed=st.integers(0, 2**31 - 1))
def test_oblique_labels_come_back_from_the_right_physical_place(direction, spacing, origin, size, seed):
    """A canonical label pattern mapped back must agree, voxel by voxel, with SimpleITK's physical-point maths."""
    assume(_oblique(direction))
    image = _image(np.zeros(size[::-1], dtype=np.int16), direction, spacing, origin)
    canonical, how = to_canonical(image)
    assert how.resampled and how.canonical_grid is not None
    grid = _as_image(how.canonical_grid)
    pattern = np.random.default_rng(seed).integers(1, 9, size=canonical.shape, dtype=np.uint8)
    back = sitk.GetArrayFromImage(from_canonical(pattern, how))
    checked = 0
    for index in np.ndindex(*image.GetSize()):
        point = image.TransformIndexToPhysicalPoint(index)
        continuous = np.array(grid.TransformPhysicalPointToContinuousIndex(point))
        if np.any(np.abs(continuous - np.round(continuous)) > 0.499):
            continue  # on a cell boundary: nearest neighbour may go either way
        i, j, k = (int(round(c)) for c in continuous)
        assert back[index[2], index[1], index[0]] == pattern[k, j, i], f"voxel {index} came from the wrong place"
        checked += 1
    assert checked > 0


@SETTINGS
@given(direction=directions, spacing=spacings, origin=origins, size=sizes)
def test_linear_ramp_survives_reorientation(direction, spacing, origin, size):
    """The canonical image of a physical linear ramp is that ramp at the canonical voxels (exact or interpolated)."""
    gradient, offset = np.array([1.5, -2.0, 0.75]), 100.0
    image = _image(np.zeros(size[::-1], dtype=np.float32), direction, spacing, origin)
    ramp = np.zeros(size[::-1], dtype=np.float64)
    for index in np.ndindex(*image.GetSize()):
        ramp[index[::-1]] = gradient @ np.array(image.TransformIndexToPhysicalPoint(index)) + offset
    image = _image(ramp.astype(np.float32), direction, spacing, origin)
    canonical, how = to_canonical(image)
    if how.resampled:
        grid = _as_image(how.canonical_grid)
        where = lambda idx: grid.TransformIndexToPhysicalPoint(idx)  # noqa: E731
    else:
        reference = sitk.DICOMOrient(image, how.orientation)
        where = lambda idx: reference.TransformIndexToPhysicalPoint(idx)  # noqa: E731
    compared = 0
    for k, j, i in np.ndindex(*canonical.shape):
        point = np.array(where((i, j, k)))
        if how.resampled:
            continuous = np.array(image.TransformPhysicalPointToContinuousIndex(point.tolist()))
            # linear interpolation is exact only with all eight neighbours inside the input
            if np.any(continuous < 0) or np.any(continuous > np.array(image.GetSize()) - 1):
                continue
        expected = gradient @ point + offset
        assert math.isclose(float(canonical[k, j, i]), expected, abs_tol=2e-2 + 1e-5 * abs(expected))
        compared += 1
    if not how.resampled:
        assert compared == canonical.size


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    direction=directions, spacing=spacings, origin=origins, size=sizes,
    suffix=st.sampled_from([".nii.gz", ".nrrd", ".mha", ".seg.nrrd"]), seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_label_files_round_trip_values_and_grid(tmp_path_factory, direction, spacing, origin, size, suffix, seed):
    """write_labels -> read_labels keeps every value and the grid (NIfTI stores geometry as float32)."""
    labels = np.random.default_rng(seed).integers(0, 9, size=size[::-1], dtype=np.uint8)
    image = _image(labels, direction, spacing, origin)
    path = tmp_path_factory.mktemp("labels") / f"labels{suffix}"
    write_labels(image, path)
    back = read_labels(path)
    assert back.GetSize() == image.GetSize()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), labels)
    tolerance = 1e-4 if suffix == ".nii.gz" else 1e-9
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), rtol=tolerance)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=tolerance * 1000)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=tolerance * 10)


@pytest.fixture(scope="module")
def tiny():
    import torch

    from hsam.labels import CLASS_NAMES
    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard
    from hsam.model.config import load_model_config

    torch.manual_seed(0)
    config = load_model_config("vit_tiny")
    return build_hsam(config).eval(), ModelCard.for_config(config, "tiny", classes=list(CLASS_NAMES), demo=True)


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(perm=st.sampled_from(SIGNED_PERMUTATIONS), oblique=rotations(), use_oblique=st.booleans(), spacing=spacings,
       origin=origins, seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_segment_volume_output_has_exactly_the_input_grid(tiny, perm, oblique, use_oblique, spacing, origin, seed):
    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.run import segment_volume

    model, card = tiny
    values = np.random.default_rng(seed).normal(0, 300, size=(3, 20, 24)).astype(np.int16)
    image = _image(values, oblique if use_oblique else perm, spacing, origin)
    result = segment_volume(image, model, card, SegmentOptions(device="cpu", batch_size=3))
    for output in (result.labels, result.confidence):
        assert output.GetSize() == image.GetSize() and output.GetPixelID() == sitk.sitkUInt8
        assert output.GetSpacing() == image.GetSpacing() and output.GetOrigin() == image.GetOrigin()
        assert output.GetDirection() == image.GetDirection()
    assert int(sitk.GetArrayViewFromImage(result.labels).max()) < len(card.classes)
