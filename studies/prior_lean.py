"""Does the refinement stage lean on its prior's size by the right amount? Its HC moved toward, or past, the size at
which it would agree with its prior.

    python studies/prior_lean.py --train-manifest runs/hc18_train.csv --manifest runs/hc18_val.csv

Stage 2's HC follows about a tenth of a change in its prior's size (`prior_scale.py`'s lean). For every labelled image,
stage 2 runs behind stage 1's ellipse with both axes times each of `SCALES`; a line through log(HC) against log(scale)
gives the size at which stage 2 would return the prior it was given (H(s) = s × the prior's HC): the measurement of a
stage that ignores its prior's size. Each setting moves the shipped measurement (scale 1) a share of the way there:
share 1 is that fixed point, a negative share leans further on stage 1's size. A size line is refitted on
--train-manifest for each share, as `calibrate` fits it, and HC MAE reported on both splits: the training split is where
a share would be chosen. In-process, with the model's int8 predictor (`stage_attribution`'s stage-1 priors, dark scans
brightened as in inference). Writes studies/results/prior_lean.json (or --results)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import cv2
import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

from bench_record import provenance  # noqa: E402  (the machine, Python and commit every result records)
from prior_scale import hc_behind_scaled_priors, lean_slopes  # noqa: E402
from stage_attribution import load_labelled_images, stage_outputs  # noqa: E402

from fetalpipe.data.manifest import load_manifest  # noqa: E402
from fetalpipe.measure import ellipse as ellipse_geometry  # noqa: E402
from fetalpipe.measure import review  # noqa: E402
from fetalpipe.measure.biometry import biometry_mm  # noqa: E402
from fetalpipe.measure.calibration import SizeCalibration  # noqa: E402
from fetalpipe.model.model_file import file_sha256  # noqa: E402

SCALES = (0.94, 0.97, 1.0, 1.03, 1.06)
SHARES = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)


def fixed_point_hc(measured: dict[float, np.ndarray], prior_hc_mm: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """Per image: the HC (mm) at which stage 2 returns its prior's size, from the least-squares line
    log(HC) = a + b log(scale) whose slope b (the lean, `prior_scale.lean_slopes`) is given. A stage that follows its
    prior's size fully or more (b >= 1) has no such point: it keeps its measurement at scale 1."""
    log_scales = np.log(np.array(list(measured)))
    intercept = np.log(np.stack(list(measured.values()))).mean(axis=0) - slope * log_scales.mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        fixed_point_log_scale = (intercept - np.log(prior_hc_mm)) / (1 - slope)
    return np.where(slope < 1, np.exp(intercept + slope * fixed_point_log_scale), measured[1.0])


def measured_split(predictor, table: pd.DataFrame, images: list[np.ndarray]) -> dict:
    """For labelled images: stage 2's HC behind stage 1's prior (``hc_mm``, mm), its lean on the prior's size
    (``lean``) and the HC at its fixed point (``fixed_point_hc_mm``), per image."""
    priors, originals = stage_outputs(predictor, table, images)
    spacing_mm = table["pixel_spacing_mm"].to_numpy(float)
    prior_hc_mm = biometry_mm(ellipse_geometry.to_endpoints(priors), spacing_mm)["hc_ellipse_mm"]
    measured = hc_behind_scaled_priors(predictor, originals, priors, spacing_mm, SCALES)
    lean = lean_slopes(measured)
    return {"hc_mm": measured[1.0], "lean": lean, "fixed_point_hc_mm": fixed_point_hc(measured, prior_hc_mm, lean)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="labelled validation manifest")
    parser.add_argument("--train-manifest", required=True, help="labelled training manifest: the size lines are fitted there")
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "prior_lean.json"))
    args = parser.parse_args()

    model_path, predictor, val_table, val_images = load_labelled_images(args.manifest, args.model, args.threads)
    train_table = load_manifest(args.train_manifest, require_landmarks=True).reset_index(drop=True)
    train_images = [cv2.imread(path, cv2.IMREAD_GRAYSCALE) for path in train_table["image_path"]]
    tables = {"train": train_table, "validation": val_table}
    splits = {"train": measured_split(predictor, train_table, train_images), "validation": measured_split(predictor, val_table, val_images)}
    rows = []
    for share in SHARES:  # each split's measurement moved `share` of the way to its fixed point
        hc_mm = {name: split["hc_mm"] + share * (split["fixed_point_hc_mm"] - split["hc_mm"]) for name, split in splits.items()}
        line = SizeCalibration.fit(hc_mm["train"], train_table["hc_mm"].to_numpy(float))
        row = {"share": share}
        for name, table in tables.items():
            errors = np.abs(hc_mm[name] * line.scale(hc_mm[name]) - table["hc_mm"].to_numpy(float))
            row[name] = {"hc_mae_mm": float(np.nanmean(errors)), "above_5mm": int((errors > review.LARGE_ERROR_MM).sum())}
        rows.append(row)

    slopes = {name: {"median": float(np.nanmedian(split["lean"])), "images_at_1_or_more": int(np.sum(split["lean"] >= 1))}
              for name, split in splits.items()}
    print("lean (slope of log HC on log prior scale): " + ", ".join(
        f"{name} median {lean['median']:.3f}, {lean['images_at_1_or_more']} images at 1 or more (kept as measured)" for name, lean in slopes.items()))
    print("| share of the way to the fixed point | training HC MAE (mm) | > 5 mm | validation HC MAE (mm) | > 5 mm |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['share']:+.2f} | {row['train']['hc_mae_mm']:.3f} | {row['train']['above_5mm']} | "
              f"{row['validation']['hc_mae_mm']:.3f} | {row['validation']['above_5mm']} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as handle:
        json.dump({**provenance(), "command": " ".join(sys.argv), "model_sha256": file_sha256(model_path), "scales": SCALES, "lean": slopes,
                   "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
