"""``hsam sample``: the sample CT ships inside the package, SHA-256 checked, written atomically, never over a file."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import SimpleITK as sitk

from conftest import one_line_error
from hsam.sample_data import samples
from hsam.cli import main


def test_sample_is_totalsegmentators_test_ct_byte_for_byte(real_data, tmp_path, capsys):
    out = tmp_path / "ct.nii.gz"
    assert main(["sample", "abdomen-ct", "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_bytes() == (real_data / "totalsegmentator" / "example_ct_sm.nii.gz").read_bytes()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == samples.SAMPLES["abdomen-ct"].sha256
    assert sitk.ReadImage(str(out)).GetSize() == (122, 101, 30)
    assert [p.name for p in tmp_path.iterdir()] == ["ct.nii.gz"]  # no temp file left


def test_source_and_licence_are_kept_next_to_it():
    readme = (samples.SAMPLE_DIR / "README.md").read_text()
    assert "Apache-2.0" in readme and samples.SAMPLES["abdomen-ct"].sha256 in readme
    assert "github.com/wasserth/TotalSegmentator" in readme
    assert "Apache License" in (samples.SAMPLE_DIR / "LICENSE").read_text()


def test_an_existing_file_is_kept_unless_forced(tmp_path, capsys):
    out = tmp_path / "ct.nii.gz"
    out.write_bytes(b"the user's own scan")
    assert main(["sample", "abdomen-ct", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"the user's own scan"
    assert main(["sample", "abdomen-ct", "-o", str(out), "--force"]) == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == samples.SAMPLES["abdomen-ct"].sha256


def test_bad_requests_are_one_line_errors_and_write_nothing(tmp_path):
    one_line_error(lambda: samples.write_sample("abdomen-ct", tmp_path / "ct.nrrd"), ".nii.gz")
    one_line_error(lambda: samples.write_sample("abdomen-ct", tmp_path / "missing" / "ct.nii.gz"), "does not exist")
    one_line_error(lambda: samples.write_sample("pelvis-mr", tmp_path / "ct.nii.gz"), "abdomen-ct")
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_installation_says_so(tmp_path, monkeypatch):
    damaged = tmp_path / "sample_data"
    shutil.copytree(samples.SAMPLE_DIR, damaged)
    data = bytearray((damaged / "abdomen_ct.nii.gz").read_bytes())
    data[1000] ^= 0xFF
    (damaged / "abdomen_ct.nii.gz").write_bytes(bytes(data))
    monkeypatch.setattr(samples, "SAMPLE_DIR", damaged)
    out = tmp_path / "ct.nii.gz"
    one_line_error(lambda: samples.write_sample("abdomen-ct", out), "damaged", "reinstall hsam")
    (damaged / "abdomen_ct.nii.gz").unlink()
    one_line_error(lambda: samples.write_sample("abdomen-ct", out), "missing", "reinstall hsam")
    assert not out.exists()
