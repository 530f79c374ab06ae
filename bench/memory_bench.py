"""Scale benchmark: peak memory and img/s of `fetalpipe infer` on archives of 1k and 20k images.

    python bench/memory_bench.py --hc18 ../shared/data/hc18 --sizes 1000 20000

The archive is synthetic: N file names hard-linked to the 335 HC18 test_set images (flipped variants),
so it costs no disk. Every name is a separate input row with its own hash and output row.
Memory is the sum of PSS (proportional set size: shared pages such as Ray's object store
counted once) over every process of the run (driver, raylet, GCS, workers, actors), sampled every 0.5 s.
Prints a table and writes bench/results/memory.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import infer_bench  # noqa: E402  (this folder; shares the archive builder)
from fetalpipe.model.model_file import DEFAULT_MODEL_PATH  # noqa: E402


def build_archive(hc18_dir: str, size: int, folder: str) -> str:
    """`size` names hard-linked to infer_bench's test-set images and their mirror images."""
    originals = os.path.join(folder, "originals")
    os.makedirs(originals, exist_ok=True)
    sources = pd.read_csv(infer_bench.build_archive(hc18_dir, 2, originals))
    archive = os.path.join(folder, "archive")
    os.makedirs(archive, exist_ok=True)
    rows = []
    for index in range(size):
        source = sources.iloc[index % len(sources)]
        path = os.path.join(archive, f"{index:06d}.png")
        os.link(source["image_path"], path)
        rows.append({"image_path": path, "pixel_spacing_mm": source["pixel_spacing_mm"]})
    manifest = os.path.join(folder, "manifest.csv")
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def session_pss_bytes(session_id: int) -> int:
    """Sum of PSS over every process in the session (the run and the local Ray it started)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            if int(fields[3]) != session_id:  # field 6 of stat: session id
                continue
            with open(f"/proc/{entry}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, IndexError, ValueError):
            continue
    return total


def measure(manifest: str, output: str, model_path: str, actors: int, batch_size: int) -> dict:
    command = ["fetalpipe", "infer", "--manifest", manifest, "--output", output, "--model", model_path,
               "--actors", str(actors), "--batch-size", str(batch_size)]
    samples = []
    started = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)

    def sample() -> None:
        while process.poll() is None:
            samples.append((time.perf_counter() - started, session_pss_bytes(process.pid)))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    process.wait()
    sampler.join()
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"fetalpipe infer failed with exit code {process.returncode}")
    with open(os.path.join(output, "run.json")) as handle:
        record = json.load(handle)
    peak = max(pss for _, pss in samples)
    # Memory in the second half of the run against the first: growth with the archive shows here.
    half = [pss for seconds, pss in samples if seconds > elapsed / 2]
    first = [pss for seconds, pss in samples if elapsed * 0.2 < seconds <= elapsed / 2]
    return {
        "images": record["counts"]["rows"], "ok_rows": record["counts"]["ok"],
        "seconds_end_to_end": round(elapsed, 1), "img_per_s_end_to_end": round(record["counts"]["rows"] / elapsed, 2),
        "pipeline_img_per_s": record["timings"]["images_per_second"],
        "peak_pss_gib": round(peak / 2**30, 3),
        "median_pss_gib_first_half": round(pd.Series(first).median() / 2**30, 3) if first else None,
        "median_pss_gib_second_half": round(pd.Series(half).median() / 2**30, 3) if half else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hc18", default="../shared/data/hc18")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--model", default=DEFAULT_MODEL_PATH)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "runs": []}
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            manifest = build_archive(args.hc18, size, folder)
            run = measure(manifest, os.path.join(folder, "out"), args.model, args.actors, args.batch_size)
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "memory.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"{'images':>8s} {'img/s e2e':>10s} {'peak GiB':>9s} {'median GiB 1st half':>20s} {'2nd half':>9s}")
    for run in results["runs"]:
        print(f"{run['images']:8d} {run['img_per_s_end_to_end']:10.2f} {run['peak_pss_gib']:9.3f} "
              f"{run['median_pss_gib_first_half']:20.3f} {run['median_pss_gib_second_half']:9.3f}")


if __name__ == "__main__":
    main()
