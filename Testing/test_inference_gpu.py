"""segment_volume on a CUDA GPU: half precision, agreement with the CPU, out-of-memory halving and CPU fallback.

Skipped without CUDA. Uses the real tiny H-SAM (seeded random weights) on the real CT.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hsam.pipeline.options import SegmentOptions
from hsam.pipeline.run import segment_volume
from hsam.labels import CLASS_NAMES
from hsam.volume import read_image, same_geometry

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture()
def tiny():
    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard
    from hsam.model.config import load_model_config

    torch.manual_seed(0)
    config = load_model_config("vit_tiny")
    return build_hsam(config).eval(), ModelCard.for_config(config, "tiny-random", classes=list(CLASS_NAMES))


@pytest.fixture(scope="module")
def ct(real_data):
    return read_image(real_data / "totalsegmentator" / "example_ct_sm.nii.gz")


def test_cuda_matches_cpu_and_half_precision_runs(tiny, ct):
    model, card = tiny
    cpu = segment_volume(ct, model, card, SegmentOptions(device="cpu"))
    gpu = segment_volume(ct, model, card, SegmentOptions(device="cuda", precision="fp32"))
    assert gpu.device.startswith("cuda") and same_geometry(gpu.labels, ct, 0.0)
    agreement = (sitk.GetArrayViewFromImage(gpu.labels) == sitk.GetArrayViewFromImage(cpu.labels)).mean()
    assert agreement > 0.99
    half_name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    half = segment_volume(ct, model, card, SegmentOptions(device="auto", precision=half_name))
    assert half.device.startswith("cuda") and half.precision in ("bf16", "fp16")
    assert same_geometry(half.labels, ct, 0.0)
    # auto follows the one precision rule (hsam.engines.modes.GPU_AUTO): fp32 until a half precision has met it
    from hsam.engines.modes import gpu_precision

    auto = segment_volume(ct, model, card, SegmentOptions(device="auto"))
    assert auto.precision == gpu_precision("cuda", torch.cuda.is_bf16_supported())[0]


def test_out_of_memory_halves_the_batch_then_falls_back_to_cpu(tiny, ct, caplog):
    model, card = tiny
    model.to("cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    # cap the allocator just above the weights: every forward pass runs out of memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + (1 << 20)) / total)
    try:
        with caplog.at_level(logging.WARNING, logger="hsam.pipeline.engine"), pytest.warns(RuntimeWarning, match="CPU"):
            result = segment_volume(ct, model, card, SegmentOptions(device="cuda", batch_size=8, precision="fp32"))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "retrying" in m] == [f"out of GPU memory: retrying with batch size {b}" for b in (4, 2, 1)]
    assert result.device == "cpu" and any("continuing on the CPU" in w for w in result.warnings)
    # after the fallback the run continues in speed mode "fast" on the CPU (no export or quantisation mid-run)
    assert result.mode == "fast"
    reference = segment_volume(ct, model, card, SegmentOptions(device="cpu", mode="fast", batch_size=8))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result.labels), sitk.GetArrayViewFromImage(reference.labels))
