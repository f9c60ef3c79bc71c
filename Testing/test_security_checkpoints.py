"""Hostile model files: pickles that would run code, safetensors headers that lie, cards that lie, foreign class counts.

Every payload here is real: a subprocess first proves that ``torch.load(weights_only=False)`` (what a careless loader
would do) really creates the marker file; then each hsam entry point must refuse the file with a one-line HSAMError
and the marker must not exist.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import one_line_error
from hsam.errors import HSAMError
from hsam.model.build import build_hsam
from hsam.model.checkpoint import CARD_FILE, TENSORS_FILE, ModelCard, load_model, save_model, sha256_file
from hsam.model.config import load_model_config


class _Payload:
    """Unpickling this runs ``exec`` of code that writes ``marker``: a real code-execution payload."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _hostile_files(folder: Path, marker: Path) -> dict[str, Path]:
    """The same payload in the three containers a .pth can be: torch zip, torch legacy, and a bare pickle."""
    state = {"w_a_000": torch.zeros(2, 2), "image_encoder.patch_embed.proj.weight": _Payload(str(marker))}
    files = {
        "zip": folder / "evil_zip.pth",
        "legacy": folder / "evil_legacy.pth",
        "pickle": folder / "evil_pickle.pth",
    }
    torch.save(state, files["zip"])
    torch.save(state, files["legacy"], _use_new_zipfile_serialization=False)
    with open(files["pickle"], "wb") as handle:
        pickle.dump(state, handle, protocol=2)
    return files


def _payload_is_real(path: Path, marker: Path) -> None:
    """An unsafe load in a child process creates the marker (then it is removed again)."""
    code = "import sys, torch; torch.load(sys.argv[1], weights_only=False, map_location='cpu')"
    if path.name.endswith("pickle.pth"):
        code = "import sys, pickle; pickle.load(open(sys.argv[1], 'rb'))"
    subprocess.run([sys.executable, "-c", code, str(path)], check=False, capture_output=True, timeout=120)
    assert marker.read_text() == "pwned", f"the payload in {path.name} did not run under an unsafe load"
    marker.unlink()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    marker = folder / "PWNED"
    files = _hostile_files(folder, marker)
    for path in files.values():
        _payload_is_real(path, marker)
    return files, marker


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
def test_code_running_pth_is_refused_by_the_official_importer(hostile, kind):
    from hsam.model.official import load_pth

    files, marker = hostile
    one_line_error(lambda: load_pth(files[kind], "H-SAM checkpoint"), files[kind].name, "H-SAM checkpoint")
    assert not marker.exists()


def test_code_running_pth_is_refused_everywhere_a_pth_is_read(hostile, tmp_path):
    """Every loader that accepts a .pth: official import (as H-SAM or SAM file), load_model, the CLI, training."""
    from hsam.cli import main
    from hsam.model.official import import_official

    files, marker = hostile
    evil = files["zip"]
    one_line_error(lambda: import_official(str(evil), str(files["legacy"]), "x"), "evil_")
    one_line_error(lambda: load_model(evil), "evil_zip.pth", "import-official")
    # the CLI: hsam models import-official (the SAM file is checked by SHA-256 before anything is unpickled)
    assert main(["models", "import-official", str(evil), "--sam", str(files["legacy"])]) == 2
    assert main(["segment", str(evil), "-o", str(tmp_path / "out.nii.gz"), "--model", str(evil)]) == 2
    try:
        from hsam.training.state import load_state
    except ImportError:  # training package still being written
        load_state = None
    if load_state is not None:
        one_line_error(lambda: load_state(evil), "evil_zip.pth")
    assert not marker.exists()


def test_pickled_objects_in_npz_label_files_are_not_unpickled(tmp_path):
    """A .npz label volume holding an object array is refused by np.load (allow_pickle stays False)."""
    from hsam.evaluation.report import read_label_volume

    marker = tmp_path / "PWNED"
    evil = tmp_path / "case0001.npz"
    np.savez(evil, label=np.array([_Payload(str(marker))], dtype=object))
    one_line_error(lambda: read_label_volume(evil), "case0001.npz")
    assert not marker.exists()


