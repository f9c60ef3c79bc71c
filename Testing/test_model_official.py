"""Official checkpoints in and out (hsam-model.md §4), with random weights in the exact released file layouts.

* SAM base: the key names and shapes of ``segment_anything``'s ``sam_model_registry["vit_b"]()`` state dict.
* H-SAM: the 489-key layout written out below from §4 by hand (checked against the measured key list
  ``hsam-official-checkpoint-keys.tsv`` when the design folder is next to the repository), saved the way the
  released trainer saves it (LoRA tensors as ``nn.Parameter``, ``prompt_encoder2.*`` the same tensors as
  ``prompt_encoder.*``).
"""

from __future__ import annotations

import functools
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPOSITORY, one_line_error
from hsam.model.build import build_hsam
from hsam.model.checkpoint import load_model, save_model
from hsam.model.config import ModelConfig, load_model_config
from hsam.model.official import (
    export_official,
    import_official,
    init_from_sam,
    load_pth,
    official_key_map,
    sam_to_model_key,
)
from hsam.model.sam_compat import build_sam, modeling


KEYS_TSV = REPOSITORY.parent / "shared" / "design" / "hsam-official-checkpoint-keys.tsv"

# ------------------------------------------------------------------------------------------------ layouts


def official_layout(depth=12, dim=768, rank=5, k=9, width=1024) -> list[tuple[str, tuple[int, ...]]]:
    """The released H-SAM file's keys and shapes (§4), written out independently of hsam.model."""
    out: list[tuple[str, tuple[int, ...]]] = []
    out += [(f"w_a_{i:03d}", (rank, dim)) for i in range(2 * depth)]
    out += [(f"w_b_{i:03d}", (dim, rank)) for i in range(2 * depth)]

    def linear(prefix, n_out, n_in):
        return [(f"{prefix}.weight", (n_out, n_in)), (f"{prefix}.bias", (n_out,))]

    def norm(prefix, n):
        return [(f"{prefix}.weight", (n,)), (f"{prefix}.bias", (n,))]

    def attention(prefix, inner, embed=256, dead_norms=False):
        rows = []
        for name in ("q", "k", "v"):
            rows += linear(f"{prefix}.{name}_proj", inner, embed)
        rows += linear(f"{prefix}.out_proj", embed, inner)
        if dead_norms:
            rows += norm(f"{prefix}.norm1", 196) + norm(f"{prefix}.norm2", 9) + norm(f"{prefix}.norm3", 1024)
        return rows

    def transformer(prefix, cross, dead_norms):
        rows = []
        for layer in range(2):
            p = f"{prefix}.layers.{layer}"
            rows += attention(f"{p}.self_attn", 256) + norm(f"{p}.norm1", 256)
            rows += attention(f"{p}.cross_attn_token_to_image", cross, dead_norms=dead_norms) + norm(f"{p}.norm2", 256)
            rows += linear(f"{p}.mlp.lin1", 2048, 256) + linear(f"{p}.mlp.lin2", 256, 2048)
            rows += norm(f"{p}.norm3", 256) + norm(f"{p}.norm4", 256)
            rows += attention(f"{p}.cross_attn_image_to_token", cross, dead_norms=dead_norms)
        return rows + attention(f"{prefix}.final_attn_token_to_image", 128) + norm(f"{prefix}.norm_final_attn", 256)

    def mlp(prefix, sizes):
        rows = []
        for i, (n_out, n_in) in enumerate(sizes):
            rows += linear(f"{prefix}.layers.{i}", n_out, n_in)
        return rows

    def upscaling(prefix):
        return [
            (f"{prefix}.0.weight", (256, 64, 2, 2)), (f"{prefix}.0.bias", (64,)),
            (f"{prefix}.1.weight", (64,)), (f"{prefix}.1.bias", (64,)),
            (f"{prefix}.3.weight", (64, 32, 2, 2)), (f"{prefix}.3.bias", (32,)),
        ]

    for prefix in ("prompt_encoder", "prompt_encoder2"):
        out.append((f"{prefix}.pe_layer.positional_encoding_gaussian_matrix", (2, 128)))
        out += [(f"{prefix}.point_embeddings.{i}.weight", (1, 256)) for i in range(11)]
        out.append((f"{prefix}.not_a_point_embed.weight", (1, 256)))
        out += [
            (f"{prefix}.mask_downscaling.0.weight", (4, 1, 2, 2)), (f"{prefix}.mask_downscaling.0.bias", (4,)),
            (f"{prefix}.mask_downscaling.1.weight", (4,)), (f"{prefix}.mask_downscaling.1.bias", (4,)),
            (f"{prefix}.mask_downscaling.3.weight", (16, 4, 2, 2)), (f"{prefix}.mask_downscaling.3.bias", (16,)),
            (f"{prefix}.mask_downscaling.4.weight", (16,)), (f"{prefix}.mask_downscaling.4.bias", (16,)),
            (f"{prefix}.mask_downscaling.6.weight", (256, 16, 1, 1)), (f"{prefix}.mask_downscaling.6.bias", (256,)),
        ]
        out.append((f"{prefix}.no_mask_embed.weight", (1, 256)))

    d1 = "mask_decoder"
    out += transformer(f"{d1}.transformer", 128, dead_norms=False)
    out += [(f"{d1}.iou_token.weight", (1, 256)), (f"{d1}.mask_tokens.weight", (k, 256))]
    out += upscaling(f"{d1}.output_upscaling")
    for i in range(k):
        out += mlp(f"{d1}.output_hypernetworks_mlps.{i}", [(256, 256), (256, 256), (32, 256)])
    out += mlp(f"{d1}.iou_prediction_head", [(256, 256), (256, 256), (k, 256)])

    d2 = "mask_decoder2"
    out += transformer(f"{d2}.transformer2", 256, dead_norms=True)
    out.append((f"{d2}.mask_tokens.weight", (k, 256)))
    out += upscaling(f"{d2}.output_upscaling")
    out += [
        (f"{d2}.skip_connect.0.weight", (64, 32, 2, 2)), (f"{d2}.skip_connect.0.bias", (32,)),
        (f"{d2}.skip_connect.1.weight", (32,)), (f"{d2}.skip_connect.1.bias", (32,)),
        (f"{d2}.skip_connect.3.weight", (32, 16, 2, 2)), (f"{d2}.skip_connect.3.bias", (16,)),
        (f"{d2}.skip_connect.4.weight", (16,)), (f"{d2}.skip_connect.4.bias", (16,)),
    ]
    for i in range(k):
        out += mlp(f"{d2}.output_hypernetworks_mlps2.{i}", [(256, 256)] * 4 + [(16, 256)])
    out += mlp(f"{d2}.iou_prediction_head", [(256, 256), (256, 256), (k, 256)])
    out += linear(f"{d2}.med_sel.0", 1, k)
    out += attention(f"{d2}.self_attn", width, embed=width) + norm(f"{d2}.norm1", width)
    out += attention(f"{d2}.self_attn2", width, embed=width) + norm(f"{d2}.norm2", width)
    out += linear(f"{d2}.mlp.lin1", 2048, width) + linear(f"{d2}.mlp.lin2", width, 2048)
    return out


