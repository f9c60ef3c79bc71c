"""Evaluate prediction label volumes against references: file pairing, per-organ scores, CSV and markdown reports.

Inputs are label volumes SimpleITK reads (NIfTI, NRRD, MHA, ...) or TransUNet/Synapse ``*.npy.h5`` / ``*.npz`` files
(their ``label`` array; no spacing, so only the reference protocol is meaningful for them), and DICOM SEG files
(segments matched to H-SAM organs by SNOMED CT code, then name; placed on the grid of the volume they are compared
with, or on the grid both SEGs span).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np

from hsam import atomic
from hsam.errors import HSAMError
from hsam.evaluation.metrics import PROTOCOLS, OrganScore, score_volume

if TYPE_CHECKING:
    import SimpleITK as sitk

_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd", ".npy.h5", ".h5", ".npz", ".dcm")
# Suffixes that prediction/reference tools append to a case name (H-SAM's --is_savenii writes _pred/_gt).
_ROLE_SUFFIX = re.compile(r"(_pred|_prediction|_seg|_segmentation|_gt|_label|_labels|_0000)$")


@dataclass(frozen=True)
class LabelVolume:
    """A label array ``[z, y, x]`` with its spacing in the same order (mm) and the grid it came from."""

    array: np.ndarray
    spacing: tuple[float, float, float] | None
    origin: tuple[float, ...] | None = None
    direction: tuple[float, ...] | None = None
    # a reference's labelled organs (a DICOM SEG's segments, an exported case's "labelled" organs); None: every organ
    # was labelled, so an organ absent from it is truly absent
    labelled: frozenset[int] | None = None

    @classmethod
    def from_image(cls, image) -> "LabelVolume":
        """A SimpleITK label image as a LabelVolume (spacing reversed to ``(z, y, x)``)."""
        import SimpleITK as sitk

        return cls(sitk.GetArrayFromImage(image).astype(np.int32), tuple(reversed(image.GetSpacing())),  # type: ignore[arg-type]
                   image.GetOrigin(), image.GetDirection())

    def grid(self):
        """An empty SimpleITK image on this volume's grid (to place a DICOM SEG on); HSAMError without geometry."""
        import SimpleITK as sitk

        if self.spacing is None or self.origin is None or self.direction is None:
            raise HSAMError("a DICOM SEG can only be compared with a label volume that has a geometry (NIfTI, NRRD, "
                            "MHA, .seg.nrrd or another DICOM SEG), not with h5/npz arrays")
        z, y, x = self.array.shape
        image = sitk.Image(x, y, z, sitk.sitkUInt8)
        image.SetSpacing(tuple(reversed(self.spacing)))
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def resolve_label_map(spec: str | Mapping[int, int] | None) -> dict[int, int] | None:
    """A label map from a name in ``hsam.labels.LABEL_MAPS``, a JSON file ``{"source": target}``, or a dict."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return {int(k): int(v) for k, v in spec.items()}
    from hsam.labels import LABEL_MAPS

    if spec in LABEL_MAPS:
        return dict(LABEL_MAPS[spec])
    path = Path(spec)
    if path.is_file():
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
            return {int(k): int(v) for k, v in table.items() if not str(k).startswith("_")}
        except (ValueError, AttributeError) as error:
            raise HSAMError(f"label map {path} is not a JSON object of source->target integers: {error}") from None
    raise HSAMError(f"unknown label map {spec!r}; use one of {', '.join(sorted(LABEL_MAPS))} or a JSON file path")


def case_name(path: Path) -> str:
    """The case id of a file: its name without volume suffixes and without a role suffix such as ``_pred``."""
    name = path.name
    for suffix in sorted(_VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _ROLE_SUFFIX.sub("", name)


def read_label_volume(path: str | os.PathLike[str]) -> LabelVolume:
    """Read a label volume as an integer array ``[z, y, x]`` with spacing ``(z, y, x)`` mm (``None`` for h5/npz)."""
    path = Path(path)
    if not path.is_file():
        raise HSAMError(f"label volume {path} does not exist")
    lower = path.name.lower()
    if lower.endswith(".h5"):
        try:
            import h5py
        except ImportError:
            raise HSAMError("reading .h5 volumes needs h5py: pip install h5py") from None
        with h5py.File(path, "r") as handle:
            if "label" not in handle:
                raise HSAMError(f"{path} has no 'label' dataset")
            return LabelVolume(np.rint(handle["label"][()]).astype(np.int32), None)
    if lower.endswith(".npz"):
        try:
            with np.load(path) as data:  # allow_pickle stays False: an object array is refused, never unpickled
                if "label" not in data:
                    raise HSAMError(f"{path} has no 'label' array")
                return LabelVolume(np.rint(data["label"]).astype(np.int32), None)
        except (ValueError, OSError) as error:
            raise HSAMError(f"cannot read {path} as a label array: {' '.join(str(error).split())[:120]}") from None
    import SimpleITK as sitk

    if lower.endswith(".seg.nrrd"):  # a Slicer segmentation: segments matched to H-SAM organs by terminology/name
        from hsam.volume import read_labels

        return LabelVolume.from_image(read_labels(path))
    if lower.endswith(".dcm"):  # a DICOM SEG on the grid its frames span; see read_pair for comparing it
        from hsam.volume.dicom_seg import read_dicom_seg

        return LabelVolume.from_image(read_dicom_seg(path))
    if lower.endswith((".mha", ".mhd")):
        from hsam.volume.io import _check_metaimage_header

        _check_metaimage_header(path)  # ITK's MetaIO crashes or hangs on some hostile headers
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise HSAMError(f"cannot read {path} as an image: {str(error).strip().splitlines()[-1]}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise HSAMError(f"{path} is not a 3-D single-component label volume")
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(np.mod(array, 1) == 0):
            raise HSAMError(f"{path} holds non-integer values; a label volume is expected")
    return LabelVolume(
        array.astype(np.int32),
        tuple(reversed(image.GetSpacing())),  # type: ignore[arg-type]
        image.GetOrigin(),
        image.GetDirection(),
    )


def _volume_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.lower().endswith(_VOLUME_SUFFIXES):
            name = case_name(path)
            if name in found:
                raise HSAMError(f"two files in {folder} map to case {name!r}: {found[name].name} and {path.name}")
            found[name] = path
    return found


def pair_files(pred: str | os.PathLike[str], ref: str | os.PathLike[str]) -> list[tuple[str, Path, Path]]:
    """``(case, pred_file, ref_file)`` for two files, or for two folders matched by case name."""
    pred, ref = Path(pred), Path(ref)
    if pred.is_file() and ref.is_file():
        return [(case_name(ref), pred, ref)]
    if pred.is_dir() and ref.is_dir():
        preds, refs = _volume_files(pred), _volume_files(ref)
        common = sorted(set(preds) & set(refs))
        if not common:
            raise HSAMError(f"no case names in common between {pred} and {ref}; name files by case, e.g. case0001.nii.gz")
        missing = sorted(set(refs) - set(preds))
        if missing:
            raise HSAMError(f"{len(missing)} reference case(s) have no prediction in {pred}: {', '.join(missing[:5])}")
        return [(name, preds[name], refs[name]) for name in common]
    raise HSAMError(f"--pred and --ref must both be files or both be folders (got {pred}, {ref})")


@dataclass(frozen=True)
class Row:
    """One line of the report: one organ in one case."""

    case: str
    organ: int
    organ_name: str
    score: OrganScore


def _organ_names() -> dict[int, str]:
    from hsam.labels import ORGANS

    return {o.index: o.name for o in ORGANS}


def _image_of(volume: LabelVolume) -> sitk.Image:
    """The label volume as a SimpleITK image with its recorded geometry (spacing, origin and direction known)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(tuple(reversed(volume.spacing)))  # type: ignore[arg-type]
    image.SetOrigin(volume.origin)  # type: ignore[arg-type]
    image.SetDirection(volume.direction)  # type: ignore[arg-type]
    return image


