"""Inference end-to-end benchmark: `fetalpipe infer` (Ray startup included) vs a seed-style loop and
vs a plain single-process loop of the same model and settings, in one run on one machine.

    python bench/infer_bench.py --hc18 ../shared/data/hc18 --copies 3 --repeats 3
    python bench/infer_bench.py --hc18 ../shared/data/hc18 --copies 15 --repeats 3 --results bench/results/infer_5k_stage1_0.1.0.json

Each repeat runs every variant of `fetalpipe infer`, the plain loop and the seed loop back to back;
the table shows medians over repeats, and ratios are medians of the per-repeat ratios.

The archive is the HC18 test_set (335 images) plus flipped copies, generated in a temp folder (not
committed). Prints a table and writes bench/results/infer.json (or --results)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fetalpipe.model.heatmaps import HeatmapCodec  # noqa: E402
from fetalpipe.model.model_file import DEFAULT_MODEL_PATH, read_model_header  # noqa: E402
from fetalpipe.model.networks import MODEL_CONFIGS, HeatmapUNet  # noqa: E402
from fetalpipe.pipeline.infer import LandmarkPredictor, resolve_precision  # noqa: E402
from bench_record import provenance  # noqa: E402  (bench/, the script's own folder)


def build_archive(hc18_dir: str, copies: int, folder: str, frame_scale: float = 1.0) -> str:
    """The test set and its flipped copies in FOLDER, each frame resized by `frame_scale` (its pixel spacing divided by
    it: the same heads in larger or smaller frames); returns the manifest's path."""
    spacing = pd.read_csv(os.path.join(hc18_dir, "test_set_pixel_size.csv"))
    rows = []
    for filename, pixel_spacing_mm in spacing.itertuples(index=False):
        image = cv2.imread(os.path.join(hc18_dir, "test_set", filename), cv2.IMREAD_GRAYSCALE)
        if frame_scale != 1.0:
            image = cv2.resize(image, None, fx=frame_scale, fy=frame_scale, interpolation=cv2.INTER_LINEAR)
            pixel_spacing_mm = pixel_spacing_mm / frame_scale
        for copy in range(copies):
            variant = [image, cv2.flip(image, 1), cv2.flip(image, 0), cv2.flip(image, -1)][copy % 4]
            path = os.path.join(folder, f"{copy}_{filename}")
            cv2.imwrite(path, variant)
            rows.append({"image_path": path, "pixel_spacing_mm": pixel_spacing_mm})
    manifest = os.path.join(folder, "manifest.csv")
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def seed_style_loop(paths: list[str], batch_size: int = 8) -> float:
    """The report's loop: cv2 decode + 256² resize + eager fp32 seed U-Net + argmax, batch 8."""
    model = HeatmapUNet(MODEL_CONFIGS["seed"]).eval()
    codec = HeatmapCodec(refine=False)
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        images = [cv2.resize(cv2.imread(p, cv2.IMREAD_GRAYSCALE), (256, 256)).astype(np.float32) / 255 for p in paths[start:start + batch_size]]
        with torch.no_grad():
            heatmaps = model(torch.from_numpy(np.stack(images)[:, None])).numpy()
        codec.decode(heatmaps)
    return len(paths) / (time.perf_counter() - started)


def plain_loop(paths: list[str], pixel_spacing_mm: list[float], model_path: str, batch_size: int, precision: str) -> tuple[float, int]:
    """The shipped model and settings (the same precision, both stages), in one process, no Ray: the actors' own
    class called on batches of the manifest's rows, so decoding, both stages, the size line, the review flag and the
    second measurement of flagged frames (which needs the review signals in mm, so the pixel spacing) are all included.
    Returns (images per second, frames measured again: turned upright or brightened, one more two-stage pass each)."""
    started = time.perf_counter()  # model load included, as in the actors
    predictor = LandmarkPredictor(model_path, threads=torch.get_num_threads(), precision=precision)
    measured_again = 0
    measure_frames = predictor.measure_frames

    def counted(frames, *args):
        nonlocal measured_again
        measured_again += len(frames)
        return measure_frames(frames, *args)

    predictor.measure_frames = counted
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        predictor({"image_path": np.array(chunk, dtype=object), "pixel_spacing_mm": np.array(pixel_spacing_mm[start:start + batch_size], dtype=float),
                   "run_id": np.full(len(chunk), "plain", dtype=object)})
    return len(paths) / (time.perf_counter() - started), measured_again


