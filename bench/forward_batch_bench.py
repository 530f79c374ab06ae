"""How many images each forward pass of the inference actors should hold (`pipeline.infer.FORWARD_BATCH` for stage 1,
`REFINEMENT_FORWARD_BATCH` for the refinement stage).

    python bench/forward_batch_bench.py --repeats 5

Both stages of the model, in int8 and fp32 as the actors build them, at 1 thread (the actors' default), on real
inputs: the embedded sample's stage-1 inputs and the polar crops around stage 1's ellipses, tiled to 64 images.
Reports the median ms per image over repeats for each forward batch, the batches interleaved within each repeat.
Writes bench/results/forward_batch.json (or --results)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fetalpipe.measure import ellipse as ellipse_geometry  # noqa: E402
from fetalpipe.model.model_file import DEFAULT_MODEL_PATH  # noqa: E402
from fetalpipe.model.networks import to_model_input  # noqa: E402
from fetalpipe.pipeline.infer import FORWARD_BATCH, REFINEMENT_FORWARD_BATCH, LandmarkPredictor  # noqa: E402
from fetalpipe.pipeline.preprocess import decode_batch, transforms_of  # noqa: E402

SAMPLE_MANIFEST = os.path.join(os.path.dirname(DEFAULT_MODEL_PATH), "sample", "manifest.csv")
IMAGES = 64
FORWARD_BATCHES = (4, 8, 16, 32, 64)


def stage_inputs(predictor: LandmarkPredictor) -> tuple[np.ndarray, np.ndarray]:
    """(stage-1 inputs [64, S, S], polar crops [64, rows, columns]) float32, from the sample images tiled."""
    manifest = pd.read_csv(SAMPLE_MANIFEST)
    batch = {"image_path": np.array([os.path.join(os.path.dirname(SAMPLE_MANIFEST), p) for p in manifest["image_path"]]),
             "pixel_spacing_mm": manifest["pixel_spacing_mm"].to_numpy()}
    decoded = decode_batch(batch, predictor.codec.input_size, keep_original=True)
    transforms = transforms_of(decoded, predictor.codec.input_size)
    points_original_px, _ = predictor.locate(decoded["image"], transforms)
    priors = ellipse_geometry.from_endpoints(points_original_px)
    crops = np.stack([predictor.polar_codec.crop(pixels, prior) for pixels, prior in zip(decoded["original_pixels"], priors)])
    tile = -(-IMAGES // len(crops))
    return np.tile(decoded["image"], (tile, 1, 1))[:IMAGES], np.tile(crops, (tile, 1, 1))[:IMAGES]


def ms_per_image(network: torch.nn.Module, images: np.ndarray, forward_batch: int) -> float:
    with torch.inference_mode():
        network(to_model_input(images[:forward_batch]))  # warm-up: first-call allocations and oneDNN primitives
        started = time.perf_counter()
        for start in range(0, len(images), forward_batch):
            network(to_model_input(images[start:start + forward_batch]))
    return (time.perf_counter() - started) / len(images) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL_PATH, help="a two-stage model file with int8 parameters")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "forward_batch.json"))
    args = parser.parse_args()

    timings = {}
    for precision in ("int8", "fp32"):
        predictor = LandmarkPredictor(args.model, threads=1, precision=precision)
        stage1_images, crops = stage_inputs(predictor)
        stages = {"stage 1": (predictor.model, stage1_images), "stage 2": (predictor.refinement, crops)}
        runs = {stage: {batch: [] for batch in FORWARD_BATCHES} for stage in stages}
        for _ in range(args.repeats):
            for stage, (network, images) in stages.items():
                for batch in FORWARD_BATCHES:
                    runs[stage][batch].append(ms_per_image(network, images, batch))
        timings[precision] = runs
    medians = {precision: {stage: {batch: round(float(np.median(values)), 2) for batch, values in by_batch.items()}
                           for stage, by_batch in runs.items()} for precision, runs in timings.items()}
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}",
        "torch": torch.__version__, "model": os.path.basename(args.model), "threads": 1, "repeats": args.repeats,
        "forward_batch_in_use": {"stage 1": FORWARD_BATCH, "stage 2": REFINEMENT_FORWARD_BATCH}, "ms_per_image": medians, "runs": timings,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"ms per image, 1 thread, median of {args.repeats} repeats (in use: stage 1 {FORWARD_BATCH}, stage 2 {REFINEMENT_FORWARD_BATCH})")
    print(f"  {'':14s}" + "".join(f"{batch:>8d}" for batch in FORWARD_BATCHES))
    for precision, by_stage in medians.items():
        for stage, by_batch in by_stage.items():
            print(f"  {precision} {stage:9s}" + "".join(f"{by_batch[batch]:8.1f}" for batch in FORWARD_BATCHES))


if __name__ == "__main__":
    main()
