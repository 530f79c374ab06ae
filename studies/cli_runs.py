"""How the studies train a recipe and score it: through the CLI, as a user would (`fetalpipe train`, then `infer` and
`evaluate` on the validation manifest), each command in its own process, logging to RUN_DIR/COMMAND.log."""

from __future__ import annotations

import os
import subprocess
import sys


def train_infer_evaluate(run_dir: str, manifest: str, val_manifest: str, train_options: list[str]) -> str:
    """`fetalpipe train --manifest MANIFEST --output RUN_DIR TRAIN_OPTIONS…`, then its calibrated model on VAL_MANIFEST;
    returns the path of the validation report's metrics.json. A failing command raises (its log says why)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    validation = os.path.join(run_dir, "val")
    for command in (["train", "--manifest", manifest, "--output", run_dir, *train_options],
                    ["infer", "--manifest", val_manifest, "--model", os.path.join(run_dir, "model_calibrated.pt"), "--output", validation],
                    ["evaluate", "--predictions", validation, "--manifest", val_manifest, "--output", os.path.join(validation, "report")]):
        with open(os.path.join(run_dir, f"{command[0]}.log"), "a") as log:
            subprocess.run([sys.executable, "-m", "fetalpipe.cli", *command], check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return os.path.join(validation, "report", "metrics.json")
