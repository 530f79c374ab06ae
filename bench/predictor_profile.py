"""Where an inference actor's time goes: the actors' predictor (`LandmarkPredictor`, the shipped model in int8) called
in one process on the HC18 test set, under cProfile, its time split by step.

    python bench/predictor_profile.py --hc18 ../shared/data/hc18

One pass warms up (oneDNN primitives, first allocations); the second is profiled. Each step's figure is the cumulative
time of the function named beside it, so steps nest: the second measurements (flagged frames turned upright or
brightened) run decoding-free passes of both stages, and those passes are counted in the stage rows too. Prints a
table and writes bench/results/predictor_profile.json (or --results)."""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_record import provenance  # noqa: E402  (bench/, the script's own folder)
from fetalpipe.model.model_file import DEFAULT_MODEL_PATH  # noqa: E402
from fetalpipe.pipeline.infer import LandmarkPredictor  # noqa: E402

# (step, the function whose cumulative time it is: (file name ending, function name))
STEPS = (
    ("PNG decoding (cv2.imdecode, inside decode_batch)", ("~", "<imdecode>")),
    ("decode_batch: reading, decoding, brightness clamp, scan search, resize", ("preprocess.py", "decode_batch")),
    ("stage 1 forward passes", ("infer.py", "predict_heatmaps")),
    ("stage 1 map to ellipse (codec decode)", ("heatmaps.py", "decode")),
    ("refinement stage: polar crops, forward passes, ellipse fit", ("infer.py", "refine")),
    ("second measurements: tilted frames upright", ("infer.py", "measure_tilted_frames_upright")),
    ("second measurements: dark frames brightened", ("infer.py", "measure_dark_frames_brightened")),
    ("review score and reasons", ("infer.py", "review")),
)


def cumulative_seconds(stats: pstats.Stats, file_suffix: str, function: str) -> float:
    return sum(entry[3] for (file, _, name), entry in stats.stats.items() if name == function and file.endswith(file_suffix))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hc18", default="../shared/data/hc18")
    parser.add_argument("--model", default=DEFAULT_MODEL_PATH)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per predictor call, as `fetalpipe infer --batch-size`")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--precision", default="int8", choices=("int8", "fp32"))
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "predictor_profile.json"))
    args = parser.parse_args()

    spacing = pd.read_csv(os.path.join(args.hc18, "test_set_pixel_size.csv"))
    paths = np.array([os.path.join(args.hc18, "test_set", name) for name in spacing.iloc[:, 0]], dtype=object)
    pixel_spacing_mm = spacing.iloc[:, 1].to_numpy(dtype=float)
    predictor = LandmarkPredictor(args.model, threads=args.threads, precision=args.precision)

    def one_pass() -> None:
        for start in range(0, len(paths), args.batch_size):
            rows = slice(start, start + args.batch_size)
            predictor({"image_path": paths[rows], "pixel_spacing_mm": pixel_spacing_mm[rows],
                       "run_id": np.full(len(paths[rows]), "profile", dtype=object)})

    one_pass()
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.runcall(one_pass)
    total_seconds = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    steps = {step: round(cumulative_seconds(stats, *where), 3) for step, where in STEPS}
    results = {
        **provenance(), "torch": torch.__version__, "images": len(paths), "precision": args.precision, "threads": args.threads,
        "batch_size": args.batch_size, "profiled_seconds": round(total_seconds, 3),
        "ms_per_image_profiled": round(total_seconds / len(paths) * 1000, 2), "seconds_by_step": steps,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"{len(paths)} images in {total_seconds:.2f} s under cProfile ({results['ms_per_image_profiled']} ms an image), "
          f"{args.precision}, {args.threads} thread(s); steps nest (module docstring)")
    for step, seconds in steps.items():
        print(f"  {step:72s} {seconds:6.2f} s  {100 * seconds / total_seconds:5.1f} %")


if __name__ == "__main__":
    main()
