"""The refine stage of ``hsam segment``: boxes from the automatic result, LiteMedSAM's decoder, body mask kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import needs_litemedsam, one_line_error

from hsam.prompting.refine import RefineRule, _box


def test_box_rule_widens_and_keeps_a_minimum_side():
    mask = np.zeros((256, 256), dtype=bool)
    mask[100:103, 50:150] = True  # 3 rows, 100 cols
    x0, y0, x1, y1 = _box(mask, widen=5.0, min_side=20.0)
    assert (x0, x1) == (45.0, 155.0)  # widened by 5 on both sides
    assert y1 - y0 == 20.0 and (y0 + y1) / 2 == 101.5  # 3 + 10 < 20: grown to 20 around the centre
    assert _box(np.zeros((256, 256), dtype=bool), 5.0, 20.0) is None
    assert RefineRule().min_probability == 0.3


def test_refine_boxes_are_the_boxes_a_session_sends_for_the_same_mask():
    from hsam.prompting.session import box_of, model_box

    mask = np.zeros((256, 256), dtype=bool)
    mask[40:90, 7:200] = True
    user = model_box(box_of(mask), 256, 256)  # what PromptSession.decode sends for SlicePrompt(box_of(mask))
    assert _box(mask, widen=0.0, min_side=0.0) == user == (7.0, 40.0, 200.0, 90.0)  # pixel k covers [k, k + 1]
    big = np.zeros((512, 512), dtype=bool)
    big[80:180, 14:400] = True  # the same mask on a 512-px slice: the same box in the decoder's frame
    assert np.allclose(model_box(box_of(big), 512, 512), user)


@pytest.fixture(scope="module")
def three_slices(real_data) -> tuple[sitk.Image, np.ndarray]:
    """Slices 14-16 of example_ct_sm (RAS-stored) and their H-SAM reference labels."""
    from hsam.labels import remap_labels

    ct = sitk.ReadImage(str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz"))[:, :, 14:17]
    labels = sitk.ReadImage(str(real_data / "totalsegmentator" / "example_seg.nii.gz"))[:, :, 14:17]
    return ct, remap_labels(sitk.GetArrayFromImage(labels), "totalseg_total")


@needs_litemedsam
@pytest.mark.slow  # 3 slices, but 3.5 min on the loaded shared 2-core machine
def test_refined_labels_stay_in_the_trunk_and_find_the_liver(three_slices):
    from hsam.checks.body_mask import trunk_mask_slice
    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.run import segment_volume
    from hsam.weights.store import load_named_model

    ct, reference = three_slices
    model, card = load_named_model("hsam-lite-demo")
    messages: list[str] = []
    result = segment_volume(ct, model, card,
                            SegmentOptions(device="cpu", mode="eager", refine=True, check_orientation=False),
                                           status=messages.append)
    assert any(m.startswith("refine") for m in messages)
    labels = sitk.GetArrayFromImage(result.labels)
    hu = sitk.GetArrayFromImage(ct)
    spacing = ct.GetSpacing()
    for z in range(labels.shape[0]):
        assert not (labels[z] > 0)[~trunk_mask_slice(hu[z], (spacing[1], spacing[0]), tissue_hu=-160.0)].any()
    liver, truth = labels == 5, reference == 5
    assert 2 * (liver & truth).sum() / (liver.sum() + truth.sum()) > 0.85


def test_refine_needs_a_lite_model(three_slices):
    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.run import segment_volume
    from hsam.labels import CLASS_NAMES
    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard
    from hsam.model.config import load_model_config

    config = load_model_config("vit_tiny")
    card = ModelCard.for_config(config, "tiny", title="tiny", classes=list(CLASS_NAMES), demo=True)
    one_line_error(lambda: segment_volume(three_slices[0], build_hsam(config), card,
                                          SegmentOptions(device="cpu", refine=True)),
                   "H-SAM-Lite", "without --refine")


@needs_litemedsam
@pytest.mark.slow
def test_cli_progress_shows_the_refine_stage(three_slices, tmp_path, capsys):
    from hsam.cli import main

    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(three_slices[0], str(source))
    code = main(["segment", str(source), "-o", str(tmp_path / "labels.nii.gz"), "--model", "hsam-lite-demo",
                 "--device", "cpu", "--mode", "eager", "--refine", "--progress", "json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0, lines[-1]
    assert any(line.get("stage") == "refine" for line in lines)
    assert lines[-1].get("finished")


def test_cli_refuses_refine_with_the_reference_protocol(three_slices, tmp_path, capsys):
    from hsam.cli import main

    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(three_slices[0], str(source))
    assert main(["segment", str(source), "-o", str(tmp_path / "l.nii.gz"), "--protocol", "reference",
                 "--refine"]) == 2
    assert "--refine" in capsys.readouterr().err
