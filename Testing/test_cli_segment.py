"""``hsam segment`` and ``hsam models`` end to end, with the real tiny H-SAM (seeded random weights) on real CT."""

from __future__ import annotations

import csv
import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.cli import main
from hsam.labels import CLASS_NAMES
from hsam.volume import read_labels, same_geometry


def _save_tiny(folder: Path, name: str, demo: bool, seed: int = 0) -> Path:
    import torch

    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard, save_model
    from hsam.model.config import load_model_config

    torch.manual_seed(seed)
    config = load_model_config("vit_tiny")
    model = build_hsam(config)
    card = ModelCard.for_config(config, name, title=f"tiny test model {name}", classes=list(CLASS_NAMES), demo=demo)
    return save_model(model, card, folder / name)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("saved")
    return {"tiny-demo": _save_tiny(folder, "tiny-demo", True), "tiny-user": _save_tiny(folder, "tiny-user", False, 1)}


@pytest.fixture()
def installed(saved_models) -> dict[str, Path]:
    for name, path in saved_models.items():
        assert main(["models", "import", str(path)]) == 0
    return saved_models


@pytest.fixture(scope="module")
def ct_path(real_data) -> Path:
    return real_data / "totalsegmentator" / "example_ct_sm.nii.gz"


def test_segment_writes_all_outputs_on_the_input_grid(installed, ct_path, tmp_path, capsys):
    out = tmp_path / "organs.seg.nrrd"
    code = main(["segment", str(ct_path), "-o", str(out), "--device", "cpu", "--confidence", str(tmp_path / "conf.nrrd"),
                 "--stats", str(tmp_path / "stats.csv"), "--overlay", str(tmp_path / "overlay.png")])
    err = capsys.readouterr().err
    assert code == 0, err
    # the default is the most accurate installed model: the non-demo one, and it says so
    # (the others: tiny-demo and the H-SAM-Lite demo bundled with the package)
    from hsam.weights.store import available_models

    others = len(available_models()) - 1
    assert f"model: tiny-user (the most accurate installed model; {others} other(s) installed)" in err
    ct = sitk.ReadImage(str(ct_path))
    labels = read_labels(out)
    assert same_geometry(labels, ct, 1e-4)
    confidence = sitk.ReadImage(str(tmp_path / "conf.nrrd"))
    assert same_geometry(confidence, ct, 1e-4) and confidence.GetPixelID() == sitk.sitkUInt8
    rows = list(csv.DictReader((tmp_path / "stats.csv").open()))
    assert [r["organ"] for r in rows] == list(CLASS_NAMES[1:])
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=9)
    assert [int(r["voxels"]) for r in rows] == counts[1:].tolist()
    png = (tmp_path / "overlay.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf.nrrd", "organs.seg.nrrd", "overlay.png", "stats.csv"]


def test_segment_dicom_folder_to_nifti_with_explicit_model(installed, real_data, tmp_path, capsys):
    out = tmp_path / "labels.nii.gz"
    code = main(["segment", str(real_data / "dcmqi" / "ct-3slice"), "-o", str(out), "--model", "tiny-demo", "-q"])
    assert code == 0, capsys.readouterr().err
    dicom = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(real_data / "dcmqi" / "ct-3slice")))
    assert same_geometry(sitk.ReadImage(str(out)), dicom, 1e-4)


def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