TINY = dict(depth=2, dim=32, rank=2, k=9, width=64)  # vit_tiny at 128: grid 8
SCALE = 0.05  # random weights of a sensible size keep activations (and the forward pass) well-behaved


def random_official_state(layout, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random tensors in ``layout``, as the released trainer's ``save_lora_parameters`` puts them in its dict."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in layout:
        if key.startswith("prompt_encoder2."):
            # the same module registered twice: state_dict() gives a second tensor object on the same storage
            state[key] = state["prompt_encoder." + key[len("prompt_encoder2.") :]].detach()
        elif key.startswith("w_"):
            state[key] = nn.Parameter(torch.randn(shape, generator=generator) * SCALE)
        else:
            state[key] = torch.randn(shape, generator=generator) * SCALE
    return state


def random_official_file(path: Path, layout, seed: int = 1, edit=None, state=None) -> dict[str, torch.Tensor]:
    """Save (a copy of) ``state`` or fresh random tensors in ``layout``, optionally edited; returns what was saved."""
    state = dict(state) if state is not None else random_official_state(layout, seed)
    if edit is not None:
        edit(state)
    torch.save(state, path)
    return state


@functools.lru_cache(maxsize=None)
def sam_layout(backbone: str = "vit_b") -> dict[str, tuple[int, ...]]:
    """Key names and shapes of segment_anything's SAM state dict (built on the meta device: no memory)."""
    if backbone == "vit_b":
        with torch.device("meta"):
            sam = build_sam().sam_model_registry["vit_b"]()
    else:  # SAM's own builder, with the tiny test ViT as encoder
        from hsam.model.image_encoder import VIT_SPECS, SamViTEncoder

        m = modeling()
        with torch.device("meta"):
            sam = m.Sam(
                image_encoder=SamViTEncoder(VIT_SPECS[backbone], 1024),
                prompt_encoder=m.PromptEncoder(
                    embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
                ),
                mask_decoder=m.MaskDecoder(
                    num_multimask_outputs=3,
                    transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                    transformer_dim=256,
                    iou_head_depth=3,
                    iou_head_hidden_dim=256,
                ),
            )
    return {k: tuple(v.shape) for k, v in sam.state_dict().items()}


def random_sam_file(path: Path, backbone: str, seed: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=generator) * SCALE for k, shape in sam_layout(backbone).items()}
    torch.save(state, path)
    return state


