"""Issue 30's speed scripts (benchmarks/speed/): the composite volume, the record shapes and the target verdicts.

No timing is asserted: the scripts' numbers come from the lead's quiet-window runs. The end-to-end and per-slice runs
themselves are too slow for a unit test; their pure parts (arguments, summaries, verdicts, flags) are tested here.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
SPEED = REPOSITORY / "benchmarks" / "speed"
DATA = REPOSITORY.parent / "shared" / "data" / "real"


def _script(name: str):  # noqa: ANN202 (module)
    sys.path.insert(0, str(SPEED))
    spec = importlib.util.spec_from_file_location(f"speed_{name}", SPEED / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


needs_data = pytest.mark.skipif(not (DATA / "lidc-idri-0001" / "ct.nii.gz").is_file(), reason="no shared real CT")


@needs_data
def test_cap_volume_stacks_chest_over_pelvis_on_one_grid_and_is_deterministic(tmp_path: Path) -> None:
    import SimpleITK as sitk

    command = [sys.executable, str(SPEED / "make_cap_volume.py"), str(tmp_path), "--slices", "6"]
    first = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    image = sitk.ReadImage(first["volume"])
    assert image.GetSize() == (512, 512, 6) and image.GetPixelID() == sitk.sitkInt16
    assert json.loads((tmp_path / "cap_512x512x6.json").read_text())["sha256_voxels_and_geometry"] == \
        first["sha256_voxels_and_geometry"]
    array = sitk.GetArrayFromImage(image)
    assert (array > 0).mean() > 0.05 and (array < -900).mean() > 0.2  # tissue and air in every part
    assert first["slices_from"] == {"0-2": "totalsegmentator/example_ct.nii.gz", "3-5": "lidc-idri-0001/ct.nii.gz"}
    again = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    assert again["sha256_voxels_and_geometry"] == first["sha256_voxels_and_geometry"]


def test_cap_volume_refuses_a_folder_inside_the_repository() -> None:
    done = subprocess.run([sys.executable, str(SPEED / "make_cap_volume.py"), str(REPOSITORY / "runs" / "cap")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "outside the repository" in done.stderr
    assert not (REPOSITORY / "runs" / "cap").exists()


def test_end_to_end_runs_the_logic_command_line_and_needs_a_volume(tmp_path: Path) -> None:
    end_to_end = _script("end_to_end")
    arguments = end_to_end.logic_arguments(tmp_path / "input.nrrd", tmp_path / "labels.nrrd", "hsam-lite-demo", "cpu")
    assert arguments[:2] == ["segment", str(tmp_path / "input.nrrd")] and "--mode" not in arguments
    assert arguments[arguments.index("--organs") + 1].split(",")[0] == "spleen"
    from hsam.cli import build_parser

    parsed = build_parser().parse_args(arguments)  # the real CLI accepts exactly this command line
    assert parsed.mode in (None, "auto") and parsed.device == "cpu"
    done = subprocess.run([sys.executable, str(SPEED / "end_to_end.py"), "--volume", str(tmp_path / "missing.nrrd"),
                           "--json", str(tmp_path / "out.json")], capture_output=True, text=True)
    assert done.returncode == 2 and "make_cap_volume.py" in done.stderr and not (tmp_path / "out.json").exists()


def test_per_slice_summary_pairs_rounds_with_eager_and_checks_the_class_target() -> None:
    per_slice = _script("per_slice")
    times = {"eager": {"plain": [2.0, 4.0, 2.0], "refined": [2.5, 5.0, 2.5]},
             "ort": {"plain": [1.0, 1.0, 1.0], "refined": [1.5, 1.5, 1.25]}}
    rows = per_slice.summarise(times)
    assert rows["ort"]["speedup"] == 2.0  # per-round ratios 2, 4, 2: their median
    assert rows["ort"]["s_per_slice_refined"]["median"] == 1.5 and rows["ort"]["refine_adds"] == 0.5
    assert rows["eager"]["speedup"] == 1.0
    lite = per_slice.verdict("avx512-bf16-amx", "lite", rows["ort"])
    assert lite == {"what": "s_per_slice_refined", "bound": 0.3, "value": 1.5, "met": False}
    assert per_slice.verdict("avx2 (emulated: ...)", "vitb", rows["ort"])["met"] is True  # 2.0x >= 2.0x
    assert per_slice.verdict("other", "lite", rows["ort"]) is None


def test_machine_class_follows_the_flags_and_the_avx2_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    common = _script("common")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert common.machine_class(["avx2", "avx512f", "amx_bf16"]) == "avx512-bf16-amx"
    assert common.machine_class(["avx2", "avx512f"]) == "avx512"
    assert common.machine_class(["avx2"]) == "avx2"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert common.machine_class(["avx2", "avx512f", "amx_bf16"]).startswith("avx2 (emulated")
    assert common.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "values": [3.0, 1.0, 2.0]}
    assert common.contended([2.0, 1.0, 1.0], [0.5, 0.5, 0.5]) and not common.contended([0.4, 0, 0], [1.2, 0, 0])


def test_per_slice_picks_lidc_slices_with_organs() -> None:
    if not (DATA / "lidc-idri-0001" / "labels_totalsegmentator.nii.gz").is_file():
        pytest.skip("no shared real CT")
    per_slice = _script("per_slice")
    slices, pixel_mm = per_slice.organ_slices(DATA, "LPS", 3)
    assert slices.shape == (3, 512, 512) and np.allclose(pixel_mm, 0.703125)
