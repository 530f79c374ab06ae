"""The `calibrate` job: fit, on a model's training split, what inference applies afterwards (int8 quantization parameters
for both stages, the size line of `calibration.SizeCalibration`, and the review rule of `review.ReviewRule`), and
write them into the model file. It runs `infer` and `evaluate` on the split, so it sits above them; what it fits is
applied by code below `infer`."""

from __future__ import annotations

import numpy as np

from fetalpipe.measure.calibration import SizeCalibration
from fetalpipe.measure.review import ReviewRule, fit_without_spacing
from fetalpipe.runtime import storage


def polar_crops_around_references(codec, originals: list, rows) -> np.ndarray:
    """float32 [N, rows, columns]: one crop per image, around its reference ellipse jittered as in training (seeded)."""
    from fetalpipe.data.manifest import landmarks_original_px
    from fetalpipe.measure import ellipse as ellipse_geometry
    from fetalpipe.model.polar import jitter

    rng = np.random.default_rng(0)
    references = ellipse_geometry.from_endpoints(landmarks_original_px(rows))
    return np.stack([codec.crop(pixels, jitter(reference, rng)) for pixels, reference in zip(originals, references)])


def calibrate_model(model_path: str, manifest_path: str, output_path: str, ray_address: str | None = None) -> dict:
    """Choose int8 quantization parameters on up to `quantize.CALIBRATION_IMAGES` images of the training split of
    `manifest_path` (the split the model was trained on), measure the whole split with that int8 model, fit the size
    line, and write the model with both to `output_path` (inference then runs in int8 by default; the line is fitted
    on what int8 inference measures), fit the review flag's rules on the same measurement (`review.ReviewRule` on the
    signals in mm, and `review.fit_without_spacing` for rows without a pixel spacing), and write them all into the model file. The measurement stays in OUTPUT.calibration/
    (predictions and an evaluate report of the training split); like any inference output it must be on storage
    every node can reach. Returns the fit and the split's HC MAE before and after."""
    from fetalpipe.model.model_file import load_model, load_refinement_model, refinement_entries, save_model
    from fetalpipe.model.quantize import observe_quantization

    model_path = storage.local_copy(model_path)
    model, config, payload = load_model(model_path)
    train_table = training_split(manifest_path, config)
    work_dir = storage.absolute(output_path) + ".calibration"
    storage.makedirs(work_dir)
    chosen, decoded, images = int8_parameter_images(train_table, config.input_size)
    int8_quantization = observe_quantization(model, images)
    refinement_int8_quantization = None
    refinement = load_refinement_model(config, payload, model_path)
    if refinement is not None:  # its int8 ranges: polar crops of the same images, around their reference ellipses as stage 1 misses them
        crops = polar_crops_around_references(config.refinement.codec(), decoded, train_table.set_index("image_path").loc[chosen])
        refinement_int8_quantization = observe_quantization(refinement, crops)
    weights = {**refinement_entries(payload), "refinement_int8_quantization": refinement_int8_quantization}
    errors = measure_training_split(payload, config, int8_quantization, weights, train_table, work_dir, ray_address)
    measured = (errors["reference_hc_mm"] + errors["hc_ellipse_diff_mm"]).to_numpy()
    reference = errors["reference_hc_mm"].to_numpy()
    calibration = SizeCalibration.fit(measured, reference)
    calibrated = measured * calibration.scale(measured)
    # The review rule, on the same measurement: signals after the size correction would move only the size-based
    # ones by a percent, so the uncorrected rows are used as they are; the errors are the corrected ones.
    review_rule = ReviewRule.fit(errors, np.abs(calibrated - reference))
    # And the rule for rows without a pixel spacing, which get no size line: the errors before it, as fractions of the head.
    review_rule_without_spacing = fit_without_spacing(errors, measured, reference)
    summary = {
        **calibration.to_dict(), "manifest": manifest_path, "split": "train",
        "train_hc_mae_mm_before": float(np.nanmean(np.abs(measured - reference))),
        "train_hc_mae_mm_after": float(np.nanmean(np.abs(calibrated - reference))),
        "measured_in": "int8", "int8_parameter_images": len(chosen),
    }
    summary["review"] = review_rule.fit_report
    summary["review_without_spacing"] = review_rule_without_spacing.fit_report
    save_model(output_path, payload["state_dict"], config, metrics=payload.get("metrics"), training=payload.get("training"), calibration=summary,
               int8_quantization=int8_quantization, review=review_rule.to_dict(), review_without_spacing=review_rule_without_spacing.to_dict(), **weights)
    return summary


