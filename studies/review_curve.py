"""The review flag's curve: share of images flagged against share of the images above 5 mm HC error that it catches.

    python studies/review_curve.py --model fetalpipe/assets/model.pt \
        --train-errors runs/refine_one/model_calibrated.pt.calibration/report/per_image_errors.csv \
        --set validation=runs/val_pred/report/per_image_errors.csv \
        --set variants='runs/robustness/predictions/*/report/per_image_errors.csv'

`--train-errors` is the training split as `fetalpipe calibrate` measured it (signals and errors per image, kept next to
the calibrated model; the errors are taken after the model's size line, as `calibrate` takes them). For each flag budget the rule is fitted there exactly as `calibrate` fits it
(`review.ReviewRule.fit`), then applied to each labelled set given by `--set NAME=GLOB` (evaluate's per-image CSVs,
which carry the signals). The row marked "shipped" is the rule stored in --model. For comparison: flagging the
lowest-confidence images alone (stage 1's map confidence), at the same share. Last in each cell, the HC MAE of the images
the rule leaves unflagged. Prints the table and writes
studies/results/review_curve.json (or --results)."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fetalpipe.measure.calibration import SizeCalibration  # noqa: E402
from fetalpipe.measure.review import LARGE_ERROR_MM, SIGNALS, ReviewRule, catch_curve  # noqa: E402
from fetalpipe.model.model_file import file_sha256, read_model_header  # noqa: E402

BUDGETS = (0.04, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20)


def read_set(pattern: str) -> pd.DataFrame:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise SystemExit(f"no file matches {pattern}")
    return pd.concat([pd.read_csv(path) for path in paths], ignore_index=True)


def lowest_confidence_catch(table: pd.DataFrame, share: float) -> float | None:
    large = table["hc_ellipse_diff_mm"].abs().to_numpy() > LARGE_ERROR_MM
    if not large.any():
        return None
    flagged = table["confidence"].rank(method="first").to_numpy() <= share * len(table)
    return float((flagged & large).sum() / large.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the calibrated model whose stored rule is the 'shipped' row")
    parser.add_argument("--train-errors", required=True)
    parser.add_argument("--set", action="append", required=True, help="NAME=GLOB of per_image_errors.csv files")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "review_curve.json"))
    args = parser.parse_args()

    header = read_model_header(args.model)
    train = pd.read_csv(args.train_errors)
    line = SizeCalibration.from_dict(header.get("calibration"))
    if line is not None:  # the errors calibrate fits the rule on: after the size line, as inference reports them
        measured = (train["reference_hc_mm"] + train["hc_ellipse_diff_mm"]).to_numpy()
        train["hc_ellipse_diff_mm"] = measured * line.scale(measured) - train["reference_hc_mm"].to_numpy()
    sets = {name: read_set(pattern) for name, pattern in (item.split("=", 1) for item in args.set)}
    shipped = ReviewRule.from_dict(header.get("review"))
    rules = [(f"fitted at {budget:.0%}", ReviewRule.fit(train, train["hc_ellipse_diff_mm"].abs().to_numpy(), max_flagged_fraction=budget)) for budget in BUDGETS]
    if shipped is not None:
        rules.append(("shipped", shipped))
    rows = []
    for label, rule in rules:
        row = {"rule": label, **rule.to_dict()}
        for name, table in {"train": train, **sets}.items():
            curve = catch_curve(table, table["hc_ellipse_diff_mm"].abs().to_numpy(), rule)
            row[name] = {**curve, "lowest_confidence_caught_fraction": lowest_confidence_catch(table, curve["flagged_fraction"])}
        rows.append(row)
    names = ["train", *sets]
    print("| rule | " + " | ".join(f"{name}: flagged, caught (lowest confidence); HC MAE of the others" for name in names) + " |")
    print("|---|" + "---|" * len(names))
    for row in rows:
        cells = []
        for name in names:
            figures = row[name]
            caught = "—" if figures["caught_fraction"] is None else f"{figures['caught']}/{figures['large_errors']} = {figures['caught_fraction']:.0%}"
            baseline = figures["lowest_confidence_caught_fraction"]
            rest = figures["not_flagged_hc_mae_mm"]
            cells.append(f"{figures['flagged_fraction']:.1%}, {caught} ({'—' if baseline is None else f'{baseline:.0%}'}); "
                         f"{'—' if rest is None else f'{rest:.2f} mm'}")
        print(f"| {row['rule']} | " + " | ".join(cells) + " |")
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as handle:
        json.dump({"command": " ".join(sys.argv), "model_sha256": file_sha256(args.model), "signals": list(SIGNALS),
                   "large_error_mm": LARGE_ERROR_MM, "rows": rows}, handle, indent=2, default=float)


if __name__ == "__main__":
    main()
