"""The model file: weights plus everything needed to use them (architecture, codec, input size)."""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
import zipfile

DEFAULT_MODEL_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "model.pt")
MODEL_FORMAT = "fetalpipe-model-v1"


class ModelFileError(ValueError):
    """The model file is missing, damaged, or not a fetalpipe model."""


def save_model(path: str, state_dict: dict, train_config, metrics: dict | None = None, training: dict | None = None,
               calibration: dict | None = None, int8_quantization: dict | None = None, refinement_state_dict: dict | None = None,
               review: dict | None = None, refinement_int8_quantization: dict | None = None, review_without_spacing: dict | None = None) -> None:
    """`refinement_state_dict`: the weights of the refinement stage that `train_config.refinement` describes.
    `refinement_int8_quantization`: as `int8_quantization`, for the refinement stage's network.
    `review`: the review flag's rule (weights and threshold) fitted by `calibrate` (`review.ReviewRule`);
    `review_without_spacing`: its rule for rows without a pixel spacing (`review.ReviewRules`).
    `calibration`: a fitted `calibration.SizeCalibration` with its report, applied by inference.
    `int8_quantization`: {observer: [scale, zero point]} from `quantize.observe_quantization` (plain numbers, so the
    torch-free header reader sees them), which lets inference run in int8."""
    import torch

    payload = {
        "format": MODEL_FORMAT,
        "train_config": train_config.to_dict(),
        "state_dict": {key: value.detach().clone() for key, value in state_dict.items()},
        "metrics": metrics or {},
        "training": training or {},
    }
    if calibration:
        payload["calibration"] = calibration
    if int8_quantization:
        payload["int8_quantization"] = int8_quantization
    if refinement_state_dict is not None:
        payload["refinement_state_dict"] = {key: value.detach().clone() for key, value in refinement_state_dict.items()}
    if review:
        payload["review"] = review
    if review_without_spacing:
        payload["review_without_spacing"] = review_without_spacing
    if refinement_int8_quantization:
        payload["refinement_int8_quantization"] = refinement_int8_quantization
    import io

    from fetalpipe.runtime import storage

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    storage.write_bytes(path, buffer.getvalue())  # whole or not at all, on a disk or an object store


def refinement_entries(payload: dict, with_int8: bool = False) -> dict:
    """The refinement stage's part of a loaded payload, as `save_model` keyword arguments: copying a model file's
    stage 1 with these keeps its stage 2 (and, `with_int8`, its stage-2 int8 parameters)."""
    entries = {"refinement_state_dict": payload.get("refinement_state_dict")}
    if with_int8:
        entries["refinement_int8_quantization"] = payload.get("refinement_int8_quantization")
    return entries


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _HeaderUnpickler(pickle.Unpickler):
    """Unpickles a torch.save payload without torch: every tensor (and any other torch object) comes back as None."""

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" or module.startswith("torch."):
            return _no_tensor
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")

    def persistent_load(self, persistent_id):
        return None


def _no_tensor(*args, **kwargs) -> None:
    return None


def _existing_intact_file(path: str | None) -> str:
    """The model file's path once it exists and its zip checksums hold. torch.load does not check them: a flipped byte
    in the weights loads silently and measures wrongly. Checking reads the file once (about 8 ms for the shipped 8 MB model)."""
    from fetalpipe.runtime import storage

    path = path or DEFAULT_MODEL_PATH
    if storage.is_uri(path):  # read from a local copy (downloaded once per machine)
        try:
            path = storage.local_copy(path)
        except OSError as error:
            raise ModelFileError(f"model file not found or not readable: {path}: {error}") from error
    if not os.path.isfile(path):
        raise ModelFileError(f"model file not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception as error:  # not a zip at all
        raise ModelFileError(f"cannot read model file {path}: {error}") from error
    if damaged is not None:
        raise ModelFileError(f"model file {path} is damaged: {damaged} fails its checksum; copy the file again")
    return path


def _check_format(payload, path: str) -> None:
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path} is not a fetalpipe model file")


def read_model_header(path: str | None = None) -> dict:
    """A model file's payload without its weights (format, train_config, metrics, training), read without importing
    torch. `fetalpipe infer`'s driver checks the file with it while Ray starts: importing torch there slowed
    `ray.init` by 1.6–3.2 s on 2 cores (`bench/ray_init_bench.py`). Raises ModelFileError with the reason."""
    path = _existing_intact_file(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pickled = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
            payload = _HeaderUnpickler(archive.open(pickled)).load()
    except Exception as error:  # no pickle inside, or objects a fetalpipe model never holds
        raise ModelFileError(f"cannot read model file {path}: {error}") from error
    _check_format(payload, path)
    return {key: value for key, value in payload.items() if not key.endswith("state_dict")}


def load_model(path: str | None = None):
    """(model in eval mode, TrainConfig, payload). Raises ModelFileError with the reason."""
    import torch

    from fetalpipe.model.config import TrainConfig
    from fetalpipe.model.networks import HeatmapUNet

    path = _existing_intact_file(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ModelFileError(f"cannot read model file {path}: {error}") from error
    _check_format(payload, path)
    config = TrainConfig.from_dict(payload["train_config"])
    model = HeatmapUNet(config.model)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:  # written by another version of the architecture, or edited by hand
        reason = " ".join(str(error).split("\n", 1)[-1].split())
        raise ModelFileError(f"model file {path}: its weights do not fit the architecture its config describes: {reason}") from None
    model.eval()
    return model, config, payload


def load_refinement_model(config, payload: dict, path: str = "model file"):
    """The refinement stage's network (eval mode) from a loaded payload, or None for a one-stage model."""
    from fetalpipe.model.networks import HeatmapUNet

    if config.refinement is None:
        return None
    if "refinement_state_dict" not in payload:
        raise ModelFileError(f"{path}: its config has a refinement stage but the file holds no weights for it")
    model = HeatmapUNet(config.refinement.model)
    try:
        model.load_state_dict(payload["refinement_state_dict"])
    except RuntimeError as error:
        reason = " ".join(str(error).split("\n", 1)[-1].split())
        raise ModelFileError(f"model file {path}: its refinement weights do not fit the architecture its config describes: {reason}") from None
    return model.eval()
