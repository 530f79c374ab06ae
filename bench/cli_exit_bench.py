"""What ending a `fetalpipe` command costs: the console script's quick exit against a plain `sys.exit(main())`.

    python bench/cli_exit_bench.py --repeats 5

Both run the same `fetalpipe infer` (a fresh output folder each time, the embedded 20-image sample by default) in a
new process, alternating, and the wall clock counts from process start to process exit. The plain exit runs
Ray's exit hook (it sleeps 0.5 s, then stops the local Ray) and the interpreter's teardown; `fetalpipe.cli.run`
stops Ray itself and leaves with os._exit once every output is written. `seconds_in_run_inference` is the time
inside the command (from its run.json), so wall − that is start-up plus exit, the part the entry point changes. Prints a table and writes
bench/results/cli_exit.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

SAMPLE_MANIFEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fetalpipe", "assets", "sample", "manifest.csv")
ENTRY_POINTS = {
    "quick exit (fetalpipe.cli.run, the console script)": [sys.executable, "-m", "fetalpipe.cli"],
    "plain exit (sys.exit(main()))": [sys.executable, "-c", "import sys; from fetalpipe.cli import main; sys.exit(main())"],
}


def timed_infer(entry: list[str], manifest: str, output: str) -> tuple[float, float]:
    started = time.perf_counter()
    subprocess.run([*entry, "infer", "--manifest", manifest, "--output", output], check=True,
                   env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    with open(os.path.join(output, "run.json")) as handle:
        return wall, json.load(handle)["timings"]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=SAMPLE_MANIFEST)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cli_exit.json"))
    args = parser.parse_args()

    walls = {name: [] for name in ENTRY_POINTS}
    inside = {name: [] for name in ENTRY_POINTS}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for index, (name, entry) in enumerate(ENTRY_POINTS.items()):
                wall, seconds = timed_infer(entry, args.manifest, os.path.join(folder, f"{repeat}-{index}"))
                walls[name].append(wall)
                inside[name].append(seconds)
                print(f"repeat {repeat + 1}: {name}: {wall:.2f} s wall, {seconds:.2f} s in run_inference", flush=True)
    rows = {name: {"wall_seconds_median": round(statistics.median(walls[name]), 2),
                   "seconds_in_run_inference_median": round(statistics.median(inside[name]), 2),
                   "start_and_exit_seconds_median": round(statistics.median(w - s for w, s in zip(walls[name], inside[name])), 2),
                   "start_and_exit_seconds": [round(w - s, 2) for w, s in zip(walls[name], inside[name])],
                   "wall_seconds": [round(w, 2) for w in walls[name]]} for name in ENTRY_POINTS}
    quick_name, plain_name = ENTRY_POINTS
    # The command itself varies by seconds from run to run here, so compare what lies outside it: start-up + exit.
    outside = {name: [w - s for w, s in zip(walls[name], inside[name])] for name in ENTRY_POINTS}
    saved = round(statistics.median(p - q for p, q in zip(outside[plain_name], outside[quick_name])), 2)
    print(f"\n{'entry point':52s} {'wall (s)':>9s} {'in command (s)':>15s} {'start + exit (s)':>17s}")
    for name, row in rows.items():
        print(f"{name:52s} {row['wall_seconds_median']:9.2f} {row['seconds_in_run_inference_median']:15.2f} {row['start_and_exit_seconds_median']:17.2f}")
    print(f"quick exit saves {saved:.2f} s of start-up + exit a command (median of the per-repeat differences)")
    record = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "manifest": os.path.relpath(args.manifest), "repeats": args.repeats,
              "entry_points": rows, "saved_seconds_median": saved}
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as handle:
        json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
