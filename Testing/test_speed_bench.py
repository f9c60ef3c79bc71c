"""``hsam bench`` runs end to end on the tiny config and reports what issue 8 asks for (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from hsam.cli import main


@pytest.mark.parametrize("modes", ["fast,int8"])
def test_bench_reports_ratio_memory_and_agreement(real_data, tmp_path, capsys, modes):
    out = tmp_path / "bench.json"
    table = tmp_path / "bench.md"
    code = main(["bench", "--config", "vit_tiny", "--volume", str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz"),
                 "--volume-slices", "4", "--slices", "1", "--rounds", "2", "--threads", "1", "--modes", modes,
                 "--json", str(out), "--markdown", str(table)])
    assert code == 0
    record = json.loads(out.read_text())
    rows = {row["mode"]: row for row in record["modes"]}
    assert list(rows) == ["eager", *modes.split(",")]  # eager first: the same-process baseline
    assert record["volume_size_xyz"][2] == 4 and record["threads"] == 1
    for row in rows.values():
        assert row["slice_s"] > 0 and row["speedup"] > 0 and row["volume_s"] > 0
        assert row["peak_rss_gib"] is None or row["peak_rss_gib"] > 0
        assert 0.0 <= row["identical_voxels"] <= 1.0
    assert rows["eager"]["identical_voxels"] == 1.0 and rows["eager"]["speedup"] == 1.0
    # the exact rewrite: encoder and logits equal to float rounding, labels unchanged
    assert rows["fast"]["encoder_rel_error"] < 1e-5 and rows["fast"]["logits_rel_error"] < 1e-5
    assert rows["fast"]["identical_voxels"] > 0.9999
    # int8 perturbs the encoder measurably but not wildly
    assert 1e-5 < rows["int8"]["encoder_rel_error"] < 0.2
    assert "| int8 |" in table.read_text() and "| int8 |" in capsys.readouterr().out
