"""Export for fine-tuning against the real MRML library: files reload to identical arrays, the user's corrections
are recorded per organ and slice, names are sanitised and no case is ever overwritten.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install -e '.[test]')")

import SimpleITK as sitk  # noqa: E402
import slicer_headless  # noqa: E402  (puts HSAMSlicer/ on sys.path)
import slicer  # noqa: E402

from hsam.errors import HSAMError  # noqa: E402
from hsam.evaluation import evaluate_files  # noqa: E402
from hsam.pipeline.result import organ_volumes_ml  # noqa: E402
from hsam.labels import CLASS_NAMES, ORGANS, color_table_csv, remap_labels  # noqa: E402
from HSAMSlicerLib.export import (  # noqa: E402
    PROVENANCE_FILE,
    changes_versus_prediction,
    export_case,
    sanitize_case_name,
    segment_array,
    segment_terminology,
)
from HSAMSlicerLib import results  # noqa: E402
from HSAMSlicerLib.logic import HSAMSlicerLogic, ModelInfo, RunOptions, SegmentationOutput  # noqa: E402


@pytest.fixture
def app():
    return slicer_headless.start()


@pytest.fixture
def case(app, real_data):
    """The real CT loaded in Slicer and a module result holding its reference organ labels."""
    folder = real_data / "totalsegmentator"
    volume = app.load_volume(folder / "example_ct_sm.nii.gz", "CT abdomen")
    reference = sitk.ReadImage(str(folder / "example_seg.nii.gz"))
    labels = remap_labels(sitk.GetArrayFromImage(reference), "totalseg_total")
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(reference)
    model = ModelInfo(id="reference", name="reference", title="reference labels", sha256="ab" * 32,
                      classes=list(CLASS_NAMES))
    result = SegmentationOutput(labels=labels, confidence=labels.astype(np.uint8), model=model,
                                volumes_ml=organ_volumes_ml(image, CLASS_NAMES), device="cpu", seconds=1.5)  # fmt: skip
    segmentation = HSAMSlicerLogic(app.scene).apply_result(volume, result,
                                                           RunOptions(model="reference", show_3d=False))  # fmt: skip
    return volume, segmentation, labels, folder / "example_ct_sm.nii.gz"


def edit_segment(segmentation, segment_id: str, volume, change) -> None:
    """Change a segment the way Segment Editor does: read its voxels, modify them, write them back."""
    mask = segment_array(segmentation, segment_id, volume).astype(np.uint8)
    change(mask)
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segment_id, volume)


def test_export_reloads_to_identical_arrays_and_records_the_corrections(app, case, tmp_path):
    volume, segmentation, labels, ct_file = case
    liver_slices = np.flatnonzero((labels == 5).any(axis=(1, 2)))
    erased = int(liver_slices[len(liver_slices) // 2])
    edit_segment(segmentation, "liver", volume, lambda m: m.__setitem__(erased, 0))  # the user erases one slice
    added_at = (3, 10, 10)  # and paints two voxels of spleen at the volume's edge
    edit_segment(segmentation, "spleen", volume, lambda m: m.__setitem__((added_at[0], slice(10, 12), 10), 1))
    expected = labels.copy()
    expected[erased][expected[erased] == 5] = 0
    expected[added_at[0], 10:12, 10] = 1

    folder = export_case(segmentation, tmp_path / "cases")
    assert folder.name == "CT_abdomen"
    assert {p.name for p in folder.iterdir()} == {
        "image.nii.gz", "labels.nii.gz", "segmentation.seg.nrrd", "hsam_labels.csv", "provenance.json",
    }  # fmt: skip

    image = sitk.ReadImage(str(folder / "image.nii.gz"))
    original = sitk.ReadImage(str(ct_file))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(original))
    np.testing.assert_allclose(image.GetOrigin(), original.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), original.GetDirection(), atol=1e-6)
    exported = sitk.ReadImage(str(folder / "labels.nii.gz"))
    assert exported.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(exported), expected)
    np.testing.assert_allclose(exported.GetOrigin(), original.GetOrigin(), atol=1e-4)

    # the .seg.nrrd reloads in Slicer with the same segments, names, terminology and voxels
    reloaded = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(folder / "segmentation.seg.nrrd"))
    assert storage.ReadData(reloaded)
    segments = reloaded.GetSegmentation()
    assert [segments.GetNthSegment(i).GetName() for i in range(8)] == [o.display_name for o in ORGANS]
    for entry in ORGANS:
        segment = segments.GetSegment(entry.name)
        assert segment_terminology(segment) == entry.terminology_entry
        np.testing.assert_array_equal(segment_array(reloaded, entry.name, volume), expected == entry.index)
    assert (folder / "hsam_labels.csv").read_text() == color_table_csv()

    provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    assert provenance["model"]["ModelSHA256"] == "ab" * 32
    assert provenance["model"]["ModelName"] == "reference"
    assert provenance["exported"] and provenance["model"]["Time"]
    changes = provenance["changes"]
    assert changes["prediction_available"] is True
    assert changes["changed_organs"] == ["spleen", "liver"]
    assert changes["changed_slices"] == sorted({erased, added_at[0]})
    liver = changes["organs"]["liver"]
    assert liver["slices_changed"] == [erased] and liver["voxels_added"] == 0
    assert liver["voxels_removed"] == int((labels[erased] == 5).sum())
    assert changes["organs"]["spleen"]["voxels_added"] == 2
    assert not changes["organs"]["aorta"]["changed"]
    assert provenance["segments"]["ignored"] == []


def test_exported_cases_load_as_training_data(app, case, tmp_path):
    """The fine-tuning loader reads what the module exports, with the same organ voxels."""
    from hsam.training.data import load_cases

    _, segmentation, labels, _ = case
    export_case(segmentation, tmp_path, case_name="first")
    export_case(segmentation, tmp_path, case_name="second")
    volumes = load_cases(tmp_path, window=(-125, 275), orientation="LPS")
    assert [v.name for v in volumes] == ["first", "second"]
    for entry in ORGANS:
        assert int((volumes[0].label == entry.index).sum()) == int((labels == entry.index).sum()), entry.name
    assert volumes[0].source["provenance"]["format"] == "hsam-case/1"


def test_exports_never_overwrite_and_names_are_sanitised(app, case, tmp_path):
    _, segmentation, _, _ = case
    root = tmp_path / "cases"
    first = export_case(segmentation, root, case_name="../Patient 7: ÄBC*?")
    second = export_case(segmentation, root, case_name="../Patient 7: ÄBC*?")
    assert first.parent == root and second.parent == root
    assert first.name == "Patient_7_BC" and second.name == "Patient_7_BC_2"
    stamp = (first / PROVENANCE_FILE).stat().st_mtime_ns
    third = export_case(segmentation, root, case_name="Patient_7_BC")
    assert third.name == "Patient_7_BC_3"
    assert (first / PROVENANCE_FILE).stat().st_mtime_ns == stamp
    assert sanitize_case_name("") == sanitize_case_name("...") == sanitize_case_name("NUL") == "case"


def test_user_segmentation_without_a_stored_prediction(app, case, tmp_path):
    """A segmentation the user made (no H-SAM run) exports; unknown segments are listed as ignored."""
    volume, _, labels, _ = case
    own = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    own.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    own.GetSegmentation().AddEmptySegment("mine-liver", "Liver", [1, 0, 0])
    own.GetSegmentation().AddEmptySegment("tumour", "tumour", [0, 1, 0])
    slicer.util.updateSegmentBinaryLabelmapFromArray((labels == 5).astype(np.uint8), own, "mine-liver", volume)
    folder = export_case(own, tmp_path, volume_node=volume)
    exported = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labels.nii.gz")))
    np.testing.assert_array_equal(exported, np.where(labels == 5, 5, 0))
    provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    assert provenance["changes"]["prediction_available"] is False
    assert provenance["segments"] == {
        "exported": {"liver": "mine-liver"}, "merged": {}, "ignored": ["tumour"], "overlapping_voxels": 0,
    }  # fmt: skip
    assert [name for name, state in provenance["organs"].items() if state == "labelled"] == ["liver"]
    assert provenance["model"] is None


def test_a_partial_run_exports_only_what_was_labelled(app, case, tmp_path):
    """A liver-only run: spleen & co. are 'unknown' in the case, and training never calls them background."""
    from hsam.training.data import load_cases

    volume, full, labels, _ = case
    # a full run whose stomach segment the user deleted: the stomach is unknown, the rest labelled
    full.GetSegmentation().RemoveSegment("stomach")
    provenance = json.loads((export_case(full, tmp_path / "cases") / PROVENANCE_FILE).read_text())
    assert [name for name, state in provenance["organs"].items() if state == "unknown"] == ["stomach"]

    logic = HSAMSlicerLogic(app.scene)
    model = ModelInfo(id="reference", name="reference", classes=list(CLASS_NAMES))
    liver_only = logic.apply_result(volume, SegmentationOutput(labels=labels, confidence=None, model=model),
                                    RunOptions(model="reference", organs=[5], show_3d=False))  # fmt: skip
    folder = export_case(liver_only, tmp_path / "cases", case_name="liver-only")
    exported = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labels.nii.gz")))
    np.testing.assert_array_equal(exported, np.where(labels == 5, 5, 0))
    assert int((labels == 1).sum()) > 0, "the spleen is in this CT, so 0 there would teach a lie"
    provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    assert provenance["organs"] == {o.name: "labelled" if o.index == 5 else "unknown" for o in ORGANS}
    (case_volume,) = load_cases(folder, (-125, 275), "LPS")
    assert case_volume.unknown_organs == frozenset({1, 2, 3, 4, 6, 7, 8})
    # hsam evaluate against the exported case scores only its labelled organ (all eight are in this prediction)
    prediction = sitk.GetImageFromArray(labels)
    prediction.CopyInformation(sitk.ReadImage(str(folder / "labels.nii.gz")))
    sitk.WriteImage(prediction, str(tmp_path / "prediction.nii.gz"))
    with pytest.warns(UserWarning, match="did not label spleen"):
        rows = evaluate_files(tmp_path / "prediction.nii.gz", folder / "labels.nii.gz")
    assert [(row.organ_name, row.score.dice) for row in rows] == [("liver", 1.0)]
    message = HSAMSlicerLogic.describe_export(folder)
    assert "Exported 1 labelled organ(s) (liver)" in message, message
    assert ("Not labelled, so never taught as background: spleen, right kidney, left kidney, gallbladder, stomach, "
            "aorta, pancreas.") in message, message



def test_duplicate_segments_of_one_organ_are_merged_and_named(app, case, tmp_path):
    """A second 'Liver' segment (the user's own, or a copy) is part of the liver, not silently dropped."""
    volume, segmentation, labels, _ = case
    extra = np.zeros(labels.shape, dtype=np.uint8)
    free = np.argwhere(labels == 0)[:83]  # 83 background voxels the user adds as liver in a segment of their own
    extra[tuple(free.T)] = 1
    segment_id = segmentation.GetSegmentation().AddEmptySegment("my-liver", "Liver", [0.8, 0.4, 0.3])
    slicer.util.updateSegmentBinaryLabelmapFromArray(extra, segmentation, segment_id, volume)
    with pytest.warns(UserWarning, match="merged 2 segments into liver .their union.: liver, Liver"):
        folder = export_case(segmentation, tmp_path / "cases")
    exported = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labels.nii.gz")))
    assert int(((exported == 5) & (extra == 1)).sum()) == 83
    np.testing.assert_array_equal(exported == 5, (labels == 5) | (extra == 1))
    provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    assert provenance["segments"]["merged"] == {"liver": ["liver", "Liver"]}
    message = HSAMSlicerLogic.describe_export(folder)
    assert "Exported 8 labelled organ(s)" in message and "Merged 2 segments into liver" in message, message


def test_export_errors_leave_no_folder(app, case, tmp_path):
    volume, segmentation, _, _ = case
    empty = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    with pytest.raises(HSAMError, match="not linked to a CT"):
        export_case(empty, tmp_path)
    empty.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    with pytest.raises(HSAMError, match="no segment that is one of the eight"):
        export_case(empty, tmp_path)
    with pytest.raises(HSAMError, match="no export folder"):
        export_case(segmentation, "")
    assert list(tmp_path.iterdir()) == []


def test_changes_versus_prediction_counts_per_slice():
    prediction = np.zeros((4, 3, 3), dtype=np.uint8)
    prediction[1:3, 1, 1] = 5
    labels = prediction.copy()
    labels[2, 1, 1] = 6  # slice 2: liver voxel relabelled as stomach
    changes = changes_versus_prediction(labels, prediction, [5, 6, 1])
    assert changes["changed_organs"] == ["liver", "stomach"]
    assert changes["changed_slices"] == [2]
    assert changes["organs"]["liver"]["voxels_removed"] == 1 and changes["organs"]["stomach"]["voxels_added"] == 1
    assert changes["organs"]["spleen"] == {"changed": False, "voxels_added": 0, "voxels_removed": 0,
                                           "voxels_predicted": 0, "voxels_final": 0, "slices_changed": []}  # fmt: skip


def save_and_reload(app, nodes, folder):
    """Save nodes and the scene (.mrml) the way Slicer's Save dialog does, then load it into a fresh scene."""
    folder.mkdir()
    for node in nodes:
        if node.GetStorageNode() is None:
            node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
        storage.SetFileName(str(folder / f"{node.GetID()}.{storage.GetDefaultWriteFileExtension()}"))
        assert storage.WriteData(node), node.GetName()
    app.scene.SetRootDirectory(str(folder))
    app.scene.SetURL(str(folder / "scene.mrml"))
    assert app.scene.Commit()
    fresh = slicer_headless.start()
    fresh.scene.SetURL(str(folder / "scene.mrml"))
    assert fresh.scene.Connect()
    return fresh


def test_a_saved_and_reloaded_scene_still_knows_the_prediction(app, case, tmp_path):
    """Users save between segmenting and exporting: the result, its provenance and the stored prediction survive."""
    from HSAMSlicerLib.logic import ROLE_PREDICTION, ROLE_TABLE

    volume, segmentation, labels, _ = case
    parts = [segmentation.GetNodeReference(role) for role in (ROLE_PREDICTION, ROLE_TABLE)]
    ours = [volume, segmentation, *parts]
    reloaded = save_and_reload(app, ours, tmp_path / "scene")
    volume = reloaded.scene.GetFirstNodeByName("CT abdomen")
    segmentation = HSAMSlicerLogic(reloaded.scene).find_result(volume)
    assert segmentation is not None and segmentation.GetAttribute("HSAMSlicer.ModelSHA256") == "ab" * 32
    assert results.is_untouched(segmentation), "saving and loading is no edit: a re-run may still replace it"
    aorta_slices = np.flatnonzero((labels == 7).any(axis=(1, 2)))
    edit_segment(segmentation, "aorta", volume, lambda m: m.__setitem__(int(aorta_slices[0]), 0))
    provenance = json.loads((export_case(segmentation, tmp_path / "cases") / PROVENANCE_FILE).read_text())
    assert provenance["changes"]["changed_organs"] == ["aorta"]
    assert provenance["changes"]["changed_slices"] == [int(aorta_slices[0])]
