"""Batch inference: Ray Data streams the manifest, decodes, runs the model in an actor pool, and the
actors write landmarks + biometry to Parquet (a file per batch, as each batch is done) and the driver
one CSV at the end.

Contract: every input row appears exactly once in OUT/predictions/ and OUT/predictions.csv, as
``status="ok"`` or ``status="error"`` with the reason. A rerun on the same OUT processes only rows
whose (image path, file content hash, model hash, precision) are not done yet; ``overwrite`` redoes all."""

from __future__ import annotations

import datetime
import functools
import glob
import json
import os
import platform
import re
import stat
import sys
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from fetalpipe import LANDMARK_COLUMNS, __version__
from fetalpipe.data.imaging import ResizeTransform
from fetalpipe.measure.biometry import biometry_mm, biometry_px, canonical_order
from fetalpipe.measure.review import LENGTH_SIGNALS
from fetalpipe.measure.clinical import clinical_columns
from fetalpipe.pipeline.predictions import (NO_SPACING_CONSEQUENCE, NUMERIC_MANIFEST_COLUMNS, OUTPUT_COLUMNS, RESUME_COLUMNS, REVIEW_SIGNAL_COLUMNS, compact_if_needed,
                                            newest_per_image, read_predictions, write_batch)
from fetalpipe.runtime import console, storage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
# Share of a CPU each stage asks Ray for: the model takes most of the time, decoding the rest.
DECODE_CPUS = 0.25
MODEL_CPU_SHARE = 0.75
# Images per forward pass inside a Ray batch (`bench/forward_batch_bench.py`, 1 thread). Stage 1 at 8: its activations
# stay in cache; in int8 it is within 0.1-0.9 ms of 16 (13-15 ms an image) and 1-2 ms faster than 32 or 64, in fp32 the
# fastest (21-25 ms, against 27-30 at 16 and 31-33 at 64). The refinement stage's small polar crops at 32 (int8 2.4-2.8
# ms, against 2.8-3.5 at 8). The Ray batch stays large, which keeps per-task and per-file overhead low.
FORWARD_BATCH = 8
REFINEMENT_FORWARD_BATCH = 32
# Decoded pixels an actor that decodes its own batch holds at once (`preprocess.decoded_chunks`): a batch of HC18 frames
# (2 MB each as float32, with the model input) is one part; one of full-HD screenshots (10 MB each) parts of about 25 rows.
MAX_DECODED_BYTES = 256 * 2**20


class ActorStartError(RuntimeError):
    """The model actors failed in their constructor (a model file whose weights do not fit, a node without torch):
    no batch can run, so the job stops with the actors' own reason instead of Ray's traceback."""


@dataclass
class InferOptions:
    output_dir: str
    manifest: str | None = None
    input_glob: str | None = None
    model_path: str | None = None
    batch_size: int = 64  # per model call and per Parquet file (bigger: less per-task overhead; smaller: less redone after a crash)
    actors: int = 2
    threads_per_actor: int = 1
    overlays: bool = False
    overwrite: bool = False
    ray_address: str | None = None
    flip_average: bool = False  # test-time augmentation: average with the horizontally flipped image
    # "actors": each model actor decodes its own batch (no hand-off between processes; best when CPUs are few).
    # "tasks": decoding runs in separate Ray tasks (best when decoding is heavy, e.g. large DICOMs). Each decoded frame is
    # then held in the task, the object store and the actor: about twice the memory with large frames (`bench/memory_bench.py`).
    decode_in: str = "actors"
    # "auto": int8 when the model file holds int8 quantization parameters (written by `fetalpipe calibrate`), else fp32.
    precision: str = "auto"
    verbose: bool = False  # Ray's own logs on the console instead of OUT/logs/ray.log
    report: bool = True  # write OUT/report.html at the end
    print_summary: bool = True  # False: the caller prints it (`print_summary`) after its own lines
    dry_run: bool = False  # plan only: validate, check what is done, list the errors already visible; start nothing, write nothing


def collect_inputs(manifest: str | None, input_glob: str | None) -> pd.DataFrame:
    """The input table: a validated manifest, or every image file under a folder / matching a glob."""
    from fetalpipe.data.manifest import ManifestError, load_manifest

    if manifest:
        table = load_manifest(manifest)
        landmark_like = [c for c in table.columns if c in LANDMARK_COLUMNS or (c in OUTPUT_COLUMNS and c not in ("image_path", "pixel_spacing_mm"))]
        return table.rename(columns={c: f"manifest_{c}" for c in landmark_like})
    if storage.is_uri(input_glob):  # a folder (prefix) of an object store; no wildcards there
        import pyarrow.fs

        fs, prefix = storage.filesystem(input_glob)
        scheme = input_glob.split("://", 1)[0]
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(prefix, recursive=True))
        except OSError as error:
            raise ManifestError(f"--input {input_glob}: cannot list it: {error}") from error
        paths = [f"{scheme}://{info.path}" for info in infos if info.type == pyarrow.fs.FileType.File and info.path.lower().endswith(IMAGE_EXTENSIONS)]
    elif os.path.isdir(input_glob):
        paths = [os.path.abspath(os.path.join(root, name)) for root, _, names in os.walk(input_glob) for name in names if name.lower().endswith(IMAGE_EXTENSIONS)]
    else:
        paths = [os.path.abspath(p) for p in glob.glob(input_glob, recursive=True)]
    if not paths:
        raise ManifestError(f"--input {input_glob}: no image files found")
    return pd.DataFrame({"image_path": sorted(paths)})


def content_hash(path: str) -> str:
    """sha256 of the file bytes ('' when it cannot be read), the key that detects a changed file."""
    import hashlib

    try:
        return hashlib.sha256(storage.read_bytes(path)).hexdigest()
    except OSError:
        return ""


