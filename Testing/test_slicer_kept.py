"""Where the Slicer module keeps an automatic run's slice embeddings for the prompt process (torch-free)."""

from __future__ import annotations

import json

import slicer_headless  # noqa: F401  (puts HSAMSlicer/ on sys.path)
from HSAMSlicerLib import kept

from hsam.prompting import kept as engine_kept


def test_the_index_name_is_the_engines():
    assert kept.INDEX == engine_kept.INDEX


def test_a_jobs_kept_embeddings_move_to_the_volume_and_go_with_it(tmp_path):
    job = tmp_path / "job-1" / "embeddings"
    assert kept.take(job, tmp_path, "vtkMRMLScalarVolumeNode1") is None, "a run that kept nothing"
    job.mkdir(parents=True)
    (job / "slices.npy").write_bytes(b"first")
    (job / kept.INDEX).write_text(json.dumps({"slices": [0]}))
    target = kept.take(job, tmp_path, "vtkMRMLScalarVolumeNode1")
    assert target == kept.folder_of(tmp_path, "vtkMRMLScalarVolumeNode1") and not job.exists()
    assert target.name.startswith("job-"), "the start-up sweep removes what a crash left"
    assert kept.stamp(tmp_path, "vtkMRMLScalarVolumeNode1") is not None

    again = tmp_path / "job-2" / "embeddings"
    again.mkdir(parents=True)
    (again / "slices.npy").write_bytes(b"second")
    (again / kept.INDEX).write_text("{}")
    kept.take(again, tmp_path, "vtkMRMLScalarVolumeNode1")
    assert (target / "slices.npy").read_bytes() == b"second", "a later run replaces the older embeddings"

    kept.take(_kept_job(tmp_path / "job-3"), tmp_path, "vtkMRMLScalarVolumeNode2")
    kept.forget(tmp_path, "vtkMRMLScalarVolumeNode1")
    assert kept.stamp(tmp_path, "vtkMRMLScalarVolumeNode1") is None
    assert kept.stamp(tmp_path, "vtkMRMLScalarVolumeNode2") is not None
    kept.forget(tmp_path)
    assert not list(tmp_path.glob(kept.PREFIX + "*"))


def _kept_job(folder):
    found = folder / "embeddings"
    found.mkdir(parents=True)
    (found / kept.INDEX).write_text("{}")
    return found
