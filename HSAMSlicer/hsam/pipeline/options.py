"""``SegmentOptions``: every choice of one segmentation run, in one object (the CLI, the Slicer child job through the
CLI, benchmarks and tests build it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from hsam.errors import HSAMError

PROTOCOLS = ("default", "reference")
REFERENCE_INPUT_SIZE = 224  # the released test.py's --input_size


@dataclass(frozen=True)
class SegmentOptions:
    """How :func:`hsam.pipeline.run.segment_volume` runs.

    protocol: ``"default"`` (this package's path) or ``"reference"`` (the released H-SAM test pipeline: stored slice
        order, scipy zooms; build it with :meth:`reference`).
    device: ``"auto"`` (CUDA, then MPS, then CPU) | ``"cpu"`` | ``"cuda"`` | ``"cuda:N"`` | ``"mps"``.
    batch_size: slices per forward pass (None: 8 on CUDA, 4 on MPS, 2 on CPU).
    precision: ``"auto"`` | ``"fp32"`` | ``"fp16"`` | ``"bf16"`` (half precisions only on GPUs).
    mode: speed mode (:mod:`hsam.engines.modes`): ``"auto"`` (the measured fastest mode meeting the precision rule),
        ``"eager"``, ``"fast"``, ``"bf16"``, ``"int8"``, ``"ort"``, ``"ort-int8"``, ``"compile"``.
    organs: restrict the argmax to these organs (label values or names); None: all.
    orientation: canonical orientation code for this run (e.g. ``"RPS"``) instead of the card's.
    body_mask: label nothing outside the patient's trunk (:mod:`hsam.checks.body_mask`; issue 15: arms, table, air).
    crop_to_body: crop every slice to one square around the trunk before the resize to the model input.
    slab: encode only the slab around the organs (:mod:`hsam.pipeline.slab`); None: its ``BY_DEFAULT``.
    refine: the refine stage (:mod:`hsam.prompting.refine`): True required, None where the model can, False off.
    largest_component: keep only the largest connected component of each organ.
    check_orientation: run the orientation self-check and the laterality check (:mod:`hsam.pipeline.checks`).
    input_size: reference protocol only: the released ``--input_size`` the slices are zoomed to first.
    keep_embeddings: a folder to keep the encoder's slice embeddings in for the prompt tools
        (:mod:`hsam.pipeline.keep`); None: not kept.
    """

    protocol: str = "default"
    device: str = "auto"
    batch_size: int | None = None
    precision: str = "auto"
    mode: str = "auto"
    organs: Sequence[int | str] | None = None
    orientation: str | None = None
    body_mask: bool = True
    crop_to_body: bool = False
    slab: bool | None = None
    refine: bool | None = False
    largest_component: bool = False
    check_orientation: bool = True
    input_size: int = REFERENCE_INPUT_SIZE
    keep_embeddings: str | None = None

    @classmethod
    def reference(cls, *, device: str = "auto", batch_size: int | None = None,
                  input_size: int = REFERENCE_INPUT_SIZE, check_orientation: bool = True) -> "SegmentOptions":
        """The released test pipeline as it is: fp32 eager, no body mask, slab search, refine or post-processing."""
        return cls(protocol="reference", device=device, batch_size=batch_size, precision="fp32", mode="eager",
                   body_mask=False, slab=False, refine=False, check_orientation=check_orientation,
                   input_size=input_size)

    def check(self) -> None:
        """One :class:`HSAMError` for a value no run can use (before any work)."""
        from hsam.volume import direction_from_code

        if self.protocol not in PROTOCOLS:
            raise HSAMError(f"unknown protocol {self.protocol!r}; use one of {', '.join(PROTOCOLS)}")
        if self.orientation is not None:
            direction_from_code(self.orientation)  # a bad code is one clear error before any work
        if self.batch_size is not None and self.batch_size < 1:
            raise HSAMError(f"batch size must be at least 1, got {self.batch_size}")
        if self.protocol != "reference":
            return
        if self.input_size < 8:
            raise HSAMError(f"--input-size must be at least 8 pixels, got {self.input_size}")
        unused = [name for name, value in (("organs", self.organs), ("orientation", self.orientation),
                                           ("refine", self.refine), ("crop_to_body", self.crop_to_body),
                                           ("keep_embeddings", self.keep_embeddings)) if value]
        if self.precision not in ("auto", "fp32") or self.mode not in ("auto", "eager"):
            unused.append("precision/mode")
        if unused:  # the reference stages have no place for them (build the options with SegmentOptions.reference)
            raise HSAMError(f"the reference protocol runs the released pipeline as it is: drop {', '.join(unused)}")
