"""Fault injection with real limits: the disk fills (RLIMIT_FSIZE in a child process, and a real 2 MiB tmpfs where
mount namespaces are allowed), a download is cut (a real HTTP server on 127.0.0.1), the process is killed mid-write
(SIGKILL at random points). Each time the previous output or cache entry must be intact and no partial file may be
left where a finished file is expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.volume import read_labels, write_labels
from hsam.weights.cache import CHUNK, partial_dir
from hsam.weights.fetch import fetch
from hsam.weights.manifest import MANIFEST_ENV
from hsam.weights.store import MODEL_FILES, import_model, models_dir, verify_model_folder

HERE = Path(__file__).resolve().parent
CHILD = HERE / "fault_child.py"
sys.path.insert(0, str(HERE))
from fault_child import labels_volume, tiny_model  # noqa: E402
from local_http import serve_files  # noqa: E402


def run_child(*args: str, fsize: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run fault_child.py in a fresh interpreter; ``fsize`` caps the size of every file it writes (RLIMIT_FSIZE)."""

    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [sys.executable, str(CHILD), *args], capture_output=True, text=True, timeout=timeout, preexec_fn=limit,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip


def one_error_line(stderr: str) -> str:
    """The child's single ``error:`` line (ITK may print its own noise on stderr before it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return errors[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ------------------------------------------------------------------------------------------------ the disk fills


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd"])
def test_full_disk_while_writing_labels_keeps_the_previous_file(tmp_path, suffix):
    out = tmp_path / f"labels{suffix}"
    write_labels(labels_volume(1, 3), out)  # the previous run's output (small)
    before = digest(out)
    result = run_child("labels", str(out), "2", "40", fsize=64 * 1024)  # the new output needs more than 64 KiB
    assert result.returncode == 2, result.stderr
    message = one_error_line(result.stderr)
    assert "could not write" in message and "disk space" in message, message
    assert digest(out) == before
    assert listing(tmp_path) == {out.name}  # no temp file left
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_labels(out)), sitk.GetArrayFromImage(labels_volume(1, 3)))


def _can_mount_tmpfs(folder: Path) -> list[str] | None:
    """The unshare command that gives a private mount namespace here, or None."""
    for command in (["unshare", "-m"], ["unshare", "-rm"]):
        if shutil.which(command[0]) is None:
            return None
        probe = subprocess.run(
            [*command, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{folder}'"], capture_output=True, timeout=30
        )
        if probe.returncode == 0:
            return command
    return None


def test_real_full_filesystem_keeps_the_previous_file(tmp_path):
    """A real 2 MiB tmpfs filled up with dd: writes fail with ENOSPC; after freeing space the next write works."""
    mount = tmp_path / "small disk"
    mount.mkdir()
    unshare = _can_mount_tmpfs(mount)
    if unshare is None:
        pytest.skip("cannot mount a tmpfs here (no mount namespace); RLIMIT_FSIZE test covers the full disk")
    report = tmp_path / "report"
    report.mkdir()
    py, child = sys.executable, str(CHILD)
    script = f"""
