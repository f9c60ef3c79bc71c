"""Zoomed prompting (hsam.prompting.zoom): the crop around a box, its model input, the way back to the slice, and
a zoomed session with LiteMedSAM's real encoder and decoder on a real CT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import needs_litemedsam

from hsam.prompting.decoder import INPUT_SIZE
from hsam.prompting.session import model_box
from hsam.prompting.zoom import (
    OUTSIDE_LOGIT, Frame, Zoom, frame_image, paste, square_frame, whole_frame, zoom_frame,
)


@pytest.mark.parametrize("box", [(100.0, 200.0, 140.0, 260.0), (2.0, 3.0, 30.0, 20.0), (480.0, 490.0, 510.0, 511.0)])
def test_the_frame_is_a_square_around_the_box_inside_the_slice(box):
    frame = zoom_frame(box, (512, 512), (0.7, 0.7), Zoom(factor=2.0, min_mm=60.0))
    assert frame.height == frame.width >= max(2 * (box[2] - box[0]), 2 * (box[3] - box[1]), 60 / 0.7)
    assert 0 <= frame.top and frame.top + frame.height <= 512 and 0 <= frame.left and frame.left + frame.width <= 512
    assert frame.left <= box[0] and box[2] <= frame.left + frame.width - 1
    assert frame.top <= box[1] and box[3] <= frame.top + frame.height - 1


def test_a_frame_as_big_as_the_slice_is_the_whole_slice_and_a_wider_one_is_padded():
    assert zoom_frame((10.0, 10.0, 400.0, 100.0), (512, 512), (0.7, 0.7), Zoom(2.0, 60.0)) == whole_frame((512, 512))
    frame = zoom_frame((30.0, 60.0, 85.0, 90.0), (101, 122), (3.0, 3.0), Zoom(2.0, 60.0))
    assert frame.height == frame.width == 110 and frame.top <= 0 and frame.top + frame.height >= 101
    assert 0 <= frame.left and frame.left + frame.width <= 122


def test_a_square_frame_pads_the_short_side_at_the_bottom():
    frame = square_frame((101, 122))
    assert frame == Frame(0, 0, 122, 122) and square_frame((512, 512)) == whole_frame((512, 512))
    x0, y0, x1, y1 = frame.model_box((-0.5, -0.5, 121.5, 100.5))  # the whole slice
    assert np.allclose((x0, y0, x1), (0.0, 0.0, 256.0)) and abs(y1 - 256 * 101 / 122) < 1e-6


def test_the_whole_frame_maps_boxes_like_the_sessions_model_box():
    box = (10.0, 20.0, 60.0, 90.0)
    assert np.allclose(whole_frame((101, 122)).model_box(box), model_box(box, 101, 122))


def test_the_model_input_is_the_crop_padded_with_zero():
    rows, cols = np.mgrid[0:101, 0:122]
    windowed = (0.5 + 0.4 * np.sin(rows / 7.0) * np.cos(cols / 5.0)).astype(np.float32)
    frame = Frame(-10, 20, 64, 64)
    image = frame_image(windowed, frame)
    assert image.shape == (1, 3, INPUT_SIZE, INPUT_SIZE)
    assert torch.equal(image[0, 0], image[0, 2])
    assert float(image[0, 0, :30].abs().max()) == 0.0  # rows -10..-3 of the frame: 32 model px of padding
    back = torch.nn.functional.avg_pool2d(image[:, :1], 4)[0, 0].numpy()  # 256 -> the crop's 64 px
    assert np.abs(back[12:] - windowed[2:54, 20:84]).mean() < 0.05


def test_a_box_in_the_model_frame_comes_back_on_the_slice_where_it_was():
    frame = Frame(30, -8, 80, 80)
    box = (5.0, 40.0, 50.0, 90.0)  # edges on the slice
    x0, y0, x1, y1 = frame.model_box(box)
    yy, xx = np.mgrid[0:INPUT_SIZE, 0:INPUT_SIZE] + 0.5
    inside = (xx > x0) & (xx < x1) & (yy > y0) & (yy < y1)
    logits = torch.from_numpy(np.where(inside, 5.0, -5.0).astype(np.float32))[None]
    slice_logits = paste(logits, frame, (120, 100))[0].numpy()
    expected = np.zeros((120, 100), dtype=bool)
    expected[41:90, 6:50] = True  # pixel centres strictly inside the box's edges
    assert ((slice_logits > 0) == expected).mean() > 0.99
    assert np.all(slice_logits[:30] == OUTSIDE_LOGIT) and np.all(slice_logits[:, 72:] == OUTSIDE_LOGIT)


@pytest.fixture(scope="module")
def slice15(real_data):
    """(session on example_ct_sm, H-SAM reference labels of its canonical slice 15)."""
    import SimpleITK as sitk

    from hsam.labels import remap_labels
    from hsam.prompting.build import open_session
    from hsam.volume import to_canonical

    ct = sitk.ReadImage(str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz"))
    labels, _ = to_canonical(sitk.ReadImage(str(real_data / "totalsegmentator" / "example_seg.nii.gz")), "LPS")
    return open_session(ct), remap_labels(labels, "totalseg_total")[15]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


@needs_litemedsam
def test_a_zoomed_session_decodes_a_box_in_its_own_crop(slice15):
    from hsam.prompting.session import SlicePrompt, box_of

    session, reference = slice15
    session.zoom = Zoom(2.0, 60.0)
    try:
        prompt = SlicePrompt(box_of(reference == 6, 1.0))  # the stomach: a crop smaller than the slice
        frame = session.frame_for(prompt)
        assert frame != whole_frame(session.shape[1:])
        mask = session.set_prompt(6, 15, prompt)
        outside = np.ones_like(mask)
        outside[max(0, frame.top) : frame.top + frame.height, max(0, frame.left) : frame.left + frame.width] = False
        assert not (mask & outside).any()
        assert _dice(mask, reference == 6) > 0.6  # lower than unzoomed on this 3-mm CT: RESULTS.md
        assert session.frames.computed == 2  # the box, then its re-box: 2 crops
    finally:
        session.zoom = None


@needs_litemedsam
def test_a_box_is_decoded_again_from_its_masks_box_and_stays_the_users_prompt(slice15):
    from hsam.prompting.session import SlicePrompt, box_of

    session, reference = slice15
    loose = SlicePrompt(box_of(reference == 2, 4.0))  # right kidney, a loose box
    session.rebox_mm = None
    first = session.set_prompt(2, 15, loose)
    margin_px = 3.5 / float(np.mean(session.pixel_mm))
    (expected, _), = session.decode(15, [SlicePrompt(box_of(first, margin_px))])
    session.rebox_mm = 3.5
    again = session.set_prompt(2, 15, loose)
    assert np.array_equal(again, expected > 0) and session.prompts[(2, 15)] is loose
    clicked = SlicePrompt(loose.box, [(float(np.argwhere(first)[0][1]), float(np.argwhere(first)[0][0]), True)])
    (with_point, _), = session.decode(15, [clicked])
    assert np.array_equal(session.set_prompt(2, 15, clicked), with_point > 0)  # clicks correct the box as drawn
    assert _dice(again, reference == 2) > 0.8
