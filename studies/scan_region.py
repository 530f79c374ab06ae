"""Where `imaging.scan_region` crops, and whether a crop ever cuts a head.

    python studies/scan_region.py --manifest runs/hc18.csv --variants clean screenshot screenshot_black

For each variant of each image (built as `studies/robustness.py` builds them, landmarks moved along), after
`imaging.clamp_brightness` as the pipeline runs it: whether the frame is cropped to its scan, how much larger the
head then is in stage 1's input (the frame's width over the region's), and how much of the reference outline that
lies inside the frame falls outside the region (a cut head; in the pipeline, a stage-1 outline that runs off the
region sends the frame through stage 1 again whole, `LandmarkPredictor.locate`). Writes studies/results/scan_region.json
(or --results)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fetalpipe import __version__  # noqa: E402
from fetalpipe.data.imaging import ResizeTransform, clamp_brightness, read_image, scan_region  # noqa: E402
from fetalpipe.data.manifest import landmarks_original_px, load_manifest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from robustness import VARIANTS, make_variant  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--variants", nargs="*", default=["clean", "screenshot", "screenshot_black", "rotate37", "dark"], choices=VARIANTS)
    parser.add_argument("--black-margins", action="store_true", help="crop inside black margins too (imaging.scan_region's black_margins)")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scan_region.json"))
    args = parser.parse_args()

    table = load_manifest(args.manifest, require_landmarks=True)
    results = {}
    for name in args.variants:
        rng = np.random.default_rng(0)
        cropped, zooms, cuts, seconds = [], [], [], []
        for row, points in zip(table.itertuples(index=False), landmarks_original_px(table)):
            pixels = np.round(read_image(row.image_path).pixels * 255).astype(np.uint8)
            image, moved, _, _ = make_variant(name, pixels, points, float(row.pixel_spacing_mm), rng)
            height, width = image.shape
            frame = clamp_brightness(image.astype(np.float32) / 255)
            started = time.perf_counter()
            region = scan_region(frame, black_margins=args.black_margins)
            seconds.append(time.perf_counter() - started)
            is_cropped = region != (0, 0, width, height)
            cropped.append(is_cropped)
            if is_cropped:
                zooms.append(width / region[2])
                cuts.append(ResizeTransform.for_image(width, height, 256, region).outline_share_off_region(moved))
        results[name] = {"images": len(cropped), "cropped": int(np.sum(cropped)), "heads_cut": int(np.sum(np.array(cuts) > 0)),
                         "zoom_min": float(np.min(zooms)) if zooms else None, "zoom_max": float(np.max(zooms)) if zooms else None,
                         "largest_outline_share_cut": max(cuts, default=0.0), "median_ms": float(np.median(seconds) * 1e3)}
        print(f"{name}: {results[name]}")
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as handle:
        json.dump({"command": "studies/scan_region.py " + " ".join(sys.argv[1:]), "fetalpipe": __version__,
                   "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "variants": results}, handle, indent=2)


if __name__ == "__main__":
    main()
