"""Qt-free pieces of the HSAMSlicer module: MRML <-> SimpleITK geometry, the Logic, export, the background worker.

Nothing here imports qt, ctk or slicer's GUI classes, so the Logic runs headless (pytest with the PyPI ``slicer-core``
wheel, or ``Slicer --no-main-window``). torch and the H-SAM network are imported lazily, only when a model is run.
Import the submodules directly (``from HSAMSlicerLib.logic import HSAMSlicerLogic``); this file imports nothing.
"""