def fetalpipe_infer(manifest: str, output: str, model_path: str, variant: str, batch_size: int, precision: str) -> tuple[float, dict]:
    """`variant` is DECODE_IN:ACTORSxTHREADS, e.g. actors:2x1."""
    decode_in, shape = variant.split(":")
    actors, threads = shape.split("x")
    started = time.perf_counter()
    subprocess.run(
        ["fetalpipe", "infer", "--manifest", manifest, "--output", output, "--model", model_path, "--actors", actors,
         "--threads-per-actor", threads, "--decode-in", decode_in, "--batch-size", str(batch_size), "--precision", precision],
        check=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    elapsed = time.perf_counter() - started
    with open(os.path.join(output, "run.json")) as handle:
        record = json.load(handle)
    return elapsed, record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hc18", default="../shared/data/hc18")
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed-images", type=int, default=None,
                        help="time the seed loop on this many images instead of all of them (it runs about 5-6 img/s on 2 cores). "
                             "The goal compares on the whole archive; a short sample follows the VM's speed of the moment (BENCHMARKS.md)")
    parser.add_argument("--model", default=DEFAULT_MODEL_PATH)
    parser.add_argument("--variants", nargs="+", default=["actors:2x1"], help="DECODE_IN:ACTORSxTHREADS; the first is the headline")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="auto", choices=("auto", "int8", "fp32"), help="as `fetalpipe infer --precision`; the plain loop uses the same")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "infer.json"),
                        help="where the JSON goes (one file per archive size keeps both)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    precision = resolve_precision(args.precision, read_model_header(args.model))
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        manifest = build_archive(args.hc18, args.copies, folder)
        os.sync()  # the archive's writeback would otherwise land in the first timed run
        archive = pd.read_csv(manifest)
        paths, pixel_spacing_mm = archive["image_path"].tolist(), archive["pixel_spacing_mm"].tolist()
        for repeat in range(args.repeats):
            run = {"infer": {}}
            for variant in args.variants:
                seconds, record = fetalpipe_infer(manifest, os.path.join(folder, f"out-{repeat}-{variant}"), args.model, variant, args.batch_size, precision)
                run["infer"][variant] = {"end_to_end": len(paths) / seconds, "pipeline": record["timings"]["images_per_second"], "ok_rows": record["counts"]["ok"]}
            run["plain"], run["frames_measured_again"] = plain_loop(paths, pixel_spacing_mm, args.model, args.batch_size, precision)
            run["seed"] = seed_style_loop(paths[: args.seed_images])  # None: all of them
            runs.append(run)
            print(json.dumps(run), flush=True)
    median = lambda values: float(np.median(values))
    headline = args.variants[0]
    results = {
        **provenance(),
        "images": len(paths), "repeats": args.repeats,
        "variants": {
            variant: {
                "end_to_end_img_per_s": round(median([r["infer"][variant]["end_to_end"] for r in runs]), 2),
                "pipeline_img_per_s": round(median([r["infer"][variant]["pipeline"] for r in runs]), 2),
                "speedup_vs_seed_loop": round(median([r["infer"][variant]["end_to_end"] / r["seed"] for r in runs]), 2),
                "ray_vs_plain_loop_end_to_end": round(median([r["infer"][variant]["end_to_end"] / r["plain"] for r in runs]), 3),
                "ray_vs_plain_loop_pipeline": round(median([r["infer"][variant]["pipeline"] / r["plain"] for r in runs]), 3),
                "ok_rows": runs[-1]["infer"][variant]["ok_rows"],
            }
            for variant in args.variants
        },
        "plain_loop_img_per_s": round(median([r["plain"] for r in runs]), 2),
        "seed_loop_img_per_s": round(median([r["seed"] for r in runs]), 2),
        "frames_measured_again": runs[-1]["frames_measured_again"],  # by the plain loop: flagged frames turned upright or brightened
        "headline_variant": headline,
        "settings": {"batch_size": args.batch_size, "model": os.path.basename(args.model), "precision": precision, "seed_images": args.seed_images or len(paths)},
        "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"{len(paths)} images, medians of {args.repeats} repeats")
    print(f"{'what':48s} {'img/s':>7s} {'x seed':>7s} {'x plain':>8s}")
    for variant, figures in results["variants"].items():
        print(f"{'fetalpipe infer ' + variant + ', end to end':48s} {figures['end_to_end_img_per_s']:7.2f} {figures['speedup_vs_seed_loop']:7.2f} {figures['ray_vs_plain_loop_end_to_end']:8.3f}")
        print(f"{'  of which the Ray Data pipeline':48s} {figures['pipeline_img_per_s']:7.2f} {'':7s} {figures['ray_vs_plain_loop_pipeline']:8.3f}")
    print(f"{'plain single-process loop, same model':48s} {results['plain_loop_img_per_s']:7.2f}")
    print(f"{'seed-style loop (seed U-Net, fp32, bs 8)':48s} {results['seed_loop_img_per_s']:7.2f}")
    print(f"frames measured again (turned upright or brightened): {results['frames_measured_again']} of {len(paths)}")


if __name__ == "__main__":
    main()
