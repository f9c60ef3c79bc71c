"""HSAMSlicerLogic against the real MRML library (PyPI slicer-core, headless): geometry, segments, replacement,
cancel, bad input. The CT is the real TotalSegmentator sample; the network is the real H-SAM architecture at toy size,
run by ``hsam`` in a child process as in Slicer.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install -e '.[test]')")

import SimpleITK as sitk  # noqa: E402
import slicer_headless  # noqa: E402  (puts HSAMSlicer/ on sys.path)
import slicer  # noqa: E402
import vtk  # noqa: E402

from hsam.errors import HSAMError  # noqa: E402
from hsam.pipeline.result import organ_volumes_ml  # noqa: E402
from hsam.labels import CLASS_NAMES, ORGANS, remap_labels  # noqa: E402
from hsam.training.trainer import held_out_figures  # noqa: E402
from HSAMSlicerLib import geometry  # noqa: E402
from HSAMSlicerLib.export import segment_array, segment_terminology  # noqa: E402
from HSAMSlicerLib.logic import (  # noqa: E402
    RESULT_ATTRIBUTE,
    ROLE_CONFIDENCE,
    ROLE_PREDICTION,
    ROLE_TABLE,
    HSAMSlicerLogic,
    ModelInfo,
    NotCT,
    RunOptions,
    SegmentationOutput,
)
from HSAMSlicerLib import results  # noqa: E402
from HSAMSlicerLib.process import JobCancelled  # noqa: E402
from HSAMSlicerLib.results import ResultsOfVolume  # noqa: E402
from HSAMSlicerLib.testing import save_tiny_model  # noqa: E402


@pytest.fixture
def app():
    """A fresh scene with its logics; the fixture keeps every logic object alive for the test."""
    return slicer_headless.start()


@pytest.fixture
def ct_path(real_data):
    return real_data / "totalsegmentator" / "example_ct_sm.nii.gz"


@pytest.fixture
def reference_labels(real_data) -> sitk.Image:
    """The sample's TotalSegmentator labels mapped to H-SAM values (all eight organs are present)."""
    image = sitk.ReadImage(str(real_data / "totalsegmentator" / "example_seg.nii.gz"))
    mapped = sitk.GetImageFromArray(remap_labels(sitk.GetArrayFromImage(image), "totalseg_total"))
    mapped.CopyInformation(image)
    return mapped


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


REFERENCE_MODEL = ModelInfo(id="reference", name="reference", title="TotalSegmentator reference labels",
                            sha256="0" * 64, classes=list(CLASS_NAMES))


def output_from_labels(labels: sitk.Image, model: ModelInfo = REFERENCE_MODEL) -> SegmentationOutput:
    """A finished segmentation holding given labels, e.g. a reference segmentation (tests of the MRML side only)."""
    confidence = sitk.GetArrayFromImage(sitk.Cast(labels * 20, sitk.sitkUInt8))
    return SegmentationOutput(labels=sitk.GetArrayFromImage(labels), confidence=confidence, model=model,
                              volumes_ml=organ_volumes_ml(labels, model.classes), device="cpu")  # fmt: skip


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


# ---------------------------------------------------------------------------------------------------- geometry


def test_volume_to_image_matches_simpleitk_reading_of_the_same_file(app, ct_path):
    volume = app.load_volume(ct_path)
    image = HSAMSlicerLogic(app.scene).volume_to_image(volume)
    expected = sitk.ReadImage(str(ct_path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(expected))
    np.testing.assert_allclose(image.GetSpacing(), expected.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), expected.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), expected.GetDirection(), atol=1e-6)


def test_geometry_round_trip_for_an_oblique_permuted_matrix():
    rotation = vtk.vtkTransform()
    rotation.RotateWXYZ(25, 0.3, -0.5, 0.8)
    matrix = np.eye(4)
    linear = np.array([[rotation.GetMatrix().GetElement(r, c) for c in range(3)] for r in range(3)])
    matrix[:3, :3] = linear[:, [2, 0, 1]] @ np.diag([0.7, 1.3, 2.5])  # permuted axes, anisotropic voxels
    matrix[:3, 3] = [12.5, -40.0, 7.25]
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = geometry.image_from_array(array, matrix)
    np.testing.assert_allclose(geometry.ijk_to_ras_from_image(image), matrix, atol=1e-9)
    # voxel (i, j, k) = (1, 2, 3) lands at the same physical point in both conventions (LPS = RAS with x, y negated)
    ras = matrix @ np.array([1, 2, 3, 1.0])
    lps = image.TransformIndexToPhysicalPoint((1, 2, 3))
    np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-9)


