"""Size calibration: a straight-line correction of the measured head size, fitted on the training split.

Why: every ellipse-map model trained here measures small heads too small and large heads too large, on its own
training images as on validation (-1.05 to -1.62 mm HC in the quarter with the finest pixels, +1.20 to +2.32 mm
in the coarsest, over six runs; docs/experiments.md, note 9). The error is close to linear in the measured HC, so a line fitted
on the training split predicts it for new images. The correction scales the ellipse about its centre: the
landmarks move, and BPD, OFD and HC, in pixels and mm, stay consistent with them.

It needs the pixel spacing (the error is linear in mm, not in pixels): images without one are left as measured."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from fetalpipe.biometry import biometry_mm
from fetalpipe.review import ReviewRule

# A correction is a few mm on heads of 100-350 mm; a factor outside this range means a measurement the line was never fitted on.
SCALE_LIMITS = (0.95, 1.05)


@dataclass(frozen=True)
class SizeCalibration:
    """HC error (measured - reference, mm) = intercept_mm + slope × measured HC (mm), fitted on `images` training images."""

    intercept_mm: float
    slope: float
    images: int

    @classmethod
    def fit(cls, measured_hc_mm: np.ndarray, reference_hc_mm: np.ndarray) -> "SizeCalibration":
        measured = np.asarray(measured_hc_mm, dtype=np.float64)
        reference = np.asarray(reference_hc_mm, dtype=np.float64)
        usable = np.isfinite(measured) & np.isfinite(reference)
        if usable.sum() < 10:
            raise ValueError(f"size calibration needs at least 10 measured images with a reference HC; got {int(usable.sum())}")
        slope, intercept_mm = np.polyfit(measured[usable], measured[usable] - reference[usable], 1)
        return cls(intercept_mm=float(intercept_mm), slope=float(slope), images=int(usable.sum()))

    def scale(self, measured_hc_mm: np.ndarray) -> np.ndarray:
        """Factor for the ellipse axes, (HC - predicted error) / HC; 1 where the HC in mm is unknown."""
        measured = np.asarray(measured_hc_mm, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            factor = (measured - (self.intercept_mm + self.slope * measured)) / measured
        return np.where(np.isfinite(factor) & (measured > 0), np.clip(factor, *SCALE_LIMITS), 1.0)

    def apply(self, points_original_px: np.ndarray, pixel_spacing_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N, 4, 2] ellipse endpoints (original pixels) -> (calibrated endpoints, scale [N]). Both diameters pass
        through the centre, so the mean of the four endpoints is the centre the ellipse is scaled about."""
        points = np.asarray(points_original_px, dtype=np.float64)
        scale = self.scale(biometry_mm(points, pixel_spacing_mm)["hc_ellipse_mm"])
        centre = points.mean(axis=-2, keepdims=True)
        return centre + (points - centre) * scale[:, None, None], scale

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> "SizeCalibration | None":
        """From a model file's ``calibration`` entry (which also keeps the fit's report); None when there is none."""
        return cls(float(values["intercept_mm"]), float(values["slope"]), int(values["images"])) if values else None


def polar_crops_around_references(codec, originals: list, rows) -> np.ndarray:
    """float32 [N, rows, columns]: one crop per image, around its reference ellipse jittered as in training (seeded)."""
    from fetalpipe import LANDMARK_COLUMNS
    from fetalpipe import ellipse as ellipse_geometry
    from fetalpipe.polar import jitter

    rng = np.random.default_rng(0)
    references = ellipse_geometry.from_endpoints(rows[list(LANDMARK_COLUMNS)].to_numpy(dtype=np.float64).reshape(-1, 4, 2))
    return np.stack([codec.crop(pixels, jitter(reference, rng)) for pixels, reference in zip(originals, references)])