def on_reference_grid(case: str, pred: LabelVolume, ref: LabelVolume) -> LabelVolume:
    """The prediction on the reference's voxel grid (see :func:`hsam.volume.onto_grid`) when both files record
    their geometry, e.g. a segmentation that Slicer saved cropped to its segments; else the prediction as it is."""
    if None in (pred.spacing, pred.origin, pred.direction, ref.spacing, ref.origin, ref.direction):
        return pred  # h5/npz: no geometry, _check_grids compares the shapes
    import SimpleITK as sitk

    from hsam.volume import onto_grid

    placed = onto_grid(_image_of(pred), _image_of(ref), f"case {case}: the predicted labels")
    return LabelVolume(sitk.GetArrayFromImage(placed), ref.spacing, ref.origin, ref.direction)


def _check_grids(case: str, pred: LabelVolume, ref: LabelVolume, protocol: str) -> None:
    if pred.array.shape != ref.array.shape:
        raise HSAMError(
            f"case {case}: prediction grid {pred.array.shape[::-1]} differs from reference {ref.array.shape[::-1]} "
            "(x, y, z); resample the prediction onto the reference grid"
        )
    if pred.direction is not None and ref.direction is not None and pred.origin is not None and ref.origin is not None:
        if not (np.allclose(pred.direction, ref.direction, atol=1e-4) and
                np.allclose(pred.origin, ref.origin, atol=1e-3 * max(1.0, float(np.max(ref.spacing or (1.0,)))))):
            raise HSAMError(f"case {case}: prediction and reference have different origin or direction (same voxels "
                            "would not be the same place); resample the prediction onto the reference grid")
    if protocol == "mm" and pred.spacing is not None and ref.spacing is not None:
        if not np.allclose(pred.spacing, ref.spacing, rtol=1e-3, atol=1e-4):
            raise HSAMError(f"case {case}: prediction spacing {pred.spacing[::-1]} differs from reference "
                            f"{ref.spacing[::-1]}; both must be on the same grid")