def expected_from_sam(key: str, tensor: torch.Tensor, grid: int, global_blocks) -> torch.Tensor:
    """What the released loader makes of SAM tensor ``key`` at embedding grid ``grid`` (§1.1)."""
    if key == "image_encoder.pos_embed":
        return F.interpolate(tensor.permute(0, 3, 1, 2), (grid, grid), mode="bilinear", align_corners=False).permute(
            0, 2, 3, 1
        )
    parts = key.split(".")
    if "rel_pos" in key and int(parts[2]) in global_blocks:
        return F.interpolate(tensor[None, None], (2 * grid - 1, tensor.shape[1]), mode="bilinear", align_corners=False)[0, 0]
    return tensor


# ------------------------------------------------------------------------------------------------ layout tests


def test_official_layout_is_the_measured_one():
    layout = official_layout()
    assert len(layout) == 489
    assert sum(math.prod(shape) for _, shape in layout) == 24_012_060
    if not KEYS_TSV.is_file():
        pytest.skip(f"{KEYS_TSV} not found (design folder not next to the repository)")
    measured = [line.split("\t") for line in KEYS_TSV.read_text().splitlines() if line.strip()]
    assert [(k, tuple(int(n) for n in s.strip("()").split(",") if n.strip())) for k, s in measured] == layout


@pytest.mark.parametrize(("img_size", "width"), [(512, 1024), (224, 196)])
def test_model_keys_map_one_to_one_onto_the_official_layout(img_size, width):
    model = build_hsam(ModelConfig(img_size=img_size), device="meta")
    own = model.state_dict()
    pairs = official_key_map(model)
    assert [(official, tuple(own[key].shape)) for official, key in pairs] == official_layout(width=width)
    # Every model tensor outside the frozen encoder is in the file; names are equal except LoRA and prompt_encoder2.
    mapped = {key for _, key in pairs}
    assert mapped == {k for k in own if not k.startswith("image_encoder.") or ".linear_" in k}
    assert all(o == k for o, k in pairs if not o.startswith(("w_", "prompt_encoder2.")))


def test_every_sam_tensor_has_its_place():
    model = build_hsam(load_model_config("vit_b_512"), device="meta")
    own = model.state_dict()
    sam = sam_layout("vit_b")
    assert len(sam) == 177 + 17 + 120  # encoder + prompt encoder (4 point embeddings) + SAM decoder
    different = {}
    for key, shape in sam.items():
        target = sam_to_model_key(key, own)
        assert target in own, key
        if tuple(own[target].shape) != shape:
            different[key] = (shape, tuple(own[target].shape))
    assert different == {
        "image_encoder.pos_embed": ((1, 64, 64, 768), (1, 32, 32, 768)),
        **{
            f"image_encoder.blocks.{b}.attn.rel_pos_{a}": ((127, 64), (63, 64))
            for b in (2, 5, 8, 11)
            for a in "hw"
        },
        "mask_decoder.mask_tokens.weight": ((4, 256), (9, 256)),
        "mask_decoder.iou_prediction_head.layers.2.weight": ((4, 256), (9, 256)),
        "mask_decoder.iou_prediction_head.layers.2.bias": ((4,), (9,)),
    }


