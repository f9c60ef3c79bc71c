"""DICOM SEG out and in, on the real GE CT series and its dcmqi DICOM SEG (../shared/data/real/dcmqi).

Round trip labels -> DICOM SEG -> labels is exact; the written file references every real source instance, carries the
source's patient and study, lies on the source's slices, and passes dciodvfy (Debian's dicom3tools) when installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import needs_litemedsam, one_line_error
from seg_validators import check_segs_under

from hsam import labels as label_table
from hsam.cli import main
from hsam.errors import HSAMError
from hsam.volume import read_image, read_labels, same_geometry
from hsam.volume.dicom_seg import Algorithm, SegOptions, organ_of_name, read_dicom_seg, write_dicom_seg
from hsam.volume.dicom_series import choose_series

ALGORITHM = Algorithm("hsam-test-model", "0.1.0", "0123456789abcdef" * 4)



@pytest.fixture(autouse=True)
def every_seg_written_validates(tmp_path):
    """After each test: every SEG it wrote passes dciodvfy and converts voxel-equal in dcmqi (Testing/seg_validators)."""
    yield
    check_segs_under(tmp_path)

@pytest.fixture(scope="module")
def dcmqi(real_data) -> Path:
    return real_data / "dcmqi"


@pytest.fixture(scope="module")
def ct(dcmqi) -> sitk.Image:
    return read_image(dcmqi / "ct-3slice")


@pytest.fixture(scope="module")
def source_files(dcmqi) -> list[Path]:
    return choose_series(dcmqi / "ct-3slice")[0].files


def all_organs(ct: sitk.Image, dcmqi: Path) -> sitk.Image:
    """H-SAM labels on the CT grid: the real liver of liver_seg.nrrd plus a block of each other organ."""
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(dcmqi / "liver_seg.nrrd")))
    array = np.where(liver == 1, 5, 0).astype(np.uint8)
    for index in (1, 2, 3, 4, 6, 7, 8):
        array[index % 3, 20 * index : 20 * index + 15, 400:430] = index  # left kidney etc. on some slices only
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ct)
    return image


def test_dcmqi_seg_reads_as_the_liver_of_its_nrrd(dcmqi, ct):
    """A SEG written by another tool (dcmqi, retired SRT codes) matches the liver by code, on the CT grid."""
    labels = read_labels(dcmqi / "liver.dcm", reference=ct)
    nrrd = sitk.GetArrayFromImage(sitk.ReadImage(str(dcmqi / "liver_seg.nrrd")))
    assert same_geometry(labels, ct, 1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(labels), np.where(nrrd == 1, 5, 0))
    assert (nrrd == 1).sum() == 107098
    own = read_dicom_seg(dcmqi / "liver.dcm")  # without a reference: the grid its frames span, here the CT's
    assert same_geometry(own, ct, 1e-4)


def test_round_trip_is_exact_and_geometry_equals_the_source(ct, dcmqi, source_files, tmp_path):
    labels = all_organs(ct, dcmqi)
    out = write_dicom_seg(labels, tmp_path / "organs.dcm", source_files, ALGORITHM)
    back = read_labels(out, reference=ct)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))
    own = read_dicom_seg(out)  # every slice holds an organ, so the SEG's own grid is the CT's
    assert same_geometry(own, ct, 1e-4) and np.array_equal(sitk.GetArrayFromImage(own), sitk.GetArrayFromImage(labels))
    seg = pydicom.dcmread(out)
    shared = seg.SharedFunctionalGroupsSequence[0]
    source = pydicom.dcmread(source_files[0], stop_before_pixels=True)
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == pytest.approx(
        [float(v) for v in source.ImageOrientationPatient])
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx(
        [float(v) for v in source.PixelSpacing])
    source_positions = {tuple(round(float(v), 3) for v in pydicom.dcmread(f).ImagePositionPatient) for f in source_files}
    frame_positions = {tuple(round(float(v), 3) for v in frame.PlanePositionSequence[0].ImagePositionPatient)
                       for frame in seg.PerFrameFunctionalGroupsSequence}
    assert frame_positions == source_positions
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)


def test_references_patient_study_segments_and_algorithm(ct, dcmqi, source_files, tmp_path):
    out = write_dicom_seg(all_organs(ct, dcmqi), tmp_path / "organs.dcm", source_files, ALGORITHM)
    seg = pydicom.dcmread(out)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        s.SOPInstanceUID for s in sources}
    assert len(sources) == 3
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "AccessionNumber", "StudyID", "FrameOfReferenceUID"):
        assert seg.get(keyword) == sources[0].get(keyword), keyword
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert seg.SOPInstanceUID not in {s.SOPInstanceUID for s in sources}
    assert seg.SeriesNumber == int(sources[0].SeriesNumber) + 1000
    segments = list(seg.SegmentSequence)
    assert [s.SegmentLabel for s in segments] == [o.display_name for o in label_table.ORGANS]
    assert [s.SegmentNumber for s in segments] == list(range(1, 9))
    for item, organ in zip(segments, label_table.ORGANS):
        code = item.SegmentedPropertyTypeCodeSequence[0]
        assert (code.CodingSchemeDesignator, code.CodeValue, code.CodeMeaning) == organ.type_code
        modifiers = code.get("SegmentedPropertyTypeModifierCodeSequence", [])
        assert [(m.CodingSchemeDesignator, m.CodeValue) for m in modifiers] == (
            [organ.modifier_code[:2]] if organ.modifier_code != label_table.NO_CODE else [])
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("hsam-test-model", "0.1.0")
        assert ALGORITHM.weights_sha256 in algorithm.AlgorithmParameters
        import highdicom as hd

        rgb = hd.color.CIELabColor.from_dicom_value(tuple(item.RecommendedDisplayCIELabValue)).to_rgb()
        assert np.abs(np.array(rgb, dtype=int) - organ.rgb).max() <= 1, (organ.name, rgb)
    # highdicom reads its own output back as a Segmentation with the same segments
    import highdicom as hd

    parsed = hd.seg.segread(out)
    assert parsed.number_of_segments == 8


def test_only_organs_found_become_segments(ct, dcmqi, source_files, tmp_path):
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(dcmqi / "liver_seg.nrrd")))
    labels = sitk.GetImageFromArray(np.where(liver == 1, 5, 0).astype(np.uint8))
    labels.CopyInformation(ct)
    seg = pydicom.dcmread(write_dicom_seg(labels, tmp_path / "liver.dcm", source_files, ALGORITHM))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver"]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed (apt-get install dicom3tools)")
def test_written_seg_passes_dciodvfy(ct, dcmqi, source_files, tmp_path):
    out = write_dicom_seg(all_organs(ct, dcmqi), tmp_path / "organs.dcm", source_files, ALGORITHM)
    report = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, timeout=60)
    text = report.stdout + report.stderr
    assert "Segmentation" in text, text  # it recognised the IOD
    assert not [line for line in text.splitlines() if line.startswith("Error")], text
    # the only warning is about the source's own patient name ("JANCT000"), carried over unchanged
    warnings = [line for line in text.splitlines() if line.startswith("Warning")]
    assert all("Patient's Name" in line for line in warnings), warnings


def test_labels_off_the_source_grid_or_empty_are_refused_and_keep_the_previous_file(ct, dcmqi, source_files, tmp_path):
    out = tmp_path / "organs.dcm"
    out.write_bytes(b"previous result")
    shifted = all_organs(ct, dcmqi)
    shifted.SetOrigin((0.0, 0.0, 0.0))
    one_line_error(lambda: write_dicom_seg(shifted, out, source_files, ALGORITHM), "off the label grid")
    cropped = all_organs(ct, dcmqi)[:, :, :2]  # the third source slice lies beyond the labels
    one_line_error(lambda: write_dicom_seg(cropped, out, source_files, ALGORITHM), "off the label grid")
    missing = source_files[:2]  # a slice of the series is missing
    one_line_error(lambda: write_dicom_seg(all_organs(ct, dcmqi), out, missing, ALGORITHM), "2 slices for 3 label slices")
    small = sitk.Image(256, 256, 3, sitk.sitkUInt8)
    one_line_error(lambda: write_dicom_seg(small, out, source_files, ALGORITHM), "not on the grid of the source")
    empty = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(ct)
    one_line_error(lambda: write_dicom_seg(empty, out, source_files, ALGORITHM), "no organ was found")
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["organs.dcm"]  # no temp file left


def test_reading_bad_dicom_seg_inputs_gives_one_line(dcmqi, ct, tmp_path):
    one_line_error(lambda: read_labels(dcmqi / "ct-3slice" / "01.dcm"), "is not a DICOM SEG")
    other = pydicom.dcmread(dcmqi / "liver.dcm")
    item = other.SegmentSequence[0]
    item.SegmentLabel = "Heart"
    item.SegmentedPropertyTypeCodeSequence[0].CodeValue = "T-32000"
    item.SegmentedPropertyTypeCodeSequence[0].CodeMeaning = "Heart"
    other.save_as(tmp_path / "heart.dcm")
    one_line_error(lambda: read_labels(tmp_path / "heart.dcm", reference=ct), "no segment of an H-SAM organ", "Heart")
    small = sitk.Image(256, 256, 3, sitk.sitkUInt8)  # a coarser grid over the same place
    small.SetSpacing([2 * s for s in ct.GetSpacing()[:2]] + [ct.GetSpacing()[2]])
    small.SetOrigin(ct.GetOrigin())
    small.SetDirection(ct.GetDirection())
    one_line_error(lambda: read_labels(dcmqi / "liver.dcm", reference=small), "does not lie on the grid")
    one_line_error(lambda: read_labels(dcmqi / "liver.dcm", reference=ct[:, :, :2]), "does not lie on the grid")
    (tmp_path / "broken.dcm").write_bytes((dcmqi / "liver.dcm").read_bytes()[:3000])
    one_line_error(lambda: read_labels(tmp_path / "broken.dcm", reference=ct), "broken.dcm")


def test_segments_match_by_code_before_name_and_names_alone(dcmqi, tmp_path, ct):
    seg = pydicom.dcmread(dcmqi / "liver.dcm")
    seg.SegmentSequence[0].SegmentLabel = "spleen"  # the code (SRT T-62000 = SCT 10200004 liver) wins
    seg.save_as(tmp_path / "coded.dcm")
    assert set(np.unique(sitk.GetArrayFromImage(read_labels(tmp_path / "coded.dcm", reference=ct)))) == {0, 5}
    del seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue  # no usable code: the name decides
    seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator = "99LOCAL"
    seg.save_as(tmp_path / "named.dcm")
    assert set(np.unique(sitk.GetArrayFromImage(read_labels(tmp_path / "named.dcm", reference=ct)))) == {0, 1}
    assert [organ_of_name(n) for n in ("Right Kidney", "kidney_left", "Gallbladder", "left-kidney", "heart")] == [
        2, 3, 4, 3, None]


def test_evaluate_against_a_dicom_seg_reference(dcmqi, ct, source_files, tmp_path, capsys):
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(dcmqi / "liver_seg.nrrd")))
    prediction = sitk.GetImageFromArray(np.where(liver == 1, 5, 0).astype(np.uint8))
    prediction.CopyInformation(ct)
    sitk.WriteImage(prediction, str(tmp_path / "case.nii.gz"))
    assert main(["evaluate", "--pred", str(tmp_path / "case.nii.gz"), "--ref", str(dcmqi / "liver.dcm"),
                 "-o", str(tmp_path / "report.csv")]) == 0
    out = capsys.readouterr().out
    assert "| liver | 1.0000" in out, out
    # a DICOM SEG prediction against the dcmqi SEG (both on the grid their frames span); folders of SEGs pair by name
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    write_dicom_seg(prediction, tmp_path / "pred" / "case.dcm", source_files, ALGORITHM)
    shutil.copy(dcmqi / "liver.dcm", tmp_path / "ref" / "case.dcm")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                 "-o", str(tmp_path / "report2.csv")]) == 0
    assert "| liver | 1.0000" in capsys.readouterr().out
    code = main(["evaluate", "--pred", str(tmp_path / "case.nii.gz"), "--ref", str(dcmqi / "liver.dcm"),
                 "--label-map", "btcv", "-o", str(tmp_path / "report3.csv")])
    assert code == 2 and "drop --label-map" in capsys.readouterr().err


def test_finetune_cases_take_a_dicom_folder_and_a_dicom_seg(dcmqi, tmp_path):
    from hsam.training.data import load_cases

    case = tmp_path / "cases" / "case01"
    shutil.copytree(dcmqi / "ct-3slice", case / "image")
    shutil.copy(dcmqi / "liver.dcm", case / "labels.dcm")
    (case / "provenance.json").write_text("{}", encoding="utf-8")
    [volume] = load_cases(tmp_path / "cases", window=(-125, 275), orientation="LPS")
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(dcmqi / "liver_seg.nrrd")))
    assert volume.label.shape == liver.shape
    assert np.array_equal(volume.label, np.where(liver == 1, 5, 0))


def test_non_dicom_input_with_dcm_output_is_one_clear_error(real_data, tmp_path, capsys):
    code = main(["segment", str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz"), "-o", str(tmp_path / "x.dcm")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "needs a DICOM folder as input" in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@needs_litemedsam
def test_segment_dicom_folder_to_dicom_seg_end_to_end(dcmqi, ct, tmp_path, capsys):
    """The bundled demo model on the real 3-slice series: a SEG over the source, read back equal to a NIfTI run."""
    out = tmp_path / "result.dcm"
    argv = ["segment", str(dcmqi / "ct-3slice"), "--model", "hsam-lite-demo", "--device", "cpu", "-q", "--mode", "eager"]
    assert main(argv + ["-o", str(out)]) == 0, capsys.readouterr().err
    assert main(argv + ["-o", str(tmp_path / "result.nii.gz")]) == 0
    nifti = sitk.GetArrayFromImage(read_labels(tmp_path / "result.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(read_labels(out, reference=ct)), nifti)
    seg = pydicom.dcmread(out)
    assert {s.SegmentLabel for s in seg.SegmentSequence} == {
        label_table.organ(int(v)).display_name for v in np.unique(nifti) if v}
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    from hsam.model.checkpoint import read_card
    from hsam.weights.store import resolve_model

    card = read_card(resolve_model("hsam-lite-demo")[1])
    assert algorithm.AlgorithmName == "hsam-lite-demo" and card.sha256 in algorithm.AlgorithmParameters


def test_reads_a_label_map_segmentation_written_by_highdicom(ct, dcmqi, source_files, tmp_path):
    """DICOM 2024's Label Map Segmentation (one frame per slice, pixel = segment number), as highdicom writes it."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    labels = all_organs(ct, dcmqi)
    array = sitk.GetArrayFromImage(labels)
    sources = [pydicom.dcmread(f) for f in source_files]
    order = [int(round(ct.TransformPhysicalPointToContinuousIndex([float(v) for v in s.ImagePositionPatient])[2]))
             for s in sources]
    organs = [label_table.organ(i) for i in (5, 1)]  # segment 1 = liver, 2 = spleen: numbers differ from H-SAM's
    relabelled = np.zeros_like(array)
    for number, organ in enumerate(organs, start=1):
        relabelled[array == organ.index] = number
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=o.display_name,
        segmented_property_category=hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept(o.type_code[1], "SCT", o.type_code[2]),
        algorithm_type="MANUAL") for n, o in enumerate(organs, start=1)]  # fmt: skip
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.stack([relabelled[k] for k in order]),
        segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP, segment_descriptions=descriptions,
        series_instance_uid=generate_uid(), series_number=9, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="1", device_serial_number="1",
        specific_character_set=None)  # fmt: skip
    seg.save_as(tmp_path / "labelmap.dcm")
    assert pydicom.dcmread(tmp_path / "labelmap.dcm").SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    back = sitk.GetArrayFromImage(read_labels(tmp_path / "labelmap.dcm", reference=ct))
    assert np.array_equal(back, np.where(np.isin(array, (1, 5)), array, 0))