def test_no_unsafe_load_call_in_the_package():
    """Static check: every torch.load in hsam passes weights_only=True; nothing calls pickle/np.load(allow_pickle)."""
    import re

    package = Path(__file__).resolve().parents[1] / "HSAMSlicer"
    offenders = []
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                offenders.append(f"{path.name}: {match.group(0)}")
        for pattern in (r"allow_pickle\s*=\s*True", r"\bpickle\.loads?\(", r"\bdill\b", r"\bcloudpickle\b"):
            if re.search(pattern, text):
                offenders.append(f"{path.name}: {pattern}")
    assert not offenders, offenders


# ----------------------------------------------------------------------------------------------- safetensors lies


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    config = load_model_config("vit_tiny")
    model = build_hsam(config).eval()
    card = ModelCard.for_config(config, "tiny", demo=True)
    return save_model(model, card, tmp_path_factory.mktemp("saved") / "tiny")


def _copy(folder: Path, target: Path) -> Path:
    target.mkdir()
    for name in (CARD_FILE, TENSORS_FILE):
        (target / name).write_bytes((folder / name).read_bytes())
    return target


def _rewrite_tensors(folder: Path, data: bytes) -> None:
    """Replace the tensors file and update the card's SHA-256, so the loader gets past the checksum to the parser."""
    (folder / TENSORS_FILE).write_bytes(data)
    card = json.loads((folder / CARD_FILE).read_text())
    card["sha256"] = sha256_file(folder / TENSORS_FILE)
    (folder / CARD_FILE).write_text(json.dumps(card))


def _split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: dict | bytes, body: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _lie_past_end(header, body):
    key = _first_tensor(header)
    start, _ = header[key]["data_offsets"]
    header[key]["data_offsets"] = [start, len(body) + 4096]
    return _join(header, body)


def _lie_overlap(header, body):
    keys = [k for k in header if k != "__metadata__"]
    header[keys[1]]["data_offsets"] = list(header[keys[0]]["data_offsets"])
    return _join(header, body)


def _lie_shape(header, body):
    key = _first_tensor(header)
    header[key]["shape"] = [int(np.prod(header[key]["shape"])) * 4 + 7]
    return _join(header, body)


def _lie_dtype(header, body):
    header[_first_tensor(header)]["dtype"] = "Q99"
    return _join(header, body)


LIES = {
    "header length beyond the file": lambda h, b: _join(h, b, length=len(json.dumps(h)) + len(b) + 10_000),
    "header length 2**63": lambda h, b: _join(h, b, length=2**63 - 1),
    "offsets past the end of the data": _lie_past_end,
    "two tensors on the same bytes": _lie_overlap,
    "shape larger than its bytes": _lie_shape,
    "unknown dtype": _lie_dtype,
    "header not JSON": lambda h, b: _join(b"{\"a\": [1, 2" + b" " * 30, b),
    "header not UTF-8": lambda h, b: _join(b"\xff\xfe" + json.dumps(h).encode()[2:], b),
    "truncated body": lambda h, b: _join(h, b[: len(b) // 2]),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_lying_safetensors_header_gets_one_line_error(saved, tmp_path, lie):
    folder = _copy(saved, tmp_path / "lying")
    header, body = _split((saved / TENSORS_FILE).read_bytes())
    _rewrite_tensors(folder, LIES[lie](header, body))
    one_line_error(lambda: load_model(folder), TENSORS_FILE)


# ------------------------------------------------------------------------------------------------- cards that lie


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"img_size": 2**20}, "cannot be built"),  # shapes overflow even on the meta device
        ({"img_size": 0}, "model card"),
        ({"img_size": -128}, "model card"),
        ({"lora_rank": 10**9}, "different network"),
        ({"lora_rank": "five"}, "model card"),
        ({"classes": []}, "model card"),
        ({"classes": "background"}, "model card"),
        ({"window": [275, -125]}, "model card"),
        ({"window": ["a", "b"]}, "model card"),
        ({"backbone": "vit_h"}, "different network"),
        ({"orientation": "XYZ"}, None),
        ({"name": {"nested": True}}, None),
        ({"__class__": "os.system"}, "model card"),
    ],
)
def test_card_with_wrong_shapes_or_types_gets_one_line_error(saved, tmp_path, changes, expected):
    import resource

    folder = _copy(saved, tmp_path / "lying-card")
    card = json.loads((folder / CARD_FILE).read_text())
    card.update(changes)
    (folder / CARD_FILE).write_text(json.dumps(card))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        model, loaded = load_model(folder)
    except HSAMError as error:
        assert "\n" not in str(error)
        if expected:
            assert expected in str(error) or "not a valid" in str(error), str(error)
    else:
        # accepted only when the field does not change the network; it must then be caught where it is used
        assert expected is None, f"{changes} was accepted"
        if "orientation" in changes:
            from hsam.volume import direction_from_code

            one_line_error(lambda: direction_from_code(loaded.orientation), "orientation")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 500, f"checking the card allocated {grown_mib:.0f} MiB"