def _bad_inputs(tmp_path: Path, ct_path: Path) -> dict[str, tuple[list[str], str]]:
    ct = sitk.ReadImage(str(ct_path))
    sitk.WriteImage(ct[:, :, 4], str(tmp_path / "slice.nii.gz"))
    sitk.WriteImage(sitk.JoinSeries([ct, ct]), str(tmp_path / "four.nii.gz"))
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    raw = gzip.decompress(ct_path.read_bytes())
    (tmp_path / "short.nii").write_bytes(raw[: len(raw) // 2])
    array = sitk.GetArrayFromImage(ct).astype(np.float32)
    array[0, 0, 0] = np.nan
    nan = sitk.GetImageFromArray(array)
    nan.CopyInformation(ct)
    sitk.WriteImage(nan, str(tmp_path / "nan.nrrd"))
    out = str(tmp_path / "out" / "labels.nii.gz")
    return {
        "2-D": ([str(tmp_path / "slice.nii.gz"), "-o", out], "2-D"),
        "4-D": ([str(tmp_path / "four.nii.gz"), "-o", out], "4-D"),
        "empty": ([str(tmp_path / "empty.nii.gz"), "-o", out], "empty"),
        "truncated": ([str(tmp_path / "short.nii"), "-o", out], "truncated"),
        "NaN": ([str(tmp_path / "nan.nrrd"), "-o", out], "NaN"),
        "missing": ([str(tmp_path / "nope.nii.gz"), "-o", out], "not found"),
        "unwritable": ([str(ct_path), "-o", str(_unwritable(tmp_path) / "labels.nii.gz")], "not writable"),
        "extension": ([str(ct_path), "-o", str(tmp_path / "out" / "labels.png")], "extension"),
        "no-model": ([str(ct_path), "-o", out, "--model", "not-installed"], "no model"),
        "organ": ([str(ct_path), "-o", out, "--organs", "liver,heart"], "unknown organ"),
        "batch": ([str(ct_path), "-o", out, "--batch-size", "0"], "at least 1"),
        "half-on-cpu": ([str(ct_path), "-o", out, "--precision", "fp16"], "only on a GPU"),
    }


@pytest.mark.parametrize("case", ["2-D", "4-D", "empty", "truncated", "NaN", "missing", "unwritable", "extension",
                                  "no-model", "organ", "batch", "half-on-cpu"])
def test_bad_input_exits_2_with_one_error_line_and_no_output(installed, ct_path, tmp_path, capfd, case):
    (tmp_path / "out").mkdir()
    argv, words = _bad_inputs(tmp_path, ct_path)[case]
    capfd.readouterr()
    code = main(["segment", *argv, "--device", "cpu"])
    captured = capfd.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], captured.err
    assert list((tmp_path / "out").iterdir()) == []


def test_no_model_installed_says_what_to_do(ct_path, tmp_path, capsys, monkeypatch):
    import hsam.weights.store

    # a package without the bundled H-SAM-Lite demo (a fresh package has it: Testing/test_lite_model.py)
    monkeypatch.setattr(hsam.weights.store, "bundled_models_dir", lambda: tmp_path / "no-bundled-models")
    assert main(["segment", str(ct_path), "-o", str(tmp_path / "x.nii.gz")]) == 2
    assert "no segmentation model is installed" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def test_models_list_import_remove(installed, capsys):
    capsys.readouterr()
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "* tiny-user" in out and "  tiny-demo" in out and "hsam-vitb-synapse" in out and "sam-vit-b" in out
    assert main(["models", "remove", "tiny-user"]) == 0
    capsys.readouterr()
    assert main(["models", "list"]) == 0
    # of the two demo models left, the bundled H-SAM-Lite (pretrained backbone) ranks above the random tiny one
    listed = capsys.readouterr().out
    assert "* hsam-lite-demo" in listed and "  tiny-demo" in listed
    assert main(["models", "remove", "tiny-user"]) == 2
    assert "not installed" in capsys.readouterr().err


def test_import_rejects_a_tampered_model(saved_models, tmp_path, capsys):
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(saved_models["tiny-demo"], copy)
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\x00\x01\x02\x03")
    assert main(["models", "import", str(copy)]) == 2
    assert "does not match its card" in capsys.readouterr().err
    assert main(["models", "list"]) == 0
    assert "tampered" not in capsys.readouterr().out


def test_import_official_rejects_an_unknown_sam_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "h.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "sam.pth").write_bytes(b"not sam either")
    assert main(["models", "import-official", str(tmp_path / "h.pth"), "--sam", str(tmp_path / "sam.pth")]) == 2
    assert "not an official SAM base file" in capsys.readouterr().err
    assert main(["models", "import-official", str(tmp_path / "missing.pth")]) == 2
    assert "H-SAM checkpoint not found" in capsys.readouterr().err
    # without --sam the SAM base weights are downloaded first; offline that fails with where to put the file
    import json

    from hsam.weights.manifest import MANIFEST_ENV, manifest_path

    manifest = json.loads(manifest_path().read_text())
    for entry in manifest["models"]:
        for file in entry["files"]:
            if file.get("url"):
                file["url"] = "http://127.0.0.1:9/" + file["name"]  # nothing listens there: as offline, no traffic out
    (tmp_path / "models.json").write_text(json.dumps(manifest))
    monkeypatch.setenv(MANIFEST_ENV, str(tmp_path / "models.json"))
    assert main(["models", "import-official", str(tmp_path / "h.pth")]) == 2
    assert "could not download sam_vit_b_01ec64.pth" in capsys.readouterr().err


def test_import_official_takes_the_issue_spelling_and_needs_exactly_one_checkpoint(tmp_path, capsys):
    (tmp_path / "h.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "sam.pth").write_bytes(b"not sam either")
    args = ["models", "import-official", "--hsam", str(tmp_path / "h.pth"), "--sam", str(tmp_path / "sam.pth")]
    assert main([*args, "--name", "mine"]) == 2
    assert "not an official SAM base file" in capsys.readouterr().err
    assert main(["models", "import-official", "--sam", str(tmp_path / "sam.pth")]) == 2
    assert "give the official H-SAM checkpoint once" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "h.pth")]) == 2
    assert "give the official H-SAM checkpoint once" in capsys.readouterr().err


