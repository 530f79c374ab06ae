"""The model file: weights plus everything needed to use them (architecture, codec, input size)."""

from __future__ import annotations

import hashlib
import os

DEFAULT_MODEL_PATH = os.path.join(os.path.dirname(__file__), "assets", "model.pt")


class ModelFileError(ValueError):
    """The model file is missing or not a fetalpipe model."""


def save_model(path: str, state_dict: dict, train_config, metrics: dict | None = None, training: dict | None = None) -> None:
    import torch

    payload = {
        "format": "fetalpipe-model-v1",
        "train_config": train_config.to_dict(),
        "state_dict": {key: value.detach().clone() for key, value in state_dict.items()},
        "metrics": metrics or {},
        "training": training or {},
    }
    temporary = path + ".tmp"
    torch.save(payload, temporary)
    os.replace(temporary, path)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(path: str | None = None):
    """(model in eval mode, TrainConfig, payload). Raises ModelFileError with the reason."""
    import torch

    from fetalpipe.model import HeatmapUNet
    from fetalpipe.train import TrainConfig

    path = path or DEFAULT_MODEL_PATH
    if not os.path.isfile(path):
        raise ModelFileError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ModelFileError(f"cannot read model file {path}: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != "fetalpipe-model-v1":
        raise ModelFileError(f"{path} is not a fetalpipe model file")
    config = TrainConfig.from_dict(payload["train_config"])
    model = HeatmapUNet(config.model)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, config, payload
