"""Google Drive as a download source: file URLs, the large-file confirmation page, quota and other HTML answers.

A Drive sharing link (``https://drive.google.com/file/d/ID/view``, ``.../open?id=ID``, ``.../uc?id=ID``) is turned
into Drive's direct-download endpoint (``https://drive.usercontent.google.com/download?id=ID&export=download``).
For files too large for Drive's virus scan that endpoint first answers with an HTML page ("Download anyway") whose
form (or, on the older ``/uc`` endpoint, a link) carries the confirmation token; following it gives the file.
When too many people downloaded the file recently Drive answers with a "quota exceeded" page instead.

This module only reads such pages; :func:`hsam.weights.download.download_file` does the requests. Standard library
only.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from html.parser import HTMLParser

DIRECT_ENDPOINT = "https://drive.usercontent.google.com/download"
_DRIVE_HOSTS = ("drive.google.com", "docs.google.com", "drive.usercontent.google.com")
_FILE_PATH = re.compile(r"/file/d/([A-Za-z0-9_-]+)")
_QUOTA_PHRASES = ("too many users have viewed or downloaded", "quota exceeded", "download quota")


def drive_file_id(url: str) -> str | None:
    """The file id of a Google Drive URL, or None for any other URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in _DRIVE_HOSTS:
        return None
    match = _FILE_PATH.search(parts.path)
    if match:
        return match.group(1)
    ids = urllib.parse.parse_qs(parts.query).get("id")
    return ids[0] if ids else None


def direct_url(url: str) -> str:
    """Drive's direct-download URL for a Drive link; any other URL unchanged."""
    file_id = drive_file_id(url)
    if file_id is None:
        return url
    return f"{DIRECT_ENDPOINT}?{urllib.parse.urlencode({'id': file_id, 'export': 'download'})}"


class _PageReader(HTMLParser):
    """Collects the title, visible text, forms (action + inputs) and link targets of an HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self._in_form = False
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((values.get("action", ""), {}))
            self._in_form = True
        elif tag == "input" and self._in_form and values.get("name"):
            self.forms[-1][1][values["name"]] = values.get("value", "")
        elif tag == "a" and values.get("href"):
            self.links.append(values["href"])
        elif tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False
        elif tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.text.append(data.strip())


@dataclass(frozen=True)
class HtmlAnswer:
    """What an HTML answer to a file request means: ``kind`` is "confirm" (follow ``next_url``), "quota" or "other"."""

    kind: str
    next_url: str = ""
    summary: str = ""  # the page's first words, for error messages


def read_html_answer(html: str, page_url: str) -> HtmlAnswer:
    """Classify an HTML page received instead of a file (see the module docstring)."""
    reader = _PageReader()
    try:
        reader.feed(html)
    except Exception:  # noqa: BLE001 (a broken page is simply "other")
        pass
    text = " ".join(reader.text)
    summary = re.sub(r"\s+", " ", text)[:120]
    if any(phrase in text.lower() for phrase in _QUOTA_PHRASES):
        return HtmlAnswer("quota", summary=summary)
    for action, fields in reader.forms:
        if "confirm" in fields and "id" in fields:
            target = urllib.parse.urljoin(page_url, action or page_url)
            target = target.split("?", 1)[0]
            return HtmlAnswer("confirm", f"{target}?{urllib.parse.urlencode(fields)}", summary)
    for href in reader.links:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(href).query)
        if "confirm" in query and "id" in query:
            return HtmlAnswer("confirm", urllib.parse.urljoin(page_url, href), summary)
    return HtmlAnswer("other", summary=summary)