# ------------------------------------------------------------------------------ issue 29: SEGs that validate or are refused
def anonymised_copy(dcmqi: Path, folder: Path, change) -> Path:  # noqa: ANN001 (a change of dicom_variants)
    from dicom_variants import make_series

    make_series(sorted((dcmqi / "ct-3slice").glob("*.dcm")), folder, "native", change)
    return folder


def no_instance_uids(ds: pydicom.Dataset) -> None:
    """SOP Instance UID empty in the data set and in the file meta: nothing left to reference."""
    ds.SOPInstanceUID = ""
    ds.file_meta.MediaStorageSOPInstanceUID = ""


@pytest.mark.parametrize("case, change, reason", [
    ("no SOP Instance UIDs", no_instance_uids, "no SOP Instance UID in 3 of 3 files"),
    ("no Study UID", lambda ds: setattr(ds, "StudyInstanceUID", ""), "no Study Instance UID"),
    ("the issue's export", lambda ds: [setattr(ds, k, "") for k in ("SOPClassUID", "SOPInstanceUID",
                                       "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber")],
     "no Study Instance UID; no Series Instance UID"),
    ("duplicated SOP Instance UIDs", lambda ds: setattr(ds, "SOPInstanceUID", "1.2.3.4"), "2 duplicate SOP Instance"),
])  # fmt: skip
def test_a_source_that_cannot_be_referenced_is_refused_with_one_line(case, change, reason, dcmqi, ct, tmp_path):
    folder = anonymised_copy(dcmqi, tmp_path / "anonymised", change)
    files = choose_series(folder)[0].files
    message = one_line_error(lambda: write_dicom_seg(all_organs(ct, dcmqi), tmp_path / "out.dcm", files, ALGORITHM),
                             "cannot write a DICOM SEG", reason, ".seg.nrrd or .nii.gz", "--dicom-new-uids")
    assert not (tmp_path / "out.dcm").exists(), message
    # with --dicom-new-uids the SEG is written, says so, and validates (the autouse check runs dciodvfy and dcmqi)
    out = write_dicom_seg(all_organs(ct, dcmqi), tmp_path / "new.dcm", files, ALGORITHM,
                          options=SegOptions(new_uids=True))
    seg = pydicom.dcmread(out)
    assert "--dicom-new-uids made up new" in seg.ImageComments and reason.split(";")[0] in seg.ImageComments
    references = [i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    assert len(set(references)) == 3 and all(references) and seg.StudyInstanceUID


def test_the_cli_refuses_before_segmenting_and_leaves_no_file(dcmqi, tmp_path, capsys):
    folder = anonymised_copy(dcmqi, tmp_path / "anonymised", no_instance_uids)
    code = main(["segment", str(folder), "-o", str(tmp_path / "out.dcm"), "--model", "no-such-model"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "no SOP Instance UID in 3 of 3 files" in errors[0], err
    assert "no-such-model" not in err  # refused before the model is even looked up
    assert not (tmp_path / "out.dcm").exists()
    code = main(["segment", str(dcmqi / "ct-3slice"), "-o", str(tmp_path / "x.dcm"), "--dicom-compress", "rle"])
    assert code == 2 and "needs --dicom-seg-type labelmap" in capsys.readouterr().err


def test_uids_kept_only_in_the_file_meta_are_referenced(dcmqi, ct, source_files, tmp_path):
    """SOP Class and Instance UIDs emptied in the data set but kept in the file meta: the SEG references those."""
    folder = anonymised_copy(dcmqi, tmp_path / "meta only", lambda ds: [setattr(ds, k, "") for k in ("SOPClassUID",
                                                                                                   "SOPInstanceUID")])
    out = write_dicom_seg(all_organs(ct, dcmqi), tmp_path / "organs.dcm", choose_series(folder)[0].files, ALGORITHM)
    referenced = pydicom.dcmread(out).ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert {i.ReferencedSOPInstanceUID for i in referenced} == {
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in source_files}
    assert {i.ReferencedSOPClassUID for i in referenced} == {"1.2.840.10008.5.1.4.1.1.2"}


def test_the_seg_names_its_creator_model_revision_demo_and_the_organs_not_found(ct, dcmqi, source_files, tmp_path):
    from hsam.volume.dicom_seg import algorithm_version

    demo = Algorithm("hsam-lite-demo", algorithm_version("hsam-lite-demo", "ab" * 32), "ab" * 32, demo=True)
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(dcmqi / "liver_seg.nrrd")))
    array = np.where(liver == 1, 5, 0).astype(np.uint8)
    array[1, 10:13, 10:13] = 1  # a 9-voxel speck of "spleen"
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(ct)
    seg = pydicom.dcmread(write_dicom_seg(labels, tmp_path / "demo.dcm", source_files, demo, organs=[1, 4, 5]))
    assert seg.ContentCreatorName == "HSAMSlicer^"
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == "hsam-lite-demo sha256:abababababab"
    assert seg.SeriesDescription == "H-SAM organs, demo model, not for clinical use"
    assert seg.ContentDescription == "H-SAM 2 of 3 organs found, demo model, not for clinical use"
    assert "Demo model, not for clinical use." in seg.ImageComments
    assert "Organs looked for: spleen, gallbladder, liver. Found: spleen, liver. Not found: gallbladder." in (
        seg.ImageComments)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["spleen", "liver"]  # the speck stays by default
    kept = pydicom.dcmread(write_dicom_seg(labels, tmp_path / "specks.dcm", source_files, demo, organs=[1, 4, 5],
                                           options=SegOptions(min_voxels=10)))
    assert [s.SegmentLabel for s in kept.SegmentSequence] == ["liver"]
    assert "left out as smaller than 10 voxels (--dicom-min-voxels): spleen (9 voxels)" in kept.ImageComments
    plain = pydicom.dcmread(write_dicom_seg(labels, tmp_path / "plain.dcm", source_files, ALGORITHM))
    assert "demo" not in plain.SeriesDescription + plain.ContentDescription + plain.ImageComments
    assert "Not found: right kidney, left kidney, gallbladder, stomach, aorta, pancreas." in plain.ImageComments


@pytest.mark.parametrize("seg_type, compress", [("binary", "deflate"), ("labelmap", "none"), ("labelmap", "rle"),
                                                ("labelmap", "deflate")])
def test_each_encoding_round_trips_in_hsam_and_highdicom(seg_type, compress, ct, dcmqi, source_files, tmp_path):
    """The optional encodings: exact in hsam's reader and highdicom's; dcmqi and dciodvfy run in the autouse check."""
    import highdicom as hd

    labels = all_organs(ct, dcmqi)
    out = write_dicom_seg(labels, tmp_path / f"{seg_type}-{compress}.dcm", source_files, ALGORITHM,
                          options=SegOptions(seg_type=seg_type, compress=compress))
    assert np.array_equal(sitk.GetArrayFromImage(read_labels(out, reference=ct)), sitk.GetArrayFromImage(labels))
    ds = pydicom.dcmread(out)
    syntax = {"none": pydicom.uid.ExplicitVRLittleEndian, "rle": pydicom.uid.RLELossless,
              "deflate": pydicom.uid.DeflatedExplicitVRLittleEndian}[compress]
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert ds.SOPClassUID == {"binary": "1.2.840.10008.5.1.4.1.1.66.4", "labelmap": "1.2.840.10008.5.1.4.1.1.66.7"}[
        seg_type]
    parsed = hd.seg.segread(out)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
    pixels = parsed.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources], combine_segments=True)
    slices = [int(round(ct.TransformPhysicalPointToContinuousIndex([float(v) for v in s.ImagePositionPatient])[2]))
              for s in sources]
    # all eight organs are present, so segment n is H-SAM organ n
    assert np.array_equal(pixels, sitk.GetArrayFromImage(labels)[slices])


