"""Label-driven CT synthesis and scene additions for the H-SAM-Lite demo pool (issue 15).

Why: the demo model is trained on one patient. On another scanner it under-segments organs whose grey values differ
(a brighter aorta, a stomach with other contents) and it calls the arms "liver"/"spleen" because that patient's arms
are not beside the trunk. In the spirit of SynthSeg (Billot et al., 2023), images are drawn from the full
TotalSegmentator label maps (117 ``total`` or 50 ``total_mr`` structures) with a random grey value per structure,
texture, bias field, blur, resolution loss and noise, so that the decoders learn shape and position rather than one
scanner's grey values. Unlike SynthSeg the values are drawn from CT-plausible ranges per structure (the frozen
LiteMedSAM encoder only ever sees windowed CT), wide enough to cover contrast phases and stomach contents.

Scene additions (arms beside the trunk, a patient table) are drawn only into air, labelled background, so that
"a soft-tissue blob beside the body" is never an organ.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

AIR_HU = -1024.0

# (keywords in the TotalSegmentator class name, HU range): first match wins. Wide ranges: contrast phase, scanner.
HU_PRIORS: tuple[tuple[tuple[str, ...], tuple[float, float]], ...] = (
    (("lung", "trachea"), (-980.0, -750.0)),
    (("kidney_cyst",), (-10.0, 35.0)),
    (("costal_cartilages", "intervertebral_discs"), (60.0, 220.0)),
    (("vertebrae", "sacrum", "rib_", "sternum", "hip_", "femur", "humerus", "scapula", "clavicula", "skull"),
     (200.0, 900.0)),
    (("aorta", "artery", "brachiocephalic_trunk", "atrial_appendage"), (40.0, 420.0)),
    (("vena", "vein", "heart"), (40.0, 260.0)),
    (("kidney",), (40.0, 280.0)),
    (("liver",), (30.0, 170.0)),
    (("spleen",), (35.0, 190.0)),
    (("pancreas",), (25.0, 150.0)),
    (("gallbladder", "urinary_bladder"), (-10.0, 45.0)),
    (("stomach", "duodenum", "small_bowel", "colon", "esophagus"), (-20.0, 110.0)),
    (("gluteus", "autochthon", "iliopsoas"), (25.0, 80.0)),
)
DEFAULT_PRIOR = (10.0, 90.0)  # adrenals, spinal cord, prostate, thyroid, brain: soft tissue
HOLLOW = ("stomach", "duodenum", "small_bowel", "colon")  # may hold gas or oral contrast
FAT, SOFT = (-130.0, -60.0), (15.0, 75.0)

# Coherent contrast phases (issue 15: the hidden patient is contrast-enhanced, the training patient and the dcmqi
# patient are not): (keywords, HU range) of the structures that enhance, first match wins; approximate values of
# 120 kVp abdominal CT. Structures not listed (bone, muscle, fat, gallbladder, ...) keep their HU.
CONTRAST_PHASES: dict[str, tuple[tuple[tuple[str, ...], tuple[float, float]], ...]] = {
    "native": ((("aorta", "artery", "vena", "vein", "heart"), (35.0, 55.0)), (("kidney_cyst",), (-10.0, 20.0)),
               (("kidney",), (25.0, 45.0)), (("liver",), (45.0, 70.0)), (("spleen",), (40.0, 55.0)),
               (("pancreas",), (30.0, 50.0))),
    "arterial": ((("aorta", "artery", "atrial_appendage"), (230.0, 400.0)),
                 (("portal_vein", "heart"), (120.0, 220.0)), (("vena", "vein"), (60.0, 120.0)),
                 (("kidney_cyst",), (-10.0, 20.0)), (("kidney",), (130.0, 230.0)), (("liver",), (60.0, 85.0)),
                 (("spleen",), (90.0, 150.0)), (("pancreas",), (95.0, 140.0))),
    "venous": ((("aorta", "artery", "atrial_appendage"), (140.0, 210.0)), (("vena", "vein", "heart"), (120.0, 190.0)),
               (("kidney_cyst",), (-10.0, 20.0)), (("kidney",), (140.0, 210.0)), (("liver",), (95.0, 135.0)),
               (("spleen",), (105.0, 135.0)), (("pancreas",), (85.0, 115.0))),
    "delayed": ((("aorta", "artery", "vena", "vein", "heart"), (95.0, 135.0)), (("kidney_cyst",), (-10.0, 20.0)),
                (("kidney",), (110.0, 170.0)), (("liver",), (75.0, 100.0)), (("spleen",), (75.0, 100.0)),
                (("pancreas",), (65.0, 90.0))),
}
STOMACH_CONTENTS = ((-5.0, 20.0), (20.0, 50.0), (60.0, 110.0))  # water, food, enhanced wall and collapsed lumen


def _first_match(name: str, table) -> tuple[float, float] | None:
    for keys, span in table:
        if any(key in name for key in keys):
            return span
    return None


def prior(name: str) -> tuple[float, float]:
    return _first_match(name, HU_PRIORS) or DEFAULT_PRIOR


def phase_prior(phase: str, rng: np.random.Generator):
    """``prior`` for one slice in one contrast phase: the phase's range for the structures that enhance, ``prior``
    for the rest; the stomach holds one of water, food or a collapsed enhanced wall, drawn once per slice."""
    table = CONTRAST_PHASES[phase]
    stomach = STOMACH_CONTENTS[int(rng.integers(len(STOMACH_CONTENTS)))]

    def phased(name: str) -> tuple[float, float]:
        if "stomach" in name:
            return stomach
        return _first_match(name, table) or prior(name)

    return phased


def smooth_field(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth random field scaled to [-1, 1] (bias fields, textures, gas pockets)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (np.abs(field).max() + 1e-6)


def tissue_classes(image: np.ndarray, body: np.ndarray, is_ct: bool, rng: np.random.Generator) -> np.ndarray:
    """0 outside the body, 1 fat, 2 soft tissue, 3 gas, for the voxels no structure label covers.

    CT: by HU. MR (no HU): fat is the brightest third of the body's intensities on these sequences, the rest soft."""
    classes = np.zeros(image.shape, dtype=np.uint8)
    if is_ct:
        classes[body & (image < -30)] = 1
        classes[body & (image >= -30)] = 2
        classes[body & (image < -500)] = 3
    else:
        cut = np.quantile(image[body], rng.uniform(0.55, 0.75)) if body.any() else 0.0
        classes[body & (image >= cut)] = 1
        classes[body & (image < cut)] = 2
    return classes


