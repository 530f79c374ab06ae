"""Is any HC bias left after the size line that a calibration could still remove? From two `fetalpipe evaluate` reports of
the same model, one on its training split and one on validation.

Why: the size line (`fetalpipe calibrate`, docs/experiments.md note 9) corrects HC by a line in the measured HC only. The
coarsest quarter of pixel spacing holds most of the large errors, so this asks whether the signed error still depends on
the pixel spacing or on the head's axis ratio, on the training split, and whether that dependence carries to validation:
it fits HC error = a + b × spacing + c × measured HC + d × axis ratio on the training split (least squares) and applies it
to validation.

    fetalpipe infer --manifest runs/hc18_train.csv --output runs/train_now
    fetalpipe evaluate --predictions runs/train_now --manifest runs/hc18_train.csv --output runs/train_now/report
    (the same for runs/hc18_val.csv into runs/val_now)
    python studies/size_covariates.py --train-report runs/train_now/report --val-report runs/val_now/report \
        --manifest runs/hc18.csv --results studies/results/size_covariates.json

Prints the mean error by quarter of pixel spacing for both splits and the validation HC MAE with the fitted correction."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fetalpipe.data.manifest import load_manifest  # noqa: E402

COVARIATES = ["pixel_spacing_mm", "measured_hc_mm", "axis_ratio"]


def errors_with_spacing(report_dir: str, manifest: pd.DataFrame) -> pd.DataFrame:
    """The report's per-image errors with each image's pixel spacing and measured HC (mm, after the size line)."""
    errors = pd.read_csv(f"{report_dir}/per_image_errors.csv").merge(manifest[["image_path", "pixel_spacing_mm"]], on="image_path")
    errors["measured_hc_mm"] = errors["reference_hc_mm"] + errors["hc_ellipse_diff_mm"]
    return errors[np.isfinite(errors["hc_ellipse_diff_mm"])].reset_index(drop=True)


def bias_by_spacing_quarter(errors: pd.DataFrame) -> list[dict]:
    quarter = pd.qcut(errors["pixel_spacing_mm"], 4, labels=False)
    return [{"quarter": int(q), "pixel_spacing_mm": round(float(group["pixel_spacing_mm"].mean()), 3),
             "mean_hc_error_mm": round(float(group["hc_ellipse_diff_mm"].mean()), 3),
             "hc_mae_mm": round(float(group["hc_ellipse_diff_mm"].abs().mean()), 3), "images": len(group)}
            for q, group in errors.groupby(quarter)]


def design(errors: pd.DataFrame) -> np.ndarray:
    return np.column_stack([np.ones(len(errors)), errors[COVARIATES].to_numpy(dtype=float)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-report", required=True)
    parser.add_argument("--val-report", required=True)
    parser.add_argument("--manifest", required=True, help="a manifest holding both splits' pixel_spacing_mm")
    parser.add_argument("--results")
    args = parser.parse_args()

    manifest = load_manifest(args.manifest)  # image paths resolved as the reports hold them
    train, val = (errors_with_spacing(report, manifest) for report in (args.train_report, args.val_report))
    coefficients, *_ = np.linalg.lstsq(design(train), train["hc_ellipse_diff_mm"].to_numpy(), rcond=None)
    corrected = val["hc_ellipse_diff_mm"].to_numpy() - design(val) @ coefficients
    before = val["hc_ellipse_diff_mm"].abs()
    results = {
        "covariates": COVARIATES,
        "coefficients": [round(float(value), 5) for value in coefficients],
        "train_bias_by_spacing_quarter": bias_by_spacing_quarter(train),
        "val_bias_by_spacing_quarter": bias_by_spacing_quarter(val),
        "val_hc_mae_mm": {"as_shipped": round(float(before.mean()), 3), "corrected": round(float(np.abs(corrected).mean()), 3)},
        "val_images_over_5_mm": {"as_shipped": int((before > 5).sum()), "corrected": int((np.abs(corrected) > 5).sum())},
    }
    for split in ("train", "val"):
        print(f"{split}: mean HC error by quarter of pixel spacing")
        print(pd.DataFrame(results[f"{split}_bias_by_spacing_quarter"]).to_string(index=False))
    print("fitted on train: error =", " + ".join(f"{c:.4g}·{n}" for c, n in zip(coefficients, ["1", *COVARIATES])))
    print("validation HC MAE", results["val_hc_mae_mm"], "images > 5 mm", results["val_images_over_5_mm"])
    if args.results:
        with open(args.results, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
