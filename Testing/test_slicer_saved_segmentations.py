"""Segmentations saved by Slicer itself (slicer-core's storage node, the code Slicer runs) are read wherever hsam reads
labels: cropped to the segments with a non-zero ``Segmentation_ReferenceImageExtentOffset``, several layers for
overlapping segments, segments named without terminology, segments of other structures. ``hsam evaluate`` scores them
and the fine-tuning loader trains on them without resampling by hand.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install -e '.[test]')")

import nrrd  # noqa: E402
import slicer_headless  # noqa: E402
import vtk  # noqa: E402
from scipy import ndimage  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from hsam.evaluation import evaluate_files  # noqa: E402
from hsam.labels import ORGANS, remap_labels  # noqa: E402
from hsam.volume import onto_grid, read_image, read_labels  # noqa: E402


def _oriented_mask(mask: np.ndarray, ijk_to_ras: vtk.vtkMatrix4x4):
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*mask.shape[::-1])
    image.SetImageToWorldMatrix(ijk_to_ras)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(mask.astype(np.uint8).ravel(), deep=True))
    return image


def save_with_slicer(ct: Path, masks: dict[str, np.ndarray], path: Path, terminology: dict[str, str]) -> Path:
    """Save segments (name: mask [k, j, i] on the CT grid) the way Slicer does: cropped to their extent."""
    app = slicer_headless.start()  # the segmentations logic registers the labelmap representation
    scene = app.scene
    ct_node = app.load_volume(ct)
    ijk_to_ras = vtk.vtkMatrix4x4()
    ct_node.GetIJKToRASMatrix(ijk_to_ras)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    for name, mask in masks.items():
        segment_id = node.GetSegmentation().AddEmptySegment("", name)
        if name in terminology:
            node.GetSegmentation().GetSegment(segment_id).SetTerminology(terminology[name])
        assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            _oriented_mask(mask, ijk_to_ras), node, segment_id)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetCropToMinimumExtent(True)  # Slicer's default when a user saves
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    return path


@pytest.fixture(scope="module")
def slicer_saved(real_data, tmp_path_factory):
    """The real CT's organs saved by Slicer: the stomach grown by a voxel so it overlaps its neighbours (two layers),
    half the organs named only, the other half with terminology and a generic name, plus a 'tumour' segment."""
    folder = real_data / "totalsegmentator"
    ct = folder / "example_ct_sm.nii.gz"
    seg = sitk.ReadImage(str(folder / "example_seg.nii.gz"))
    labels = remap_labels(sitk.GetArrayViewFromImage(seg), "totalseg_total")
    masks, terminology, expected = {}, {}, np.zeros_like(labels)
    for organ in ORGANS:
        mask = labels == organ.index
        if organ.name == "stomach":
            mask = ndimage.binary_dilation(mask)
        name = organ.display_name if organ.index % 2 else f"Segment {organ.index}"
        if not organ.index % 2:
            terminology[name] = organ.terminology_entry
        masks[name] = mask
        expected[mask] = organ.index  # in H-SAM order: the higher label wins where segments overlap
    masks["tumour"] = np.roll(labels == 5, 3, axis=2)  # another structure, overlapping the liver
    path = save_with_slicer(ct, masks, tmp_path_factory.mktemp("slicer") / "corrected.seg.nrrd", terminology)
    reference = sitk.GetImageFromArray(expected)
    reference.CopyInformation(seg)
    ref_path = path.with_name("reference.nii.gz")
    sitk.WriteImage(reference, str(ref_path))
    return path, ct, expected, ref_path


def test_slicer_saves_cropped_layered_files(slicer_saved):
    """The file really is what the issue describes: cropped, offset, two layers."""
    path, _, expected, _ = slicer_saved
    header = nrrd.read_header(str(path))
    assert header["dimension"] == 4 and header["sizes"][0] >= 2  # overlapping segments: several layers
    assert tuple(header["sizes"][1:]) != expected.shape[::-1]
    assert header["Segmentation_ReferenceImageExtentOffset"] != "0 0 0"


def test_read_labels_puts_a_slicer_file_on_the_ct_grid(slicer_saved):
    path, ct, expected, _ = slicer_saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lossless: no resampling warning
        placed = onto_grid(read_labels(path), read_image(ct))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(placed), expected)


def test_evaluate_scores_a_slicer_saved_prediction(slicer_saved):
    path, _, _, ref_path = slicer_saved
    rows = evaluate_files(path, ref_path)
    assert [r.score.dice for r in rows] == [1.0] * 8


def test_finetune_loader_trains_on_a_slicer_saved_segmentation(slicer_saved):
    from hsam.training.data import load_volume

    path, ct, _, ref_path = slicer_saved
    from_slicer = load_volume(ct, path, (-125, 275), "LPS")
    from_nifti = load_volume(ct, ref_path, (-125, 275), "LPS")
    np.testing.assert_array_equal(from_slicer.label, from_nifti.label)
    assert from_slicer.label.any()


def test_a_case_folder_with_a_slicer_saved_segmentation_loads_for_finetuning(slicer_saved, tmp_path):
    import shutil

    from hsam.training.data import load_cases

    path, ct, expected, _ = slicer_saved
    case = tmp_path / "cases" / "corrected"
    case.mkdir(parents=True)
    shutil.copy(ct, case / "image.nii.gz")
    shutil.copy(path, case / "labels.seg.nrrd")
    (case / "provenance.json").write_text("{}")
    (volume,) = load_cases(tmp_path / "cases", (-125, 275), "LPS")
    assert volume.source["label"].endswith("labels.seg.nrrd")
    # LPS canonical layout of this RAS-stored CT: x and y reversed
    np.testing.assert_array_equal(volume.label, expected[:, ::-1, ::-1])
