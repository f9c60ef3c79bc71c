"""Slab search (hsam.pipeline.slab, issue 30): which slices are encoded, and that the labels stay those of the full run."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import needs_litemedsam
from hsam.pipeline.slab import choose_slab, encoded_mask, plan_probes


def test_probe_step_and_margin_follow_the_slice_spacing():
    plan = plan_probes(112, 3.0, 9.0)
    assert (plan.probe_step, plan.margin, plan.min_voxels) == (5, 4, 23)  # 200 mm^2 of 3 x 3 mm pixels
    assert plan.probes[:3] == [0, 5, 10] and plan.probes[-1] == 111
    assert plan_probes(133, 2.5, 0.7 ** 2).probe_step == 6


def test_a_short_volume_is_encoded_whole():
    plan = plan_probes(3, 1.0, 1.0)
    assert plan.probes == [0, 1, 2] and plan.encoded == 3 and "too short" in plan.reason
    assert choose_slab(plan, np.zeros((3, 4, 4), np.uint8)) == []


def test_no_organ_on_any_probe_encodes_everything():
    plan = plan_probes(60, 3.0, 9.0)
    rest = choose_slab(plan, np.zeros((60, 4, 4), np.uint8))
    assert sorted(rest + plan.probes) == list(range(60)) and plan.encoded == 60
    assert encoded_mask(plan).all()


def test_slab_is_the_found_range_widened_by_one_step_and_the_margin():
    labels = np.zeros((100, 8, 8), np.uint8)
    labels[50:71, :4, :6] = 3  # an organ of 24 voxels (216 mm^2) on slices 50-70: probes (every 5th) find it on 50-70
    labels[10, 0, :5] = 2  # a few stray voxels (45 mm^2) on probe 10: they do not stretch the slab
    plan = plan_probes(100, 3.0, 9.0)
    rest = choose_slab(plan, labels)
    assert (plan.first, plan.last) == (50 - 9, 70 + 9)
    assert set(rest) == set(range(41, 80)) - set(plan.probes)
    assert plan.encoded == 39 + sum(1 for z in plan.probes if not 41 <= z <= 79)
    mask = encoded_mask(plan)
    assert mask[41:80].all() and mask[0] and not mask[1]


def test_slab_on_the_real_reference_labels_covers_every_organ_slice(real_data):
    """The probes answered by TotalSegmentator's labels of example_ct (organs in z 61-111 of 112): the slab keeps
    every slice with an organ and skips the pelvis."""
    from hsam.labels import remap_labels

    image = sitk.ReadImage(str(real_data / "totalsegmentator" / "example_seg_fast_force_split.nii.gz"))
    labels = remap_labels(sitk.GetArrayFromImage(image), "totalseg_total")
    plan = plan_probes(labels.shape[0], image.GetSpacing()[2], image.GetSpacing()[0] * image.GetSpacing()[1])
    choose_slab(plan, labels)
    organ_slices = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    assert encoded_mask(plan)[organ_slices].all()
    assert plan.encoded < 0.75 * labels.shape[0]


@pytest.mark.slow
@needs_litemedsam
def test_segment_volume_with_the_slab_keeps_the_full_runs_labels(real_data):
    """H-SAM-Lite on every 3rd slice of example_ct (38 slices of 9 mm; organs in the upper half): the slab run
    encodes fewer slices, its labels equal the full run's on >= 99.9 % of voxels, the orientation check runs on
    encoded slices only, and progress ends at the slices encoded."""
    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.run import segment_volume
    from hsam.weights.store import load_named_model

    model, card = load_named_model("hsam-lite-demo")
    image = sitk.ReadImage(str(real_data / "totalsegmentator" / "example_ct.nii.gz"))[:, :, ::3]
    full = segment_volume(image, model, card, SegmentOptions(device="cpu", mode="eager", slab=False))
    calls, messages = [], []
    sparse = segment_volume(image, model, card,
                            SegmentOptions(device="cpu", mode="eager", slab=True), progress=lambda k,
                                           n: calls.append((k, n)), status=messages.append)
    plan = sparse.slab
    assert plan is not None and plan["encoded"] < plan["total"] == image.GetSize()[2]
    assert calls[0] == (0, plan["total"]) and calls[-1] == (plan["encoded"], plan["encoded"])
    assert any(m.startswith("slab: organs on probe slices") for m in messages)
    equal = (sitk.GetArrayFromImage(sparse.labels) == sitk.GetArrayFromImage(full.labels)).mean()
    assert equal >= 0.999
    checked = sparse.orientation_check["slices"]
    probes = set(plan_probes(plan["total"], 9.0, 9.0).probes)
    assert checked and all(plan["first"] <= z <= plan["last"] or z in probes for z in checked)


@needs_litemedsam
def test_cli_reports_the_slab_stage_and_result(real_data, tmp_path, capsys):
    """``hsam segment --slab --progress json`` on dcmqi's 3-slice CT: a ``slab`` status line says what the search did
    (too short to skip anything) and the result carries the plan."""
    import json

    from hsam.cli import main

    out = tmp_path / "labels.nii.gz"
    code = main(["segment", str(real_data / "dcmqi" / "ct-3slice"), "-o", str(out), "--model", "hsam-lite-demo",
                 "--device", "cpu", "--mode", "eager", "--slab", "--progress", "json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert code == 0 and out.exists()
    assert any(e.get("stage") == "slab" and "too short" in e.get("status", "") for e in lines)
    result = lines[-1]["result"]
    assert result["slab"]["encoded"] == result["slab"]["total"] == 3


def test_reference_protocol_refuses_the_slab_search(real_data, tmp_path, capsys):
    from hsam.cli import main

    code = main(["segment", str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz"), "-o",
                 str(tmp_path / "l.nii.gz"), "--protocol", "reference", "--slab"])
    err = capsys.readouterr().err
    assert code == 2 and "--slab" in err and not (tmp_path / "l.nii.gz").exists()