# ---------------------------------------------------------------------------------------------------- bad input


def test_label_map_input_gets_a_clear_error(app, reference_labels):
    label_map = app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "organ labels")
    slicer.util.updateVolumeFromArray(label_map, sitk.GetArrayFromImage(reference_labels))
    with pytest.raises(HSAMError, match="label map.*select the CT"):
        HSAMSlicerLogic(app.scene).volume_to_image(label_map)


def test_four_d_input_gets_a_clear_error(app):
    frames = np.zeros((6, 8, 10, 5), dtype=np.int16)  # [k, j, i, t]: five time points per voxel
    vector = app.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "perfusion")
    slicer.util.updateVolumeFromArray(vector, frames)
    with pytest.raises(HSAMError, match="single 3-D CT"):
        HSAMSlicerLogic(app.scene).volume_to_image(vector)
    scalar = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "multi-frame")
    image_data = vtk.vtkImageData()  # a scalar node whose voxels carry 5 components (what a 4-D NRRD loads as)
    image_data.SetDimensions(10, 8, 6)
    image_data.AllocateScalars(vtk.VTK_SHORT, 5)
    scalar.SetAndObserveImageData(image_data)
    with pytest.raises(HSAMError, match="5 values per voxel.*4-D"):
        HSAMSlicerLogic(app.scene).volume_to_image(scalar)


def test_missing_input_and_empty_organ_choice(app, ct_path, tiny_model):
    logic = HSAMSlicerLogic(app.scene)
    with pytest.raises(HSAMError, match="no input volume"):
        logic.volume_to_image(None)
    volume = app.load_volume(ct_path)
    with pytest.raises(HSAMError, match="no organ is selected"):
        logic.start_segmentation(volume, RunOptions(model=str(tiny_model), device="cpu", organs=[]))


def test_a_volume_that_is_not_ct_is_a_question_before_anything_starts(app, real_data, ct_path, tiny_model):
    """MR (the real TotalSegmentator MR sample): the Logic asks (NotCT) instead of segmenting with a red line."""
    logic = HSAMSlicerLogic(app.scene)
    mr = app.load_volume(real_data / "totalsegmentator" / "example_mr_sm.nii.gz", "MR")
    before = node_ids(app.scene)
    options = RunOptions(model=str(tiny_model), device="cpu", organs=[5], show_3d=False, mode="eager")
    with pytest.raises(NotCT, match="'MR' does not look like CT.*Segment it anyway\\?$"):
        logic.start_segmentation(mr, options)
    assert node_ids(app.scene) == before and logic._jobs == [], "nothing started"
    ct = logic.start_segmentation(app.load_volume(ct_path), options)
    assert "--allow-non-ct" not in ct.job.arguments, "a CT needs no permission"
    ct.job.cleanup()

    options.allow_non_ct = True  # the user said yes
    segmentation = logic.process(mr, options)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1


# ---------------------------------------------------------------------------------------------------- result nodes