def test_the_validators_catch_a_seg_that_does_not_conform(ct, dcmqi, source_files, tmp_path):
    """The check is real: a SEG with empty references (what the issue's blank-UID case wrote) fails dciodvfy."""
    from seg_validators import dciodvfy_errors

    out = write_dicom_seg(all_organs(ct, dcmqi), tmp_path / "organs.dcm", source_files, ALGORITHM)
    seg = pydicom.dcmread(out)
    for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence:
        item.ReferencedSOPInstanceUID = ""
    seg.Manufacturer = "not hsam"  # keeps the autouse check off this deliberately broken copy
    seg.save_as(tmp_path / "broken.dcm")
    errors = dciodvfy_errors(tmp_path / "broken.dcm", tmp_path)
    if errors is None:
        pytest.skip("dciodvfy not installed (.ci/install-validators.sh installs it)")
    assert any("Element=<ReferencedSOPInstanceUID>" in e for e in errors), errors


def test_the_cli_options_reach_the_seg(dcmqi, tmp_path, capsys):
    """`hsam segment` on the issue's anonymised export: refused as .dcm, then written with --dicom-new-uids as a
    LABELMAP with RLE, naming the model's revision (the tiny H-SAM with random weights: the wiring is under test)."""
    import slicer_headless  # noqa: F401  (puts HSAMSlicer/ on sys.path for HSAMSlicerLib.testing)
    from HSAMSlicerLib.testing import save_tiny_model

    from hsam.model.checkpoint import read_card

    folder = save_tiny_model(tmp_path / "tiny-seg", name="tiny-seg")
    assert main(["models", "import", str(folder)]) == 0
    export = anonymised_copy(dcmqi, tmp_path / "export", lambda ds: [setattr(ds, k, "") for k in (
        "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber")])
    argv = ["segment", str(export), "--model", "tiny-seg", "--device", "cpu", "-q"]
    capsys.readouterr()
    assert main(argv + ["-o", str(tmp_path / "refused.dcm")]) == 2
    assert "no Study Instance UID; no Series Instance UID" in capsys.readouterr().err
    out = tmp_path / "organs.dcm"
    assert main(argv + ["-o", str(out), "--dicom-new-uids", "--dicom-seg-type", "labelmap", "--dicom-compress", "rle"]) == 0
    seg = pydicom.dcmread(out)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7" and seg.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    assert "--dicom-new-uids made up new study, series, frame of reference" not in seg.ImageComments  # FoR was kept
    assert "--dicom-new-uids made up new study, series UIDs" in seg.ImageComments
    sha = read_card(folder).sha256
    algorithm = next(s for s in seg.SegmentSequence if int(s.SegmentNumber)).SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == f"tiny-seg sha256:{sha[:12]}"
    assert "demo model, not for clinical use" in seg.SeriesDescription  # the tiny model's card says demo
