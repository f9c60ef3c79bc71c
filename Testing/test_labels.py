"""hsam.labels: the organ table, terminology, label maps (checked against the real data's label_maps.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from hsam import labels
from hsam.paths import resources_dir


def test_organ_order_and_codes_follow_hsam():
    assert [o.name for o in labels.ORGANS] == [
        "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta", "pancreas"
    ]
    assert [o.index for o in labels.ORGANS] == list(range(1, 9))
    assert labels.CLASS_NAMES[0] == "background" and len(labels.CLASS_NAMES) == 9
    codes = {o.name: (o.type_code[1], o.modifier_code[1]) for o in labels.ORGANS}
    assert codes["spleen"] == ("78961009", "")
    assert codes["kidney_right"] == ("64033007", "24028007")
    assert codes["kidney_left"] == ("64033007", "7771000")
    assert codes["liver"] == ("10200004", "")
    assert codes["pancreas"] == ("15776009", "")
    assert all(o.type_code[0] == "SCT" for o in labels.ORGANS)


def test_colours_are_distinct_including_the_two_kidneys():
    colours = [o.rgb for o in labels.ORGANS]
    assert len(set(colours)) == 8
    right, left = labels.organ("kidney_right").rgb, labels.organ("kidney_left").rgb
    assert sum(abs(a - b) for a, b in zip(right, left)) > 150  # visibly different, not just 1 unit


def test_organ_lookup():
    assert labels.organ(5).name == "liver"
    assert labels.organ("left kidney").index == 3
    with pytest.raises(KeyError):
        labels.organ("heart")


def test_label_maps_match_the_real_data_description(real_data):
    spec = json.loads((real_data / "label_maps.json").read_text())
    for ours, theirs in [("btcv", "btcv_to_hsam"), ("totalseg_total", "totalseg_total_to_hsam"),
                         ("totalseg_total_mr", "totalseg_total_mr_to_hsam")]:
        assert labels.LABEL_MAPS[ours] == {int(k): v for k, v in spec[theirs].items()}
    assert list(labels.CLASS_NAMES) == [spec["hsam_classes"][str(i)] for i in range(9)]


def test_remap_totalsegmentator_labels_gives_plausible_organ_volumes(real_data):
    seg = sitk.ReadImage(str(real_data / "totalsegmentator" / "example_seg.nii.gz"))
    mapped = labels.remap_labels(sitk.GetArrayViewFromImage(seg), "totalseg_total")
    assert mapped.dtype == np.uint8
    assert set(np.unique(mapped)) == set(range(9))
    voxel_ml = float(np.prod(seg.GetSpacing())) / 1000.0
    counts = np.bincount(mapped.ravel(), minlength=9)
    # Numbers from the data README: liver 38634 voxels, spleen 9452, aorta 997 (TS 52), pancreas 644 (TS 7).
    assert counts[5] == 38634 and counts[1] == 9452 and counts[7] == 997 and counts[8] == 644
    assert 900 < counts[5] * voxel_ml < 1200


def test_remap_rejects_fractional_labels_and_handles_negative_values():
    assert labels.remap_labels(np.array([-1, 0, 52, 7]), "totalseg_total").tolist() == [0, 0, 7, 8]
    with pytest.raises(ValueError):
        labels.remap_labels(np.array([0.5]), {1: 1})


def test_shipped_color_table_is_generated_from_the_table():
    shipped = (resources_dir() / labels.COLOR_TABLE_FILENAME).read_text(encoding="utf-8")
    assert shipped == labels.color_table_csv(), "regenerate with: python -m hsam.labels"


def test_color_table_loads_in_slicer_mrml_with_terminology(tmp_path):
    mrml = pytest.importorskip("slicer")
    path = labels.write_color_table(tmp_path / "t.csv")
    scene = mrml.vtkMRMLScene()
    node = mrml.vtkMRMLColorTableNode()
    scene.AddNode(node)
    storage = mrml.vtkMRMLColorTableStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    for entry in labels.ORGANS:
        assert node.GetColorName(entry.index) == entry.name
        rgba = [0.0] * 4
        node.GetColor(entry.index, rgba)
        assert [round(c * 255) for c in rgba[:3]] == list(entry.rgb)
        term = node.GetTerminologyAsString(entry.index)
        assert f"SCT^{entry.type_code[1]}^{entry.type_code[2]}" in term
        if entry.modifier_code[1]:
            assert f"SCT^{entry.modifier_code[1]}^{entry.modifier_code[2]}" in term


def test_terminology_entry_has_seven_parts_and_slicerio_reads_it():
    segmentation = pytest.importorskip("slicerio.segmentation")
    entry = labels.organ("kidney_left").terminology_entry
    assert len(entry.split("~")) == 7
    parsed = segmentation.terminology_entry_from_string(entry)
    assert parsed["type"] == ["SCT", "64033007", "Kidney"]
    assert parsed["typeModifier"] == ["SCT", "7771000", "Left"]