# ------------------------------------------------------------------------------------------------ ViT-B import


@pytest.fixture(scope="module")
def vit_b_import(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    sam_path, hsam_path = folder / "sam_vit_b_01ec64.pth", folder / "epoch_299.pth"
    sam = random_sam_file(sam_path, "vit_b")
    official = random_official_file(hsam_path, official_layout())
    model, card = import_official(hsam_path, sam_path, "hsam-vitb-synapse")
    return model, card, sam, official, sam_path, hsam_path


def test_vit_b_import_puts_every_tensor_in_its_place(vit_b_import):
    model, card, sam, official, sam_path, hsam_path = vit_b_import
    own = model.state_dict()
    global_blocks = (2, 5, 8, 11)
    encoder_keys = [k for k in own if k.startswith("image_encoder.") and ".linear_" not in k]
    for key in encoder_keys:  # the frozen encoder: all from SAM, positional tensors resized
        sam_key = key.replace(".attn.qkv.qkv.", ".attn.qkv.")
        assert torch.equal(own[key], expected_from_sam(sam_key, sam[sam_key], 32, global_blocks)), key
    for block in range(12):  # LoRA: w_a/w_b 2i = q, 2i+1 = v
        adapter = f"image_encoder.blocks.{block}.attn.qkv"
        for offset, part in enumerate("qv"):
            assert torch.equal(own[f"{adapter}.linear_a_{part}.weight"], official[f"w_a_{2 * block + offset:03d}"])
            assert torch.equal(own[f"{adapter}.linear_b_{part}.weight"], official[f"w_b_{2 * block + offset:03d}"])
    for key in own:
        if key.startswith(("prompt_encoder.", "mask_decoder.", "mask_decoder2.")):
            source = "prompt_encoder2." + key[len("prompt_encoder.") :] if key.startswith("prompt_") else key
            assert torch.equal(own[key], official[source]), key
    assert len(own) == len(encoder_keys) + len(official) - 24  # nothing else

    counts = model.parameter_counts()
    assert (counts["total"], counts["trainable"], counts["cmattn"]) == (111_282_384, 24_003_536, 12_598_282)
    assert card.backbone == "vit_b" and card.img_size == 512 and card.lora_rank == 5 and card.num_outputs == 9
    assert card.classes[1:] == ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta", "pancreas"]
    assert card.window == [-125.0, 275.0] and card.orientation == "LPS"
    assert card.extra["source"]["hsam_checkpoint"] == "epoch_299.pth"
    assert not model.training


def test_vit_b_export_reproduces_the_file_bit_for_bit(vit_b_import, tmp_path):
    model, _, _, _, _, hsam_path = vit_b_import
    exported = export_official(model, tmp_path / hsam_path.name)
    assert exported.read_bytes() == hsam_path.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [hsam_path.name]  # no temp file left


def test_sam_init_reproduces_the_failed_strict_load(vit_b_import):
    """Which stage-1 heads end up from SAM when training starts from SAM weights (§4 step 1)."""
    _, _, sam, _, sam_path, _ = vit_b_import
    torch.manual_seed(0)
    model = build_hsam(load_model_config("vit_b_512"))
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("image_encoder.")}
    report = init_from_sam(model, sam, str(sam_path))
    own = model.state_dict()
    d1 = "mask_decoder"
    from_sam = [f"{d1}.output_hypernetworks_mlps.{i}.layers.{j}.{w}" for i in range(4) for j in range(3) for w in ("weight", "bias")]
    from_sam += [f"{d1}.iou_prediction_head.layers.{j}.{w}" for j in range(2) for w in ("weight", "bias")]
    from_sam += [f"{d1}.iou_token.weight", f"{d1}.transformer.layers.1.norm4.bias", "prompt_encoder.no_mask_embed.weight"]
    from_sam += [f"prompt_encoder.point_embeddings.{i}.weight" for i in range(4)]
    for key in from_sam:
        assert key in report.copied and torch.equal(own[key], sam[key]), key
    stay = [f"{d1}.mask_tokens.weight", f"{d1}.iou_prediction_head.layers.2.weight", f"{d1}.iou_prediction_head.layers.2.bias"]
    assert sorted(report.kept) == sorted(stay)
    stay += [f"{d1}.output_hypernetworks_mlps.{i}.layers.0.weight" for i in range(4, 9)]
    stay += [f"prompt_encoder.point_embeddings.{i}.weight" for i in range(4, 11)]
    stay += [k for k in before if k.startswith("mask_decoder2.")]
    for key in stay:
        assert torch.equal(own[key], before[key]), key
    lora = [k for k in own if ".linear_b_" in k]
    assert all(torch.count_nonzero(own[k]) == 0 for k in lora)  # LoRA untouched (B still zero)
    assert sorted(report.resized) == sorted(
        ["image_encoder.pos_embed"]
        + [f"image_encoder.blocks.{b}.attn.rel_pos_{a}" for b in (2, 5, 8, 11) for a in "hw"]
    )


