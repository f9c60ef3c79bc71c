"""Reading DICOM as hospitals and anonymisers write it (issue 29): every pixel encoding GDCM reads, identifying UIDs
blank or missing (the anonymised PET/CT export that was refused), files without extension in shuffled sub-folders,
copies of the same files, unreadable files listed with their reason.

All variants are made from the real GE CT series of ../shared/data/real/dcmqi (Testing/dicom_variants.py) and must
read voxel-equal, at the same place, as the original.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import one_line_error
from dicom_variants import ENCODINGS, IDENTIFYING_UIDS, blank, make_multiframe, make_series, remove

from hsam.cli import cohort
from hsam.cli import main
from hsam.volume import read_image, same_geometry
from hsam.volume.dicom_seg import read_sources
from hsam.volume.dicom_series import has_dicom_header, scan_series


@pytest.fixture(scope="module")
def sources(real_data) -> list[Path]:
    return sorted((real_data / "dcmqi" / "ct-3slice").glob("*.dcm"))


@pytest.fixture(scope="module")
def original(sources) -> sitk.Image:
    return read_image(sources[0].parent)


def read_warned(folder: Path) -> tuple[sitk.Image, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(folder)
    return image, [str(w.message) for w in caught]


def assert_same_volume(image: sitk.Image, original: sitk.Image) -> None:
    assert same_geometry(image, original, 1e-4), (image.GetSize(), image.GetOrigin(), image.GetSpacing())
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(original))


def test_the_anonymised_jpeg2000_export_of_the_issue_reads_as_one_volume(sources, original, tmp_path, capsys):
    """The regression: JPEG 2000 lossless, SOP Class/Instance, Study and Series UIDs and Series Number present but
    empty, the UIDs only in the file meta. It was "no DICOM series found"; GDCM, Slicer and dcm2niix read it."""
    folder = tmp_path / "anonymised"
    files = make_series(sources, folder, "jpeg2000", blank(*IDENTIFYING_UIDS, "SeriesNumber"))
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    assert header.SOPInstanceUID == "" and header.SeriesInstanceUID == "" and header.file_meta.MediaStorageSOPInstanceUID
    image, messages = read_warned(folder)
    assert_same_volume(image, original)
    [message] = messages
    assert "no Series Instance UID: grouped by folder (.), frame of reference, orientation and size" in message
    assert main(["series", str(folder)]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert len(out) == 3 and out[1].startswith("no-uid-") and out[1].endswith("picked") and " CT " in out[1], out
    assert "no Series Instance UID" in captured.err and captured.err.startswith("warning: no-uid-")
    [series] = scan_series(folder)
    assert series.modality == "CT"
    # and it segments again (the tiny H-SAM with random weights: the reading is under test, not the model)
    import slicer_headless  # noqa: F401  (puts HSAMSlicer/ on sys.path for HSAMSlicerLib.testing)
    from HSAMSlicerLib.testing import save_tiny_model

    assert main(["models", "import", str(save_tiny_model(tmp_path / "tiny-anon", name="tiny-anon"))]) == 0
    out = tmp_path / "organs.nii.gz"
    assert main(["segment", str(folder), "-o", str(out), "--model", "tiny-anon", "--device", "cpu", "-q"]) == 0
    assert same_geometry(sitk.ReadImage(str(out)), original, 1e-4)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_encoding_gdcm_reads_is_read_voxel_equal(encoding, sources, original, tmp_path):
    folder = tmp_path / encoding
    files = make_series(sources, folder, encoding)
    syntax = pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax != pydicom.dcmread(sources[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    image, messages = read_warned(folder)
    assert messages == []
    assert_same_volume(image, original)


@pytest.mark.parametrize("change", ["blank", "remove"])
def test_missing_series_uid_groups_by_folder_frame_of_reference_orientation_and_size(change, sources, original, tmp_path):
    """Without Series (and Study, SOP) UIDs: one series per folder; two folders of the same CT are two series."""
    alter = (blank if change == "blank" else remove)(*IDENTIFYING_UIDS, "SeriesNumber", "Modality")
    make_series(sources, tmp_path / "study" / "a", "rle", alter)
    make_series(sources[:2], tmp_path / "study" / "b", "native", alter)
    found = scan_series(tmp_path / "study")
    assert sorted(s.slices for s in found) == [2, 3]
    assert all(s.uid.startswith("no-uid-") and s.modality == "CT" and "grouped by folder" in s.note for s in found)
    image, messages = read_warned(tmp_path / "study")
    assert_same_volume(image, original)  # the 3-slice one is picked
    assert any("holds 2 DICOM series" in m for m in messages) and any("grouped by folder (a)" in m for m in messages)
    assert not cohort.is_cohort_source(tmp_path / "study")  # no Study UID at all: one study, not a cohort of two


def test_files_without_extension_shuffled_into_sub_folders_with_copies(sources, original, tmp_path, capsys):
    """One series scattered over sub-folders (names without extension) plus a second copy of it: one volume."""
    make_series(sources, tmp_path / "export", "jpeg-ls", shuffle_into=3, seed=1)
    make_series(sources, tmp_path / "export" / "again", "native", shuffle_into=2, seed=2)  # same UIDs, same slices
    (tmp_path / "export" / "README").write_text("not DICOM\n", encoding="utf-8")
    [series] = scan_series(tmp_path / "export")
    assert series.slices == 3 and "3 duplicate file(s)" in series.note and not series.problem
    image, messages = read_warned(tmp_path / "export")
    assert_same_volume(image, original)
    assert any("duplicate file(s) (same SOP Instance UID and position as another) ignored" in m for m in messages)


def test_duplicated_instance_uids_at_different_positions_stay_slices(sources, original, tmp_path):
    """An anonymiser that gave every file the same SOP Instance UID: still three slices (not copies of one)."""
    make_series(sources, tmp_path / "same", "native", lambda ds: setattr(ds, "SOPInstanceUID", "1.2.3.4"))
    image, _ = read_warned(tmp_path / "same")
    assert_same_volume(image, original)


def test_unreadable_files_are_listed_with_their_reason(sources, original, tmp_path, capsys):
    folder = tmp_path / "mixed"
    make_series(sources, folder)
    (folder / "broken").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f")  # header, then garbage
    truncated = folder / "cut"
    truncated.write_bytes(sources[0].read_bytes()[:600])  # header cut inside an element
    (folder / "notes.txt").write_text("hello\n", encoding="utf-8")
    found = scan_series(folder)
    by_uid = {s.uid: s for s in found}
    assert "unreadable-files" in by_uid and by_uid["unreadable-files"].slices == 2, found
    assert "cut and 1 more could not be read" in by_uid["unreadable-files"].problem or (
        "broken and 1 more could not be read" in by_uid["unreadable-files"].problem)
    image, _ = read_warned(folder)
    assert_same_volume(image, original)  # the good series is still read
    assert main(["series", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "unreadable-files" in out and "could not be read" in out


def test_no_dicom_found_only_when_no_file_has_a_dicom_header(sources, tmp_path, capsys):
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "a.txt").write_text("text\n", encoding="utf-8")
    one_line_error(lambda: read_image(tmp_path / "none"), "no DICOM series found", "none of its 1 files has a DICOM header")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "IM1").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 40)
    one_line_error(lambda: read_image(tmp_path / "bad"), "could not be read", "IM1")
    assert has_dicom_header(sources[0]) and not has_dicom_header(tmp_path / "none" / "a.txt")


def test_undecodable_pixel_data_is_named_in_the_listing(sources, tmp_path, capsys):
    folder = tmp_path / "cut pixels"
    make_series(sources, folder)
    for path in folder.iterdir():
        path.write_bytes(path.read_bytes()[:-200_000])  # header intact, pixel data short
    [series] = scan_series(folder)
    assert "pixel data cannot be read" in series.problem and "Little Endian" in series.problem
    one_line_error(lambda: read_image(folder), "pixel data cannot be read")
    assert main(["series", str(folder)]) == 1
    assert "pixel data cannot be read" in capsys.readouterr().out
    shutil.rmtree(folder)


def test_a_folder_of_studies_whose_files_are_named_by_uid_is_a_cohort(sources, tmp_path):
    """Exports name files by SOP Instance UID ("1.2.840....5": the "extension" is a number): still DICOM folders."""
    studies = tmp_path / "studies"
    for patient, study_uid in (("A", "1.2.826.0.1.3680043.8.498.4217.1"), ("B", "1.2.826.0.1.3680043.8.498.4217.2")):
        files = make_series(sources, studies / patient / "ct", "native",
                            lambda ds, uid=study_uid: setattr(ds, "StudyInstanceUID", uid))
        for path in files:
            path.rename(path.with_name(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)))
    assert all(p.suffix[1:].isdigit() for p in studies.rglob("*") if p.is_file())
    assert cohort.is_cohort_source(studies)
    assert [p.name for p in cohort.cohort_inputs(studies)] == ["A", "B"]


def test_one_multi_frame_enhanced_ct_reads_as_the_series(sources, original, tmp_path, capsys):
    """A Legacy Converted Enhanced CT (one file, a frame per slice) is the same volume; duplicate frames are refused."""
    make_multiframe(sources, tmp_path / "enhanced" / "IM1")
    [series] = scan_series(tmp_path / "enhanced")
    assert series.slices == 3 and series.frame_count == 3 and series.modality == "CT" and not series.problem
    image, _ = read_warned(tmp_path / "enhanced")
    canonical = sitk.DICOMOrient(image, "LPS")  # GDCM orders the frames as stored (here head first)
    assert_same_volume(canonical, sitk.DICOMOrient(original, "LPS"))
    assert main(["series", str(tmp_path / "enhanced")]) == 0 and "picked" in capsys.readouterr().out
    one_line_error(lambda: read_sources(series.files), "multi-frame", ".seg.nrrd")  # DICOM SEG over it: not yet
    ds = pydicom.dcmread(tmp_path / "enhanced" / "IM1")
    first = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0].ImagePositionPatient = first
    (tmp_path / "phases").mkdir()
    ds.save_as(tmp_path / "phases" / "IM1")
    [broken] = scan_series(tmp_path / "phases")
    assert "frames share positions" in broken.problem
