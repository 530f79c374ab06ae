"""How long `fetalpipe report` takes, and how large report.html gets, for a large run (default 100,000 rows).

Why: the report is written once at the end of `infer` and `study run`; it must stay quick and readable however many
rows the run had (the plots aggregate, the tables and galleries are capped). The rows are synthetic: the embedded
sample's 20 images repeated, their reference measurements with noise, 5 % flagged, 1 % errors, a GA on every row.

    python bench/report_bench.py [--rows 100000] [--json bench/results/report.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_record import report  # noqa: E402  (bench/, the script's own folder)
from fetalpipe import LANDMARK_COLUMNS  # noqa: E402
from fetalpipe.data.manifest import landmarks_original_px  # noqa: E402
from fetalpipe.measure.biometry import biometry_mm  # noqa: E402
from fetalpipe.measure.clinical import clinical_columns  # noqa: E402
from fetalpipe.pipeline.report import write_report  # noqa: E402

SAMPLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fetalpipe", "assets", "sample")


def synthetic_run(output_dir: str, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    sample = pd.read_csv(os.path.join(SAMPLE_DIR, "manifest.csv"), dtype={"subject_id": str})
    table = sample.iloc[np.arange(rows) % len(sample)].reset_index(drop=True)
    table["image_path"] = [os.path.join(SAMPLE_DIR, path) for path in table["image_path"]]
    points = landmarks_original_px(table) + rng.normal(0, 2, (rows, 4, 2))
    table[list(LANDMARK_COLUMNS)] = points.reshape(rows, 8)
    for name, values in biometry_mm(points, table["pixel_spacing_mm"].to_numpy(float)).items():
        table[name] = values
    table["gestational_age_weeks"] = np.clip(8.96 + 0.054 * table["hc_ellipse_mm"] + 3e-7 * table["hc_ellipse_mm"] ** 3 + rng.normal(0, 1.5, rows), 14, 40)
    for name, values in clinical_columns(table["hc_ellipse_mm"], table["gestational_age_weeks"]).items():
        table[name] = values
    table["status"], table["error"] = "ok", ""
    broken = rng.random(rows) < 0.01
    table.loc[broken, "status"] = "error"
    table.loc[broken, "error"] = "PNG signature but corrupt or truncated"
    table["needs_review"] = (rng.random(rows) < 0.05) & ~broken
    table["review_reason"] = np.where(table["needs_review"], "outline_spread_mm 1.9 > 1.254", "")
    os.makedirs(output_dir, exist_ok=True)
    table.to_csv(os.path.join(output_dir, "predictions.csv"), index=False)
    with open(os.path.join(output_dir, "run.json"), "w") as handle:
        json.dump({"run_id": "bench", "model_path": "synthetic", "counts": {"processed_this_run": rows}, "timings": {"seconds": 0}}, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as output_dir:
        synthetic_run(output_dir, args.rows)
        started = time.perf_counter()
        path = write_report(output_dir)
        seconds = time.perf_counter() - started
        result = {
            "rows": args.rows, "seconds": round(seconds, 2), "report_mb": round(os.path.getsize(path) / 1e6, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    report(result, args.json)


if __name__ == "__main__":
    main()