def evaluate_volumes(
    pairs: Iterable[tuple[str, LabelVolume, LabelVolume]],
    organs: Sequence[int] = tuple(range(1, 9)),
    protocol: str = "mm",
) -> list[Row]:
    """Score each organ of each ``(case, prediction, reference)``; HD95 in mm needs the reference spacing."""
    if protocol not in PROTOCOLS:
        raise HSAMError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    names = _organ_names()
    rows: list[Row] = []
    for case, pred, ref in pairs:
        pred = on_reference_grid(case, pred, ref)
        _check_grids(case, pred, ref, protocol)
        spacing = ref.spacing if ref.spacing is not None else pred.spacing
        if protocol == "mm" and spacing is None:
            raise HSAMError(f"case {case}: no voxel spacing is known (h5/npz input); use --protocol reference")
        scored = [k for k in organs if ref.labelled is None or k in ref.labelled]
        if len(scored) < len(organs):
            left_out = ", ".join(names.get(k, f"label_{k}") for k in organs if k not in scored)
            warnings.warn(f"case {case}: the reference did not label {left_out}; not scored", UserWarning, stacklevel=2)
        for score in score_volume(pred.array, ref.array, scored, spacing, protocol):
            rows.append(Row(case, score.organ, names.get(score.organ, f"label_{score.organ}"), score))
    return rows


def labelled_organs(path: Path) -> frozenset[int] | None:
    """The organs a reference file labelled, where it says so: a DICOM SEG's segments, or an exported case's
    provenance.json next to it (``organs``). None: a plain label volume, taken as labelling every organ."""
    from hsam.labels import ORGANS

    if path.name.lower().endswith(".dcm"):
        import pydicom

        from hsam.volume.dicom_seg import is_dicom_seg, organ_of_segment

        if not is_dicom_seg(path):
            return None
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        return frozenset(o for o in (organ_of_segment(item) for item in dataset.SegmentSequence) if o)
    provenance = path.parent / "provenance.json"
    if path.name.startswith("labels.") and provenance.is_file():
        from hsam.training.data import unknown_organs_of_case

        try:
            unknown = unknown_organs_of_case(json.loads(provenance.read_text(encoding="utf-8")))
        except ValueError:
            raise HSAMError(f"{provenance} is not valid JSON") from None
        return frozenset(o.index for o in ORGANS) - unknown
    return None


def read_pair(pred_path: Path, ref_path: Path) -> tuple[LabelVolume, LabelVolume]:
    """Read a prediction and its reference; a DICOM SEG (which stores only its segmented slices) is placed on the
    other one's grid, and two DICOM SEGs on the grid both span."""
    from hsam.volume.dicom_seg import is_dicom_seg, read_dicom_seg, read_dicom_segs_on_common_grid

    pred_seg = pred_path.name.lower().endswith(".dcm") and is_dicom_seg(pred_path)
    ref_seg = ref_path.name.lower().endswith(".dcm") and is_dicom_seg(ref_path)
    if pred_seg and ref_seg:
        p, r = read_dicom_segs_on_common_grid([pred_path, ref_path])
        return LabelVolume.from_image(p), LabelVolume.from_image(r)
    if ref_seg:
        p = read_label_volume(pred_path)
        return p, LabelVolume.from_image(read_dicom_seg(ref_path, p.grid()))
    if pred_seg:
        r = read_label_volume(ref_path)
        return LabelVolume.from_image(read_dicom_seg(pred_path, r.grid())), r
    return read_label_volume(pred_path), read_label_volume(ref_path)


def evaluate_files(
    pred: str | os.PathLike[str],
    ref: str | os.PathLike[str],
    label_map: str | Mapping[int, int] | None = None,
    pred_label_map: str | Mapping[int, int] | None = None,
    protocol: str = "mm",
    organs: Sequence[int] = tuple(range(1, 9)),
) -> list[Row]:
    """Evaluate a prediction file/folder against a reference file/folder. ``label_map`` converts the reference
    labels (e.g. ``totalseg_total``) and ``pred_label_map`` the predicted ones to H-SAM indices."""
    from hsam.labels import remap_labels

    ref_map, pred_map = resolve_label_map(label_map), resolve_label_map(pred_label_map)

    def load() -> Iterable[tuple[str, LabelVolume, LabelVolume]]:
        for case, pred_path, ref_path in pair_files(pred, ref):
            for path, mapping, option in ((ref_path, ref_map, "--label-map"), (pred_path, pred_map, "--pred-label-map")):
                if mapping is not None and path.name.lower().endswith(".dcm"):
                    raise HSAMError(f"{option} converts label values, but {path.name} is a DICOM SEG whose segments are "
                                    f"matched to organs by code and name; drop {option}")
            p, r = read_pair(pred_path, ref_path)
            if pred_map is not None:
                p = LabelVolume(remap_labels(p.array, pred_map), p.spacing, p.origin, p.direction)
            if ref_map is not None:
                r = LabelVolume(remap_labels(r.array, ref_map), r.spacing, r.origin, r.direction)
            yield case, p, dataclasses.replace(r, labelled=labelled_organs(ref_path))

    return evaluate_volumes(load(), organs, protocol)


