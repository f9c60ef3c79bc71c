"""One verified download: HTTP(S) or a Google Drive link, resumed with a Range request, checked before it is kept."""

from __future__ import annotations

import http.client
import http.cookiejar
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from hsam import __version__
from hsam.errors import HSAMError
from hsam.weights.cache import CHUNK, downloads_dir, partial_dir, sha256_file
from hsam.weights.drive import HtmlAnswer, direct_url, read_html_answer

Progress = Callable[[int, "int | None"], None]
"""``progress(bytes_done, bytes_total_or_None)``."""


def _offline_message(name: str, url: str, reason: str, destination: Path) -> str:
    return (
        f"could not download {name} from {url} ({reason}); if this computer is offline, download that URL elsewhere "
        f"and put the file at {destination} (or run: hsam models import PATH)"
    )


MAX_PAGE = 1 << 20  # an HTML answer is read up to this size to find out what it says
_CONFIRM_HOPS = 3


def _is_html(headers: Any) -> bool:
    return str(headers.get("Content-Type") or "").lower().startswith("text/html")


def _page_message(name: str, url: str, answer: "HtmlAnswer", destination: Path) -> str:
    manual = f"open {url} in a browser, save the file as {destination} and run the same command again"
    if answer.kind == "quota":
        return (f"Google Drive refused the download of {name}: its download quota is exceeded (too many downloads "
                f"of this file recently); try again in a few hours, or {manual}")
    return f"{url} answered with a web page instead of {name} (\"{answer.summary[:80]}\"); {manual}"


def _open_file(
    opener: urllib.request.OpenerDirector, url: str, shown_url: str, headers: dict[str, str], timeout: float,
    name: str, final: Path,
) -> Any:
    """The response carrying the file itself: HTML answers are read, confirmation pages (Google Drive's large-file
    "Download anyway") followed, quota and other pages turned into one HSAMError with the manual route.
    HTTP 416 is re-raised as ``urllib.error.HTTPError`` for the caller's resume logic."""
    for _ in range(_CONFIRM_HOPS):
        try:
            response = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as error:
            if error.code == 416:
                raise
            if _is_html(error.headers):  # Drive answers quota and permission problems with a page and a 4xx code
                answer = read_html_answer(error.read(MAX_PAGE).decode("utf-8", "replace"), url)
                if answer.kind == "quota":
                    raise HSAMError(_page_message(name, shown_url, answer, final)) from None
            raise HSAMError(_offline_message(name, shown_url, f"HTTP {error.code} {error.reason}", final)) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", None) or error
            raise HSAMError(_offline_message(name, shown_url, str(reason), final)) from None
        if not _is_html(response.headers):
            return response
        with response:
            try:
                page = response.read(MAX_PAGE).decode("utf-8", "replace")
            except (OSError, http.client.HTTPException) as error:
                raise HSAMError(_offline_message(name, shown_url, f"{type(error).__name__} reading the answer", final)) from None
            answer = read_html_answer(page, response.geturl())
        if answer.kind != "confirm":
            raise HSAMError(_page_message(name, shown_url, answer, final))
        url = answer.next_url
    raise HSAMError(_page_message(name, shown_url, HtmlAnswer("other", summary="confirmation pages without end"), final))


def download_file(
    url: str,
    name: str,
    sha256: str | None,
    *,
    size: int | None = None,
    progress: Progress | None = None,
    timeout: float = 30.0,
    destination: Path | None = None,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Download ``url`` to ``downloads/<name>`` (or ``destination``), verified against ``sha256``; returns the path.

    ``url`` may be a plain HTTP(S) URL or a Google Drive link (:mod:`hsam.weights.drive`: its confirmation page is
    followed; a quota or other web page gives one HSAMError saying how to get the file by hand). When no SHA-256 is
    published (``sha256`` None), ``verify(path)`` must check the file's structure instead (raising HSAMError).

    A finished file that already verifies is reused. The bytes go to ``partial/<name>.part`` first; an interrupted
    download is resumed with an HTTP Range request on the next call (a server that ignores Range gives a clean
    restart). Only a file whose size and SHA-256 (or structure) match is moved into place; a mismatch deletes it.
    """
    if sha256 is None and verify is None:
        raise ValueError("download_file needs a sha256 or a verify function")
    final = destination or downloads_dir() / name
    if final.is_file():
        if sha256 is None:
            verify(final)  # type: ignore[misc]
            return final
        if sha256_file(final) == sha256.lower():
            return final
    final.parent.mkdir(parents=True, exist_ok=True)
    partial_dir().mkdir(parents=True, exist_ok=True)
    part = partial_dir() / f"{name}.part"
    have = part.stat().st_size if part.is_file() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    headers = {"User-Agent": f"hsam/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    try:
        response = _open_file(opener, direct_url(url), url, headers, timeout, name, final)
    except urllib.error.HTTPError:  # 416: our partial file is as long as or longer than the remote one: start over
        if not have:
            raise HSAMError(_offline_message(name, url, "HTTP 416 Range Not Satisfiable", final)) from None
        part.unlink(missing_ok=True)
        return download_file(url, name, sha256, size=size, progress=progress, timeout=timeout, destination=destination,
                             verify=verify)
    with response:
        resumed = have > 0 and response.status == 206
        done = have if resumed else 0
        length = response.headers.get("Content-Length")
        total = done + int(length) if length is not None else size
        try:
            with open(part, "ab" if resumed else "wb") as handle:
                if progress:
                    progress(done, total)
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    handle.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
        except (OSError, http.client.HTTPException, socket.timeout) as error:
            raise HSAMError(
                f"download of {name} was interrupted after {done} bytes ({type(error).__name__}); "
                "run the same command again to resume"
            ) from None
    if total is not None and done < total:
        raise HSAMError(f"download of {name} stopped after {done} of {total} bytes; run the same command again to resume")
    if size is not None and done != size:
        part.unlink(missing_ok=True)
        raise HSAMError(f"downloaded {name} has {done} bytes, expected {size}; the file was discarded, try again later")
    if sha256 is None:
        try:
            verify(part)  # type: ignore[misc]
        except HSAMError as error:
            part.unlink(missing_ok=True)
            raise HSAMError(f"downloaded {name} is not the expected file ({error}); the file was discarded") from None
    else:
        actual = sha256_file(part)
        if actual != sha256.lower():
            part.unlink(missing_ok=True)
            raise HSAMError(
                f"downloaded {name} failed its SHA-256 check (got {actual[:12]}..., expected {sha256[:12]}...); "
                "the file was discarded; check the URL or mirror"
            )
    os.replace(part, final)
    return final