def synthesize(image: np.ndarray, full_labels: np.ndarray, names: dict[int, str], body: np.ndarray, is_ct: bool,
               rng: np.random.Generator, priors=prior) -> np.ndarray:
    """A CT-like slice (HU) drawn from the label map ``full_labels`` (TotalSegmentator ids, names in ``names``).

    Each structure gets one random value from its prior (``priors``: name -> HU range), a random texture (smooth +
    fine), hollow organs sometimes gas pockets or oral contrast; unlabelled body voxels become fat / soft tissue / gas
    by ``tissue_classes``."""
    out = np.full(image.shape, AIR_HU, dtype=np.float32)
    classes = tissue_classes(image, body, is_ct, rng)
    unlabelled = full_labels == 0
    for value, span in ((1, FAT), (2, SOFT), (3, (-1000.0, -850.0))):
        out[unlabelled & (classes == value)] = rng.uniform(*span)
    for value in np.unique(full_labels):
        if value == 0:
            continue
        mask = full_labels == value
        name = names.get(int(value), "")
        out[mask] = rng.uniform(*priors(name))
        if any(key in name for key in HOLLOW) and rng.random() < 0.35:
            pocket = mask & (smooth_field(image.shape, rng.uniform(2.0, 5.0), rng) > rng.uniform(0.2, 0.6))
            out[pocket] = rng.uniform(-1000.0, -700.0) if rng.random() < 0.7 else rng.uniform(150.0, 500.0)
    texture = smooth_field(image.shape, rng.uniform(1.0, 3.0), rng) * rng.uniform(0.0, 25.0)
    out = np.where(out > -700, out + texture, out)
    return out


def remap_structures(image: np.ndarray, full_labels: np.ndarray, names: dict[int, str],
                     rng: np.random.Generator, p: float = 0.6) -> np.ndarray:
    """The real CT slice with a fraction ``p`` of its labelled structures moved to a new mean HU from their prior:
    real texture and unlabelled tissue kept, organ-to-organ contrast changed (another contrast phase or scanner)."""
    out = image.astype(np.float32).copy()
    for value in np.unique(full_labels):
        if value == 0 or rng.random() > p:
            continue
        mask = full_labels == value
        lo, hi = prior(names.get(int(value), ""))
        out[mask] += rng.uniform(lo, hi) - float(np.median(image[mask]))
    return out


def contrast_phase(image: np.ndarray, full_labels: np.ndarray, names: dict[int, str], phase: str,
                   rng: np.random.Generator) -> np.ndarray:
    """The real CT slice as in another contrast phase (``CONTRAST_PHASES``): every enhancing structure and the
    stomach moved to a mean HU of that phase, their real texture and everything else kept."""
    out = image.astype(np.float32).copy()
    priors = phase_prior(phase, rng)
    table = CONTRAST_PHASES[phase]
    for value in np.unique(full_labels):
        name = names.get(int(value), "")
        if value == 0 or not ("stomach" in name or _first_match(name, table)):
            continue
        mask = full_labels == value
        out[mask] += rng.uniform(*priors(name)) - float(np.median(image[mask]))
    return out