@pytest.mark.slow
def test_import_official_installs_the_converted_model_as_default(tmp_path, monkeypatch, capsys):
    """Random weights in the official file layouts: SAM ViT-B base (checksum listed in a test manifest) + H-SAM."""
    import hashlib
    import json

    import torch

    from hsam.model.build import build_hsam
    from hsam.model.config import load_model_config
    from hsam.model.official import export_official
    from hsam.model.sam_compat import build_sam
    from hsam.weights.store import load_named_model

    torch.manual_seed(0)
    sam_path, hsam_path = tmp_path / "sam_vit_b_01ec64.pth", tmp_path / "220_epoch_299.pth"
    torch.save(build_sam().sam_model_registry["vit_b"]().state_dict(), sam_path)
    export_official(build_hsam(load_model_config("vit_b_512")), hsam_path)
    digest = hashlib.sha256(sam_path.read_bytes()).hexdigest()
    manifest = {"models": [
        {"id": "hsam-vitb-synapse", "title": "paper model", "kind": "hsam", "backbone": "vit_b", "priority": 100,
         "install": "import-official", "requires": ["sam-vit-b"], "files": [{"name": "220_epoch_299.pth"}]},
        {"id": "sam-vit-b", "title": "SAM", "kind": "base", "backbone": "vit_b",
         "files": [{"name": "sam_vit_b_01ec64.pth", "url": "http://127.0.0.1:9/x", "sha256": digest}]}]}
    (tmp_path / "models.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("HSAM_MANIFEST", str(tmp_path / "models.json"))
    assert main(["models", "import", str(_save_tiny(tmp_path, "tiny-user", False))]) == 0
    assert main(["models", "import-official", str(hsam_path), "--sam", str(sam_path)]) == 0
    capsys.readouterr()
    assert main(["models", "list"]) == 0
    assert "* hsam-vitb-synapse" in capsys.readouterr().out  # the paper model outranks a user model
    model, card = load_named_model()
    assert card.name == "hsam-vitb-synapse" and card.backbone == "vit_b" and card.img_size == 512
    assert card.extra["source"]["hsam_checkpoint"] == "220_epoch_299.pth"
