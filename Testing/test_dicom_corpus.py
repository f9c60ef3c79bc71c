"""Corpus sweep (issue 29): every CT/MR image file that ships in pydicom's wheel, and the real DICOM of shared data
with its UIDs blanked, removed and duplicated, renamed without extension and shuffled into sub-folders.

Each case either segments (the tiny H-SAM with random weights: the reading is under test, not the model) or gives
exactly one ``error:`` line naming the problem; ``hsam series`` lists it; and where SimpleITK's GDCM series reader
and dcm2niix read it, the volume hsam reads has their size, spacing, origin, direction and voxels.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_variants import IDENTIFYING_UIDS, blank, make_multiframe, make_series, remove

from hsam.cli import main
from hsam.errors import HSAMError
from hsam.volume import read_image

IMAGE_CLASSES = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"}  # CT and MR Image Storage
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
# (case, reader) pairs whose voxels differ from hsam's for a reason found and checked by hand
KNOWN_DISAGREEMENTS = {
    ("pydicom-J2K_pixelrep_mismatch", "dcm2niix"):
        "the header says signed 13-bit, the JPEG 2000 stream unsigned: dcm2niix gives 6192 for the -2000 padding "
        "that GDCM (hsam) and pydicom's pixel_array both give",
}  # fmt: skip


def pydicom_ct_mr_files() -> list[Path]:
    """The CT and MR image files bundled in the installed pydicom wheel (none is downloaded)."""
    found = []
    for path in sorted(PYDICOM_FILES.glob("*.dcm")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        if str(header.get("SOPClassUID", "")) in IMAGE_CLASSES or header.get("Modality") in ("CT", "MR"):
            found.append(path)
    return found


def shared_variants(sources: list[Path], root: Path) -> dict[str, Path]:
    """The real GE series as anonymisers and exports write it; one folder (a study) per variant."""
    everything = (*IDENTIFYING_UIDS, "SeriesNumber")
    made = {
        "shuffled": dict(encoding="native", shuffle_into=3, seed=3),
        "uids-blanked-jpeg2000": dict(encoding="jpeg2000", change=blank(*everything)),
        "uids-removed-rle": dict(encoding="rle", change=remove(*everything, "Modality")),
        "instance-uid-duplicated-deflate": dict(encoding="deflate",
                                                change=lambda ds: setattr(ds, "SOPInstanceUID", "1.2.3.4")),
        "big-endian-shuffled": dict(encoding="big-endian", shuffle_into=2, seed=4),
        "jpeg-lossless-series-uid-duplicated": dict(encoding="jpeg-lossless"),
    }
    folders = {}
    for name, options in made.items():
        folders[name] = root / name
        make_series(sources, folders[name] / "series", **options)
    # a second series (another SOP/series identity, the same Series Instance UID): a copy one slice shorter
    again = root / "jpeg-lossless-series-uid-duplicated" / "copy"
    make_series(sources[:2], again, "native", lambda ds: setattr(ds, "SOPInstanceUID", ds.SOPInstanceUID + ".9"))
    folders["legacy-enhanced-ct-multiframe"] = root / "legacy-enhanced-ct-multiframe"
    make_multiframe(sources, folders["legacy-enhanced-ct-multiframe"] / "series" / "MF0001")
    folders["seg-only"] = root / "seg-only"
    folders["seg-only"].mkdir()
    shutil.copy(sources[0].parent.parent / "liver.dcm", folders["seg-only"] / "SEG0001")
    return folders


@pytest.fixture(scope="module")
def corpus(real_data, tmp_path_factory) -> dict[str, Path]:
    """Every case as a folder: pydicom's files one per folder (renamed without extension, one level down)."""
    root = tmp_path_factory.mktemp("corpus")
    cases = {}
    for path in pydicom_ct_mr_files():
        folder = root / f"pydicom-{path.stem}"
        (folder / "sub").mkdir(parents=True)
        shutil.copy(path, folder / "sub" / "IM000001")
        cases[folder.name] = folder
    sources = sorted((real_data / "dcmqi" / "ct-3slice").glob("*.dcm"))
    cases.update(shared_variants(sources, root))
    return cases


@pytest.fixture()
def tiny_model(tmp_path_factory) -> str:
    import slicer_headless  # noqa: F401  (puts HSAMSlicer/ on sys.path for HSAMSlicerLib.testing)
    from HSAMSlicerLib.testing import save_tiny_model

    folder = save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-corpus", name="tiny-corpus")
    assert main(["models", "import", str(folder)]) == 0
    return "tiny-corpus"


def canonical(image: sitk.Image) -> sitk.Image:
    """The same voxels in LPS axis order (readers differ in which axes they flip, not in what they put where)."""
    return sitk.DICOMOrient(image, "LPS")


