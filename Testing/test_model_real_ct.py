"""The network on real CT slices (TotalSegmentator example CT): windowed as H-SAM expects, through both stages."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from hsam.model.build import build_hsam
from hsam.model.config import load_model_config



def windowed_slices(real_data, indices, size: int) -> torch.Tensor:
    """Axial slices [N,3,size,size]: HU clipped to [-125, 275], scaled to [0, 1], resized, copied to 3 channels."""
    image = sitk.ReadImage(str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz"))
    array = sitk.GetArrayFromImage(image).astype(np.float32)  # [z, y, x]
    slices = torch.from_numpy((np.clip(array[list(indices)], -125.0, 275.0) + 125.0) / 400.0)
    slices = F.interpolate(slices[:, None], (size, size), mode="bilinear", align_corners=False)
    return slices.expand(-1, 3, -1, -1).contiguous()


def test_tiny_model_on_real_ct_slices(real_data):
    torch.manual_seed(0)
    model = build_hsam(load_model_config("vit_tiny")).eval()
    images = windowed_slices(real_data, (10, 20), model.img_size)
    assert images.shape == (2, 3, 128, 128)
    assert 0.0 <= images.min() and images.max() <= 1.0 and 0.05 < images.mean() < 0.95  # body in the window

    with torch.no_grad():
        stage1, stage2 = model(images)
    assert stage1["masks"].shape == stage2["masks"].shape == (2, 9, 128, 128)
    assert stage1["low_res_logits"].shape == (2, 9, 32, 32)
    fused = model.predict(images)
    assert fused.shape == (2, 9, 128, 128) and torch.isfinite(fused).all()
    labels = fused.argmax(1)
    assert labels.min() >= 0 and labels.max() <= 8
    # the slices differ, so do the outputs; each slice's output does not depend on its batch neighbour
    assert not torch.allclose(fused[0], fused[1])
    torch.testing.assert_close(model.predict(images[1:]), fused[1:], rtol=1e-4, atol=1e-4)
    assert torch.equal(model.predict(images), fused)  # deterministic


@pytest.mark.slow
def test_vit_b_512_on_a_real_ct_slice(real_data):
    torch.manual_seed(0)
    model = build_hsam(load_model_config("vit_b_512")).eval()
    model.merge_lora()
    images = windowed_slices(real_data, (15,), 512)
    fused = model.predict(images)
    assert fused.shape == (1, 9, 512, 512) and torch.isfinite(fused).all()
