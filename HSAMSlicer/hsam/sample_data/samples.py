"""Sample data shipped inside the hsam package (``hsam/sample_data/``), so a first run needs nothing beside it.

Each sample is checked against its SHA-256 before it is handed out: a damaged installation says so instead of
producing a confusing segmentation.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from hsam import atomic
from hsam.errors import HSAMError

SAMPLE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sample:
    name: str
    file: str
    sha256: str
    description: str


SAMPLES: dict[str, Sample] = {
    s.name: s
    for s in (
        Sample("abdomen-ct", "abdomen_ct.nii.gz", "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb",
               "abdominal CT, 122 x 101 x 30 voxels of 3 mm with all eight organs (TotalSegmentator's test CT, "
               "Apache-2.0; see hsam/sample_data/README.md)"),
    )
}


def sample_bytes(name: str) -> bytes:
    """The sample's file content, SHA-256 checked. Raises HSAMError for an unknown name or a damaged file."""
    if name not in SAMPLES:
        raise HSAMError(f"no sample named {name!r}; available: {', '.join(SAMPLES)}")
    sample = SAMPLES[name]
    path = SAMPLE_DIR / sample.file
    try:
        data = path.read_bytes()
    except OSError as error:
        raise HSAMError(f"the sample file {path} is missing from this installation ({error.strerror}); "
                        "reinstall hsam") from None
    if hashlib.sha256(data).hexdigest() != sample.sha256:
        raise HSAMError(f"the sample file {path} is damaged (SHA-256 differs from the shipped one); reinstall hsam")
    return data


def write_sample(name: str, output: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write sample ``name`` to ``output`` (a ``.nii.gz`` path) atomically; an existing file is kept unless
    ``overwrite``."""
    from hsam.volume.files import check_writable

    target = check_writable(output, (".nii.gz",))
    if target.exists() and not overwrite:
        raise HSAMError(f"{target} already exists; choose another name or add --force to replace it")
    data = sample_bytes(name)
    try:
        return atomic.write_bytes(target, data)
    except OSError as error:
        raise HSAMError(f"could not write {target}: {error.strerror or error}; check free disk space and "
                        "permissions") from None
