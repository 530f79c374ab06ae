"""Stage 1's own priors for the refinement stage's training: each training image's stage-1 ellipse from a stage 1 that
never saw it (trained on the other half of the training subjects), stored in the manifest as ``stage1_prior_*``
columns (`manifest.STAGE1_PRIOR_COLUMNS`). The refinement stage normally trains on jittered reference ellipses, whose
errors are random; stage 1's are not (docs/experiments.md, note 8), and a stage trained on them may learn to correct them.

    python studies/out_of_fold_priors.py halves --manifest runs/hc18.csv --output runs/oof
    fetalpipe train --manifest runs/oof/half_a.csv --output runs/oof/stage1_a --config ellipse_deep --no-calibrate
    fetalpipe train --manifest runs/oof/half_b.csv --output runs/oof/stage1_b --config ellipse_deep --no-calibrate
    python studies/out_of_fold_priors.py priors --manifest runs/hc18.csv \\
        --fold runs/oof/stage1_a/model.pt=runs/oof/half_a.csv --fold runs/oof/stage1_b/model.pt=runs/oof/half_b.csv \\
        --output runs/oof/hc18_with_priors.csv --results studies/results/out_of_fold_priors.json
    fetalpipe train --manifest runs/oof/hc18_with_priors.csv --output runs/r26 --config configs/ellipse_refine_stage1_priors.yaml \\
        --stage1-model fetalpipe/assets/model.pt

Half A is `studies/learning_curve.py`'s half cut (its `both_stages_fraction_0.5` run is a stage 1 trained on it); half
B holds the other training subjects. Both keep every validation row, which `fetalpipe train` splits off as usual. A
training row's prior comes from the fold whose half does not hold it; validation rows get none (NaN). Priors are
measured as `fetalpipe infer`'s stage 1 measures (the scan-region crops included), in fp32."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_record import provenance  # noqa: E402
from learning_curve import kept_training_subject  # noqa: E402
from stage1_ensemble import decoded_batches  # noqa: E402

from fetalpipe.data.manifest import STAGE1_PRIOR_COLUMNS, landmarks_original_px, load_manifest  # noqa: E402
from fetalpipe.measure.biometry import biometry_mm  # noqa: E402
from fetalpipe.model.config import TrainConfig  # noqa: E402
from fetalpipe.pipeline.infer import LandmarkPredictor  # noqa: E402
from fetalpipe.pipeline.preprocess import transforms_of  # noqa: E402
from fetalpipe.pipeline.train import is_validation_subject  # noqa: E402


def validation_rows(table: pd.DataFrame) -> np.ndarray:
    """[N] bool: the rows `fetalpipe train` holds out for validation (its default split by subject)."""
    return table["subject_id"].astype(str).map(lambda subject: is_validation_subject(subject, TrainConfig().val_fraction)).to_numpy()


def write_halves(manifest: str, output: str) -> None:
    """half_a.csv / half_b.csv: every validation row, and the training rows of half of the training subjects each."""
    table = load_manifest(manifest, require_landmarks=True)
    is_val = validation_rows(table)
    in_half_a = table["subject_id"].astype(str).map(lambda subject: kept_training_subject(subject, 0.5)).to_numpy()
    os.makedirs(output, exist_ok=True)
    for name, rows in (("half_a", is_val | in_half_a), ("half_b", is_val | ~in_half_a)):
        path = os.path.join(output, f"{name}.csv")
        table[rows].to_csv(path, index=False)
        print(f"{path}: {int((rows & ~is_val).sum())} training + {int(is_val.sum())} validation rows")


def stage1_priors_px(model: str, table: pd.DataFrame, threads: int) -> np.ndarray:
    """[N, 4, 2] stage 1's endpoints in original pixels (NaN: no head), as inference's stage 1 finds them."""
    predictor = LandmarkPredictor(model, threads=threads, precision="fp32")
    points = []
    for batch in decoded_batches(table, predictor.codec.input_size):
        transforms = transforms_of(batch, predictor.codec.input_size)
        points.append(predictor.locate(batch["image"], transforms, batch["original_pixels"], batch["scan_candidate"])[0])
    return np.concatenate(points)


def write_priors(manifest: str, folds: list[str], output: str, threads: int, results: str | None) -> None:
    table = load_manifest(manifest, require_landmarks=True)
    is_val = validation_rows(table)
    priors_px = np.full((len(table), 4, 2), np.nan)
    summary = []
    for fold in folds:
        model, half_manifest = fold.split("=", 1)
        trained_on = set(load_manifest(half_manifest)["image_path"])
        rows = np.flatnonzero(~is_val & ~table["image_path"].isin(trained_on).to_numpy() & np.isnan(priors_px).all(axis=(1, 2)))
        priors_px[rows] = stage1_priors_px(model, table.iloc[rows].reset_index(drop=True), threads)
        part = table.iloc[rows]
        hc_mm = biometry_mm(priors_px[rows], part["pixel_spacing_mm"].to_numpy())["hc_ellipse_mm"]
        hc_error_mm = hc_mm - part["hc_mm"].to_numpy()
        centre_error_mm = np.linalg.norm(priors_px[rows].mean(axis=1) - landmarks_original_px(part).mean(axis=1), axis=1) * part["pixel_spacing_mm"].to_numpy()
        summary.append({"model": model, "half": half_manifest, "images": len(rows), "no_head": int(np.isnan(hc_mm).sum()),
                        "hc_mae_mm": float(np.nanmean(np.abs(hc_error_mm))), "hc_bias_mm": float(np.nanmean(hc_error_mm)),
                        "centre_error_median_mm": float(np.nanmedian(centre_error_mm))})
        print(f"{model}: priors for {len(rows)} training images it never saw; stage 1 alone HC MAE {summary[-1]['hc_mae_mm']:.2f} mm "
              f"(bias {summary[-1]['hc_bias_mm']:+.2f}), {summary[-1]['no_head']} without a head", flush=True)
    missing = int((~is_val & np.isnan(priors_px).any(axis=(1, 2))).sum())
    print(f"{output}: {len(table)} rows; {missing} training rows without a prior (the refinement stage jitters their reference)")
    table.assign(**dict(zip(STAGE1_PRIOR_COLUMNS, priors_px.reshape(len(table), 8).T))).to_csv(output, index=False)
    if results:
        with open(results, "w") as handle:
            json.dump({**provenance(), "manifest": manifest, "folds": summary, "training_rows_without_prior": missing}, handle, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    halves = commands.add_parser("halves", help="write half_a.csv and half_b.csv")
    halves.add_argument("--manifest", required=True)
    halves.add_argument("--output", required=True, help="a folder")
    priors = commands.add_parser("priors", help="write the manifest with out-of-fold stage-1 priors")
    priors.add_argument("--manifest", required=True)
    priors.add_argument("--fold", action="append", required=True, help="MODEL=HALF_MANIFEST: a stage 1 and the manifest it trained on")
    priors.add_argument("--output", required=True, help="the manifest to write (CSV)")
    priors.add_argument("--threads", type=int, default=2)
    priors.add_argument("--results", help="write each fold's stage-1 error to this JSON file")
    args = parser.parse_args()
    if args.command == "halves":
        write_halves(args.manifest, args.output)
    else:
        write_priors(args.manifest, args.fold, args.output, args.threads, args.results)


if __name__ == "__main__":
    main()
