"""Training data sources: every format becomes 2-D axial slices (image in [0, 1], H-SAM label indices).

Formats (``format`` in a data source of the training config):

* ``synapse_npz``: TransUNet/Synapse training slices ``<root>/caseXXXX_sliceNNN.npz`` (``image``, ``label``; already
  windowed to [0, 1]) named by a list file, one slice name per line.
* ``synapse_h5``: TransUNet/Synapse test volumes ``<root>/caseXXXX.npy.h5`` (``image``, ``label``: [D, H, W]) named
  by a list file (or every ``*.npy.h5`` in the folder).
* ``nnunet``: an nnU-Net raw dataset folder: ``imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz``,
  ``dataset.json`` (its label names are matched to H-SAM organs unless a ``label_map`` is given).
* ``cases``: case folders exported by the Slicer module: ``<root>/<case>/image.nii.gz``, ``labels.nii.gz`` (H-SAM
  indices; ``.nrrd``/``.seg.nrrd`` also accepted, or ``labels.dcm``: a DICOM SEG) and ``provenance.json``; the image
  may also be a DICOM series folder ``image/``; ``root`` may also be one case folder.
* ``pairs``: an explicit list ``[{"image": path, "label": path, "name": optional}]``.

Volumes are read with :mod:`hsam.volume`, put in the model card's orientation (``[z, y, x]`` axial slices), windowed
as the card says, and their labels remapped to H-SAM indices. Slices are named ``<case>_slice<NNN>`` everywhere, the
naming of the Synapse list files, so one list file format serves every source.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hsam.errors import HSAMError

SLICE_NAME = re.compile(r"^(?P<case>.+)_slice(?P<index>\d+)$")


@dataclass
class Volume:
    """One labelled volume in canonical layout: ``image`` float32 [D, H, W] in [0, 1], ``label`` uint8 [D, H, W]."""

    name: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float] | None = None  # (z, y, x) mm; None when unknown (h5)
    source: dict[str, Any] = field(default_factory=dict)
    # organ indices nobody labelled in this volume (a partial export): 0 in ``label`` there means "not known", and
    # the loss never teaches them as background (hsam.training.losses)
    unknown_organs: frozenset[int] = frozenset()

    def slice_name(self, z: int) -> str:
        return f"{self.name}_slice{z:03d}"


def slice_name(case: str, z: int) -> str:
    return f"{case}_slice{z:03d}"


def _organs_in(label: np.ndarray) -> frozenset[int]:
    return frozenset(int(v) for v in np.unique(label) if v > 0)


class SliceStore:
    """Random access to named 2-D slices: ``get(i) -> (image float32 [H, W] in [0, 1], label uint8 [H, W])``."""

    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def organs(self, i: int) -> frozenset[int]:
        """The organ indices present in slice ``i``."""
        return _organs_in(self.get(i)[1])

    def unknown_organs(self, i: int) -> frozenset[int]:
        """The organ indices nobody labelled in slice ``i``'s volume (none: every organ was labelled)."""
        return frozenset()

    def subset(self, names: Sequence[str]) -> "SliceStore":
        """The slices named in ``names`` in that order (repeats allowed: oversampling)."""
        position = {name: i for i, name in enumerate(self.ids)}
        missing = [n for n in names if n not in position]
        if missing:
            raise HSAMError(f"{len(missing)} slice name(s) in the list are not in the data, e.g. {missing[0]!r}")
        return _Subset(self, [position[n] for n in names])


class _Subset(SliceStore):
    def __init__(self, parent: SliceStore, indices: list[int]):
        self.parent, self.indices = parent, indices
        self.ids = [parent.ids[i] for i in indices]

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.parent.get(self.indices[i])

    def organs(self, i: int) -> frozenset[int]:
        return self.parent.organs(self.indices[i])

    def unknown_organs(self, i: int) -> frozenset[int]:
        return self.parent.unknown_organs(self.indices[i])


class VolumeSlices(SliceStore):
    """Every axial slice of in-memory volumes."""

    def __init__(self, volumes: Sequence[Volume]):
        self.volumes = list(volumes)
        self.index = [(v, z) for v in self.volumes for z in range(v.image.shape[0])]
        self.ids = [v.slice_name(z) for v, z in self.index]
        if len(set(self.ids)) != len(self.ids):
            raise HSAMError("two training volumes have the same case name; rename one")

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        volume, z = self.index[i]
        return volume.image[z], volume.label[z]

    def unknown_organs(self, i: int) -> frozenset[int]:
        return self.index[i][0].unknown_organs


