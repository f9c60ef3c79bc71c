"""Prompts from the Slicer Logic (Qt-free) on the real MRML library and a real warm ``hsam serve`` child (the bundled
demo model's TinyViT encoder, LiteMedSAM's decoder): a box gives the liver segment its mask, +/- points and
propagation change only the liver segment, Undo puts back what was there, other segments never change, a killed
process is restarted once with one note (twice in a row: it stops and says so), and closing the scene or removing
the CT ends the process group."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from conftest import needs_litemedsam

pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install -e '.[test]')")

import SimpleITK as sitk  # noqa: E402
import slicer_headless  # noqa: E402  (puts HSAMSlicer/ on sys.path)
import slicer  # noqa: E402
import vtk  # noqa: E402

from hsam.labels import remap_labels  # noqa: E402
from HSAMSlicerLib.export import segment_array  # noqa: E402
from HSAMSlicerLib.process import group_alive  # noqa: E402
from HSAMSlicerLib.prompt_logic import PromptLogic, roi_corners  # noqa: E402

pytestmark = [needs_litemedsam, pytest.mark.slow]  # a child process that loads the model and encodes slices
SLICE = 15  # a slice of the sample CT through liver and spleen


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def ras_of(volume, i: float, j: float, k: float) -> tuple[float, float, float]:
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return tuple(matrix.MultiplyPoint([i, j, k, 1.0])[:3])


def box_corners(volume, truth_slice: np.ndarray, k: int) -> list[tuple[float, float, float]]:
    """World-RAS corners of the organ's bounding box on slice k (voxel faces, as a user drags a box around it)."""
    rows, cols = np.flatnonzero(truth_slice.any(axis=1)), np.flatnonzero(truth_slice.any(axis=0))
    return [ras_of(volume, cols[0] - 0.5, rows[0] - 0.5, k), ras_of(volume, cols[-1] + 0.5, rows[-1] + 0.5, k)]


