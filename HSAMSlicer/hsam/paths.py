"""Where HSAMSlicer keeps its files: the shipped resources and the user's model cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def resources_dir() -> Path:
    """The folder holding ``models.json``, the label table CSV, ``Icons/`` and ``UI/``.

    The repository keeps it as the top-level ``Resources/``. A wheel ships that folder as the data package
    ``hsam.resources``; a source checkout or an installed Slicer extension has it one or two levels above this package.
    """
    spec = importlib.util.find_spec("hsam.resources")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "Resources", package.parent.parent / "Resources"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"HSAMSlicer's Resources folder was not found near {package}; reinstall hsam")


def hsam_home() -> Path:
    """The user's HSAMSlicer folder (models cache, registered local models): ``$HSAM_HOME`` or ``~/.hsam``."""
    return Path(os.environ.get("HSAM_HOME") or Path.home() / ".hsam").expanduser()
