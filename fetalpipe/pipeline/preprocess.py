"""Ray Data batch steps shared by training and inference: decode -> resize -> normalise, then (for
training) landmark scaling to model pixels, augmentation and heatmap encoding; for the refinement stage's training,
the original image kept once and, every epoch, a jittered prior ellipse, its polar crop and target.

Batches are dicts of numpy arrays (Ray Data's "numpy" batch format). A file that cannot be decoded
never raises here: its row gets ``status="error"`` and the reason in ``error``."""

from __future__ import annotations

import hashlib

import numpy as np

from fetalpipe import LANDMARK_COLUMNS
from fetalpipe.data.augment import AcquisitionAugmentConfig, AugmentConfig, degrade_acquisition, degrade_intensity, random_affine, random_intensity, random_screenshot
from fetalpipe.data.imaging import ImageDecodeError, ResizeTransform, clamp_brightness, decode_image, has_black_margins, read_bytes, resize_to_model, scan_region
from fetalpipe.data.manifest import STAGE1_PRIOR_COLUMNS
from fetalpipe.measure import ellipse as ellipse_geometry
from fetalpipe.model.heatmaps import HeatmapCodec
from fetalpipe.model.polar import PolarCodec, jitter


def stage1_input(pixels: np.ndarray, input_size: int) -> tuple[np.ndarray, ResizeTransform, tuple[int, int, int, int]]:
    """What stage 1 sees of a decoded (and brightness-clamped) [H, W] frame: the model input, its transform, and the
    scan's region inside black margins (the whole frame where there is none), which stage 1 must confirm
    (`LandmarkPredictor.locate`). A scan inside margins of another colour is cropped to at once."""
    candidate = scan_region(pixels, black_margins=True)
    image, transform = resize_to_model(pixels, input_size, None if has_black_margins(pixels) else candidate)
    return image, transform, candidate


def decode_batch(batch: dict[str, np.ndarray], input_size: int, keep_original: bool = False) -> dict[str, np.ndarray]:
    """Add ``image`` (float32 [B, S, S] in [0, 1], after `imaging.clamp_brightness`), original size, ``scan_region`` (int64 [B, 4]: the
    (left, top, width, height) in original pixels that ``image`` stretches, `imaging.scan_region`), ``scan_candidate`` (the same
    for the scan inside black margins, which stage 1 must confirm: `LandmarkPredictor.locate`), file hash, status and error. With `keep_original`
    also ``original_pixels``: each image at its stored size, float32 [H, W] (what the refinement stage crops)."""
    count = len(batch["image_path"])
    images = np.zeros((count, input_size, input_size), dtype=np.float32)
    widths = np.zeros(count, dtype=np.int64)
    heights = np.zeros(count, dtype=np.int64)
    regions = np.zeros((count, 4), dtype=np.int64)
    candidates = np.zeros((count, 4), dtype=np.int64)
    hashes = np.empty(count, dtype=object)
    statuses = np.empty(count, dtype=object)
    errors = np.empty(count, dtype=object)
    spacing = np.asarray(batch.get("pixel_spacing_mm", np.full(count, np.nan)), dtype=np.float64).copy()
    originals = np.empty(count, dtype=object)
    for index, path in enumerate(batch["image_path"]):
        hashes[index], statuses[index], errors[index] = "", "ok", ""
        try:
            data = read_bytes(str(path))
            hashes[index] = hashlib.sha256(data).hexdigest()
            decoded = decode_image(data)
            pixels = clamp_brightness(decoded.pixels)
            images[index], transform, candidates[index] = stage1_input(pixels, input_size)
            if keep_original:
                originals[index] = pixels
            widths[index], heights[index] = transform.original_width, transform.original_height
            regions[index] = transform.region_box
            if np.isnan(spacing[index]) and decoded.pixel_spacing_mm is not None:
                spacing[index] = decoded.pixel_spacing_mm
        except ImageDecodeError as error:
            statuses[index], errors[index] = "error", str(error)
        except Exception as error:  # never let one file kill the job; keep the reason
            statuses[index], errors[index] = "error", f"{type(error).__name__}: {error}"
    kept = {"original_pixels": originals} if keep_original else {}
    return {
        **batch,
        **kept,
        "image": images,
        "original_width": widths,
        "original_height": heights,
        "scan_region": regions,
        "scan_candidate": candidates,
        "file_sha256": hashes,
        "pixel_spacing_mm": spacing,
        "status": statuses,
        "error": errors,
    }


