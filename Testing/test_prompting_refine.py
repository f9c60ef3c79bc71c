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


@pytest.fixture(scope="module")
def dcmqi_liver(real_data) -> tuple[sitk.Image, np.ndarray]:
    """The 3 dcmqi CT slices (512 x 512, 0.81 mm pixels: fine enough for the default rule) and their liver mask."""
    from hsam.volume import read_image

    ct = read_image(str(real_data / "dcmqi" / "ct-3slice"))
    labels = sitk.Resample(sitk.ReadImage(str(real_data / "dcmqi" / "liver_seg.nrrd")), ct, sitk.Transform(),
                           sitk.sitkNearestNeighbor, 0)
    return ct, sitk.GetArrayFromImage(labels) == 1


@needs_litemedsam
@pytest.mark.slow  # 3 slices of 512 x 512, twice
def test_refined_labels_only_add_in_the_trunk_and_raise_the_liver(dcmqi_liver):
    from hsam.checks.body_mask import trunk_mask_slice
    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.run import segment_volume
    from hsam.weights.store import load_named_model

    ct, truth = dcmqi_liver
    model, card = load_named_model("hsam-lite-demo")
    messages: list[str] = []
    runs = {}
    for refine in (False, True):
        options = SegmentOptions(device="cpu", mode="eager", refine=refine, check_orientation=False)
        result = segment_volume(ct, model, card, options, status=messages.append)
        runs[refine] = sitk.GetArrayFromImage(result.labels)
    assert any(m.startswith("refine") for m in messages)
    automatic, refined = runs[False], runs[True]
    organ = automatic > 0
    assert np.array_equal(refined[organ], automatic[organ])  # add-only: no automatic voxel removed or relabelled
    hu = sitk.GetArrayFromImage(ct)
    spacing = ct.GetSpacing()
    for z in range(refined.shape[0]):
        assert not (refined[z] > 0)[~trunk_mask_slice(hu[z], (spacing[1], spacing[0]), tissue_hu=-160.0)].any()

    def liver_dice(labels: np.ndarray) -> float:
        liver = labels == 5
        return 2 * (liver & truth).sum() / (liver.sum() + truth.sum())

    assert liver_dice(refined) > liver_dice(automatic) > 0.85  # bench_refine.py: 0.909 -> 0.923


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


class _Counted:
    """The real prompt decoder, counting the boxes sent to it."""

    def __init__(self, decoder) -> None:  # noqa: ANN001
        self.decoder, self.boxes = decoder, 0

    def __call__(self, embedding, boxes):  # noqa: ANN001
        self.boxes += len(boxes)
        return self.decoder(embedding, boxes)


def _organ_logits(margin: float) -> "torch.Tensor":
    """Automatic logits [1, 9, 256, 256]: a liver (5) disc and a stomach (6) square on background, each winning by
    ``margin`` (large: a confident model; small: an unsure one)."""
    import torch

    yy, xx = np.mgrid[:256, :256]
    winner = np.zeros((256, 256), dtype=np.int64)
    winner[(yy - 120) ** 2 + (xx - 90) ** 2 < 40 ** 2] = 5
    winner[150:190, 150:200] = 6
    logits = torch.zeros(1, 9, 256, 256)
    logits[0].scatter_(0, torch.from_numpy(winner)[None], margin)
    return logits


@pytest.fixture(scope="module")
def real_decoder():
    from hsam.prompting.decoder import load_prompt_decoder

    return load_prompt_decoder().eval()


@needs_litemedsam
def test_confidence_gate_leaves_a_confident_slice_untouched_without_a_decoder_call(real_decoder):
    import torch

    from hsam.prompting.refine import refine_batch

    torch.manual_seed(0)
    embedding = torch.randn(1, 256, 64, 64)
    trunk = np.ones((1, 256, 256), dtype=bool)
    gate = RefineRule(confident=0.95, min_unsure_share=0.2)
    for margin, decoded in ((12.0, False), (2.5, True)):  # softmax top 0.9995 (sure) / 0.60 (unsure)
        logits = _organ_logits(margin)
        counted = _Counted(real_decoder)
        with torch.inference_mode():
            labels, _ = refine_batch(counted, embedding, logits, trunk, range(1, 9), (256, 256), (1.0, 1.0), gate)
        assert (counted.boxes > 0) == decoded
        if not decoded:
            assert np.array_equal(labels[0], logits[0].argmax(0).numpy())
    counted = _Counted(real_decoder)
    with torch.inference_mode():  # without the gate the confident slice is decoded: two organs, two passes
        refine_batch(counted, embedding, _organ_logits(12.0), trunk, range(1, 9), (256, 256), (1.0, 1.0),
                     RefineRule(rebox_px=2.5))
    assert counted.boxes == 4
    counted = _Counted(real_decoder)
    with torch.inference_mode():  # 3-mm pixels: coarser than the default rule refines, so no decoder call at all
        labels, _ = refine_batch(counted, embedding, _organ_logits(2.5), trunk, range(1, 9), (256, 256), (3.0, 3.0))
    assert counted.boxes == 0 and np.array_equal(labels[0], _organ_logits(2.5)[0].argmax(0).numpy())