# ------------------------------------------------------------------------------------------------ tiny, end to end


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    sam_path = folder / "sam_tiny.pth"
    random_sam_file(sam_path, "vit_tiny")
    return sam_path, random_official_state(official_layout(**TINY))


@pytest.fixture()
def tiny_files(tiny_base, tmp_path):
    sam_path, state = tiny_base
    hsam_path = tmp_path / "hsam_tiny.pth"
    return sam_path, hsam_path, random_official_file(hsam_path, None, state=state)


def test_tiny_import_runs_deterministically_and_round_trips(tiny_files, tmp_path):
    sam_path, hsam_path, _ = tiny_files
    model, card = import_official(hsam_path, sam_path, "tiny")
    assert model.config == ModelConfig(backbone="vit_tiny", img_size=128, num_classes=8, lora_rank=2)
    images = torch.rand(2, 3, 128, 128)
    stage1, stage2 = model(images)
    assert stage1["low_res_logits"].shape == (2, 9, 32, 32) and stage2["low_res_logits"].shape == (2, 9, 128, 128)
    fused = model.predict(images)
    assert torch.equal(fused, model.predict(images)) and torch.isfinite(fused).all()
    # same file in, same network out: a second import gives identical outputs
    again, _ = import_official(hsam_path, sam_path, "tiny")
    assert torch.equal(again.predict(images), fused)
    # our format and back to the official one
    loaded, loaded_card = load_model(save_model(model, card, tmp_path / "ours"))
    assert loaded_card.extra == card.extra
    torch.testing.assert_close(loaded.predict(images), fused, rtol=1e-4, atol=1e-4)
    (tmp_path / "out").mkdir()
    assert export_official(loaded, tmp_path / "out" / hsam_path.name).read_bytes() == hsam_path.read_bytes()


# ------------------------------------------------------------------------------------------------ errors


class _NotATensor:
    pass


def test_truncated_and_foreign_files(tiny_files, tmp_path):
    sam_path, hsam_path, _ = tiny_files
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(hsam_path.read_bytes()[:4000])
    one_line_error(lambda: import_official(truncated, sam_path, "x"), "truncated.pth", "truncated or not a PyTorch")
    one_line_error(lambda: import_official(hsam_path, truncated, "x"), "truncated.pth", "SAM checkpoint")
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    one_line_error(lambda: import_official(text, sam_path, "x"), "notes.pth", "H-SAM checkpoint")
    pickled = tmp_path / "pickled.pth"
    torch.save({"w_a_000": _NotATensor()}, pickled, pickle_module=pickle)
    one_line_error(lambda: load_pth(pickled, "H-SAM checkpoint"), "pickled.pth", "Python objects")
    one_line_error(lambda: import_official(sam_path, hsam_path, "x"), "sam_tiny.pth", "pass it as the SAM file")
    one_line_error(lambda: import_official(hsam_path, hsam_path, "x"), "pass it as the H-SAM file")
    one_line_error(lambda: import_official(tmp_path / "missing.pth", sam_path, "x"), "not found")


def test_wrong_vit_size(tiny_base, tmp_path):
    sam_path, _ = tiny_base
    lora_for_vit_b = tmp_path / "hsam_vitb.pth"
    keys = {"w_a_000", "w_b_000", "mask_decoder.mask_tokens.weight", "mask_decoder2.self_attn.q_proj.weight"}
    layout = [(k, shape) for k, shape in official_layout(width=64) if k.startswith("w_") or k in keys]
    random_official_file(lora_for_vit_b, layout)  # ViT-B LoRA (the checks run before the decoders are read)
    one_line_error(lambda: import_official(lora_for_vit_b, sam_path, "x"), "hsam_vitb.pth", "fits vit_b", "SAM vit_tiny")