CSV_COLUMNS = ("case", "organ", "organ_name", "dice", "hd95", "status", "pred_voxels", "ref_voxels")


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"


def write_csv(rows: Sequence[Row], path: str | os.PathLike[str], protocol: str = "mm") -> Path:
    """Write one line per case and organ (``hd95`` in mm, or voxels for the reference protocol) atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    unit = "hd95_mm" if protocol == "mm" else "hd95_voxels"
    writer.writerow([unit if c == "hd95" else c for c in CSV_COLUMNS])
    for row in rows:
        s = row.score
        writer.writerow([row.case, row.organ, row.organ_name, _fmt(s.dice), _fmt(s.hd95), s.status,
                         s.pred_voxels, s.ref_voxels])
    atomic.write_text(target, buffer.getvalue())
    return target


@dataclass(frozen=True)
class OrganSummary:
    organ: int
    organ_name: str
    dice_mean: float
    dice_std: float
    hd95_mean: float
    n_dice: int  # volumes entering the Dice mean
    n_hd95: int  # volumes entering the HD95 mean
    missed: int
    false_positive: int


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def summarize(rows: Sequence[Row]) -> tuple[list[OrganSummary], float, float]:
    """Per organ: mean over the volumes where the score is defined; then the mean over organs (of the organs that
    have a defined mean). Under the reference protocol every score is defined, which is exactly H-SAM's averaging
    (volumes first, then organs)."""
    organs: dict[int, list[Row]] = {}
    for row in rows:
        organs.setdefault(row.organ, []).append(row)
    summaries = []
    for organ, items in sorted(organs.items()):
        dices = [r.score.dice for r in items if not math.isnan(r.score.dice)]
        hds = [r.score.hd95 for r in items if not math.isnan(r.score.hd95)]
        summaries.append(OrganSummary(
            organ, items[0].organ_name, _mean(dices), float(np.std(dices)) if dices else math.nan, _mean(hds),
            len(dices), len(hds), sum(r.score.status == "missed" for r in items),
            sum(r.score.status == "false_positive" for r in items),
        ))
    mean_dice = _mean([s.dice_mean for s in summaries if not math.isnan(s.dice_mean)])
    mean_hd = _mean([s.hd95_mean for s in summaries if not math.isnan(s.hd95_mean)])
    return summaries, mean_dice, mean_hd


def write_summary(rows: Sequence[Row], path: str | os.PathLike[str], protocol: str = "mm") -> Path:
    """Write :func:`markdown_summary` to ``path`` atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(target, markdown_summary(rows, protocol))
    return target


def markdown_summary(rows: Sequence[Row], protocol: str = "mm") -> str:
    """A markdown table: per organ mean Dice (± std), mean HD95, counts; and the overall means."""
    summaries, mean_dice, mean_hd = summarize(rows)
    unit = "mm" if protocol == "mm" else "voxels"
    cases = len({r.case for r in rows})

    def f(value: float, digits: int) -> str:
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"

    lines = [
        f"## Evaluation ({cases} volume{'s' if cases != 1 else ''}, protocol `{protocol}`)",
        "",
        f"| organ | Dice | HD95 ({unit}) | volumes | missed | false positive |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        std = "" if math.isnan(s.dice_std) else f" ± {s.dice_std:.4f}"
        lines.append(f"| {s.organ_name} | {f(s.dice_mean, 4)}{std} | {f(s.hd95_mean, 2)} | {s.n_dice} | "
                     f"{s.missed} | {s.false_positive} |")
    lines.append(f"| **mean** | **{f(mean_dice, 4)}** | **{f(mean_hd, 2)}** | | | |")
    lines.append("")
    if protocol == "mm":
        lines.append("Organs absent from both prediction and reference are not counted; a missed or false-positive "
                     "organ scores Dice 0 and has no HD95.")
    else:
        lines.append("Reference protocol (released H-SAM test.py): HD95 in voxels; an empty prediction scores (0, 0), "
                     "a prediction of an absent organ scores (1, 0).")
    return "\n".join(lines) + "\n"
