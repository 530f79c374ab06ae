"""The brightness clamp's threshold: what brightening more of the dark scans does to each variant's HC error.

    python studies/brightness_clamp.py --manifest runs/hc18_val.csv --train-manifest runs/hc18_train.csv

`imaging.clamp_brightness` brightens a scan whose median content pixel lies below the training split's 1st percentile
(`imaging.TRAINING_DARKEST_CONTENT_MEDIAN`), before both stages. This measures the validation images and their
archive-like variants (`robustness.make_variant`: those that keep the reference HC and the pixel spacing) with the
threshold at each given percentile of the training split instead, with the same model file (int8, its own size line,
fitted at the shipped threshold). In-process, as `stage_attribution.py`. Prints HC MAE and the images above 5 mm per
variant and threshold, and writes studies/results/brightness_clamp.json (or --results)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fetalpipe import __version__  # noqa: E402
from stage_attribution import load_labelled_images, measured_hc_mm, stage_outputs, variant_images  # noqa: E402

VARIANTS = ("clean", "dark", "bright", "speckle", "screenshot", "screenshot_black")
PERCENTILES = (1.0, 5.0, 10.0, 25.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="the validation manifest (e.g. runs/hc18_val.csv)")
    parser.add_argument("--train-manifest", required=True, help="the training split, whose brightness sets the thresholds")
    parser.add_argument("--model", help="model file (default: the shipped model)")
    parser.add_argument("--percentiles", nargs="*", type=float, default=list(PERCENTILES))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "brightness_clamp.json"))
    args = parser.parse_args()

    from fetalpipe.data.imaging import content_median, read_image
    from fetalpipe.data.manifest import load_manifest
    from fetalpipe.model.model_file import file_sha256

    training_medians = np.array([content_median(read_image(path).pixels) for path in load_manifest(args.train_manifest)["image_path"]])
    thresholds = {percentile: float(np.nanpercentile(training_medians, percentile)) for percentile in args.percentiles}
    model_path, predictor, table, clean_images = load_labelled_images(args.manifest, args.model, args.threads)
    spacing = table["pixel_spacing_mm"].to_numpy(dtype=np.float64)
    reference_hc = table["hc_mm"].to_numpy(dtype=np.float64)

    results: dict[str, dict] = {}
    for name in args.variants:
        images, _ = variant_images(name, clean_images, table)  # gain, noise and frames: the spacing stays
        results[name] = {}
        for percentile, threshold in thresholds.items():
            priors, originals = stage_outputs(predictor, table, images, threshold)
            errors = measured_hc_mm(predictor, originals, priors, spacing) - reference_hc
            figures = {"threshold": threshold, "hc_mae_mm": float(np.nanmean(np.abs(errors))), "images_above_5mm": int(np.sum(np.abs(errors) > 5))}
            results[name][f"p{percentile:g}"] = figures
            print(f"{name} at p{percentile:g} ({threshold:.3f}): HC MAE {figures['hc_mae_mm']:.3f} mm", flush=True)

    columns = [f"p{percentile:g}" for percentile in thresholds]
    print("\n| variant | " + " | ".join(f"threshold at {column} ({thresholds[float(column[1:])]:.3f})" for column in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name in args.variants:
        cells = []
        for column in columns:
            figures = results[name][column]
            excess = "" if name == "clean" or "clean" not in results else f", {figures['hc_mae_mm'] - results['clean'][column]['hc_mae_mm']:+.2f}"
            cells.append(f"{figures['hc_mae_mm']:.2f}{excess} ({figures['images_above_5mm']})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as handle:
        json.dump({"command": " ".join(sys.argv), "model": model_path, "model_sha256": file_sha256(model_path), "fetalpipe": __version__,
                   "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "images": len(table), "thresholds": thresholds,
                   "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