def test_checkpoint_for_another_class_count(saved, tmp_path):
    """Tensors of a 14-class model under a card for the 9 H-SAM outputs, and the reverse."""
    torch.manual_seed(1)
    config = dataclasses.replace(load_model_config("vit_tiny"), num_classes=13)
    other = save_model(build_hsam(config), ModelCard.for_config(config, "k14"), tmp_path / "k14")
    folder = _copy(saved, tmp_path / "k9-card")
    _rewrite_tensors(folder, (other / TENSORS_FILE).read_bytes())
    message = one_line_error(lambda: load_model(folder), TENSORS_FILE, "different network", "14 outputs", "9 outputs")
    assert len(message) < 400

    reverse = _copy(other, tmp_path / "k14-card")
    _rewrite_tensors(reverse, (saved / TENSORS_FILE).read_bytes())
    one_line_error(lambda: load_model(reverse), "different network", "9 outputs", "14 outputs")


def test_segment_with_card_and_network_of_different_class_counts(saved):
    import SimpleITK as sitk

    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.run import segment_volume

    model, card = load_model(saved)
    short = dataclasses.replace(card, classes=card.classes[:5])
    image = sitk.GetImageFromArray(np.full((2, 16, 16), -1000, dtype=np.int16))
    one_line_error(lambda: segment_volume(image, model, short, SegmentOptions(device="cpu")), "5 classes", "9 outputs")


# --------------------------------------------------------------------------------------- names from hostile cards


@pytest.mark.parametrize("name", ["../../escaped", "..", ".hidden", "a/b", "a\\b", "C:evil", ""])
def test_model_card_name_cannot_escape_the_model_cache(saved, tmp_path, name):
    from hsam.weights.store import import_model, models_dir

    folder = _copy(saved, tmp_path / "named")
    card = json.loads((folder / CARD_FILE).read_text())
    card["name"] = name
    (folder / CARD_FILE).write_text(json.dumps(card))
    before = set(tmp_path.parent.rglob("*"))
    if name == "":  # an empty name falls back to the folder name, which is fine
        assert import_model(folder).parent == models_dir()
        return
    one_line_error(lambda: import_model(folder), "invalid model id")
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()
    assert set(tmp_path.parent.rglob("*")) == before


def test_model_ids_from_the_command_line_cannot_escape(tmp_path):
    from hsam.weights.store import remove_model

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("x")
    for model_id in ("..", "../victim", str(victim), "/", ".", "..\\victim"):
        with pytest.raises(HSAMError):
            remove_model(model_id)
    assert (victim / "keep.txt").read_text() == "x"

    assert os.path.isdir(victim)


def test_training_init_from_a_lying_safetensors_file(tmp_path):
    """The fine-tune initialiser reads user-given .safetensors: a lying header gets a one-line error."""
    from hsam.training.model_setup import _load_tensor_file
    from safetensors.torch import save_file

    path = tmp_path / "init.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(3)}, str(path))
    header, body = _split(path.read_bytes())
    path.write_bytes(_lie_past_end(header, body))
    one_line_error(lambda: _load_tensor_file(path), "init.safetensors")
