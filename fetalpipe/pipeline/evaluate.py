"""Accuracy of predicted landmarks against reference landmarks: radial errors, success detection
rates, and BPD/OFD/HC differences in mm. Endpoints are matched within each diameter in whichever
pairing is closer, so OFD1/OFD2 naming never counts as an error. A manifest image without a
measurement (an error row, or no row) is a failure in the SDR and the count of large errors: a lost
head must not make a model look better."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd

from fetalpipe import LANDMARK_COLUMNS
from fetalpipe.measure.biometry import biometry_mm
from fetalpipe.measure.review import LARGE_ERROR_MM
from fetalpipe.runtime import storage

SDR_THRESHOLDS_MM = (2.0, 2.5, 3.0, 4.0)


def matched_radial_errors_px(predicted_px: np.ndarray, reference_px: np.ndarray) -> np.ndarray:
    """[N, 4] Euclidean error per landmark (original pixels) after the closer pairing per diameter."""
    predicted = np.asarray(predicted_px, dtype=np.float64)
    reference = np.asarray(reference_px, dtype=np.float64)
    errors = np.empty(predicted.shape[:-1])
    for first, second in ((0, 1), (2, 3)):
        straight = np.linalg.norm(predicted[:, [first, second]] - reference[:, [first, second]], axis=-1)
        swapped = np.linalg.norm(predicted[:, [second, first]] - reference[:, [first, second]], axis=-1)
        use_swapped = swapped.sum(axis=1) < straight.sum(axis=1)
        errors[:, [first, second]] = np.where(use_swapped[:, None], swapped, straight)
    return errors


def per_image_errors(predicted_px: np.ndarray, reference_px: np.ndarray, pixel_spacing_mm: np.ndarray, reference_hc_mm: np.ndarray | None = None) -> pd.DataFrame:
    """One row per image: radial errors (px, mm) and signed BPD/OFD/HC differences (mm)."""
    radial_px = matched_radial_errors_px(predicted_px, reference_px)
    spacing = np.asarray(pixel_spacing_mm, dtype=np.float64)
    predicted = biometry_mm(predicted_px, spacing)
    reference = biometry_mm(reference_px, spacing)
    if reference_hc_mm is not None:
        reference_hc = np.where(np.isnan(reference_hc_mm), reference["hc_ellipse_mm"], reference_hc_mm)
    else:
        reference_hc = reference["hc_ellipse_mm"]
    table = pd.DataFrame({f"radial_error_{name}_px": radial_px[:, index] for index, name in enumerate(("ofd1", "ofd2", "bpd1", "bpd2"))})
    table["mean_radial_error_px"] = radial_px.mean(axis=1)
    table["mean_radial_error_mm"] = table["mean_radial_error_px"] * spacing
    table["max_radial_error_mm"] = radial_px.max(axis=1) * spacing
    table["bpd_diff_mm"] = predicted["bpd_mm"] - reference["bpd_mm"]
    table["ofd_diff_mm"] = predicted["ofd_mm"] - reference["ofd_mm"]
    table["hc_diff_mm"] = predicted["hc_mm"] - reference_hc
    table["hc_ellipse_diff_mm"] = predicted["hc_ellipse_mm"] - reference_hc
    table["reference_hc_mm"] = reference_hc
    return table


def summarize(errors: pd.DataFrame, radial_px: np.ndarray | None = None) -> dict[str, float]:
    """Aggregate metrics: MRE, SDR at 2/2.5/3/4 mm (per landmark), MAE and mean signed differences."""
    summary = {"images": int(len(errors)), "mre_px": float(errors["mean_radial_error_px"].mean())}
    with_mm = errors.dropna(subset=["mean_radial_error_mm"])
    summary["images_with_spacing"] = int(len(with_mm))
    if len(with_mm):
        summary["mre_mm"] = float(with_mm["mean_radial_error_mm"].mean())
        spacing = with_mm["mean_radial_error_mm"] / with_mm["mean_radial_error_px"].replace(0, np.nan)
        per_landmark_mm = with_mm[[f"radial_error_{n}_px" for n in ("ofd1", "ofd2", "bpd1", "bpd2")]].to_numpy() * spacing.fillna(0).to_numpy()[:, None]
        for threshold in SDR_THRESHOLDS_MM:
            summary[f"sdr_{threshold:g}mm"] = float((per_landmark_mm <= threshold).mean())
        for name in ("bpd", "ofd", "hc", "hc_ellipse"):
            difference = with_mm[f"{name}_diff_mm"]
            summary[f"{name}_mae_mm"] = float(difference.abs().mean())
            summary[f"{name}_mean_diff_mm"] = float(difference.mean())
    return summary


def bland_altman_plot(errors: pd.DataFrame, predicted_column: str, path: str) -> None:
    """HC Bland–Altman: difference vs mean of predicted and reference, with bias and 95 % limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = errors.dropna(subset=[predicted_column, "reference_hc_mm"])
    predicted = data["reference_hc_mm"] + data[predicted_column]
    mean = (predicted + data["reference_hc_mm"]) / 2
    difference = data[predicted_column]
    bias, spread = difference.mean(), 1.96 * difference.std()
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.scatter(mean, difference, s=8, alpha=0.6)
    for value, style in ((bias, "-"), (bias + spread, "--"), (bias - spread, "--")):
        axes.axhline(value, color="k", linestyle=style, linewidth=1)
    axes.set_xlabel("mean of predicted and reference HC (mm)")
    axes.set_ylabel("predicted − reference HC (mm)")
    axes.set_title(f"Bland–Altman HC: bias {bias:.2f} mm, 95% LoA ±{spread:.2f} mm")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    storage.write_bytes(path, buffer.getvalue())
    plt.close(figure)


