"""The shipped model on the embedded sample (20 validation-split images it never trained on)."""

import os

import numpy as np
import pandas as pd

from fetalpipe.infer import run_demo
from fetalpipe.model_io import DEFAULT_MODEL_PATH, load_model


def test_shipped_model_is_small_and_loadable():
    assert os.path.getsize(DEFAULT_MODEL_PATH) <= 12 * 1024 * 1024  # both stages' weights in fp32, committed in the repo
    _, config, payload = load_model()
    assert payload["training"]["epochs_run"] >= 1 and config.input_size == 256
    assert config.refinement is not None and payload["review"]["thresholds"]  # the shipped model has both stages and a review rule


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