class NpzSlices(SliceStore):
    """TransUNet/Synapse ``<root>/<name>.npz`` slices, read on demand."""

    def __init__(self, root: Path, names: Sequence[str], label_map: Mapping[int, int] | None = None):
        self.root, self.label_map = Path(root), label_map
        self.ids = list(dict.fromkeys(names))  # unique, in list order; a list's repeats come back through subset()
        for name in self.ids[:1] + self.ids[-1:]:
            if not (self.root / f"{name}.npz").is_file():
                raise HSAMError(f"slice file {self.root / (name + '.npz')} does not exist; check data root and list")
        self._organs: dict[int, frozenset[int]] = {}

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        path = self.root / f"{self.ids[i]}.npz"
        try:
            with np.load(path) as data:
                image, label = data["image"], data["label"]
        except (OSError, KeyError, ValueError) as error:
            raise HSAMError(f"cannot read slice {path}: {error}") from None
        return image.astype(np.float32, copy=False), _labels_to_uint8(label, self.label_map, path.name)

    def organs(self, i: int) -> frozenset[int]:
        if i not in self._organs:
            self._organs[i] = super().organs(i)
        return self._organs[i]


def _labels_to_uint8(label: np.ndarray, label_map: Mapping[int, int] | None, name: str) -> np.ndarray:
    label = np.rint(np.asarray(label)).astype(np.int64)
    if label_map is not None:
        from hsam.labels import remap_labels

        return remap_labels(label, label_map)
    if label.size and (label.min() < 0 or label.max() > 255):
        raise HSAMError(f"{name} holds label values outside 0..255")
    return label.astype(np.uint8)


def read_list(path: str | Path) -> list[str]:
    """Names from a list file, one per line (blank lines and ``#`` comments ignored; repeats kept)."""
    path = Path(path)
    if not path.is_file():
        raise HSAMError(f"list file {path} does not exist")
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    if not names:
        raise HSAMError(f"list file {path} names no slices or cases")
    return names


# ---------------------------------------------------------------------------------------------------------- volumes
def load_volume(
    image_path: str | Path,
    label_path: str | Path,
    window: Sequence[float],
    orientation: str = "LPS",
    label_map: Mapping[int, int] | None = None,
    name: str | None = None,
) -> Volume:
    """Read an image/label pair, reorient both to ``orientation``, window the image, remap labels to H-SAM."""
    import SimpleITK as sitk

    from hsam.labels import remap_labels
    from hsam.volume import onto_grid, read_image, read_labels, to_canonical
    from hsam.volume import window as apply_window

    image = read_image(image_path)
    # a DICOM SEG is placed on the CT's slices; a segmentation saved by Slicer is cropped to its segments: put it
    # back on the image grid
    labels = onto_grid(read_labels(label_path, reference=image), image, f"labels {Path(label_path).name}")
    array, how = to_canonical(image, orientation)
    if how.resampled:  # oblique: labels go onto the same canonical grid, nearest-neighbour (never interpolated)
        assert how.canonical_grid is not None
        labels = sitk.Resample(labels, how.canonical_grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        label_array = sitk.GetArrayFromImage(labels)
    else:
        label_array, _ = to_canonical(labels, orientation)
    label_array = np.ascontiguousarray(label_array)
    label_array = remap_labels(label_array, label_map) if label_map is not None else label_array.astype(np.uint8)
    spacing_xyz = how.canonical_spacing
    return Volume(
        name or _case_from_path(Path(image_path)),
        np.ascontiguousarray(apply_window(array, float(window[0]), float(window[1]))),
        label_array,
        (float(spacing_xyz[2]), float(spacing_xyz[1]), float(spacing_xyz[0])),
        {"image": str(image_path), "label": str(label_path)},
    )


def _case_from_path(path: Path) -> str:
    name = path.name
    for suffix in (".seg.nrrd", ".nii.gz", ".npy.h5", ".nii", ".nrrd", ".mha", ".mhd", ".h5", ".dcm"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"_0000$", "", name)


def load_h5_volume(path: str | Path, label_map: Mapping[int, int] | None = None) -> Volume:
    """A TransUNet/Synapse ``caseXXXX.npy.h5`` test volume (already windowed; no spacing recorded)."""
    try:
        import h5py
    except ImportError:
        raise HSAMError("reading Synapse .npy.h5 volumes needs h5py: pip install h5py") from None
    path = Path(path)
    if not path.is_file():
        raise HSAMError(f"volume {path} does not exist")
    with h5py.File(path, "r") as handle:
        if "image" not in handle or "label" not in handle:
            raise HSAMError(f"{path} must hold 'image' and 'label' datasets")
        image = np.asarray(handle["image"][()], dtype=np.float32)
        label = _labels_to_uint8(handle["label"][()], label_map, path.name)
    return Volume(_case_from_path(path), image, label, None, {"image": str(path)})


# Names an nnU-Net dataset.json (or any label table) may use for the H-SAM organs.
_SYNONYMS = {
    "spleen": 1, "kidney_right": 2, "right_kidney": 2, "kidney_r": 2, "rk": 2,
    "kidney_left": 3, "left_kidney": 3, "kidney_l": 3, "lk": 3,
    "gallbladder": 4, "gall_bladder": 4, "liver": 5, "stomach": 6, "aorta": 7, "pancreas": 8,
}  # fmt: skip


def organ_index_for_name(name: str) -> int | None:
    """The H-SAM organ a label name denotes (``"Right Kidney"``, ``"kidney_right"``, ``"gall bladder"``...)."""
    key = re.sub(r"[\s\-]+", "_", name.strip().lower())
    return _SYNONYMS.get(key)


def _nnunet_label_map(dataset: dict) -> dict[int, int]:
    labels = dataset.get("labels") or {}
    pairs: list[tuple[str, int]] = []
    for key, value in labels.items():
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit() and not key.isdigit()):
            pairs.append((key, int(value)))  # v2: {"spleen": 1}
        elif key.isdigit():
            pairs.append((str(value), int(key)))  # v1: {"1": "spleen"}
    mapping = {}
    for label_name, value in pairs:
        index = organ_index_for_name(label_name)
        if index is not None and value != 0:
            mapping[value] = index
    if not mapping:
        raise HSAMError("dataset.json names none of the H-SAM organs; give a label_map in the data config")
    return mapping


