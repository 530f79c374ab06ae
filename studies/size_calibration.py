"""Does the size calibration generalise? For each trained run: fit it on the run's training split
(`fetalpipe calibrate`), then measure the validation split with the model as trained and as calibrated.

    python studies/size_calibration.py --manifest runs/hc18.csv runs/deep_full runs/shipped_full runs/attn_full \
        runs/soft_edge_full runs/full_res runs/noaug_full

Each RUN_DIR holds a `model.pt` trained on MANIFEST's training split. Validation is the same split by subject_id that
training held out, so the line is fitted on images the validation figures never saw. Also prints the mean HC error by quarter
of pixel spacing (the bias the line corrects), for the labels themselves and for each run. Prints a table and writes
studies/results/size_calibration.json (and, per run, RUN_DIR/model_calibrated.pt)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fetalpipe.data.manifest import landmarks_original_px, load_manifest  # noqa: E402
from fetalpipe.measure.biometry import biometry_mm  # noqa: E402
from fetalpipe.model.model_file import read_model_header  # noqa: E402
from fetalpipe.pipeline.calibrate import calibrate_model  # noqa: E402
from fetalpipe.pipeline.evaluate import evaluate_predictions  # noqa: E402
from fetalpipe.pipeline.infer import InferOptions, run_inference  # noqa: E402
from fetalpipe.pipeline.train import split_by_subject  # noqa: E402

METRICS = ("hc_ellipse_mae_mm", "hc_ellipse_mean_diff_mm", "bpd_mae_mm", "ofd_mae_mm", "mre_mm", "sdr_2mm")


def measure(model_path: str, manifest_path: str, folder: str) -> dict:
    run_inference(InferOptions(output_dir=os.path.join(folder, "inference"), manifest=manifest_path, model_path=model_path, overwrite=True))
    summary = evaluate_predictions(os.path.join(folder, "inference"), manifest_path, os.path.join(folder, "report"))
    errors = pd.read_csv(os.path.join(folder, "report", "per_image_errors.csv"))
    summary["hc_errors_over_5mm"] = int((errors["hc_ellipse_diff_mm"].abs() > 5).sum())
    return summary


def signed_error_by_spacing_quarter(errors: pd.DataFrame, manifest: pd.DataFrame) -> list[float]:
    """Mean HC error (measured - reference, mm) in each quarter of the images' pixel spacing, finest first."""
    joined = errors if "pixel_spacing_mm" in errors else errors.merge(manifest[["image_path", "pixel_spacing_mm"]], on="image_path")
    return [round(float(value), 3) for value in joined.groupby(pd.qcut(joined["pixel_spacing_mm"], 4), observed=True)["hc_ellipse_diff_mm"].mean()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="the manifest the runs were trained on")
    parser.add_argument("runs", nargs="+", help="run folders, each with a model.pt")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "size_calibration.json"))
    args = parser.parse_args()

    manifest = load_manifest(args.manifest, require_landmarks=True)
    # Are the labels the cause? The importer's endpoints against the published HC, by the same quarters.
    label_error = manifest.assign(hc_ellipse_diff_mm=biometry_mm(landmarks_original_px(manifest), manifest["pixel_spacing_mm"])["hc_ellipse_mm"] - manifest["hc_mm"])
    label_bias = signed_error_by_spacing_quarter(label_error, manifest)
    print(f"label HC - published HC by quarter of pixel spacing (mm): {label_bias}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for run_dir in args.runs:
            model_path = os.path.join(run_dir, "model.pt")
            calibrated_path = os.path.join(run_dir, "model_calibrated.pt")
            fit = calibrate_model(model_path, args.manifest, calibrated_path)
            val_fraction = read_model_header(model_path)["train_config"]["val_fraction"]
            _, val_table = split_by_subject(manifest, val_fraction)
            val_manifest = os.path.join(folder, "val.csv")
            val_table.to_csv(val_manifest, index=False)
            before = measure(model_path, val_manifest, os.path.join(folder, "before"))
            after = measure(calibrated_path, val_manifest, os.path.join(folder, "after"))
            train_errors = pd.read_csv(os.path.join(calibrated_path + ".calibration", "report", "per_image_errors.csv"))
            val_errors = pd.read_csv(os.path.join(folder, "before", "report", "per_image_errors.csv"))
            row = {"run": run_dir, "intercept_mm": fit["intercept_mm"], "slope": fit["slope"], "train_images": fit["images"],
                   "train_hc_mae_mm_before": fit["train_hc_mae_mm_before"], "train_hc_mae_mm_after": fit["train_hc_mae_mm_after"],
                   "val_images": before["images"],
                   "train_hc_bias_mm_by_spacing_quarter": signed_error_by_spacing_quarter(train_errors, manifest),
                   "val_hc_bias_mm_by_spacing_quarter_before": signed_error_by_spacing_quarter(val_errors, manifest)}
            for name in (*METRICS, "hc_errors_over_5mm"):
                row[f"val_{name}_before"], row[f"val_{name}_after"] = before[name], after[name]
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = pd.DataFrame(rows)
    shown = pd.DataFrame({
        "run": table["run"].map(os.path.basename),
        "error = a + b·HC": [f"{a:+.2f} {b:+.4f}·HC" for a, b in zip(table["intercept_mm"], table["slope"])],
        "train HC MAE": [f"{x:.3f} → {y:.3f}" for x, y in zip(table["train_hc_mae_mm_before"], table["train_hc_mae_mm_after"])],
        "val HC MAE": [f"{x:.3f} → {y:.3f}" for x, y in zip(table["val_hc_ellipse_mae_mm_before"], table["val_hc_ellipse_mae_mm_after"])],
        "val BPD MAE": [f"{x:.3f} → {y:.3f}" for x, y in zip(table["val_bpd_mae_mm_before"], table["val_bpd_mae_mm_after"])],
        "val OFD MAE": [f"{x:.3f} → {y:.3f}" for x, y in zip(table["val_ofd_mae_mm_before"], table["val_ofd_mae_mm_after"])],
        "val > 5 mm": [f"{x} → {y}" for x, y in zip(table["val_hc_errors_over_5mm_before"], table["val_hc_errors_over_5mm_after"])],
        "train bias by spacing quarter": table["train_hc_bias_mm_by_spacing_quarter"],
        "val bias by spacing quarter": table["val_hc_bias_mm_by_spacing_quarter_before"],
    })
    print(shown.to_string(index=False))
    gain = table["val_hc_ellipse_mae_mm_before"] - table["val_hc_ellipse_mae_mm_after"]
    print(f"validation HC MAE gain: mean {gain.mean():.3f} mm, range {gain.min():.3f} to {gain.max():.3f} over {len(table)} runs")
    with open(args.results, "w") as handle:
        json.dump({"manifest": args.manifest, "label_hc_bias_mm_by_spacing_quarter": label_bias, "rows": rows, "val_hc_mae_gain_mm": {"mean": float(gain.mean()), "min": float(gain.min()), "max": float(gain.max())}},
                  handle, indent=1, default=lambda value: value.item() if isinstance(value, np.generic) else str(value))


if __name__ == "__main__":
    main()
