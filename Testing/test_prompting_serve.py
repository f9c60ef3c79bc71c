"""``hsam serve``: the warm prompt process (JSON lines), with LiteMedSAM's real weights on a real CT."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPOSITORY, needs_litemedsam

from hsam.labels import remap_labels

pytestmark = needs_litemedsam
SLICE = 15


def _requests(ct: str, out: str, box: list[int]) -> list[dict]:
    return [
        {"cmd": "prompt", "organ": "liver", "slice": SLICE, "box": box},  # before open: an error, not a crash
        {"cmd": "open", "volume": ct},
        {"cmd": "prompt", "organ": "heart", "slice": SLICE, "box": box},
        {"cmd": "prompt", "organ": "liver", "slice": SLICE, "box": box},
        {"cmd": "prompt", "organ": "liver", "slice": SLICE, "point": [box[0] + 5, box[1] + 5], "positive": False},
        {"cmd": "labels", "output": out},
        {"cmd": "quit"},
    ]


@pytest.fixture(scope="module")
def liver(real_data):
    seg = sitk.ReadImage(str(real_data / "totalsegmentator" / "example_seg.nii.gz"))
    truth = remap_labels(sitk.GetArrayFromImage(seg), "totalseg_total")[SLICE] == 5
    rows, cols = np.flatnonzero(truth.any(axis=1)), np.flatnonzero(truth.any(axis=0))
    return truth, [int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])]


def _check(answers: list[dict], out, truth) -> None:
    assert "no volume is open" in answers[0]["error"]
    assert answers[1]["ok"] and answers[1]["slices"] == 30
    assert "unknown organ" in answers[2]["error"]
    assert answers[3]["organ"] == 5 and answers[3]["slice"] == SLICE and answers[3]["voxels"] > 1000
    assert answers[4]["voxels"] <= answers[3]["voxels"]
    assert answers[5]["written"] == str(out) and answers[6]["cmd"] == "quit"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))[SLICE] == 5
    assert 2 * (labels & truth).sum() / (labels.sum() + truth.sum()) > 0.85


@pytest.mark.slow  # 60 s on the loaded shared machine (one slice encoded)
def test_serve_answers_each_request_in_order(real_data, liver, tmp_path):
    from hsam.cli.serve import Server, serve

    truth, box = liver
    ct = str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz")
    out = tmp_path / "masks.nrrd"
    lines = "\n".join(json.dumps(r) for r in _requests(ct, str(out), box)) + "\nnot json\n"
    answers = io.StringIO()
    serve(Server(None), io.StringIO("{}\n" + lines), answers)
    parsed = [json.loads(line) for line in answers.getvalue().splitlines()]
    assert "unknown cmd" in parsed[0]["error"]
    assert len(parsed) == 8  # stops at quit: the line after it is never read
    _check(parsed[1:], out, truth)


@pytest.mark.slow
def test_serve_as_a_child_process(real_data, liver, tmp_path):
    truth, box = liver
    ct = str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz")
    out = tmp_path / "masks.nii.gz"
    child = subprocess.Popen([sys.executable, "-m", "hsam", "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=REPOSITORY)
    try:
        assert json.loads(child.stdout.readline()) == {"ok": True, "cmd": "ready"}
        answers = []
        for request in _requests(ct, str(out), box):
            child.stdin.write(json.dumps(request) + "\n")
            child.stdin.flush()
            answers.append(json.loads(child.stdout.readline()))
        assert child.wait(timeout=60) == 0
    finally:
        child.kill()
    _check(answers, out, truth)


def test_propagate_limits_in_the_request_space_and_the_older_canonical_form():
    from types import SimpleNamespace

    from hsam.cli.serve import Server
    from hsam.errors import HSAMError
    from hsam.volume import to_canonical

    image = sitk.Image(6, 5, 8, sitk.sitkInt16)
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))  # k runs to the feet: canonical slices run against it
    image.SetSpacing((1.0, 1.0, 2.0))
    _, how = to_canonical(image, "LPS")
    server = Server.__new__(Server)  # the limits need the volume's grid only, not the model
    server.session = SimpleNamespace(how=how)
    assert server._limits({"from": 1, "to": 3}, start=5) == (4, 6)  # canonical z = 7 - k
    assert server._limits({"space": "lps", "to": image.TransformIndexToPhysicalPoint((0, 0, 1))[2]}, 5) == (None, 6)
    assert server._limits({}, start=5) == (None, None)
    with pytest.raises(HSAMError, match="outside the limits"):
        server._limits({"from": 4, "to": 6}, start=5)
    with pytest.raises(HSAMError, match='"from" .* must not be above "to"'):
        server._limits({"from": 6, "to": 4}, start=5)


@pytest.mark.slow  # two more slices encoded
def test_propagate_reports_each_slice_before_its_answer_and_keeps_to_its_limits(real_data, liver):
    from hsam.cli.serve import Server, serve

    _, box = liver
    ct = str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz")
    requests = [{"cmd": "open", "volume": ct}, {"cmd": "prompt", "organ": "liver", "slice": SLICE, "box": box},
                {"cmd": "propagate", "organ": "liver", "slice": SLICE, "from": SLICE - 1, "to": SLICE + 1,
                 "progress": True}]
    answers = io.StringIO()
    serve(Server(None), io.StringIO("\n".join(json.dumps(r) for r in requests) + "\n"), answers)
    lines = [json.loads(line) for line in answers.getvalue().splitlines()]
    progress, answer = lines[2:-1], lines[-1]
    assert answer["ok"] and sorted(answer["slices"]) == [SLICE - 1, SLICE + 1]  # the file's k axis is canonical z
    assert [line["progress"]["slice"] for line in progress] == answer["slices"]
    assert [line["progress"]["done"] for line in progress] == [1, 2]
