"""A real HTTP file server on 127.0.0.1 for download tests: Range requests, cut connections, a slow link.

    with serve_files({"sam.pth": data}) as server:
        download(server.url("sam.pth"))
        server.cut_at = 1000        # the next response body stops after 1000 bytes and the connection is shut
        server.ranges = False       # ignore Range headers (a server without resume support)
        server.delay = 0.01         # sleep between 64 KiB pieces
        server.requests[-1]         # headers of the last request
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, Mapping

PIECE = 1 << 16


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802 (http.server API)
        server = self.server
        server.requests.append(dict(self.headers))
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

    def __init__(self, files: Mapping[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = dict(files)
        self.cut_at: int | None = None
        self.ranges = True
        self.delay = 0.0
        self.requests: list[dict[str, str]] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"

    def range_starts(self) -> list[int]:
        """Start offsets of the Range requests received so far."""
        return [int(r["Range"].split("=")[1].split("-")[0]) for r in self.requests if r.get("Range")]


@contextlib.contextmanager
def serve_files(files: Mapping[str, bytes]) -> Iterator[FileServer]:
    server = FileServer(files)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
