"""hsam.pipeline.run.segment_volume with the real H-SAM network (tiny config, seeded random weights) on real CT."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hsam.errors import HSAMError
from hsam.pipeline.device import select_device, select_precision
from hsam.pipeline.options import SegmentOptions
from hsam.pipeline.post import keep_largest_components
from hsam.pipeline.result import Cancelled
from hsam.pipeline.run import segment_volume
from hsam.labels import CLASS_NAMES
from hsam.volume import read_image, same_geometry


@pytest.fixture(scope="module")
def tiny():
    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard
    from hsam.model.config import load_model_config

    torch.manual_seed(0)
    config = load_model_config("vit_tiny")
    model = build_hsam(config).eval()
    card = ModelCard.for_config(config, "tiny-random", classes=list(CLASS_NAMES), demo=True)
    return model, card


@pytest.fixture(scope="module")
def ct(real_data):
    return read_image(real_data / "totalsegmentator" / "example_ct_sm.nii.gz")


@pytest.fixture(scope="module")
def ct_result(tiny, ct):
    model, card = tiny
    return segment_volume(ct, model, card, SegmentOptions(device="cpu"))


def _labels(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def test_output_grid_equals_ras_nifti_input(ct, ct_result):
    assert same_geometry(ct_result.labels, ct, 0.0)
    assert same_geometry(ct_result.confidence, ct, 0.0)
    assert ct_result.labels.GetPixelID() == sitk.sitkUInt8 == ct_result.confidence.GetPixelID()
    labels = _labels(ct_result.labels)
    assert labels.max() < len(CLASS_NAMES)
    confidence = _labels(ct_result.confidence)
    assert confidence.min() >= int(255 / len(CLASS_NAMES))  # the max of K probabilities is at least 1/K
    assert ct_result.device == "cpu" and ct_result.precision == "fp32"
    voxel_ml = np.prod(ct.GetSpacing()) / 1000
    counts = np.bincount(labels.ravel(), minlength=9)
    assert list(ct_result.volumes_ml) == list(CLASS_NAMES[1:])
    assert np.allclose([ct_result.volumes_ml[n] for n in CLASS_NAMES[1:]], counts[1:] * voxel_ml)


def test_output_grid_equals_lps_dicom_input(tiny, real_data):
    model, card = tiny
    dicom = read_image(real_data / "dcmqi" / "ct-3slice")
    result = segment_volume(dicom, model, card, SegmentOptions(device="cpu", batch_size=3))
    assert same_geometry(result.labels, dicom, 0.0) and same_geometry(result.confidence, dicom, 0.0)
    assert result.labels.GetSize() == (512, 512, 3)


@pytest.mark.parametrize("order,flips", [([0, 1, 2], [True, True, False]), ([1, 0, 2], [False, False, True]),
                                         ([2, 1, 0], [True, False, True])])
def test_flipped_and_permuted_copies_give_the_same_labels_in_physical_space(tiny, ct, ct_result, order, flips):
    model, card = tiny
    copy = sitk.Flip(sitk.PermuteAxes(ct, order), flips)
    result = segment_volume(copy, model, card, SegmentOptions(device="cpu"))
    assert same_geometry(result.labels, copy, 0.0)
    # bring the copy's labels back onto the original grid by resampling in physical space (nearest neighbour)
    back = sitk.Resample(result.labels, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 255)
    np.testing.assert_array_equal(_labels(back), _labels(ct_result.labels))


def test_oblique_input_keeps_its_grid(tiny, ct):
    model, card = tiny
    angle = np.radians(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    oblique = sitk.Image(ct)
    oblique.SetDirection((rotation @ np.array(ct.GetDirection()).reshape(3, 3)).ravel().tolist())
    result = segment_volume(oblique, model, card, SegmentOptions(device="cpu"))
    assert same_geometry(result.labels, oblique, 0.0)


def test_progress_and_cancel(tiny, ct):
    model, card = tiny
    calls = []
    segment_volume(ct, model, card,
                   SegmentOptions(device="cpu", batch_size=4, slab=False), progress=lambda k, n: calls.append((k, n)))
    assert calls == [(0, 30)] + [(min(30, k), 30) for k in range(4, 34, 4)]  # with the slab search: test_slab.py
    polled = []

    def cancel() -> bool:
        polled.append(1)
        return len(polled) > 2

    seen = []
    with pytest.raises(Cancelled):
        segment_volume(ct, model, card,
                       SegmentOptions(device="cpu", batch_size=4, slab=False), cancel=cancel, progress=lambda k,
                                      n: seen.append(k))
    assert seen == [0, 4, 8]  # two batches ran, the third was cancelled before it started


def test_organ_subset_and_largest_component(tiny, ct):
    from scipy import ndimage

    model, card = tiny
    result = segment_volume(ct, model, card, SegmentOptions(device="cpu", organs=["liver", 1], largest_component=True))
    labels = _labels(result.labels)
    assert set(np.unique(labels)) <= {0, 1, 5}
    for value in (1, 5):
        _, count = ndimage.label(labels == value, structure=np.ones((3, 3, 3)))
        assert count <= 1
    with pytest.raises(HSAMError, match="unknown organ"):
        segment_volume(ct, model, card, SegmentOptions(device="cpu", organs=["heart"]))


def test_keep_largest_components_on_a_known_array():
    labels = np.zeros((5, 6, 6), np.uint8)
    labels[0:2, 0:2, 0:2] = 3  # 8 voxels
    labels[4, 5, 5] = 3  # stray voxel
    labels[3, 0, 0] = 1
    keep_largest_components(labels)
    assert (labels == 3).sum() == 8 and labels[4, 5, 5] == 0 and labels[3, 0, 0] == 1


def test_bad_inputs_raise_one_line_errors(tiny, ct):
    model, card = tiny
    with pytest.raises(HSAMError, match="2-D"):
        segment_volume(ct[:, :, 0], model, card, SegmentOptions(device="cpu"))
    array = sitk.GetArrayFromImage(ct).astype(np.float32)
    array[1, 2, 3] = np.nan
    nan = sitk.GetImageFromArray(array)
    nan.CopyInformation(ct)
    with pytest.raises(HSAMError, match="NaN"):
        segment_volume(nan, model, card, SegmentOptions(device="cpu"))
    with pytest.raises(HSAMError, match="GPU"):
        segment_volume(ct, model, card, SegmentOptions(device="cpu", precision="fp16"))
    with pytest.raises(HSAMError, match="batch size"):
        segment_volume(ct, model, card, SegmentOptions(device="cpu", batch_size=0))


def test_mr_input_gets_a_warning(tiny, real_data):
    model, card = tiny
    mr = read_image(real_data / "totalsegmentator" / "example_mr_sm.nii.gz")
    result = segment_volume(mr, model, card, SegmentOptions(device="cpu", batch_size=10))
    assert any("does not look like CT" in w for w in result.warnings)


def test_device_and_precision_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cuda", "mps", "cpu")
    assert select_precision("auto", torch.device("cpu")) == ("fp32", None)
    with pytest.raises(HSAMError):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(HSAMError, match="no CUDA"):
            select_device("cuda")
