"""H-SAM: prompt-free multi-organ segmentation of CT with the Segment Anything Model and hierarchical decoding.

The core package of HSAMSlicer. It never imports slicer, qt or vtk; importing it runs no heavy code.
"""

__version__ = "0.1.0"
