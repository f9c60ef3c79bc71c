"""Segment a cohort: many CT volumes in one run, resumable, shardable across processes/GPUs (``torchrun``).

Inputs come from a folder (every volume file in it, plus every sub-folder holding DICOM files: a series, or a whole
study whose series are picked as :func:`hsam.volume.dicom_series.pick_series` says) or from a list file (one path per line, relative to the list file; blank lines and ``#`` comments ignored). Each case's labels go to
``OUTPUT_DIR/<case name><suffix>``. Outputs are written atomically, so an existing output means a finished case:
a killed run started again skips those (resume). With ``torchrun --nproc_per_node=N -m hsam segment ...`` (or any
launcher setting ``RANK``/``WORLD_SIZE``) each process takes every N-th case of the sorted list; on a machine with
GPUs, process ``LOCAL_RANK`` uses ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hsam.errors import HSAMError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
LIST_SUFFIXES = (".txt", ".lst", ".list", ".csv")
DICOM_SUFFIXES = (".dcm", ".ima", "")


def _volume_suffix(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".seg.nrrd"):
        return None  # a segmentation, not a CT
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), None)


def case_name(path: Path) -> str:
    """``case01.nii.gz`` -> ``case01``; a DICOM folder -> its folder name."""
    suffix = _volume_suffix(path)
    return path.name[: -len(suffix)] if suffix and path.is_file() else path.name


def _looks_like_dicom_folder(path: Path) -> bool:
    """A folder with DICOM files directly in it: by name (.dcm, .ima, no extension), else by the first bytes of a few
    files (exports often name files by their SOP Instance UID, "1.2.840....5", whose "extension" is a number)."""
    from hsam.volume.dicom_series import has_dicom_header

    if not path.is_dir():
        return False
    files = [f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")]
    if any(f.suffix.lower() in (".dcm", ".ima") or (not f.suffix and f.stat().st_size > 128) for f in files):
        return True
    return any(has_dicom_header(f) for f in sorted(files)[:8] if not _volume_suffix(f))


def _holds_dicom(path: Path) -> bool:
    """True for a folder with DICOM files in it or in any sub-folder (a series folder, or a study's folder tree)."""
    if not path.is_dir():
        return False
    return any(_looks_like_dicom_folder(Path(root)) for root, _, _ in os.walk(path))


def _study_uids(path: Path) -> set[str]:
    """The Study Instance UIDs under ``path``, read from the first DICOM file of each folder (series are foldered)."""
    import pydicom

    studies = set()
    for root, _, files in os.walk(path):
        for name in sorted(files):
            try:
                header = pydicom.dcmread(Path(root) / name, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
            except Exception:  # not DICOM (or unreadable): try the folder's next file
                continue
            if header.get("StudyInstanceUID"):
                studies.add(str(header.StudyInstanceUID))
                break
    return studies


def is_cohort_source(source: str | os.PathLike[str]) -> bool:
    """True for a list file, or a folder that holds volume files, or DICOM sub-folders of more than one study.

    A folder with DICOM files in it is one input (a series, or a study to pick a series from); so is a folder whose
    sub-folders hold the series of a single study.
    """
    path = Path(source)
    if path.is_file():
        return path.name.lower().endswith(LIST_SUFFIXES)
    if not path.is_dir():
        return False
    entries = list(path.iterdir())
    if any(e.is_file() and _volume_suffix(e) for e in entries):
        return True
    if _looks_like_dicom_folder(path) or not any(_holds_dicom(e) for e in entries if e.is_dir()):
        return False
    # more than one Study Instance UID: a cohort; none (an anonymiser emptied them) cannot tell studies apart, so
    # the folder is one study and a warning names the series picked
    return len(_study_uids(path)) > 1


def cohort_inputs(source: str | os.PathLike[str]) -> list[Path]:
    """The cases of a folder or list file, sorted, de-duplicated; HSAMError when none or a listed path is missing."""
    path = Path(source)
    if path.is_file():
        cases = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            text = line.split("#", 1)[0].strip().split(",", 1)[0].strip()
            if not text:
                continue
            case = Path(text) if Path(text).is_absolute() else path.parent / text
            if not case.exists():
                raise HSAMError(f"{path}:{number}: {text} does not exist; fix the list or remove the line")
            cases.append(case)
    elif path.is_dir():
        cases = [e for e in path.iterdir() if (e.is_file() and _volume_suffix(e)) or _holds_dicom(e)]
    else:
        raise HSAMError(f"{path} is neither a folder nor a list file")
    unique = sorted({c.resolve(): c for c in cases}.values(), key=lambda p: str(p))
    if not unique:
        raise HSAMError(f"{path}: no CT volumes found (looked for {', '.join(VOLUME_SUFFIXES)} files and DICOM folders)")
    names = [case_name(c) for c in unique]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise HSAMError(f"{path}: several cases would write the same output name ({', '.join(duplicates[:3])}); "
                        "rename them or use a list file")
    return unique


def rank_and_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` without it)."""
    def number(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    world = max(1, number("WORLD_SIZE", 1))
    rank = number("RANK", 0)
    if not 0 <= rank < world:
        raise HSAMError(f"RANK={rank} is outside WORLD_SIZE={world}; check the launcher's environment")
    return rank, world, number("LOCAL_RANK", rank)


def shard(cases: list[Path], rank: int, world: int) -> list[Path]:
    """Every ``world``-th case starting at ``rank`` (the list is sorted first, so shards never overlap)."""
    return cases[rank::world]


@dataclass
class CohortSummary:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0


def run_cohort(
    cases: list[Path],
    out_dir: Path,
    suffix: str,
    segment_one: Callable[[Path, Path], None],
    say: Callable[[str], None] = lambda text: print(text, file=sys.stderr),
) -> CohortSummary:
    """Segment each case into ``out_dir/<name><suffix>`` with ``segment_one(input, output)``; skip finished ones.

    A case that fails with :class:`HSAMError` is reported and the run goes on; other errors stop the run.
    """
    summary = CohortSummary()
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    for number, case in enumerate(cases, start=1):
        output = out_dir / f"{case_name(case)}{suffix}"
        if output.exists():
            summary.skipped.append(case)
            continue
        case_started = time.perf_counter()
        try:
            segment_one(case, output)
        except HSAMError as error:
            summary.failed.append((case, str(error)))
            say(f"[{number}/{len(cases)}] {case.name}: error: {error}")
            continue
        summary.done.append(case)
        say(f"[{number}/{len(cases)}] {case.name} -> {output.name} ({time.perf_counter() - case_started:.1f} s)")
    summary.seconds = time.perf_counter() - started
    return summary
