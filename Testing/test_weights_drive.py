"""One-step download of the paper's model: Google Drive's confirmation page, quota and other pages, resume, the
structure check and trust-on-first-use hash of a file without a published SHA-256, conversion and installation.

Everything runs against the local fake Drive of ``local_http`` (no network here).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import REPOSITORY, one_line_error
from hsam.errors import HSAMError
from hsam.paths import resources_dir
from hsam.weights import drive
from hsam.weights.cache import CHUNK, downloads_dir, partial_dir
from hsam.weights.download import download_file
from hsam.weights.fetch import fetch
from hsam.weights.manifest import MANIFEST_ENV, load_manifest
from hsam.weights.official import _official_config
from hsam.weights.store import default_model_id, load_named_model, models_dir, remove_model
from hsam.weights.trust import recorded_sha256
from local_http import serve_files
from test_model_official import TINY, official_layout, random_official_state, random_sam_file

FILE_ID = "1A1wqTT_FD6FXzqCj9LNStxT425ZfYpnE"
PAYLOAD = os.urandom(3 * CHUNK + 777)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
KEYS_TSV = REPOSITORY.parent / "shared" / "design" / "hsam-official-checkpoint-keys.tsv"


def test_drive_links_become_the_direct_download_endpoint():
    direct = f"https://drive.usercontent.google.com/download?id={FILE_ID}&export=download"
    for link in (f"https://drive.google.com/file/d/{FILE_ID}/view?usp=sharing",
                 f"https://drive.google.com/open?id={FILE_ID}", f"https://drive.google.com/uc?export=download&id={FILE_ID}",
                 direct):
        assert drive.drive_file_id(link) == FILE_ID
        assert drive.direct_url(link) == direct
    plain = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert drive.drive_file_id(plain) is None and drive.direct_url(plain) == plain
    assert drive.drive_file_id("https://example.org/file/d/abc/view") is None  # only Drive's hosts


def test_older_uc_pages_with_a_confirm_link_are_understood():
    page = ('<html><body><p>Google Drive can\'t scan this file for viruses.</p><a id="uc-download-link" '
            'href="/uc?export=download&amp;confirm=Ab1_&amp;id=XYZ">Download anyway</a></body></html>')
    answer = drive.read_html_answer(page, "https://drive.google.com/uc?export=download&id=XYZ")
    assert answer.kind == "confirm"
    assert answer.next_url == "https://drive.google.com/uc?export=download&confirm=Ab1_&id=XYZ"
    assert drive.read_html_answer("<html><body>Hello</body></html>", "http://x/").kind == "other"


@pytest.fixture()
def fake_drive():
    with serve_files({}, drive={FILE_ID: PAYLOAD}) as server:
        yield server


def test_confirmation_page_is_followed_and_the_file_verified(fake_drive):
    path = download_file(fake_drive.drive_url(FILE_ID), "x.pth", DIGEST)
    assert path.read_bytes() == PAYLOAD
    assert fake_drive.confirm_pages == 1
    assert list(partial_dir().iterdir()) == []


def test_cut_drive_download_resumes_after_a_fresh_confirmation(fake_drive):
    fake_drive.cut_at = len(PAYLOAD) // 2
    with pytest.raises(HSAMError, match="again to resume"):
        download_file(fake_drive.drive_url(FILE_ID), "x.pth", DIGEST)
    kept = (partial_dir() / "x.pth.part").stat().st_size
    assert 0 < kept < len(PAYLOAD) and not (downloads_dir() / "x.pth").exists()
    path = download_file(fake_drive.drive_url(FILE_ID), "x.pth", DIGEST)
    assert path.read_bytes() == PAYLOAD
    assert fake_drive.confirm_pages == 2 and fake_drive.range_starts() == [kept, kept]  # page, then the file, resumed


@pytest.mark.parametrize("answer, words", [("quota", ("quota is exceeded", "try again in a few hours")),
                                           ("sign-in", ("answered with a web page", "Sign in"))])
def test_quota_and_other_pages_give_one_error_with_the_manual_route(fake_drive, answer, words):
    fake_drive.drive_answer = answer
    url = fake_drive.drive_url(FILE_ID)
    destination = downloads_dir() / "x.pth"
    message = one_line_error(lambda: download_file(url, "x.pth", DIGEST), *words, f"open {url} in a browser",
                             f"save the file as {destination}")
    assert "<" not in message  # the page's text, not its markup
    assert not destination.exists()
    assert not any(partial_dir().iterdir()) if partial_dir().is_dir() else True


# ------------------------------------------------------------------------------------------------ fetch end to end


@pytest.fixture(scope="module")
def tiny_official(tmp_path_factory):
    """A tiny SAM base file and an official-layout H-SAM file for it (bytes)."""
    folder = tmp_path_factory.mktemp("official")
    random_sam_file(folder / "sam.pth", "vit_tiny")
    torch.save(random_official_state(official_layout(**TINY)), folder / "hsam.pth")
    torch.save(random_official_state(official_layout(**TINY), seed=7), folder / "other.pth")
    broken = random_official_state(official_layout(**TINY))
    broken.pop("mask_decoder2.mlp.lin2.bias")
    torch.save(broken, folder / "broken.pth")
    return {name: (folder / f"{name}.pth").read_bytes() for name in ("sam", "hsam", "other", "broken")}


def _manifest(tmp_path: Path, sam_url: str, sam_digest: str, hsam_url: str) -> None:
    classes = ["background", "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta", "pancreas"]
    manifest = {"models": [
        {"id": "paper", "title": "tiny paper model", "kind": "hsam", "backbone": "vit_tiny", "img_size": 128,
         "classes": classes, "lora_rank": 2, "orientation": "LPS", "priority": 100, "install": "import-official",
         "license_text": "terms", "requires": ["sam-tiny"],
         "files": [{"name": "paper.pth", "url": hsam_url, "check": "hsam-official"}]},
        {"id": "sam-tiny", "title": "tiny SAM", "kind": "base", "backbone": "vit_tiny",
         "files": [{"name": "sam_tiny.pth", "url": sam_url, "sha256": sam_digest}]}]}
    (tmp_path / "models.json").write_text(json.dumps(manifest))


def test_one_command_fetches_checks_converts_and_installs_the_default_model(tiny_official, tmp_path, monkeypatch,
                                                                          capsys):
    from hsam.cli import main

    with serve_files({"sam.pth": tiny_official["sam"]}, drive={FILE_ID: tiny_official["hsam"]}) as server:
        _manifest(tmp_path, server.url("sam.pth"), hashlib.sha256(tiny_official["sam"]).hexdigest(),
                  server.drive_url(FILE_ID))
        monkeypatch.setenv(MANIFEST_ENV, str(tmp_path / "models.json"))
        assert load_manifest()["paper"].downloadable
        assert main(["models", "download", "paper"]) == 0
        captured = capsys.readouterr()
        assert "terms of use\nterms" in captured.err
        assert server.confirm_pages == 1
        assert default_model_id() == "paper"  # above the bundled demo
        card = json.loads((models_dir() / "paper" / "model.json").read_text())
        digest = hashlib.sha256(tiny_official["hsam"]).hexdigest()
        assert card["extra"]["source"]["hsam_sha256"] == digest
        assert card["extra"]["source"]["url"] == server.drive_url(FILE_ID)
        assert "first download" in card["extra"]["source"]["hsam_sha256_check"]
        assert recorded_sha256("paper.pth") == digest
        model, _ = load_named_model("paper")
        assert model.config.backbone == "vit_tiny"

        # the authors' file changes under the same link: refused against the hash recorded at the first download
        remove_model("paper")
        (downloads_dir() / "paper.pth").unlink()
        server.drive[FILE_ID] = tiny_official["other"]
        one_line_error(lambda: fetch("paper"), "differs from the copy first downloaded", "recorded")
        assert not (downloads_dir() / "paper.pth").exists() and not (models_dir() / "paper").exists()


def test_a_file_of_the_wrong_structure_is_discarded(tiny_official, tmp_path, monkeypatch):
    with serve_files({"sam.pth": tiny_official["sam"]}, drive={FILE_ID: tiny_official["broken"]}) as server:
        _manifest(tmp_path, server.url("sam.pth"), hashlib.sha256(tiny_official["sam"]).hexdigest(),
                  server.drive_url(FILE_ID))
        monkeypatch.setenv(MANIFEST_ENV, str(tmp_path / "models.json"))
        one_line_error(lambda: fetch("paper"), "paper.pth is not the expected file", "missing",
                       "discarded")
    assert not (downloads_dir() / "paper.pth").exists()
    assert recorded_sha256("paper.pth") is None
    assert not any(partial_dir().iterdir())


def test_shipped_entry_downloads_the_papers_checkpoint_from_drive():
    entry = load_manifest(Path(resources_dir()) / "models.json")["hsam-vitb-synapse"]
    assert entry.downloadable and entry.requires == ("sam-vit-b",)
    assert drive.drive_file_id(entry.files[0].url) == FILE_ID
    assert entry.files[0].check == "hsam-official" and entry.files[0].sha256 is None
    assert "MIT" in entry.license_text and "Apache" in entry.license_text
    from hsam.model.official import official_layout as layout_of

    expected = layout_of(_official_config(entry))
    assert len(expected) == 489
    if KEYS_TSV.is_file():  # the key list measured on the released code
        measured = {}
        for line in KEYS_TSV.read_text().splitlines():
            key, shape = line.split("\t")
            measured[key] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
        assert expected == measured