def degrade(hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scanner effects on a synthetic slice: bias field, partial-volume blur, lower resolution, noise."""
    hu = hu + smooth_field(hu.shape, rng.uniform(20.0, 40.0), rng) * rng.uniform(0.0, 40.0)
    hu = ndimage.gaussian_filter(hu, rng.uniform(0.3, 1.2))
    if rng.random() < 0.3:
        factor = rng.uniform(1.3, 2.0)
        small = ndimage.zoom(hu, 1.0 / factor, order=1)
        hu = ndimage.zoom(small, (hu.shape[0] / small.shape[0], hu.shape[1] / small.shape[1]), order=1)
    return hu + rng.normal(0.0, rng.uniform(0.0, 25.0), size=hu.shape)


def ellipse(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float],
            angle: float = 0.0) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    dr, dc = rows - centre[0], cols - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dr + s * dc, -s * dr + c * dc
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 <= 1.0


def arm_params(rng: np.random.Generator) -> dict:
    """One arm's shape in mm: an upper arm or forearm cross-section beside the trunk."""
    forearm = rng.random() < 0.3
    return {"half_ap": rng.uniform(30.0, 50.0) if not forearm else rng.uniform(22.0, 35.0),
            "half_lr": rng.uniform(28.0, 45.0) if not forearm else rng.uniform(20.0, 32.0),
            "gap": rng.uniform(-6.0, 30.0), "dy": rng.uniform(-0.35, 0.25), "angle": rng.uniform(-0.5, 0.5),
            "fat": rng.uniform(*FAT), "muscle": rng.uniform(*SOFT), "fat_frac": rng.uniform(0.65, 0.85),
            "bones": 2 if forearm else 1, "cortex": rng.uniform(500.0, 1300.0), "marrow": rng.uniform(-50.0, 300.0),
            "bone_r": rng.uniform(6.0, 9.0) if forearm else rng.uniform(9.0, 14.0)}


def add_arm(hu: np.ndarray, mm_per_px: float, side: int, params: dict, rng: np.random.Generator) -> None:
    """In place: an arm beside the trunk on ``side`` (-1: low column index, +1: high), only where there is air.

    The trunk is the body's bounding box (> -500 HU); a ``gap`` < 0 lets the arm touch the skin, as arms resting on
    the body do."""
    body = hu > -500
    if not body.any():
        return
    rows, cols = np.nonzero(body)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    half_ap, half_lr = params["half_ap"] / mm_per_px, params["half_lr"] / mm_per_px
    centre_r = (top + bottom) / 2 + params["dy"] * (bottom - top) / 2
    edge = left if side < 0 else right
    centre_c = edge + side * (params["gap"] / mm_per_px + half_lr)
    outer = ellipse(hu.shape, (centre_r, centre_c), (half_ap, half_lr), params["angle"]) & ~body
    if not outer.any():
        return
    f = params["fat_frac"]
    inner = ellipse(hu.shape, (centre_r, centre_c), (half_ap * f, half_lr * f), params["angle"])
    texture = smooth_field(hu.shape, 1.5, rng) * 15.0
    hu[outer] = params["fat"] + texture[outer] * 0.5
    hu[outer & inner] = params["muscle"] + texture[outer & inner]
    radius = params["bone_r"] / mm_per_px
    for k in range(params["bones"]):
        offset = (k - (params["bones"] - 1) / 2) * 2.4 * radius
        centre = (centre_r + offset, centre_c + side * rng.uniform(-0.2, 0.2) * half_lr)
        bone = ellipse(hu.shape, centre, (radius, radius * rng.uniform(0.8, 1.1))) & outer
        marrow = ellipse(hu.shape, centre, (radius * 0.6, radius * 0.6)) & outer
        hu[bone] = params["cortex"]
        hu[marrow] = params["marrow"]


def add_table(hu: np.ndarray, mm_per_px: float, rng: np.random.Generator) -> None:
    """In place: a CT table (a slightly curved band under the patient's back, posterior = high row index)."""
    body = hu > -500
    if not body.any():
        return
    bottom = np.nonzero(body.any(axis=1))[0].max()
    top = bottom + rng.uniform(0.0, 15.0) / mm_per_px
    thick = rng.uniform(6.0, 25.0) / mm_per_px
    cols = np.arange(hu.shape[1])
    sag = rng.uniform(0.0, 20.0) / mm_per_px * ((cols - hu.shape[1] / 2) / (hu.shape[1] / 2)) ** 2
    rows = np.arange(hu.shape[0])[:, None]
    band = (rows >= top - sag[None]) & (rows < top - sag[None] + thick) & ~body
    hu[band] = rng.uniform(-400.0, 150.0)
