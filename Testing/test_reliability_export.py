"""Exported training cases: hostile names never leave the export folder, an existing case (or a planted symlink) is
never written into, a full disk leaves no case behind, and a process killed mid-export leaves either a complete case
(provenance.json is written last) or one the training loader recognises as interrupted and skips.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install -e '.[test]')")

import SimpleITK as sitk  # noqa: E402
import slicer_headless  # noqa: E402  (puts HSAMSlicer/ on sys.path)

from HSAMSlicerLib.export import PROVENANCE_FILE, export_case, sanitize_case_name  # noqa: E402

HERE = Path(__file__).resolve().parent
CHILD = HERE / "fault_child.py"
sys.path.insert(0, str(HERE))
from fault_child import slicer_case  # noqa: E402

CASE_FILES = {"image.nii.gz", "labels.nii.gz", "segmentation.seg.nrrd", "hsam_labels.csv", PROVENANCE_FILE}
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=120)
       | st.builds("".join, st.lists(st.sampled_from(["..", "/", "\\", ".", "~", ":", "con", "COM1", "a", " ", "\0",
                                                      "é", "日", "$HOME", "%APPDATA%", "lpt9.txt"]), max_size=12)))
def test_sanitised_names_are_plain_folder_names(name):
    cleaned = sanitize_case_name(name)
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}", cleaned), cleaned
    assert not cleaned.endswith((".", "-", "_")) or cleaned == "case"
    assert cleaned.split(".")[0].upper() not in WINDOWS_RESERVED
    root = Path("/export/root")
    assert (root / cleaned).parent == root and os.path.normpath(root / cleaned) == str(root / cleaned)
    assert sanitize_case_name(cleaned) == cleaned  # stable


@pytest.fixture(scope="module")
def case(real_data):
    return slicer_case(real_data)


@pytest.mark.parametrize(
    "name",
    ["../../escaped", "/etc/cron.d/x", "..", "C:\\Windows\\x", "a/../../b", "~/x", "\\\\server\\share", "con.nii"],
)
def test_hostile_case_names_stay_in_the_export_folder(case, tmp_path, name):
    _, _, segmentation, _ = case
    root = tmp_path / "cases"
    folder = export_case(segmentation, root, case_name=name)
    assert folder.parent == root and set(os.listdir(folder)) == CASE_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases"]


def test_existing_cases_and_planted_symlinks_are_never_written_into(case, tmp_path):
    _, _, segmentation, _ = case
    root, outside = tmp_path / "cases", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "patient").mkdir()
    (root / "patient" / "notes.txt").write_text("the user's own file")
    os.symlink(outside, root / "patient_2")  # a link planted where the next free name would be
    (root / "patient_3").write_text("a file, not a folder")
    folder = export_case(segmentation, root, case_name="patient")
    assert folder.name == "patient_4" and set(os.listdir(folder)) == CASE_FILES
    assert os.listdir(outside) == [] and os.listdir(root / "patient") == ["notes.txt"]
    assert (root / "patient_3").read_text() == "a file, not a folder"


def _child(*args: str, fsize: int | None = None, **popen) -> subprocess.Popen:
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.Popen([sys.executable, str(CHILD), *args], preexec_fn=limit, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)  # fmt: skip


def test_full_disk_during_export_leaves_no_case_and_says_so(real_data, tmp_path):
    root = tmp_path / "cases"
    process = _child("export", str(real_data), str(root), "patient", fsize=64 * 1024)  # the CT needs ~480 kB
    out, err = process.communicate(timeout=300)
    assert process.returncode == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "could not write" in errors[0] and "disk space" in errors[0], err
    assert os.listdir(root) == []


def _complete(folder: Path, labels: np.ndarray, ct: np.ndarray) -> None:
    from hsam.volume import read_image, read_labels

    assert set(os.listdir(folder)) == CASE_FILES
    json.loads((folder / PROVENANCE_FILE).read_text())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(folder / "image.nii.gz")), ct)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_labels(folder / "labels.nii.gz")), labels)
    read_labels(folder / "segmentation.seg.nrrd")


def test_killed_exports_leave_complete_cases_or_detectable_ones(case, real_data, tmp_path):
    """SIGKILL at random moments of a run of exports; then every case with provenance.json is complete, and the
    training loader skips the interrupted ones with a warning."""
    from hsam.training.data import load_cases

    _, volume, _, labels = case
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz")))
    root = tmp_path / "cases"
    rng = random.Random(6)
    kills = 0
    for _ in range(4):
        known = set(root.iterdir()) if root.is_dir() else set()
        process = _child("export", str(real_data), str(root), "patient", "50")
        deadline = time.monotonic() + 240

        def writing() -> bool:  # a new case folder exists and its provenance does not yet
            return root.is_dir() and any(not (f / PROVENANCE_FILE).exists() for f in set(root.iterdir()) - known)

        while time.monotonic() < deadline and not (root.is_dir() and set(root.iterdir()) - known):
            assert process.poll() is None, process.communicate()[1][-2000:]
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))
        while time.monotonic() < deadline and process.poll() is None and not writing():
            time.sleep(0.0005)
        process.kill()
        process.communicate(timeout=60)
        kills += writing()
    assert kills >= 3, "the kills did not land mid-export"
    folders = sorted(root.iterdir())
    complete = [f for f in folders if (f / PROVENANCE_FILE).is_file()]
    interrupted = [f for f in folders if f not in complete]
    for folder in complete:
        _complete(folder, labels, ct)
    assert interrupted, "no kill landed mid-export"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if complete:
            volumes = load_cases(root, window=(-125, 275), orientation="LPS")
            assert sorted(v.name for v in volumes) == sorted(f.name for f in complete)
        else:
            with pytest.raises(Exception, match="no exported cases"):
                load_cases(root, window=(-125, 275), orientation="LPS")
    # folders killed before image and labels were both in place are not cases at all; the others are named
    looks_like_case = [f for f in interrupted if {"image.nii.gz", "labels.nii.gz"} <= set(os.listdir(f))]
    warned = [str(w.message) for w in caught if "without provenance.json" in str(w.message)]
    assert bool(warned) == bool(looks_like_case), (warned, looks_like_case)
    assert all(f.name in warned[0] for f in looks_like_case[:5])
    # the next export never reuses an interrupted folder's name
    _, _, segmentation, _ = case
    folder = export_case(segmentation, root, case_name="patient")
    assert folder not in folders and set(os.listdir(folder)) == CASE_FILES
    assert slicer_headless  # (imported for its sys.path side effect)
