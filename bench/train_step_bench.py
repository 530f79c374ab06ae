"""Training-step throughput per model config × threads × precision × memory format (one process;
two 1-thread Ray workers ≈ 2 × the 1-thread figure, minus gradient all-reduce).

    python bench/train_step_bench.py --repeats 3
    python bench/train_step_bench.py --repeats 3 --configs fast_deep --results bench/results/train_step_amx.json
    python bench/train_step_bench.py --repeats 3 --configs refinement --batch-size 16 --results bench/results/train_step_refinement_amx.json

`refinement` is the refinement stage's network on its polar crops (`RefinementConfig`'s model and crop shape); every
other name is a stage-1 network (`MODEL_CONFIGS`) on 256² inputs.

bf16 is timed with and without channels_last: on CPUs with native bf16 (AVX512_BF16, AMX) it is the fast one, elsewhere
emulated and about 25x slower (`--no-bf16` skips it). Prints a table (median img/s over repeats) and writes
bench/results/train_step.json (or --results), which records the machine; rows of configs not timed now are kept from the
file only when it was written on the same kind of machine."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fetalpipe.model.config import RefinementConfig  # noqa: E402
from fetalpipe.model.networks import MODEL_CONFIGS, HeatmapUNet  # noqa: E402
from bench_record import provenance  # noqa: E402  (bench/, the script's own folder)


def images_per_second(config_name: str, threads: int, bf16: bool, channels_last: bool, batch_size: int, steps: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if config_name == "refinement":
        refinement = RefinementConfig()
        model, input_shape = HeatmapUNet(refinement.model), refinement.codec().input_shape  # (rays, radial samples)
    else:
        model, input_shape = HeatmapUNet(MODEL_CONFIGS[config_name]), (256, 256)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(batch_size, 1, *input_shape).contiguous(memory_format=memory_format)
    timings = []
    for step in range(steps + 1):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            output = model(images)
        loss = output.float().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step:  # the first step pays one-off kernel set-up
            timings.append(time.perf_counter() - started)
    return batch_size / statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--configs", default="seed,fast")
    parser.add_argument("--no-bf16", action="store_true", help="skip bf16 (25x slower than fp32 on CPUs without native bf16)")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_step.json"))
    args = parser.parse_args()
    rows = []
    variants = ((False, False), (False, True)) if args.no_bf16 else ((False, False), (False, True), (True, False), (True, True))
    for config_name in args.configs.split(","):
        for threads in (1, 2):
            for bf16, channels_last in variants:
                rates = [images_per_second(config_name, threads, bf16, channels_last, args.batch_size, args.steps) for _ in range(args.repeats)]
                rows.append({"config": config_name, "threads": threads, "bf16": bf16, "channels_last": channels_last, "img_per_s_median": round(statistics.median(rates), 2)})
                print(f"{config_name:6s} threads={threads} bf16={bf16!s:5s} channels_last={channels_last!s:5s} {rows[-1]['img_per_s_median']:7.2f} img/s", flush=True)
    machine = {**provenance(), "torch": torch.__version__}  # provenance names the CPU, its cores and torch's capability on it
    path = args.results
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Rows of configs not rerun now are kept, so the file can grow one config at a time, but only from the same kind of machine.
    kept = []
    if os.path.exists(path):
        with open(path) as handle:
            stored = json.load(handle)
        if stored["machine"].get("machine") == machine["machine"] and stored["machine"].get("cpu_features") == machine["cpu_features"]:
            kept = [row for row in stored["rows"] if row["config"] not in args.configs.split(",")]
    with open(path, "w") as handle:
        json.dump({"machine": machine, "command": " ".join(["python", *sys.argv]), "batch_size": args.batch_size, "rows": kept + rows}, handle, indent=2)


if __name__ == "__main__":
    main()
