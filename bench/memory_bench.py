"""Scale benchmark: peak memory and img/s of `fetalpipe infer` on archives of 1k and 20k images.

    python bench/memory_bench.py --hc18 ../shared/data/hc18 --sizes 1000 20000
    python bench/memory_bench.py --hc18 ../shared/data/hc18 --sizes 1000 --frame-scales 1 2.4 --results bench/results/memory_frame_size.json
    python bench/memory_bench.py --hc18 ../shared/data/hc18 --sizes 1000 --frame-scales 2.4 --decode-in tasks --results bench/results/memory_decode_in_tasks.json

The archive is synthetic: N file names hard-linked to the 335 HC18 test_set images (flipped variants),
so it costs no disk. Every name is a separate input row with its own hash and output row.
Memory is the sum of PSS (proportional set size: shared pages such as Ray's object store
counted once) over every process of the run (driver, raylet, GCS, workers, actors), sampled every 0.5 s.
`--frame-scales` runs each archive again with its frames resized (2.4: 1920 x 1296, a full-HD screenshot's size): the
refinement stage reads each frame at its own size, so an actor's batch holds every frame of it in full. `--decode-in tasks`
measures the separate decoding stage, which hands whole decoded batches to the actors. Prints a table
and writes bench/results/memory.json (or --results)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import infer_bench  # noqa: E402  (this folder; shares the archive builder)
from bench_record import provenance  # noqa: E402  (this folder)
from fetalpipe.model.model_file import DEFAULT_MODEL_PATH, file_sha256  # noqa: E402


def build_archive(hc18_dir: str, size: int, folder: str, frame_scale: float = 1.0) -> str:
    """`size` names hard-linked to infer_bench's test-set images and their mirror images, each resized by `frame_scale`
    (its pixel spacing divided by it: the same heads in larger or smaller frames)."""
    originals = os.path.join(folder, "originals")
    os.makedirs(originals, exist_ok=True)
    sources = pd.read_csv(infer_bench.build_archive(hc18_dir, 2, originals, frame_scale))
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


def measure(manifest: str, output: str, model_path: str, actors: int, batch_size: int, decode_in: str = "actors") -> dict:
    command = ["fetalpipe", "infer", "--manifest", manifest, "--output", output, "--model", model_path,
               "--actors", str(actors), "--batch-size", str(batch_size), "--decode-in", decode_in]
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
    parser.add_argument("--frame-scales", type=float, nargs="+", default=[1.0],
                        help="each archive again with its frames resized by these factors (HC18's are 800 x 540)")
    parser.add_argument("--model", default=DEFAULT_MODEL_PATH)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--decode-in", choices=["actors", "tasks"], default="actors", help="as `fetalpipe infer --decode-in`")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "memory.json"))
    args = parser.parse_args()
    results = {**provenance(), "command": " ".join(["python", *sys.argv]), "model_sha256": file_sha256(args.model), "runs": []}
    for frame_scale in args.frame_scales:
        for size in args.sizes:
            with tempfile.TemporaryDirectory() as folder:
                manifest = build_archive(args.hc18, size, folder, frame_scale)
                run = {"frame_scale": frame_scale, "decode_in": args.decode_in,
                       **measure(manifest, os.path.join(folder, "out"), args.model, args.actors, args.batch_size, args.decode_in)}
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"{'frames ×':>8s} {'images':>8s} {'img/s e2e':>10s} {'peak GiB':>9s} {'median GiB 1st half':>20s} {'2nd half':>9s}")
    for run in results["runs"]:
        print(f"{run['frame_scale']:8.2f} {run['images']:8d} {run['img_per_s_end_to_end']:10.2f} {run['peak_pss_gib']:9.3f} "
              f"{run['median_pss_gib_first_half']:20.3f} {run['median_pss_gib_second_half']:9.3f}")


if __name__ == "__main__":
    main()