def _why_nothing_to_score(predictions: pd.DataFrame, reference: pd.DataFrame) -> str:
    """What to tell the user when no successful prediction matches a manifest image: wrong paths, or only error rows."""
    matched = predictions[predictions["image_path"].isin(reference["image_path"])]
    if matched.empty:
        return "no prediction matches a manifest image_path"
    errors = matched["error"].fillna("").astype(str) if "error" in matched else pd.Series("", index=matched.index)
    most_common = errors.value_counts().index[0]
    return (f"every one of the {len(matched)} predictions for the manifest's images is an error row, so there is nothing to score"
            + (f"; the most frequent error: {most_common}" if most_common else ""))


def _unmeasured_images(reference: pd.DataFrame, joined: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """The manifest's images without a measurement, each with why: its error row's message, or that it has no row."""
    missing = reference.loc[~reference["image_path"].isin(joined["image_path"]), ["image_path"]]
    if "pixel_spacing_mm" in reference:
        missing["pixel_spacing_mm"] = reference.loc[missing.index, "pixel_spacing_mm"]
    messages = predictions.dropna(subset=["image_path"]).drop_duplicates("image_path", keep="last").set_index("image_path")
    messages = messages["error"].fillna("").astype(str) if "error" in messages else pd.Series("", index=messages.index, dtype=str)
    missing["reason"] = [(messages[path] or "error row without a message") if path in messages.index else "no prediction row"
                         for path in missing["image_path"]]
    return missing.reset_index(drop=True)


def _count_unmeasured_as_failures(summary: dict, unmeasured: pd.DataFrame) -> None:
    """Fold the unmeasured images into `summary`: none of their landmarks is within any SDR radius, and each counts as an
    image above the large-error threshold. The MAEs and MRE stay over the measured images (`images`)."""
    with_spacing = int(unmeasured["pixel_spacing_mm"].notna().sum()) if "pixel_spacing_mm" in unmeasured else 0
    measured_with_spacing = summary.get("images_with_spacing", 0)
    for threshold in SDR_THRESHOLDS_MM:
        key = f"sdr_{threshold:g}mm"
        if key in summary and with_spacing:
            summary[key] *= measured_with_spacing / (measured_with_spacing + with_spacing)
    summary[f"hc_ellipse_images_over_{LARGE_ERROR_MM:g}mm"] += len(unmeasured)
    summary["images_in_manifest"] = summary["images"] + len(unmeasured)
    summary["images_missing_prediction"] = len(unmeasured)


def evaluate_predictions(predictions_dir: str, manifest_path: str, output_dir: str) -> dict[str, float]:
    """`fetalpipe evaluate`: join predictions to the reference manifest by image path, write the report (metrics.json,
    per_image_errors.csv over the measured images, unmeasured_images.csv, bland_altman_hc.png)."""
    from fetalpipe.data.manifest import landmarks_original_px, load_manifest
    from fetalpipe.pipeline.predictions import REVIEW_SIGNAL_COLUMNS, read_predictions

    reference = load_manifest(manifest_path, require_landmarks=True)
    predictions = read_predictions(predictions_dir)
    ok = predictions[predictions["status"] == "ok"]
    review_columns = [c for c in ("needs_review", "review_reason", *REVIEW_SIGNAL_COLUMNS, "confidence") if c in ok.columns]
    joined = reference.merge(ok[["image_path", *LANDMARK_COLUMNS, *review_columns]], on="image_path", how="inner", suffixes=("_ref", ""))
    if joined.empty:
        raise ValueError(_why_nothing_to_score(predictions, reference))
    reference_points = joined[[f"{c}_ref" for c in LANDMARK_COLUMNS]].to_numpy(dtype=np.float64).reshape(-1, 4, 2)
    predicted_points = landmarks_original_px(joined)
    spacing = joined["pixel_spacing_mm"].to_numpy(dtype=np.float64) if "pixel_spacing_mm" in joined else np.full(len(joined), np.nan)
    reference_hc = joined["hc_mm"].to_numpy(dtype=np.float64) if "hc_mm" in joined else None
    errors = per_image_errors(predicted_points, reference_points, spacing, reference_hc)
    errors.insert(0, "image_path", joined["image_path"].to_numpy())
    for column in review_columns:
        errors[column] = joined[column].to_numpy()
    summary = summarize(errors)
    large = errors["hc_ellipse_diff_mm"].abs() > LARGE_ERROR_MM
    summary[f"hc_ellipse_images_over_{LARGE_ERROR_MM:g}mm"] = int(large.sum())
    if "needs_review" in errors:
        flagged = errors["needs_review"].astype(str).str.lower().isin(["true", "1"]).to_numpy()
        summary["flagged_fraction"] = float(flagged.mean())
        summary[f"flagged_of_images_over_{LARGE_ERROR_MM:g}mm"] = float(flagged[large.to_numpy()].mean()) if large.any() else None
        # What a user who reviews the flagged rows gets from the rest, and what the flag set aside.
        for name, rows in (("not_flagged", ~flagged), ("flagged", flagged)):
            summary[f"hc_ellipse_mae_mm_{name}"] = float(errors.loc[rows, "hc_ellipse_diff_mm"].abs().mean()) if rows.any() else None
    unmeasured = _unmeasured_images(reference, joined, predictions)
    _count_unmeasured_as_failures(summary, unmeasured)
    storage.makedirs(output_dir)
    storage.write_text(storage.join(output_dir, "unmeasured_images.csv"), unmeasured.to_csv(index=False))
    storage.write_text(storage.join(output_dir, "per_image_errors.csv"), errors.to_csv(index=False))
    storage.write_text(storage.join(output_dir, "metrics.json"), json.dumps(summary, indent=2))
    bland_altman_plot(errors, "hc_ellipse_diff_mm", storage.join(output_dir, "bland_altman_hc.png"))
    return summary
