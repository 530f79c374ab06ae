import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

import numpy as np
import pandas as pd
import pytest

SAMPLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fetalpipe", "assets", "sample")
SAMPLE_MANIFEST = os.path.join(SAMPLE_DIR, "manifest.csv")


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray instance for the whole session."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A random-weight model in the shipped format (fast enough to run anywhere)."""
    import torch

    from fetalpipe.model.config import resolve_config
    from fetalpipe.model.model_file import save_model
    from fetalpipe.model.networks import HeatmapUNet, ModelConfig

    config = resolve_config("fast")
    torch.manual_seed(0)
    model = HeatmapUNet(config.model)
    path = str(tmp_path_factory.mktemp("model") / "model.pt")
    save_model(path, model.state_dict(), config)
    return path


@pytest.fixture
def sample_manifest_copy(tmp_path):
    """The embedded sample manifest with absolute image paths, in a scratch folder."""
    table = pd.read_csv(SAMPLE_MANIFEST, dtype={"subject_id": str})
    table["image_path"] = [os.path.join(SAMPLE_DIR, p) for p in table["image_path"]]
    path = tmp_path / "manifest.csv"
    table.to_csv(path, index=False)
    return str(path)


def write_png(path, image):
    import cv2

    assert cv2.imwrite(str(path), image)
    return str(path)


def ultrasound_like(height=120, width=160, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((height, width)) * 255).astype(np.uint8)


@pytest.fixture(scope="session")
def reliability_log():
    """Tests record each bad input or fault they tried and what happened. With
    FETALPIPE_RELIABILITY_TABLE=PATH the session writes them as the table in docs/reliability.md."""
    rows = []
    yield lambda **row: rows.append(row)
    target = os.environ.get("FETALPIPE_RELIABILITY_TABLE")
    if target and rows:
        from reliability_table import write_reliability_table

        write_reliability_table(rows, target)


def model_missing_a_weight(source_path, path):
    """A copy of a model file whose state_dict lacks one tensor: what another version of the architecture would load."""
    import torch

    payload = torch.load(source_path, weights_only=False)
    payload["state_dict"].pop(next(iter(payload["state_dict"])))
    torch.save(payload, path)
    return str(path)
