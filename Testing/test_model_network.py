"""The H-SAM network: configs, shapes (hsam-model.md §1), parameter counts (§1.8), LoRA, CMAttn, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hsam.errors import HSAMError
from hsam.model.build import available_backbones, build_hsam
from hsam.model.registry import register_backbone
from hsam.model.cmattn import mask_guided_gain, released_gain
from hsam.model.config import DEFAULT_MODEL_CONFIG, ModelConfig, available_model_configs, load_model_config
from hsam.model.hsam import prior_from_logits
from hsam.model.lora import LoRAQKV, lora_modules



@pytest.fixture(autouse=True)
def _torch_seed():
    torch.manual_seed(0)


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**load_model_config("vit_tiny").to_dict(), **overrides})


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- configs


def test_named_configs_load_and_round_trip():
    assert {"vit_b_512", "vit_b_224", "vit_tiny"} <= set(available_model_configs())
    default = load_model_config(DEFAULT_MODEL_CONFIG)
    assert default == ModelConfig(backbone="vit_b", img_size=512, num_classes=8, lora_rank=5, cmattn="constant")
    assert default.num_outputs == 9
    assert ModelConfig.from_dict(default.to_dict()) == default
    assert load_model_config("vit_b_224").img_size == 224


def test_bad_configs_are_rejected(tmp_path):
    with pytest.raises(HSAMError, match="no model config 'vit_q'"):
        load_model_config("vit_q")
    bad = tmp_path / "bad.json"
    bad.write_text('{"backbone": "vit_b", "img_szie": 512}')
    with pytest.raises(HSAMError, match="img_szie"):
        load_model_config(bad)
    with pytest.raises(ValueError, match="multiple of 16"):
        ModelConfig(img_size=500)
    with pytest.raises(ValueError, match="cmattn"):
        ModelConfig(cmattn="softmax")
    with pytest.raises(ValueError, match="keep_cmattn_tensors"):
        ModelConfig(cmattn="mask_guided", keep_cmattn_tensors=False)
    with pytest.raises(ValueError, match="unknown backbone 'vit_x'"):
        build_hsam(ModelConfig(backbone="vit_x"), device="meta")


# ---------------------------------------------------------------- parameter counts (§1.8), on the meta device


def test_parameter_counts_vit_b_512_match_the_released_model():
    model = build_hsam(load_model_config("vit_b_512"), device="meta")
    counts = model.parameter_counts()
    assert counts["image_encoder"] == 87_463_168
    assert counts["lora"] == 184_320
    assert counts["prompt_encoder"] == 8_012
    assert counts["mask_decoder"] == 4_759_945
    assert counts["mask_decoder2"] == 19_051_259
    assert counts["cmattn"] == 12_598_282
    assert counts["total"] == 111_282_384
    assert counts["trainable"] == 24_003_536
    assert counts["total_without_cmattn"] == 111_282_384 - 12_598_282
    assert counts["trainable_without_cmattn"] == 24_003_536 - 12_598_282

    d1, d2 = model.mask_decoder, model.mask_decoder2
    assert count(d1.transformer) == 3_291_264
    assert count(d1.output_hypernetworks_mlps) == 1_258_272
    assert count(d1.output_upscaling) == 73_952
    assert count(d1.iou_prediction_head) == 133_897
    assert d1.iou_token.weight.numel() + d1.mask_tokens.weight.numel() == 2_560
    assert count(d2.transformer2) == 3_826_920
    assert count(d2.output_hypernetworks_mlps2) == 2_405_520
    assert count(d2.output_upscaling) == 73_952
    assert count(d2.skip_connect) == 10_384
    assert count(d2.iou_prediction_head) == 133_897
    assert d2.mask_tokens.weight.numel() == 2_304
    # Without the dead branch the stage-2 decoder and the whole model shrink by exactly its size.
    lean = build_hsam(ModelConfig(keep_cmattn_tensors=False), device="meta").parameter_counts()
    assert lean["total"] == 111_282_384 - 12_598_282 and lean["trainable"] == 24_003_536 - 12_598_282


def test_parameter_counts_vit_b_224_match_the_released_model():
    counts = build_hsam(load_model_config("vit_b_224"), device="meta").parameter_counts()
    assert counts["total"] == 99_144_516
    assert counts["trainable"] == 12_520_004


def test_only_lora_prompt_encoder_and_decoders_are_trainable():
    model = build_hsam(load_model_config("vit_b_512"), device="meta")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    encoder = {name for name in trainable if name.startswith("image_encoder.")}
    assert len(encoder) == 48 and all(".attn.qkv.linear_" in name for name in encoder)
    others = {name for name, _ in model.named_parameters() if not name.startswith("image_encoder.")}
    assert others <= trainable


# ---------------------------------------------------------------- shapes (§1.1-1.7)


@pytest.mark.parametrize("size", [512, 256])
def test_vit_b_shapes_on_meta(size):
    model = build_hsam(ModelConfig(img_size=size), device="meta").eval()
    images = torch.empty(2, 3, size, size, device="meta")
    assert model.image_encoder.patch_embed(images).shape == (2, size // 16, size // 16, 768)
    embedding = model.image_encoder(images)
    assert embedding.shape == (2, 256, size // 16, size // 16)
    stage1, stage2 = model(images)
    assert stage1["masks"].shape == (2, 9, size, size)
    assert stage1["low_res_logits"].shape == (2, 9, size // 4, size // 4)
    assert stage1["iou_predictions"].shape == (2, 9)
    assert stage2["masks"].shape == (2, 9, size, size)
    assert stage2["low_res_logits"].shape == (2, 9, size, size)
    assert stage2["iou_predictions"].shape == (2, 9)
    grid = size // 16
    global_block, window_block = model.image_encoder.blocks[2], model.image_encoder.blocks[0]
    assert global_block.attn.rel_pos_h.shape == (2 * grid - 1, 64)
    assert window_block.attn.rel_pos_h.shape == (27, 64)
    assert model.image_encoder.pos_embed.shape == (1, grid, grid, 768)


@pytest.mark.parametrize("size", [512, 256])
def test_decoder_internal_shapes(size):
    """Real forward of every decoder part at 512 and 256 (tiny backbone; the decoders are the full-size ones)."""
    model = build_hsam(tiny(img_size=size)).eval()
    grid = size // 16
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        embedding = model.image_encoder(images)
        assert embedding.shape == (2, 256, grid, grid)
        dense, pe = model.prompt_encoder()
        assert dense.shape == pe.shape == (1, 256, grid, grid)
        s1 = model.mask_decoder(embedding, pe, dense, want_class_maps=True)
        assert s1.logits.shape == (2, 9, 4 * grid, 4 * grid)
        assert s1.up_embed.shape == (2, 32, 4 * grid, 4 * grid)
        assert s1.iou.shape == (2, 9)
        assert s1.class_maps.shape == (2, 9, grid * grid)
        prior = prior_from_logits(s1.logits, (grid, grid))
        assert prior.shape == (2, 9, grid * grid)
        torch.testing.assert_close(prior.sum(1), torch.ones(2, grid * grid))
        logits2, iou2 = model.mask_decoder2(embedding, pe, dense, prior, s1.up_embed)
        assert logits2.shape == (2, 9, size, size) and iou2.shape == (2, 9)
        fused = model.predict(images)
    assert fused.shape == (2, 9, size, size)
    assert torch.isfinite(fused).all()


def test_one_channel_input_and_wrong_size():
    model = build_hsam(tiny()).eval()
    gray = torch.rand(1, 1, 128, 128)
    torch.testing.assert_close(model.predict(gray), model.predict(gray.expand(-1, 3, -1, -1)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"expected images \[B,3,128,128\]"):
        model.predict(torch.rand(1, 3, 96, 96))


# ---------------------------------------------------------------- behaviour


def test_eval_outputs_are_deterministic_and_batch_independent():
    model = build_hsam(tiny()).eval()
    images = torch.rand(2, 3, 128, 128)
    first, second = model.predict(images), model.predict(images)
    assert torch.equal(first, second)
    torch.testing.assert_close(model.predict(images[1:]), first[1:], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(first[0], first[1])  # the two images give different outputs


def test_stage3_is_the_mean_of_both_stages():
    model = build_hsam(tiny()).eval()
    images = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        stage1, stage2 = model(images)
    expected = torch.nn.functional.interpolate(stage1["low_res_logits"], (128, 128), mode="bilinear", align_corners=False)
    assert torch.equal(stage1["masks"], expected)
    assert torch.equal(model.predict(images), (stage1["masks"] + stage2["masks"]) / 2)


def test_embedding_noise_touches_stage2_only():
    model = build_hsam(tiny()).eval()
    images = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        clean1, clean2 = model(images)
        noisy1, noisy2 = model(images, embedding_noise=0.2)
    assert torch.equal(clean1["masks"], noisy1["masks"])
    assert not torch.allclose(clean2["masks"], noisy2["masks"])


def test_stage2_loss_reaches_stage1_through_the_prior():
    """P is not detached (§1.6): a stage-2-only loss has gradients on stage-1 parameters."""
    model = build_hsam(tiny()).train()
    _, stage2 = model(torch.rand(1, 3, 128, 128))
    stage2["masks"].logsumexp(1).mean().backward()
    assert model.mask_decoder.mask_tokens.weight.grad.abs().sum() > 0
    assert model.mask_decoder.output_hypernetworks_mlps[3].layers[0].weight.grad.abs().sum() > 0
    lora_b = model.image_encoder.blocks[1].attn.qkv.linear_b_v.weight
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0  # B starts at zero, its gradient does not
    assert model.image_encoder.blocks[1].attn.qkv.qkv.weight.grad is None  # frozen base
    # constant CMAttn: the dead branch gets no gradient at all
    assert all(p.grad is None for p in model.mask_decoder2.self_attn.parameters())


@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm_2d_is_sams_function_and_gradient(channels_last):
    """The fused LayerNorm2d computes SAM's elementwise LayerNorm2d, forward and backward, in either memory layout."""
    from hsam.model.common import LayerNorm2d
    from hsam.model.sam_compat import modeling

    ours, sams = LayerNorm2d(16), modeling().common.LayerNorm2d(16)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    sams.load_state_dict(ours.state_dict())  # same parameter names: checkpoints load into either
    x = torch.randn(2, 16, 9, 7) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ours, x_sams = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_sams = ours(x_ours), sams(x_sams)
    torch.testing.assert_close(out_ours, out_sams, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(out_sams)
    (out_ours * upstream).sum().backward()
    (out_sams * upstream).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_sams.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.weight.grad, sams.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, sams.bias.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_gradient_in_the_inputs_layout_is_the_vectorized_gelu_gradient(dtype):
    """hsam's GELU is F.gelu forward; its backward, given a gradient laid out unlike the (channels-last) input, equals
    PyTorch's GELU gradient computed with both in the input's layout, bit for bit, in fp32 and in bf16."""
    from hsam.model.common import GELU

    x = (torch.randn(2, 8, 16, 16) * 4).to(dtype).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(2, 8, 16, 16).to(dtype)  # contiguous, as from the hypernetwork product
    ours = x.clone().requires_grad_()
    out = GELU()(ours)
    assert torch.equal(out, torch.nn.functional.gelu(x))
    out.backward(upstream)
    reference = x.clone().requires_grad_()
    torch.nn.functional.gelu(reference).backward(upstream.contiguous(memory_format=torch.channels_last))
    assert torch.equal(ours.grad, reference.grad)
    plain = x.clone().requires_grad_()
    torch.nn.functional.gelu(plain).backward(upstream)
    torch.testing.assert_close(ours.grad, plain.grad, rtol=1e-2, atol=1e-2)  # the same function, other rounding
    with torch.no_grad():
        assert torch.equal(GELU()(x), torch.nn.functional.gelu(x))


# ---------------------------------------------------------------- LoRA


def test_lora_adapts_q_and_v_only_and_merges_exactly():
    model = build_hsam(tiny()).eval()
    adapters = lora_modules(model)
    assert len(adapters) == 2 and all(isinstance(a, LoRAQKV) and a.rank == 2 for a in adapters)
    adapter = adapters[0]
    x = torch.rand(1, 4, 4, 32)
    with torch.no_grad():
        base = adapter.qkv(x)
        assert torch.equal(adapter(x), base)  # B = 0 at init: no change
        for p in adapter.lora_parameters():
            p.normal_()
        out = adapter(x)
    dim = adapter.dim
    assert not torch.allclose(out[..., :dim], base[..., :dim])  # q adapted
    assert torch.equal(out[..., dim : 2 * dim], base[..., dim : 2 * dim])  # k untouched
    assert not torch.allclose(out[..., 2 * dim :], base[..., 2 * dim :])  # v adapted
    expected_q = base[..., :dim] + x @ adapter.linear_a_q.weight.T @ adapter.linear_b_q.weight.T
    torch.testing.assert_close(out[..., :dim], expected_q)

    images = torch.rand(1, 3, 128, 128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = model.predict(images)
    model.merge_lora()
    assert adapter.merged
    torch.testing.assert_close(model.predict(images), unmerged, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # files never see merged weights
    model.unmerge_lora()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model.predict(images), unmerged)


# ---------------------------------------------------------------- CMAttn (§1.5)


def test_released_cmattn_is_exactly_one_with_zero_gradient():
    model = build_hsam(tiny(img_size=512)).train()  # width 1024 as released
    decoder = model.mask_decoder2
    class_maps = torch.randn(2, 9, 1024) * 10
    gain = released_gain(decoder, class_maps, (32, 32))
    assert gain.shape == (2, 1, 32, 32)
    assert torch.equal(gain, torch.ones_like(gain))
    (gain * torch.randn_like(gain)).sum().backward()
    grads = [p.grad for name in ("self_attn", "self_attn2", "mlp", "med_sel") for p in getattr(decoder, name).parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


def test_mask_guided_cmattn_is_a_real_attention():
    torch.manual_seed(1)
    constant = build_hsam(tiny(cmattn="constant")).eval()
    guided = build_hsam(tiny(cmattn="mask_guided")).eval()
    guided.load_state_dict(constant.state_dict())  # same tensors, different computation
    images = torch.rand(1, 3, 128, 128)
    assert not torch.allclose(constant.predict(images), guided.predict(images))
    class_maps, prior = torch.randn(2, 9, 64), torch.softmax(torch.randn(2, 9, 64), dim=1)
    gain = mask_guided_gain(guided.mask_decoder2, class_maps, prior, (8, 8))
    assert gain.shape == (2, 1, 8, 8) and (gain >= 0).all()
    torch.testing.assert_close(gain.mean(dim=(1, 2, 3)), torch.ones(2))
    assert gain.std() > 0
    guided.train()
    _, stage2 = guided(images)
    stage2["masks"].logsumexp(1).mean().backward()
    assert guided.mask_decoder2.self_attn.q_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- registry


class _PatchConv(nn.Module):
    """A real (if trivial) backbone: one 16x16 stride-16 conv to 256 channels."""

    stride = 16

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 256, 16, 16)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images)


def test_backbone_registry_builds_a_registered_backbone():
    register_backbone("patch_conv_test", lambda config: _PatchConv(), replace=True)
    assert {"vit_b", "vit_l", "vit_h", "vit_tiny", "patch_conv_test"} <= set(available_backbones())
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("patch_conv_test", lambda config: _PatchConv())
    model = build_hsam(ModelConfig(backbone="patch_conv_test", img_size=64, num_classes=3, lora_rank=0)).eval()
    assert isinstance(model.image_encoder, _PatchConv) and model.num_outputs == 4
    assert model.predict(torch.rand(1, 3, 64, 64)).shape == (1, 4, 64, 64)
