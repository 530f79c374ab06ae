"""Time-to-accuracy of a training run, read from its RUN_DIR/metrics.csv (written by `fetalpipe train`).

    python bench/time_to_accuracy.py runs/deep_full --targets 5 3 2.5

Cumulative training time is the sum of per-epoch wall seconds measured in the training loop (data
loading, forward, backward, all-reduce and validation; not Ray start-up or dataset preparation, which
RUN_DIR/run.json's wall_seconds includes). In runs older than the `train_seconds` column, epoch_seconds
did not include validation.
Prints a table and writes bench/results/time_to_accuracy_<run>.json."""

from __future__ import annotations

import argparse
import json
import os

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--targets", type=float, nargs="+", default=[10.0, 5.0, 3.0, 2.5, 2.0, 1.8], help="val HC MAE (mm)")
    args = parser.parse_args()
    metrics = pd.read_csv(os.path.join(args.run_dir, "metrics.csv"))
    metrics["minutes"] = metrics["epoch_seconds"].cumsum() / 60
    best_so_far = metrics["val_hc_mae_mm"].cummin()
    reached = {}
    for target in args.targets:
        hit = metrics[best_so_far <= target]
        reached[f"{target:g}"] = None if hit.empty else {"epoch": int(hit["epoch"].iloc[0]), "minutes": round(float(hit["minutes"].iloc[0]), 1)}
    best = metrics.loc[metrics["val_hc_mae_mm"].idxmin()]
    result = {
        "run_dir": os.path.abspath(args.run_dir),
        "epochs": int(metrics["epoch"].max()),
        "total_minutes": round(float(metrics["minutes"].iloc[-1]), 1),
        "best_val_hc_mae_mm": round(float(best["val_hc_mae_mm"]), 3),
        "best_epoch": int(best["epoch"]),
        "median_train_img_per_s": round(float(metrics["train_img_per_s"].median()), 1),
        "first_reached": reached,
    }
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    name = os.path.basename(os.path.normpath(args.run_dir))
    with open(os.path.join(os.path.dirname(__file__), "results", f"time_to_accuracy_{name}.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"{name}: {result['epochs']} epochs in {result['total_minutes']} min "
          f"(median {result['median_train_img_per_s']} img/s); best val HC MAE {result['best_val_hc_mae_mm']} mm at epoch {result['best_epoch']}")
    print(f"{'val HC MAE <=':>14s} {'epoch':>6s} {'minutes':>8s}")
    for target, hit in reached.items():
        print(f"{target + ' mm':>14s} {hit['epoch'] if hit else '-':>6} {hit['minutes'] if hit else '-':>8}")


if __name__ == "__main__":
    main()
