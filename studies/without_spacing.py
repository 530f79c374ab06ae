"""What a row loses without its pixel spacing: the same variant images measured with and without `pixel_spacing_mm`.

    python studies/robustness.py --manifest runs/hc18_val.csv --output runs/robust_now   # the images, measured with spacing
    python studies/without_spacing.py --robustness runs/robust_now --variants clean rotate37 dark

The review rule's strongest signals are in mm (`measure.review`). Without a spacing they are missing, the rule scores on
the other four, and the second measurements it triggers (a flagged tilted frame upright, a flagged dark frame
brightened: `pipeline.infer.LandmarkPredictor`) mostly do not run, so the landmarks themselves change. For each variant
this runs `fetalpipe infer` (in-process, the shipped model unless --model) on the variant's manifest without its spacing
column, and compares with the stored run that had it. Both are compared in original pixels converted with the known
spacing, without the size line (a run without spacing cannot apply it): HC MAE, the images above 5 mm and those off by
more than 3 % of HC (what the rule for rows without spacing predicts), the share flagged and how many of each it catches. Prints a table and writes studies/results/without_spacing.json (or --results)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

from fetalpipe.measure.review import LARGE_ERROR_MM, LARGE_RELATIVE_ERROR  # noqa: E402
from fetalpipe.model.model_file import DEFAULT_MODEL_PATH, file_sha256  # noqa: E402
from fetalpipe.pipeline.infer import InferOptions, run_inference  # noqa: E402
from bench_record import provenance  # noqa: E402  (the machine, Python and commit every result records)


def measured(predictions_csv: str, manifest: pd.DataFrame) -> pd.DataFrame:
    """Per image: HC in mm from the run's pixels and the manifest's spacing, with the size line taken out, and the flag."""
    table = pd.read_csv(predictions_csv)
    table["image"] = table["image_path"].map(os.path.basename)
    table = manifest.merge(table[["image", "status", "hc_ellipse_px", "size_calibration_scale", "needs_review"]], on="image", how="left")
    line_scale = table["size_calibration_scale"].fillna(1.0)  # 1: not calibrated (no spacing)
    table["hc_mm_without_line"] = table["hc_ellipse_px"] / line_scale * table["pixel_spacing_mm"]
    table["abs_error_mm"] = (table["hc_mm_without_line"] - table["hc_mm"]).abs()
    table["needs_review"] = table["needs_review"].astype(str).str.lower().isin(["true", "1"])
    return table


def figures(table: pd.DataFrame) -> dict:
    """HC MAE, the images above 5 mm and those off by more than 3 % of HC (what the rule without spacing predicts), and
    how many of each the flag catches."""
    large = (table["abs_error_mm"] > LARGE_ERROR_MM).to_numpy()
    off = (table["abs_error_mm"] / table["hc_mm"] > LARGE_RELATIVE_ERROR).to_numpy()
    flagged = table["needs_review"].to_numpy()
    return {"hc_mae_mm_without_size_line": round(float(table["abs_error_mm"].mean()), 3), "images_over_5mm": int(large.sum()),
            "images_off_by_over_3_percent": int(off.sum()), "flagged_fraction": round(float(flagged.mean()), 4),
            "caught_over_5mm": int((flagged & large).sum()), "caught_off_by_over_3_percent": int((flagged & off).sum()),
            "heads_lost": int((table["status"] != "ok").sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--robustness", required=True, help="an output folder of studies/robustness.py (images/ and predictions/ per variant)")
    parser.add_argument("--variants", nargs="+", default=["clean", "rotate37", "dark"])
    parser.add_argument("--model", default=DEFAULT_MODEL_PATH, help="the model the robustness run used")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "without_spacing.json"))
    args = parser.parse_args()
    rows = []
    for variant in args.variants:
        folder = os.path.join(args.robustness, "images", variant)
        manifest = pd.read_csv(os.path.join(folder, "manifest.csv"))
        manifest["image_path"] = [os.path.abspath(os.path.join(folder, path)) for path in manifest["image_path"]]
        manifest["image"] = manifest["image_path"].map(os.path.basename)
        output = os.path.join(args.robustness, "without_spacing", variant)
        os.makedirs(output, exist_ok=True)
        unspaced = os.path.join(output, "manifest.csv")
        manifest.drop(columns=["pixel_spacing_mm", "image"]).to_csv(unspaced, index=False)
        run_inference(InferOptions(output_dir=output, manifest=unspaced, model_path=args.model, overwrite=True, report=False, print_summary=False))
        reference = manifest[["image", "pixel_spacing_mm", "hc_mm"]]
        with_spacing = figures(measured(os.path.join(args.robustness, "predictions", variant, "predictions.csv"), reference))
        without = figures(measured(os.path.join(output, "predictions.csv"), reference))
        rows.append({"variant": variant, "with_spacing": with_spacing, "without_spacing": without})
        print(json.dumps(rows[-1]), flush=True)
    print("| variant | HC MAE without the size line (mm) | images > 5 mm | flagged | of those > 5 mm, flagged | of those > 3 % off, flagged |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        a, b = row["with_spacing"], row["without_spacing"]
        print(f"| {row['variant']} | {a['hc_mae_mm_without_size_line']:.2f} → {b['hc_mae_mm_without_size_line']:.2f} | {a['images_over_5mm']} → {b['images_over_5mm']} "
              f"| {a['flagged_fraction']:.1%} → {b['flagged_fraction']:.1%} | {a['caught_over_5mm']} of {a['images_over_5mm']} → {b['caught_over_5mm']} of {b['images_over_5mm']} "
              f"| {a['caught_off_by_over_3_percent']} of {a['images_off_by_over_3_percent']} → {b['caught_off_by_over_3_percent']} of {b['images_off_by_over_3_percent']} |")
    pooled = {side: {key: sum(row[side][key] for row in rows) for key in ("images_over_5mm", "caught_over_5mm", "images_off_by_over_3_percent", "caught_off_by_over_3_percent")}
              for side in ("with_spacing", "without_spacing")}
    for side in pooled:
        pooled[side]["flagged_fraction"] = round(float(np.mean([row[side]["flagged_fraction"] for row in rows])), 4)
    print(f"pooled: {json.dumps(pooled)}")
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as handle:
        json.dump({**provenance(), "command": " ".join(sys.argv), "model_sha256": file_sha256(args.model), "rows": rows, "pooled": pooled}, handle, indent=2)


if __name__ == "__main__":
    main()
