"""The demo model's contrast-phase synthesis (``benchmarks/lite/synth.py``, issue 15) on a real CT slice."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPOSITORY


@pytest.fixture(scope="module")
def synth():
    spec = importlib.util.spec_from_file_location("synth", REPOSITORY / "benchmarks" / "lite" / "synth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_slice(real_data):
    """(HU, TotalSegmentator labels, names) of the sample's slice 15: liver, spleen, kidneys, aorta, vertebra."""
    folder = real_data / "totalsegmentator"
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_ct_sm.nii.gz")))[15].astype(np.float32)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_seg.nii.gz")))[15]
    names = {int(k): v for k, v in json.loads((folder / "classmap_total_v2.json").read_text())["total"].items()}
    return ct, labels, names


@pytest.mark.parametrize("phase", ["native", "arterial", "venous", "delayed"])
def test_a_contrast_phase_moves_the_enhancing_organs_and_keeps_the_rest(synth, real_slice, phase):
    ct, labels, names = real_slice
    ids = {name: k for k, name in names.items()}
    out = synth.contrast_phase(ct, labels, names, phase, np.random.default_rng(3))
    table = dict((keys, span) for keys, span in synth.CONTRAST_PHASES[phase])
    for organ in ("aorta", "liver", "spleen", "kidney_left"):
        mask = labels == ids[organ]
        assert mask.any(), organ
        span = next(span for keys, span in table.items() if any(key in organ for key in keys))
        assert span[0] - 1 <= np.median(out[mask]) <= span[1] + 1, organ
        assert np.allclose(np.std(out[mask]), np.std(ct[mask]), atol=1e-3)  # the real texture is kept
    kept = (labels == 0) | np.isin(labels, [ids["autochthon_left"], ids["vertebrae_L1"]])
    assert np.array_equal(out[kept], ct[kept])
    assert (labels == ids["vertebrae_L1"]).any()


def test_phase_priors_fall_back_to_the_wide_priors_and_draw_one_stomach_content(synth):
    rng = np.random.default_rng(0)
    contents = {synth.phase_prior("venous", rng)("stomach") for _ in range(40)}
    assert contents == set(synth.STOMACH_CONTENTS)
    venous = synth.phase_prior("venous", rng)
    assert venous("stomach") == venous("stomach")  # one content per slice
    assert venous("vertebrae_L1") == synth.prior("vertebrae_L1") and venous("aorta") != synth.prior("aorta")