def file_stats(paths) -> tuple[np.ndarray, np.ndarray]:
    """(size in bytes, modification time in ns) per path, -1 where it is not a readable file: one stat each (one call
    for all object-store paths), so a rerun tells unchanged files from changed ones without reading them."""
    import pyarrow.fs

    paths = list(paths)
    sizes, mtimes = np.full(len(paths), -1, dtype=np.int64), np.full(len(paths), -1, dtype=np.int64)
    remote = []
    for index, path in enumerate(paths):
        if storage.is_uri(path):
            remote.append(index)
            continue
        try:
            status = os.stat(path)
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(status.st_mode):
            sizes[index], mtimes[index] = status.st_size, status.st_mtime_ns
    if remote:
        fs, _ = storage.filesystem(paths[remote[0]])
        try:
            infos = fs.get_file_info([storage.filesystem(paths[index])[1] for index in remote])
        except OSError:
            infos = []
        for index, info in zip(remote, infos):
            if info.type == pyarrow.fs.FileType.File:
                sizes[index], mtimes[index] = info.size, info.mtime_ns or 0
    return sizes, mtimes


def plan(inputs: pd.DataFrame, done: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(the rows to process, with their file size and time; how many of them cannot be read already). A row is done
    when the output holds it for this model and precision and its file is unchanged: same size and time, or, where
    those differ (a copy, a touch) or were not recorded, the same sha256."""
    sizes, mtimes = file_stats(inputs["image_path"])
    table = inputs.assign(file_size_bytes=sizes, file_mtime_ns=mtimes)
    if len(done):
        stored = done.reindex(columns=["image_path", "file_sha256", "file_size_bytes", "file_mtime_ns"]).rename(
            columns={"file_sha256": "_sha256", "file_size_bytes": "_size", "file_mtime_ns": "_mtime"})
        table = table.merge(stored, on="image_path", how="left")
        # -1 == -1: a file missing then and now keeps its error row (a rerun does not retry what cannot have changed).
        is_done = table["_sha256"].notna() & (table["_size"] == table["file_size_bytes"]) & (table["_mtime"] == table["file_mtime_ns"])
        recheck = table["_sha256"].notna() & ~is_done
        for index in np.flatnonzero(recheck.to_numpy()):
            is_done.iloc[index] = content_hash(table["image_path"].iloc[index]) == table["_sha256"].iloc[index]
        table = table[~is_done.to_numpy()].drop(columns=["_sha256", "_size", "_mtime"])
    table = table.reset_index(drop=True)
    return table, int((table["file_size_bytes"] < 0).sum())


PRECISIONS = ("auto", "int8", "fp32")


def resolve_precision(requested: str, model_header: dict) -> str:
    """"auto" -> "int8" when the model file has int8 quantization parameters, else "fp32". Decided once, in the driver,
    so that every actor runs the same arithmetic and a rerun can tell which rows were made another way."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    has_quantization = bool(model_header.get("int8_quantization"))
    if requested == "int8" and not has_quantization:
        raise ValueError("this model file has no int8 quantization parameters: run `fetalpipe calibrate` on it, or use --precision fp32")
    return "fp32" if requested == "fp32" or not has_quantization else "int8"


def inference_network(model, precision: str, quantization: dict | None, input_shape):
    """One stage's network ready for `model.to_model_input(...)` batches: int8 from its stored parameters when `precision`
    is "int8" and the file has them for it, else fp32 with BatchNorm folded."""
    from fetalpipe.model.networks import prepare_for_inference
    from fetalpipe.model.quantize import to_int8

    return to_int8(model, quantization, input_shape) if precision == "int8" and quantization else prepare_for_inference(model)


def load_inference_model(model_path: str, precision: str):
    """(stage 1 ready for `model.to_model_input(...)` batches, TrainConfig, payload) in "int8" or "fp32" (resolved)."""
    from fetalpipe.model.model_file import load_model

    model, config, payload = load_model(model_path)
    return inference_network(model, precision, payload.get("int8_quantization"), config.input_size), config, payload


# The signals the actors compute per frame: the output's review signals, and the length signals as fractions of the head
# that the rule for rows without a pixel spacing reads (`review.ReviewRules`; not output columns).
SIGNAL_KEYS = (*REVIEW_SIGNAL_COLUMNS, *(name.replace("_mm", "_fraction") for name in LENGTH_SIGNALS))


def has_spacing(pixel_spacing_mm) -> np.ndarray:
    """Which rows have a pixel spacing: those are scored by the review rule in mm."""
    return np.isfinite(np.asarray(pixel_spacing_mm, dtype=np.float64))


# A frame measured again upright keeps that measurement unless stage 1's confidence there is lower by more than this: on
# the speckle variant one frame turned upright was outlined at half its size, confidence 0.90 -> 0.58 (docs/experiments.md).
UPRIGHT_CONFIDENCE_SLACK = 0.05


class LandmarkPredictor:
    """Actor: loads the model once, then turns decoded batches into landmark + biometry rows.

    With `predictions_dir` it also writes each batch's rows to one Parquet file there and returns only
    the row count: a separate Ray Data write stage cost more CPU (task start-up, ~1 s a file) than the
    write itself (milliseconds), on machines where every core is already running a model."""

    def __init__(self, model_path: str, threads: int, flip_average: bool = False, predictions_dir: str | None = None, overlay_dir: str | None = None,
                 precision: str = "fp32", max_decoded_bytes: int = MAX_DECODED_BYTES):
        import torch

        from fetalpipe.measure.calibration import SizeCalibration
        from fetalpipe.measure.review import ReviewRules
        from fetalpipe.model.model_file import file_sha256, load_refinement_model
        from fetalpipe.model.quantize import Int8Upsample2x

        torch.set_num_threads(threads)
        model_path = storage.local_copy(model_path)  # an object-store model: downloaded once per node
        self.model, self.config, payload = load_inference_model(model_path, precision)
        self.precision = precision
        self.calibration = SizeCalibration.from_dict(payload.get("calibration"))
        self.review_rules = ReviewRules.from_payload(payload)
        self.codec = self.config.codec()
        refinement = load_refinement_model(self.config, payload, model_path)
        self.polar_codec = self.config.refinement.codec() if refinement is not None else None
        self.refinement = None if refinement is None else inference_network(
            refinement, precision, payload.get("refinement_int8_quantization"), self.polar_codec.input_shape)
        # Which int8 build this node made follows its CPU (`quantize.int8_upsampling_pays`): rows say which measured them.
        self.int8_upsampling = any(isinstance(module, Int8Upsample2x) for network in (self.model, self.refinement)
                                   if network is not None for module in network.modules())
        self.model_sha256 = file_sha256(model_path)
        self.flip_average = flip_average
        self.predictions_dir = predictions_dir
        self.overlay_dir = overlay_dir
        self.max_decoded_bytes = max_decoded_bytes

    def predict_heatmaps(self, images: np.ndarray) -> np.ndarray:
        import torch

        from fetalpipe.model.networks import to_model_input

        outputs = []
        with torch.inference_mode():
            for start in range(0, len(images), FORWARD_BATCH):
                tensor = to_model_input(images[start:start + FORWARD_BATCH])
                heatmaps = self.model(tensor)
                if self.flip_average:
                    heatmaps = (heatmaps + torch.flip(self.model(torch.flip(tensor, dims=[3])), dims=[3])) / 2
                outputs.append(heatmaps.float().numpy())
        return np.concatenate(outputs)

    def locate(self, images: np.ndarray, transforms: list[ResizeTransform], originals=None, candidates=None) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1: [N >= 1] model-input images and the transforms that made them (`preprocess.transforms_of`) -> ([N, 4, 2]
        endpoints in original pixels (NaN: no head found), [N] map confidence). With the ORIGINALS (float32 [H, W]):
        a frame cropped to its scan whose head runs off the crop is measured again whole; and a frame measured whole
        that has a scan CANDIDATE inside black margins ([N, 4], `preprocess.decode_batch`'s ``scan_candidate``) is
        measured again on that crop where the whole frame's head lies inside it, and keeps the crop's answer where that
        head does too. Inside black margins the crop may be a dark scan's edge: only a head found inside it twice
        confirms it."""
        from fetalpipe.data.imaging import resize_to_model

        points_original, confidence = self._locate(images, transforms)
        if originals is None:
            return points_original, confidence

        def inside(points: np.ndarray, transform: ResizeTransform) -> bool:
            return bool(np.isfinite(points).all()) and transform.outline_share_off_region(points) == 0

        redo = [index for index, transform in enumerate(transforms) if transform.is_cropped and not inside(points_original[index], transform)]
        if redo:
            whole_images, whole_transforms = zip(*(resize_to_model(originals[index], self.codec.input_size) for index in redo))
            points_original[redo], confidence[redo] = self._locate(np.stack(whole_images), list(whole_transforms))
        if candidates is None:
            return points_original, confidence
        candidate_transforms = [ResizeTransform.for_image(t.original_width, t.original_height, t.input_size, candidate) for t, candidate in zip(transforms, candidates)]
        tries = [index for index, (transform, candidate) in enumerate(zip(transforms, candidate_transforms))
                 if not transform.is_cropped and candidate.is_cropped and inside(points_original[index], candidate)]
        if tries:
            cropped_images = np.stack([resize_to_model(originals[index], self.codec.input_size, candidate_transforms[index].region_box)[0] for index in tries])
            cropped_points, cropped_confidence = self._locate(cropped_images, [candidate_transforms[index] for index in tries])
            for row, index in enumerate(tries):
                if inside(cropped_points[row], candidate_transforms[index]):
                    points_original[index], confidence[index] = cropped_points[row], cropped_confidence[row]
        return points_original, confidence

    def _locate(self, images: np.ndarray, transforms: list[ResizeTransform]) -> tuple[np.ndarray, np.ndarray]:
        frame_sizes = np.array([transform.frame_size for transform in transforms])  # the decoder fits in the stretched frame's geometry
        points_model, peak_values = self.codec.decode(self.predict_heatmaps(images), frame_sizes)
        return np.stack([transform.to_original(points) for transform, points in zip(transforms, points_model)]), peak_values.mean(axis=1)

    def refine(self, originals: np.ndarray, stage1_points_px: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Stage 2: [N >= 1] original images (float32 [H, W] in [0, 1]) and stage 1's [N, 4, 2] endpoints (original pixels) -> refined endpoints
        (original pixels) and the review flag's signals, in original pixels: how far stage 2 moved the perimeter,
        how far its ray points lie from the ellipse fitted to them (RMS), and how spread its rays' softmaxes are."""
        import torch

        from fetalpipe.measure import ellipse as ellipse_geometry
        from fetalpipe.model.networks import to_model_input

        priors = ellipse_geometry.from_endpoints(stage1_points_px)
        crops = np.stack([self.polar_codec.crop(pixels, prior) for pixels, prior in zip(originals, priors)])
        logits = []
        with torch.inference_mode():
            for start in range(0, len(crops), REFINEMENT_FORWARD_BATCH):
                logits.append(self.refinement(to_model_input(crops[start:start + REFINEMENT_FORWARD_BATCH]))[:, 0].float().numpy())
        refined, diagnostics = self.polar_codec.decode(np.concatenate(logits), priors)
        signals_px = {
            "stage_disagreement": np.abs(ellipse_geometry.perimeter(refined) - ellipse_geometry.perimeter(priors)),
            "outline_fit_residual": diagnostics["fit_residual"] * (refined[:, 2] + refined[:, 3]) / 2,
            "outline_spread": diagnostics["radial_spread_px"],
        }
        return ellipse_geometry.to_endpoints(refined), signals_px

    def review(self, signals: dict[str, np.ndarray], confidence: np.ndarray, status: np.ndarray, pixel_spacing_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(needs_review, review_reason) by the model file's rules (`review.ReviewRules`: a row without a pixel spacing by the
        rule without one); error rows and models without a rule: False, ''."""
        count = len(confidence)
        if self.review_rules is None:
            return np.zeros(count, dtype=bool), np.full(count, "", dtype=object)
        needs_review, reasons = self.review_rules.apply(pd.DataFrame({**signals, "confidence": confidence}), has_spacing(pixel_spacing_mm))
        is_ok = np.asarray(status) == "ok"
        return needs_review & is_ok, np.where(is_ok, reasons, "").astype(object)

    def measure(self, images: np.ndarray, transforms: list[ResizeTransform], originals, candidates, pixel_spacing_mm: np.ndarray):
        """Both stages, the size line and the review signals for decoded frames (`locate`'s arguments, and each frame's pixel
        spacing) -> ([N, 4, 2] endpoints in original pixels (NaN: no head), [N] confidence, [N] size-line scale, {signal: [N]})."""
        count = len(images)
        signals = {name: np.full(count, np.nan) for name in SIGNAL_KEYS}
        points_original, confidence = self.locate(images, transforms, originals, candidates)
        found = np.flatnonzero(np.isfinite(points_original).all(axis=(1, 2)))
        if self.refinement is not None and len(found):
            points_original[found], signals_px = self.refine(originals[found], points_original[found])
            hc_px = biometry_px(points_original[found])["hc_ellipse_px"]  # stage 2's HC, before the size line
            for name, values_px in signals_px.items():  # in mm: a 5 mm error is 2 % of a late head and 5 % of an early one
                signals[f"{name}_mm"][found] = values_px * pixel_spacing_mm[found]
                signals[f"{name}_fraction"][found] = values_px / hc_px  # what the rule for rows without a spacing reads
        calibration_scale = np.ones(count)  # 1: not calibrated (no calibration in the model, or no spacing)
        if self.calibration is not None:
            points_original, calibration_scale = self.calibration.apply(points_original, pixel_spacing_mm)
        sizes = np.array([(transform.original_width, transform.original_height) for transform in transforms]).reshape(-1, 2)
        signals.update(plausibility_signals(points_original, sizes[:, 0], sizes[:, 1]))
        return points_original, confidence, calibration_scale, signals

    def measure_frames(self, frames, pixel_spacing_mm: np.ndarray):
        """`measure` for [H, W] float frames not yet decoded for stage 1 (a frame turned upright, or brightened)."""
        from fetalpipe.pipeline.preprocess import stage1_input

        originals = np.empty(len(frames), dtype=object)
        originals[:] = list(frames)
        images, transforms, candidates = zip(*(stage1_input(pixels, self.codec.input_size) for pixels in originals))
        return self.measure(np.stack(images), list(transforms), originals, np.array(candidates), pixel_spacing_mm)

    def measure_tilted_frames_upright(self, batch: dict[str, np.ndarray], points_original: np.ndarray, confidence: np.ndarray,
                                      calibration_scale: np.ndarray, signals: dict[str, np.ndarray]) -> list[int]:
        """A frame whose measurement the review rule flags, and whose scan is tilted (turned with its frame by a scanner
        or an export tool: `imaging.upright_turn`), is measured again turned upright (stage 1 was trained on upright
        frames). Where stage 1 is about as sure of the head upright (`UPRIGHT_CONFIDENCE_SLACK`), that measurement, its
        points mapped back to the frame's original pixels, replaces the first (in place). Returns the frames replaced."""
        from fetalpipe.data.imaging import upright_turn

        if self.review_rules is None:
            return []
        flagged = self.review_rules.margin(pd.DataFrame({**signals, "confidence": confidence}), has_spacing(batch["pixel_spacing_mm"])) > 0
        retry, turns = [], []
        for index in np.flatnonzero(flagged & np.isfinite(points_original).all(axis=(1, 2))):
            turn = upright_turn(batch["original_pixels"][index])
            if turn is not None:
                retry.append(index)
                turns.append(turn)
        if not retry:
            return []
        uprights = [turn.apply(batch["original_pixels"][index]) for turn, index in zip(turns, retry)]
        points_upright, confidence_upright, scale_upright, signals_upright = self.measure_frames(uprights, batch["pixel_spacing_mm"][retry])
        replaced = []
        for row, (index, turn) in enumerate(zip(retry, turns)):
            if not np.isfinite(points_upright[row]).all() or confidence_upright[row] < confidence[index] - UPRIGHT_CONFIDENCE_SLACK:
                continue  # no head upright, or one stage 1 is less sure of: the first measurement stands
            points_original[index] = canonical_order(turn.to_original(points_upright[row]))
            confidence[index], calibration_scale[index] = confidence_upright[row], scale_upright[row]
            for name, values in signals_upright.items():
                signals[name][index] = values[row]
            replaced.append(index)
        width, height = batch["original_width"][retry], batch["original_height"][retry]
        for name, values in plausibility_signals(points_original[retry], width, height).items():  # the frame's, not the upright one's
            signals[name][retry] = values
        return replaced

    def measure_dark_frames_brightened(self, batch: dict[str, np.ndarray], points_original: np.ndarray, confidence: np.ndarray,
                                       calibration_scale: np.ndarray, signals: dict[str, np.ndarray], skip: list[int]) -> list[int]:
        """A frame that the review rule still flags, and whose scan (inside a screenshot's frame: `scan_region`) is darker
        than three quarters of the training split (`imaging.TRAINING_LOWER_QUARTILE_CONTENT_MEDIAN`: a low gain, or a dark
        export), is measured again brightened to that level (`imaging.clamp_brightness`). That measurement replaces the
        first (in place) where stage 1 is at least as sure of the head and the review score is lower: kept on either
        alone, or for every frame that dark, it cost the clean images (docs/experiments.md, robustness). `skip`: frames
        measured upright, left as they are. Returns the frames replaced."""
        from fetalpipe.data.imaging import TRAINING_LOWER_QUARTILE_CONTENT_MEDIAN, clamp_brightness, content_median, region_pixels

        if self.review_rules is None:
            return []
        spaced = has_spacing(batch["pixel_spacing_mm"])
        score_before = self.review_rules.margin(pd.DataFrame({**signals, "confidence": confidence}), spaced)  # > 0: flagged
        flagged = (score_before > 0) & np.isfinite(points_original).all(axis=(1, 2))

        def scan_is_dark(index: int) -> bool:
            scan = region_pixels(batch["original_pixels"][index], batch["scan_region"][index])
            return content_median(scan) < TRAINING_LOWER_QUARTILE_CONTENT_MEDIAN

        retry = [index for index in np.flatnonzero(flagged) if index not in skip and scan_is_dark(index)]
        if not retry:
            return []
        brightened = [clamp_brightness(batch["original_pixels"][index], TRAINING_LOWER_QUARTILE_CONTENT_MEDIAN) for index in retry]
        points_bright, confidence_bright, scale_bright, signals_bright = self.measure_frames(brightened, batch["pixel_spacing_mm"][retry])
        score_bright = self.review_rules.margin(pd.DataFrame({**signals_bright, "confidence": confidence_bright}), spaced[retry])
        replaced = []
        for row, index in enumerate(retry):
            surer = confidence_bright[row] >= confidence[index] and score_bright[row] < score_before[index]
            if not (np.isfinite(points_bright[row]).all() and surer):
                continue  # no head brightened, or a measurement no more trusted: the first stands
            points_original[index], confidence[index], calibration_scale[index] = points_bright[row], confidence_bright[row], scale_bright[row]
            for name, values in signals_bright.items():
                signals[name][index] = values[row]
            replaced.append(index)
        return replaced

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from fetalpipe.pipeline.preprocess import concatenate_rows, decoded_chunks

        if "image" in batch:  # decode_in="tasks": decoded upstream
            output = self.measure_decoded(batch)
        else:  # decoded here, a bounded part of the batch at a time (`map` keeps no part alive while the next is decoded)
            output = concatenate_rows(list(map(self.measure_decoded, decoded_chunks(
                batch, self.codec.input_size, keep_original=self.refinement is not None, max_decoded_bytes=self.max_decoded_bytes))))
        if self.overlay_dir:
            output = draw_overlays_batch(output, self.overlay_dir)
        if self.predictions_dir is None:
            return output
        write_batch(output, self.predictions_dir)
        count = len(output["image_path"])
        return {"rows_written": np.array([count]), "errors": np.array([int((output["status"] == "error").sum())]),
                "needs_review": np.array([int(np.sum(output["needs_review"]))])}

    def measure_decoded(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Output rows (landmarks, biometry, review) for a decoded batch (`preprocess.decode_batch`)."""
        count = len(batch["image_path"])
        points_original = np.full((count, 4, 2), np.nan)
        confidence = np.full(count, np.nan)
        calibration_scale = np.full(count, np.nan)
        signals = {name: np.full(count, np.nan) for name in SIGNAL_KEYS}
        ok = np.flatnonzero(batch["status"] == "ok")
        if len(ok):
            from fetalpipe.pipeline.preprocess import transforms_of

            transforms = transforms_of({key: batch[key][ok] for key in ("original_width", "original_height", "scan_region")}, self.codec.input_size)
            originals = batch["original_pixels"][ok] if "original_pixels" in batch else None
            points_original[ok], confidence[ok], calibration_scale[ok], signals_ok = self.measure(
                batch["image"][ok], transforms, originals, batch["scan_candidate"][ok], batch["pixel_spacing_mm"][ok])
            for name, values in signals_ok.items():
                signals[name][ok] = values
            if originals is not None:
                turned = self.measure_tilted_frames_upright(batch, points_original, confidence, calibration_scale, signals)
                self.measure_dark_frames_brightened(batch, points_original, confidence, calibration_scale, signals, skip=turned)
        output = {key: value for key, value in batch.items() if key not in ("image", "original_pixels", "scan_region", "scan_candidate")}
        not_found = (batch["status"] == "ok") & np.isnan(points_original).any(axis=(1, 2))
        calibration_scale[not_found] = np.nan
        if not_found.any():
            output["status"] = np.where(not_found, "error", batch["status"]).astype(object)
            output["error"] = np.where(not_found, "no fetal head found (model output below detection threshold)", batch["error"]).astype(object)
        output.update({column: points_original.reshape(count, 8)[:, i] for i, column in enumerate(LANDMARK_COLUMNS)})
        output.update(biometry_mm(points_original, batch["pixel_spacing_mm"]))
        output.update(clinical_columns(output["hc_ellipse_mm"], batch.get("gestational_age_weeks")))
        output["confidence"] = confidence
        output["needs_review"], output["review_reason"] = self.review(signals, confidence, output["status"], batch["pixel_spacing_mm"])
        output.update({name: signals[name] for name in REVIEW_SIGNAL_COLUMNS})
        output["size_calibration_scale"] = calibration_scale  # 1: not calibrated (no calibration in the model, or no spacing)
        output["model_sha256"] = np.full(count, self.model_sha256, dtype=object)
        output["precision"] = np.full(count, self.precision, dtype=object)
        output["int8_upsampling"] = np.full(count, self.int8_upsampling, dtype=bool)
        output["fetalpipe_version"] = np.full(count, __version__, dtype=object)
        return output


def plausibility_signals(points_original_px: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> dict[str, np.ndarray]:
    """Review signals from the final ellipse alone: how much of it lies outside the frame, its BPD/OFD ratio, and
    its OFD as a fraction of the image diagonal (NaN where no head was found)."""
    from fetalpipe.measure import ellipse as ellipse_geometry

    count = len(points_original_px)
    outside, ratio, size = np.full(count, np.nan), np.full(count, np.nan), np.full(count, np.nan)
    for index in np.flatnonzero(np.isfinite(points_original_px).all(axis=(1, 2))):
        fitted = ellipse_geometry.from_endpoints(points_original_px[index])
        outline = ellipse_geometry.outline(fitted, 180)
        width, height = float(widths[index]), float(heights[index])
        outside[index] = float(np.mean((outline[:, 0] < -0.5) | (outline[:, 0] > width - 0.5) | (outline[:, 1] < -0.5) | (outline[:, 1] > height - 0.5)))
        ratio[index] = fitted[3] / fitted[2] if fitted[2] > 0 else np.nan
        size[index] = 2 * fitted[2] / np.hypot(width, height)
    return {"outline_outside_frame": outside, "axis_ratio": ratio, "head_size_fraction": size}


def draw_overlays_batch(batch: dict[str, np.ndarray], overlay_dir: str) -> dict[str, np.ndarray]:
    """One PNG per ok row: OFD in blue, BPD in green (as the seed's Figure 2), the HC ellipse, values in mm."""
    from fetalpipe.pipeline.overlays import draw_overlay

    for index in np.flatnonzero(batch["status"] == "ok"):
        row = {key: batch[key][index] for key in batch}
        try:
            draw_overlay(row, overlay_dir)
        except Exception as error:  # an overlay must never cost the measurement
            batch["error"][index] = f"overlay failed: {error}"
    return batch


def run_inference(options: InferOptions) -> dict:
    from fetalpipe.model.model_file import DEFAULT_MODEL_PATH, file_sha256, read_model_header
    from fetalpipe.runtime.cluster import connect

    started = time.perf_counter()
    if options.decode_in not in ("actors", "tasks"):
        raise ValueError(f"decode_in must be 'actors' or 'tasks', got {options.decode_in!r}")
    model_path = storage.absolute(options.model_path or DEFAULT_MODEL_PATH)
    local_model_path = storage.local_copy(model_path)  # a model on an object store is read from a local copy
    # Fail early, with a clear message, on a file that is not a fetalpipe model. Read without torch: importing it
    # here slowed ray.init by 1.6-3.2 s on 2 cores (bench/ray_init_bench.py). The actors load the weights.
    model_header = read_model_header(local_model_path)
    model_config = model_header["train_config"]
    precision = resolve_precision(options.precision, model_header)
    if options.flip_average and model_config["layout"] == "coordinates":
        raise ValueError("--flip-average needs a heatmap model; this one regresses coordinates")
    model_sha256 = file_sha256(local_model_path)
    inputs = collect_inputs(options.manifest, options.input_glob)
    output_dir = storage.absolute(options.output_dir)
    predictions_dir = storage.join(output_dir, "predictions")
    overlay_dir = storage.join(output_dir, "overlays") if options.overlays else None
    if not options.dry_run:
        check_writable(output_dir)
        if options.overwrite:
            storage.remove_folder(predictions_dir)
            storage.remove_folder(storage.join(output_dir, "overlays"))
        storage.makedirs(predictions_dir)
        if not storage.is_uri(output_dir):
            for partial in glob.glob(os.path.join(predictions_dir, "_partial-*")):  # left by a crash mid-write
                os.remove(partial)

    existing_files = frozenset(storage.list_files(predictions_dir, ".parquet"))
    # Read once; after the run only the new files are read. A dry run reads only the columns the plan needs.
    existing = read_predictions(output_dir, columns=list(RESUME_COLUMNS) if options.dry_run else None)
    done = existing.iloc[:0] if options.overwrite else existing  # a dry run with --overwrite has not deleted them
    if len(done):  # rows without a precision column (written by 0.1.0) were fp32
        row_precision = done["precision"].fillna("fp32") if "precision" in done else "fp32"
        done = done[(done["model_sha256"] == model_sha256) & (row_precision == precision)]
    pending, unreadable = plan(inputs, done)
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    hint = " (this model file has no int8 parameters: `fetalpipe calibrate` adds them)" if options.precision == "auto" and precision == "fp32" else ""
    log_path = console.ray_log_location(output_dir, f"ray-{run_id}.log")
    header = {
        "input": f"{options.manifest or options.input_glob}: {len(inputs)} images, {len(inputs) - len(pending)} already done, {len(pending)} to process",
        "model": f"{model_path} (sha256 {model_sha256[:12]}…, {precision}{hint})",
        "actors": f"{options.actors} × {options.threads_per_actor} thread(s), batches of {effective_batch_size(len(pending), options)}",
        "output": output_dir,
        "Ray log": "this console (--verbose)" if options.verbose else log_path,
    }
    without_spacing = rows_without_spacing(pending)
    if without_spacing:
        header["spacing"] = f"none for {without_spacing} of the {len(pending)} images (not DICOM files): {NO_SPACING_CONSEQUENCE}; add pixel_spacing_mm to the manifest"
    console.header("infer --dry-run" if options.dry_run else "infer", header)
    if options.dry_run:
        return print_plan(pending, unreadable, len(inputs), time.perf_counter() - started)

    pipeline_seconds = 0.0
    if len(pending):
        with console.ray_logs_to_file(log_path, options.verbose):
            connect(options.ray_address)
            pipeline_started = time.perf_counter()
            _run_pipeline(pending, options, model_path, model_config["input_size"], predictions_dir, overlay_dir, run_id, precision,
                          keep_original=model_config.get("refinement") is not None)
            pipeline_seconds = time.perf_counter() - pipeline_started

    # The Parquet folder keeps the newest row of every image ever written to it; the CSV shows this manifest's images.
    stored = newest_per_image([existing, read_predictions(output_dir, skip_files=existing_files)])
    stored = stored[[c for c in OUTPUT_COLUMNS if c in stored] + [c for c in stored if c not in OUTPUT_COLUMNS]]
    compact_if_needed(predictions_dir, stored)
    final = stored[stored["image_path"].isin(set(inputs["image_path"]))].sort_values("image_path")
    csv_path = storage.join(output_dir, "predictions.csv")
    storage.write_chunks(csv_path, csv_chunks(final))
    summary = {
        "rows": int(len(final)), "ok": int((final["status"] == "ok").sum()), "error": int((final["status"] == "error").sum()),
        "needs_review": int(final["needs_review"].fillna(False).astype(bool).sum()) if "needs_review" in final else 0,
        "ok_without_spacing": int(((final["status"] == "ok") & final.get("pixel_spacing_mm", pd.Series(np.nan, index=final.index)).isna()).sum()),
        # A cluster's nodes build the int8 model by their CPU (`quantize.int8_upsampling_pays`): the rows its int8 upsampling measured.
        "int8_upsampling": int(final["int8_upsampling"].fillna(False).astype(bool).sum()) if "int8_upsampling" in final else 0,
        "processed_this_run": int(len(pending)), "seconds": round(time.perf_counter() - started, 3),
        "pipeline_seconds": round(pipeline_seconds, 3),
        "images_per_second": round(len(pending) / pipeline_seconds, 2) if pipeline_seconds else None,
    }
    run_record = {
        "run_id": run_id, "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "options": asdict(options), "model_path": model_path, "model_sha256": model_sha256,
        "precision": precision, "versions": _versions(), "counts": {k: summary[k] for k in ("rows", "ok", "error", "needs_review", "ok_without_spacing", "int8_upsampling", "processed_this_run")},
        "timings": {k: summary[k] for k in ("seconds", "pipeline_seconds", "images_per_second")},
        "command": " ".join(["fetalpipe", *sys.argv[1:]]) if os.path.basename(sys.argv[0]) == "fetalpipe" else " ".join(sys.argv),
        "input": options.manifest or options.input_glob,
    }
    storage.write_text(storage.join(output_dir, "run.json"), json.dumps(run_record, indent=2, default=str))
    outputs = {"predictions.csv": csv_path, "predictions/": predictions_dir + "/", "run.json": storage.join(output_dir, "run.json")}
    if options.report:
        from fetalpipe.pipeline.report import write_report

        outputs["report.html"] = write_report(output_dir, predictions=final, run=run_record)
    if overlay_dir:
        outputs["overlays/"] = overlay_dir + "/"
    if len(pending) and not options.verbose:
        outputs["Ray log"] = log_path
    summary["outputs"] = outputs
    if options.print_summary:
        print_summary(summary)
    return summary


def check_writable(output_dir: str) -> None:
    """Write and remove one small object, so that an output location without access stops the job before any work."""
    probe = storage.join(output_dir, f"_write-check-{uuid.uuid4().hex}")
    try:
        storage.makedirs(output_dir)
        storage.write_bytes(probe, b"")
        storage.remove(probe)
    except OSError as error:
        raise OutputLocationError(f"cannot write to the output location {output_dir}: {error}") from error


class OutputLocationError(ValueError):
    """The output folder or bucket prefix cannot be written (no access, no such bucket, a read-only disk)."""


def print_plan(pending: pd.DataFrame, unreadable: int, inputs: int, seconds: float, shown: int = 10) -> dict:
    """What a dry run found; returns its counts."""
    missing = pending[pending["file_size_bytes"] < 0]["image_path"]
    lines = {"to process": f"{len(pending)} of {inputs} rows ({inputs - len(pending)} already done)",
             "errors already visible": f"{unreadable} (missing or unreadable: each will get an error row)"}
    for path in missing.head(shown):
        lines[f"  {path}"] = "missing or unreadable"
    if unreadable > shown:
        lines[f"  … and {unreadable - shown} more"] = ""
    console.summary(f"fetalpipe infer --dry-run: planned in {seconds:.1f} s; nothing started, nothing written", lines)
    return {"rows": inputs, "to_process": int(len(pending)), "done": int(inputs - len(pending)), "unreadable": int(unreadable), "seconds": round(seconds, 3)}


def print_summary(summary: dict) -> None:
    """The last lines of a run: counts, time, where every output is, and the ok rows measured without a pixel spacing."""
    rate = f", {summary['images_per_second']:.1f} img/s" if summary["images_per_second"] else ""
    notes = {"no spacing": f"{summary['ok_without_spacing']} ok rows: {NO_SPACING_CONSEQUENCE}"} if summary.get("ok_without_spacing") else {}
    console.summary(
        f"fetalpipe infer: {summary['rows']} rows ({summary['ok']} ok, {summary['error']} error, {summary['needs_review']} need review); "
        f"{summary['processed_this_run']} processed in {summary['seconds']:.1f} s{rate}", {**summary["outputs"], **notes})


def rows_without_spacing(table: pd.DataFrame) -> int:
    """Rows with no pixel spacing in the manifest, DICOM files aside (they usually carry their own)."""
    spacing = pd.to_numeric(table["pixel_spacing_mm"], errors="coerce") if "pixel_spacing_mm" in table else pd.Series(np.nan, index=table.index)
    is_dicom_name = table["image_path"].astype(str).str.lower().str.endswith((".dcm", ".dicom"))
    return int((spacing.isna() & ~is_dicom_name).sum())


def input_dataset(pending: pd.DataFrame, options: InferOptions, run_id: str):
    """The pending rows as a Ray Dataset, one block per batch, built in the driver: from_items needs no remote tasks
    (from_pandas runs one per block before the actors can start)."""
    import ray.data

    table = pending.copy()
    if "pixel_spacing_mm" not in table:
        table["pixel_spacing_mm"] = np.nan
    carried = [c for c in table.columns if c not in ("image_path", *NUMERIC_MANIFEST_COLUMNS)]
    # Text, a blank cell an empty string: pandas keeps NaN through astype(str), and one float in a text column stops the Parquet write.
    table[carried] = table[carried].astype(str).mask(table[carried].isna(), "")
    table["run_id"] = run_id
    table["run_sequence"] = int(time.time() * 1000)
    table["row_index"] = np.arange(len(table))  # names each batch's file
    block_count = -(-len(table) // effective_batch_size(len(table), options))
    return ray.data.from_items(table.to_dict("records"), override_num_blocks=block_count)


def _run_pipeline(pending: pd.DataFrame, options: InferOptions, model_path: str, input_size: int, predictions_dir: str, overlay_dir: str | None,
                  run_id: str, precision: str, keep_original: bool = False) -> dict[str, int]:
    """Runs the pending rows through the actor pool and shows one progress display; returns its counters."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # ours (console.Progress) is the one display

    from fetalpipe.pipeline.preprocess import decode_batch

    dataset = input_dataset(pending, options, run_id)
    if options.decode_in == "tasks":
        dataset = dataset.map_batches(
            functools.partial(decode_batch, input_size=input_size, keep_original=keep_original), batch_format="numpy", batch_size=None, num_cpus=DECODE_CPUS,
        )
    if overlay_dir:
        storage.makedirs(overlay_dir)
    dataset = dataset.map_batches(
        LandmarkPredictor,
        fn_constructor_kwargs={
            "model_path": model_path, "threads": options.threads_per_actor, "flip_average": options.flip_average,
            "predictions_dir": predictions_dir, "overlay_dir": overlay_dir, "precision": precision,
        },
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        num_cpus=MODEL_CPU_SHARE * options.threads_per_actor,
        batch_size=None, batch_format="numpy",
    )
    progress = console.Progress(len(pending), unit="img", description="infer")
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            progress.update(int(batch["rows_written"].sum()), {"errors": int(batch["errors"].sum()), "need review": int(batch["needs_review"].sum())})
    except ray.exceptions.RayActorError as error:
        if not error.actor_init_failed:
            raise
        raise ActorStartError(f"the model actors could not start: {_last_exception(str(error))}") from error
    finally:
        progress.close()
    if progress.done != len(pending):
        raise RuntimeError(f"inference wrote {progress.done} rows for {len(pending)} inputs")
    return progress.counters


def csv_chunks(table: pd.DataFrame, rows_per_chunk: int = 50_000):
    """The table as CSV bytes, a chunk of rows at a time: a million-row CSV never exists as one string in memory."""
    for start in range(0, max(len(table), 1), rows_per_chunk):
        yield table.iloc[start:start + rows_per_chunk].to_csv(index=False, header=start == 0).encode("utf-8")


def effective_batch_size(pending_rows: int, options: InferOptions) -> int:
    """`batch_size`, but never fewer batches than actors: a small run still uses every actor (and Ray warns about idle ones)."""
    return max(1, min(options.batch_size, -(-pending_rows // max(options.actors, 1))))


def _last_exception(traceback_text: str) -> str:
    """The last "SomeError: message" of a traceback that Ray passed on as text, with its continuation lines."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", traceback_text).splitlines() if line.strip()]
    starts = [index for index, line in enumerate(lines) if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b.*:", line)]
    return " ".join(lines[starts[-1]:]) if starts else (lines[-1] if lines else traceback_text)


def _versions() -> dict:
    from importlib.metadata import version  # the driver never imports torch (1.5 s here); its installed version is enough

    return {"fetalpipe": __version__, "ray": version("ray"), "torch": version("torch"), "python": platform.python_version(), "numpy": np.__version__, "pandas": pd.__version__}


def run_demo(output_dir: str, ray_address: str | None = None, verbose: bool = False) -> dict:
    """Inference with overlays on the embedded HC18 sample; prints a short table."""
    from fetalpipe.model.model_file import DEFAULT_MODEL_PATH

    sample_manifest = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "sample", "manifest.csv")
    summary = run_inference(InferOptions(output_dir=output_dir, manifest=sample_manifest, model_path=DEFAULT_MODEL_PATH, overlays=True,
                                         ray_address=ray_address, verbose=verbose, print_summary=False))
    predictions = pd.read_csv(os.path.join(output_dir, "predictions.csv"))
    shown = predictions.assign(image=predictions["image_path"].map(os.path.basename))
    shown = shown.merge(pd.read_csv(sample_manifest).assign(image=lambda t: t["image_path"].map(os.path.basename))[["image", "hc_mm"]].rename(columns={"hc_mm": "reference_hc_mm"}), on="image", how="left")
    columns = ["image", "status", "bpd_mm", "ofd_mm", "hc_ellipse_mm", "reference_hc_mm", "ga_from_hc_weeks", "needs_review"]
    print(shown[columns].head(10).to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    print_summary(summary)
    return summary