def _drop(key):
    return lambda state: state.pop(key)


def _reshape(key, shape):
    return lambda state: state.__setitem__(key, torch.zeros(shape))


@pytest.mark.parametrize(
    ("edit", "patterns"),
    [
        (_drop("mask_decoder2.skip_connect.4.bias"), ["1 of", "missing", "mask_decoder2.skip_connect.4.bias"]),
        (_drop("prompt_encoder2.no_mask_embed.weight"), ["missing", "prompt_encoder2.no_mask_embed.weight"]),
        (_reshape("w_a_001", (3, 32)), ["w_a_001 is (3, 32), the model needs (2, 32)"]),  # inconsistent rank
        (_reshape("mask_decoder.mask_tokens.weight", (5, 256)), ["5-output", "the model needs (5, 256)"]),
        (_drop("w_b_003"), ["incomplete LoRA"]),
        (lambda s: s.__setitem__("extra.weight", torch.zeros(1)), ["unexpected", "extra.weight"]),
    ],
)
def test_files_that_do_not_fit(tiny_base, tmp_path, edit, patterns):
    sam_path, state = tiny_base
    hsam_path = tmp_path / "bad.pth"
    random_official_file(hsam_path, None, edit=edit, state=state)
    one_line_error(lambda: import_official(hsam_path, sam_path, "x"), "bad.pth", *patterns)


def test_class_names_must_fit(tiny_files):
    sam_path, hsam_path, _ = tiny_files
    one_line_error(lambda: import_official(hsam_path, sam_path, "x", classes=["background", "liver"]), "9 outputs")


def test_lean_models_cannot_be_exported(tmp_path):
    model = build_hsam(ModelConfig(**{**load_model_config("vit_tiny").to_dict(), "keep_cmattn_tensors": False}))
    one_line_error(lambda: export_official(model, tmp_path / "x.pth"), "CMAttn")


def test_prompt_encoder2_wins_when_the_copies_differ(tiny_base, tmp_path):
    """The released loader copies prompt_encoder2.* after prompt_encoder.* into the same module."""
    sam_path, state = tiny_base
    hsam_path = tmp_path / "edited.pth"
    second = torch.full((1, 256), 0.5)
    random_official_file(hsam_path, None, state=state, edit=lambda s: s.__setitem__("prompt_encoder2.no_mask_embed.weight", second))
    model, _ = import_official(hsam_path, sam_path, "x")
    assert torch.equal(model.prompt_encoder.no_mask_embed.weight, second)


def test_init_from_sam_reads_a_file_path(tiny_base):
    sam_path, _ = tiny_base
    torch.manual_seed(0)
    model = build_hsam(load_model_config("vit_tiny"))
    report = init_from_sam(model, str(sam_path))
    sam = load_pth(sam_path, "SAM checkpoint")
    assert "image_encoder.pos_embed" in report.resized
    assert torch.equal(model.image_encoder.patch_embed.proj.weight, sam["image_encoder.patch_embed.proj.weight"])
    vit_b_model = build_hsam(ModelConfig(img_size=256), device="meta")
    one_line_error(lambda: init_from_sam(vit_b_model, sam_path), "sam_tiny.pth", "SAM vit_tiny but the model is vit_b")


def test_the_torchvision_free_loader_leaves_no_stand_in_for_other_libraries():
    """Without a working torchvision the loader must not leave its partial ``segment_anything`` in sys.modules,
    where another extension's ``from segment_anything import SamPredictor`` would find it."""
    import subprocess
    import sys

    script = """
import sys
from hsam.model.sam_compat import build_sam, modeling
assert hasattr(modeling(), "ImageEncoderViT") and "vit_b" in build_sam().sam_model_registry
assert modeling() is modeling()
left = sorted(m for m in sys.modules if m.split(".")[0] == "segment_anything")
try:
    import torchvision  # noqa: F401
    works = True
except Exception:
    works = False
print("LEFT", left if not works else "torchvision works")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LEFT []" in done.stdout or "torchvision works" in done.stdout, done.stdout
