"""Zoomed prompting: a box is decoded in a square crop of its slice instead of the whole slice.

LiteMedSAM sees 256 x 256 pixels. The whole-slice path resizes every slice to that (a 512-px slice loses half its
detail; a 122 x 101 slice is stretched unevenly). With a :class:`Zoom`, a box prompt is decoded in a square
:class:`Frame` around it (``factor`` times the box's longer side, at least ``min_mm``), shifted to stay inside the
slice where it fits and else padded (windowed 0, as LiteMedSAM's own padding) with all the slice inside. The crop
gets its own TinyViT embedding: one encoder run per (slice, frame), which, unlike the whole slice's, no other organ
shares. Measured on two CTs (benchmarks/prompting/RESULTS.md, "Zoom"): it lowered Dice on both, so it is off by
default (``PromptSession.zoom = None``).

Positions follow :mod:`hsam.prompting.session`: (col, row) continuous, pixel (r, c) covers [c - 0.5, c + 0.5].
A frame covers rows ``top .. top + size - 1`` and cols ``left .. left + size - 1``; in the model's 256-px frame
x_model = (x - left + 0.5) * 256 / size (for the whole slice, left = 0 and size = W: the session's model_box).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hsam.prompting.decoder import INPUT_SIZE
from hsam.prompting.embedding import SliceEmbeddings

Box = tuple[float, float, float, float]
OUTSIDE_LOGIT = -20.0  # logit given to slice pixels outside a frame (never part of the mask)
DEFAULT_CACHE_FRAMES = 64  # 4 MB each


@dataclass(frozen=True)
class Zoom:
    """How big a box's crop is: ``factor`` x the box's longer side, at least ``min_mm`` (and at most the slice)."""

    factor: float = 2.0
    min_mm: float = 60.0


@dataclass(frozen=True)
class Frame:
    """A rectangle of a slice that is resized to the model's 256 x 256 input (rows top.., cols left..)."""

    top: int
    left: int
    height: int
    width: int

    def to_model(self, x: float, y: float) -> tuple[float, float]:
        """Slice position (col, row) -> the model frame's (x, y)."""
        return (x - self.left + 0.5) * INPUT_SIZE / self.width, (y - self.top + 0.5) * INPUT_SIZE / self.height

    def model_box(self, box: Box) -> Box:
        """Box edges on the slice -> edges in the model frame."""
        x0, y0 = self.to_model(box[0], box[1])
        x1, y1 = self.to_model(box[2], box[3])
        return x0, y0, x1, y1


def whole_frame(shape: tuple[int, int]) -> Frame:
    """The frame of the whole H x W slice (the session's default path)."""
    return Frame(0, 0, int(shape[0]), int(shape[1]))


def square_frame(shape: tuple[int, int]) -> Frame:
    """The whole H x W slice padded at the bottom or right to a square (LiteMedSAM's own preprocessing: the slice
    keeps its aspect ratio instead of being stretched to 256 x 256)."""
    side = int(max(shape))
    return Frame(0, 0, side, side)


def zoom_frame(box: Box, shape: tuple[int, int], pixel_mm: tuple[float, float], zoom: Zoom) -> Frame:
    """The square frame of ``zoom`` around ``box`` on an H x W slice of (row, col) spacing ``pixel_mm``; the whole
    slice's frame when the square would hold all of it."""
    height, width = shape
    x0, y0, x1, y1 = box
    side_px = max(zoom.factor * max(x1 - x0, y1 - y0), zoom.min_mm / min(pixel_mm))
    size = int(np.ceil(side_px))
    if size >= max(height, width):
        return whole_frame(shape)

    def start(centre: float, length: int) -> int:  # inside the slice where it fits, else the slice inside it
        first = int(round(centre - size / 2))
        return min(max(first, min(0, length - size)), max(0, length - size))

    return Frame(start((y0 + y1) / 2, height), start((x0 + x1) / 2, width), size, size)


def frame_image(windowed: np.ndarray, frame: Frame) -> torch.Tensor:
    """A windowed slice [H, W] in [0, 1] -> the frame's model input [1, 3, 256, 256] (padded with 0 outside)."""
    height, width = windowed.shape
    crop = np.zeros((frame.height, frame.width), dtype=np.float32)
    rows = slice(max(0, frame.top), min(height, frame.top + frame.height))
    cols = slice(max(0, frame.left), min(width, frame.left + frame.width))
    crop[rows.start - frame.top : rows.stop - frame.top, cols.start - frame.left : cols.stop - frame.left] = \
        windowed[rows, cols]
    image = torch.from_numpy(crop)[None, None]
    if tuple(image.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
        image = F.interpolate(image, (INPUT_SIZE, INPUT_SIZE), mode="bicubic", align_corners=False).clamp_(0.0, 1.0)
    return image.expand(-1, 3, -1, -1)


def paste(logits: torch.Tensor, frame: Frame, shape: tuple[int, int]) -> torch.Tensor:
    """Model-frame logits [N, 256, 256] -> slice logits [N, H, W] (OUTSIDE_LOGIT where the frame does not reach)."""
    height, width = shape
    resized = F.interpolate(logits[:, None], (frame.height, frame.width), mode="bilinear", align_corners=False)[:, 0]
    if frame == whole_frame(shape):
        return resized
    out = torch.full((logits.shape[0], height, width), OUTSIDE_LOGIT, dtype=resized.dtype)
    rows = slice(max(0, frame.top), min(height, frame.top + frame.height))
    cols = slice(max(0, frame.left), min(width, frame.left + frame.width))
    out[:, rows, cols] = resized[:, rows.start - frame.top : rows.stop - frame.top,
                                 cols.start - frame.left : cols.stop - frame.left]
    return out


class FrameEmbeddings:
    """TinyViT embeddings [256, 64, 64] per (slice, frame) of one volume: the whole-slice frame comes from (and is
    shared with) ``slices``; other frames are encoded on demand and kept (``max_frames`` most recently used)."""

    def __init__(self, slices: SliceEmbeddings, max_frames: int = DEFAULT_CACHE_FRAMES) -> None:
        self.slices = slices
        self.max_frames = max(1, int(max_frames))
        self._cache: OrderedDict[tuple[int, Frame], torch.Tensor] = OrderedDict()
        self.computed = 0  # frames this object ran the encoder for

    def items(self) -> list[tuple[tuple[int, Frame], torch.Tensor]]:
        """The cached ((slice, frame), embedding) pairs."""
        return list(self._cache.items())

    def put(self, z: int, frame: Frame, embedding: torch.Tensor) -> None:
        """Store a frame's embedding [256, 64, 64] computed elsewhere."""
        key = (int(z), frame)
        self._cache[key] = embedding.detach().float().cpu()
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_frames:
            self._cache.popitem(last=False)

    def get(self, z: int, frame: Frame) -> torch.Tensor:
        """The embedding [256, 64, 64] of ``frame`` on slice ``z``."""
        volume = self.slices.volume
        if frame == whole_frame(volume.shape[1:]):
            return self.slices.get(z)
        key = (int(z), frame)
        if key not in self._cache:
            from hsam.volume import window

            if not 0 <= z < volume.shape[0]:
                raise IndexError(f"slice {z} is outside the volume (0..{volume.shape[0] - 1})")
            low, high = self.slices.window_hu
            image = frame_image(window(volume[z : z + 1], low, high)[0], frame)
            with torch.inference_mode():
                self.put(z, frame, self.slices.encoder(image)[0])
            self.computed += 1
        self._cache.move_to_end(key)
        return self._cache[key]
