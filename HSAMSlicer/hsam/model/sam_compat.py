"""Import ``segment_anything``'s network modules with or without torchvision.

``segment_anything/__init__.py`` imports its predictor, which needs torchvision; the network code in
``segment_anything.modeling`` and ``segment_anything.build_sam`` needs only torch. Where torchvision imports (inside
3D Slicer it does) the package is imported normally; elsewhere the package is registered without running its
``__init__`` so that only the torch-only submodules load.
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


def load_segment_anything() -> types.ModuleType:
    """Return the ``segment_anything`` package object with ``modeling`` and ``build_sam`` imported."""
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("segment-anything is not installed: pip install segment-anything")
        if _torchvision_works():
            importlib.import_module("segment_anything")
        else:
            package = types.ModuleType("segment_anything")
            package.__path__ = list(spec.submodule_search_locations)
            package.__spec__ = spec
            package.__file__ = spec.origin
            sys.modules["segment_anything"] = package
    package = sys.modules["segment_anything"]
    importlib.import_module("segment_anything.modeling")
    importlib.import_module("segment_anything.build_sam")
    return package


def modeling() -> types.ModuleType:
    """``segment_anything.modeling`` (ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer, ...)."""
    return load_segment_anything().modeling


def build_sam() -> types.ModuleType:
    """``segment_anything.build_sam`` (``sam_model_registry``)."""
    return load_segment_anything().build_sam
