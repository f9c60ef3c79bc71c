"""Training data sources on the real TotalSegmentator CT: pairs, nnU-Net folders, exported cases, Synapse npz/h5."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.errors import HSAMError
from hsam.labels import LABEL_MAPS, remap_labels
from hsam.training.data import check_labels, load_slices, load_source_volumes, read_list
from hsam.training.splits import few_shot_split

WINDOW = [-125, 275]


@pytest.fixture()
def ct(real_data):
    folder = real_data / "totalsegmentator"
    return folder / "example_ct_sm.nii.gz", folder / "example_seg.nii.gz"


def test_pairs_are_reoriented_windowed_and_remapped(ct):
    image_path, label_path = ct
    (volume,) = load_source_volumes({"format": "pairs", "pairs": [{"image": str(image_path), "label": str(label_path)}]},
                                    WINDOW, "LPS", LABEL_MAPS["totalseg_total"])
    assert volume.name == "example_ct_sm" and volume.image.shape == (30, 101, 122) and volume.spacing == (3.0, 3.0, 3.0)
    assert volume.image.dtype == np.float32 and 0.0 <= volume.image.min() and volume.image.max() <= 1.0
    assert set(np.unique(volume.label)) == set(range(9))
    # The file is stored with direction diag(-1, -1, 1); LPS puts it in ITK's identity layout: x and y flipped.
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path))).astype(np.float32)
    expected = (np.clip(raw, -125, 275) + 125) / 400
    assert np.allclose(volume.image, expected[:, ::-1, ::-1], atol=1e-6)
    raw_labels = remap_labels(sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))), "totalseg_total")
    assert np.array_equal(volume.label, raw_labels[:, ::-1, ::-1])


def test_unmapped_labels_are_caught(ct):
    image_path, label_path = ct
    volumes = load_source_volumes({"format": "pairs", "pairs": [{"image": str(image_path), "label": str(label_path)}]},
                                  WINDOW, "LPS", None)
    with pytest.raises(HSAMError, match="give a label_map"):
        check_labels(volumes, 8)


def test_nnunet_folder_label_names_map_to_hsam(tmp_path, ct):
    image_path, label_path = ct
    root = tmp_path / "Dataset001_Abdomen"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    shutil.copy(image_path, root / "imagesTr" / "ab_001_0000.nii.gz")
    seg = sitk.ReadImage(str(label_path))
    own = remap_labels(sitk.GetArrayFromImage(seg), {5: 1, 1: 2, 2: 3})  # liver=1, spleen=2, right kidney=3
    out = sitk.GetImageFromArray(own)
    out.CopyInformation(seg)
    sitk.WriteImage(out, str(root / "labelsTr" / "ab_001.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2, "Right Kidney": 3},
        "numTraining": 1, "file_ending": ".nii.gz"}))
    store, volumes = load_slices({"format": "nnunet", "root": str(root)}, WINDOW, "LPS", None)
    assert [v.name for v in volumes] == ["ab_001"] and len(store) == 30 and store.ids[0] == "ab_001_slice000"
    reference = remap_labels(sitk.GetArrayFromImage(seg), {5: 5, 1: 1, 2: 2})[:, ::-1, ::-1]
    assert np.array_equal(volumes[0].label, reference)


def test_exported_case_folders(tmp_path, ct):
    image_path, label_path = ct
    seg = sitk.ReadImage(str(label_path))
    hsam = sitk.GetImageFromArray(remap_labels(sitk.GetArrayFromImage(seg), "totalseg_total"))
    hsam.CopyInformation(seg)
    for name in ("patient_a", "patient_b"):
        case = tmp_path / "cases" / name
        case.mkdir(parents=True)
        shutil.copy(image_path, case / "image.nii.gz")
        sitk.WriteImage(hsam, str(case / "labels.nii.gz"))
        (case / "provenance.json").write_text(json.dumps({"format": "hsam-case/1", "model": "hsam-tiny"}))
    (tmp_path / "cases" / "notes").mkdir()  # not a case: ignored
    volumes = load_source_volumes({"format": "cases", "root": str(tmp_path / "cases")}, WINDOW, "LPS", None)
    assert [v.name for v in volumes] == ["patient_a", "patient_b"]
    assert volumes[0].source["provenance"]["model"] == "hsam-tiny"
    assert set(np.unique(volumes[1].label)) == set(range(9))
    (one,) = load_source_volumes({"format": "cases", "root": str(tmp_path / "cases" / "patient_a")}, WINDOW, "LPS", None)
    assert one.name == "patient_a"
    with pytest.raises(HSAMError, match="no exported cases"):
        load_source_volumes({"format": "cases", "root": str(tmp_path / "cases" / "notes")}, WINDOW, "LPS", None)


def test_synapse_npz_slices_and_h5_volumes(tmp_path, ct):
    h5py = pytest.importorskip("h5py")
    image_path, label_path = ct
    (volume,) = load_source_volumes({"format": "pairs", "pairs": [{"image": str(image_path), "label": str(label_path)}]},
                                    WINDOW, "LPS", LABEL_MAPS["totalseg_total"])
    # TransUNet layout: per-slice npz (float32 image and label) and one h5 per test volume, with BTCV label values
    btcv = {v: k for k, v in LABEL_MAPS["btcv"].items()}
    btcv_labels = remap_labels(volume.label, btcv).astype(np.float32)
    (tmp_path / "train_npz").mkdir()
    names = []
    for z in range(volume.image.shape[0]):
        names.append(f"case0005_slice{z:03d}")
        np.savez(tmp_path / "train_npz" / f"{names[-1]}.npz", image=volume.image[z], label=btcv_labels[z])
    (tmp_path / "train.txt").write_text("\n".join(names[::2]) + "\n")
    (tmp_path / "test_vol_h5").mkdir()
    with h5py.File(tmp_path / "test_vol_h5" / "case0005.npy.h5", "w") as handle:
        handle["image"], handle["label"] = volume.image, btcv_labels
    (tmp_path / "test_vol.txt").write_text("case0005\n")

    source = {"format": "synapse_npz", "root": str(tmp_path / "train_npz"), "list": str(tmp_path / "train.txt")}
    store, volumes = load_slices(source, WINDOW, "LPS", LABEL_MAPS["btcv"])
    assert volumes == [] and store.ids == read_list(tmp_path / "train.txt") and len(store) == 15
    image, label = store.get(3)
    assert np.array_equal(image, volume.image[6]) and np.array_equal(label, volume.label[6])
    split = few_shot_split(store, fraction=0.2, seed=2345)
    assert len(split.names) == 3 and set(split.names) <= set(store.ids)

    (h5_volume,) = load_source_volumes({"format": "synapse_h5", "root": str(tmp_path / "test_vol_h5"),
                                        "list": str(tmp_path / "test_vol.txt")}, WINDOW, "LPS", LABEL_MAPS["btcv"])
    assert h5_volume.name == "case0005" and h5_volume.spacing is None
    assert np.array_equal(h5_volume.label, volume.label)