@pytest.fixture
def scene(real_data, tmp_path):
    """The sample CT with its liver labels and a segmentation holding an empty liver and a painted spleen."""
    app = slicer_headless.start()
    folder = real_data / "totalsegmentator"
    volume = app.load_volume(folder / "example_ct_sm.nii.gz", "CT")
    truth = remap_labels(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_seg.nii.gz"))), "totalseg_total")
    segmentation = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for name in ("liver", "spleen"):
        segmentation.GetSegmentation().AddEmptySegment(name, name)
    painted = np.zeros(truth.shape, dtype=np.uint8)
    rows, cols = np.nonzero(truth[SLICE] == 5)
    painted[SLICE, rows.min():rows.min() + 6, cols.min():cols.min() + 30] = 1  # the user's "spleen" inside the liver
    slicer.util.updateSegmentBinaryLabelmapFromArray(painted, segmentation, "spleen", volume)
    logic = PromptLogic(app.scene, root=tmp_path / "jobs")
    yield app, volume, truth, segmentation, painted, logic
    logic.close()


def run(logic: PromptLogic, action, *args) -> object:
    """Start one prompt action and poll until its outcome arrives (the widget's timer, headless)."""
    outcomes = []
    action(*args, done=outcomes.append)
    logic.process.wait(timeout_s=600)
    assert len(outcomes) == 1
    assert outcomes[0].error is None, outcomes[0].error
    return outcomes[0]


def test_box_points_propagation_and_undo_change_only_the_prompted_segment(scene):
    app, volume, truth, segmentation, painted, logic = scene
    logic.open(volume)
    liver_truth = truth == 5
    outcome = run(logic, logic.box, segmentation, "liver", volume, box_corners(volume, liver_truth[SLICE], SLICE))
    assert f"slice {SLICE}" in outcome.message
    liver = segment_array(segmentation, "liver", volume).astype(bool)
    assert liver[SLICE].sum() == outcome.voxels > 1000
    assert not liver[np.arange(liver.shape[0]) != SLICE].any(), "a prompt changes its own slice only"
    assert dice(liver[SLICE], liver_truth[SLICE]) > 0.85
    spleen = segment_array(segmentation, "spleen", volume)
    assert np.array_equal(spleen, painted), "another segment is never changed"
    assert not (liver & spleen.astype(bool)).any(), "the new mask leaves other segments' voxels to them"

    after_box = liver.copy()
    rows, cols = np.nonzero(liver_truth[SLICE] & ~after_box[SLICE])  # a missed liver voxel, if any; else inside
    rows, cols = (rows, cols) if rows.size else np.nonzero(after_box[SLICE])
    run(logic, logic.point, segmentation, "liver", volume, ras_of(volume, cols[0], rows[0], SLICE), True)
    assert segment_array(segmentation, "liver", volume)[SLICE].any()

    outcome = run(logic, logic.propagate, segmentation, "liver", volume)
    propagated = segment_array(segmentation, "liver", volume).astype(bool)
    filled = [k for k in range(propagated.shape[0]) if k != SLICE and propagated[k].any()]
    assert len(filled) == len(outcome.slices) >= 4
    assert dice(propagated[filled], liver_truth[filled]) > 0.8
    assert np.array_equal(segment_array(segmentation, "spleen", volume), painted)

    before_propagation = segment_array(segmentation, "liver", volume).copy()
    before_propagation[filled] = 0
    assert logic.undo(volume).message.startswith("Undone: the propagation")
    assert np.array_equal(segment_array(segmentation, "liver", volume), before_propagation)
    logic.undo(volume)  # the + point
    logic.undo(volume)  # the box
    assert not segment_array(segmentation, "liver", volume).any(), "undo restores the empty segment"
    assert logic.undo(volume).message == "Nothing to undo."


def test_propagation_stops_at_the_users_limits(scene):
    app, volume, truth, segmentation, painted, logic = scene
    logic.open(volume)
    run(logic, logic.box, segmentation, "liver", volume, box_corners(volume, truth[SLICE] == 5, SLICE))
    low, high = ras_of(volume, 0, 0, SLICE - 2)[2], ras_of(volume, 0, 0, SLICE + 3)[2]
    run(logic, logic.propagate, segmentation, "liver", volume, (high, low))
    liver = segment_array(segmentation, "liver", volume)
    assert [k for k in range(liver.shape[0]) if liver[k].any()] == list(range(SLICE - 2, SLICE + 4))


def test_a_roi_outside_the_ct_is_refused_with_one_line(scene):
    from hsam.errors import HSAMError

    app, volume, truth, segmentation, painted, logic = scene
    logic.open(volume)
    roi = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(5000.0, 0.0, 0.0)
    roi.SetSize(20.0, 20.0, 1.0)
    with pytest.raises(HSAMError, match="outside 'CT'"):
        logic.box(segmentation, "liver", volume, roi_corners(roi))
    with pytest.raises(HSAMError, match="not one of the eight H-SAM organs"):
        segmentation.GetSegmentation().AddEmptySegment("tumour", "tumour")
        logic.box(segmentation, "tumour", volume, box_corners(volume, truth[SLICE] == 5, SLICE))


def test_a_killed_process_restarts_once_then_stops_and_says_so(scene):
    app, volume, truth, segmentation, painted, logic = scene
    logic.open(volume)
    corners = box_corners(volume, truth[SLICE] == 5, SLICE)
    first = run(logic, logic.box, segmentation, "liver", volume, corners)
    os.killpg(logic.process.pgid, signal.SIGKILL)  # a crash of the whole group (out of memory, segfault)
    again = run(logic, logic.box, segmentation, "liver", volume, corners)
    assert again.voxels == first.voxels, "the restarted process reopened the volume and answered the same"
    assert len(logic.notes()) == 1 and "restarted" in logic.notes()[0]

    outcomes = []
    logic.box(segmentation, "liver", volume, corners, done=outcomes.append)
    crashed = logic.process.pgid
    os.killpg(crashed, signal.SIGKILL)  # dies before answering ...
    while logic.process.pgid == crashed:  # ... is restarted once ...
        logic.process.poll()
        time.sleep(0.01)
    os.killpg(logic.process.pgid, signal.SIGKILL)  # ... and dies again before answering anything
    while not outcomes:
        logic.process.poll()
    assert outcomes[0].error is not None and "not started again" in str(outcomes[0].error)
    assert len(logic.notes()) == 3 and "not started again" in logic.notes()[-1]


@pytest.mark.parametrize("how", ["close the scene", "remove the CT"])
def test_the_process_group_ends_with_the_scenes_volume(scene, how):
    app, volume, truth, segmentation, painted, logic = scene
    logic.open(volume)
    run(logic, logic.box, segmentation, "liver", volume, box_corners(volume, truth[SLICE] == 5, SLICE))
    pgid, folder = logic.process.pgid, logic.process.folder
    assert group_alive(pgid) and folder.is_dir()
    if how == "close the scene":
        app.scene.Clear(0)
    else:
        app.scene.RemoveNode(volume)
    assert logic.process is None
    assert not group_alive(pgid), "no process of the prompt group runs"
    assert not folder.exists()


def test_box_prompts_on_the_unseen_patient_reach_the_label_dice(real_data, tmp_path):
    """lidc-idri-0001 (512 x 512 x 133, stored LAS; no model here saw it): a markups ROI around each organ on its
    largest slice, as the Box button places it, gives that slice's mask. Prints the Dice per organ (pytest -s)."""
    app = slicer_headless.start()
    folder = real_data / "lidc-idri-0001"
    volume = app.load_volume(folder / "ct.nii.gz", "LIDC")
    # read by Slicer, as the CT is: this file's header makes Slicer order its slices the other way round from
    # SimpleITK (same physical places), so labels read by SimpleITK would be indexed upside down here
    labels = app.volumes_logic.AddArchetypeVolume(str(folder / "labels_totalsegmentator.nii.gz"), "labels", 1)
    truth = remap_labels(slicer.util.arrayFromVolume(labels), "totalseg_total")
    segmentation = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    organs = {"spleen": 1, "liver": 5, "stomach": 6, "aorta": 7}
    for name in organs:
        segmentation.GetSegmentation().AddEmptySegment(name, name)
    logic = PromptLogic(app.scene, root=tmp_path / "jobs")
    scores = {}
    try:
        logic.open(volume)
        for name, value in organs.items():
            k = int(np.argmax((truth == value).sum(axis=(1, 2))))
            corners = np.array(box_corners(volume, truth[k] == value, k))
            roi = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"{name} box")  # as the Box button places it
            roi.SetCenter(*corners.mean(axis=0))
            roi.SetSize(*np.abs(corners[1] - corners[0])[:2], 1.0)
            run(logic, logic.box, segmentation, name, volume, roi_corners(roi))
            mask = segment_array(segmentation, name, volume).astype(bool)
            scores[name] = dice(mask[k], truth[k] == value)
    finally:
        logic.close()
    print("box-prompt Dice on the organ's largest slice, lidc-idri-0001:",
          ", ".join(f"{name} {score:.3f}" for name, score in scores.items()))
    assert min(scores["liver"], scores["spleen"]) > 0.85, scores
    assert min(scores.values()) > 0.7, scores


