"""SIGKILL the `fetalpipe infer` driver mid-run, rerun: every input exactly once, nothing lost."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow.parquet as pq

from conftest import SAMPLE_MANIFEST
from fetalpipe.pipeline.infer import InferOptions, run_inference
from fetalpipe.pipeline.predictions import read_predictions


def complete_parquet(path) -> bool:
    try:
        return pq.ParquetFile(path).metadata.num_rows > 0
    except Exception:  # still being written
        return False


def test_killed_driver_then_rerun_completes_without_duplicates(ray_local, tiny_model_path, reliability_log, tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "fetalpipe.cli", "infer", "--manifest", SAMPLE_MANIFEST, "--output", str(output),
               "--model", tiny_model_path, "--batch-size", "2", "--actors", "1"]
    driver = subprocess.Popen(command, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None and not any(map(complete_parquet, (output / "predictions").glob("*.parquet"))):
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray instance it started
    driver.wait(timeout=30)
    assert not (output / "predictions.csv").exists()  # it really died before the end
    done_before = len(read_predictions(str(output)))
    assert done_before > 0  # at least one batch had landed

    summary = run_inference(InferOptions(output_dir=str(output), manifest=SAMPLE_MANIFEST, model_path=tiny_model_path, batch_size=4, actors=1))
    # Only the rest is redone. Ray workers run in their own process groups, so the actor may still finish the batch it
    # was writing after the driver died: those rows count as done too, never twice.
    done_at_rerun = 20 - summary["processed_this_run"]
    assert done_before <= done_at_rerun < 20
    final = read_predictions(str(output))
    assert len(final) == 20 and final["image_path"].is_unique
    csv = pd.read_csv(output / "predictions.csv")
    assert len(csv) == 20 and csv["image_path"].is_unique
    assert len(pd.read_parquet(output / "predictions")) == 20  # the dataset as users read it
    reliability_log(area="infer: fault", case="SIGKILL of the infer driver and the local Ray it started, mid-run, then the same command again",
                    outcome=f"{done_before} rows had landed ({done_at_rerun} at the rerun); rerun processed the other {20 - done_at_rerun}; 20 of 20 rows, each once",
                    crashes=0, lost_rows=20 - len(final), duplicated_rows=int(final["image_path"].duplicated().sum()))
