"""A headless 3D Slicer scene from the PyPI ``slicer-core`` wheel (the real MRML library, no Qt), for Logic tests.

Follows the recipe in runtime-feasibility.md: application logic + colour, volume, segmentation and subject-hierarchy
logics, every one kept referenced (SetModuleLogic does not keep the Python object alive), and the small
``slicer.mrmlScene`` / ``slicer.modules`` shim that ``slicer.util`` expects inside the application.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1] / "HSAMSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))  # HSAMSlicerLib lives next to HSAMSlicer.py, as in an installed extension


@dataclass
class HeadlessSlicer:
    scene: object
    app_logic: object
    color_logic: object
    volumes_logic: object
    segmentations_logic: object
    subject_hierarchy_logic: object

    def load_volume(self, path: Path, name: str = "CT"):
        node = self.volumes_logic.AddArchetypeVolume(str(path), name, 0)
        assert node is not None, f"could not load {path}"
        return node


def start() -> HeadlessSlicer:
    import slicer
    import vtk

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtk.vtkCollection())
    app_logic.SetViewLogics(vtk.vtkCollection())
    color_logic = slicer.vtkSlicerColorLogic()
    color_logic.SetMRMLApplicationLogic(app_logic)
    color_logic.SetMRMLScene(scene)
    app_logic.SetModuleLogic("Colors", color_logic)
    volumes_logic = slicer.vtkSlicerVolumesLogic()
    volumes_logic.SetMRMLScene(scene)
    volumes_logic.SetMRMLApplicationLogic(app_logic)
    app_logic.SetModuleLogic("Volumes", volumes_logic)
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    segmentations_logic.SetMRMLApplicationLogic(app_logic)
    app_logic.SetModuleLogic("Segmentations", segmentations_logic)
    subject_hierarchy_logic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    subject_hierarchy_logic.SetMRMLScene(scene)
    subject_hierarchy_logic.SetMRMLApplicationLogic(app_logic)
    app_logic.SetModuleLogic("SubjectHierarchy", subject_hierarchy_logic)
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        volumes=types.SimpleNamespace(logic=lambda: volumes_logic),
        segmentations=types.SimpleNamespace(logic=lambda: segmentations_logic),
    )
    return HeadlessSlicer(scene, app_logic, color_logic, volumes_logic, segmentations_logic, subject_hierarchy_logic)
