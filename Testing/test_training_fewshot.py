"""Few-shot fine-tuning with a frozen encoder (issue 17): reusing the encoder's outputs trains exactly what the
uncached loop trains, encodes each sample once, and `hsam finetune` picks the few-shot settings for small case sets,
says so, and reports and stores the forgetting guard's figures."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hsam.cli import main
from hsam.labels import remap_labels
from hsam.training.config import load_training_config
from hsam.training.model_setup import build_training_model
from hsam.training.trainer import held_out_figures, train


def _write_case(folder, image, labels) -> None:
    folder.mkdir(parents=True)
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    sitk.WriteImage(labels, str(folder / "labels.nii.gz"))
    (folder / "provenance.json").write_text(json.dumps({"source": "test: TotalSegmentator reference labels"}))


def _cases(tmp_path, real_data, parts: dict[str, tuple[int, int]]):
    folder = real_data / "totalsegmentator"
    image = sitk.ReadImage(str(folder / "example_ct_sm.nii.gz"))
    reference = sitk.ReadImage(str(folder / "example_seg.nii.gz"))
    labels = sitk.GetImageFromArray(remap_labels(sitk.GetArrayFromImage(reference), "totalseg_total"))
    labels.CopyInformation(reference)
    for name, (start, stop) in parts.items():
        _write_case(tmp_path / name, image[:, :, start:stop], labels[:, :, start:stop])


def _tiny_config(tmp_path, real_data, cache: dict, run: str, epochs: int = 2) -> dict:
    if not (tmp_path / "cases").exists():
        _cases(tmp_path / "cases", real_data, {"train": (10, 16)})
    return load_training_config("tiny", [
        f"epochs={epochs}", "batch_size=4", "device=\"cpu\"", "tensorboard=false",
        'model.freeze=["image_encoder", "lora"]',
        # the recipe's augmentation, so copies differ per epoch
        'augmentation={"p_rotate": 0.45, "p_crop": 0.4125, "p_elastic": 0.116875}',
        f"encoder_cache={json.dumps(cache)}",
        f"output_dir={json.dumps(str(tmp_path / run))}",
    ], extra={"data": {"train": {"format": "cases", "root": str(tmp_path / "cases")}}})


def test_reused_encoder_outputs_train_what_the_uncached_loop_trains(tmp_path, real_data):
    plain = train(_tiny_config(tmp_path, real_data, {"enabled": False}, "plain"), progress=False, register=False)
    cached = train(_tiny_config(tmp_path, real_data, {"enabled": True, "copies": 0, "precision": "fp32"}, "cached"),
                   progress=False, register=False)
    assert cached.info["encoder_cache"] == {"copies": 0, "precision": "fp32"}
    for a, b in zip(plain.history, cached.history):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["ce2"] - b["ce2"]) < 1e-4
    # The two runs encode in different batch shapes, so their kernels round differently (on AVX2-only CPUs the
    # decoder weights then differ by up to 1.2e-5). Rounding moves the weights by about 1e-5 of what training moved
    # them on every CPU class measured; a wrong or stale encoder output moves them by a large part of it.
    config = _tiny_config(tmp_path, real_data, {"enabled": False}, "plain")
    torch.manual_seed(config["seed"])
    initial = build_training_model(config)[0].state_dict()
    trained = {k: v for k, v in plain.model.state_dict().items() if k.startswith("mask_decoder")}
    other = cached.model.state_dict()
    drift = sum(float(((v - other[k]) ** 2).sum()) for k, v in trained.items()) ** 0.5
    learned = sum(float(((v - initial[k]) ** 2).sum()) for k, v in trained.items()) ** 0.5
    assert learned > 0 and drift < 1e-3 * learned


def test_each_copy_of_a_slice_is_encoded_once(tmp_path, real_data, monkeypatch):
    config = _tiny_config(tmp_path, real_data, {"enabled": True, "copies": 2, "precision": "fp32"}, "copies",
                          epochs=4)
    calls = []
    from hsam.training import frozen

    original = frozen.encode

    def counting(encoder, images, device, autocast):  # the real encoder runs; only the calls are counted
        calls.append(len(images))
        return original(encoder, images, device, autocast)

    monkeypatch.setattr(frozen, "encode", counting)
    result = train(config, progress=False, register=False)
    assert len(result.history) == 4
    assert sum(calls) == 6 * 2  # 6 slices x 2 copies, reused by epochs 3 and 4


def test_finetune_picks_few_shot_settings_and_stores_the_forgetting_guard(tmp_path, real_data, capsys):
    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard, save_model
    from hsam.model.config import ModelConfig
    from hsam.weights.store import load_named_model

    torch.manual_seed(0)
    base = build_hsam(ModelConfig(backbone="vit_tiny", img_size=64, lora_rank=2, keep_cmattn_tensors=False))
    save_model(base, ModelCard.for_config(base.config, "tiny-base", title="Tiny base", window=[-125.0, 275.0],
                                          training_data="nothing"), tmp_path / "tiny-base")
    _cases(tmp_path / "cases", real_data, {"upper": (16, 22), "lower": (8, 14)})
    _cases(tmp_path / "reference", real_data, {"ref": (0, 4)})
    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(tmp_path / "tiny-base"), "--cases", str(tmp_path / "cases"),
                 "--epochs", "2", "--set", 'model.freeze=["image_encoder", "lora"]',
                 "--set", json.dumps({"format": "cases", "root": str(tmp_path / "reference")}).join(["reference=", ""]),
                 "--output", str(out), "--progress", "json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert any("few-shot settings" in e.get("status", "") for e in events)
    config = json.loads((out / "config.json").read_text())
    assert config["encoder_cache"]["enabled"] and config["optim"]["warmup_iters"] == 4
    last = events[-1]
    assert last["finished"] is True and last["fewshot"] is True
    guard = last["forgetting_guard"]
    assert guard["reference"] == ["ref"] and 0.0 <= guard["dice_before"] <= 1.0 and 0.0 <= guard["dice_after"] <= 1.0
    assert last["held_out"]["dice_after"] == last["best"]["val_dice"]
    _, card = load_named_model("tiny-base-ft")
    assert card.extra["forgetting_guard"]["dice_after"] == guard["dice_after"]
    assert card.extra["forgetting_guard"]["dice_before"] == guard["dice_before"]
    # the model before training is the base model: its reference Dice is the base model's, measured independently
    from hsam.training.data import load_source_volumes
    from hsam.training.validate import validate

    volumes = load_source_volumes({"format": "cases", "root": str(tmp_path / "reference")}, [-125.0, 275.0], "LPS",
                                  None)
    base.eval()
    expected = validate(base, volumes, list(range(1, 9)), 8, "cpu")["dice"]
    assert np.isclose(guard["dice_before"], round(expected, 4), atol=2e-4)


@pytest.mark.parametrize("after, warned", [(0.31, True), (0.52, False)])
def test_a_fine_tune_worse_on_the_held_out_cases_says_so(after, warned, tmp_path, capsys):
    from types import SimpleNamespace

    from hsam.cli.progress import Reporter
    from hsam.cli.train import _report

    held = held_out_figures(0.38, after)
    assert held["worse_than_start"] is warned
    result = SimpleNamespace(history=[{"epoch": 3, "loss": 0.4}], output_dir=tmp_path, finished=True,
                             best={"epoch": 0, "val_dice": after}, model_dir=tmp_path / "model", installed=None,
                             info={"held_out": held})
    assert _report(result, Reporter("json")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"held-out Dice: 0.380 before, {after:.3f} after" in lines
    assert any("warning: no epoch of this fine-tune beat the starting model" in line for line in lines) is warned
    finished = json.loads(next(line for line in lines if line.startswith('{"finished"')))
    assert finished["held_out"]["worse_than_start"] is warned  # what the Slicer module reads


def test_training_stops_after_patience_validations_without_gain(tmp_path, real_data):
    _cases(tmp_path / "val", real_data, {"val": (16, 20)})
    config = _tiny_config(tmp_path, real_data, {"enabled": True, "copies": 1, "precision": "fp32"}, "stop",
                          epochs=5)
    config["data"]["val"] = {"format": "cases", "root": str(tmp_path / "val")}
    config["validation"]["every"] = 1
    config["stopping"]["patience"] = 1
    config["optim"]["base_lr"] = 1e-12  # the weights cannot move: the validation Dice never improves on epoch 1
    result = train(config, progress=False, register=False)
    assert len(result.history) == 2 and result.info["stopped_early"] == {"epoch": 2, "best_epoch": 1}
    assert result.best["epoch"] == 0 and result.model_dir is not None


def test_reference_encoder_outputs_are_cached_for_the_next_fine_tune(tmp_path, real_data, monkeypatch):
    """The forgetting guard's reference cases are encoded once per frozen encoder and precision: the next run reads
    them back (same guard figures, no encoder call for them); an unreadable cache file is encoded again."""
    from hsam.training import frozen

    _cases(tmp_path / "reference", real_data, {"ref": (0, 4)})
    reference = {"format": "cases", "root": str(tmp_path / "reference")}
    calls = []
    original = frozen.encode

    def counting(encoder, images, device, autocast):
        calls.append(len(images))
        return original(encoder, images, device, autocast)

    monkeypatch.setattr(frozen, "encode", counting)
    runs = []
    for run in ("first", "second", "third"):
        config = _tiny_config(tmp_path, real_data, {"enabled": True, "copies": 1, "precision": "fp32"}, run,
                              epochs=1)
        config["reference"] = reference
        calls.clear()
        runs.append((train(config, progress=False, register=False), list(calls)))
        cached = sorted(frozen.encoder_outputs_dir().glob("*.safetensors"))
        assert len(cached) == 1
        if run == "second":
            cached[0].write_bytes(b"not a tensor file")
    (first, first_calls), (second, second_calls), (third, third_calls) = runs
    assert sum(first_calls) == sum(third_calls) == 6 + 4 and sum(second_calls) == 6  # 6 training + 4 reference slices
    assert first.info["forgetting_guard"] == second.info["forgetting_guard"] == third.info["forgetting_guard"]


def test_the_starting_models_reference_dice_is_cached_with_its_encoder_outputs(tmp_path, real_data, monkeypatch):
    """The guard's "before" is scored once per starting model: a second fine-tune of the same model reads it back
    (one decoding of the reference, for the "after"), a run from other starting weights scores it again, and both
    runs of the same model report the same guard."""
    from hsam.training import frozen

    _cases(tmp_path / "reference", real_data, {"ref": (0, 4)})
    reference = {"format": "cases", "root": str(tmp_path / "reference")}
    scored = []
    original = frozen.EncodedVolumes.dice

    def counting(self, *args, **kwargs):
        scored.append(len(self.volumes))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(frozen.EncodedVolumes, "dice", counting)
    calls = {}
    guards = {}
    for run, seed in (("first", 2345), ("again", 2345), ("other", 7)):
        config = _tiny_config(tmp_path, real_data, {"enabled": True, "copies": 1, "precision": "fp32"}, run,
                              epochs=1)
        config["reference"], config["seed"] = reference, seed
        scored.clear()
        guards[run] = train(config, progress=False, register=False).info["forgetting_guard"]
        calls[run] = len(scored)
    assert calls == {"first": 2, "again": 1, "other": 2}
    assert guards["first"] == guards["again"] and guards["other"]["dice_before"] != guards["first"]["dice_before"]
    assert len(list(frozen.encoder_outputs_dir().glob("*.dice.json"))) == 2


def test_probe_without_the_frozen_encoder_finds_what_the_full_probe_finds(tmp_path, real_data):
    from hsam.training.loader import TrainingSlices
    from hsam.training.model_setup import build_training_model
    from hsam.training.trainer import _prepare_data, _probe

    config = _tiny_config(tmp_path, real_data, {"enabled": True, "copies": 1, "precision": "fp32"}, "probe")
    store, _, _ = _prepare_data(config, None)
    model, _ = build_training_model(config)
    probe_set = TrainingSlices(store, model.img_size, max(1, model.img_size // 4), None, 0)
    assert _probe(model, probe_set, 0.2, torch.device("cpu"), frozen_encoder=True) == \
        _probe(model, probe_set, 0.2, torch.device("cpu"), frozen_encoder=False)


def test_encoder_digest_covers_every_tensor_of_the_encoder():
    from hsam.training.frozen import _encoder_digest

    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))  # BN has a 0-dim counter
    before = _encoder_digest(encoder).hexdigest()
    assert _encoder_digest(encoder).hexdigest() == before
    encoder[1].running_mean += 1e-3
    assert _encoder_digest(encoder).hexdigest() != before


def test_encoder_outputs_come_back_in_the_standard_layout():
    """A channels-last encoder output (the TinyViT's) is returned contiguous, as the cache stores it, so fresh and
    cached outputs decode identically."""
    from hsam.training.frozen import encode

    encoder = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    images = torch.rand(2, 3, 16, 16).to(memory_format=torch.channels_last)
    assert encoder(images[:1]).is_contiguous(memory_format=torch.channels_last)
    assert not encoder(images[:1]).is_contiguous()
    out = encode(encoder, images, torch.device("cpu"), contextlib.nullcontext)
    # the same computation (one image at a time), so the same kernels on every CPU: bit equality is fair here
    one_by_one = torch.cat([encoder(image[None]) for image in images]).contiguous()
    assert out.is_contiguous() and torch.equal(out, one_by_one)
