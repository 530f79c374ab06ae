"""Validation HC error grouped by how many mm one output-map pixel covers, from `fetalpipe evaluate` reports.

Why: the map is a square of MAP_SIZE pixels stretched over the whole image, so one map pixel covers
pixel_spacing_mm × (original size / MAP_SIZE) mm, from 0.3 mm for early heads to 1.5 mm for late-pregnancy scans.
If a model's edge error is a fixed fraction of a map pixel, its HC error in mm grows with that size, and a finer map is the cure.

    python bench/error_by_map_pixel.py --manifest runs/hc18.csv runs/val_report_deep:128 runs/val_report_full_res:256

Each REPORT:MAP_SIZE is an evaluate output folder and the side of its model's output map. Quartiles are fixed by the
first report's 128-pixel map size, so every report is grouped over the same images. Prints a table and writes
bench/results/error_by_map_pixel.json."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fetalpipe.imaging import read_image  # noqa: E402
from fetalpipe.manifest import load_manifest  # noqa: E402


def map_pixel_mm(manifest: pd.DataFrame, map_size: int) -> pd.Series:
    """mm covered by one map pixel per image (geometric mean of the x and y stretch), indexed by image_path.
    `manifest` needs ``original_width`` and ``original_height``."""
    stretch = np.sqrt((manifest["original_width"] / map_size) * (manifest["original_height"] / map_size))
    return pd.Series((manifest["pixel_spacing_mm"] * stretch).to_numpy(), index=manifest["image_path"].to_numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="the manifest the reports were scored against (with pixel_spacing_mm)")
    parser.add_argument("reports", nargs="+", help="REPORT_DIR:MAP_SIZE")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "error_by_map_pixel.json"))
    args = parser.parse_args()

    manifest = load_manifest(args.manifest, require_landmarks=True)
    shapes = [read_image(path).pixels.shape for path in manifest["image_path"]]  # each image read once, for its size
    manifest = manifest.assign(original_height=[h for h, _ in shapes], original_width=[w for _, w in shapes])
    rows, quartiles = [], None
    for item in args.reports:
        report, map_size = item.rsplit(":", 1)
        errors = pd.read_csv(os.path.join(report, "per_image_errors.csv"))
        scored = manifest[manifest["image_path"].isin(errors["image_path"])]
        if quartiles is None:
            reference_mm = map_pixel_mm(scored, 128)
            quartiles = pd.qcut(reference_mm, 4)
        pixel_mm = map_pixel_mm(scored, int(map_size))
        errors = errors.assign(
            quartile=errors["image_path"].map(quartiles).astype(str),
            map_pixel_mm=errors["image_path"].map(pixel_mm),
            abs_hc_mm=errors["hc_ellipse_diff_mm"].abs(),
        )
        errors["edge_error_map_px"] = errors["abs_hc_mm"] / (2 * np.pi) / errors["map_pixel_mm"]
        for quartile, group in errors.groupby("quartile", sort=True):
            rows.append({"report": report, "map_size": int(map_size), "quartile_of_128px_map_pixel_mm": quartile, "images": len(group),
                         "map_pixel_mm": round(group["map_pixel_mm"].mean(), 3), "reference_hc_mm": round(group["reference_hc_mm"].mean(), 1),
                         "hc_mae_mm": round(group["abs_hc_mm"].mean(), 3), "hc_errors_over_5mm": int((group["abs_hc_mm"] > 5).sum()),
                         "mean_edge_error_map_px": round(group["edge_error_map_px"].mean(), 3)})
        rows.append({"report": report, "map_size": int(map_size), "quartile_of_128px_map_pixel_mm": "all", "images": len(errors),
                     "map_pixel_mm": round(errors["map_pixel_mm"].mean(), 3), "reference_hc_mm": round(errors["reference_hc_mm"].mean(), 1),
                     "hc_mae_mm": round(errors["abs_hc_mm"].mean(), 3), "hc_errors_over_5mm": int((errors["abs_hc_mm"] > 5).sum()),
                     "mean_edge_error_map_px": round(errors["edge_error_map_px"].mean(), 3)})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    with open(args.results, "w") as handle:
        json.dump({"manifest": args.manifest, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
