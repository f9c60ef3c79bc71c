"""The trunk mask (hsam.checks.body_mask): arms beside the body are background, the trunk is untouched, MR passes through;
segment_volume applies it by default and not with body_mask=False (issue 15: arms labelled liver and spleen)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hsam.checks.body_mask import clear_outside_trunk, trunk_mask_slice

PIXEL_MM = 1.5


def _disc(shape, centre, radii) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1.0


def phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(HU slice, trunk, right-of-image arm touching the trunk through a 9 mm skin bridge, free arm on the left)."""
    shape = (256, 300)
    hu = np.full(shape, -1000.0)
    trunk = _disc(shape, (128, 150), (70, 90))
    touching = _disc(shape, (128, 267), (25, 25))
    free = _disc(shape, (128, 30), (25, 22))
    bridge = np.zeros(shape, bool)
    bridge[125:131, 235:245] = True  # 6 px = 9 mm wide contact
    hu[trunk | touching | free | bridge] = 40.0
    hu[_disc(shape, (110, 120), (20, 15))] = -850.0  # a lung-like hole inside the trunk is still trunk
    return hu, trunk, touching, free


def test_arms_are_outside_the_trunk_and_the_trunk_is_kept():
    hu, trunk, touching, free = phantom()
    mask = trunk_mask_slice(hu, (PIXEL_MM, PIXEL_MM))
    assert mask[trunk].all()  # every trunk voxel, the air-filled hole included
    assert not mask[free].any()
    assert mask[touching].mean() < 0.05  # only the rim next to the bridge may stay
    labels = np.ones((1,) + hu.shape, np.uint8)
    cleared = clear_outside_trunk(labels, hu[None], (PIXEL_MM, PIXEL_MM))
    assert labels[0][trunk].all() and not labels[0][free].any()
    assert cleared >= int(free.sum())


def test_input_that_is_not_hu_is_untouched():
    rng = np.random.default_rng(0)
    mr_like = rng.uniform(0.0, 800.0, size=(2, 64, 64))  # MR / [0, 1]-scaled input: no air at -1000
    labels = rng.integers(0, 9, size=mr_like.shape).astype(np.uint8)
    before = labels.copy()
    assert clear_outside_trunk(labels, mr_like, (1.0, 1.0)) == 0
    np.testing.assert_array_equal(labels, before)


def test_an_air_slice_keeps_no_labels():
    labels = np.full((1, 32, 32), 5, np.uint8)
    clear_outside_trunk(labels, np.full((1, 32, 32), -1000.0), (1.0, 1.0))
    assert not labels.any()


@pytest.fixture(scope="module")
def liver_everywhere():
    """The tiny network with ``predict`` replaced: class 5 (liver) wins at every pixel, so only the mask decides."""
    from hsam.labels import CLASS_NAMES
    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard
    from hsam.model.config import load_model_config

    config = load_model_config("vit_tiny")
    model = build_hsam(config).eval()

    def predict(images: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(images.shape[0], len(CLASS_NAMES), *images.shape[-2:])
        logits[:, 5] = 10.0
        return logits

    model.predict = predict  # type: ignore[method-assign]
    return model, ModelCard.for_config(config, "liver-everywhere", classes=list(CLASS_NAMES), demo=True)


@pytest.mark.parametrize("body_mask", [True, False])
def test_segment_volume_masks_arms_by_default(liver_everywhere, body_mask):
    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.run import segment_volume

    model, card = liver_everywhere
    hu, trunk, touching, free = phantom()
    image = sitk.GetImageFromArray(np.stack([hu] * 3).astype(np.int16))
    image.SetSpacing((PIXEL_MM, PIXEL_MM, 2.0))
    kwargs = {} if body_mask else {"body_mask": False}
    result = segment_volume(image, model, card,
                            SegmentOptions(device="cpu", mode="eager", check_orientation=False, **kwargs))
    labels = sitk.GetArrayFromImage(result.labels)
    assert (labels[:, trunk] == 5).all()
    if body_mask:
        assert not labels[:, free].any() and (labels[:, touching] == 0).mean() > 0.95
        assert result.volumes_ml["liver"] < float(trunk.sum() * 1.1) * PIXEL_MM**2 * 2.0 * 3 / 1000
    else:
        assert (labels[:, free] == 5).all()  # the old behaviour: the arm is "liver"


def test_trunk_box_is_a_square_around_the_trunk():
    from hsam.checks.body_mask import trunk_box

    hu, trunk, touching, free = phantom()
    rows, cols = trunk_box(np.stack([hu, hu]), (PIXEL_MM, PIXEL_MM), margin_mm=15.0)
    inside = np.zeros(hu.shape, bool)
    inside[rows, cols] = True
    assert inside[trunk].all()  # the whole trunk, with margin
    assert not inside[free].all() and not inside[touching].all()  # the arms are (mostly) cut off
    assert abs((rows.stop - rows.start) - (cols.stop - cols.start)) <= 1 or rows.stop == hu.shape[0] or rows.start == 0
    assert trunk_box(np.full((2, 16, 16), -1000.0), (1.0, 1.0)) is None


def test_crop_to_body_feeds_the_model_the_trunk_only(liver_everywhere):
    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.run import segment_volume

    model, card = liver_everywhere
    hu, trunk, touching, free = phantom()
    image = sitk.GetImageFromArray(np.stack([hu] * 2).astype(np.int16))
    image.SetSpacing((PIXEL_MM, PIXEL_MM, 2.0))
    result = segment_volume(image, model, card,
                            SegmentOptions(device="cpu", mode="eager", check_orientation=False, body_mask=False,
                                           crop_to_body=True))
    labels = sitk.GetArrayFromImage(result.labels)
    assert (labels[:, trunk] == 5).all()
    assert (labels[:, free] == 0).mean() > 0.5  # outside the square: background even without the body mask
    assert labels.shape == (2,) + hu.shape
