"""Prompts from the Slicer Logic (Qt-free) on the real MRML library: a box gives the liver segment its mask through
the warm ``hsam serve`` process, other segments stay as they were, and a crashed process is restarted once."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_litemedsam

pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install -e '.[test]')")

import SimpleITK as sitk  # noqa: E402
import slicer_headless  # noqa: E402  (puts HSAMSlicer/ on sys.path)
import slicer  # noqa: E402

from hsam.labels import remap_labels  # noqa: E402
from HSAMSlicerLib.export import segment_array  # noqa: E402
from HSAMSlicerLib.prompts import PromptProcess, apply_organ_mask, export_volume, read_label_array  # noqa: E402

pytestmark = [needs_litemedsam, pytest.mark.slow]  # a child process that loads the model and encodes slices
SLICE = 15


def test_box_prompt_fills_one_segment_and_survives_a_crash(real_data, tmp_path):
    app = slicer_headless.start()
    folder = real_data / "totalsegmentator"
    volume = app.load_volume(folder / "example_ct_sm.nii.gz", "CT")
    truth = remap_labels(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_seg.nii.gz"))), "totalseg_total")
    segmentation = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for name in ("liver", "spleen"):
        segmentation.GetSegmentation().AddEmptySegment(name, name)
    painted = np.zeros(truth.shape, dtype=np.uint8)
    painted[SLICE, 10:20, 10:20] = 1  # the user's own spleen voxels, overlapping nothing of the liver's box
    slicer.util.updateSegmentBinaryLabelmapFromArray(painted, segmentation, "spleen", volume)

    rows, cols = np.flatnonzero((truth[SLICE] == 5).any(axis=1)), np.flatnonzero((truth[SLICE] == 5).any(axis=0))
    box = [int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])]
    process = PromptProcess(folder=tmp_path)
    try:
        process.request({"cmd": "open", "volume": str(export_volume(volume, tmp_path))})
        answer = process.request({"cmd": "prompt", "organ": "liver", "slice": SLICE, "box": box})
        assert answer["voxels"] > 1000
        out = tmp_path / "masks.nrrd"
        process.request({"cmd": "labels", "output": str(out)})
        labels = read_label_array(out)
        assert apply_organ_mask(segmentation, "liver", volume, labels, 5) == answer["voxels"]
        liver = segment_array(segmentation, "liver", volume).astype(bool)
        assert np.array_equal(liver, labels == 5)
        assert 2 * (liver & (truth == 5)).sum() / (liver.sum() + (truth[SLICE] == 5).sum()) > 0.85
        assert np.array_equal(segment_array(segmentation, "spleen", volume), painted)

        process._child.kill()  # a crash: the next request restarts the process and reopens the volume
        process._child.wait()
        again = process.request({"cmd": "prompt", "organ": "liver", "slice": SLICE, "box": box})
        assert again["voxels"] == answer["voxels"]
        assert len(process.notes) == 1 and "restarted" in process.notes[0]
    finally:
        process.close()