def calibrate_model(model_path: str, manifest_path: str, output_path: str, ray_address: str | None = None) -> dict:
    """Choose int8 quantization parameters on up to `quantize.CALIBRATION_IMAGES` images of the training split of
    `manifest_path` (the split the model was trained on), measure the whole split with that int8 model, fit the size
    line, and write the model with both to `output_path` (inference then runs in int8 by default; the line is fitted
    on what int8 inference measures), fit the review flag's thresholds (`review.ReviewRule`) on the same measurement,
    and write all three into the model file. The measurement stays in OUTPUT.calibration/
    (predictions and an evaluate report of the training split); like any inference output it must be on storage
    every node can reach. Returns the fit and the split's HC MAE before and after."""
    import io

    import pandas as pd

    from fetalpipe.evaluate import evaluate_predictions
    from fetalpipe.imaging import read_image, resize_to_model
    from fetalpipe.infer import InferOptions, run_inference
    from fetalpipe.manifest import load_manifest
    from fetalpipe.model_io import load_model, load_refinement_model, refinement_entries, save_model
    from fetalpipe.quantize import CALIBRATION_IMAGES, observe_quantization
    from fetalpipe.train import split_by_subject

    from fetalpipe import storage

    model_path = storage.local_copy(model_path)
    model, config, payload = load_model(model_path)
    table = load_manifest(manifest_path, require_landmarks=True)
    train_table, _ = split_by_subject(table, config.val_fraction)
    if len(train_table) == 0:
        raise ValueError(f"{manifest_path}: no image is in the training split (by subject_id); calibrate on the manifest the model was trained on")
    if "pixel_spacing_mm" not in train_table or train_table["pixel_spacing_mm"].isna().all():
        raise ValueError(f"{manifest_path}: size calibration needs pixel_spacing_mm")
    work_dir = storage.absolute(output_path) + ".calibration"
    storage.makedirs(work_dir)
    # Evenly spaced over the split, sorted by path: the same images on every rerun.
    paths = sorted(train_table["image_path"])
    chosen = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, min(CALIBRATION_IMAGES, len(paths)))]
    decoded = [read_image(path).pixels for path in chosen]
    images = np.stack([resize_to_model(pixels, config.input_size)[0] for pixels in decoded])
    int8_quantization = observe_quantization(model, images)
    refinement_int8_quantization = None
    refinement = load_refinement_model(config, payload, model_path)
    if refinement is not None:  # its int8 ranges: polar crops of the same images, around their reference ellipses as stage 1 misses them
        crops = polar_crops_around_references(config.refinement.codec(), decoded, train_table.set_index("image_path").loc[chosen])
        refinement_int8_quantization = observe_quantization(refinement, crops)
    weights = {**refinement_entries(payload), "refinement_int8_quantization": refinement_int8_quantization}
    uncalibrated = storage.join(work_dir, "uncalibrated_model.pt")
    save_model(uncalibrated, payload["state_dict"], config, metrics=payload.get("metrics"), training=payload.get("training"),
               int8_quantization=int8_quantization, **weights)
    split_manifest = storage.join(work_dir, "train_split.csv")
    storage.write_text(split_manifest, train_table.to_csv(index=False))  # load_manifest made the image paths absolute
    try:
        run_inference(InferOptions(output_dir=storage.join(work_dir, "inference"), manifest=split_manifest, model_path=uncalibrated,
                                   overwrite=True, ray_address=ray_address, precision="int8", report=False, print_summary=False))
        evaluate_predictions(storage.join(work_dir, "inference"), split_manifest, storage.join(work_dir, "report"))
    finally:  # also when no head was found in the split (evaluate refuses): the temporary model never stays behind
        storage.remove(uncalibrated)
    errors = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(work_dir, "report", "per_image_errors.csv"))))
    measured = (errors["reference_hc_mm"] + errors["hc_ellipse_diff_mm"]).to_numpy()
    reference = errors["reference_hc_mm"].to_numpy()
    calibration = SizeCalibration.fit(measured, reference)
    calibrated = measured * calibration.scale(measured)
    # The review thresholds, on the same measurement: signals after the size correction would move only the size-based
    # ones by a percent, so the uncorrected rows are used as they are; the errors are the corrected ones.
    review_rule = ReviewRule.fit(errors, np.abs(calibrated - reference))
    summary = {
        **calibration.to_dict(), "manifest": manifest_path, "split": "train",
        "train_hc_mae_mm_before": float(np.nanmean(np.abs(measured - reference))),
        "train_hc_mae_mm_after": float(np.nanmean(np.abs(calibrated - reference))),
        "measured_in": "int8", "int8_parameter_images": len(chosen),
    }
    summary["review"] = review_rule.fit_report
    save_model(output_path, payload["state_dict"], config, metrics=payload.get("metrics"), training=payload.get("training"), calibration=summary,
               int8_quantization=int8_quantization, review=review_rule.to_dict(), **weights)
    return summary