def test_segmentation_node_from_real_labels(app, ct_path, reference_labels):
    """Names, colours, terminology, voxels, geometry, hierarchy, provenance and the organ-volume table."""
    volume = app.load_volume(ct_path)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient"), "study")
    hierarchy.SetItemParent(hierarchy.GetItemByDataNode(volume) or hierarchy.CreateItem(study, volume), study)

    result = output_from_labels(reference_labels)
    segmentation = HSAMSlicerLogic(app.scene).apply_result(volume, result, RunOptions(model="reference",
                                                                                      confidence=True))

    assert segmentation.GetName() == "CT organs"
    assert segmentation.GetAttribute(RESULT_ATTRIBUTE) == "segmentation"
    segments = segmentation.GetSegmentation()
    assert segments.GetNumberOfSegments() == 8
    expected = sitk.GetArrayFromImage(reference_labels)
    for index, entry in enumerate(ORGANS):
        segment = segments.GetNthSegment(index)
        assert segments.GetNthSegmentID(index) == entry.name
        assert segment.GetName() == entry.display_name
        np.testing.assert_allclose(segment.GetColor(), entry.rgb_float, atol=1e-6)
        assert segment_terminology(segment) == entry.terminology_entry
        voxels = segment_array(segmentation, entry.name, volume)
        assert voxels.any(), f"{entry.name} is in the reference labels"
        np.testing.assert_array_equal(voxels, expected == entry.index, err_msg=entry.name)

    geometry_role = segmentation.GetReferenceImageGeometryReferenceRole()
    assert segmentation.GetNodeReference(geometry_role) is volume
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study
    assert segmentation.GetDisplayNode() is not None
    assert segmentation.GetSegmentation().ContainsRepresentation("Closed surface"), "shown in 3D"
    assert segmentation.GetAttribute("HSAMSlicer.ModelSHA256") == "0" * 64
    assert segmentation.GetAttribute("HSAMSlicer.Device") == "cpu"
    assert segmentation.GetAttribute("HSAMSlicer.Version")

    prediction = segmentation.GetNodeReference(ROLE_PREDICTION)
    assert prediction.GetHideFromEditors()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(prediction), expected)
    confidence = segmentation.GetNodeReference(ROLE_CONFIDENCE)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(confidence), result.confidence)

    table = segmentation.GetNodeReference(ROLE_TABLE).GetTable()
    voxel_ml = float(np.prod(volume.GetSpacing())) / 1000.0
    for row, entry in enumerate(ORGANS):
        assert table.GetValue(row, 0).ToString() == entry.display_name
        count = int((expected == entry.index).sum())
        assert table.GetValue(row, 2).ToInt() == count
        assert table.GetValue(row, 3).ToDouble() == pytest.approx(count * voxel_ml, abs=1e-3)
        assert table.GetValue(row, 3).ToDouble() == pytest.approx(result.volumes_ml[entry.name], abs=1e-3)


def test_organ_subset_and_transformed_volume(app, ct_path, reference_labels):
    volume = app.load_volume(ct_path)
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    segmentation = HSAMSlicerLogic(app.scene).apply_result(
        volume, output_from_labels(reference_labels), RunOptions(model="reference", organs=[5, 1])
    )
    segments = segmentation.GetSegmentation()
    assert [segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())] == ["spleen", "liver"]
    assert segmentation.GetTransformNodeID() == transform.GetID(), "the result moves with its CT"
    prediction = slicer.util.arrayFromVolume(segmentation.GetNodeReference(ROLE_PREDICTION))
    assert set(np.unique(prediction)) == {0, 1, 5}


def test_model_with_its_own_class_order(app, ct_path, reference_labels):
    """Label values are matched to organs through the card's class names, not assumed to be H-SAM's order."""
    volume = app.load_volume(ct_path)
    order = ["background", "liver", "aorta", "spleen", "lung"]  # 'lung' is no H-SAM organ: dropped
    hsam_value = {"liver": 5, "aorta": 7, "spleen": 1}
    expected = sitk.GetArrayFromImage(reference_labels)
    model_labels = np.zeros_like(expected)
    for value, name in enumerate(order[1:4], start=1):
        model_labels[expected == hsam_value[name]] = value
    model_labels[expected == 2] = 4  # 'lung' where the reference has the right kidney
    image = sitk.GetImageFromArray(model_labels)
    image.CopyInformation(reference_labels)
    model = ModelInfo(id="other-order", name="other-order", classes=order)
    segmentation = HSAMSlicerLogic(app.scene).apply_result(volume, output_from_labels(image, model),
                                                           RunOptions(model="other-order", show_3d=False))  # fmt: skip
    for entry in ORGANS:
        voxels = segment_array(segmentation, entry.name, volume)
        wanted = expected == entry.index if entry.name in hsam_value else np.zeros_like(voxels)
        np.testing.assert_array_equal(voxels, wanted, err_msg=entry.name)


def edit_segment(segmentation, segment_id: str, volume, change) -> None:
    """Change a segment the way Segment Editor does: read its voxels, modify them, write them back."""
    mask = segment_array(segmentation, segment_id, volume).astype(np.uint8)
    change(mask)
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segment_id, volume)


def parts_of(segmentation) -> list[str]:
    return [segmentation.GetNodeReferenceID(role) for role in (ROLE_PREDICTION, ROLE_CONFIDENCE, ROLE_TABLE)
            if segmentation.GetNodeReferenceID(role)]


