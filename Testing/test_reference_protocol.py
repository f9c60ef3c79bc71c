"""``--protocol reference``: the released H-SAM test pipeline, and the paper's Table 1 script on synthetic test
volumes in the released ``test_vol_h5`` layout. Real tiny H-SAM networks (seeded random weights) throughout."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import zoom

from conftest import REPOSITORY
from hsam.pipeline.reference import predict_volume_reference
from hsam.volume import window

h5py = pytest.importorskip("h5py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny H-SAM (vit_tiny, 128 px input) saved as a model folder; returns (model, card, folder)."""
    from hsam.labels import CLASS_NAMES
    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard, load_model, save_model
    from hsam.model.config import load_model_config

    torch.manual_seed(3)
    config = load_model_config("vit_tiny")
    card = ModelCard.for_config(config, "tiny-ref", title="tiny", classes=list(CLASS_NAMES))
    folder = save_model(build_hsam(config), card, tmp_path_factory.mktemp("models") / "tiny-ref")
    model, card = load_model(folder)
    return model.eval(), card, folder


def smooth_volume(shape, seed=0) -> np.ndarray:
    """Blobs in [0, 1]: enough structure that cubic zooms and the network give varied labels."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((shape[0], 6, 6)).astype(np.float32)
    return np.clip(np.stack([zoom(c, (shape[1] / 6, shape[2] / 6), order=1) for c in coarse]), 0, 1)


def released_labels(model, volume01, input_size) -> np.ndarray:
    """``utils.test_single_volume`` as hsam-model.md §3 describes it, written out independently: per slice a cubic
    zoom to input_size, then to img_size; the mean of both stages' masks; softmax, argmax; a nearest zoom back."""
    size = model.img_size
    out = np.zeros(volume01.shape, dtype=np.int64)
    for index, image in enumerate(volume01):
        x, y = image.shape
        if (x, y) != (input_size, input_size):
            image = zoom(image, (input_size / x, input_size / y), order=3)
        if image.shape != (size, size):
            image = zoom(image, (size / image.shape[0], size / image.shape[1]), order=3)
        inputs = torch.from_numpy(image).float()[None, None].repeat(1, 3, 1, 1)
        with torch.no_grad():
            first, second = model(inputs)
            masks = (first["masks"] + second["masks"]) / 2
            labels = torch.argmax(torch.softmax(masks, dim=1), dim=1)[0].numpy()
        out[index] = zoom(labels, (x / size, y / size), order=0) if labels.shape != (x, y) else labels
    return out


@pytest.mark.parametrize("shape, input_size", [((2, 96, 80), 56), ((2, 128, 128), 128), ((1, 128, 128), 40)])
def test_reference_pipeline_is_the_released_one(tiny, shape, input_size):
    model, _, _ = tiny
    volume = smooth_volume(shape)
    labels, confidence = predict_volume_reference(model, volume, input_size=input_size, batch_size=2)
    expected = released_labels(model, volume, input_size)
    assert labels.shape == shape and confidence.shape == shape
    np.testing.assert_array_equal(labels, expected)
    assert len(np.unique(labels)) > 1  # the comparison is not between two constant maps
    assert confidence.min() >= 255 // model.num_outputs  # a maximum softmax probability


def test_segment_reference_protocol_uses_the_stored_order(tiny, tmp_path, capsys):
    from hsam.cli import main

    model, card, folder = tiny
    hu = smooth_volume((3, 100, 90), seed=1) * 400.0 - 125.0
    hu[:, :10] = -1000  # some air, so that the input looks like CT in HU
    image = sitk.GetImageFromArray(hu.astype(np.float32))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS-stored: the default pipeline would flip it, this one not
    image.SetSpacing((0.8, 0.8, 2.5))
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(source))
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(source), "-o", str(out), "--model", str(folder), "--protocol", "reference",
                 "--input-size", "64", "--device", "cpu", "-q"]) == 0
    written = sitk.ReadImage(str(out))
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(source)))
    expected, _ = predict_volume_reference(model, window(stored, *card.window), input_size=64)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), expected)
    assert written.GetDirection() == image.GetDirection() and written.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))
    # options the released pipeline cannot honour are refused before any work
    assert main(["segment", str(source), "-o", str(out), "--model", str(folder), "--protocol", "reference",
                 "--orientation", "RPS"]) == 2
    assert "drop --orientation" in capsys.readouterr().err
    assert main(["segment", str(source), "-o", str(out), "--model", str(folder), "--input-size", "64"]) == 2


