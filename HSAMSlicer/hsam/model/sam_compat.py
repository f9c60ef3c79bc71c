"""Import ``segment_anything``'s network modules with or without torchvision.

``segment_anything/__init__.py`` imports its predictor, which needs torchvision; the network code in
``segment_anything.modeling`` and ``segment_anything.build_sam`` needs only torch. Where torchvision imports (inside
3D Slicer it does) the package is imported normally; elsewhere a stand-in package is registered just long enough to
load the torch-only submodules, then taken out of ``sys.modules`` again: another library that imports
``segment_anything`` later gets the real package (or the real ImportError), never our partial stand-in.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _torchvision_works() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
    except Exception:  # a torchvision built for another torch fails at import with RuntimeError or ImportError
        return False
    return True


_loaded: dict[str, types.ModuleType] = {}  # "modeling", "build_sam": kept here when the stand-in was used


def load_segment_anything() -> types.ModuleType:
    """Return a ``segment_anything`` package object with ``modeling`` and ``build_sam`` imported."""
    if _loaded:
        return _loaded["package"]
    if "segment_anything" in sys.modules or _torchvision_works():
        package = importlib.import_module("segment_anything")
        importlib.import_module("segment_anything.modeling")
        importlib.import_module("segment_anything.build_sam")
        return package
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment-anything is not installed: pip install segment-anything")
    package = types.ModuleType("segment_anything")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__file__ = spec.origin
    sys.modules["segment_anything"] = package
    try:
        importlib.import_module("segment_anything.modeling")
        importlib.import_module("segment_anything.build_sam")
    finally:
        for name in [m for m in sys.modules if m == "segment_anything" or m.startswith("segment_anything.")]:
            del sys.modules[name]  # the module objects live on in `package` and in _loaded
    _loaded["package"] = package
    return package


def modeling() -> types.ModuleType:
    """``segment_anything.modeling`` (ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer, ...)."""
    return load_segment_anything().modeling


def build_sam() -> types.ModuleType:
    """``segment_anything.build_sam`` (``sam_model_registry``)."""
    return load_segment_anything().build_sam