def test_rerun_replaces_an_untouched_result_and_nothing_else(app, ct_path, reference_labels):
    volume = app.load_volume(ct_path)
    other = app.load_volume(ct_path, "second CT")
    logic = HSAMSlicerLogic(app.scene)
    user_made = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my organs")
    user_made.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    result = output_from_labels(reference_labels)
    first = logic.apply_result(volume, result, RunOptions(model="reference", confidence=True))
    first_parts = parts_of(first)
    for_other = logic.apply_result(other, result, RunOptions(model="reference"))
    first.GetDisplayNode().SetOpacity(0.3)  # looking at a result (display, 3-D surface) is no edit
    first.CreateClosedSurfaceRepresentation()
    assert logic.results_of_volume(volume) == ResultsOfVolume(untouched=(first,), edited=())

    second = logic.apply_result(volume, result, RunOptions(model="reference"))
    ids = node_ids(app.scene)
    assert first.GetID() not in ids and not set(first_parts) & ids, "the untouched result and its parts are replaced"
    assert {second.GetID(), user_made.GetID(), for_other.GetID()} <= ids
    assert logic.find_result(volume) is second and logic.find_result(other) is for_other
    assert second.GetName() == "CT organs"


def test_rerun_never_removes_an_edited_result(app, ct_path, reference_labels):
    volume = app.load_volume(ct_path)
    logic = HSAMSlicerLogic(app.scene)
    result = output_from_labels(reference_labels)
    first = logic.apply_result(volume, result, RunOptions(model="reference", show_3d=False))
    liver_slice = int(np.flatnonzero((sitk.GetArrayFromImage(reference_labels) == 5).any(axis=(1, 2)))[0])
    edit_segment(first, "liver", volume, lambda m: m.__setitem__(liver_slice, 0))  # the radiologist's correction
    corrected = segment_array(first, "liver", volume)
    previous = logic.results_of_volume(volume)
    assert previous.untouched == () and [e.node_id for e in previous.edited] == [first.GetID()]

    second = logic.apply_result(volume, result, RunOptions(model="reference", show_3d=False))  # no choice: keep
    assert app.scene.GetNodeByID(first.GetID()) is first and all(app.scene.GetNodeByID(i) for i in parts_of(first))
    np.testing.assert_array_equal(segment_array(first, "liver", volume), corrected)
    assert (first.GetName(), second.GetName()) == ("CT organs", "CT organs 2")
    assert logic.find_result(volume) is second

    # "Replace" chosen when asked, but the user edited again while the run went on: the new edit is kept
    chosen = logic.results_of_volume(volume).edited
    edit_segment(first, "spleen", volume, lambda m: m.__setitem__(liver_slice, 0))
    third = logic.apply_result(volume, result, RunOptions(model="reference", show_3d=False, replace_edited=chosen))
    assert app.scene.GetNodeByID(first.GetID()) is first, "edited after the question: kept"
    assert app.scene.GetNodeByID(second.GetID()) is None, "untouched: replaced"
    assert third.GetName() == "CT organs 2"
    # "Replace" chosen for the content it has now: it goes, with its parts
    chosen = logic.results_of_volume(volume).edited
    parts = parts_of(first)
    fourth = logic.apply_result(volume, result, RunOptions(model="reference", show_3d=False, replace_edited=chosen))
    assert not ({first.GetID(), third.GetID(), *parts} & node_ids(app.scene))
    assert fourth.GetName() == "CT organs"


def test_a_copy_of_a_result_is_the_users_and_keeps_its_parts(app, ct_path, reference_labels):
    """vtkMRMLNode::Copy copies the result's tag and its references: the copy must still never be removed."""
    volume = app.load_volume(ct_path)
    logic = HSAMSlicerLogic(app.scene)
    result = output_from_labels(reference_labels)
    first = logic.apply_result(volume, result, RunOptions(model="reference", show_3d=False))
    copy = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "kept copy")
    copy.Copy(first)
    assert copy.GetAttribute(RESULT_ATTRIBUTE) == "segmentation" and copy.GetNodeReference(ROLE_PREDICTION)
    assert not logic.is_result(copy) and logic.is_result(first)
    assert logic.results_of_volume(volume).untouched == (first,)

    second = logic.apply_result(volume, result, RunOptions(model="reference", show_3d=False))
    assert app.scene.GetNodeByID(first.GetID()) is None
    assert app.scene.GetNodeByID(copy.GetID()) is copy
    assert copy.GetNodeReference(ROLE_PREDICTION) is not None, "the prediction the copy refers to stays"
    assert logic.find_result(volume) is second


