"""Ray Data batch steps shared by training and inference: decode -> resize -> normalise, then (for
training) landmark scaling to model pixels, augmentation and heatmap encoding.

Batches are dicts of numpy arrays (Ray Data's "numpy" batch format). A file that cannot be decoded
never raises here: its row gets ``status="error"`` and the reason in ``error``."""

from __future__ import annotations

import hashlib

import numpy as np

from fetalpipe import LANDMARK_COLUMNS
from fetalpipe.augment import AugmentConfig, random_affine, random_intensity
from fetalpipe.heatmaps import HeatmapCodec
from fetalpipe.imaging import ImageDecodeError, ResizeTransform, decode_image, read_bytes, resize_to_model


def decode_batch(batch: dict[str, np.ndarray], input_size: int) -> dict[str, np.ndarray]:
    """Add ``image`` (float32 [B, S, S] in [0, 1]), original size, file hash, status and error."""
    count = len(batch["image_path"])
    images = np.zeros((count, input_size, input_size), dtype=np.float32)
    widths = np.zeros(count, dtype=np.int64)
    heights = np.zeros(count, dtype=np.int64)
    hashes = np.empty(count, dtype=object)
    statuses = np.empty(count, dtype=object)
    errors = np.empty(count, dtype=object)
    spacing = np.asarray(batch.get("pixel_spacing_mm", np.full(count, np.nan)), dtype=np.float64).copy()
    for index, path in enumerate(batch["image_path"]):
        hashes[index], statuses[index], errors[index] = "", "ok", ""
        try:
            data = read_bytes(str(path))
            hashes[index] = hashlib.sha256(data).hexdigest()
            decoded = decode_image(data)
            images[index], transform = resize_to_model(decoded.pixels, input_size)
            widths[index], heights[index] = transform.original_width, transform.original_height
            if np.isnan(spacing[index]) and decoded.pixel_spacing_mm is not None:
                spacing[index] = decoded.pixel_spacing_mm
        except ImageDecodeError as error:
            statuses[index], errors[index] = "error", str(error)
        except Exception as error:  # never let one file kill the job; keep the reason
            statuses[index], errors[index] = "error", f"{type(error).__name__}: {error}"
    return {
        **batch,
        "image": images,
        "original_width": widths,
        "original_height": heights,
        "file_sha256": hashes,
        "pixel_spacing_mm": spacing,
        "status": statuses,
        "error": errors,
    }


def transforms_of(batch: dict[str, np.ndarray], input_size: int) -> list[ResizeTransform]:
    return [
        ResizeTransform(int(width), int(height), input_size)
        for width, height in zip(batch["original_width"], batch["original_height"])
    ]


def scale_landmarks_batch(batch: dict[str, np.ndarray], input_size: int) -> dict[str, np.ndarray]:
    """Add ``points_model`` [B, 4, 2] (model pixels) and ``points_original`` [B, 4, 2] (original pixels)."""
    points_original = np.stack([np.asarray(batch[column], dtype=np.float64) for column in LANDMARK_COLUMNS], axis=1).reshape(-1, 4, 2)
    points_model = np.stack([transform.to_model(points) for transform, points in zip(transforms_of(batch, input_size), points_original)]) if len(points_original) else points_original
    return {**batch, "points_original": points_original.astype(np.float32), "points_model": points_model.astype(np.float32)}


def encode_batch(batch: dict[str, np.ndarray], codec: HeatmapCodec, augment: AugmentConfig | None, seed: int | None = None) -> dict[str, np.ndarray]:
    """Model-ready tensors: ``image`` float32 [B, 1, S, S] and ``heatmaps`` float32 [B, maps, H, H].

    With `augment`, image and landmarks go through one random affine + intensity change first."""
    rng = np.random.default_rng(seed)
    images = np.asarray(batch["image"], dtype=np.float32)
    points = np.asarray(batch["points_model"], dtype=np.float64)
    if augment is not None:
        images = images.copy()
        points = points.copy()
        for index in range(len(images)):
            images[index], points[index] = random_affine(images[index], points[index], augment, rng)
            images[index] = random_intensity(images[index], augment, rng)
    output = {
        "image": images[:, None],
        "heatmaps": codec.encode(points) if len(points) else np.zeros((0, *codec.target_shape), np.float32),  # or coordinates
    }
    for key in ("points_original", "original_width", "original_height", "pixel_spacing_mm", "hc_mm"):
        if key in batch:
            output[key] = np.asarray(batch[key])
    return output