def load_nnunet(root: str | Path, window: Sequence[float], orientation: str,
                label_map: Mapping[int, int] | None) -> list[Volume]:
    """Volumes of an nnU-Net raw dataset folder (``imagesTr/``, ``labelsTr/``, ``dataset.json``)."""
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file() or not (root / "labelsTr").is_dir():
        raise HSAMError(f"{root} is not an nnU-Net dataset folder (needs dataset.json, imagesTr/, labelsTr/)")
    dataset = json.loads(meta_path.read_text(encoding="utf-8"))
    mapping = dict(label_map) if label_map is not None else _nnunet_label_map(dataset)
    ending = dataset.get("file_ending", ".nii.gz")
    volumes = []
    for label_path in sorted((root / "labelsTr").glob(f"*{ending}")):
        case = label_path.name[: -len(ending)]
        image_path = root / "imagesTr" / f"{case}_0000{ending}"
        if not image_path.is_file():
            raise HSAMError(f"no image {image_path.name} in {root / 'imagesTr'} for labels {label_path.name}")
        volumes.append(load_volume(image_path, label_path, window, orientation, mapping, case))
    if not volumes:
        raise HSAMError(f"no labelled cases in {root / 'labelsTr'}")
    return volumes


def _find(folder: Path, stem: str) -> Path | None:
    """``<stem>.<volume suffix>``, ``<stem>.dcm`` (labels: a DICOM SEG), or for the image a DICOM series folder."""
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd", ".dcm"):
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return folder / stem if stem == "image" and (folder / stem).is_dir() else None


def case_folders(root: str | Path) -> list[Path]:
    """Exported case folders under ``root`` (or ``root`` itself when it is one)."""
    root = Path(root)
    if not root.is_dir():
        raise HSAMError(f"cases folder {root} does not exist")
    # The export writes provenance.json last: a case folder without it is an export that was interrupted (killed,
    # disk full) and must not be trained on.
    if _find(root, "image") and _find(root, "labels"):
        if not (root / "provenance.json").is_file():
            raise HSAMError(f"{root} has no provenance.json: its export was interrupted; export the case again")
        return [root]
    candidates = [p for p in sorted(root.iterdir()) if p.is_dir() and _find(p, "image") and _find(p, "labels")]
    folders = [p for p in candidates if (p / "provenance.json").is_file()]
    skipped = [p.name for p in candidates if p not in folders]
    if skipped:
        import warnings

        warnings.warn(f"skipped {len(skipped)} case folder(s) in {root} without provenance.json (interrupted "
                      f"exports): {', '.join(skipped[:5])}; export them again or delete them", UserWarning, stacklevel=2)
    if not folders:
        raise HSAMError(f"no exported cases in {root}: each case is a folder with image.nii.gz, labels.nii.gz and "
                        "provenance.json (use the HSAMSlicer module's 'Export for fine-tuning')")
    return folders


