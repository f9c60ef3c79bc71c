"""Slab search: encode only the slices around the organs (issue 30, item 2).

The eight H-SAM organs lie in one stretch of the trunk (upper abdomen); a pelvis-to-abdomen or chest-abdomen-pelvis
scan has many slices without any of them. The search runs the network on *probe* slices every ``PROBE_MM`` first;
the slab is the range from the lowest to the highest probe that found organs covering at least ``MIN_ORGAN_MM2``
(a few stray voxels, e.g. a false positive in the pelvis, do not stretch the slab over the whole scan), widened on
each side by one probe step (an organ may reach up to the next probe, which found less) plus ``MARGIN_MM``. Only the
slab's other slices are then encoded; the slices outside it keep the probes' labels where probed and are background
otherwise. Everything between the first and last organ is encoded, so gaps between organs cannot be missed; what can
be missed is organ that starts and ends between two probes outside the slab (< ``PROBE_MM`` long) or covers less than
``MIN_ORGAN_MM2`` on every probe, which the measurement in benchmarks/RESULTS.md ("the slab search") bounds.

When no probe finds an organ, or the volume is too short to save anything, every slice is encoded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

BY_DEFAULT = True  # SegmentOptions(slab=None): on because the 99.9 % bar held on every labelled volume (RESULTS.md)
PROBE_MM = 15.0  # distance between probe slices (5 slices at 3 mm, 6 at 2.5 mm)
MARGIN_MM = 10.0  # extra distance beyond one probe step on each side of the found organs
MIN_ORGAN_MM2 = 200.0  # organ area on a probe slice that counts as finding the organs (2 cm^2: under an aorta's cut)


@dataclass
class SlabPlan:
    """Which slices a run encodes. Indices are canonical slice positions (0 = first slice of the canonical volume)."""

    total: int  # slices in the volume
    probe_step: int  # slices between probes
    margin: int  # slices added beyond one probe step on each side
    min_voxels: int  # organ voxels a probe slice needs to count as finding the organs
    probes: list[int]  # slices encoded first
    first: int = 0  # the slab: slices first..last (inclusive) are all encoded
    last: int = -1
    reason: str = ""  # one line: what the search did

    @property
    def encoded(self) -> int:
        """Slices the network ran on (probes + the slab's other slices)."""
        inside = max(0, self.last - self.first + 1)
        return inside + sum(1 for z in self.probes if not self.first <= z <= self.last)

    def as_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "probes"}, "probes": len(self.probes),
                "encoded": self.encoded}


def plan_probes(total: int, spacing_mm: float, pixel_mm2: float, probe_mm: float = PROBE_MM,
                margin_mm: float = MARGIN_MM, min_organ_mm2: float = MIN_ORGAN_MM2) -> SlabPlan:
    """The probe slices for a volume of ``total`` slices ``spacing_mm`` apart with pixels of ``pixel_mm2``: every
    ``probe_step``-th slice and the last one. A volume where the probes and margins would cover everything gets
    every slice as a probe."""
    step = max(1, int(round(probe_mm / max(spacing_mm, 1e-3))))
    margin = int(np.ceil(margin_mm / max(spacing_mm, 1e-3)))
    min_voxels = max(1, int(np.ceil(min_organ_mm2 / max(pixel_mm2, 1e-6))))
    if total <= 2 * (step + margin) + step:  # nothing left to save
        return SlabPlan(total, step, margin, min_voxels, list(range(total)), 0, total - 1,
                        f"all {total} slices encoded: too short for a slab search")
    probes = sorted(set(range(0, total, step)) | {total - 1})
    return SlabPlan(total, step, margin, min_voxels, probes)


def choose_slab(plan: SlabPlan, labels: np.ndarray) -> list[int]:
    """After the probes ran (``labels`` [z,H,W] holds their labels), set the slab on ``plan`` and return the slices
    still to encode, in order."""
    if plan.last >= plan.first:  # everything was a probe
        return []
    found = [z for z in plan.probes if np.count_nonzero(labels[z]) >= plan.min_voxels]
    if not found:
        plan.first, plan.last = 0, plan.total - 1
        plan.reason = (f"no probe slice of {len(plan.probes)} has {plan.min_voxels}+ organ voxels: all "
                       f"{plan.total} slices encoded")
    else:
        reach = plan.probe_step + plan.margin
        plan.first, plan.last = max(0, found[0] - reach), min(plan.total - 1, found[-1] + reach)
        plan.reason = (f"organs on probe slices {found[0]}-{found[-1]} (every {plan.probe_step}th slice); "
                       f"encoded slices {plan.first}-{plan.last} ({plan.margin} slices margin beyond one probe "
                       f"step): {plan.encoded} of {plan.total} slices")
    probed = set(plan.probes)
    return [z for z in range(plan.first, plan.last + 1) if z not in probed]


def encoded_mask(plan: SlabPlan) -> np.ndarray:
    """bool per slice: True where the network ran (probes and the slab)."""
    mask = np.zeros(plan.total, dtype=bool)
    mask[plan.probes] = True
    mask[plan.first:plan.last + 1] = True
    return mask
