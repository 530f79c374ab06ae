"""The shipped model on the embedded sample (20 validation-split images it never trained on)."""

import os

import numpy as np
import pandas as pd

from fetalpipe.model.model_file import DEFAULT_MODEL_PATH, load_model
from fetalpipe.pipeline.infer import run_demo


def test_shipped_model_is_small_and_loadable():
    assert os.path.getsize(DEFAULT_MODEL_PATH) <= 12 * 1024 * 1024  # both stages' weights in fp32, committed in the repo
    _, config, payload = load_model()
    assert payload["training"]["epochs_run"] >= 1 and config.input_size == 256
    assert config.refinement is not None and payload["review"]["kind"] == "logistic"  # the shipped model has both stages and a review rule


def test_demo_measures_the_sample(ray_local, tmp_path, capsys):
    summary = run_demo(str(tmp_path / "demo"))
    printed = capsys.readouterr().out
    assert "hc_ellipse_mm" in printed and "overlays" in printed
    assert summary["rows"] == 20
    predictions = pd.read_csv(tmp_path / "demo" / "predictions.csv")
    reference = pd.read_csv(os.path.join(os.path.dirname(DEFAULT_MODEL_PATH), "sample", "manifest.csv"))
    joined = predictions.assign(name=predictions["image_path"].map(os.path.basename)).merge(
        reference.assign(name=reference["image_path"].map(os.path.basename))[["name", "hc_mm"]].rename(columns={"hc_mm": "reference_hc_mm"}), on="name")
    error_mm = np.abs(joined["hc_ellipse_mm"] - joined["reference_hc_mm"])
    assert len(os.listdir(tmp_path / "demo" / "overlays")) == summary["ok"]
    assert np.nanmedian(error_mm) < 10.0  # a working model, on held-out images (figures: docs/model-card.md)


def test_a_healthy_run_prints_a_header_one_progress_display_and_a_summary_and_nothing_from_ray(tmp_path):
    """`fetalpipe demo` as a user runs it (a fresh process, no terminal): no error-level line, warning or traceback on
    the console, about 30 lines at most; Ray's own lines are in OUT/logs/ray.log; the report is written."""
    import re
    import subprocess
    import sys

    output = tmp_path / "demo"
    completed = subprocess.run([sys.executable, "-m", "fetalpipe.cli", "demo", "--output", str(output)], capture_output=True, text=True,
                               timeout=300, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    console = completed.stdout + completed.stderr
    assert completed.returncode == 0, console
    lines = console.strip().splitlines()
    assert len(lines) <= 30, console
    assert not [line for line in lines if re.search(r"error|warn|traceback|exception", line, re.I) and "0 error" not in line], console
    assert lines[0] == "fetalpipe infer" and re.search(r"^infer: 20/20 img \(100 %\).*0 errors", console, re.M), console
    assert re.search(r"^fetalpipe infer: 20 rows \(20 ok, 0 error, \d+ need review\); 20 processed in", console, re.M), console
    assert completed.stderr == ""
    ray_log = (output / "logs" / "ray.log").read_text()
    assert "Started a local Ray instance" in ray_log  # Ray's lines went to its log file
    assert (output / "report.html").is_file() and str(output / "report.html") in console
