"""hsam.atomic: the target is the old file or the complete new one, never a partial one; permissions follow umask."""

from __future__ import annotations

import os
import stat

import pytest

from hsam import atomic


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "labels.csv"
    target.write_text("previous\n")
    with pytest.raises(RuntimeError):
        with atomic.replacing(target) as temp:
            temp.write_text("half of the new")
            raise RuntimeError("writer died")
    assert target.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]


def test_written_file_replaces_the_target_with_the_users_permissions(tmp_path):
    previous = os.umask(0o027)
    try:
        path = atomic.write_text(tmp_path / "report.md", "new\n")
    finally:
        os.umask(previous)
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_temp_file_keeps_the_suffix_a_writer_needs(tmp_path):
    with atomic.replacing(tmp_path / "overlay.png", suffix=".png") as temp:
        assert temp.suffix == ".png" and temp.parent == tmp_path
        temp.write_bytes(b"png")
    assert (tmp_path / "overlay.png").read_bytes() == b"png"
