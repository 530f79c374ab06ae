"""The training images' brightness: percentiles of each image's median content pixel (`imaging.content_median`).

    python studies/content_brightness.py --manifest runs/hc18_train.csv

`imaging.TRAINING_DARKEST_CONTENT_MEDIAN` is the 1st percentile printed here for the training split; a darker scan is
brightened to it by `imaging.clamp_brightness` before either stage sees it."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fetalpipe.data.imaging import content_median, read_image  # noqa: E402
from fetalpipe.data.manifest import load_manifest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True)
    args = parser.parse_args()
    table = load_manifest(args.manifest)
    medians = np.array([content_median(read_image(path).pixels) for path in table["image_path"]])
    percentiles = (1, 5, 25, 50, 75, 95, 99)
    print(f"{len(medians)} images; median content pixel by percentile:")
    for percentile, value in zip(percentiles, np.nanpercentile(medians, percentiles)):
        print(f"  {percentile:>2} %  {value:.3f}")


if __name__ == "__main__":
    main()