def assert_same_volume(ours: sitk.Image, theirs: sitk.Image, who: str) -> None:
    a, b = canonical(ours), canonical(sitk.Cast(theirs, ours.GetPixelID()) if theirs.GetPixelID() != ours.GetPixelID()
                                      and theirs.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64) else theirs)
    assert a.GetSize() == b.GetSize(), (who, a.GetSize(), b.GetSize())
    axes = 3 if a.GetSize()[2] > 1 else 2  # one slice has no spacing between slices (ITK: 1, dcm2niix: thickness)
    assert np.allclose(a.GetSpacing()[:axes], b.GetSpacing()[:axes], atol=1e-3), (who, a.GetSpacing(), b.GetSpacing())
    assert np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-2), (who, a.GetOrigin(), b.GetOrigin())
    assert np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4), (who, a.GetDirection(), b.GetDirection())
    assert np.allclose(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b), atol=1e-3), who


def gdcm_series_reader(folder: Path) -> list[sitk.Image]:
    """Every series SimpleITK's GDCM reader finds under ``folder`` (recursively), as it reads them."""
    images = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [""]:
        names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid, False, True)
        if not names:
            continue
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(names)
        try:
            image = reader.Execute()
        except RuntimeError:
            continue
        if image.GetDimension() == 4 and image.GetSize()[3] == 1:  # one multi-frame file: frames x one file
            image = image[:, :, :, 0]
        images.append(image)
    return images


def dcm2niix_volumes(folder: Path, out: Path) -> list[sitk.Image]:
    """The NIfTI volumes dcm2niix (PyPI wheel) makes of ``folder``; [] when it is not installed or reads nothing."""
    tool = Path(sys.executable).parent / "dcm2niix"
    if not tool.is_file():
        return []
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(tool), "-z", "n", "-b", "n", "-f", "%s_%j", "-o", str(out), str(folder)],
                   capture_output=True, timeout=120)
    return [sitk.ReadImage(str(p)) for p in sorted(out.glob("*.nii"))]


def ours(folder: Path) -> sitk.Image | str:
    """hsam's volume of the case, or its error line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return read_image(folder)
        except HSAMError as error:
            return str(error)


def test_the_corpus_holds_what_the_sweep_promises(corpus):
    pydicom_cases = [n for n in corpus if n.startswith("pydicom-")]
    assert len(pydicom_cases) >= 10, pydicom_cases  # pydicom 3.0 ships 14 CT/MR files in its wheel
    encodings = {pydicom.dcmread(next(p for p in corpus[n].rglob("*") if p.is_file()), stop_before_pixels=True,
                                 force=True).file_meta.get("TransferSyntaxUID") for n in corpus}
    assert len(encodings) >= 8, encodings  # native, big endian, deflate, RLE, JPEG lossless, JPEG-LS, two JPEG 2000


def test_every_case_is_listed_and_matches_gdcm_and_dcm2niix(corpus, tmp_path, capsys):
    """`hsam series` lists each case; a volume hsam reads equals GDCM's series reader's and dcm2niix's where they read
    it (when several series, the one with hsam's size)."""
    compared = {"gdcm": 0, "dcm2niix": 0}
    for name, folder in corpus.items():
        code = main(["series", str(folder)])
        out = capsys.readouterr().out
        assert code in (0, 1) and out.startswith("series UID"), (name, out)
        image = ours(folder)
        if isinstance(image, str):
            assert "\n" not in image and image, name
            assert code == 1, (name, out)  # the listing says none can be segmented too
            continue
        for who, theirs in (("gdcm", gdcm_series_reader(folder)), ("dcm2niix", dcm2niix_volumes(folder, tmp_path / name))):
            same_size = [t for t in theirs if sitk.DICOMOrient(t, "LPS").GetSize() == canonical(image).GetSize()]
            if same_size and (name, who) not in KNOWN_DISAGREEMENTS:
                assert_same_volume(image, same_size[0], f"{name} vs {who}")
                compared[who] += 1
    print(f"volumes compared: {compared}")
    assert compared["gdcm"] >= 18 and compared["dcm2niix"] >= 15, compared


@pytest.mark.slow
def test_every_case_segments_or_gives_one_error_line(corpus, tiny_model, tmp_path, capsys):
    """~25 runs of `hsam segment` (about a minute on 2 busy cores): labels on the read grid, or one error line."""
    outcomes = {}
    for name, folder in corpus.items():
        out = tmp_path / f"{name}.nii.gz"
        code = main(["segment", str(folder), "-o", str(out), "--model", tiny_model, "--device", "cpu", "-q",
                     "--allow-non-ct"])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        if code == 0:
            image = ours(folder)
            assert sitk.ReadImage(str(out)).GetSize() == image.GetSize(), name
            assert not errors, (name, err)
        else:
            assert len(errors) == 1 and not out.exists(), (name, err)
        outcomes[name] = code if code == 0 else errors[0][:160]
    print("segment outcomes:", *(f"{k}: {v}" for k, v in outcomes.items()), sep="\n")
    assert sum(code == 0 for code in outcomes.values()) >= len(outcomes) - 3, outcomes
