"""Training-time augmentation in model-input space: random affine (rotation, scale, shift, flips)
and intensity changes, applied to the image and its landmarks together.

Flips and rotations move endpoints across the ordering rule, so landmarks are re-ordered with
`biometry.canonical_order` after the transform (the heatmap codec does that when encoding)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    rotation_deg: float = 20.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    shift_fraction: float = 0.05
    flip_probability: float = 0.5  # each of horizontal and vertical
    gamma_range: tuple[float, float] = (0.7, 1.5)
    contrast_range: tuple[float, float] = (0.8, 1.2)


def random_affine(image: np.ndarray, points_model_px: np.ndarray, config: AugmentConfig, rng: np.random.Generator):
    """float32 [S, S] image + [4, 2] points -> transformed copies (same space, same size)."""
    size = image.shape[0]
    centre = (size - 1) / 2.0
    angle = rng.uniform(-config.rotation_deg, config.rotation_deg)
    scale = rng.uniform(*config.scale_range)
    matrix = cv2.getRotationMatrix2D((centre, centre), angle, scale)  # 2x3
    matrix[:, 2] += rng.uniform(-config.shift_fraction, config.shift_fraction, size=2) * size
    if rng.random() < config.flip_probability:
        matrix[0] = -matrix[0]
        matrix[0, 2] += 2 * centre
    if rng.random() < config.flip_probability:
        matrix[1] = -matrix[1]
        matrix[1, 2] += 2 * centre
    warped = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    points = np.asarray(points_model_px, dtype=np.float64) @ matrix[:, :2].T + matrix[:, 2]
    return warped, points


def random_intensity(image: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    gamma = rng.uniform(*config.gamma_range)
    contrast = rng.uniform(*config.contrast_range)
    return np.clip((np.clip(image, 0.0, 1.0) ** gamma) * contrast, 0.0, 1.0).astype(np.float32)
