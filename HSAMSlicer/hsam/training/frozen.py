"""Training and validation with a frozen image encoder: every encoder output is computed once and reused.

With the encoder frozen, H-SAM's training step only needs the encoder's output of each (augmented) sample, and that
output never changes. :class:`EncodedSamples` encodes a sample the first time an epoch asks for it and keeps it, so a
few-shot run pays the encoder (most of the compute) once per sample instead of once per sample and epoch, and
:class:`EncodedVolumes` does the same for validation and reference volumes, which are encoded once per run.

``copies`` sets how many augmented copies of each slice exist: epoch ``e`` trains on copy ``e % copies``, drawn with
the recipe's generator seeded by ``(seed, e % copies, index)``. With ``copies >= epochs`` every epoch sees exactly the
samples the uncached loop would draw (the recipe unchanged); fewer copies reuse them (a measured trade, see
benchmarks/finetune/). The stage-2 embedding noise is still drawn fresh at every step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from hsam import atomic
from hsam.engines.cpu import processor
from hsam.paths import hsam_home
from hsam.training.augment import resize_image
from hsam.training.data import Volume
from hsam.training.loader import TrainingSlices
from hsam.training.validate import labels_by_batch, mean_dice


def encoder_autocast(device: torch.device, precision: str) -> tuple[Callable[[], Any], str]:
    """(autocast factory, precision used) for the frozen encoder. ``precision``: "fp32", "bf16", or "auto" (bf16 on
    CPUs with native bf16; on CUDA the run's own autocast applies, so fp32 here)."""
    if precision not in ("auto", "fp32", "bf16"):
        from hsam.errors import HSAMError

        raise HSAMError(f"encoder_cache.precision must be auto, fp32 or bf16, got {precision!r}")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cpu" and processor().native_bf16)
    if use_bf16:
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), "bf16"
    return contextlib.nullcontext, "fp32"


@torch.no_grad()
def encode(encoder: torch.nn.Module, images: torch.Tensor, device: torch.device,
           autocast: Callable[[], Any]) -> torch.Tensor:
    """Encoder outputs (fp32, on ``device``) of images [B,3,S,S], one image at a time: batch 1 is the fastest on a
    CPU for the TinyViT (0.56 s vs 0.87 s per slice at batch 4, benchmarks/lite/precompute_embeddings.py).

    The outputs come back in the standard contiguous layout whatever layout the encoder's last layers chose (the
    TinyViT's is channels-last): the decoders' bf16 kernels round differently per layout, so this keeps a cached
    output (stored contiguous) and a freshly computed one decoding to the same logits."""
    outputs = []
    for image in images:
        with autocast():
            outputs.append(encoder(image[None].to(device)).float())
    return torch.cat(outputs).contiguous()


