"""Validation HC error grouped by how many mm one output-map pixel covers, from `fetalpipe evaluate` reports.

Why: the map is a square of MAP_SIZE pixels stretched over the whole image, so one map pixel covers
pixel_spacing_mm × (original size / MAP_SIZE) mm, from 0.3 mm for early heads to 1.5 mm for late-pregnancy scans.
If a model's edge error is a fixed fraction of a map pixel, its HC error in mm grows with that size, and a finer map is the cure.
A second table tests another explanation of the large errors: heads that the frame or the edge of the ultrasound sector cuts
(the reference outline runs off the image, or over the black outside the sector), which leave the model only part of the skull.

    python studies/error_by_map_pixel.py --manifest runs/hc18_val.csv runs/val_report_deep:128 runs/val_report_full_res:256 runs/val_report_deep_cal:128

Each REPORT:MAP_SIZE is an evaluate output folder and the side of its model's output map. Quartiles are fixed by the
first report's 128-pixel map size, so every report is grouped over the same images. Prints the tables and writes
studies/results/error_by_map_pixel.json."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fetalpipe.data.imaging import read_image  # noqa: E402
from fetalpipe.data.manifest import landmarks_original_px, load_manifest  # noqa: E402

OUTLINE_SAMPLES = 720
SECTOR_BLACK_LEVEL = 3  # gray level (of 255, after a 15 px box blur) below which a pixel is outside the ultrasound sector
CUT_SHARE = 0.05  # an outline with more than this share off the frame or on black counts as cut


def cut_share(pixels: np.ndarray, points_original_px: np.ndarray) -> float:
    """Share of the reference ellipse's outline (through the 4 endpoints, original pixels) that lies off the
    frame or over the black outside the ultrasound sector."""
    import cv2

    gray = pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
    gray = cv2.normalize(gray, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8) if gray.dtype != np.uint8 else gray
    height, width = gray.shape
    centre = points_original_px.mean(axis=0)
    angles = np.linspace(0, 2 * np.pi, OUTLINE_SAMPLES, endpoint=False)[:, None]
    outline = centre + (points_original_px[1] - points_original_px[0]) / 2 * np.cos(angles) + (points_original_px[3] - points_original_px[2]) / 2 * np.sin(angles)
    columns, rows = np.round(outline).astype(int).T
    off_frame = (columns < 0) | (columns > width - 1) | (rows < 0) | (rows > height - 1)
    blurred = cv2.blur(gray, (15, 15))
    on_black = ~off_frame & (blurred[np.clip(rows, 0, height - 1), np.clip(columns, 0, width - 1)] < SECTOR_BLACK_LEVEL)
    return float((off_frame | on_black).mean())


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
    shapes, cut = [], []
    for path, points in zip(manifest["image_path"], landmarks_original_px(manifest)):  # each image read once
        pixels = read_image(path).pixels
        shapes.append(pixels.shape[:2])
        cut.append(cut_share(pixels, points))
    manifest = manifest.assign(original_height=[h for h, _ in shapes], original_width=[w for _, w in shapes])
    is_cut = pd.Series(np.array(cut) > CUT_SHARE, index=manifest["image_path"].to_numpy())
    rows, cut_rows, quartiles = [], [], None
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
        errors["head_cut"] = errors["image_path"].map(is_cut)
        in_last_quartile = errors["image_path"].map(quartiles.cat.codes) == 3
        for (head_cut, last_quartile), group in errors.groupby(["head_cut", in_last_quartile]):
            cut_rows.append({"report": report, "head_cut_by_frame_or_sector": bool(head_cut), "last_quartile": bool(last_quartile), "images": len(group),
                             "hc_mae_mm": round(group["abs_hc_mm"].mean(), 3), "hc_errors_over_5mm": int((group["abs_hc_mm"] > 5).sum())})
        for quartile, group in errors.groupby("quartile", sort=True):
            rows.append({"report": report, "map_size": int(map_size), "quartile_of_128px_map_pixel_mm": quartile, "images": len(group),
                         "map_pixel_mm": round(group["map_pixel_mm"].mean(), 3), "reference_hc_mm": round(group["reference_hc_mm"].mean(), 1),
                         "hc_mae_mm": round(group["abs_hc_mm"].mean(), 3), "hc_errors_over_5mm": int((group["abs_hc_mm"] > 5).sum()),
                         "mean_edge_error_map_px": round(group["edge_error_map_px"].mean(), 3)})
        rows.append({"report": report, "map_size": int(map_size), "quartile_of_128px_map_pixel_mm": "all", "images": len(errors),
                     "map_pixel_mm": round(errors["map_pixel_mm"].mean(), 3), "reference_hc_mm": round(errors["reference_hc_mm"].mean(), 1),
                     "hc_mae_mm": round(errors["abs_hc_mm"].mean(), 3), "hc_errors_over_5mm": int((errors["abs_hc_mm"] > 5).sum()),
                     "mean_edge_error_map_px": round(errors["edge_error_map_px"].mean(), 3)})
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"\nheads cut by the frame or the sector edge (more than {CUT_SHARE:.0%} of the reference outline off the image or on black):")
    print(pd.DataFrame(cut_rows).to_string(index=False))
    with open(args.results, "w") as handle:
        json.dump({"manifest": args.manifest, "rows": rows, "cut_share_threshold": CUT_SHARE, "head_cut_rows": cut_rows}, handle, indent=1)


if __name__ == "__main__":
    main()
