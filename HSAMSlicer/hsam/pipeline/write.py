"""Write stage: the labels (label map, Slicer segmentation or DICOM SEG) and the optional confidence map, per-organ
CSV and overlay PNG of a :class:`~hsam.pipeline.result.SegmentationResult`, all or nothing."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from hsam import atomic
from hsam.errors import HSAMError
from hsam.pipeline.result import SegmentationResult


@dataclass(frozen=True)
class OutputPaths:
    """Where a run's outputs go (checked writable before any work); None: not requested."""

    labels: Path
    confidence: Path | None = None
    stats: Path | None = None
    overlay: Path | None = None

    def requested(self) -> dict[str, Path]:
        """``{kind: path}`` of the requested outputs, labels first."""
        kinds = {"labels": self.labels, "confidence": self.confidence, "stats": self.stats, "overlay": self.overlay}
        return {kind: path for kind, path in kinds.items() if path is not None}


@dataclass(frozen=True)
class DicomTarget:
    """What a DICOM SEG output needs: the source series it references, the algorithm that made it, the organs looked
    for (None: all), the encoding (``hsam.volume.dicom_seg.SegOptions``; None: its defaults)."""

    source_series: Any
    algorithm: Any
    organ_indices: list[int] | None = None
    seg_options: Any = None


def stats_csv(result: SegmentationResult, class_names: Sequence[str]) -> str:
    """Per-organ table: label, organ, voxels, volume_ml, mean_confidence (0-1 over the organ's voxels)."""
    labels = sitk.GetArrayViewFromImage(result.labels).ravel()
    confidence = sitk.GetArrayViewFromImage(result.confidence).ravel()
    counts = np.bincount(labels, minlength=len(class_names))
    sums = np.bincount(labels, weights=confidence, minlength=len(class_names))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", "organ", "voxels", "volume_ml", "mean_confidence"])
    for index, name in enumerate(class_names):
        if index == 0:
            continue
        mean = sums[index] / counts[index] / 255.0 if counts[index] else 0.0
        writer.writerow([index, name, int(counts[index]), f"{result.volumes_ml[name]:.3f}", f"{mean:.4f}"])
    return buffer.getvalue()


def _write_text_atomic(path: Path, text: str) -> None:
    try:
        atomic.write_text(path, text)
    except OSError as error:
        raise HSAMError(f"could not write {path}: {error.strerror or error}; check free disk space and permissions") from None


def _write_one(kind: str, path: Path, result: SegmentationResult, image: sitk.Image, class_names: list[str],
               dicom: DicomTarget | None, title: str) -> None:
    """Write one output of ``kind`` (see :meth:`OutputPaths.requested`) to ``path``."""
    from hsam.volume import write_image, write_labels

    if kind == "labels" and dicom is not None:
        from hsam.volume.dicom_seg import SegOptions, write_dicom_seg

        write_dicom_seg(result.labels, path, dicom.source_series.files, dicom.algorithm, dicom.organ_indices,
                        dicom.seg_options or SegOptions())
    elif kind == "labels":
        write_labels(result.labels, path)
    elif kind == "confidence":
        write_image(result.confidence, path)
    elif kind == "stats":
        _write_text_atomic(path, stats_csv(result, class_names))
    else:
        from hsam.evaluation.overlay import render_overlay

        render_overlay(image, result.labels, path, class_names, title=title)


def write_outputs(result: SegmentationResult, image: sitk.Image, class_names: list[str], outputs: OutputPaths,
                  dicom: DicomTarget | None = None, title: str = "") -> dict[str, Path]:
    """Write the requested outputs of ``result`` (the labels as DICOM SEG when ``dicom`` is given); returns
    ``{kind: path}`` of the files written.

    All or nothing without losing the previous run: every output is written to a hidden file beside it first and
    only moved onto its name once all of them were written (deleting a half-set would delete the files the previous
    run left there, as the new ones have already replaced them).
    """
    from hsam.volume.files import TEMP_PREFIX, _host_tag

    staged: list[tuple[Path, Path]] = []
    try:
        for kind, final in outputs.requested().items():
            temp = final.with_name(f"{TEMP_PREFIX}{_host_tag()}-{os.getpid()}-out-{final.name}")
            staged.append((temp, final))
            _write_one(kind, temp, result, image, class_names, dicom, title)
        for temp, final in staged:
            os.replace(temp, final)
    except BaseException:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
        raise
    return outputs.requested()
