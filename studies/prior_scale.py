"""Does the refinement stage lean on the size of its prior? Stage 2 run behind stage 1's ellipse with both axes scaled.

    python studies/prior_scale.py --train-manifest runs/hc18_train.csv --manifest runs/hc18_val.csv \
        --train-errors runs/refine_full/model_confirm12.pt.calibration/report/per_image_errors.csv \
        --variants 'runs/robust_shipped3/predictions/*/report/per_image_errors.csv'

In-process, with the model's int8 predictor (`stage_attribution`'s stage-1 priors, dark scans brightened as in
inference). For every labelled image, stage 2 runs behind stage 1's ellipse with both axes times each of `SCALES`.
It reports:
  * the lean: per image, the slope of log(stage 2's HC) against log(the prior's HC); 1 would be a stage that only
    follows its prior, 0 one that ignores its size;
  * HC MAE on --manifest at each scale, and for the mean of the measurements over several scales (a test-time
    augmentation), each with a size line refitted on --train-manifest at that setting, as `calibrate` fits it;
  * the prior-size sensitivity |HC(×1) − HC(×0.97)| (mm) as a review signal: its area under the ROC curve for HC errors
    above 5 mm, alone, and what the review rule (`review.ReviewRule`, fitted as `calibrate` fits it at the shipped
    budget) catches with and without it, on the validation images and on the robustness variants (--variants: the
    `per_image_errors.csv` of `studies/robustness.py`'s run, whose folders are named after the variants).
Writes studies/results/prior_scale.json (or --results)."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import cv2
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stage_attribution import BATCH, load_labelled_images, stage_outputs, variant_images  # noqa: E402

from fetalpipe.data.manifest import load_manifest  # noqa: E402
from fetalpipe.measure import ellipse as ellipse_geometry  # noqa: E402
from fetalpipe.measure import review  # noqa: E402
from fetalpipe.measure.biometry import biometry_mm  # noqa: E402
from fetalpipe.measure.calibration import SizeCalibration  # noqa: E402
from fetalpipe.model.model_file import file_sha256  # noqa: E402

SCALES = (0.9, 0.94, 0.97, 1.0, 1.03, 1.06, 1.1)
AVERAGED = {"0.97-1.03": (0.97, 1.0, 1.03), "0.94-1.06": (0.94, 0.97, 1.0, 1.03, 1.06), "all": SCALES}
SENSITIVITY = "prior_size_sensitivity_mm"


def hc_behind_scaled_priors(predictor, originals: list[np.ndarray], priors: np.ndarray, pixel_spacing_mm: np.ndarray,
                            scales=SCALES) -> dict[float, np.ndarray]:
    """{scale: stage 2's HC (mm, before the size line) behind the priors with both axes × scale}; NaN where stage 1 found no head."""
    found = np.flatnonzero(np.isfinite(priors).all(axis=1))
    measured = {}
    for scale in scales:
        scaled = priors[found].copy()
        scaled[:, 2:4] *= scale
        points = ellipse_geometry.to_endpoints(scaled)
        refined = np.concatenate([predictor.refine([originals[i] for i in found[start:start + BATCH]], points[start:start + BATCH])[0]
                                  for start in range(0, len(found), BATCH)])
        hc_mm = np.full(len(priors), np.nan)
        hc_mm[found] = biometry_mm(refined, pixel_spacing_mm[found])["hc_ellipse_mm"]
        measured[scale] = hc_mm
    return measured


def measured_behind_scaled_priors(predictor, table: pd.DataFrame, images: list[np.ndarray], scales=SCALES) -> dict[float, np.ndarray]:
    """`hc_behind_scaled_priors` for labelled images given in memory (uint8 [H, W]), behind their own stage-1 priors."""
    priors, originals = stage_outputs(predictor, table, images)
    return hc_behind_scaled_priors(predictor, originals, priors, table["pixel_spacing_mm"].to_numpy(float), scales)


def lean_slopes(measured: dict[float, np.ndarray]) -> np.ndarray:
    """Per image: d log(stage 2's HC) / d log(prior scale), over every scale."""
    log_scales = np.log(np.array(list(measured)))
    log_hc = np.log(np.stack(list(measured.values())))
    centred = log_scales - log_scales.mean()
    return (centred[:, None] * (log_hc - log_hc.mean(axis=0))).sum(axis=0) / (centred ** 2).sum()


def accuracy_rows(train_table, train_measured, val_table, val_measured) -> list[dict]:
    settings = {f"×{scale}": (scale,) for scale in SCALES}
    settings.update({f"mean of {name}": scales for name, scales in AVERAGED.items()})
    rows = []
    for label, scales in settings.items():
        def averaged(measured):
            return np.exp(np.mean([np.log(measured[scale]) for scale in scales], axis=0))
        train_hc, val_hc = averaged(train_measured), averaged(val_measured)
        line = SizeCalibration.fit(train_hc, train_table["hc_mm"].to_numpy(float))
        errors = np.abs(val_hc * line.scale(val_hc) - val_table["hc_mm"].to_numpy(float))
        rows.append({"setting": label, "hc_mae_mm": float(np.nanmean(errors)), "median_mm": float(np.nanmedian(errors)),
                     "above_5mm": int((errors > review.LARGE_ERROR_MM).sum())})
    return rows


def with_sensitivity(errors_table: pd.DataFrame, sensitivity_by_stem: pd.Series) -> pd.DataFrame:
    stems = errors_table["image_path"].map(lambda path: os.path.splitext(os.path.basename(path))[0])
    return errors_table.assign(**{SENSITIVITY: stems.map(sensitivity_by_stem).to_numpy()})


def review_rows(train_errors: pd.DataFrame, sets: dict[str, pd.DataFrame], budget: float) -> list[dict]:
    """The rule fitted on the training split with and without the sensitivity, applied to each set."""
    rows = []
    for label, extra in (("shipped signals", ()), (f"+ {SENSITIVITY}", (SENSITIVITY,))):
        rule = review.ReviewRule.fit(train_errors, train_errors["hc_ellipse_diff_mm"].abs().to_numpy(), max_flagged_fraction=budget,
                                     candidate_signals=review.SIGNALS + extra, log_scale_signals=review.LOG_SCALE_SIGNALS + extra)
        row = {"rule": label, "weights": dict(zip(rule.signals, rule.weights))}
        for name, table in sets.items():
            errors = table["hc_ellipse_diff_mm"].abs().to_numpy()
            row[name] = review.catch_curve(table, errors, rule)
            score, large = rule.score(table), errors > review.LARGE_ERROR_MM
            row[name]["auc"] = float(roc_auc_score(large, score))
            if rows:  # the same share flagged as the rule without the sensitivity flags there: does it rank better?
                share = rows[0][name]["flagged_fraction"]
                row[name]["caught_at_the_same_share"] = int((large & (score > np.quantile(score, 1 - share))).sum())
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="labelled validation manifest")
    parser.add_argument("--train-manifest", required=True, help="labelled training manifest: the size lines and the rule are fitted there")
    parser.add_argument("--train-errors", required=True, help="the training split's per_image_errors.csv as `calibrate` wrote it")
    parser.add_argument("--variants", required=True, help="GLOB of the robustness run's per_image_errors.csv files")
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "prior_scale.json"))
    args = parser.parse_args()

    model_path, predictor, val_table, val_images = load_labelled_images(args.manifest, args.model, args.threads)
    train_table = load_manifest(args.train_manifest, require_landmarks=True).reset_index(drop=True)
    train_images = [cv2.imread(path, cv2.IMREAD_GRAYSCALE) for path in train_table["image_path"]]
    train_measured = measured_behind_scaled_priors(predictor, train_table, train_images)
    val_measured = measured_behind_scaled_priors(predictor, val_table, val_images)
    slopes = {"train": lean_slopes(train_measured), "validation": lean_slopes(val_measured)}
    accuracy = accuracy_rows(train_table, train_measured, val_table, val_measured)

    # The review signal. The training errors are taken after the size line, as `calibrate` fits the rule on them.
    train_errors = pd.read_csv(args.train_errors)
    if predictor.calibration is not None:
        measured = (train_errors["reference_hc_mm"] + train_errors["hc_ellipse_diff_mm"]).to_numpy()
        train_errors["hc_ellipse_diff_mm"] = measured * predictor.calibration.scale(measured) - train_errors["reference_hc_mm"].to_numpy()

    def stems(table):
        return [os.path.splitext(os.path.basename(path))[0] for path in table["image_path"]]

    def sensitivity(measured):
        return np.abs(measured[1.0] - measured[0.97])

    train_errors = with_sensitivity(train_errors, pd.Series(sensitivity(train_measured), index=stems(train_table)))
    variant_tables = {}  # by variant: the robustness run's per-image table, with the sensitivity
    for path in sorted(glob.glob(args.variants)):
        name = path.split(os.sep)[-3]
        images, spacing_mm = variant_images(name, val_images, val_table)
        measured = measured_behind_scaled_priors(predictor, val_table.assign(pixel_spacing_mm=spacing_mm), images, scales=(0.97, 1.0))
        variant_tables[name] = with_sensitivity(pd.read_csv(path), pd.Series(sensitivity(measured), index=stems(val_table)))
        print(f"variant {name}", flush=True)
    sets = {"train": train_errors, "variants": pd.concat(variant_tables.values(), ignore_index=True),
            **({"validation": variant_tables["clean"]} if "clean" in variant_tables else {})}
    signal_auc = {name: float(roc_auc_score(table["hc_ellipse_diff_mm"].abs().to_numpy() > review.LARGE_ERROR_MM, table[SENSITIVITY].to_numpy()))
                  for name, table in sets.items()}
    rules = review_rows(train_errors, sets, review.MAX_FLAGGED_FRACTION)

    print(f"lean (median slope of log HC on log prior scale): training {np.nanmedian(slopes['train']):.2f}, validation {np.nanmedian(slopes['validation']):.2f}")
    print("| stage 2 behind stage 1's prior × | HC MAE (mm) | median | > 5 mm |\n|---|---|---|---|")
    for row in accuracy:
        print(f"| {row['setting']} | {row['hc_mae_mm']:.3f} | {row['median_mm']:.2f} | {row['above_5mm']} |")
    print(f"{SENSITIVITY} alone, area under the ROC curve: " + ", ".join(f"{name} {auc:.2f}" for name, auc in signal_auc.items()))
    for row in rules:
        print(f"{row['rule']}: " + "; ".join(f"{name} {row[name]['flagged_fraction']:.1%} flagged, {row[name]['caught']}/{row[name]['large_errors']} caught, "
                                          f"AUC {row[name]['auc']:.2f}" + (f", {row[name]['caught_at_the_same_share']} at the other rule's share"
                                                                           if "caught_at_the_same_share" in row[name] else "") for name in sets))
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as handle:
        json.dump({"command": " ".join(sys.argv), "model_sha256": file_sha256(model_path), "scales": SCALES,
                   "lean_slope": {name: {"median": float(np.nanmedian(values)), "mean": float(np.nanmean(values))} for name, values in slopes.items()},
                   "accuracy": accuracy, "signal_auc": signal_auc, "review": rules}, handle, indent=2, default=float)


if __name__ == "__main__":
    main()
