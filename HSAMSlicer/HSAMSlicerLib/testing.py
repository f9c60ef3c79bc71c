"""Test inputs shared by the Slicer self-test (HSAMSlicerTest) and the pytest suite: a tiny real H-SAM network and
a small synthetic CT. The network is the real H-SAM architecture at toy size with random weights, so a run takes
seconds on a CPU; its labels are meaningless, but every step of the pipeline runs for real.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_CONFIG = "vit_tiny"


def save_tiny_model(folder: str | Path, seed: int = 0, name: str = "hsam-tiny-test") -> Path:
    """Build the ``vit_tiny`` H-SAM with seeded random weights and save it (model.safetensors + model.json)."""
    import torch

    from hsam.labels import CLASS_NAMES
    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard, save_model
    from hsam.model.config import load_model_config

    config = load_model_config(TINY_CONFIG)
    torch.manual_seed(seed)
    model = build_hsam(config)
    card = ModelCard.for_config(
        config, name=name, title="Tiny test model (random weights)", classes=list(CLASS_NAMES), demo=True,
        training_data="none: random weights, for tests only",
    )  # fmt: skip
    return save_model(model, card, folder)


def synthetic_ct(slices: int = 10, rows: int = 48, columns: int = 64) -> np.ndarray:
    """An int16 [k, j, i] HU array: air around an elliptic soft-tissue body with one brighter 'organ'."""
    k, j, i = np.mgrid[0:slices, 0:rows, 0:columns]
    body = ((i - columns / 2) / (0.44 * columns)) ** 2 + ((j - rows / 2) / (0.42 * rows)) ** 2 < 1
    organ = ((i - 0.35 * columns) / (0.12 * columns)) ** 2 + ((j - 0.45 * rows) / (0.15 * rows)) ** 2 < 1
    array = np.where(body, 40, -1000).astype(np.int16)
    array[organ & (k >= 2)] = 130
    return array


def add_synthetic_ct(scene, name: str = "Synthetic CT"):
    """A scalar volume node holding :func:`synthetic_ct`, 1.5 x 1.5 x 2 mm voxels, LPS-stored like DICOM."""
    import slicer

    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(volume, synthetic_ct())
    volume.SetSpacing(1.5, 1.5, 2.0)
    volume.SetOrigin(48.0, 36.0, -10.0)
    volume.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)
    volume.CreateDefaultDisplayNodes()
    return volume


def _check(condition: bool, message: str) -> None:
    if not condition:  # not `assert`: must also fail under python -O
        raise AssertionError(message)


def check_whole_path(logic, workdir: str | Path, log=print) -> Path:
    """The module's self-test, runnable in Slicer (HSAMSlicerTest) and headless (pytest): tiny model, synthetic CT,
    cancel, run (in a child process, as the GUI does), segment names/terminology/geometry, re-run, export twice.
    Raises AssertionError on any failure; returns the first exported case folder.
    """
    import json

    import slicer
    import SimpleITK as sitk

    from hsam.labels import ORGANS
    from HSAMSlicerLib.export import segment_terminology
    from HSAMSlicerLib.logic import RunOptions
    from HSAMSlicerLib.process import JobCancelled

    workdir = Path(workdir)
    scene = logic.scene
    log("Saving a tiny H-SAM model")
    model = save_tiny_model(workdir / "tiny-model")
    volume = add_synthetic_ct(scene)
    options = RunOptions(model=str(model), device="cpu", confidence=True, mode="eager")

    log("Cancelling before the first slice")
    nodes_before = scene.GetNumberOfNodes()
    try:
        logic.process(volume, options, cancel=lambda: True)
        raise AssertionError("cancel did not stop the run")
    except JobCancelled:
        pass
    _check(scene.GetNumberOfNodes() == nodes_before, "cancel must leave no node behind")

    log("Segmenting the synthetic CT")
    seen: list[tuple[int, int]] = []
    segmentation = logic.process(volume, options, progress=lambda k, n: seen.append((k, n)))
    slices = volume.GetImageData().GetDimensions()[2]
    _check(bool(seen) and seen[-1] == (slices, slices), f"progress reports {seen}")
    segments = segmentation.GetSegmentation()
    _check(segments.GetNumberOfSegments() == len(ORGANS), "one segment per organ")
    for index, entry in enumerate(ORGANS):
        segment = segments.GetNthSegment(index)
        _check(segment.GetName() == entry.display_name, f"segment {index} is named {segment.GetName()}")
        _check(segment_terminology(segment) == entry.terminology_entry, f"terminology of {entry.name}")
    role = segmentation.GetReferenceImageGeometryReferenceRole()
    _check(segmentation.GetNodeReference(role) is volume, "the CT is the reference geometry")
    _check(bool(segmentation.GetAttribute("HSAMSlicer.ModelSHA256")), "provenance is recorded")

    log("Segmenting again: the result is replaced, a user's segmentation stays")
    user_made = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "made by the user")
    again = logic.process(volume, options)
    _check(scene.GetNodeByID(segmentation.GetID()) is None, "the earlier result is replaced")
    _check(scene.GetNodeByID(user_made.GetID()) is not None, "a user's segmentation is never removed")

    log("Exporting a training case twice")
    case = logic.export_for_finetuning(again, workdir / "cases")
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "image.nii.gz")))
    _check(bool((image == slicer.util.arrayFromVolume(volume)).all()), "image.nii.gz holds the CT's voxels")
    provenance = json.loads((case / "provenance.json").read_text())
    _check(provenance["changes"]["changed_organs"] == [], "nothing was edited")
    second = logic.export_for_finetuning(again, workdir / "cases")
    _check(second != case and (case / "provenance.json").is_file(), "an export never overwrites an earlier case")
    return case