def test_a_box_on_an_oblique_ct_lands_on_the_organ(scene):
    """The same voxels with their grid turned 30 degrees about S (an oblique CT): the user's box is axis-aligned in
    RAS around the turned liver; the engine slices the CT axially in physical space and the mask comes back on the
    CT's own grid, on the prompted slice."""
    app, volume, truth, segmentation, painted, logic = scene
    angle = np.radians(30.0)
    turn = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    linear = turn @ np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, float(linear[r, c]))
    oblique = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique CT")
    oblique.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(oblique, slicer.util.arrayFromVolume(volume))
    segmentation.GetSegmentation().RemoveSegment("spleen")  # painted on the straight grid: not this test's subject
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(oblique)
    rows, cols = np.nonzero(truth[SLICE] == 5)
    centres = np.array([ras_of(oblique, c, r, SLICE) for r, c in zip(rows, cols)])
    margin = 3.0  # mm: about a voxel around the outermost voxel centres
    corners = [centres.min(axis=0) - [margin, margin, 0], centres.max(axis=0) + [margin, margin, 0]]
    logic.open(oblique)
    run(logic, logic.box, segmentation, "liver", oblique, corners)
    liver = segment_array(segmentation, "liver", oblique).astype(bool)
    assert [k for k in range(liver.shape[0]) if liver[k].any()] == [SLICE]
    assert dice(liver[SLICE], truth[SLICE] == 5) > 0.8


def test_prompts_read_the_embeddings_the_automatic_run_kept(scene):
    """The automatic run keeps its slice embeddings for the CT; the prompt process opened afterwards (or already
    open) reads them instead of encoding; removing the CT removes them."""
    from HSAMSlicerLib import kept
    from HSAMSlicerLib.logic import HSAMSlicerLogic, RunOptions

    app, volume, truth, segmentation, painted, logic = scene
    automatic = HSAMSlicerLogic(app.scene)
    automatic.jobs_root = logic.root  # the widget's two logics share Slicer's temporary folder
    logic.open(volume)  # already open when the run ends: the process is told on the next prompt
    automatic.process(volume, RunOptions(model="hsam-lite-demo", device="cpu", organs=[5], show_3d=False))
    assert kept.stamp(logic.root, volume.GetID()) is not None
    logic.open(volume)
    outcome = run(logic, logic.box, segmentation, "liver", volume, box_corners(volume, truth[SLICE] == 5, SLICE))
    assert outcome.voxels > 1000
    assert logic.kept_slices > 0, "the slab the automatic run encoded is read, not encoded again"
    app.scene.RemoveNode(volume)
    assert kept.stamp(logic.root, volume.GetID()) is None


def test_undo_makes_the_prompt_process_forget_the_undone_prompt(scene):
    """Undo puts back the segment and the prompt process's state: a propagation afterwards starts from the prompt
    before, and fills the slice whose (undone) box would otherwise stop it."""
    app, volume, truth, segmentation, painted, logic = scene
    logic.open(volume)
    liver_truth = truth == 5
    run(logic, logic.box, segmentation, "liver", volume, box_corners(volume, liver_truth[SLICE], SLICE))
    other = SLICE + 3
    run(logic, logic.box, segmentation, "liver", volume, box_corners(volume, liver_truth[other], other))
    assert logic.undo(volume).message.startswith(f"Undone: the box on slice {other}")
    assert not segment_array(segmentation, "liver", volume)[other].any()
    outcome = run(logic, logic.propagate, segmentation, "liver", volume)
    assert other in outcome.slices, "the undone box neither starts nor stops the propagation"
    assert SLICE not in outcome.slices
