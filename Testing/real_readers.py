"""The tools users open hsam's files with, as functions for the tests: each returns what that tool sees.

Slicer's MRML library (slicer-core's segmentation storage node) and slicerio for ``.seg.nrrd``; nibabel and SimpleITK
for NIfTI; pynrrd for NRRD; ITK for MHA. Arrays are ``[k, j, i]`` (as SimpleITK's), geometry a 4x4 ijk-to-LPS matrix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """The 4x4 ijk-to-LPS matrix of a SimpleITK image."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def read_slicer_mrml(path: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{label value: (mask [k, j, i] on the file's grid, ijk-to-LPS)} as Slicer's storage node loads a file that
    hsam wrote (reference extent offset 0 0 0).

    Each segment's labelmap is taken as Slicer holds it in memory: cropped to the segment's Extent, so a wrong
    extent shows up as missing voxels.
    """
    slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install -e '.[test]')")
    import vtk
    from vtk.util import numpy_support

    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    header = nrrd_header(path)
    size = tuple(int(s) for s in header["sizes"][-3:])
    found = {}
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(n)
        image = segment.GetRepresentation("Binary labelmap")
        full = np.zeros(size[::-1], dtype=bool)
        extent = image.GetExtent()
        if extent[1] >= extent[0]:
            dims = image.GetDimensions()
            voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
            full[extent[4]:extent[5] + 1, extent[2]:extent[3] + 1, extent[0]:extent[1] + 1] = (
                voxels == segment.GetLabelValue())
        to_world = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(to_world)
        ras = np.array([[to_world.GetElement(r, c) for c in range(4)] for r in range(4)])
        found[segment.GetLabelValue()] = (full, LPS_FROM_RAS @ ras)
    return found


def nrrd_header(path: Path) -> dict:
    """The NRRD header as pynrrd parses it."""
    import nrrd

    return nrrd.read_header(str(path))


def read_slicerio(path: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{label value: (mask [k, j, i], ijk-to-LPS)} as slicerio reads the file (it ignores segment extents)."""
    import slicerio.segmentation as sio

    segmentation = sio.read_segmentation(str(path))
    voxels = np.asarray(segmentation["voxels"]).transpose(2, 1, 0)  # (i, j, k) -> [k, j, i]
    matrix = np.array(segmentation["ijkToLPS"], dtype=float)
    return {s["labelValue"]: (voxels == s["labelValue"], matrix) for s in segmentation["segments"]}


def read_nibabel(path: Path) -> tuple[np.ndarray, np.ndarray]:
    nibabel = pytest.importorskip("nibabel")
    image = nibabel.load(str(path))
    return np.asarray(image.dataobj).transpose(2, 1, 0), LPS_FROM_RAS @ image.affine


def read_pynrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nrrd

    data, header = nrrd.read(str(path))
    assert header["space"] == "left-posterior-superior"
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(header["space directions"], dtype=float).T
    matrix[:3, 3] = header["space origin"]
    return data.transpose(2, 1, 0), matrix


def read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    itk = pytest.importorskip("itk", reason="pip install itk-io (in the test extra)")
    image = itk.imread(str(path))
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(image.GetDirection()) * np.asarray(image.GetSpacing())
    matrix[:3, 3] = tuple(image.GetOrigin())
    return itk.array_from_image(image), matrix


def read_simpleitk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), ijk_to_lps(image)
