"""Laterality check: are the liver (and gallbladder) on the patient's right and the spleen on the left?

For a model that finds organs by how they look (the paper's ViT-B model), a scan whose header lies about left and right
gives labels on the wrong side *in patient coordinates*: the model labels the liver where the liver is in the voxels,
and the header puts those voxels on the patient's left. This costs no inference: it reads the final labels and the
CT's body outline. (A position-driven model, such as the bundled demo, keeps putting its liver on the canonical
right of a mirrored scan, so this check stays silent there; :mod:`hsam.checks.orientation` covers that case.)

Sides are taken in LPS patient coordinates (x grows towards the patient's left) against the body's midline (the
mean x of the voxels denser than ``BODY_HU``, over the slices that hold either organ group), so the result does not
depend on how the volume is stored. It fires only when the evidence is clear on both sides of the body: the liver
and gallbladder together and the spleen each hold at least ``MIN_ML`` and each lie at least ``OPPOSITE_SHARE`` on
the wrong side. A liver that merely reaches across the midline (its left lobe does) or a spleen that was not found
keeps it silent. Situs inversus (organs mirrored in the patient, about 1 in 10,000) gives the same picture and is
named in the warning as the rare alternative.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import SimpleITK as sitk

OPPOSITE_SHARE = 0.8  # share of an organ group's voxels on the wrong side of the midline for "clearly opposite"
MIN_ML = 2.0  # an organ group smaller than this (a few stray voxels) is no evidence either way
BODY_HU = -500.0  # denser than this: body (and table), not air; the table lies behind the patient, not to a side

RIGHT_ORGANS = ("liver", "gallbladder")  # normally on the patient's right
LEFT_ORGANS = ("spleen",)  # normally on the patient's left


@dataclass
class LateralityCheck:
    """Per organ group: volume (ml) and the share of its voxels on the patient's right of the body's midline."""

    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    warning: str | None = None

    def as_dict(self) -> dict:
        """JSON-ready record for provenance."""
        return asdict(self)


def _x_step(image: sitk.Image) -> np.ndarray:
    """mm of LPS x per voxel step along the array axes [z, y, x]: x is linear in the voxel index."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return (direction[0] * np.array(image.GetSpacing()))[::-1]


def _body_midline(ct: sitk.Image, slices: np.ndarray, step: np.ndarray) -> float | None:
    """Mean LPS x of the body voxels on ``slices``, slice by slice (a whole-volume mask of a large scan would take
    hundreds of MB); None when those slices hold no body."""
    array = sitk.GetArrayViewFromImage(ct)
    count, total = 0, 0.0
    for z in slices:
        rows, columns = np.nonzero(array[z] > BODY_HU)
        count += len(rows)
        total += len(rows) * z * step[0] + rows.sum() * step[1] + columns.sum() * step[2]
    return ct.GetOrigin()[0] + total / count if count else None


def check_laterality(labels: sitk.Image, ct: sitk.Image, class_names: list[str]) -> LateralityCheck:
    """Check the sides of the liver/gallbladder and the spleen in ``labels`` (same grid as ``ct``, HU)."""
    check = LateralityCheck()
    values = {name: index for index, name in enumerate(class_names)}
    right = [values[n] for n in RIGHT_ORGANS if n in values]
    left = [values[n] for n in LEFT_ORGANS if n in values]
    if not right or not left:  # a model without these organs: nothing to check
        return check
    array = sitk.GetArrayViewFromImage(labels)
    voxels = {"liver and gallbladder": np.nonzero(np.isin(array, right)), "spleen": np.nonzero(np.isin(array, left))}
    slices = np.union1d(voxels["liver and gallbladder"][0], voxels["spleen"][0])
    step = _x_step(labels)
    midline = _body_midline(ct, slices, step) if len(slices) else None
    if midline is None:
        return check
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    for name, (k, j, i) in voxels.items():
        x = labels.GetOrigin()[0] + k * step[0] + j * step[1] + i * step[2]
        check.groups[name] = {
            "ml": round(len(x) * voxel_ml, 2),
            "share_on_right": round(float((x < midline).mean()), 3) if len(x) else 0.0,  # LPS: right is smaller x
        }
    liver, spleen = check.groups["liver and gallbladder"], check.groups["spleen"]
    found = liver["ml"] >= MIN_ML and spleen["ml"] >= MIN_ML
    if found and liver["share_on_right"] <= 1 - OPPOSITE_SHARE and spleen["share_on_right"] >= OPPOSITE_SHARE:
        check.warning = (
            f"orientation looks wrong: in patient coordinates the liver lies on the patient's left "
            f"({100 * (1 - liver['share_on_right']):.0f} % of it) and the spleen on the right "
            f"({100 * spleen['share_on_right']:.0f} %): the scan's header may swap left and right (check the "
            f"orientation markers in a viewer); if the patient has situs inversus (rare), the labels are right"
        )
    return check
