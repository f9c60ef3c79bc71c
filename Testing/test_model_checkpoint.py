"""Our model format: safetensors + JSON model card, atomic writes, SHA-256 checked, one-line errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import one_line_error
from hsam.model.build import build_hsam
from hsam.model.checkpoint import (
    CARD_FILE,
    TENSORS_FILE,
    ModelCard,
    load_model,
    read_card,
    save_model,
    sha256_file,
)
from hsam.model.config import ModelConfig, load_model_config



@pytest.fixture()
def tiny_model():
    torch.manual_seed(0)
    model = build_hsam(load_model_config("vit_tiny")).eval()
    for adapter_weight in model.image_encoder.blocks[0].attn.qkv.lora_parameters():
        torch.nn.init.normal_(adapter_weight, std=0.1)  # non-zero LoRA so merging matters
    return model


@pytest.fixture()
def saved(tiny_model, tmp_path):
    card = ModelCard.for_config(tiny_model.config, "tiny-test", title="Tiny test model", training_data="none", demo=True)
    folder = save_model(tiny_model, card, tmp_path / "tiny-test")
    return tiny_model, folder


def test_round_trip_is_exact(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == [CARD_FILE, TENSORS_FILE]  # no temp files left
    card = json.loads((folder / CARD_FILE).read_text())
    assert card["sha256"] == sha256_file(folder / TENSORS_FILE)
    assert card["backbone"] == "vit_tiny" and card["img_size"] == 128 and card["lora_rank"] == 2
    assert card["classes"][0] == "background" and len(card["classes"]) == 9
    assert card["window"] == [-125.0, 275.0] and card["orientation"] == "LPS"

    loaded, loaded_card = load_model(folder)
    assert loaded_card == read_card(folder)
    assert loaded_card.title == "Tiny test model" and loaded_card.demo
    assert not loaded.training and loaded.image_encoder.blocks[0].attn.qkv.merged
    original = model.state_dict()
    restored = loaded.state_dict()  # unmerged view even though the model is merged
    assert list(original) == list(restored)
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad
    ]
    images = torch.rand(1, 3, 128, 128)
    torch.testing.assert_close(loaded.predict(images), model.predict(images), rtol=1e-4, atol=1e-4)
    loaded.unmerge_lora()  # same tensors; only kernel-level float noise may remain
    torch.testing.assert_close(loaded.predict(images), model.predict(images), rtol=1e-5, atol=1e-6)


def test_loading_by_either_file_and_saving_a_merged_model(saved, tmp_path):
    model, folder = saved
    load_model(folder / CARD_FILE)
    load_model(folder / TENSORS_FILE)
    model.merge_lora()
    again = save_model(model, read_card(folder), tmp_path / "merged")
    assert sha256_file(again / TENSORS_FILE) == sha256_file(folder / TENSORS_FILE)


def test_card_must_fit_the_model(tiny_model, tmp_path):
    card = ModelCard(name="x", classes=["background", "liver"])
    with pytest.raises(ValueError, match="2 classes but the model has 9 outputs"):
        save_model(tiny_model, card, tmp_path / "x")
    with pytest.raises(ValueError, match="unknown keys"):
        ModelCard.from_dict({"name": "x", "colour": "red"})


def test_truncated_tensors_file(saved):
    _, folder = saved
    data = (folder / TENSORS_FILE).read_bytes()
    (folder / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    one_line_error(lambda: load_model(folder), TENSORS_FILE, "SHA-256", "truncated")


def _edit_card(folder, **changes):
    card = json.loads((folder / CARD_FILE).read_text())
    card.update(changes)
    (folder / CARD_FILE).write_text(json.dumps(card))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"classes": ["background", "liver", "spleen"]}, "3 outputs"),
        ({"lora_rank": 4}, "LoRA rank 4"),
        ({"backbone": "vit_b", "img_size": 128}, "vit_b"),
        ({"img_size": 256}, "input 256"),
    ],
)
def test_tensors_that_do_not_fit_the_card(saved, changes, expected):
    _, folder = saved
    _edit_card(folder, **changes)
    message = one_line_error(lambda: load_model(folder), TENSORS_FILE, "different network", expected)
    assert "vit_tiny, 9 outputs, LoRA rank 2" in message  # what the file really holds


def test_foreign_files(saved, tmp_path):
    _, folder = saved
    pth = tmp_path / "epoch_299.pth"
    torch.save({"w_a_000": torch.zeros(5, 768)}, pth)
    one_line_error(lambda: load_model(pth), "epoch_299.pth", "import-official")
    one_line_error(lambda: load_model(tmp_path / "nowhere"), "model not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(lambda: load_model(empty), "model.json is missing")

    (folder / CARD_FILE).write_text("{not json")
    one_line_error(lambda: load_model(folder), CARD_FILE, "not a valid HSAMSlicer model card")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({"backbone.weight": torch.zeros(3)}, str(foreign / TENSORS_FILE))
    card = ModelCard.for_config(load_model_config("vit_tiny"), "foreign")
    card = dataclasses.replace(card, sha256=sha256_file(foreign / TENSORS_FILE))
    (foreign / CARD_FILE).write_text(json.dumps(card.to_dict()))
    one_line_error(lambda: load_model(foreign), "foreign", "different network", "missing")

    _edit_card(foreign, backbone="vit_z")
    one_line_error(lambda: load_model(foreign), "backbone 'vit_z' is not available")
    _edit_card(foreign, backbone="vit_tiny", format="hsam-model/9")
    one_line_error(lambda: load_model(foreign), "hsam-model/9")


def test_lean_config_round_trips(tmp_path):
    torch.manual_seed(0)
    model = build_hsam(ModelConfig(**{**load_model_config("vit_tiny").to_dict(), "keep_cmattn_tensors": False}))
    folder = save_model(model, ModelCard.for_config(model.config, "lean"), tmp_path / "lean")
    loaded, card = load_model(folder)
    assert card.keep_cmattn_tensors is False
    assert not hasattr(loaded.mask_decoder2, "self_attn")
