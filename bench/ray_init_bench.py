"""What a local `ray.init` costs, per option, and where its time goes.

    python bench/ray_init_bench.py --repeats 2

Each measurement runs in a fresh Python process (Ray can only start once per process): import ray, `ray.init(address="local",
include_dashboard=False, **options)`, one trivial task, `ray.shutdown()`. One variant also loads the shipped model (importing torch)
in a thread meanwhile, as the driver of `fetalpipe infer` once did (before it read the header without torch). With --profile, one more process runs `ray.init` under
cProfile and prints the calls that took longest. Prints a table and writes bench/results/ray_init.json."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

OPTIONS = {
    "default": {},
    "num_cpus=2": {"num_cpus": 2},
    "no worker prestart": {"_system_config": {"enable_worker_prestart": False}},
    "log_to_driver=False": {"log_to_driver": False},
    # Not a ray.init option: the driver loads the model (importing torch) in a thread meanwhile, as `fetalpipe infer` once did.
    "model loaded in a thread": {"load_model_in_thread": True},
}

ONE_RUN = """
import json, sys, threading, time
options = json.loads(sys.argv[1])
started = time.perf_counter()
if options.pop("load_model_in_thread", False):
    from fetalpipe.model.model_file import load_model
    threading.Thread(target=load_model).start()
import ray
imported = time.perf_counter()
ray.init(address="local", include_dashboard=False, **options)
initialised = time.perf_counter()
ray.get(ray.remote(lambda: 1).remote())
first_task = time.perf_counter()
ray.shutdown()
print(json.dumps({"import_s": imported - started, "init_s": initialised - imported, "first_task_s": first_task - initialised,
                  "shutdown_s": time.perf_counter() - first_task}))
"""

PROFILE = """
import cProfile, pstats, ray
profile = cProfile.Profile()
profile.enable()
ray.init(address="local", include_dashboard=False)
profile.disable()
ray.shutdown()
pstats.Stats(profile).sort_stats("cumulative").print_stats(r"ray/_private/(node|services|state|worker)\\.py", 12)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    rows = []
    for repeat in range(args.repeats):
        for name, options in OPTIONS.items():  # interleaved, so drift on a shared VM hits every option alike
            output = subprocess.run([sys.executable, "-c", ONE_RUN, json.dumps(options)], env=env, capture_output=True, text=True, check=True)
            rows.append({"option": name, "repeat": repeat, **json.loads(output.stdout.strip().splitlines()[-1])})
            row = rows[-1]
            print(f"{name:22s} import {row['import_s']:.2f} s  init {row['init_s']:.2f} s  first task {row['first_task_s']:.2f} s  shutdown {row['shutdown_s']:.2f} s", flush=True)
    results_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, "ray_init.json"), "w") as handle:
        json.dump({"rows": rows}, handle, indent=2)
    if args.profile:
        print(subprocess.run([sys.executable, "-c", PROFILE], env=env, capture_output=True, text=True, check=True).stdout)


if __name__ == "__main__":
    main()
