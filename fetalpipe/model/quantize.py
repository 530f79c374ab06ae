"""int8 inference: post-training static quantization of the U-Net's convolutions (PyTorch FX graph mode, oneDNN kernels).

On the 2-core AVX2 machine the forward pass of the shipped model takes 0.5-0.6 of the time of fp32 channels_last
(`bench/int8_bench.py`), and validation HC MAE moves by 0.02 mm (docs/experiments.md note 10).
Activation scales and zero points are chosen once, on training images, by `fetalpipe calibrate`, and stored in the
model file; every actor then builds the same int8 model from the fp32 weights and those parameters, so results do
not depend on which images an actor happened to see first.

Kept in fp32: the transposed convolutions (PyTorch's quantized ConvTranspose2d gave outputs uncorrelated with fp32
on this model: correlation 0.03, measured) and the 1x1 output head (the heatmap values the decoder refines)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

INT8_ENGINE = "onednn"  # faster than "x86" (fbgemm) on the AVX2 machine: `bench/int8_bench.py`
CALIBRATION_IMAGES = 64  # images whose activations set the int8 parameters; 16 gave the same validation HC MAE to 0.002 mm


class Int8Unavailable(RuntimeError):
    """This build of PyTorch has no oneDNN quantized kernels (e.g. some ARM builds)."""


def _qconfig_mapping(activation_observer):
    from torch.ao.quantization import QConfig, QConfigMapping, default_weight_observer

    per_tensor = QConfig(activation=activation_observer.with_args(reduce_range=False), weight=default_weight_observer)
    return QConfigMapping().set_global(per_tensor).set_object_type(nn.ConvTranspose2d, None).set_module_name("head", None)


def _example_input(input_shape: int | tuple[int, int]) -> torch.Tensor:
    """[1, 1, H, W] zeros: a square stage-1 input (an int) or the refinement stage's (rows, columns)."""
    height, width = (input_shape, input_shape) if isinstance(input_shape, int) else tuple(input_shape)
    return torch.zeros(1, 1, height, width)


def _prepared(model: nn.Module, input_shape: int | tuple[int, int], activation_observer, engine: str = INT8_ENGINE) -> nn.Module:
    """The fp32 model (BatchNorm folded) with an observer after every op that will run in int8. The engine is
    process-wide in PyTorch; it is set here because the weights are packed for it when the model is converted."""
    from torch.ao.quantization.quantize_fx import prepare_fx

    from fetalpipe.model.networks import fold_batchnorm

    if engine not in torch.backends.quantized.supported_engines:
        raise Int8Unavailable(f"int8 inference needs PyTorch's {engine!r} quantized engine; this build has "
                              f"{torch.backends.quantized.supported_engines}: use --precision fp32")
    torch.backends.quantized.engine = engine
    example = _example_input(input_shape)
    # No stack trace per traced op: recording them imports torch._dynamo and torch._inductor, 1.9 s of each actor's start.
    stack_traces_setting = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's FX quantization announces its move to torchao on every call
            return prepare_fx(fold_batchnorm(model.eval()), _qconfig_mapping(activation_observer), example_inputs=(example,))
    finally:
        torch.fx.config.do_not_emit_stack_traces = stack_traces_setting


def _observers(prepared: nn.Module) -> dict[str, nn.Module]:
    """Every observer by name. Ops whose inputs and output must share parameters (cat, max-pool) share one observer
    under several names; all of them are listed."""
    from torch.ao.quantization.observer import ObserverBase

    return {name: module for name, module in prepared.named_modules(remove_duplicate=False) if isinstance(module, ObserverBase)}


def observe_quantization(model: nn.Module, images: np.ndarray, batch_size: int = 8) -> dict[str, list[float]]:
    """float32 [N, H, W] images in [0, 1] (model input pixels, or polar crops) -> {observer: [scale, zero_point]}, what
    `to_int8` needs.

    Histograms of the activations choose each range (minimising the quantisation error, which clips rare outliers).
    The resulting scale and zero point are stored, not the histograms: building the int8 model from them needs no
    histogram search (that took 1.5 s per actor, measured). `model` is changed (BatchNorm folded)."""
    from torch.ao.quantization import HistogramObserver

    from fetalpipe.model.networks import to_model_input

    prepared = _prepared(model, tuple(images.shape[-2:]), HistogramObserver)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            prepared(to_model_input(images[start:start + batch_size]))
    quantization = {}
    for name, observer in _observers(prepared).items():
        scale, zero_point = observer.calculate_qparams()  # the histogram search: once per observer
        quantization[name] = [float(scale), int(zero_point)]
    return quantization


def to_int8(model: nn.Module, quantization: dict[str, list[float]], input_shape: int | tuple[int, int], engine: str = INT8_ENGINE) -> nn.Module:
    """The int8 inference model from fp32 weights and stored activation scales and zero points. Feed it
    `model.to_model_input(...)`; outputs are float32 heatmaps like the fp32 model's. `model` is changed."""
    from torch.ao.quantization import MinMaxObserver
    from torch.ao.quantization.observer import FixedQParamsObserver
    from torch.ao.quantization.quantize_fx import convert_fx

    prepared = _prepared(model, input_shape, MinMaxObserver, engine)
    observers = _observers(prepared)
    if set(observers) != set(quantization):
        raise ValueError("the model file's int8 quantization parameters do not fit this architecture; run `fetalpipe calibrate` again")
    fixed = {}  # one replacement per observer, so that names sharing an observer keep sharing it
    for name, observer in observers.items():
        scale, zero_point = quantization[name]
        fixed.setdefault(id(observer), FixedQParamsObserver(scale=scale, zero_point=int(zero_point)))
        parent, _, attribute = name.rpartition(".")
        setattr(prepared.get_submodule(parent), attribute, fixed[id(observer)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(prepared)
