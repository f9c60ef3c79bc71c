"""The network on a CUDA device: same results as on the CPU, training step, loading onto the GPU, ViT-B speed."""

from __future__ import annotations

import time

import pytest
import torch

from hsam.model.build import build_hsam
from hsam.model.checkpoint import ModelCard, load_model, save_model
from hsam.model.config import load_model_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _exact_float32():
    # Compare against the CPU in true float32 (no TF32 shortcuts in matmuls and convolutions).
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tiny_model_gives_the_cpu_result_on_cuda():
    torch.manual_seed(0)
    model = build_hsam(load_model_config("vit_tiny")).eval()
    images = torch.rand(2, 3, 128, 128)
    expected = model.predict(images)
    model.cuda()
    got = model.predict(images.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-3)
    model.merge_lora()  # merging on the device keeps the unmerged copy there too
    torch.testing.assert_close(model.predict(images.cuda()).cpu(), expected, rtol=1e-3, atol=1e-3)


def test_training_step_on_cuda():
    torch.manual_seed(0)
    model = build_hsam(load_model_config("vit_tiny")).cuda().train()
    stage1, stage2 = model(torch.rand(2, 3, 128, 128, device="cuda"), embedding_noise=0.2)
    (stage1["low_res_logits"].logsumexp(1).mean() + stage2["low_res_logits"].logsumexp(1).mean()).backward()
    lora_b = model.image_encoder.blocks[0].attn.qkv.linear_b_q.weight
    assert lora_b.grad is not None and lora_b.grad.is_cuda and lora_b.grad.abs().sum() > 0


def test_load_model_onto_cuda(tmp_path):
    torch.manual_seed(0)
    model = build_hsam(load_model_config("vit_tiny")).eval()
    folder = save_model(model, ModelCard.for_config(model.config, "tiny"), tmp_path / "tiny")
    loaded, _ = load_model(folder, device="cuda")
    assert all(p.is_cuda for p in loaded.parameters()) and all(b.is_cuda for b in loaded.buffers())
    images = torch.rand(1, 3, 128, 128)
    torch.testing.assert_close(loaded.predict(images.cuda()).cpu(), model.predict(images), rtol=1e-3, atol=1e-3)


def test_vit_b_512_on_cuda_fp32_and_bf16():
    torch.manual_seed(0)
    model = build_hsam(load_model_config("vit_b_512")).cuda().eval()
    model.merge_lora()
    images = torch.rand(8, 3, 512, 512, device="cuda")
    timings = {}
    outputs = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            for _ in range(2):
                model.predict(images)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(5):
                outputs[name] = model.predict(images)
            torch.cuda.synchronize()
        timings[name] = (time.perf_counter() - start) / 5 / images.shape[0]
    print(f"\nViT-B/512 predict on {torch.cuda.get_device_name()}: "
          + ", ".join(f"{k} {v * 1000:.1f} ms/slice (batch 8)" for k, v in timings.items())
          + f"; peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    assert outputs["fp32"].shape == (8, 9, 512, 512) and torch.isfinite(outputs["bf16"]).all()
    agreement = (outputs["fp32"].argmax(1) == outputs["bf16"].float().argmax(1)).float().mean().item()
    print(f"bf16 vs fp32 argmax agreement (random weights): {agreement:.4f}")
    assert agreement > 0.5
