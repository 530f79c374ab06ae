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
    # x:y stretch of the model input, as a frame of another shape gives (a 4:3 screenshot against HC18's 800 x 540:
    # 1.1x). (1, 1): none.
    aspect_range: tuple[float, float] = (1.0, 1.0)
    noise_probability: float = 0.0  # speckle and noise, as `degrade_intensity` adds them for the refinement stage
    screenshot_probability: float = 0.0  # the frame shrunk into a scanner-screen canvas with text and a greyscale bar




# Stage 1 as a locator for archive scans: any orientation, frames of other shapes, heads smaller in a larger
# screenshot, noise (docs/experiments.md, rows R3 and R4: as a 30-epoch recipe from scratch it costs clean accuracy).
ARCHIVE_AUGMENT = AugmentConfig(rotation_deg=180.0, scale_range=(0.6, 1.1), shift_fraction=0.1, gamma_range=(0.6, 1.6),
                                contrast_range=(0.7, 1.3), aspect_range=(1 / 1.5, 1.5), noise_probability=0.3)
# The same for fine-tuning a trained stage 1: portrait frames are turned to landscape before the stretch
# (`imaging.ResizeTransform.for_image`), so the stretch only varies by how far a frame is from 800 x 540.
ARCHIVE_FINE_TUNE_AUGMENT = AugmentConfig(rotation_deg=180.0, scale_range=(0.6, 1.1), shift_fraction=0.1, gamma_range=(0.6, 1.6),
                                          contrast_range=(0.7, 1.3), aspect_range=(0.8, 1.25), noise_probability=0.3)
# For fine-tuning a trained stage 1 towards archive scans without leaving HC18's frames far behind: rotations to ±40°,
# heads down to 0.7 of their size, gain and gamma beyond the scanners' range, and a third of the frames as scanner
# screenshots (`random_screenshot`). Measured in docs/experiments.md, row R5.
ROBUST_FINE_TUNE_AUGMENT = AugmentConfig(rotation_deg=40.0, scale_range=(0.7, 1.1), shift_fraction=0.05, gamma_range=(0.5, 1.8),
                                         contrast_range=(0.6, 1.4), aspect_range=(0.8, 1.25), noise_probability=0.2,
                                         screenshot_probability=0.3)
# R5's intensity ranges without its geometry: a trained stage 1 taught gain, gamma and noise beyond the scanners' range,
# with HC18's frames and head sizes left as they are (docs/experiments.md, row R7).
INTENSITY_FINE_TUNE_AUGMENT = AugmentConfig(gamma_range=(0.5, 1.8), contrast_range=(0.6, 1.4), noise_probability=0.2)
# R5's geometry without its intensity or screenshots: rotations to ±45° and the stretch of frames other than 800 x 540
# (a frame grown around a rotated scan is nearly square), for a longer continued training (docs/experiments.md, row R13).
ROTATION_FINE_TUNE_AUGMENT = AugmentConfig(rotation_deg=45.0, scale_range=(0.8, 1.1), aspect_range=(0.8, 1.25))


def random_affine(image: np.ndarray, points_model_px: np.ndarray, config: AugmentConfig, rng: np.random.Generator):
    """float32 [S, S] image + [4, 2] points -> transformed copies (same space, same size)."""
    size = image.shape[0]
    centre = (size - 1) / 2.0
    angle = rng.uniform(-config.rotation_deg, config.rotation_deg)
    scale = rng.uniform(*config.scale_range)
    matrix = cv2.getRotationMatrix2D((centre, centre), angle, scale)  # 2x3
    aspect = np.exp(rng.uniform(np.log(config.aspect_range[0]), np.log(config.aspect_range[1])))
    if aspect != 1.0:  # stretch x by sqrt(aspect) and y by 1/sqrt(aspect) about the centre, after the rotation
        stretch = np.diag([np.sqrt(aspect), 1 / np.sqrt(aspect)])
        matrix = np.hstack([stretch @ matrix[:, :2], (stretch @ (matrix[:, 2] - centre) + centre)[:, None]])
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


SCREEN_TEXT_CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .:/-%"


