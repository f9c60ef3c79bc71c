"""Study folders: listing the series, picking the axial CT series to segment, --series, broken series, cohorts of studies.

The study is built from real CT: the GE series of ../shared/data/real/dcmqi (copied as is) and slices of the
TotalSegmentator CT written as further DICOM series of the same study (a thin and a thick reconstruction, a scout, a
coronal reformat, an MR series, and a broken series with duplicate slice positions).
"""

from __future__ import annotations

import locale
import shutil
import warnings
from pathlib import Path

import pydicom
import pytest
import SimpleITK as sitk
from conftest import one_line_error
from seg_validators import check_segs_under

from hsam.cli import cohort
from hsam.cli import main
from hsam.volume import read_image
from hsam.volume.dicom_series import pick_series, scan_series

import slicer_headless  # noqa: F401,E402  (puts HSAMSlicer/ on sys.path for HSAMSlicerLib.testing)

UID_ROOT = "1.2.826.0.1.3680043.8.498.4216"


def write_series(image: sitk.Image, folder: Path, uid: str, study_uid: str, number: int, description: str,
                 modality: str = "CT", image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
                 positions: list[tuple[float, float, float]] | None = None) -> None:
    """Write a 3-D image as a classic single-frame DICOM series (one file per slice)."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_series(image, folder, uid, study_uid, number, description, modality, image_type, positions)
    finally:  # ITK's GDCM writer leaves the process in the C locale: later tests would read UTF-8 text as ASCII
        locale.setlocale(locale.LC_ALL, saved)


def _write_series(image: sitk.Image, folder: Path, uid: str, study_uid: str, number: int, description: str,
                  modality: str, image_type: str, positions: list[tuple[float, float, float]] | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # the file names have no suffix to tell ITK the format
    d = image.GetDirection()
    for k in range(image.GetSize()[2]):
        position = positions[k] if positions else image.TransformIndexToPhysicalPoint((0, 0, k))
        slice_ = sitk.Cast(image[:, :, k], sitk.sitkInt16)
        tags = {
            "0008|0008": image_type, "0008|0060": modality, "0008|103e": description,
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": f"{uid}.{k + 1}", "0020|000d": study_uid, "0020|000e": uid, "0020|0011": str(number), "0020|0052": f"{study_uid}.1",
            "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0028|0030": f"{image.GetSpacing()[1]:.4f}\\{image.GetSpacing()[0]:.4f}",
        }  # fmt: skip
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{k:04d}"))  # no suffix, as many PACS exports name them
        writer.Execute(slice_)



@pytest.fixture(autouse=True)
def every_seg_written_validates(tmp_path):
    """After each test: every SEG it wrote passes dciodvfy and converts voxel-equal in dcmqi (Testing/seg_validators)."""
    yield
    check_segs_under(tmp_path)

@pytest.fixture(scope="module")
def study(real_data, tmp_path_factory) -> dict[str, str | Path]:
    """A study folder of 7 series (one sub-folder each, plus a stray text file); returns the folder and the UIDs."""
    root = tmp_path_factory.mktemp("studies") / "study one"
    shutil.copytree(real_data / "dcmqi" / "ct-3slice", root / "ge")
    study_uid = str(pydicom.dcmread(root / "ge" / "01.dcm", stop_before_pixels=True).StudyInstanceUID)
    ct = sitk.ReadImage(str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz"))
    ct = sitk.DICOMOrient(ct, "LPS")[:, :, :12]
    thin = sitk.Image(ct)
    thin.SetSpacing(ct.GetSpacing()[:2] + (1.5,))  # same slice count as the thick one, half the spacing
    coronal = sitk.GetImageFromArray(sitk.GetArrayFromImage(sitk.DICOMOrient(ct, "LPS")).transpose(1, 0, 2).copy())
    coronal.SetSpacing((3.0, 3.0, 3.0))
    coronal.SetDirection((1, 0, 0, 0, 0, -1, 0, 1, 0))  # rows along x, columns along -z, slices along y
    uids = {name: f"{UID_ROOT}.{i}" for i, name in enumerate(["thick", "thin", "scout", "coronal", "mr", "broken"], 1)}
    write_series(ct, root / "thick", uids["thick"], study_uid, 3, "Abdomen 3.0")
    write_series(thin, root / "thin", uids["thin"], study_uid, 4, "Abdomen 1.5")
    write_series(ct[:, :, :1], root / "scout", uids["scout"], study_uid, 1, "Topogram",
                 image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    write_series(coronal, root / "coronal", uids["coronal"], study_uid, 5, "Cor MPR", image_type="DERIVED\\SECONDARY")
    write_series(ct, root / "mr", uids["mr"], study_uid, 6, "T1", modality="MR")
    doubled = [ct.TransformIndexToPhysicalPoint((0, 0, min(k, 4))) for k in range(6)]  # slices 4 and 5 coincide
    write_series(ct[:, :, :6], root / "broken", uids["broken"], study_uid, 7, "two phases", positions=doubled)
    (root / "notes.txt").write_text("not DICOM\n", encoding="utf-8")
    uids["ge"] = str(pydicom.dcmread(root / "ge" / "01.dcm", stop_before_pixels=True).SeriesInstanceUID)
    return {"root": root, "study_uid": study_uid, **uids}


def test_scan_lists_every_series_and_picks_the_thin_axial_ct(study):
    found = scan_series(study["root"])
    by_uid = {s.uid: s for s in found}
    assert set(by_uid) == {study[n] for n in ("ge", "thick", "thin", "scout", "coronal", "mr", "broken")}
    assert [by_uid[study[n]].slices for n in ("ge", "thick", "thin", "scout", "coronal", "mr", "broken")] == [
        3, 12, 12, 1, 101, 12, 6]
    assert by_uid[study["thin"]].slice_spacing == pytest.approx(1.5)
    assert by_uid[study["thick"]].slice_spacing == pytest.approx(3.0)
    assert by_uid[study["scout"]].unsuitable() == "localizer/scout"
    assert "not axial" in by_uid[study["coronal"]].unsuitable()
    assert "MR modality" in by_uid[study["mr"]].unsuitable()
    assert "duplicate slice position" in by_uid[study["broken"]].problem
    assert by_uid[study["ge"]].unsuitable() == ""
    # the coronal reformat has the most slices but is not axial; thin and thick tie on slices: the smaller spacing wins
    assert pick_series(found).uid == study["thin"]


def test_read_image_says_which_series_and_series_uid_picks_another(study):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(study["root"])
    assert image.GetSize() == (122, 101, 12) and image.GetSpacing()[2] == pytest.approx(1.5)
    [message] = [str(w.message) for w in caught]
    assert "holds 7 DICOM series: using series #4 'Abdomen 1.5' (CT, 12 slices, 1.5 mm apart)" in message
    assert study["thin"] in message and "--series UID" in message
    thick = read_image(study["root"], series=study["thick"])
    assert thick.GetSize() == (122, 101, 12) and thick.GetSpacing()[2] == pytest.approx(3.0)
    ge = read_image(study["root"], series=study["ge"])
    assert ge.GetSize() == (512, 512, 3)
    one_line_error(lambda: read_image(study["root"], series=study["broken"]), "duplicate slice position")
    one_line_error(lambda: read_image(study["root"], series="1.2.3.4"), "no series 1.2.3.4", "hsam series")


def test_hsam_series_lists_them(study, capsys):
    assert main(["series", str(study["root"])]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in out[1:-1]}
    assert out[0].split()[:3] == ["series", "UID", "number"]
    assert rows[study["thin"]].endswith("picked") and "Abdomen 1.5" in rows[study["thin"]]
    assert rows[study["scout"]].endswith("localizer/scout")
    assert rows[study["mr"]].endswith("MR modality, not CT")
    assert "duplicate slice position" in rows[study["broken"]]
    assert out[-1].startswith(f"hsam segment {study['root']} picks series {study['thin']}")


def test_a_folder_without_a_usable_series_says_why(study, tmp_path, capsys):
    shutil.copytree(Path(study["root"]) / "scout", tmp_path / "only scout")
    one_line_error(lambda: read_image(tmp_path / "only scout"), "no series", "localizer/scout")
    assert main(["series", str(tmp_path / "only scout")]) == 1
    assert "no series can be segmented" in capsys.readouterr().out


def write_two_studies(studies: Path, study: dict, real_data: Path, uid_base: int) -> None:
    """A folder of two studies: patient A, the real GE CT series; patient B, a 6-slice CT series and a one-slice
    scout (series UIDs ``<root>.<uid_base>1`` and ``<root>.<uid_base>2``, study ``<root>.<uid_base>0``)."""
    shutil.copytree(Path(study["root"]) / "ge", studies / "patient A" / "CT")
    ct = sitk.DICOMOrient(sitk.ReadImage(str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz")), "LPS")
    root = f"{UID_ROOT}.{uid_base}"
    write_series(ct[:, :, :6], studies / "patient B" / "s1", f"{root}1", f"{root}0", 2, "Abdomen")
    write_series(ct[:, :, :1], studies / "patient B" / "s0", f"{root}2", f"{root}0", 1, "Scout",
                 image_type="ORIGINAL\\PRIMARY\\LOCALIZER")


def test_one_study_is_one_input_and_a_folder_of_studies_is_a_cohort(study, real_data, tmp_path):
    assert not cohort.is_cohort_source(study["root"])  # series sub-folders of one study: pick one of them
    studies = tmp_path / "studies"
    write_two_studies(studies, study, real_data, uid_base=2)
    assert cohort.is_cohort_source(studies)
    assert [p.name for p in cohort.cohort_inputs(studies)] == ["patient A", "patient B"]


def test_segment_refuses_series_for_a_file_or_a_cohort(real_data, tmp_path, capsys):
    code = main(["segment", str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz"), "-o",
                 str(tmp_path / "x.nii.gz"), "--series", "1.2.3"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--series picks a series of a DICOM folder" in err, err


@pytest.fixture()
def tiny_model(tmp_path_factory) -> str:
    """The real tiny H-SAM network with seeded random weights, installed as ``tiny-dicom``."""
    from HSAMSlicerLib.testing import save_tiny_model

    folder = save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-dicom", name="tiny-dicom")
    assert main(["models", "import", str(folder)]) == 0
    return "tiny-dicom"


def test_segment_a_study_and_a_cohort_of_studies(study, real_data, tiny_model, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "one.nii.gz"
    assert main(["segment", str(study["root"]), "-o", str(out), "--model", tiny_model, "--device", "cpu", "-q"]) == 0
    err = capsys.readouterr().err
    assert "warning: study one holds 7 DICOM series: using series #4 'Abdomen 1.5'" in err, err
    assert sitk.ReadImage(str(out)).GetSize() == (122, 101, 12)
    assert sitk.ReadImage(str(out)).GetSpacing()[2] == pytest.approx(1.5)

    studies = tmp_path / "studies"
    write_two_studies(studies, study, real_data, uid_base=3)
    (studies / "patient C").mkdir()  # a study of only a broken file: one line, the run goes on
    (studies / "patient C" / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 40)
    code = main(["segment", str(studies), "-o", str(tmp_path / "out"), "--model", tiny_model, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1, err  # patient C failed
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["patient A.nii.gz", "patient B.nii.gz"]
    assert "patient B holds 2 DICOM series: using series #2 'Abdomen' (CT, 6 slices, 3 mm apart)" in err, err
    assert "[3/3] patient C: error: no series in" in err and "IM0001.dcm could not be read" in err, err
    assert sitk.ReadImage(str(tmp_path / "out" / "patient B.nii.gz")).GetSize() == (122, 101, 6)
    # DICOM SEG per study: each references the series picked in its study (patient B: the 6-slice CT, not the scout)
    code = main(["segment", str(studies), "-o", str(tmp_path / "seg"), "--suffix", ".dcm", "--model", tiny_model,
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1, err  # patient C again
    for name, series_uid in (("patient A", study["ge"]), ("patient B", f"{UID_ROOT}.31")):
        assert (tmp_path / "seg" / f"{name}.dcm").is_file(), err
        seg = pydicom.dcmread(tmp_path / "seg" / f"{name}.dcm")
        assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
