"""Prompt geometry and prompt files (no weights needed): positions land on the right voxel for every orientation,
boxes are interpolated between boxed slices, and every mistake in a prompt file is one clear error line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import one_line_error

from hsam.prompting.geometry import canonical_shape, to_canonical_position, to_lps
from hsam.prompting.prompt_file import parse_prompts, read_prompt_file
from hsam.prompting.session import INTERPOLATED, USER, box_of
from hsam.volume import to_canonical

ORIENTATIONS = ("LPS", "RAS", "LAS", "PIR", "SLA")


def _image(code: str, size=(7, 6, 5), spacing=(0.8, 1.1, 2.5)) -> sitk.Image:
    """A volume whose voxel values encode their own index, stored in orientation ``code``."""
    from hsam.volume.orientation import direction_from_code

    values = np.arange(np.prod(size), dtype=np.int32).reshape(size[::-1])
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing)
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection(direction_from_code(code).flatten().tolist())
    return image


@pytest.mark.parametrize("code", ORIENTATIONS)
def test_voxel_positions_reach_the_same_voxel_in_the_canonical_array(code):
    image = _image(code)
    canonical, how = to_canonical(image, "LPS")
    assert canonical.shape == canonical_shape(how)
    for ijk in [(0, 0, 0), (6, 5, 4), (3, 2, 1), (1, 4, 3)]:
        z, r, c = np.round(to_canonical_position(ijk, "voxel", how)).astype(int)
        assert canonical[z, r, c] == image[ijk]


@pytest.mark.parametrize("code", ORIENTATIONS)
def test_ras_and_lps_millimetres_agree_with_the_voxel_index(code):
    image = _image(code)
    _, how = to_canonical(image, "LPS")
    lps = np.array(image.TransformIndexToPhysicalPoint((2, 3, 1)))
    ras = lps * np.array([-1, -1, 1])
    expected = to_canonical_position((2, 3, 1), "voxel", how)
    assert np.allclose(to_canonical_position(lps, "lps", how), expected, atol=1e-6)
    assert np.allclose(to_canonical_position(ras, "ras", how), expected, atol=1e-6)
    assert np.allclose(to_lps((2, 3, 1), "voxel", how), lps, atol=1e-6)


def test_oblique_volume_maps_through_its_resampled_grid():
    image = _image("LPS")
    angle = np.radians(10)
    image.SetDirection([np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1])
    canonical, how = to_canonical(image, "LPS")
    assert how.resampled
    centre = (3, 2, 2)
    z, r, c = to_canonical_position(centre, "voxel", how)
    assert abs(z - 2) < 1e-6 and 0 <= r < canonical.shape[1] and 0 <= c < canonical.shape[2]


def _plan(data, code="LAS"):
    _, how = to_canonical(_image(code), "LPS")
    return parse_prompts(data, how, "p.json"), how


def test_voxel_box_corners_are_inclusive_and_in_any_order():
    plan, how = _plan({"prompts": [{"organ": "liver", "slice": 2, "box": [5, 4, 1, 1]}]})
    (organ, z), prompt = next(iter(plan.prompts.items()))
    assert organ == 5 and prompt.source == USER
    expected = np.zeros(canonical_shape(how)[1:], dtype=bool)
    for i in range(1, 6):
        for j in range(1, 5):
            zz, r, c = np.round(to_canonical_position((i, j, 2), "voxel", how)).astype(int)
            assert zz == z
            expected[r, c] = True
    assert np.allclose(prompt.box, box_of(expected))


def test_boxes_between_two_boxed_slices_are_interpolated():
    plan, _ = _plan({"space": "voxel", "prompts": [
        {"organ": "spleen", "slice": 0, "box": [0, 0, 2, 2]},
        {"organ": 1, "slice": 4, "box": [4, 4, 6, 5]},
        {"organ": "spleen", "slice": 2, "point": [3, 3], "positive": False},
    ]}, code="LPS")
    assert sorted(z for _, z in plan.prompts) == [0, 1, 2, 3, 4]
    low, high = np.array(plan.prompts[(1, 0)].box), np.array(plan.prompts[(1, 4)].box)
    assert np.allclose(plan.prompts[(1, 1)].box, 0.75 * low + 0.25 * high)
    assert plan.prompts[(1, 1)].source == INTERPOLATED
    middle = plan.prompts[(1, 2)]  # the user's point keeps its slice, which gets the interpolated box too
    assert middle.source == USER and np.allclose(middle.points[0][:2], (3, 3)) and middle.points[0][2] is False
    assert np.allclose(middle.box, (low + high) / 2)
    assert not plan.propagate


def test_millimetre_prompts_use_z():
    image = _image("LPS")
    x, y, z = image.TransformIndexToPhysicalPoint((2, 3, 1))
    plan, _ = _plan({"space": "ras", "propagate": True,
                     "prompts": [{"organ": "aorta", "z": z, "point": [-x, -y]}]}, code="LPS")
    assert plan.propagate and list(plan.prompts) == [(7, 1)]
    (col, row, positive), = plan.prompts[(7, 1)].points
    assert np.allclose((col, row), (2, 3)) and positive


@pytest.mark.parametrize("code", ["LPS", "LPI", "RAS"])
def test_propagation_limits_in_voxel_and_millimetres(code):
    image = _image(code)
    _, how = to_canonical(image, "LPS")
    canonical_of = {k: int(round(to_canonical_position((0, 0, k), "voxel", how)[0])) for k in range(5)}
    prompt = {"organ": "aorta", "slice": 2, "box": [0, 0, 2, 2]}
    plan = parse_prompts({"propagate": True, "prompts": [prompt], "limits": {"aorta": {"from": 1, "to": 3}}}, how)
    assert plan.limits == {7: tuple(sorted((canonical_of[1], canonical_of[3])))}
    z1 = image.TransformIndexToPhysicalPoint((0, 0, 1))[2]
    plan = parse_prompts({"space": "lps", "propagate": True, "limits": {"7": {"to": z1}},
                          "prompts": [{"organ": 7, "z": image.TransformIndexToPhysicalPoint((0, 0, 2))[2],
                                       "box": [*image.TransformIndexToPhysicalPoint((0, 0, 2))[:2],
                                               *image.TransformIndexToPhysicalPoint((2, 2, 2))[:2]]}]}, how)
    low, high = plan.limits[7]  # one end given: it bounds the side of the prompt it lies on
    assert (low, high) == ((canonical_of[1], None) if canonical_of[1] < canonical_of[2] else (None, canonical_of[1]))


@pytest.mark.parametrize("limits, patterns", [
    ([1, 3], ['"limits" must be an object']),
    ({"heart": {"from": 1}}, ['limits of "heart"', "unknown organ"]),
    ({"aorta": {"from": 1, "upto": 3}}, ['limits of "aorta"', 'with "from" and/or "to"']),
    ({"aorta": {"from": "1"}}, ['"from" must be a number']),
    ({"aorta": {"from": 1.5}}, ['"from" must be a whole slice index']),
    ({"aorta": {"from": 3, "to": 1}}, ['"from" (3) must not be above "to" (1)']),
    ({"aorta": {"from": 0, "to": 9}}, ["outside the volume"]),
    ({"aorta": {"from": 3, "to": 4}}, ["lie outside the limits"]),
    ({"liver": {"from": 0}}, ['limits of "liver"', "no prompt to propagate from"]),
])
def test_bad_propagation_limits_give_one_error_line(limits, patterns):
    _, how = to_canonical(_image("LPS"), "LPS")
    data = {"propagate": True, "prompts": [{"organ": "aorta", "slice": 2, "box": [0, 0, 2, 2]}], "limits": limits}
    one_line_error(lambda: parse_prompts(data, how, "p.json"), "p.json", *patterns)
    one_line_error(lambda: parse_prompts({**data, "propagate": False}, how, "p.json"), 'add "propagate": true')


def test_a_limit_on_a_non_axial_k_axis_is_refused():
    _, how = to_canonical(_image("PIR"), "LPS")
    data = {"propagate": True, "prompts": [{"organ": "aorta", "slice": 1, "point": [0, 0]}],
            "limits": {"aorta": {"from": 1}}}
    one_line_error(lambda: parse_prompts(data, how), "not lie on one axial slice")


@pytest.mark.parametrize("data, patterns", [
    ([], ['"prompts" list']),
    ({"prompts": []}, ['"prompts" list']),
    ({"space": "ijk", "prompts": [{}]}, ['"space" must be one of voxel, ras, lps']),
    ({"propagate": "yes", "prompts": [{}]}, ['"propagate" must be true or false']),
    ({"prompts": [3]}, ["prompt 1:", "must be an object"]),
    ({"prompts": [{"organ": "liver", "slice": 1}]}, ["prompt 1:", 'needs "box" or "point"']),
    ({"prompts": [{"organ": "heart", "slice": 1, "box": [0, 0, 1, 1]}]}, ["prompt 1:", 'unknown organ "heart"']),
    ({"prompts": [{"organ": 9, "slice": 1, "box": [0, 0, 1, 1]}]}, ["unknown organ 9"]),
    ({"prompts": [{"organ": "liver", "box": [0, 0, 1, 1]}]}, ['needs "slice"']),
    ({"prompts": [{"organ": "liver", "z": 3, "box": [0, 0, 1, 1]}]}, ['needs "slice"', '"z" is for ras/lps']),
    ({"space": "lps", "prompts": [{"organ": "liver", "slice": 3, "box": [0, 0, 1, 1]}]}, ['needs "z"']),
    ({"prompts": [{"organ": "liver", "slice": 1.5, "box": [0, 0, 1, 1]}]}, ["whole voxel index"]),
    ({"prompts": [{"organ": "liver", "slice": 1, "box": [0, 0, 1]}]}, ['"box" must be a list of 4 numbers']),
    ({"prompts": [{"organ": "liver", "slice": 1, "box": [0, 0, 1, "a"]}]}, ['"box" must be a list of 4 numbers']),
    ({"prompts": [{"organ": "liver", "slice": 9, "box": [0, 0, 1, 1]}]}, ["(0, 0, 9) voxel index is outside"]),
    ({"prompts": [{"organ": "liver", "slice": 1, "point": [0, 0], "positive": 1}]}, ['"positive" must be true']),
    ({"prompts": [{"organ": "liver", "slice": 1, "box": [0, 0, 1, 1]},
                  {"organ": "liver", "slice": 1, "box": [0, 0, 2, 2]}]}, ["prompt 2:", "a second box"]),
])
def test_bad_prompt_files_give_one_error_line(data, patterns):
    _, how = to_canonical(_image("LPS", size=(7, 6, 5)), "LPS")
    one_line_error(lambda: parse_prompts(data, how, "p.json"), "p.json", *patterns)


def test_a_box_across_axial_slices_is_refused():
    # stored sagittally: the file's k axis runs left-right, so a voxel box on "slice" k spans many axial slices
    _, how = to_canonical(_image("PIR"), "LPS")
    one_line_error(lambda: parse_prompts({"prompts": [{"organ": "liver", "slice": 1, "box": [0, 0, 3, 3]}]}, how),
                   "not lie on one axial slice", '"ras" or "lps"')


def test_unreadable_prompt_files(tmp_path):
    _, how = to_canonical(_image("LPS"), "LPS")
    one_line_error(lambda: read_prompt_file(tmp_path / "none.json", how), "does not exist")
    broken = tmp_path / "broken.json"
    broken.write_text('{"prompts": [', encoding="utf-8")
    one_line_error(lambda: read_prompt_file(broken, how), "broken.json is not valid JSON", "line 1")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"prompts": [{"organ": "liver", "slice": 1, "box": [0, 0, 1, 1]}]}), encoding="utf-8")
    assert list(read_prompt_file(good, how).prompts) == [(5, 1)]
