"""What the module reads from the scene's nodes: the input-volume check, a result's CT and its provenance.

Shared by the Logic and export without either importing the other (imports run one way: logic -> export -> nodes).
Qt-free.
"""

from __future__ import annotations

from hsam.errors import HSAMError
from HSAMSlicerLib.results import ROLE_SOURCE

# Node-reference roles from the segmentation node to its CT (ROLE_SOURCE) and to the other parts of the result.
ROLE_PREDICTION = "HSAMSlicer.Prediction"
ROLE_CONFIDENCE = "HSAMSlicer.Confidence"
ROLE_TABLE = "HSAMSlicer.OrganVolumes"
# Provenance attributes on the segmentation node (also written to provenance.json on export).
PROVENANCE_PREFIX = "HSAMSlicer."
PROVENANCE_KEYS = (
    "ModelId", "ModelName", "ModelTitle", "ModelSHA256", "Device", "Precision", "Seconds", "Time", "Version",
    "Organs", "Warnings",
)  # fmt: skip


def check_input_volume(volume_node) -> None:  # noqa: ANN001 (an MRML node)
    """Raise HSAMError unless ``volume_node`` is a 3-D single-component scalar volume with voxels."""
    if volume_node is None:
        raise HSAMError("no input volume: load a CT and select it as the input volume")
    name = volume_node.GetName()
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise HSAMError(f"'{name}' is a label map (a segmentation), not a CT image: select the CT volume as the input")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLVectorVolumeNode"):
        raise HSAMError(
            f"'{name}' is a {volume_node.GetClassName()}, not a scalar CT volume: H-SAM needs a single 3-D CT"
        )
    image_data = volume_node.GetImageData()
    if image_data is None or image_data.GetNumberOfPoints() == 0:
        raise HSAMError(f"'{name}' has no voxels: load the image data again")
    components = image_data.GetNumberOfScalarComponents()
    if components != 1:
        raise HSAMError(
            f"'{name}' has {components} values per voxel (a 4-D, multi-frame or colour volume): "
            "H-SAM needs a single 3-D CT; split it into 3-D volumes (e.g. with the Sequences module) and pick one"
        )


def source_volume(segmentation_node):  # noqa: ANN001, ANN201 (MRML nodes)
    """The CT a segmentation belongs to: our source reference, else its reference-geometry volume."""
    if segmentation_node is None:
        return None
    node = segmentation_node.GetNodeReference(ROLE_SOURCE)
    if node is None:
        node = segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())
    return node if node is not None and node.IsA("vtkMRMLScalarVolumeNode") else None


def provenance(segmentation_node) -> dict[str, str]:  # noqa: ANN001
    """The provenance attributes of a result (empty for a segmentation this module did not make)."""
    values = {}
    for key in PROVENANCE_KEYS:
        value = segmentation_node.GetAttribute(PROVENANCE_PREFIX + key)
        if value is not None:
            values[key] = value
    return values
