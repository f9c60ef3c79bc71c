"""Every file hsam writes, read back by the tools users open it with: Slicer's own MRML library (slicer-core's
segmentation storage node) and slicerio for ``.seg.nrrd``, nibabel and SimpleITK for NIfTI, pynrrd for NRRD, ITK for
MHA. Each must give the labels in memory voxel for voxel, at the same physical place, for RAS-stored, LPS, permuted
and oblique grids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.labels import ORGANS, remap_labels
from hsam.volume import write_image, write_labels

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def _rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    z, x = np.radians(degrees_z), np.radians(degrees_x)
    about_z = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return about_z @ about_x


@pytest.fixture(scope="module")
def organ_labels(real_data) -> sitk.Image:
    """The real example_seg (122 x 101 x 30, 3 mm) in H-SAM label values, as the NIfTI stores it (RAS axes)."""
    seg = sitk.ReadImage(str(real_data / "totalsegmentator" / "example_seg.nii.gz"))
    labels = sitk.GetImageFromArray(remap_labels(sitk.GetArrayViewFromImage(seg), "totalseg_total"))
    labels.CopyInformation(seg)
    return labels


def geometry(labels: sitk.Image, kind: str) -> sitk.Image:
    """The same labels on a grid of the given kind: ras (as stored), lps, permuted (axes S, L, P) or oblique."""
    if kind == "ras":
        return labels
    if kind in ("lps", "permuted"):
        return sitk.DICOMOrient(labels, "LPS" if kind == "lps" else "SLP")
    oblique = sitk.Image(labels)
    oblique.SetDirection(_rotation(25.0, 10.0).flatten().tolist())
    oblique.SetSpacing((0.8, 0.9, 2.5))
    oblique.SetOrigin((-12.5, 40.25, -310.0))
    return oblique


# --------------------------------------------------------------------------------------------------- real readers
def read_slicer_mrml(path: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{label value: (mask [k, j, i] on the file's full grid, ijk-to-LPS)} as Slicer's storage node loads the file.

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
    header = _nrrd_header(path)
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


def _nrrd_header(path: Path) -> dict:
    import nrrd

    return nrrd.read_header(str(path))


def read_slicerio(path: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
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


LABEL_MAP_READERS = {".nii.gz": (read_nibabel, read_simpleitk), ".nii": (read_nibabel, read_simpleitk),
                     ".nrrd": (read_pynrrd,), ".mha": (read_itk,)}
GEOMETRIES = ("ras", "lps", "permuted", "oblique")


def _same_place(found: np.ndarray, expected: np.ndarray) -> None:
    # NIfTI stores its affine in float32: a few micrometres at 300 mm from the origin
    np.testing.assert_allclose(found, expected, atol=1e-3, rtol=1e-6)


@pytest.mark.parametrize("kind", GEOMETRIES)
def test_seg_nrrd_loads_complete_in_slicer_and_slicerio(organ_labels, tmp_path, kind):
    labels = geometry(organ_labels, kind)
    array = sitk.GetArrayFromImage(labels)
    path = write_labels(labels, tmp_path / "organs.seg.nrrd")
    for reader in (read_slicer_mrml, read_slicerio):
        segments = reader(path)
        assert sorted(segments) == [o.index for o in ORGANS], reader.__name__
        for organ in ORGANS:
            mask, matrix = segments[organ.index]
            expected = array == organ.index
            assert mask.sum() == expected.sum() > 0, (reader.__name__, organ.name, int(mask.sum()), int(expected.sum()))
            np.testing.assert_array_equal(mask, expected)
            _same_place(matrix, ijk_to_lps(labels))


@pytest.mark.parametrize("kind", GEOMETRIES)
@pytest.mark.parametrize("suffix", list(LABEL_MAP_READERS))
def test_label_maps_read_back_with_the_real_readers(organ_labels, tmp_path, suffix, kind):
    labels = geometry(organ_labels, kind)
    path = write_labels(labels, tmp_path / f"organs{suffix}")
    for reader in LABEL_MAP_READERS[suffix]:
        array, matrix = reader(path)
        np.testing.assert_array_equal(array, sitk.GetArrayViewFromImage(labels), err_msg=reader.__name__)
        _same_place(matrix, ijk_to_lps(labels))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_confidence_map_reads_back_with_the_real_readers(organ_labels, tmp_path, suffix):
    """The confidence map (uint8, 0..255) as ``hsam segment --confidence`` writes it, oblique grid."""
    labels = geometry(organ_labels, "oblique")
    rng = np.random.default_rng(0)
    confidence = sitk.GetImageFromArray(rng.integers(0, 256, sitk.GetArrayViewFromImage(labels).shape, dtype=np.uint8))
    confidence.CopyInformation(labels)
    path = write_image(confidence, tmp_path / f"confidence{suffix}")
    for reader in LABEL_MAP_READERS[suffix]:
        array, matrix = reader(path)
        assert array.dtype == np.uint8, reader.__name__
        np.testing.assert_array_equal(array, sitk.GetArrayViewFromImage(confidence), err_msg=reader.__name__)
        _same_place(matrix, ijk_to_lps(confidence))
