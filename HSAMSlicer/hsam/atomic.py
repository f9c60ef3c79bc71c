"""Atomic file writes: a temp file beside the target, synced, then moved into place with ``os.replace``.

A reader, or a crash at any moment, sees either the previous file or the complete new one, never a partial file. The
temp file gets the user's usual permissions (the umask), not ``mkstemp``'s owner-only 0600.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(target: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``target`` to write; on leaving without error it replaces ``target``.

    ``suffix`` (default: the target's) matters to writers that pick a format from the file name. On an error the temp
    file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=target.suffix if suffix is None else suffix, dir=folder)
    temp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        os.close(fd)
        yield temp
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically; returns the target path."""
    with replacing(target) as temp:
        temp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` as UTF-8 to ``target`` atomically, line endings as given; returns the target path."""
    return write_bytes(target, text.encode("utf-8"))


def umask() -> int:
    """The process umask, read without changing it (through /proc where available)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022