def test_an_edit_undone_is_untouched_again(app, ct_path, reference_labels):
    """The fingerprint is the content, so Segment Editor's undo (back to the same voxels) restores 'untouched'."""
    volume = app.load_volume(ct_path)
    logic = HSAMSlicerLogic(app.scene)
    first = logic.apply_result(volume, output_from_labels(reference_labels), RunOptions(model="reference"))
    before = segment_array(first, "aorta", volume).astype(np.uint8)
    edit_segment(first, "aorta", volume, lambda m: m.fill(0))
    assert not results.is_untouched(first)
    slicer.util.updateSegmentBinaryLabelmapFromArray(before, first, "aorta", volume)
    assert results.is_untouched(first)
    first.GetSegmentation().GetSegment("aorta").SetName("Aorta (checked)")
    assert not results.is_untouched(first), "a renamed segment is an edit"


def test_failed_apply_leaves_the_scene_as_it_was(app, ct_path, reference_labels):
    volume = app.load_volume(ct_path)
    logic = HSAMSlicerLogic(app.scene)
    earlier = logic.apply_result(volume, output_from_labels(reference_labels), RunOptions(model="reference"))
    before = node_ids(app.scene)
    wrong_grid = sitk.Image(10, 10, 10, sitk.sitkUInt8)
    with pytest.raises(HSAMError, match="does not match the CT"):
        logic.apply_result(volume, output_from_labels(wrong_grid), RunOptions(model="reference"))
    assert node_ids(app.scene) == before
    assert logic.find_result(volume) is earlier


# ---------------------------------------------------------------------------------------------------- whole path


def test_whole_path_with_the_tiny_model_on_the_real_ct(app, ct_path, tiny_model):
    volume = app.load_volume(ct_path)
    logic = HSAMSlicerLogic(app.scene)
    reports = []
    segmentation = logic.process(volume, RunOptions(model=str(tiny_model), device="cpu", confidence=True),
                                 progress=lambda k, n: reports.append((k, n)), interval_s=0.01)  # fmt: skip
    assert reports[-1] == (30, 30) and all(n == 30 for _, n in reports)
    assert [k for k, _ in reports] == sorted(k for k, _ in reports)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 8
    assert segmentation.GetAttribute("HSAMSlicer.ModelName") == "hsam-tiny-test"
    card_sha = (tiny_model / "model.json").read_text()
    assert segmentation.GetAttribute("HSAMSlicer.ModelSHA256") in card_sha
    # which engine the child ran and why (processor, evidence) is kept with the result
    assert segmentation.GetAttribute("HSAMSlicer.Engine") in ("ort", "fast")
    assert segmentation.GetAttribute("HSAMSlicer.Engine") + "," in segmentation.GetAttribute("HSAMSlicer.EngineReason")
    # the segments hold exactly the network's labels, on the CT grid
    prediction = slicer.util.arrayFromVolume(segmentation.GetNodeReference(ROLE_PREDICTION))
    assert prediction.shape == slicer.util.arrayFromVolume(volume).shape
    for entry in ORGANS:
        np.testing.assert_array_equal(segment_array(segmentation, entry.name, volume), prediction == entry.index)


def test_imported_model_file_is_listed_and_runs_by_id(app, ct_path, tiny_model):
    """'Import model file...': a child job installs the file in the (per-test) model cache; it then runs by its id."""
    from hsam.weights.store import available_models

    logic = HSAMSlicerLogic(app.scene)
    job = logic.start_model_import(str(tiny_model / "model.json"))
    state = job.wait(timeout=120, cleanup=True)
    assert not job.folder.exists()
    assert state.error is None, state.error
    model_id = state.result["id"]
    assert model_id == "hsam-tiny-test"
    assert model_id in [m.id for m in available_models()]
    volume = app.load_volume(ct_path)
    segmentation = logic.process(volume, RunOptions(model=model_id, device="cpu", organs=[5], show_3d=False,
                                                    mode="eager"))
    assert segmentation.GetAttribute("HSAMSlicer.ModelId") == model_id
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1
    failed = logic.start_model_import(str(ct_path.parent / "missing-model")).wait(timeout=120, cleanup=True)
    assert isinstance(failed.error, HSAMError) and failed.result is None
    assert "\n" not in str(failed.error) and "missing-model" in str(failed.error), failed.error