set -u
D='{mount}'; R='{report}'
mount -t tmpfs -o size=2m tmpfs "$D" || exit 90
"{py}" "{child}" labels "$D/out.seg.nrrd" 1 4 || exit 91
"{py}" "{child}" labels "$D/out.nii.gz" 1 4 || exit 92
sha256sum "$D/out.seg.nrrd" "$D/out.nii.gz" > "$R/before"
dd if=/dev/zero of="$D/filler" bs=4k 2>/dev/null
truncate -s -100K "$D/filler"
"{py}" "{child}" labels "$D/out.seg.nrrd" 2 60 2> "$R/seg.err"; echo $? > "$R/seg.rc"
"{py}" "{child}" labels "$D/out.nii.gz" 2 60 2> "$R/nii.err"; echo $? > "$R/nii.rc"
sha256sum "$D/out.seg.nrrd" "$D/out.nii.gz" > "$R/after"
ls -A "$D" > "$R/listing"
rm "$D/filler"
"{py}" "{child}" labels "$D/out.nii.gz" 2 60 2> "$R/retry.err"; echo $? > "$R/retry.rc"
ls -A "$D" > "$R/listing2"
"""
    done = subprocess.run([*unshare, "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = {p.name: p.read_text() for p in report.iterdir()}
    for name in ("seg", "nii"):
        assert text[f"{name}.rc"].strip() == "2", text[f"{name}.err"]
        message = one_error_line(text[f"{name}.err"])
        assert "No space left on device" in message or "shorter than its header" in message or "failed" in message
    assert text["after"] == text["before"]
    assert sorted(text["listing"].split()) == ["filler", "out.nii.gz", "out.seg.nrrd"]
    assert text["retry.rc"].strip() == "0", text["retry.err"]
    assert sorted(text["listing2"].split()) == ["out.nii.gz", "out.seg.nrrd"]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    """Two saved tiny H-SAM models (different weights) for install/update tests."""
    from hsam.model.checkpoint import save_model

    folder = tmp_path_factory.mktemp("models")
    saved = {}
    for seed in (1, 2):
        model, card = tiny_model(seed)
        saved[f"v{seed}"] = save_model(model, card, folder / f"v{seed}" / "tiny")
    return saved


def test_full_disk_during_hsam_segment_keeps_previous_outputs(tiny_files, real_data, tmp_path):
    """The labels fit under the limit but the (uncompressed) confidence map does not: previous outputs must survive."""
    ct = real_data / "totalsegmentator" / "example_ct_sm.nii.gz"
    import_model(tiny_files["v1"])
    out, confidence, stats = tmp_path / "ct labels.seg.nrrd", tmp_path / "confidence.nii", tmp_path / "volumes.csv"
    args = ["segment", str(ct), "-o", str(out), "--confidence", str(confidence), "--stats", str(stats),
            "--model", "tiny", "-q", "--device", "cpu"]  # fmt: skip
    first = run_child("cli", *args)
    assert first.returncode == 0, first.stderr
    before = {p: digest(p) for p in (out, confidence, stats)}
    assert out.stat().st_size * 3 < confidence.stat().st_size
    again = run_child("cli", *args, "--largest-component", fsize=out.stat().st_size * 2)
    assert again.returncode == 2, again.stderr
    assert "could not write" in one_error_line(again.stderr)
    assert {p: digest(p) for p in before if p.exists()} == before, "a previous output was lost"
    assert listing(tmp_path) == {out.name, confidence.name, stats.name}


def test_full_disk_while_saving_a_model_keeps_the_previous_model(tiny_files, tmp_path):
    from hsam.model.checkpoint import load_model

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_files["v1"], folder)
    before = {p.name: digest(p) for p in folder.iterdir()}
    result = run_child("model", str(folder), "2", fsize=8 * 1024 * 1024)  # the tensors file is ~49 MB
    assert result.returncode == 2, result.stderr
    assert "could not save the model" in one_error_line(result.stderr)
    assert {p.name: digest(p) for p in folder.iterdir()} == before  # no temp file, nothing changed
    load_model(folder)  # still loads and verifies


# ---------------------------------------------------------------------------------------- killed mid-write


def _kill_while(folder: Path, pattern: str, args: list[str], rng: random.Random, window: float) -> bool:
    """Start the child, let it run a random time once a file matching ``pattern`` appeared in ``folder``, then
    SIGKILL it at the next moment such a file exists (i.e. mid-write). Returns True when the kill landed mid-write.
    """
    process = subprocess.Popen([sys.executable, str(CHILD), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    hit, waited = False, False
    while time.monotonic() < deadline and process.poll() is None:
        if any(folder.glob(pattern)):
            if waited:
                process.kill()
                hit = True
                break
            time.sleep(rng.uniform(0, window))
            waited = True
            continue
        time.sleep(0.001)
    process.kill()
    process.communicate(timeout=60)
    return hit


def test_killed_while_writing_labels_leaves_the_previous_or_the_new_file(tmp_path):
    rng = random.Random(6)
    out = tmp_path / "labels.nii.gz"
    old, new = labels_volume(1, 3), labels_volume(2, 120)
    write_labels(old, out)
    arrays = [sitk.GetArrayFromImage(old), sitk.GetArrayFromImage(new)]
    hits = 0
    for _ in range(6):
        hits += _kill_while(tmp_path, ".tmp-hsam-*", ["labels", str(out), "2", "120", "50"], rng, 0.3)
        found = sitk.GetArrayFromImage(read_labels(out))  # complete: read_image-level checks would catch a short file
        assert any(found.shape == a.shape and (found == a).all() for a in arrays)
        assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(".tmp-hsam-")} == {out.name}
    assert hits >= 3, "the kills did not land mid-write often enough to test anything"
    # a killed writer's temp file stays hidden until the next write, which removes it once it is a minute old
    stale = list(tmp_path.glob(".tmp-hsam-*"))
    for path in stale:
        os.utime(path, (time.time() - 120, time.time() - 120))
    write_labels(old, out)
    assert listing(tmp_path) == {out.name}


def test_killed_while_installing_a_model_keeps_a_complete_model(tiny_files):
    from hsam.weights.store import available_models, import_model, models_dir, resolve_model, verify_model_folder

    import_model(tiny_files["v1"])
    digests = {digest(tiny_files[v] / "model.safetensors") for v in ("v1", "v2")}
    rng = random.Random(7)
    hits = 0
    for _ in range(6):
        hits += _kill_while(models_dir(), ".staging-*", ["install", str(tiny_files["v2"]), "20"], rng, 0.4)
        ids = [m.id for m in available_models()]
        assert "tiny" in ids and not any(i.startswith(".") for i in ids), [p.name for p in models_dir().iterdir()]
        _, folder = resolve_model("tiny")
        verify_model_folder(folder)
        assert digest(folder / "model.safetensors") in digests
    assert hits >= 3
    import_model(tiny_files["v2"])  # the next install cleans up what the killed ones left
    assert listing(models_dir()) == {"tiny"}


# ------------------------------------------------------------------------------------------------ downloads


@pytest.fixture()
def model_server(tiny_files, tmp_path, monkeypatch):
    """A local server publishing version ``v1``/``v2`` of the tiny model as manifest entry ``tiny-dl``."""
    manifest = tmp_path / "models.json"
    monkeypatch.setenv(MANIFEST_ENV, str(manifest))
    with serve_files({}) as httpd:

        def publish(version: str) -> None:
            folder = tiny_files[version]
            httpd.files = {f"{version}/{n}": (folder / n).read_bytes() for n in MODEL_FILES}
            files = [
                {"name": n, "url": httpd.url(f"{version}/{n}"), "size": len(httpd.files[f"{version}/{n}"]),
                 "sha256": hashlib.sha256(httpd.files[f"{version}/{n}"]).hexdigest()}
                for n in MODEL_FILES
            ]  # fmt: skip
            entry = {"id": "tiny-dl", "title": "tiny", "kind": "hsam", "backbone": "vit_tiny", "files": files}
            manifest.write_text(json.dumps({"models": [entry]}))

        httpd.publish = publish
        yield httpd


def _installed_digest() -> str:
    folder = models_dir() / "tiny-dl"
    verify_model_folder(folder)
    return digest(folder / "model.safetensors")


def _no_partial_files_outside_partial() -> None:
    home = models_dir().parent
    for path in home.rglob("*"):
        if partial_dir() in path.parents or path == partial_dir():
            continue
        assert not path.name.endswith((".part", ".tmp")) and not path.name.startswith("."), path
    if models_dir().is_dir():
        assert listing(models_dir()) == {"tiny-dl"}


def test_cut_download_keeps_the_installed_model_and_resumes(model_server, tiny_files):
    from hsam.errors import HSAMError

    model_server.publish("v1")
    fetch("tiny-dl")
    v1 = _installed_digest()
    model_server.publish("v2")  # an update is published; the connection drops mid-way through the tensors
    model_server.cut_at = 5 * CHUNK
    with pytest.raises(HSAMError, match="run the same command again"):
        fetch("tiny-dl")
    assert _installed_digest() == v1
    _no_partial_files_outside_partial()
    fetch("tiny-dl")  # the retry resumes where the cut left off
    assert model_server.range_starts() and model_server.range_starts()[-1] >= 5 * CHUNK
    assert _installed_digest() == digest(tiny_files["v2"] / "model.safetensors")
    _no_partial_files_outside_partial()


def test_download_process_killed_keeps_the_installed_model(model_server, tiny_files):
    model_server.publish("v1")
    fetch("tiny-dl")
    v1 = _installed_digest()
    model_server.publish("v2")
    model_server.delay = 0.01  # ~6 MB/s: the 49 MB tensors file takes seconds
    process = subprocess.Popen([sys.executable, str(CHILD), "fetch", "tiny-dl"], stderr=subprocess.PIPE)
    part = partial_dir() / "tiny-dl-model.safetensors.part"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (part.is_file() and part.stat().st_size > 2 * CHUNK):
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.01)
    process.kill()
    process.wait(timeout=60)
    assert _installed_digest() == v1
    _no_partial_files_outside_partial()
    model_server.delay = 0.0
    fetch("tiny-dl")
    assert _installed_digest() == digest(tiny_files["v2"] / "model.safetensors")
