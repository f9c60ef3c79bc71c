"""The correction loop on the real MRML library, end to end, as a radiologist runs it (``product.md``, "The correction
loop"): segment, correct, segment again, run a partial (liver-only) segmentation and correct it, export it, fine-tune
on it, segment with the new model. Every edit survives every run, and the export holds only what was labelled.

Real parts throughout: the TotalSegmentator sample CT and its reference liver (the "correction"), the MRML scene and
Segment Editor's way of writing a segment, the ``hsam`` child processes (segment, finetune) with the real H-SAM
network at toy size.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install -e '.[test]')")

import SimpleITK as sitk  # noqa: E402
import slicer_headless  # noqa: E402  (puts HSAMSlicer/ on sys.path)
import slicer  # noqa: E402

from hsam.labels import ORGANS, remap_labels  # noqa: E402
from hsam.training.data import load_cases  # noqa: E402
from HSAMSlicerLib import results  # noqa: E402
from HSAMSlicerLib.export import PROVENANCE_FILE, segment_array  # noqa: E402
from HSAMSlicerLib.logic import HSAMSlicerLogic, RunOptions  # noqa: E402
from HSAMSlicerLib.testing import save_tiny_model  # noqa: E402

LIVER = 5


def correct(segmentation, segment_id: str, volume, truth: np.ndarray) -> None:
    """What the radiologist does in Segment Editor: the segment now holds ``truth`` (bool [k, j, i])."""
    slicer.util.updateSegmentBinaryLabelmapFromArray(truth.astype(np.uint8), segmentation, segment_id, volume)


@pytest.mark.slow  # five child runs (four segmentations, one fine-tune): 7.8 min on the busy shared 2-core machine
def test_the_correction_loop_keeps_every_edit_and_teaches_only_what_was_labelled(tmp_path, real_data):
    app = slicer_headless.start()
    folder = real_data / "totalsegmentator"
    volume = app.load_volume(folder / "example_ct_sm.nii.gz", "CT")
    reference = remap_labels(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_seg.nii.gz"))),
                             "totalseg_total")  # fmt: skip
    true_liver = reference == LIVER
    model = save_tiny_model(tmp_path / "tiny")
    logic = HSAMSlicerLogic(app.scene)
    options = RunOptions(model=str(model), device="cpu", mode="eager", show_3d=False)

    # 1. segment all organs, and correct the liver
    first = logic.process(volume, options)
    correct(first, "liver", volume, true_liver)
    assert [e.node_id for e in logic.results_of_volume(volume).edited] == [first.GetID()]

    # 2. segment again: the corrected result stays as it is, the new one sits beside it
    second = logic.process(volume, options)
    assert app.scene.GetNodeByID(first.GetID()) is first
    np.testing.assert_array_equal(segment_array(first, "liver", volume), true_liver)
    assert (first.GetName(), second.GetName()) == ("CT organs", "CT organs 2")

    # 3. a liver-only run replaces the untouched second result; the radiologist corrects its liver too
    partial = logic.process(volume, RunOptions(**{**vars(options), "organs": [LIVER]}))
    assert app.scene.GetNodeByID(second.GetID()) is None, "an untouched result is replaced"
    assert partial.GetName() == "CT organs 2"
    correct(partial, "liver", volume, true_liver)

    # 4. export the partial run: the liver, and nothing called "background" that nobody looked at
    case = logic.export_for_finetuning(partial, tmp_path / "cases")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "labels.nii.gz")))
    np.testing.assert_array_equal(labels, np.where(true_liver, LIVER, 0))
    provenance = json.loads((case / PROVENANCE_FILE).read_text())
    assert provenance["organs"] == {o.name: "labelled" if o.index == LIVER else "unknown" for o in ORGANS}
    assert provenance["changes"]["changed_organs"] == ["liver"], "the correction is recorded"
    (training_case,) = load_cases(case, (-125, 275), "LPS")
    assert training_case.unknown_organs == frozenset(o.index for o in ORGANS) - {LIVER}

    # 5. fine-tune the tiny model on it (a child process, as in Slicer); the new model is installed
    state = logic.start_finetune(tmp_path / "cases", str(model), epochs=1, name="tiny-ft", device="cpu").wait(
        timeout=600, cleanup=True)
    assert state.error is None, state.error
    tuned = (state.result.get("model") or {}).get("id")
    assert tuned == "tiny-ft"

    # 6. segment with the new model: both corrected results are still there, unchanged
    again = logic.process(volume, RunOptions(**{**vars(options), "model": tuned}))
    assert again.GetAttribute("HSAMSlicer.ModelId") == tuned and again.GetName() == "CT organs 3"
    for corrected in (first, partial):
        assert app.scene.GetNodeByID(corrected.GetID()) is corrected
        np.testing.assert_array_equal(segment_array(corrected, "liver", volume), true_liver)
        assert results.is_result(corrected) and not results.is_untouched(corrected)
    assert logic.find_result(volume) is again
