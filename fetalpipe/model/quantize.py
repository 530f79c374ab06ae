"""int8 inference: post-training static quantization of the U-Net's convolutions (PyTorch FX graph mode, oneDNN kernels).

Stage 1's forward pass takes 0.5-0.6 of the time of fp32 channels_last on a 2-core AVX2 machine, and 0.3 with AVX-512
(`bench/int8_bench.py`, docs/performance.md); validation HC MAE moves by 0.02 mm (docs/experiments.md note 10).
Activation scales and zero points are chosen once, on training images, by `fetalpipe calibrate`, and stored in the
model file; every actor then builds the same int8 model from the fp32 weights and those parameters, so results do
not depend on which images an actor happened to see first.

Kept in fp32: the 1x1 output head (the heatmap values the decoder refines). On CPUs with VNNI the decoder's 2x2,
stride-2 transposed convolutions run in int8 as a 1x1 convolution and a depth-to-space (`Int8Upsample2x`,
`int8_upsampling_pays`); elsewhere they stay fp32. PyTorch's own quantized ConvTranspose2d gave outputs uncorrelated
with fp32 on this model (correlation 0.03, measured)."""

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


def to_int8(model: nn.Module, quantization: dict[str, list[float]], input_shape: int | tuple[int, int], engine: str = INT8_ENGINE,
            upsampling_in_int8: bool | None = None) -> nn.Module:
    """The int8 inference model from fp32 weights and stored activation scales and zero points. Feed it
    `model.to_model_input(...)`; outputs are float32 heatmaps like the fp32 model's. `model` is changed.
    `upsampling_in_int8`: None follows `int8_upsampling_pays()`."""
    from torch.ao.quantization import MinMaxObserver
    from torch.ao.quantization.observer import FixedQParamsObserver

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
    return convert(prepared, upsampling_in_int8)


def convert(prepared: nn.Module, upsampling_in_int8: bool | None = None) -> torch.fx.GraphModule:
    """The int8 model from a prepared one whose observers hold their scales and zero points: PyTorch's conversion, then,
    where `upsampling_in_int8` (None: `int8_upsampling_pays()`), the transposed convolutions it leaves in fp32 moved to
    int8 (`upsample_in_int8`)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_fx(prepared)
    if upsampling_in_int8 is None:
        upsampling_in_int8 = int8_upsampling_pays()
    return upsample_in_int8(converted) if upsampling_in_int8 else converted


def int8_upsampling_pays() -> bool:
    """Whether the transposed convolutions run in int8 by default: on CPUs with VNNI (int8 dot products summed without
    int16 saturation) that made stage 1's forward pass 14-15 % faster and moved validation HC by at most 0.15 mm an
    image; on an AVX2-only CPU it gained 2-14 % of stage 1's forward pass at 1 thread, nothing steady at 2, and moved one
    validation image by 1.2 mm and one review flag (docs/performance.md)."""
    is_vnni_supported = getattr(torch.cpu, "_is_vnni_supported", None)  # private in torch 2.13: absent means no
    return bool(is_vnni_supported()) if is_vnni_supported is not None else False


def as_1x1_convolution(transposed: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A 2x2, stride-2 ConvTranspose2d's weight [C_in, C_out, 2, 2] and bias [C_out] as a 1x1 convolution's weight
    [4 C_out, C_in, 1, 1] and bias [4 C_out], output channels ordered (block row, block column, channel): each input
    pixel's 2x2 block of output pixels, side by side in depth. `blocks_to_pixels` moves them to their places."""
    in_channels, out_channels = transposed.weight.shape[:2]
    weight = transposed.weight.detach().permute(2, 3, 1, 0).reshape(4 * out_channels, in_channels, 1, 1).contiguous()
    return weight, (transposed.bias.detach().repeat(4) if transposed.bias is not None else None)