class EncodedSamples:
    """Training batches as (embedding, label, low-res label), each sample encoded once per copy."""

    def __init__(self, model: torch.nn.Module, dataset: TrainingSlices, copies: int, device: torch.device,
                 autocast: Callable[[], Any]) -> None:
        self.model, self.dataset, self.copies, self.device, self.autocast = model, dataset, copies, device, autocast
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def copy_of(self, epoch: int) -> int:
        return epoch % self.copies if self.copies > 0 else epoch

    def batch(self, epoch: int, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch of ``indices`` for ``epoch``: ``embedding`` [B,256,g,g], ``label`` [B,S,S], ``low_res_label``."""
        copy = self.copy_of(epoch)
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        missing = [i for i in dict.fromkeys(indices) if (copy, i) not in self._cache]
        if missing:
            samples = [self.dataset[(copy, i)] for i in missing]
            embeddings = encode(self.model.image_encoder, torch.stack([s["image"] for s in samples]), self.device,
                                self.autocast)
            for i, sample, embedding in zip(missing, samples, embeddings):
                fresh[i] = (embedding, sample["label"], sample["low_res_label"])
                if self.copies > 0:  # copies = 0: a new copy every epoch, never reused, so nothing is kept
                    self._cache[(copy, i)] = fresh[i]
        parts = [fresh[i] if i in fresh else self._cache[(copy, i)] for i in indices]
        return {"embedding": torch.stack([p[0] for p in parts]),
                "label": torch.stack([p[1] for p in parts]).to(self.device),
                "low_res_label": torch.stack([p[2] for p in parts]).to(self.device)}


# part of every cache key: raise it when a code change moves the encoder's outputs (fused LayerNorm2d: 2; the
# TinyViT's attention on torch's flash kernel: 3)
_ENCODER_OUTPUTS_VERSION = 3


def encoder_outputs_dir() -> Path:
    """``HSAM_HOME/cache/encoder-outputs``: the frozen encoder's outputs on the forgetting guard's reference cases,
    and the starting models' Dice on them."""
    return hsam_home() / "cache" / "encoder-outputs"


def _add_tensors(digest: hashlib._Hash, tensors: Iterable[tuple[str, torch.Tensor]]) -> hashlib._Hash:
    """``digest`` updated with each tensor's name and bytes."""
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest


def _encoder_digest(encoder: torch.nn.Module) -> hashlib._Hash:
    return _add_tensors(hashlib.sha256(), encoder.state_dict().items())


class EncodedVolumes:
    """Validation (or reference) volumes with every slice's encoder output, computed once under ``autocast`` (the
    run's encoder precision: bf16 on CPUs with native bf16 moves the held-out Dice by about 0.001, see
    benchmarks/finetune/RESULTS.md).

    ``cache_as`` (the precision's name) keeps the outputs in :func:`encoder_outputs_dir`, keyed by the encoder's
    weights, the volume, the precision, torch, the processor and :data:`_ENCODER_OUTPUTS_VERSION`, so the next
    fine-tune of any model on the same frozen encoder skips the encoder: for the bundled reference cases, never for
    a user's own volumes."""

    def __init__(self, model: torch.nn.Module, volumes: Sequence[Volume], device: torch.device,
                 autocast: Callable[[], Any] = contextlib.nullcontext, cache_as: str | None = None) -> None:
        self.volumes = list(volumes)
        encoder_key = _encoder_digest(model.image_encoder) if cache_as else None
        self.keys: list[str] | None = [] if cache_as else None  # each volume's cache key
        self.embeddings = []
        for volume in self.volumes:
            path = None
            if encoder_key is not None:
                key = encoder_key.copy()
                key.update(f"{_ENCODER_OUTPUTS_VERSION}|{volume.image.shape}|{volume.image.dtype}|{model.img_size}|"
                           f"{cache_as}|{torch.__version__}|{processor().describe()}".encode())
                key.update(np.ascontiguousarray(volume.image))
                self.keys.append(key.hexdigest())
                path = encoder_outputs_dir() / f"{key.hexdigest()[:32]}.safetensors"
            self.embeddings.append(self._encode(model, volume, device, autocast, path))

    @staticmethod
    def _encode(model: torch.nn.Module, volume: Volume, device: torch.device, autocast: Callable[[], Any],
                path: Path | None) -> torch.Tensor:
        from safetensors import SafetensorError
        from safetensors.torch import load_file, save_file

        if path is not None and path.is_file():
            try:
                return load_file(str(path))["embeddings"].to(device)
            except (OSError, KeyError, SafetensorError):
                pass  # unreadable: encode again and replace it
        slices = torch.from_numpy(np.stack([resize_image(s, model.img_size) for s in volume.image]))
        embeddings = encode(model.image_encoder, slices[:, None].expand(-1, 3, -1, -1), device, autocast)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic.replacing(path) as temp:
                    save_file({"embeddings": embeddings.cpu().contiguous()}, str(temp))
            except OSError:
                pass  # a cache that cannot be written (read-only home, full disk) only costs the next run time
        return embeddings

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, index: int, batch_size: int = 8,
                autocast: Callable[[], Any] = contextlib.nullcontext) -> np.ndarray:
        """Label volume uint8 [D,H,W] of volume ``index``: :func:`hsam.training.validate.predict_volume` from the
        stored encoder outputs (stage-3 fusion, bilinear back to the slice size, argmax), decoders under
        ``autocast`` (the training steps' precision)."""
        embeddings = self.embeddings[index]

        def logits_of(start: int, stop: int) -> torch.Tensor:
            with autocast():
                stage1, stage2 = model.decode(embeddings[start:stop])
            return (stage1["masks"] + stage2["masks"]) / 2

        return labels_by_batch(self.volumes[index].image.shape, batch_size, logits_of)

    def starting_dice(self, model: torch.nn.Module, organs: Sequence[int], batch_size: int, autocast: Callable[[], Any],
                      precision: str) -> dict[str, float]:
        """:meth:`dice` of the starting model of a fine-tune. With cached encoder outputs (``cache_as``) the figures
        are kept beside them, keyed by those outputs, the decoders' weights, the labels, ``organs``, ``batch_size``
        and the decoders' ``precision`` (the name of ``autocast``), so the next fine-tune of the same model reads them
        back instead of decoding the reference cases again (about 1.2 s for the demo's)."""
        if self.keys is None:
            return self.dice(model, organs, batch_size, autocast)
        digest = _add_tensors(hashlib.sha256(f"{self.keys}|{list(organs)}|{batch_size}|{precision}".encode()),
                              ((name, tensor) for name, tensor in model.state_dict().items()
                               if not name.startswith("image_encoder.")))
        for volume in self.volumes:
            digest.update(np.ascontiguousarray(volume.label))
        path = encoder_outputs_dir() / f"{digest.hexdigest()[:32]}.dice.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # not there yet, or unreadable: score and (re)write it
        metrics = self.dice(model, organs, batch_size, autocast)
        try:
            atomic.write_text(path, json.dumps(metrics))
        except OSError:
            pass  # a cache that cannot be written only costs the next run time
        return metrics

    def dice(self, model: torch.nn.Module, organs: Sequence[int], batch_size: int = 8,
             autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
        """As :func:`hsam.training.validate.validate`: per-organ mean Dice over the volumes where the organ is in the
        prediction or the reference, and their mean ``dice``."""
        was_training = model.training
        model.eval()
        try:
            return mean_dice(((self.predict(model, index, batch_size, autocast), volume.label, volume.unknown_organs)
                              for index, volume in enumerate(self.volumes)), organs)
        finally:
            model.train(was_training)
