"""The files a segmentation job writes in Slicer's process: the CT in its own type with no copy of the voxels, in job
folders under one root, and a sweep at module start that removes only what a crash left behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install -e '.[test]')")

import SimpleITK as sitk  # noqa: E402
import slicer_headless  # noqa: E402  (puts HSAMSlicer/ on sys.path)
import slicer  # noqa: E402
import vtk  # noqa: E402

from HSAMSlicerLib import geometry  # noqa: E402
from HSAMSlicerLib.logic import HSAMSlicerLogic, RunOptions  # noqa: E402
from HSAMSlicerLib.nrrd_input import write_volume_nrrd  # noqa: E402
from HSAMSlicerLib.process import GROUP_FILE, STALE_AFTER_S, sweep_stale_folders  # noqa: E402


def _matrix(volume) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return geometry.vtk_matrix_to_numpy(matrix)


def test_the_input_file_is_the_ct_as_itk_reads_it(tmp_path, real_data):
    ct = real_data / "totalsegmentator" / "example_ct_sm.nii.gz"
    app = slicer_headless.start()
    volume = app.load_volume(ct)
    written = sitk.ReadImage(str(write_volume_nrrd(slicer.util.arrayFromVolume(volume), _matrix(volume),
                                                   tmp_path / "input.nrrd")))  # fmt: skip
    expected = sitk.ReadImage(str(ct))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(expected))
    assert sitk.GetArrayFromImage(written).dtype == slicer.util.arrayFromVolume(volume).dtype, "the volume's own type"
    np.testing.assert_allclose(written.GetSpacing(), expected.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), expected.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), expected.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64, np.int32])
def test_oblique_geometry_and_every_voxel_type_round_trip(tmp_path, dtype):
    """The same placement as the SimpleITK path (geometry.image_from_array) for an oblique, permuted grid."""
    rotation = vtk.vtkTransform()
    rotation.RotateWXYZ(25, 0.3, -0.5, 0.8)
    matrix = np.eye(4)
    linear = np.array([[rotation.GetMatrix().GetElement(r, c) for c in range(3)] for r in range(3)])
    matrix[:3, :3] = linear[:, [2, 0, 1]] @ np.diag([0.7, 1.3, 2.5])
    matrix[:3, 3] = [12.5, -40.0, 7.25]
    array = (np.arange(4 * 5 * 6).reshape(4, 5, 6) * 3 - 20).astype(dtype)
    written = sitk.ReadImage(str(write_volume_nrrd(array, matrix, tmp_path / "input.nrrd")))
    expected = geometry.image_from_array(array, matrix)
    assert written.GetPixelID() == expected.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), array)
    np.testing.assert_allclose(written.GetSpacing(), expected.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(written.GetOrigin(), expected.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(written.GetDirection(), expected.GetDirection(), atol=1e-9)


def test_writing_the_input_makes_no_copy_of_the_voxels(tmp_path):
    """A 64 MiB volume is written with less than 1 MiB of extra Python/numpy memory (numpy's allocations are traced);
    a copy, e.g. np.ascontiguousarray of a strided view, would show as 64 MiB."""
    array = np.zeros((64, 512, 1024), dtype=np.int16)
    tracemalloc.start()
    try:
        write_volume_nrrd(array, np.eye(4), tmp_path / "input.nrrd")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        np.ascontiguousarray(array[:, :, ::-1])
        _, copy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak / 2**20:.1f} MiB traced while writing"
    assert copy_peak >= array.nbytes, "the measurement sees a copy"
    assert (tmp_path / "input.nrrd").stat().st_size > array.nbytes


def test_job_folders_live_under_one_root_and_the_sweep_removes_only_crash_leftovers(tmp_path, real_data):
    app = slicer_headless.start()
    logic = HSAMSlicerLogic(app.scene)
    logic.jobs_root = tmp_path / "hsam"
    volume = app.load_volume(real_data / "totalsegmentator" / "example_ct_sm.nii.gz")
    running = logic.start_segmentation(volume, RunOptions(model="missing-model", device="cpu"))
    assert running.job.folder.parent == logic.jobs_root
    assert (running.job.folder / GROUP_FILE).read_text() == str(running.job.process.pid)
    running.job.wait(timeout=120, cleanup=True)

    old = time.time() - STALE_AFTER_S - 60
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    dead.wait()
    folders = {}
    for name, group, age in (("crashed", dead.pid, old), ("no-group", None, old), ("running", sleeper.pid, old),
                             ("recent", dead.pid, time.time())):
        folder = logic.jobs_root / f"job-{name}"
        folder.mkdir(parents=True)
        (folder / "input.nrrd").write_bytes(b"voxels")
        if group is not None:
            (folder / GROUP_FILE).write_text(str(group))
        for path in (*folder.iterdir(), folder):
            os.utime(path, (age, age))
        folders[name] = folder
    try:
        removed = logic.sweep_stale_job_folders()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in removed) == ["job-crashed", "job-no-group"]
    assert folders["running"].is_dir() and folders["recent"].is_dir()
    assert sweep_stale_folders(tmp_path / "nothing-here") == []