@needs_litemedsam
def test_add_only_never_removes_an_automatic_voxel(real_decoder):
    import torch

    from hsam.prompting.refine import refine_batch

    torch.manual_seed(1)
    embedding = torch.randn(1, 256, 64, 64)
    logits = _organ_logits(3.0)  # an organ's probability is 0.035 on background, 0.71 inside it
    trunk = np.ones((1, 256, 256), dtype=bool)
    trunk[0, :, :60] = False  # the liver disc (columns 50-130) reaches out of the trunk
    automatic = logits[0].argmax(0).numpy()
    probability = torch.softmax(logits[0], 0).numpy()
    with torch.inference_mode():
        replaced, _ = refine_batch(real_decoder, embedding, logits, trunk, range(1, 9), (256, 256), (1.0, 1.0),
                                   RefineRule(add_floor=None))
        added, _ = refine_batch(real_decoder, embedding, logits, trunk, range(1, 9), (256, 256), (1.0, 1.0),
                                RefineRule(add_floor=0.02))
    assert (replaced[0] != automatic).any()  # the decoder's masks differ from the automatic ones here
    organ = automatic > 0
    assert np.array_equal(added[0][organ], automatic[organ])  # add-only: every automatic organ voxel kept
    new = added[0] != automatic
    assert new.any() and (automatic[new] == 0).all()  # it did add, only on automatic background in the trunk ...
    assert not new[~trunk[0]].any()
    own = np.take_along_axis(probability, added[0][None].astype(np.int64), 0)[0]
    assert (own[new] >= 0.02).all()  # ... where the added organ's automatic probability reaches the floor


def test_taken_from_decoder_add_only_floor_and_confidence():
    from hsam.prompting.refine import taken_from_decoder

    automatic = np.array([[0, 0, 5, 5]])
    organ = np.array([[5, 6, 0, 6]])  # the decoder's answer
    probability = np.zeros((9, 1, 4))
    probability[0] = [0.9, 0.5, 0.1, 0.1]
    probability[5] = [0.1, 0.48, 0.9, 0.85]
    probability[6] = [0.0, 0.02, 0.0, 0.05]
    replace = taken_from_decoder(automatic, probability, organ, [5, 6], RefineRule(add_floor=None))
    assert replace.tolist() == [[True, True, True, True]]
    add = taken_from_decoder(automatic, probability, organ, [5, 6], RefineRule(add_floor=0.05))
    assert add.tolist() == [[True, False, False, False]]  # stomach below its floor; liver voxels never removed
    sure = taken_from_decoder(automatic, probability, organ, [5, 6], RefineRule(add_floor=None, confident=0.88))
    assert sure.tolist() == [[False, True, False, True]]  # the automatic label stays where its model is sure


def _bench_refine():  # noqa: ANN202 (module)
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "prompting"
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("bench_refine", folder / "bench_refine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_refine_reads_any_rule_from_the_command_line():
    bench = _bench_refine()
    assert bench.parse_arm("stage") == ("stage", RefineRule())
    name, rule = bench.parse_arm("sa=add_floor=none,rebox_px=2.5,organs=6+7,confident=0.95")
    assert name == "sa" and rule == RefineRule(add_floor=None, rebox_px=2.5, organs=(6, 7), confident=0.95)
    with pytest.raises(SystemExit, match="no RefineRule field"):
        bench.parse_arm("bad=floor=0.1")


@needs_litemedsam
def test_bench_counts_each_arms_boxes_and_decodes_a_box_once(real_decoder):
    import torch

    bench = _bench_refine()
    counting = bench.CountingDecoder(real_decoder)
    embedding = torch.randn(256, 64, 64)
    boxes = torch.tensor([[10.0, 20.0, 80.0, 90.0], [100.0, 100.0, 150.0, 160.0]])
    counting.arm = "a"
    first = counting(embedding, boxes).logits
    counting.arm = "b"
    again = counting(embedding, boxes[:1]).logits
    assert (counting.calls["a"], counting.boxes["a"], counting.boxes["b"]) == (1, 2, 1)
    assert len(counting.memory) == 2 and torch.equal(again[0], first[0])
    with torch.inference_mode():
        direct = real_decoder(embedding, boxes).logits
    assert torch.allclose(first, direct, atol=0.05)  # kept as float16


@needs_litemedsam
def test_the_stage_loads_no_decoder_for_coarse_slices():
    from hsam.pipeline.refine import refine_decoder
    from hsam.weights.store import load_named_model

    model, _ = load_named_model("hsam-lite-demo")
    messages: list[str] = []
    assert refine_decoder(model, True, messages.append, (0.81, 0.81)) is not None
    assert refine_decoder(model, True, messages.append, (3.0, 3.0)) is None  # the plain predict path runs instead
    assert messages[-1].startswith("refine: skipped") and "3.00 mm" in messages[-1]
    assert RefineRule().refines((1.5, 0.7)) and not RefineRule().refines((0.7, 1.6))
    assert RefineRule(max_pixel_mm=None).refines((3.0, 3.0))


def test_add_only_with_a_width_keeps_wide_additions_and_drops_thin_rims():
    from hsam.prompting.refine import taken_from_decoder

    automatic = np.zeros((64, 64), dtype=np.int64)
    automatic[20:40, 20:40] = 5
    organ = np.zeros((64, 64), dtype=np.int64)
    organ[19:41, 19:41] = 5  # the decoder's liver: the automatic one and a 1-px rim around it ...
    organ[20:40, 41:55] = 5  # ... and a 14-px wide part the automatic model missed
    probability = np.full((9, 64, 64), 0.1)
    rule = RefineRule(add_min_width_px=24)  # on a 64-px slice: 6 slice pixels (a 5-px wide ellipse)
    taken = taken_from_decoder(automatic, probability, organ, [5], rule)
    assert taken[22:38, 43:53].all() and not taken[19, 19:41].any() and not taken[19:41, 19].any()
    assert taken_from_decoder(automatic, probability, organ, [5], RefineRule())[19, 19:41].all()  # no width: rim too
