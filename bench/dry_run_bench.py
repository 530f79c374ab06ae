"""`fetalpipe infer --dry-run` at archive scale: wall time and peak memory of planning a 1,000,000-row manifest against an
output that already holds 500,000 done rows (the resume check included). With `--rerun`: every row is done, and a real
`fetalpipe infer` (no `--dry-run`) runs the driver's whole end of a run at that size: reading every stored row, the
CSV and the report (no Ray is started, since nothing is left to process). With `--start`: the driver's start of a real
run, Ray Data's input built from every pending row (`pipeline.infer.input_dataset`), in a fresh local Ray.

Why: a dry run is how a user checks a night's job before starting it; it must stay quick and small however large the
archive is. The paths are made up (planning does not read images): each is a stat that finds no file, so the dry run
also lists 500,000 errors it can already see, the pending rows whose files are missing.

    python bench/dry_run_bench.py [--rows 1000000] [--done 500000] [--json bench/results/dry_run.json]
    python bench/dry_run_bench.py --rerun [--rows 1000000] [--json bench/results/rerun_1m.json]
    python bench/dry_run_bench.py --start [--rows 1000000] [--json bench/results/start_1m.json]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_record import report  # noqa: E402  (bench/, the script's own folder)
from fetalpipe.model.model_file import DEFAULT_MODEL_PATH, file_sha256  # noqa: E402
from fetalpipe.pipeline.predictions import OUTPUT_COLUMNS, ROWS_PER_COMPACTED_FILE  # noqa: E402


def build(folder: str, rows: int, done: int) -> tuple[str, str]:
    """A manifest of ROWS made-up paths and an output whose predictions hold the first DONE of them, as the shipped
    model in int8 would have written them (every output column, compacted parts of 100,000 rows)."""
    paths = np.array([f"/archive/{index // 1000:04d}/scan_{index:07d}.png" for index in range(rows)], dtype=object)
    manifest = os.path.join(folder, "manifest.csv")
    pd.DataFrame({"image_path": paths, "subject_id": (np.arange(rows) // 2).astype(str), "pixel_spacing_mm": 0.15}).to_csv(manifest, index=False)
    output = os.path.join(folder, "out")
    os.makedirs(os.path.join(output, "predictions"))
    model_sha256 = file_sha256(DEFAULT_MODEL_PATH)
    for part, start in enumerate(range(0, done, ROWS_PER_COMPACTED_FILE)):
        count = min(ROWS_PER_COMPACTED_FILE, done - start)
        table = pd.DataFrame({column: np.full(count, np.nan) for column in OUTPUT_COLUMNS})
        table = table.assign(image_path=paths[start:start + count], status="error", error="file not found", model_sha256=model_sha256,
                             precision="int8", file_sha256="", file_size_bytes=-1, file_mtime_ns=-1, run_id="bench", review_reason="",
                             fetalpipe_version="bench", run_sequence=1)
        table.to_parquet(os.path.join(output, "predictions", f"part-compacted-bench-{part:05d}.parquet"), index=False)
    return manifest, output


def measure_start(rows: int) -> dict:
    """Peak RSS of this process (the driver) and seconds for building the input dataset of ROWS pending rows."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from fetalpipe.pipeline.infer import InferOptions, input_dataset

    paths = [f"/archive/{index // 1000:04d}/scan_{index:07d}.png" for index in range(rows)]
    pending = pd.DataFrame({"image_path": paths, "subject_id": (np.arange(rows) // 2).astype(str), "pixel_spacing_mm": 0.15,
                            "file_size_bytes": np.int64(250_000), "file_mtime_ns": np.int64(1_700_000_000_000_000_000)})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    input_dataset(pending, InferOptions(output_dir="unused"), run_id="bench")
    seconds = time.perf_counter() - started
    ray.shutdown()
    return {"mode": "start", "rows": rows, "seconds": round(seconds, 1), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--done", type=int, default=500_000)
    parser.add_argument("--rerun", action="store_true", help="every row done; a real run instead of a dry run")
    parser.add_argument("--start", action="store_true", help="measure the start of a real run instead: the input dataset of ROWS pending rows")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    if args.start:
        report(measure_start(args.rows), args.json)
        return
    if args.rerun:
        args.done = args.rows
    with tempfile.TemporaryDirectory() as folder:
        manifest, output = build(folder, args.rows, args.done)
        started = time.perf_counter()
        completed = subprocess.run([sys.executable, "-m", "fetalpipe.cli", "infer", "--manifest", manifest, "--output", output,
                                    *([] if args.rerun else ["--dry-run"])],
                                   capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        seconds = time.perf_counter() - started
        if completed.returncode != 0:
            sys.exit(completed.stdout + completed.stderr)
        written = sorted(os.listdir(output))
    result = {
        "mode": "rerun" if args.rerun else "dry run", "rows": args.rows, "done_rows": args.done, "seconds": round(seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "output_folder_after": written, "console_tail": completed.stdout.strip().splitlines()[-4:],
    }
    report(result, args.json)


if __name__ == "__main__":
    main()
