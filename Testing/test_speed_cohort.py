"""Cohorts (hsam.cli.cohort, ``hsam segment FOLDER|LIST -o OUT_DIR``): inputs, resume after a kill, torchrun sharding."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.cli import cohort
from hsam.cli import main
from hsam.errors import HSAMError
from hsam.labels import CLASS_NAMES



@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    import torch

    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard, save_model
    from hsam.model.config import load_model_config

    torch.manual_seed(0)
    config = load_model_config("vit_tiny")
    card = ModelCard.for_config(config, "tiny-cohort", classes=list(CLASS_NAMES), demo=True)
    return save_model(build_hsam(config), card, tmp_path_factory.mktemp("model") / "tiny-cohort")


@pytest.fixture(scope="module")
def cases(real_data, tmp_path_factory) -> Path:
    """A folder with three small real CT cases (4-slice crops of the shared CT, different formats)."""
    folder = tmp_path_factory.mktemp("cohort")
    image = sitk.ReadImage(str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz"))
    for k, name in enumerate(["case_a.nii.gz", "case_b.nrrd", "case_c.mha"]):
        sitk.WriteImage(image[:, :, 8 * k : 8 * k + 4], str(folder / name))
    (folder / "notes.txt").write_text("not a volume\n")
    (folder / "old.seg.nrrd").write_bytes(b"")  # a segmentation is not a case
    return folder


def _segment(source: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["segment", str(source), "-o", str(out), "--model", str(model), "--device", "cpu", "--mode", "fast",
                 "-q", *extra])


def test_inputs_from_folder_and_list(cases, tmp_path):
    found = cohort.cohort_inputs(cases)
    assert [p.name for p in found] == ["case_a.nii.gz", "case_b.nrrd", "case_c.mha"]
    assert cohort.is_cohort_source(cases)
    listing = tmp_path / "cases.txt"
    listing.write_text(f"# two cases\n{cases / 'case_c.mha'}\n\n{cases / 'case_a.nii.gz'}  # first\n")
    assert [p.name for p in cohort.cohort_inputs(listing)] == ["case_a.nii.gz", "case_c.mha"]
    assert cohort.is_cohort_source(listing)
    assert not cohort.is_cohort_source(cases / "case_a.nii.gz")
    listing.write_text("missing.nii.gz\n")
    with pytest.raises(HSAMError, match="does not exist"):
        cohort.cohort_inputs(listing)


def test_a_dicom_series_folder_is_one_case_not_a_cohort(real_data):
    assert not cohort.is_cohort_source(real_data / "dcmqi" / "ct-3slice")
    assert cohort.is_cohort_source(real_data / "dcmqi")  # a folder holding a DICOM series folder is a cohort


def test_cohort_segments_every_case_and_resumes(cases, tiny_model, tmp_path):
    out = tmp_path / "out"
    assert _segment(cases, out, tiny_model) == 0
    outputs = sorted(p.name for p in out.iterdir())
    assert outputs == ["case_a.nii.gz", "case_b.nii.gz", "case_c.nii.gz"]
    for name in outputs:
        labels = sitk.ReadImage(str(out / name))
        assert labels.GetSize()[2] == 4 and labels.GetPixelID() == sitk.sitkUInt8

    # a killed run leaves finished outputs (written atomically) and no output for the case it was working on
    finished = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "case_b.nii.gz"}
    (out / "case_b.nii.gz").unlink()
    (out / ".tmp-stale.nii.gz").write_bytes(b"partial")  # a killed writer's temp file does not count as finished
    assert _segment(cases, out, tiny_model) == 0
    assert (out / "case_b.nii.gz").is_file()
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished  # finished cases were skipped


def test_shards_split_the_cohort_without_overlap(cases, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    done = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        before = set(os.listdir(out)) if out.exists() else set()
        assert _segment(cases, out, tiny_model) == 0
        done.append(set(os.listdir(out)) - before)
    assert done[0] == {"case_a.nii.gz", "case_c.nii.gz"} and done[1] == {"case_b.nii.gz"}


def test_shard_and_rank_helpers(monkeypatch):
    items = [Path(f"c{i}") for i in range(7)]
    parts = [cohort.shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, []), key=str) == items and all(parts)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(HSAMError, match="outside WORLD_SIZE"):
        cohort.rank_and_world()


def test_cohort_refuses_single_volume_extras(cases, tiny_model, tmp_path, capsys):
    code = _segment(cases, tmp_path / "out", tiny_model, "--stats", str(tmp_path / "s.csv"))
    assert code == 2
    assert "single volumes" in capsys.readouterr().err
    assert not np.any([p.exists() for p in (tmp_path / "out").glob("*.nii.gz")])


def test_seg_nrrd_outputs_open_complete_in_slicer(cases, tiny_model, tmp_path):
    """Cohort and single-volume .seg.nrrd outputs: Slicer's MRML library loads every voxel that the file holds."""
    from real_readers import read_slicer_mrml, read_slicerio

    assert _segment(cases, tmp_path / "cohort", tiny_model, "--suffix", ".seg.nrrd") == 0
    assert _segment(cases / "case_b.nrrd", tmp_path / "single.seg.nrrd", tiny_model) == 0
    outputs = sorted((tmp_path / "cohort").glob("*.seg.nrrd")) + [tmp_path / "single.seg.nrrd"]
    assert len(outputs) == 4
    for path in outputs:
        in_slicer, in_file = read_slicer_mrml(path), read_slicerio(path)
        assert sorted(in_slicer) == sorted(in_file) == list(range(1, len(CLASS_NAMES)))
        assert sum(int(mask.sum()) for mask, _ in in_file.values()) > 0, path.name
        for value, (mask, _) in in_file.items():
            np.testing.assert_array_equal(in_slicer[value][0], mask, err_msg=f"{path.name}, label {value}")
