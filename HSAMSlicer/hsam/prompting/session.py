"""One volume's prompted segmentation: prompts per (organ, slice), their masks, merging into a label map.

All positions here are canonical (:mod:`hsam.prompting.geometry`): slice z, and (col, row) continuous pixel positions
on a slice of H rows x W cols. A box is given by its edges (x0, y0, x1, y1) = (col, row, col, row). The decoder works
in a 256 x 256 frame: the whole slice resized (as the image embedding was made), so x_model = (x + 0.5) * 256 / W;
or, with a :class:`hsam.prompting.zoom.Zoom`, a square crop around each box (:mod:`hsam.prompting.zoom`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from hsam.prompting.decoder import PromptDecoder
from hsam.prompting.embedding import SliceEmbeddings
from hsam.prompting.zoom import Frame, FrameEmbeddings, Zoom, paste, square_frame, whole_frame, zoom_frame
from hsam.volume.orientation import Reorientation, from_canonical

Box = tuple[float, float, float, float]  # edges x0, y0, x1, y1 (cols, rows) on the canonical slice
USER, INTERPOLATED, PROPAGATED, AUTOMATIC = "user", "interpolated", "propagated", "automatic"
CLICK_BOX_MM = (20.0, 40.0, 80.0, 160.0)  # box sides tried around positive clicks given without a box
HISTORY_LIMIT = 50  # changes :meth:`PromptSession.undo` can put back (the Slicer module's undo steps)
REBOX_MM = 3.5  # a box prompt is decoded again from its mask's box widened by this (benchmarks/prompting/RESULTS.md)


@dataclass
class SlicePrompt:
    """What was asked on one slice for one organ: a box and/or +/- points ((col, row, positive) each)."""

    box: Box | None = None
    points: list[tuple[float, float, bool]] = field(default_factory=list)
    source: str = USER


@dataclass
class SliceMask:
    """One organ's mask on one slice: logits [h, w] (float16) of the crop at (top, left); mask = logits > 0."""

    top: int
    left: int
    logits: np.ndarray
    iou: float
    source: str

    @property
    def area(self) -> int:
        return int((self.logits > 0).sum())

    def full(self, shape: tuple[int, int]) -> np.ndarray:
        """Boolean [H, W] mask on the whole slice."""
        out = np.zeros(shape, dtype=bool)
        h, w = self.logits.shape
        out[self.top : self.top + h, self.left : self.left + w] = self.logits > 0
        return out


