"""Slice augmentation of the H-SAM recipe (hsam-model.md §2.2) with the released code's bugs fixed.

One branch per sample, with the released probabilities: rotation 0.45, random crop 0.4125, elastic 0.116875,
none 0.020625. Then the slice is resized to the model input (cubic image, nearest label) and the stage-1 target is
the label nearest-resized to a quarter of that size.

Fixed (listed in the docs): labels are *always* resampled nearest-neighbour (the released elastic branch interpolated
them linearly and truncated, inventing classes at borders); the image is never resampled nearest-neighbour (the
released rotation was); every random draw comes from a generator seeded per (seed, epoch, sample), so runs are
reproducible and independent of worker count (the released loader re-seeded Python's ``random`` identically in every
worker every epoch); the image stays in [0, 1] after cubic resizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class AugmentConfig:
    """Branch probabilities and magnitudes; the defaults are the released ones."""

    p_rotate: float = 0.45
    p_crop: float = 0.4125
    p_elastic: float = 0.116875
    rotate_degrees: int = 20  # integer angle in [-20, 19], as released
    crop_scale: tuple[float, float] = (0.2, 0.8)  # kept window side as a fraction of the slice side
    elastic_alpha: float = 2.0  # displacement magnitude, times the slice width
    elastic_sigma: float = 0.08  # smoothing, times the width
    elastic_affine: float = 0.08  # affine jitter of three control points, times the width

    @classmethod
    def from_dict(cls, data: dict | None) -> "AugmentConfig":
        data = dict(data or {})
        if "crop_scale" in data:
            data["crop_scale"] = tuple(data["crop_scale"])
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            from hsam.errors import HSAMError

            raise HSAMError(f"unknown augmentation setting(s) {sorted(unknown)} in the training config")
        config = cls(**data)
        if min(config.p_rotate, config.p_crop, config.p_elastic) < 0 or config.p_rotate + config.p_crop + config.p_elastic > 1 + 1e-9:
            from hsam.errors import HSAMError

            raise HSAMError("augmentation probabilities must be >= 0 and sum to at most 1")
        return config

    @classmethod
    def off(cls) -> "AugmentConfig":
        return cls(p_rotate=0.0, p_crop=0.0, p_elastic=0.0)


def rotate(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, degrees: int):
    angle = int(rng.integers(-degrees, degrees))
    # order 1 for the image (the release used 0), 0 for the labels; outside the slice: 0, as released
    return (ndimage.rotate(image, angle, order=1, reshape=False, mode="constant", cval=0.0),
            ndimage.rotate(label, angle, order=0, reshape=False, mode="constant", cval=0))


def crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, scale_range: tuple[float, float]):
    h, w = image.shape
    scale = scale_range[0] + rng.random() * (scale_range[1] - scale_range[0])
    new_h, new_w = max(1, int(h * scale)), max(1, int(w * scale))
    y = int(rng.integers(0, h - new_h)) if h > new_h else 0
    x = int(rng.integers(0, w - new_w)) if w > new_w else 0
    return image[y : y + new_h, x : x + new_w], label[y : y + new_h, x : x + new_w]


def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 affine matrix taking three (row, col) points ``src`` to ``dst``."""
    a = np.hstack([src, np.ones((3, 1))])
    solution = np.linalg.solve(a, dst)  # [3, 2]: dst = [src, 1] @ solution
    matrix = np.eye(3)
    matrix[:2, :] = solution.T
    return matrix


def elastic(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float,
            affine: float):
    """Random affine (three jittered control points, mirrored border) then a smooth random displacement field.

    Image: linear interpolation; labels: nearest-neighbour (the release interpolated labels linearly).
    """
    h, w = image.shape
    centre = np.array([h // 2, w // 2], dtype=float)
    side = min(h, w) // 3
    src = np.array([centre + side, [centre[0] + side, centre[1] - side], centre - side])
    dst = src + rng.uniform(-affine, affine, size=src.shape)
    forward = _affine_from_points(src, dst)
    inverse = np.linalg.inv(forward)  # output pixel -> input pixel, what affine_transform wants
    image = ndimage.affine_transform(image, inverse[:2, :2], inverse[:2, 2], order=1, mode="mirror")
    label = ndimage.affine_transform(label, inverse[:2, :2], inverse[:2, 2], order=0, mode="mirror")
    dy = ndimage.gaussian_filter(rng.random((h, w)) * 2 - 1, sigma) * alpha
    dx = ndimage.gaussian_filter(rng.random((h, w)) * 2 - 1, sigma) * alpha
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([rows + dy, cols + dx])
    return (ndimage.map_coordinates(image, coords, order=1, mode="constant", cval=0.0),
            ndimage.map_coordinates(label, coords, order=0, mode="constant", cval=0))


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, config: AugmentConfig):
    """Apply one randomly chosen branch to a slice (image float32 [H, W], label uint8 [H, W])."""
    draw = rng.random()
    if draw < config.p_rotate:
        return rotate(image, label, rng, config.rotate_degrees)
    draw -= config.p_rotate
    if draw < config.p_crop:
        return crop(image, label, rng, config.crop_scale)
    draw -= config.p_crop
    if draw < config.p_elastic:
        w = image.shape[1]
        return elastic(image, label, rng, config.elastic_alpha * w, config.elastic_sigma * w, config.elastic_affine * w)
    return image, label


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Cubic resize of a [H, W] slice to [size, size], kept in [0, 1]."""
    h, w = image.shape
    if (h, w) != (size, size):
        image = ndimage.zoom(image, (size / h, size / w), order=3)
    return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)


def resize_label(label: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a [H, W] label slice to [size, size]."""
    h, w = label.shape
    if (h, w) == (size, size):
        return label
    return ndimage.zoom(label, (size / h, size / w), order=0)


def make_sample(image: np.ndarray, label: np.ndarray, img_size: int, low_res: int,
                rng: np.random.Generator | None, config: AugmentConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image [3, S, S] float32, label [S, S] int64, low-res label [S/4, S/4] int64)`` for one training slice.

    ``rng=None`` skips augmentation (validation, tests).
    """
    image = np.asarray(image, dtype=np.float32)
    label = np.asarray(label, dtype=np.uint8)
    if rng is not None:
        image, label = augment(image, label, rng, config)
    image = resize_image(image, img_size)
    label = resize_label(label, img_size)
    low = resize_label(label, low_res)
    return (np.repeat(image[None], 3, axis=0), label.astype(np.int64), low.astype(np.int64))
