"""Output files of the volume layer: format suffixes, a writable target, and atomic writes (a temp file beside the target,
checked and synced, then ``os.replace``), so a failed run never leaves a partial output behind.

:mod:`hsam.volume.io` and :mod:`hsam.volume.dicom_seg` both write through here; it imports neither.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from hsam.errors import HSAMError

IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
LABEL_SUFFIXES: tuple[str, ...] = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
"""Formats :func:`write_labels` can write (one file each); ``.seg.nrrd`` is a Slicer segmentation with terminology."""


def suffix_of(path: str | os.PathLike[str]) -> str:
    """The format-defining suffix, lower case: ``.seg.nrrd``, ``.nii.gz`` or the last suffix."""
    name = Path(path).name.lower()
    for double in (".seg.nrrd", ".nii.gz"):
        if name.endswith(double):
            return double
    return Path(name).suffix


def check_nifti_complete(source: Path) -> None:
    """Raise HSAMError when a NIfTI-1/2 file (optionally gzipped) holds fewer voxel bytes than its header promises."""
    import gzip
    import math
    import struct
    import zlib

    opener = gzip.open if suffix_of(source) == ".nii.gz" else open
    truncated = HSAMError(f"could not read {source.name}: the file is truncated (shorter than its header says); copy or export it again")
    try:
        with opener(source, "rb") as handle:
            header = handle.read(540)
            if len(header) < 348:
                raise truncated
            for endian in "<>":
                size = struct.unpack(endian + "i", header[:4])[0]
                if size == 348:  # NIfTI-1
                    dims = struct.unpack(endian + "8h", header[40:56])
                    bitpix = struct.unpack(endian + "h", header[72:74])[0]
                    vox_offset = struct.unpack(endian + "f", header[108:112])[0]
                    if not math.isfinite(vox_offset):
                        return  # a damaged header: ITK's reader reports it
                    offset = int(vox_offset)
                    break
                if size == 540:  # NIfTI-2
                    dims = struct.unpack(endian + "8q", header[16:80])
                    bitpix = struct.unpack(endian + "h", header[14:16])[0]
                    offset = struct.unpack(endian + "q", header[168:176])[0]
                    break
            else:
                return  # not NIfTI after all: let ITK report it
            if not 0 < dims[0] <= 7:
                return
            expected = max(offset, 348) + int(np.prod([max(1, d) for d in dims[1 : dims[0] + 1]], dtype=np.int64)) * bitpix // 8
            total = len(header)
            while total < expected:
                chunk = handle.read(min(1 << 22, expected - total))
                if not chunk:
                    raise truncated
                total += len(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile):
        raise truncated from None


def check_writable(path: str | os.PathLike[str], suffixes: Sequence[str] = LABEL_SUFFIXES) -> Path:
    """Check that ``path`` has a supported suffix and its folder exists and is writable; return it as a Path."""
    target = Path(path)
    if suffix_of(target) not in suffixes:
        raise HSAMError(f"cannot write {target.name}: use one of {', '.join(suffixes)} as the file extension")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise HSAMError(f"output folder does not exist: {folder}; create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=".hsam-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise HSAMError(f"output folder is not writable: {folder} ({error.strerror}); choose another output path") from None
    return target


TEMP_PREFIX = ".tmp-hsam-"
"""Temp files of :func:`atomic_write` are ``.tmp-hsam-<host>-<pid>-<random><suffix>`` beside the target."""


def _host_tag() -> str:
    import hashlib
    import socket

    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _remove_stale_temps(folder: Path, min_age_s: float = 60.0) -> None:
    """Delete our temp files left in ``folder`` by a process of this host that was killed mid-write (SIGKILL, power).

    Only files older than ``min_age_s`` whose writer process no longer exists are removed, so a concurrent write is
    never touched; temp files of other hosts (shared folders) are left alone.
    """
    import time

    host = _host_tag()
    try:
        candidates = list(folder.glob(f"{TEMP_PREFIX}{host}-*"))
    except OSError:
        return
    for path in candidates:
        try:
            pid = int(path.name[len(TEMP_PREFIX) + len(host) + 1 :].split("-", 1)[0])
            if time.time() - path.stat().st_mtime < min_age_s:
                continue
            os.kill(pid, 0)  # raises ProcessLookupError when the writer is gone
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except (ValueError, OSError):
            continue


def atomic_write(target: Path, writer) -> Path:
    """Call ``writer(temp_path)`` for a temp file beside ``target`` (same suffix), then move it into place.

    The written file is checked (ITK's NIfTI writer reports success on a full disk and leaves a short file) and
    synced before ``os.replace``, so the target is either the previous file or the complete new one. The temp file
    is created with the user's umask (not 0600), so the output gets the same permissions as any other file.
    """
    import secrets

    suffix = suffix_of(target)
    folder = target.parent if str(target.parent) else Path(".")
    _remove_stale_temps(folder)
    temp = folder / f"{TEMP_PREFIX}{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"
    try:
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        writer(str(temp))
        if suffix in (".nii", ".nii.gz"):
            try:
                check_nifti_complete(temp)
            except HSAMError:
                raise OSError("the file came out shorter than its header says (disk full or file size limit?)") from None
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except OSError as error:
        temp.unlink(missing_ok=True)
        detail = " ".join(str(error.strerror or error).split())[:200]  # ITK messages span several lines
        raise HSAMError(f"could not write {target}: {detail}; check free disk space and permissions") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target