def blocks_to_pixels(blocks: torch.Tensor, out_channels: int) -> torch.Tensor:
    """[B, 4 C, H, W] in channels_last memory (`as_1x1_convolution`'s output order) -> [B, C, 2H, 2W] in channels_last
    memory: a depth-to-space, as one copy. fp32 or quint8 (the copy keeps the scale and zero point)."""
    batch, _, height, width = blocks.shape
    # memory [B, H, W, row, column, C] -> [B, H, row, W, column, C], which is [B, 2H, 2W, C].
    pixels = blocks.permute(0, 2, 3, 1).reshape(batch, height, width, 2, 2, out_channels).permute(0, 1, 3, 2, 4, 5).contiguous()
    return pixels.reshape(batch, 2 * height, 2 * width, out_channels).permute(0, 3, 1, 2)


class Int8Upsample2x(nn.Module):
    """A 2x2, stride-2 ConvTranspose2d in int8: the quantized Conv2d every other layer runs on, as a 1x1 convolution to
    each pixel's 2x2 output block (`as_1x1_convolution`), then `blocks_to_pixels`. The result is in channels_last
    memory, which the quantized concatenation after it needs to skip a dequantize-requantize.

    [B, C_in, H, W] quint8 -> [B, C_out, 2H, 2W] quint8 with the given output scale and zero point (those PyTorch's
    conversion chose for the fp32 layer's output)."""

    def __init__(self, transposed: nn.ConvTranspose2d, output_scale: float, output_zero_point: int):
        super().__init__()
        from torch.ao.quantization import default_weight_observer

        weight, bias = as_1x1_convolution(transposed)
        observer = default_weight_observer()  # per tensor, as the other layers' weights
        observer(weight)
        weight_scale, weight_zero_point = observer.calculate_qparams()
        self.conv = torch.ao.nn.quantized.Conv2d(weight.shape[1], weight.shape[0], 1)
        self.conv.set_weight_bias(torch.quantize_per_tensor(weight, float(weight_scale), int(weight_zero_point), torch.qint8), bias)
        self.conv.scale, self.conv.zero_point = float(output_scale), int(output_zero_point)
        self.out_channels = weight.shape[0] // 4

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return blocks_to_pixels(self.conv(features), self.out_channels)


def _is_upsample_2x(module: nn.Module) -> bool:
    return (isinstance(module, nn.ConvTranspose2d) and module.kernel_size == (2, 2) and module.stride == (2, 2) and module.padding == (0, 0)
            and module.output_padding == (0, 0) and module.dilation == (1, 1) and module.groups == 1)


def upsample_in_int8(converted: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace each `dequantize -> ConvTranspose2d(2x2, stride 2) -> quantize_per_tensor` that convert_fx leaves in the
    graph by one `Int8Upsample2x` with that quantize's scale and zero point: the stored parameters and their names stay
    as they are. `converted` is changed."""
    graph = converted.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or not _is_upsample_2x(converted.get_submodule(node.target)):
            continue
        dequantize, users = node.args[0], list(node.users)
        if not (isinstance(dequantize, torch.fx.Node) and dequantize.op == "call_method" and dequantize.target == "dequantize"
                and len(users) == 1 and users[0].target is torch.quantize_per_tensor):
            continue  # not between two int8 ops: left in fp32
        quantize = users[0]
        scale, zero_point = (getattr(converted, argument.target) if isinstance(argument, torch.fx.Node) else argument for argument in quantize.args[1:3])
        name = node.target.replace(".", "_") + "_int8"
        converted.add_submodule(name, Int8Upsample2x(converted.get_submodule(node.target), float(scale), int(zero_point)))
        with graph.inserting_before(quantize):
            upsampled = graph.call_module(name, (dequantize.args[0],))
        quantize.replace_all_uses_with(upsampled)
        for unused in (quantize, node, dequantize):
            if not unused.users:
                graph.erase_node(unused)
    graph.eliminate_dead_code()
    graph.lint()
    converted.delete_all_unused_submodules()
    converted.recompile()
    return converted