def decoded_chunks(batch: dict[str, np.ndarray], input_size: int, keep_original: bool, max_decoded_bytes: int):
    """`decode_batch` of the batch, yielded as sub-batches of consecutive rows that each hold at most `max_decoded_bytes` of
    decoded pixels (model inputs and originals; at least one row), so that what an actor holds at once does not grow with the
    frames' size: 64 full-HD screenshots are 0.6 GiB of float32 originals, 64 4K frames 2 GiB (`bench/memory_bench.py`)."""
    held_rows, held_bytes = [], 0
    for index in range(len(batch["image_path"])):
        row = decode_batch({key: value[index:index + 1] for key, value in batch.items()}, input_size, keep_original)
        row_bytes = row["image"].nbytes + sum(pixels.nbytes for pixels in row.get("original_pixels", ()) if pixels is not None)
        if held_rows and held_bytes + row_bytes > max_decoded_bytes:
            yield concatenate_rows(held_rows)
            held_rows, held_bytes = [], 0
        held_rows.append(row)
        held_bytes += row_bytes
    if held_rows:
        yield concatenate_rows(held_rows)


def concatenate_rows(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batches with the same keys, one after the other."""
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


def rows_with_status(batch: dict[str, np.ndarray], ok: bool) -> dict[str, np.ndarray]:
    """The rows that decoded (`ok`) or the ones that did not. Here, not in `pipeline.train`, which imports torch: a Ray
    Data task that runs this imports only this module (torch's import took 3 s a worker, twice per training stage)."""
    keep = (batch["status"] == "ok") == ok
    return {key: value[keep] for key, value in batch.items()}


def transforms_of(batch: dict[str, np.ndarray], input_size: int) -> list[ResizeTransform]:
    """Each row's transform, from the size and scan region `decode_batch` recorded."""
    return [
        ResizeTransform.for_image(int(width), int(height), input_size, region)
        for width, height, region in zip(batch["original_width"], batch["original_height"], batch["scan_region"])
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
            if rng.random() < augment.screenshot_probability:
                images[index], points[index] = random_screenshot(images[index], points[index], rng)
            images[index], points[index] = random_affine(images[index], points[index], augment, rng)
            images[index] = random_intensity(images[index], augment, rng)
    output = {
        "image": images[:, None],
        "heatmaps": codec.encode(points) if len(points) else np.zeros((0, *codec.target_shape), np.float32),  # or coordinates
    }
    for key in ("points_original", "original_width", "original_height", "scan_region", "pixel_spacing_mm", "hc_mm"):
        if key in batch:
            output[key] = np.asarray(batch[key])
    return output


def decode_original_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """For the refinement stage's training: each image decoded once and kept at its original size, as uint8 bytes plus
    its height and width (a fixed-type column whatever the image sizes), with ``status`` and ``error`` as in `decode_batch`."""
    count = len(batch["image_path"])
    pixels = np.empty(count, dtype=object)
    heights, widths = np.zeros(count, dtype=np.int64), np.zeros(count, dtype=np.int64)
    statuses, errors = np.full(count, "ok", dtype=object), np.full(count, "", dtype=object)
    for index, path in enumerate(batch["image_path"]):
        pixels[index] = b""
        try:
            decoded = clamp_brightness(decode_image(read_bytes(str(path))).pixels)
            heights[index], widths[index] = decoded.shape
            pixels[index] = np.round(decoded * 255).astype(np.uint8).tobytes()
        except ImageDecodeError as error:
            statuses[index], errors[index] = "error", str(error)
        except Exception as error:
            statuses[index], errors[index] = "error", f"{type(error).__name__}: {error}"
    return {**batch, "original_pixels": pixels, "original_height": heights, "original_width": widths, "status": statuses, "error": errors}


# A stored stage-1 prior is moved this much (`polar.jitter`'s scale) each time it is used, so that its crops differ by epoch.
STORED_PRIOR_JITTER_SCALE = 0.25


def encode_polar_batch(batch: dict[str, np.ndarray], codec: PolarCodec, augment: AcquisitionAugmentConfig | None, jitter_scale: float,
                       seed: int | None = None, axis_jitter_scale: float = 1.0, stage1_prior_share: float = 0.0) -> dict[str, np.ndarray]:
    """Refinement training pairs: around each reference ellipse a jittered prior (as wrong as stage 1 can be), the
    polar crop of the original image about it, and the target. ``image`` float32 [B, 1, rows, columns],
    ``target`` float32 [B, rows, columns]; ``prior`` and ``reference`` [B, 5] ellipses in original pixels.
    `seed` fixes the jitter per row (validation sees the same priors every epoch). With `stage1_prior_share` > 0, that
    share of the rows that have a stored stage-1 prior (``stage1_prior_*`` columns, original pixels) are cropped
    around it instead: stage 1's own errors, which are not random but sit where the image misleads."""
    count = len(batch["image_path"])
    stored_priors_px = (np.stack([np.asarray(batch[column], dtype=np.float64) for column in STAGE1_PRIOR_COLUMNS], axis=1).reshape(count, 4, 2)
                        if stage1_prior_share > 0 else np.full((count, 4, 2), np.nan))
    rows, columns = codec.input_shape
    images = np.zeros((count, 1, rows, columns), np.float32)
    targets = np.zeros((count, rows, columns), np.float32)
    priors, references = np.zeros((count, 5)), np.zeros((count, 5))
    for index in range(count):
        rng = np.random.default_rng(None if seed is None else [seed, int(hashlib.sha256(str(batch["image_path"][index]).encode()).hexdigest()[:8], 16)])
        height, width = int(batch["original_height"][index]), int(batch["original_width"][index])
        pixels = np.frombuffer(batch["original_pixels"][index], dtype=np.uint8).reshape(height, width)
        points = np.array([batch[column][index] for column in LANDMARK_COLUMNS], dtype=np.float64).reshape(4, 2)
        stored_prior_px = stored_priors_px[index]
        if augment is not None:
            if rng.random() < augment.flip_probability:
                pixels, points = pixels[:, ::-1], points * [-1, 1] + [width - 1, 0]
                stored_prior_px = stored_prior_px * [-1, 1] + [width - 1, 0]
            pixels = degrade_acquisition(np.ascontiguousarray(pixels), augment, rng)
        references[index] = ellipse_geometry.from_endpoints(points)
        if stage1_prior_share > 0 and np.isfinite(stored_prior_px).all() and rng.random() < stage1_prior_share:
            priors[index] = jitter(ellipse_geometry.from_endpoints(stored_prior_px), rng, STORED_PRIOR_JITTER_SCALE)
        else:
            priors[index] = jitter(references[index], rng, jitter_scale, axis_jitter_scale)
        crop = codec.crop(pixels, priors[index])
        images[index, 0] = degrade_intensity(crop, augment, rng) if augment is not None else crop
        targets[index] = codec.encode(priors[index], references[index])
    output = {"image": images, "target": targets, "prior": priors, "reference": references}
    for key in ("pixel_spacing_mm", "hc_mm"):
        if key in batch:
            output[key] = np.asarray(batch[key])
    return output