def random_screenshot(image: np.ndarray, points_model_px: np.ndarray, rng: np.random.Generator):
    """float32 [S, S] image + [4, 2] points -> the image shrunk into a scanner-screen canvas (same size): a dark
    background, lines of text in the margins and a greyscale bar, as scanner screenshots in archives hold scans."""
    size = image.shape[0]
    scale_xy = rng.uniform(0.55, 0.85, size=2)
    content_w, content_h = max(int(size * scale_xy[0]), 8), max(int(size * scale_xy[1]), 8)
    left, top = int(rng.integers(0, size - content_w + 1)), int(rng.integers(0, size - content_h + 1))
    canvas_uint8 = np.full((size, size), int(rng.integers(0, 31)), np.uint8)  # cv2.putText draws on 8-bit images only
    for _ in range(int(rng.integers(2, 9))):  # text anywhere; the image is pasted over what falls inside it
        text = "".join(rng.choice(list(SCREEN_TEXT_CHARACTERS), size=int(rng.integers(4, 20))))
        origin = (int(rng.integers(0, size - 20)), int(rng.integers(8, size)))
        cv2.putText(canvas_uint8, text, origin, cv2.FONT_HERSHEY_SIMPLEX, float(rng.uniform(0.2, 0.45)), int(rng.integers(150, 256)), 1, cv2.LINE_AA)
    canvas = canvas_uint8.astype(np.float32) / 255
    if rng.random() < 0.7:  # a greyscale bar, white to black, on the left or right
        bar_h, bar_w = int(size * rng.uniform(0.2, 0.4)), int(rng.integers(3, 8))
        bar_x = int(rng.integers(0, max(left - bar_w, 1))) if rng.random() < 0.5 else int(rng.integers(min(left + content_w, size - bar_w), size - bar_w + 1))
        bar_y = int(rng.integers(0, size - bar_h + 1))
        canvas[bar_y:bar_y + bar_h, bar_x:bar_x + bar_w] = np.linspace(1.0, 0.0, bar_h, dtype=np.float32)[:, None]
    canvas[top:top + content_h, left:left + content_w] = cv2.resize(image, (content_w, content_h), interpolation=cv2.INTER_AREA)
    scale = np.array([content_w / size, content_h / size])
    points = (np.asarray(points_model_px, dtype=np.float64) + 0.5) * scale - 0.5 + [left, top]
    return canvas, points


def random_intensity(image: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    gamma = rng.uniform(*config.gamma_range)
    contrast = rng.uniform(*config.contrast_range)
    image = np.clip(image, 0.0, 1.0) ** gamma * contrast
    if rng.random() < config.noise_probability:
        image = image * np.clip(1 + rng.normal(0, rng.uniform(0.1, 0.4), image.shape), 0, None) + rng.normal(0, rng.uniform(0.0, 0.05), image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class AcquisitionAugmentConfig:
    """The refinement stage's augmentation: how archive scans differ from HC18's clean frames. Geometry needs none
    (the polar crop follows the prior ellipse: any orientation, size and pixel spacing look alike there)."""

    flip_probability: float = 0.5  # mirror image (the outline's handedness)
    gamma_range: tuple[float, float] = (0.6, 1.6)
    gain_range: tuple[float, float] = (0.7, 1.3)
    resample_probability: float = 0.2  # down to 0.4-0.9 of the size and back: a coarser scanner or an upscaled export
    jpeg_probability: float = 0.2  # JPEG quality 20-70
    speckle_probability: float = 0.3  # multiplicative speckle, sd 0.1-0.4
    noise_probability: float = 0.3  # additive noise, sd 0.02-0.08


# Gain and gamma as wide as stage 1's fine-tuning ranges (`ROBUST_FINE_TUNE_AUGMENT`): a brighter scan saturates the
# skull's echo and widens it, and the refinement stage is what decides where its outer edge lies (experiments row R8).
WIDE_INTENSITY_ACQUISITION_AUGMENT = AcquisitionAugmentConfig(gamma_range=(0.5, 1.8), gain_range=(0.6, 1.4))


# The names a recipe's `augmentation` (stage 1) and `refinement.augmentation` (stage 2) may take.
AUGMENT_PRESETS = {"standard": AugmentConfig(), "archive": ARCHIVE_AUGMENT, "archive_fine_tune": ARCHIVE_FINE_TUNE_AUGMENT,
                   "robust_fine_tune": ROBUST_FINE_TUNE_AUGMENT, "intensity_fine_tune": INTENSITY_FINE_TUNE_AUGMENT,
                   "rotation_fine_tune": ROTATION_FINE_TUNE_AUGMENT}
REFINEMENT_AUGMENT_PRESETS = {"standard": AcquisitionAugmentConfig(), "wide_intensity": WIDE_INTENSITY_ACQUISITION_AUGMENT}


def degrade_acquisition(pixels: np.ndarray, config: AcquisitionAugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W] original image -> uint8 [H, W]: resolution loss and JPEG artefacts (before the polar crop)."""
    height, width = pixels.shape
    if rng.random() < config.resample_probability:
        factor = rng.uniform(0.4, 0.9)
        small = cv2.resize(pixels, (max(int(width * factor), 2), max(int(height * factor), 2)), interpolation=cv2.INTER_AREA)
        pixels = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    if rng.random() < config.jpeg_probability:
        _, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(20, 71))])
        pixels = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
    return pixels


def degrade_intensity(crop: np.ndarray, config: AcquisitionAugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """float32 crop in [0, 1] -> gain, gamma, speckle and noise changed copy in [0, 1]."""
    crop = np.clip(crop, 0.0, 1.0) ** rng.uniform(*config.gamma_range) * rng.uniform(*config.gain_range)
    if rng.random() < config.speckle_probability:
        crop = crop * np.clip(1 + rng.normal(0, rng.uniform(0.1, 0.4), crop.shape), 0, None)
    if rng.random() < config.noise_probability:
        crop = crop + rng.normal(0, rng.uniform(0.02, 0.08), crop.shape)
    return np.clip(crop, 0.0, 1.0).astype(np.float32)