def int8_parameter_images(train_table, input_size: int) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """The training images the int8 parameters are chosen on: up to `quantize.CALIBRATION_IMAGES`, evenly spaced over the
    split sorted by path (the same images on every rerun) -> (their paths, their pixels as the inference actors see them,
    float32 [N, S, S] stage-1 inputs)."""
    from fetalpipe.data.imaging import clamp_brightness, read_image
    from fetalpipe.model.quantize import CALIBRATION_IMAGES
    from fetalpipe.pipeline.preprocess import stage1_input

    paths = sorted(train_table["image_path"])
    chosen = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, min(CALIBRATION_IMAGES, len(paths)))]
    decoded = [clamp_brightness(read_image(path).pixels) for path in chosen]
    return chosen, decoded, np.stack([stage1_input(pixels, input_size)[0] for pixels in decoded])


def training_split(manifest_path: str, config):
    """The rows of the manifest's training split (by subject, as `train` split it), checked for what calibrating needs."""
    from fetalpipe.data.manifest import load_manifest
    from fetalpipe.pipeline.train import split_by_subject

    train_table, _ = split_by_subject(load_manifest(manifest_path, require_landmarks=True), config.val_fraction)
    if len(train_table) == 0:
        raise ValueError(f"{manifest_path}: no image is in the training split (by subject_id); calibrate on the manifest the model was trained on")
    if "pixel_spacing_mm" not in train_table or train_table["pixel_spacing_mm"].isna().all():
        raise ValueError(f"{manifest_path}: size calibration needs pixel_spacing_mm")
    return train_table


def measure_training_split(payload: dict, config, int8_quantization: dict, weights: dict, train_table, work_dir: str, ray_address: str | None):
    """The training split measured by `infer` in int8 with these weights and int8 parameters, without a size line or a
    review rule (so without the second measurements the rule triggers), then by `evaluate`: its per-image errors and
    signals, kept in WORK_DIR/report/."""
    import io

    import pandas as pd

    from fetalpipe.model.model_file import save_model
    from fetalpipe.pipeline.evaluate import evaluate_predictions
    from fetalpipe.pipeline.infer import InferOptions, run_inference

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
    return pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(work_dir, "report", "per_image_errors.csv"))))


def add_rule_without_spacing(model_path: str, manifest_path: str, output_path: str, ray_address: str | None = None) -> dict:
    """A calibrated model file with the review rule for rows without a pixel spacing added, and nothing else changed: the
    training split measured with the file's own int8 parameters (as `calibrate` measured it), the rule fitted there.
    For a model calibrated before that rule existed, whose other calibrated parts (int8 parameters, size line, rule
    in mm) should stay as they were measured. Returns the rule's fit report."""
    from fetalpipe.model.model_file import load_model, refinement_entries, save_model

    model_path = storage.local_copy(model_path)
    _, config, payload = load_model(model_path)
    if not payload.get("int8_quantization") or not payload.get("review"):
        raise ValueError(f"{model_path} is not calibrated (no int8 parameters or review rule): run `fetalpipe calibrate` on it")
    train_table = training_split(manifest_path, config)
    work_dir = storage.absolute(output_path) + ".calibration"
    storage.makedirs(work_dir)
    stage2 = {**refinement_entries(payload), "refinement_int8_quantization": payload.get("refinement_int8_quantization")}
    errors = measure_training_split(payload, config, payload["int8_quantization"], stage2, train_table, work_dir, ray_address)
    rule = fit_without_spacing(errors, (errors["reference_hc_mm"] + errors["hc_ellipse_diff_mm"]).to_numpy(), errors["reference_hc_mm"].to_numpy())
    calibration = {**payload.get("calibration", {}), "review_without_spacing": rule.fit_report}
    save_model(output_path, payload["state_dict"], config, metrics=payload.get("metrics"), training=payload.get("training"), calibration=calibration,
               int8_quantization=payload["int8_quantization"], review=payload["review"], review_without_spacing=rule.to_dict(), **stage2)
    return rule.fit_report