def test_reference_protocol_is_a_choice_of_stages_of_the_one_runner(tiny):
    from hsam.errors import HSAMError
    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.run import segment_volume

    model, card, _ = tiny
    hu = smooth_volume((3, 100, 90), seed=2) * 400.0 - 125.0
    hu[:, :10] = -1000
    image = sitk.GetImageFromArray(hu.astype(np.float32))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    result = segment_volume(image, model, card, SegmentOptions.reference(device="cpu", input_size=64, batch_size=2))
    expected, _ = predict_volume_reference(model, window(hu, *card.window), input_size=64)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labels), expected)
    assert (result.mode, result.precision, result.orientation, result.slab) == ("reference", "fp32", "stored order", None)
    for wrong in ({"organs": ["liver"]}, {"orientation": "RPS"}, {"mode": "ort"}, {"refine": True}):
        with pytest.raises(HSAMError, match="released pipeline as it is"):
            segment_volume(image, model, card, SegmentOptions(protocol="reference", device="cpu", **wrong))


def _load_script():
    path = REPOSITORY / "benchmarks" / "paper" / "reproduce_table1.py"
    spec = importlib.util.spec_from_file_location("reproduce_table1", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _released_test_set(folder: Path, count: int = 2) -> list[str]:
    """Synthetic ``caseXXXX.npy.h5`` volumes as the released test set stores them, plus ``test_vol.txt``."""
    folder.mkdir()
    names = []
    for index in range(count):
        name = f"case{index + 1:04d}"
        image = smooth_volume((3, 96, 96), seed=10 + index)
        label = np.zeros(image.shape, dtype=np.float32)
        label[:, 20:50, 20:60] = 5  # liver
        label[1:, 60:80, 30:45] = 1  # spleen
        label[2, 10:20, 70:90] = 7  # aorta, one slice
        with h5py.File(folder / f"{name}.npy.h5", "w") as handle:
            handle.create_dataset("image", data=image)
            handle.create_dataset("label", data=label)
        names.append(name)
    (folder / "test_vol.txt").write_text("\n".join(names) + "\n")
    return names


def test_table1_script_scores_the_released_test_layout(tiny, tmp_path, capsys):
    from hsam.cli import main as hsam_main

    _, _, folder = tiny
    script = _load_script()
    names = _released_test_set(tmp_path / "test_vol_h5")
    out = tmp_path / "results"
    assert script.main(["--data", str(tmp_path / "test_vol_h5"), "--list", str(tmp_path / "test_vol_h5" / "test_vol.txt"),
                        "--model", str(folder), "--input-size", "64", "--device", "cpu", "-o", str(out),
                        "--save-predictions", str(tmp_path / "pred")]) == 0
    table = capsys.readouterr().out
    assert "paper, Table 1" in table and "80.35" in table and "56.17" in table
    summary = json.loads((out / "table1.json").read_text())
    assert summary["cases"] == names and set(summary["dice"]) == set(script.PAPER["dice"])
    rows = (out / "table1.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(names) * 8

    # the same predictions scored by `hsam evaluate --protocol reference` against the h5 labels give the same means
    report = tmp_path / "eval.csv"
    assert hsam_main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "test_vol_h5"),
                      "--protocol", "reference", "-o", str(report)]) == 0
    from hsam.evaluation.report import summarize
    from hsam.evaluation import evaluate_files

    rows = evaluate_files(tmp_path / "pred", tmp_path / "test_vol_h5", None, None, "reference", tuple(range(1, 9)))
    _, mean_dice, mean_hd = summarize(rows)
    assert summary["mean_dice"] == pytest.approx(100 * mean_dice, abs=0.01)
    assert summary["mean_hd95"] == pytest.approx(mean_hd, abs=0.01)
    # and the predictions are the released pipeline's
    with h5py.File(tmp_path / "test_vol_h5" / f"{names[0]}.npy.h5") as handle:
        image = handle["image"][:]
    model, _, _ = tiny
    saved = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred" / f"{names[0]}_pred.nii.gz")))
    np.testing.assert_array_equal(saved, released_labels(model, image, 64))


def test_table1_script_says_what_is_missing(tmp_path, capsys):
    script = _load_script()
    assert script.main(["--data", str(tmp_path / "nope"), "-o", str(tmp_path / "r")]) == 2
    assert "test_vol_h5" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert script.main(["--data", str(tmp_path / "empty"), "-o", str(tmp_path / "r")]) == 2
    assert "caseXXXX.npy.h5" in capsys.readouterr().err
