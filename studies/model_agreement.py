"""Whether trained models share their per-image errors: HC MAE of each, the correlation of their per-image HC errors,
and the HC MAE of their mean measurement (what averaging them, an ensemble, would score).

    python studies/model_agreement.py --set R2c=runs/val_shipped3/report/per_image_errors.csv \
        --set R6=runs/val_r6/report/per_image_errors.csv --set R12=runs/val_r12/eval/per_image_errors.csv

Each `--set NAME=CSV` is `fetalpipe evaluate`'s per-image table of one model on the same images (rows are matched by
image path; images missing from any table are left out). Errors are `hc_ellipse_diff_mm`, as `evaluate` reports them.
Prints the table and writes studies/results/model_agreement.json (or --results)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fetalpipe.measure.review import LARGE_ERROR_MM  # noqa: E402


def hc_errors(sets: dict[str, str]) -> pd.DataFrame:
    """[images, models] signed HC errors in mm, on the images every table has."""
    columns = {name: pd.read_csv(path).set_index("image_path")["hc_ellipse_diff_mm"] for name, path in sets.items()}
    return pd.DataFrame(columns).dropna()


def summarise(errors: pd.DataFrame) -> dict:
    ensemble = errors.mean(axis=1)
    return {
        "images": int(len(errors)),
        "hc_mae_mm": {name: float(errors[name].abs().mean()) for name in errors},
        "images_over_5mm": {name: int((errors[name].abs() > LARGE_ERROR_MM).sum()) for name in errors},
        "correlation": errors.corr().round(4).to_dict(),
        "ensemble_hc_mae_mm": float(ensemble.abs().mean()),
        "ensemble_median_mm": float(ensemble.abs().median()),
        "ensemble_images_over_5mm": int((ensemble.abs() > LARGE_ERROR_MM).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", required=True, help="NAME=CSV: one model's per_image_errors.csv")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "model_agreement.json"))
    args = parser.parse_args()
    sets = dict(item.split("=", 1) for item in args.set)
    errors = hc_errors(sets)
    summary = summarise(errors)
    correlations = pd.DataFrame(summary["correlation"]).to_numpy()[np.triu_indices(len(sets), k=1)]
    print(f"{summary['images']} images, {len(sets)} models")
    for name in errors:
        print(f"  {name:8s} HC MAE {summary['hc_mae_mm'][name]:.3f} mm, {summary['images_over_5mm'][name]} above 5 mm")
    print(f"  per-image errors correlate at {correlations.min():.2f}-{correlations.max():.2f} between pairs")
    print(f"  the mean of all {len(sets)}: HC MAE {summary['ensemble_hc_mae_mm']:.3f} mm (median {summary['ensemble_median_mm']:.3f}), "
          f"{summary['ensemble_images_over_5mm']} above 5 mm")
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as handle:
        json.dump({"command": " ".join(sys.argv), "sets": sets, **summary}, handle, indent=2)


if __name__ == "__main__":
    main()
