"""Training throughput of the real `fetalpipe train` (Ray Train, gloo) per workers × threads-per-worker shape.

    fetalpipe import-hc18 ../shared/data/hc18 --output runs/hc18.csv
    python bench/train_workers_bench.py --manifest runs/hc18.csv --shapes 2x1 1x2 1x1 --epochs 3

Each shape trains the shipped configuration for a few epochs in a temp folder. The table shows the median over
epochs 2.. (epoch 1 pays data set-up) of the training img/s (all workers together, augmentation and heatmap
encoding included), the epoch time with validation, and the command's wall time. Writes bench/results/train_workers.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time

import pandas as pd


def train_shape(manifest: str, config: str, shape: str, epochs: int, folder: str) -> dict:
    workers, threads = shape.split("x")
    run_dir = os.path.join(folder, f"run-{shape}")
    started = time.perf_counter()
    subprocess.run(
        ["fetalpipe", "train", "--manifest", manifest, "--output", run_dir, "--config", config, "--epochs", str(epochs),
         "--workers", workers, "--threads-per-worker", threads],
        check=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wall_seconds = time.perf_counter() - started
    metrics = pd.read_csv(os.path.join(run_dir, "metrics.csv"))
    steady = metrics[metrics["epoch"] > 1] if len(metrics) > 1 else metrics
    return {
        "shape": shape, "workers": int(workers), "threads_per_worker": int(threads), "epochs": epochs,
        "train_img_per_s_median": round(float(steady["train_img_per_s"].median()), 2),
        "epoch_seconds_median": round(float(steady["epoch_seconds"].median()), 1),
        "wall_seconds": round(wall_seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifest", default="runs/hc18.csv")
    parser.add_argument("--config", default="ellipse_deep")
    parser.add_argument("--shapes", nargs="+", default=["2x1", "1x2", "1x1"], help="WORKERSxTHREADS")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for shape in args.shapes:
            rows.append(train_shape(args.manifest, args.config, shape, args.epochs, folder))
            print(json.dumps(rows[-1]), flush=True)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "config": args.config, "rows": rows}
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "train_workers.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"{'workers x threads':18s} {'train img/s':>12s} {'epoch s':>8s} {'wall s':>7s}   ({args.config}, {args.epochs} epochs)")
    for row in rows:
        print(f"{row['shape']:18s} {row['train_img_per_s_median']:12.2f} {row['epoch_seconds_median']:8.1f} {row['wall_seconds']:7.1f}")


if __name__ == "__main__":
    main()
