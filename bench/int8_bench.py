"""int8 against fp32: forward speed of the shipped model, and accuracy on a validation manifest.

    python bench/int8_bench.py --repeats 5 --val-manifest runs/hc18_val.csv

Speed: forward passes of FORWARD_BATCH images (the embedded sample, in model input pixels) at 1 and 2 threads,
fp32 channels_last with BatchNorm folded against int8 with each quantized engine (the upsampling in int8), and int8
(oneDNN) with the transposed convolutions left in fp32 as PyTorch's conversion leaves them (which of the two the actors
build depends on the CPU: `quantize.int8_upsampling_pays`). Run with `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` it
times AVX2 kernels on a newer CPU (the fbgemm engine ignores the first);
median ms per image over repeats, the variants interleaved within each repeat. Accuracy (with --val-manifest):
`fetalpipe infer --precision int8` and `--precision fp32` on the manifest, then `fetalpipe evaluate`; how far
the int8 landmarks are from the fp32 ones; and what building the upsampling in int8 rather than fp32 does to the
measurements on this CPU, whichever of the two its actors build (`upsampling_accuracy`, in this process). Prints a
table and writes bench/results/int8.json (or --results)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_record import provenance  # noqa: E402  (bench/, the script's own folder)
from fetalpipe.data.imaging import read_image, resize_to_model  # noqa: E402
from fetalpipe.data.manifest import landmarks_original_px, load_manifest  # noqa: E402
from fetalpipe.model.model_file import DEFAULT_MODEL_PATH, load_model  # noqa: E402
from fetalpipe.model.networks import to_model_input  # noqa: E402
from fetalpipe.model import quantize  # noqa: E402
from fetalpipe.pipeline.infer import FORWARD_BATCH, LandmarkPredictor, load_inference_model  # noqa: E402

SAMPLE_MANIFEST = os.path.join(os.path.dirname(DEFAULT_MODEL_PATH), "sample", "manifest.csv")


def ms_per_image(model: torch.nn.Module, batch: torch.Tensor, passes: int = 5) -> float:
    with torch.inference_mode():
        model(batch)  # warm-up: first-call allocations and oneDNN primitive creation
        started = time.perf_counter()
        for _ in range(passes):
            model(batch)
    return (time.perf_counter() - started) / passes / len(batch) * 1000


def run_cli(*arguments: str) -> None:
    subprocess.run(["fetalpipe", *arguments], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def accuracy(model_path: str, manifest: str, folder: str) -> dict:
    metrics, landmarks = {}, {}
    for precision in ("fp32", "int8"):
        output = os.path.join(folder, precision)
        run_cli("infer", "--manifest", manifest, "--model", model_path, "--output", output, "--precision", precision, "--overwrite")
        run_cli("evaluate", "--predictions", output, "--manifest", manifest, "--output", os.path.join(output, "report"))
        with open(os.path.join(output, "report", "metrics.json")) as handle:
            metrics[precision] = json.load(handle)
        landmarks[precision] = pd.read_csv(os.path.join(output, "predictions.csv")).sort_values("image_path")
    points = {p: landmarks_original_px(table) for p, table in landmarks.items()}
    distance_px = np.linalg.norm(points["int8"] - points["fp32"], axis=-1)  # original image pixels, same landmark order
    hc_difference_mm = np.abs(landmarks["int8"]["hc_ellipse_mm"].to_numpy() - landmarks["fp32"]["hc_ellipse_mm"].to_numpy())
    keys = ("hc_ellipse_mae_mm", "bpd_mae_mm", "ofd_mae_mm", "mre_mm", "sdr_2mm")
    return {
        "images": int(len(landmarks["fp32"])),
        **{precision: {key: round(metrics[precision][key], 4) for key in keys} for precision in metrics},
        "int8_minus_fp32_hc_mae_mm": round(metrics["int8"]["hc_ellipse_mae_mm"] - metrics["fp32"]["hc_ellipse_mae_mm"], 4),
        "landmark_shift_px": {"median": round(float(np.nanmedian(distance_px)), 3), "p99": round(float(np.nanpercentile(distance_px, 99)), 3),
                              "max": round(float(np.nanmax(distance_px)), 3)},
        "hc_difference_mm": {"median": round(float(np.nanmedian(hc_difference_mm)), 3), "max": round(float(np.nanmax(hc_difference_mm)), 3)},
    }


def upsampling_accuracy(model_path: str, manifest: str, batch_size: int = 16) -> dict:
    """The actors' own class, in this process (no Ray), in int8 with the upsampling built in int8 and in fp32, whatever
    `quantize.int8_upsampling_pays` says of this CPU: HC MAE against the manifest's `hc_mm`, images above 5 mm, flags,
    and how far the two builds' HC are apart (the choice's cost in accuracy on this CPU; its speed is the table's)."""
    table = load_manifest(manifest)
    reference_hc_mm = table["hc_mm"].to_numpy(dtype=float)
    chosen_by_cpu = quantize.int8_upsampling_pays
    measured = {}
    try:
        for name, in_int8 in (("upsampling_int8", True), ("upsampling_fp32", False)):
            quantize.int8_upsampling_pays = lambda in_int8=in_int8: in_int8
            predictor = LandmarkPredictor(model_path, threads=torch.get_num_threads(), precision="int8")
            assert predictor.int8_upsampling == in_int8, "the int8 build no longer asks quantize.int8_upsampling_pays: both builds would be the same"
            parts = []
            for start in range(0, len(table), batch_size):
                chunk = table.iloc[start:start + batch_size]
                parts.append(predictor({"image_path": chunk["image_path"].to_numpy(dtype=object), "run_id": np.full(len(chunk), "upsampling", dtype=object),
                                        "pixel_spacing_mm": chunk["pixel_spacing_mm"].to_numpy(dtype=float)}))
            measured[name] = {key: np.concatenate([part[key] for part in parts]) for key in ("hc_ellipse_mm", "needs_review")}
    finally:
        quantize.int8_upsampling_pays = chosen_by_cpu
    hc_difference_mm = np.abs(measured["upsampling_int8"]["hc_ellipse_mm"] - measured["upsampling_fp32"]["hc_ellipse_mm"])
    result = {"images": int(len(table)), "this_cpu_builds": "upsampling_int8" if chosen_by_cpu() else "upsampling_fp32"}
    for name, values in measured.items():
        error_mm = np.abs(values["hc_ellipse_mm"] - reference_hc_mm)
        result[name] = {"hc_ellipse_mae_mm": round(float(np.nanmean(error_mm)), 4), "images_above_5mm": int(np.sum(error_mm > 5)),
                        "flagged": int(np.sum(values["needs_review"].astype(bool)))}
    result["hc_difference_mm"] = {"median": round(float(np.nanmedian(hc_difference_mm)), 3), "max": round(float(np.nanmax(hc_difference_mm)), 3),
                                  "largest_at": os.path.basename(str(table["image_path"].iloc[int(np.nanargmax(hc_difference_mm))]))}
    result["flags_changed"] = int(np.sum(measured["upsampling_int8"]["needs_review"].astype(bool) != measured["upsampling_fp32"]["needs_review"].astype(bool)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL_PATH, help="a model file with int8 parameters (written by `fetalpipe calibrate`)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--val-manifest", help="a labelled manifest: also compare accuracy")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "int8.json"))
    args = parser.parse_args()

    manifest = pd.read_csv(SAMPLE_MANIFEST)
    fp32, config, payload = load_inference_model(args.model, "fp32")
    images = [resize_to_model(read_image(os.path.join(os.path.dirname(SAMPLE_MANIFEST), p)).pixels, config.input_size)[0]
              for p in manifest["image_path"][:FORWARD_BATCH]]
    batch = to_model_input(np.stack(images))

    def int8(engine: str, upsampling_in_int8: bool) -> torch.nn.Module:
        return quantize.to_int8(load_model(args.model)[0], payload["int8_quantization"], config.input_size, engine, upsampling_in_int8=upsampling_in_int8)

    # name -> (model, the quantized engine its weights were packed for)
    variants = {"fp32 channels_last": (fp32, "onednn")}
    for engine in ("onednn", "x86"):
        if engine in torch.backends.quantized.supported_engines:
            variants[f"int8 {engine}"] = (int8(engine, True), engine)
    variants["int8 onednn, upsampling fp32"] = (int8("onednn", False), "onednn")
    timings = {threads: {name: [] for name in variants} for threads in (1, 2)}
    for _ in range(args.repeats):
        for threads in timings:
            torch.set_num_threads(threads)
            for name, (model, engine) in variants.items():
                torch.backends.quantized.engine = engine
                timings[threads][name].append(ms_per_image(model, batch))
    results = {
        **provenance(), "torch": torch.__version__,
        "model": os.path.basename(args.model), "forward_batch": FORWARD_BATCH, "repeats": args.repeats,
        "ms_per_image": {threads: {name: round(float(np.median(values)), 2) for name, values in by_name.items()} for threads, by_name in timings.items()},
        "runs": timings,
    }
    if args.val_manifest:
        with tempfile.TemporaryDirectory() as folder:
            results["accuracy"] = accuracy(args.model, args.val_manifest, folder)
        results["upsampling_accuracy"] = upsampling_accuracy(args.model, args.val_manifest)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"forward, batch {FORWARD_BATCH}, median ms per image of {args.repeats} repeats")
    for threads, by_name in results["ms_per_image"].items():
        fp32_ms = by_name["fp32 channels_last"]
        print(f"  {threads} thread(s): " + ", ".join(f"{name} {ms:.1f} ({fp32_ms / ms:.2f}x)" for name, ms in by_name.items()))
    if "accuracy" in results:
        print(json.dumps({key: results[key] for key in ("accuracy", "upsampling_accuracy")}, indent=2))


if __name__ == "__main__":
    main()
