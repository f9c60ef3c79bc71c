"""The one precision rule (issue 30): the rule over measured rows, and ``auto`` applying it per processor feature."""

from __future__ import annotations

import pytest
import torch

from hsam.engines import cpu as cpu_info
from hsam.engines import modes
from hsam.engines import ort
from hsam.engines.modes import CPU_AUTO, GPU_AUTO, Evidence, choose_engine, gpu_precision, passes_precision_rule

XEON_SPR = "processor\t: 0\nmodel name\t: Xeon SPR\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_int8\n"
EPYC_ZEN2 = "processor\t: 0\nmodel name\t: EPYC Zen 2\nflags\t\t: fpu sse4_2 avx2 fma\n"


def _row(volume: str, organ: str, mode_dice: float, fp32_dice: float, equal: float) -> dict:
    return {"volume": volume, "mode": "bf16", "organ": organ, "dice_vs_reference": mode_dice,
            "fp32_dice_vs_reference": fp32_dice, "voxels_equal_fp32": equal}


def test_rule_passes_only_when_every_organ_and_volume_is_within_the_bar():
    good = [_row("a", "liver", 0.950, 0.955, 0.999), _row("b", "pancreas", 0.600, 0.608, 0.996)]
    verdict = passes_precision_rule(good)
    assert verdict["passes"] and verdict["dice_change"] == pytest.approx(0.008)
    assert verdict["voxels_equal"] == 0.996 and "pancreas" in verdict["worst"]
    # one organ on one volume moves by more than 0.01 (either way): fails
    assert not passes_precision_rule(good + [_row("c", "gallbladder", 0.70, 0.688, 0.999)])["passes"]
    assert not passes_precision_rule(good + [_row("c", "gallbladder", 0.67, 0.688, 0.999)])["passes"]
    # one volume under 99.5 % equal voxels: fails, although every Dice is unchanged
    assert not passes_precision_rule(good + [_row("c", "liver", 0.9, 0.9, 0.9949)])["passes"]
    assert not passes_precision_rule([])["passes"]


def test_evidence_without_a_measurement_never_passes():
    assert not Evidence("", "any", "bf16", "bf16", 2.0, None, 0.999, "not measured").passes
    assert Evidence("", "any", "bf16", "bf16", 2.0, 0.004, 0.999, "measured").passes


def test_shipped_tables_follow_the_rule_text():
    for row in CPU_AUTO + GPU_AUTO:
        assert row.passes == modes.within_rule(row.dice_change, row.voxels_equal)
        assert row.evidence and row.family in ("any", "sam_vit", "tiny_vit")
    assert not any(row.passes for row in GPU_AUTO)  # nothing measured on a GPU yet: auto runs fp32 there
    assert gpu_precision("cuda", True)[0] == "fp32" and gpu_precision("mps", False)[0] == "fp32"


def _machine(monkeypatch, cpuinfo: str):
    machine = cpu_info.parse_cpuinfo(cpuinfo)
    monkeypatch.setattr(cpu_info, "processor", lambda: machine)
    return machine


@pytest.mark.skipif(not ort.available(), reason="onnxruntime/onnx not installed (pip install hsam[onnx])")
@pytest.mark.parametrize("cpuinfo", [XEON_SPR, EPYC_ZEN2])
def test_auto_takes_the_fastest_row_that_meets_the_rule_for_the_processor(monkeypatch, cpuinfo):
    """A table where bf16 meets the rule for H-SAM-Lite only and ort-int8 for neither: the AVX512_BF16 machine runs
    bf16 for Lite and names ort-int8's miss; the AVX2 machine (no bf16/VNNI) runs ort and mentions neither."""
    machine = _machine(monkeypatch, cpuinfo)
    monkeypatch.setattr(modes, "CPU_AUTO", (
        Evidence("", "any", "ort", "fp32", 1.4, 0.0, 1.0, "identical"),
        Evidence("native_bf16", "tiny_vit", "bf16", "bf16", 1.7, 0.004, 0.998, "bf16 within"),
        Evidence("native_bf16", "sam_vit", "bf16", "bf16", 2.4, 0.02, 0.998, "pancreas moved 0.02"),
        Evidence("native_int8", "any", "ort-int8", "int8", 2.9, 0.05, 0.996, "pancreas moved 0.05"),
    ))
    cpu = torch.device("cpu")
    lite, vit = choose_engine("auto", cpu, "tiny_vit"), choose_engine("auto", cpu, "sam_vit")
    assert lite.reason.startswith(machine.describe()) and vit.reason.startswith(machine.describe())
    assert lite.mode == ("bf16" if machine.native_bf16 else "ort") and vit.mode == "ort"
    assert ("pancreas moved 0.05" in lite.reason) == machine.native_int8
    assert ("pancreas moved 0.02" in vit.reason) == machine.native_bf16
    assert "fails the precision rule" in vit.reason if machine.native_bf16 else "fails" not in vit.reason


@pytest.mark.skipif(not ort.available(), reason="onnxruntime/onnx not installed (pip install hsam[onnx])")
@pytest.mark.parametrize("cpuinfo", [XEON_SPR, EPYC_ZEN2])
def test_auto_with_the_shipped_table_runs_a_row_that_meets_the_rule(monkeypatch, cpuinfo):
    machine = _machine(monkeypatch, cpuinfo)
    for family in ("sam_vit", "tiny_vit"):
        choice = choose_engine("auto", torch.device("cpu"), family)
        row = next(r for r in CPU_AUTO if r.mode == choice.mode and r.family in ("any", family))
        assert row.passes and (not row.feature or getattr(machine, row.feature))
        faster = [r for r in CPU_AUTO if r.family in ("any", family) and (r.speedup or 0) > (row.speedup or 0)
                  and (not r.feature or getattr(machine, r.feature))]
        assert all(not r.passes for r in faster) and all(r.evidence in choice.reason for r in faster)
    assert choose_engine("auto", torch.device("cuda"), "sam_vit").mode == "fast"