def load_cases(root: str | Path, window: Sequence[float], orientation: str,
               label_map: Mapping[int, int] | None = None) -> list[Volume]:
    """Volumes from case folders exported by the Slicer module (labels already in H-SAM indices)."""
    volumes = []
    for folder in case_folders(root):
        image, labels = _find(folder, "image"), _find(folder, "labels")
        assert image is not None and labels is not None
        volume = load_volume(image, labels, window, orientation, label_map, folder.name)
        provenance = folder / "provenance.json"
        if provenance.is_file():
            try:
                volume.source["provenance"] = json.loads(provenance.read_text(encoding="utf-8"))
            except ValueError:
                raise HSAMError(f"{provenance} is not valid JSON") from None
            volume.unknown_organs = unknown_organs_of_case(volume.source["provenance"])
        volumes.append(volume)
    return volumes


def unknown_organs_of_case(provenance: Mapping[str, Any]) -> frozenset[int]:
    """The organ indices an exported case did not label: ``organs`` (name -> "labelled" | "unknown"); in an export
    from before that field, every organ without an exported segment."""
    from hsam.labels import ORGANS, organ

    states = provenance.get("organs")
    if isinstance(states, Mapping):
        return frozenset(organ(name).index for name, state in states.items() if state != "labelled")
    exported = (provenance.get("segments") or {}).get("exported")
    if isinstance(exported, Mapping):
        return frozenset(o.index for o in ORGANS if o.name not in exported)
    return frozenset()


def load_source_volumes(source: Mapping[str, Any], window: Sequence[float], orientation: str,
                        label_map: Mapping[int, int] | None) -> list[Volume]:
    """Volumes of a volume-based data source (``synapse_h5``, ``nnunet``, ``cases``, ``pairs``)."""
    fmt = source.get("format")
    if fmt == "synapse_h5":
        root = Path(source["root"])
        if source.get("list"):
            names = read_list(source["list"])
            return [load_h5_volume(root / f"{n}.npy.h5", label_map) for n in names]
        paths = sorted(root.glob("*.npy.h5"))
        if not paths:
            raise HSAMError(f"no *.npy.h5 volumes in {root}")
        return [load_h5_volume(p, label_map) for p in paths]
    if fmt == "nnunet":
        return load_nnunet(source["root"], window, orientation, label_map)
    if fmt == "cases":
        return load_cases(source["root"], window, orientation, label_map)
    if fmt == "pairs":
        return [load_volume(p["image"], p["label"], window, orientation, label_map, p.get("name"))
                for p in source["pairs"]]
    raise HSAMError(f"unknown data format {fmt!r}; use synapse_npz, synapse_h5, nnunet, cases or pairs")


def load_slices(source: Mapping[str, Any], window: Sequence[float], orientation: str,
                label_map: Mapping[int, int] | None) -> tuple[SliceStore, list[Volume]]:
    """All slices of a training source, and its volumes (empty for ``synapse_npz``, which has slices only)."""
    if source.get("format") == "synapse_npz":
        root = Path(source["root"])
        if source.get("list"):
            names = read_list(source["list"])
        else:
            names = sorted(p.name[:-4] for p in root.glob("*.npz"))
            if not names:
                raise HSAMError(f"no *.npz slices in {root}")
        store = NpzSlices(root, names, label_map)
        # a list file with repeats (oversampling) keeps them
        return (store.subset(names) if len(names) != len(store.ids) else store), []
    volumes = load_source_volumes(source, window, orientation, label_map)
    return VolumeSlices(volumes), volumes


def check_labels(volumes: Sequence[Volume], num_classes: int) -> None:
    """Labels must be H-SAM indices 0..num_classes (a missing label map shows up here)."""
    for volume in volumes:
        top = int(volume.label.max()) if volume.label.size else 0
        if top > num_classes:
            raise HSAMError(f"case {volume.name} has label {top} > {num_classes}; give a label_map "
                            "(btcv, totalseg_total, ...) in the data config")