def test_only_re_downloadable_models_are_offered_for_deletion(tiny_model):
    """'Delete downloaded models...' must not offer the user's converted or imported models."""
    from hsam.weights.cache import downloads_dir
    from hsam.weights.manifest import load_manifest
    from hsam.weights.store import import_model

    assert HSAMSlicerLogic.downloaded_models() == []
    import_model(tiny_model, model_id="hsam-vitb-synapse")  # converted by the user: no download link
    import_model(tiny_model)  # the user's own model
    base = load_manifest()["sam-vit-b"].files[0]
    downloads_dir().mkdir(parents=True, exist_ok=True)
    (downloads_dir() / base.name).write_bytes(b"stands in for the 375 MB download")
    assert HSAMSlicerLogic.downloaded_models() == ["sam-vit-b"]


@pytest.mark.parametrize("held_out, worse", [
    (held_out_figures(0.380, 0.337), True),
    (held_out_figures(0.888, 0.890), False),
    (None, False),  # one case: nothing held out
    ("guard broken", True),  # better on the held-out slices, but no epoch kept within the forgetting guard's margin
])
def test_a_fine_tune_worse_than_its_base_is_not_put_in_use(held_out, worse):
    guard = None
    if held_out == "guard broken":
        held_out, guard = held_out_figures(0.87, 0.87), {"margin": 0.02, "within_margin": False, "kept_epoch": 0}
    finished = {"finished": True, "complete": True, "held_out": held_out, "model": {"id": "tiny-ft"},
                "forgetting_guard": guard}
    assert HSAMSlicerLogic.finetune_worse_than_base(finished) is worse


def test_cancel_leaves_no_node_behind(app, ct_path, tiny_model):
    volume = app.load_volume(ct_path)
    logic = HSAMSlicerLogic(app.scene)
    before = node_ids(app.scene)
    with pytest.raises(JobCancelled):
        logic.process(volume, RunOptions(model=str(tiny_model), device="cpu"), cancel=lambda: True)
    assert node_ids(app.scene) == before

    # a volume long enough that the child is still segmenting when the cancel arrives
    long_ct = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "long CT")
    slicer.util.updateVolumeFromArray(long_ct, np.tile(slicer.util.arrayFromVolume(volume), (8, 1, 1)))
    before = node_ids(app.scene)
    reports = []

    def cancel_after_a_few_slices() -> bool:
        return bool(reports) and reports[-1][0] >= 4

    with pytest.raises(JobCancelled):
        logic.process(long_ct, RunOptions(model=str(tiny_model), device="cpu", mode="eager", batch_size=1),
                      progress=lambda k, n: reports.append((k, n)), cancel=cancel_after_a_few_slices)  # fmt: skip
    assert 4 <= reports[-1][0] < 240, "it stopped part-way"
    assert node_ids(app.scene) == before
    assert logic.find_result(long_ct) is None


def test_the_slicer_self_test_path_runs_headless(app, tmp_path):
    """HSAMSlicerTest's body (HSAMSlicerLib.testing.check_whole_path) passes on the real MRML library."""
    from HSAMSlicerLib.testing import check_whole_path

    messages = []
    case = check_whole_path(HSAMSlicerLogic(app.scene), tmp_path, log=messages.append)
    assert (case / "provenance.json").is_file() and len(messages) >= 4


def test_initialising_the_logic_twice_leaves_one_scene_observer(app):
    """Slicer's ScriptedLoadableModuleLogic.__init__ may run the Qt-free __init__ through super() before the module's
    own explicit call: the first observer must not stay behind (it would stop jobs twice and keep a stale Logic)."""
    logic = HSAMSlicerLogic(app.scene)
    first = logic._close_observer
    HSAMSlicerLogic.__init__(logic, app.scene)
    assert app.scene.GetCommand(first) is None
    assert app.scene.GetCommand(logic._close_observer) is not None