def box_of(mask: np.ndarray, margin: float = 0.0) -> Box | None:
    """Edges (x0, y0, x1, y1) around a boolean [H, W] mask, widened by ``margin`` pixels; None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (cols[0] - 0.5 - margin, rows[0] - 0.5 - margin, cols[-1] + 0.5 + margin, rows[-1] + 0.5 + margin)


def model_box(box: Box, height: int, width: int) -> Box:
    """Box edges on an H x W slice (pixel centres at whole numbers, as :func:`box_of`) -> edges in the decoder's
    256-px frame, where pixel k covers [k, k + 1] (segment_anything's convention): x_model = (x + 0.5) * 256 / W.
    The whole slice's :class:`~hsam.prompting.zoom.Frame`, which :meth:`PromptSession.decode` uses."""
    return whole_frame((height, width)).model_box(box)


def crop_mask(logits: np.ndarray, iou: float, source: str, pad: int = 2) -> SliceMask:
    inside = logits > 0
    box = box_of(inside)
    if box is None:
        return SliceMask(0, 0, np.zeros((0, 0), dtype=np.float16), iou, source)
    top, left = max(0, int(box[1] + 0.5) - pad), max(0, int(box[0] + 0.5) - pad)
    bottom, right = int(box[3] + 0.5) + pad, int(box[2] + 0.5) + pad
    return SliceMask(top, left, logits[top:bottom, left:right].astype(np.float16), iou, source)


class PromptSession:
    """Prompts and masks of one canonical volume [D, H, W] (HU) with its image embeddings and the prompt decoder."""

    def __init__(self, embeddings: SliceEmbeddings, decoder: PromptDecoder, how: Reorientation | None = None,
                 zoom: Zoom | None = None, rebox_mm: float | None = REBOX_MM, square: bool = False) -> None:
        self.embeddings = embeddings
        self.frames = FrameEmbeddings(embeddings)
        self.decoder = decoder
        self.how = how
        self.zoom = zoom  # None: every prompt is decoded on the whole slice (its embedding shared by all organs)
        self.rebox_mm = rebox_mm  # None: a box's mask is decoded once, from the box as given
        self.square = square  # pad non-square slices to a square instead of stretching them (own embeddings)
        self.shape: tuple[int, int, int] = tuple(embeddings.volume.shape)  # type: ignore[assignment]
        self.prompts: dict[tuple[int, int], SlicePrompt] = {}
        self.masks: dict[tuple[int, int], SliceMask] = {}
        # changes since :meth:`begin`: (step, {(organ, z): (prompt, mask) before}), newest last
        self.history: list[tuple[int | None, dict]] = []

    # --- prompting ---------------------------------------------------------------------------------------------
    def frame_for(self, prompt: SlicePrompt) -> Frame:
        """Where ``prompt`` is decoded: its box's zoom frame when the session zooms, else the whole slice (padded
        to a square with ``square``)."""
        if self.zoom is not None and prompt.box is not None:
            return zoom_frame(prompt.box, self.shape[1:], self.pixel_mm, self.zoom)
        return square_frame(self.shape[1:]) if self.square else whole_frame(self.shape[1:])

    def decode(self, z: int, prompts: Sequence[SlicePrompt], frame: Frame | None = None
               ) -> list[tuple[np.ndarray, float]]:
        """(logits [H, W] float32, predicted IoU) for each prompt on slice ``z``, decoded together where they share
        a layout and a frame (``frame``: all in this one; default :meth:`frame_for` each)."""
        if not prompts:
            return []
        with_box = [p for p in prompts if p.box is not None]
        if with_box and len(with_box) != len(prompts):  # one batch needs the same prompt layout: decode apart
            return [self.decode(z, [p], frame)[0] for p in prompts]
        frames = [frame or self.frame_for(p) for p in prompts]
        results: list[tuple[np.ndarray, float]] = [(np.empty(0), 0.0)] * len(prompts)
        for shared in dict.fromkeys(frames):
            batch = [n for n, f in enumerate(frames) if f == shared]
            for n, result in zip(batch, self._decode_in(z, shared, [prompts[n] for n in batch])):
                results[n] = result
        return results

    def decode_prompted(self, z: int, prompts: Sequence[SlicePrompt]) -> list[tuple[np.ndarray, float]]:
        """:meth:`decode`, then, with ``rebox_mm``, each prompt that is a box alone (no points: clicks correct the
        box as drawn) once more from the box of its mask widened by ``rebox_mm``: LiteMedSAM follows a tight box
        better than a loose one. One more decoder run per box, no encoder run (unless zoomed)."""
        results = self.decode(z, prompts)
        if self.rebox_mm is None:
            return results
        margin_px = self.rebox_mm / float(np.mean(self.pixel_mm))
        again = [n for n, (prompt, (logits, _)) in enumerate(zip(prompts, results))
                 if prompt.box is not None and not prompt.points and (logits > 0).any()]
        tighter = [SlicePrompt(box_of(results[n][0] > 0, margin_px), source=prompts[n].source) for n in again]
        for n, result in zip(again, self.decode(z, tighter)):
            results[n] = result
        return results

    def _decode_in(self, z: int, frame: Frame, prompts: Sequence[SlicePrompt]) -> list[tuple[np.ndarray, float]]:
        """One decoder batch of prompts (all with a box or all without) in ``frame`` of slice ``z``."""
        boxes = None
        if prompts[0].box is not None:
            boxes = torch.tensor([frame.model_box(p.box) for p in prompts])
        points = labels = None
        width = max(len(p.points) for p in prompts)
        if width:
            points = torch.zeros(len(prompts), width, 2)
            labels = -torch.ones(len(prompts), width, dtype=torch.int32)  # -1: padding, ignored by the encoder
            for n, prompt in enumerate(prompts):
                for m, (x, y, positive) in enumerate(prompt.points):
                    points[n, m] = torch.tensor(frame.to_model(x, y))
                    labels[n, m] = int(positive)
        decoded = self.decoder(self.frames.get(z, frame), boxes, points, labels)
        logits = paste(decoded.logits, frame, self.shape[1:])
        return [(logits[n].numpy(), float(decoded.iou[n])) for n in range(len(prompts))]

    def set_prompt(self, organ: int, z: int, prompt: SlicePrompt) -> np.ndarray:
        """Replace the prompt of ``organ`` on slice ``z`` and decode it; returns the boolean mask [H, W]."""
        self._check_slice(z)
        if prompt.box is None and not prompt.points:
            raise ValueError("a prompt needs a box or at least one point")
        decoded = self.decode_prompted(z, [prompt]) if prompt.box is not None else [self.decode_clicks(z, prompt)]
        (logits, iou), = decoded
        self.store(organ, z, prompt, logits, iou)
        return self.mask(organ, z)

    def decode_clicks(self, z: int, prompt: SlicePrompt) -> tuple[np.ndarray, float]:
        """Points without a box. LiteMedSAM was trained on boxes: from points alone its decoder returns no mask
        (measured on example_ct_sm). So boxes of CLICK_BOX_MM sides around the positive points are tried with the
        points, and the mask that holds every positive point with the highest predicted IoU is kept."""
        positives = [(x, y) for x, y, positive in prompt.points if positive]
        if not positives:
            return np.full(self.shape[1:], -1.0, dtype=np.float32), 0.0
        rows_mm, cols_mm = self.pixel_mm
        (x0, y0), (x1, y1) = np.min(positives, axis=0), np.max(positives, axis=0)
        candidates = [SlicePrompt((x0 - side / 2 / cols_mm, y0 - side / 2 / rows_mm, x1 + side / 2 / cols_mm,
                                   y1 + side / 2 / rows_mm), prompt.points, prompt.source) for side in CLICK_BOX_MM]
        best: tuple[np.ndarray, float] = (np.full(self.shape[1:], -1.0, dtype=np.float32), 0.0)
        for logits, iou in self.decode(z, candidates, self.frame_for(candidates[-1])):  # one frame: one encode
            holds = all(logits[min(int(round(y)), self.shape[1] - 1), min(int(round(x)), self.shape[2] - 1)] > 0
                        for x, y in positives)
            if holds and iou > best[1]:
                best = (logits, iou)
        return best

    @property
    def pixel_mm(self) -> tuple[float, float]:
        """(row, col) spacing in mm of the canonical slices (1 mm without an input grid)."""
        if self.how is None:
            return 1.0, 1.0
        sx, sy, _ = self.how.canonical_spacing
        return float(sy), float(sx)

    def store(self, organ: int, z: int, prompt: SlicePrompt, logits: np.ndarray, iou: float) -> None:
        """Keep a decoded result (logits [H, W]) as the organ's prompt and mask on slice ``z``."""
        self._remember((organ, z))
        self.prompts[(organ, z)] = prompt
        self.masks[(organ, z)] = crop_mask(logits, iou, prompt.source)

    def add_point(self, organ: int, z: int, x: float, y: float, positive: bool) -> np.ndarray:
        """Add a +/- point to the organ's prompt on slice ``z`` (keeping its box and earlier points); -> mask."""
        old = self.prompts.get((organ, z))
        prompt = SlicePrompt(old.box if old else None, list(old.points) if old else [], USER)
        prompt.points.append((float(x), float(y), bool(positive)))
        return self.set_prompt(organ, z, prompt)

    def clear(self, organ: int, z: int | None = None) -> None:
        """Forget the organ's prompt and mask on slice ``z`` (every slice when None)."""
        for key in [k for k in list(self.masks) + list(self.prompts) if k[0] == organ and z in (None, k[1])]:
            self._remember(key)
            self.prompts.pop(key, None)
            self.masks.pop(key, None)

    # --- undo --------------------------------------------------------------------------------------------------
    def begin(self, step: int | None = None) -> None:
        """Start recording a change (a prompt, a propagation, a clear) that :meth:`undo` can put back; ``step``:
        the caller's number for it."""
        self.history = (self.history + [(step, {})])[-HISTORY_LIMIT:]

    def _remember(self, key: tuple[int, int]) -> None:
        if self.history and key not in self.history[-1][1]:
            self.history[-1][1][key] = (self.prompts.get(key), self.masks.get(key))

    def undo(self, step: int | None = None) -> list[tuple[int, int]]:
        """Put back the prompts and masks the latest change replaced; with ``step``, those of every change begun
        with that step number or a later one. Returns the (organ, slice) pairs put back."""
        restored: list[tuple[int, int]] = []
        while self.history:
            tag, before = self.history[-1]
            if step is not None and (tag is None or tag < step):
                break
            self.history.pop()
            for key, (prompt, mask) in before.items():
                for table, value in ((self.prompts, prompt), (self.masks, mask)):
                    if value is None:
                        table.pop(key, None)
                    else:
                        table[key] = value
                restored.append(key)
            if step is None:
                break
        return restored

    def _check_slice(self, z: int) -> None:
        if not 0 <= z < self.shape[0]:
            raise IndexError(f"slice {z} is outside the volume (0..{self.shape[0] - 1})")

    # --- results -----------------------------------------------------------------------------------------------
    def mask(self, organ: int, z: int) -> np.ndarray:
        """Boolean [H, W] mask of ``organ`` on slice ``z`` (all False when it has none)."""
        found = self.masks.get((organ, z))
        return found.full(self.shape[1:]) if found is not None else np.zeros(self.shape[1:], dtype=bool)

    def is_prompted(self, organ: int, z: int) -> bool:
        """True where the user prompted the slice (or a box was interpolated between two of theirs)."""
        prompt = self.prompts.get((organ, z))
        return prompt is not None and prompt.source in (USER, INTERPOLATED)

    def labels(self) -> np.ndarray:
        """uint8 [D, H, W] canonical label map: each voxel gets the organ with the highest positive logit."""
        out = np.zeros(self.shape, dtype=np.uint8)
        for z in sorted({k[1] for k in self.masks}):
            best = np.zeros(self.shape[1:], dtype=np.float32)
            for (organ, zz), found in self.masks.items():
                h, w = found.logits.shape
                if zz != z or not h:
                    continue
                region = (slice(found.top, found.top + h), slice(found.left, found.left + w))
                logits = found.logits.astype(np.float32)
                win = logits > best[region]
                best[region][win] = logits[win]
                out[z][region][win] = organ
        return out

    def labels_image(self) -> sitk.Image:
        """The label map on the input file's grid (needs ``how`` from :func:`hsam.volume.to_canonical`)."""
        if self.how is None:
            raise ValueError("this session has no input grid (how=None)")
        return from_canonical(self.labels(), self.how)
