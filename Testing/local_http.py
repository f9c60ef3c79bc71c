"""A real HTTP file server on 127.0.0.1 for download tests: Range requests, cut connections, a slow link, and
Google Drive's download endpoint.

    with serve_files({"sam.pth": data}) as server:
        download(server.url("sam.pth"))
        server.cut_at = 1000        # the next response body stops after 1000 bytes and the connection is shut
        server.ranges = False       # ignore Range headers (a server without resume support)
        server.delay = 0.01         # sleep between 64 KiB pieces
        server.requests[-1]         # headers of the last request

    with serve_files({}, drive={"FILEID": data}) as server:
        server.drive_url("FILEID")  # like https://drive.usercontent.google.com/download?id=FILEID&export=download:
                                    # an HTML "Download anyway" page whose form carries a confirm token and a uuid
                                    # (as Drive does for files too large to scan), then the file (with Range support)
        server.drive_answer = "quota"    # the next answers: Drive's "quota exceeded" page (HTTP 403, text/html)
        server.drive_answer = "sign-in"  # a sign-in page (HTTP 200, text/html): not a confirmation
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import secrets
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Mapping
from urllib.parse import parse_qs, urlsplit

PIECE = 1 << 16

# The shape of Drive's answers (2024-2025): the virus-scan warning for large files, and the quota page.
_CONFIRM_PAGE = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>
<div class="uc-main"><div id="uc-text"><p class="uc-warning-caption">Google Drive can't scan this file for viruses.</p>
<p class="uc-warning-subcaption"><span class="uc-name-size"><a href="/open?id={id}">220_epoch_299.pth</a> (92M)</span>
is too large for Google to scan for viruses. Would you still like to download this file?</p>
<form id="download-form" action="{action}" method="get"><input type="submit" id="uc-download-link"
class="goog-inline-block jfk-button jfk-button-action" value="Download anyway"/><input type="hidden" name="id"
value="{id}"><input type="hidden" name="export" value="download"><input type="hidden" name="confirm"
value="{token}"><input type="hidden" name="uuid" value="{uuid}"></form></div></div></body></html>"""
_QUOTA_PAGE = """<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>
<div class="uc-main"><div id="uc-text"><p class="uc-error-caption">Sorry, you can't view or download this file at this
time.</p><p class="uc-error-subcaption">Too many users have viewed or downloaded this file recently. Please try
accessing the file again later. If the file you are trying to access is particularly large or is shared with many
people, it may take up to 24 hours to be able to view or download the file.</p></div></div></body></html>"""
_SIGN_IN_PAGE = """<!DOCTYPE html><html><head><title>Sign in - Google Accounts</title></head><body><form
action="/signin/v2/identifier" method="post"><input type="email" name="identifier"></form></body></html>"""


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def _page(self, status: int, page: str) -> None:
        body = page.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drive(self, query: dict[str, list[str]]) -> bytes | None:
        """Drive's endpoint: a page (confirmation, quota, sign-in) and None, or the file's bytes to send."""
        server = self.server
        file_id = (query.get("id") or [""])[0]
        if file_id not in server.drive:
            self.send_error(404)
            return None
        if server.drive_answer == "quota":
            self._page(403, _QUOTA_PAGE)
            return None
        if server.drive_answer == "sign-in":
            self._page(200, _SIGN_IN_PAGE)
            return None
        if (query.get("confirm") or [""])[0] != server.drive_token or not query.get("uuid"):
            server.confirm_pages += 1
            self._page(200, _CONFIRM_PAGE.format(id=html.escape(file_id), action=f"{self.server.url('download')}",
                                                 token=server.drive_token, uuid=secrets.token_hex(8)))
            return None
        return server.drive[file_id]

    def do_GET(self):  # noqa: N802 (http.server API)
        server = self.server
        server.requests.append(dict(self.headers))
        parts = urlsplit(self.path)
        if parts.path == "/download" and server.drive:
            data = self._drive(parse_qs(parts.query))
            if data is None:
                return
        else:
            data = server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        start = 0
        ranged = self.headers.get("Range")
        if ranged and server.ranges:
            start = int(ranged.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        limit = len(body) if server.cut_at is None else min(server.cut_at, len(body))
        server.cut_at = None  # only the next response is cut
        try:
            for offset in range(0, limit, PIECE):
                self.wfile.write(body[offset : min(limit, offset + PIECE)])
                if server.delay:
                    time.sleep(server.delay)
        except (BrokenPipeError, ConnectionResetError):
            return
        if limit < len(body):
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


class FileServer(ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes); the attributes above steer the next responses."""

    def __init__(self, files: Mapping[str, bytes], drive: Mapping[str, bytes] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = dict(files)
        self.drive = dict(drive or {})
        self.drive_token = "t"
        self.drive_answer = "file"  # or "quota", "sign-in"
        self.confirm_pages = 0
        self.cut_at: int | None = None
        self.ranges = True
        self.delay = 0.0
        self.requests: list[dict[str, str]] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"

    def drive_url(self, file_id: str) -> str:
        """This server's stand-in for ``https://drive.usercontent.google.com/download?id=ID&export=download``."""
        return f"{self.url('download')}?id={file_id}&export=download"

    def range_starts(self) -> list[int]:
        """Start offsets of the Range requests received so far."""
        return [int(r["Range"].split("=")[1].split("-")[0]) for r in self.requests if r.get("Range")]


@contextlib.contextmanager
def serve_files(files: Mapping[str, bytes], drive: Mapping[str, bytes] | None = None) -> Iterator[FileServer]:
    server = FileServer(files, drive)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def served_base_weights(folder: Path, monkeypatch, model_id: str, seed: int,  # noqa: ANN001 (pytest fixture)
                        delay: float) -> Iterator[tuple[FileServer, bytes]]:
    """A model manifest (installed through ``HSAM_MANIFEST``) whose one entry, base weights ``model_id``, is
    3 MiB of random bytes served from this machine with ``delay`` seconds between 64 KiB pieces: a download slow
    enough for a test to act while it runs. Yields (server, payload)."""
    import numpy as np

    from hsam.weights.manifest import MANIFEST_ENV

    payload = np.random.default_rng(seed).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    name = f"{model_id}.pth"
    with serve_files({name: payload}) as server:
        server.delay = delay
        manifest = {"format": 1, "models": [{
            "id": model_id, "title": f"{model_id} weights", "kind": "base", "backbone": "vit_b", "priority": 0,
            "license": "test", "homepage": "", "install": "download",
            "files": [{"name": name, "url": server.url(name), "size": len(payload),
                       "sha256": hashlib.sha256(payload).hexdigest()}]}]}  # fmt: skip
        path = folder / f"{model_id}-models.json"
        path.write_text(json.dumps(manifest))
        monkeypatch.setenv(MANIFEST_ENV, str(path))
        yield server, payload
