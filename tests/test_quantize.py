import os

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SAMPLE_MANIFEST
from fetalpipe.data.imaging import read_image, resize_to_model
from fetalpipe.model.model_file import DEFAULT_MODEL_PATH, load_model, read_model_header, refinement_entries, save_model
from fetalpipe.model.networks import to_model_input
from fetalpipe.model.quantize import (Int8Upsample2x, _prepared, as_1x1_convolution, blocks_to_pixels, convert, int8_upsampling_pays,
                                      observe_quantization, to_int8)
from fetalpipe.pipeline.infer import InferOptions, load_inference_model, resolve_precision, run_inference
from fetalpipe.pipeline.predictions import read_predictions


def sample_images(input_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The embedded sample in model input pixels, and each image's original (width, height)."""
    manifest = pd.read_csv(SAMPLE_MANIFEST)
    decoded = [read_image(os.path.join(os.path.dirname(SAMPLE_MANIFEST), path)).pixels for path in manifest["image_path"]]
    images = np.stack([resize_to_model(pixels, input_size)[0] for pixels in decoded])
    return images, np.array([[pixels.shape[1], pixels.shape[0]] for pixels in decoded])


@pytest.mark.parametrize("upsampling_in_int8", [True, False])
def test_shipped_int8_model_measures_like_fp32(upsampling_in_int8):
    """The shipped file runs in int8 (quantized convolutions), with its upsampling in int8 or fp32, and its landmarks stay
    within a pixel or two of fp32's. Which upsampling the actors get depends on the CPU: the refinement-stage test below."""
    fp32, config, payload = load_inference_model(DEFAULT_MODEL_PATH, "fp32")
    int8 = to_int8(load_model(DEFAULT_MODEL_PATH)[0], payload["int8_quantization"], config.input_size, upsampling_in_int8=upsampling_in_int8)
    assert any(isinstance(module, torch.ao.nn.quantized.Conv2d) for module in int8.modules())
    assert not any(isinstance(module, torch.ao.nn.quantized.Conv2d) for module in fp32.modules())
    # In int8, every upsampling is: none is left in fp32 between a dequantize and a quantize.
    upsamplers_in_int8 = sum(isinstance(module, Int8Upsample2x) for module in int8.modules())
    upsamplers_in_fp32 = sum(isinstance(module, torch.nn.ConvTranspose2d) for module in int8.modules())
    assert (upsamplers_in_int8, upsamplers_in_fp32) == ((config.model.depth, 0) if upsampling_in_int8 else (0, config.model.depth))
    images, original_sizes = sample_images(config.input_size)
    codec = config.codec()
    with torch.inference_mode():
        points = {name: codec.decode(model(to_model_input(images)).numpy(), original_sizes)[0] for name, model in (("fp32", fp32), ("int8", int8))}
    distance_px = np.linalg.norm(points["int8"] - points["fp32"], axis=-1)  # model input pixels, same codec
    assert np.isfinite(distance_px).all()
    assert np.median(distance_px) < 0.5 and distance_px.max() < 3.0


def test_stored_quantization_rebuilds_the_calibrated_int8_model_exactly(tmp_path):
    """Scales and zero points are chosen by histograms once and stored; the model rebuilt from the file computes exactly
    what the histogram-calibrated model computes, and parameters that do not fit the architecture are refused."""
    model, config, payload = load_model(DEFAULT_MODEL_PATH)
    images, _ = sample_images(config.input_size)
    quantization = observe_quantization(load_model(DEFAULT_MODEL_PATH)[0], images[:8])
    scales, zero_points = np.array(list(quantization.values())).T
    assert (scales > 0).all() and ((zero_points >= 0) & (zero_points <= 255)).all()
    assert (zero_points == 0).sum() >= len(zero_points) // 2  # conv+ReLU fused: those outputs start at 0

    from torch.ao.quantization import HistogramObserver

    histogram_model = _prepared(load_model(DEFAULT_MODEL_PATH)[0], config.input_size, HistogramObserver)
    with torch.inference_mode():
        histogram_model(to_model_input(images[:8]))
    histogram_model = convert(histogram_model)

    path = str(tmp_path / "with_quantization.pt")
    save_model(path, payload["state_dict"], config, int8_quantization=quantization, **refinement_entries(payload))
    assert read_model_header(path)["int8_quantization"] == quantization  # plain numbers: the torch-free header reads them
    rebuilt, _, _ = load_inference_model(path, "int8")
    batch = to_model_input(images[8:16])
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(batch), histogram_model(batch), rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit this architecture"):
        to_int8(model, dict(list(quantization.items())[1:]), config.input_size)


def test_int8_upsample_is_the_transposed_convolution_as_a_1x1_convolution_and_depth_to_space():
    """The rearrangement is exact in fp32, and the int8 module stays within a couple of output quantization steps of
    the fp32 transposed convolution, its result in channels_last memory (what keeps the next concatenation in int8)."""
    torch.manual_seed(0)
    transposed = torch.nn.ConvTranspose2d(6, 5, 2, stride=2)
    # Inputs up to half the uint8 range: without VNNI, oneDNN sums pairs of uint8 x int8 products in int16, which
    # saturates above that (255 x 127 x 2 > 32767), and this test is about the rearrangement, not that.
    features = (torch.rand(3, 6, 7, 9) / 2).to(memory_format=torch.channels_last)
    expected = transposed(features).detach()

    weight, bias = as_1x1_convolution(transposed)
    moved = blocks_to_pixels(torch.nn.functional.conv2d(features, weight, bias), out_channels=5)
    assert moved.shape == expected.shape == (3, 5, 14, 18)
    torch.testing.assert_close(moved, expected, rtol=0, atol=1e-5)

    output_scale = float(expected.max() - expected.min()) / 255
    output_zero_point = int(round(-float(expected.min()) / output_scale))
    upsample = Int8Upsample2x(transposed, output_scale, output_zero_point)
    quantized = upsample(torch.quantize_per_tensor(features, 1 / 255, 0, torch.quint8))
    assert quantized.is_quantized and quantized.q_scale() == output_scale and quantized.q_zero_point() == output_zero_point
    assert quantized.is_contiguous(memory_format=torch.channels_last)
    error_steps = (quantized.dequantize() - expected).abs() / output_scale
    assert error_steps.mean() < 0.5 and error_steps.max() < 2.5


def test_precision_is_chosen_once_recorded_per_row_and_part_of_the_resume_key(ray_local, tiny_model_path, tmp_path, capsys):
    shipped, tiny = read_model_header(DEFAULT_MODEL_PATH), read_model_header(tiny_model_path)
    assert resolve_precision("auto", shipped) == "int8" and resolve_precision("auto", tiny) == "fp32"
    assert resolve_precision("fp32", shipped) == "fp32"
    with pytest.raises(ValueError, match="no int8 quantization parameters"):
        resolve_precision("int8", tiny)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("bf16", shipped)

    manifest = pd.read_csv(SAMPLE_MANIFEST).head(4)
    manifest["image_path"] = [os.path.join(os.path.dirname(SAMPLE_MANIFEST), p) for p in manifest["image_path"]]
    manifest_path = str(tmp_path / "four.csv")
    manifest.to_csv(manifest_path, index=False)
    output = str(tmp_path / "out")
    options = dict(output_dir=output, manifest=manifest_path, actors=1)
    assert run_inference(InferOptions(**options))["processed_this_run"] == 4
    assert (read_predictions(output)["precision"] == "int8").all()
    assert "4 to process" in capsys.readouterr().out
    # Another precision measures differently: its rows are redone, not taken as done.
    assert run_inference(InferOptions(**options, precision="fp32"))["processed_this_run"] == 4
    rows = read_predictions(output)
    assert len(rows) == 4 and (rows["precision"] == "fp32").all()
    assert run_inference(InferOptions(**options, precision="fp32"))["processed_this_run"] == 0

    # A model without int8 parameters runs in fp32, and the job says how to get int8.
    run_inference(InferOptions(output_dir=str(tmp_path / "tiny"), manifest=manifest_path, model_path=tiny_model_path, actors=1))
    assert "fp32 (this model file has no int8 parameters: `fetalpipe calibrate` adds them)" in capsys.readouterr().out
    assert (read_predictions(str(tmp_path / "tiny"))["precision"] == "fp32").all()

    from fetalpipe.cli import main

    assert main(["infer", "--manifest", manifest_path, "--output", str(tmp_path / "x"), "--model", tiny_model_path, "--precision", "int8"]) == 2


def test_shipped_refinement_stage_runs_in_int8_close_to_fp32():
    """Stage 2's int8 parameters come from `calibrate` like stage 1's; in int8 its ray outline stays within a fraction of
    a polar column of fp32's on the sample (stage 1's fp32 ellipses as priors)."""
    from fetalpipe import LANDMARK_COLUMNS
    from fetalpipe.measure import ellipse as ellipse_geometry
    from fetalpipe.pipeline.infer import LandmarkPredictor

    fp32, int8 = LandmarkPredictor(DEFAULT_MODEL_PATH, threads=1, precision="fp32"), LandmarkPredictor(DEFAULT_MODEL_PATH, threads=1, precision="int8")
    assert any(isinstance(module, torch.ao.nn.quantized.Conv2d) for module in int8.refinement.modules())
    # The actors' upsampling, in both stages, follows the CPU (`int8_upsampling_pays`).
    assert any(isinstance(module, Int8Upsample2x) for module in int8.model.modules()) == int8_upsampling_pays()
    assert any(isinstance(module, Int8Upsample2x) for module in int8.refinement.modules()) == int8_upsampling_pays()
    manifest = pd.read_csv(SAMPLE_MANIFEST).head(8)
    originals = [read_image(os.path.join(os.path.dirname(SAMPLE_MANIFEST), path)).pixels for path in manifest["image_path"]]
    priors = ellipse_geometry.from_endpoints(manifest[list(LANDMARK_COLUMNS)].to_numpy(dtype=float).reshape(-1, 4, 2))
    crops = np.stack([fp32.polar_codec.crop(pixels, prior) for pixels, prior in zip(originals, priors)])
    with torch.inference_mode():
        columns = {name: predictor.polar_codec.decode_columns(predictor.refinement(to_model_input(crops))[:, 0].numpy())[0]
                   for name, predictor in (("fp32", fp32), ("int8", int8))}
    difference = np.abs(columns["int8"] - columns["fp32"])
    assert np.median(difference) < 0.5 and np.percentile(difference, 95) < 3.0


def test_refinement_stage_measures_each_image_the_same_however_its_crops_are_batched(monkeypatch):
    """The actors pass `REFINEMENT_FORWARD_BATCH` crops a forward pass (a speed choice): an image's refined ellipse must
    not depend on that, nor on which other images share its pass (no state carried between crops)."""
    import fetalpipe.pipeline.infer as infer
    from fetalpipe.data.manifest import landmarks_original_px

    predictor = infer.LandmarkPredictor(DEFAULT_MODEL_PATH, threads=1, precision="int8")
    manifest = pd.read_csv(SAMPLE_MANIFEST)
    originals = [read_image(os.path.join(os.path.dirname(SAMPLE_MANIFEST), path)).pixels for path in manifest["image_path"]] * 2
    priors_original_px = np.concatenate([landmarks_original_px(manifest)] * 2)
    assert infer.REFINEMENT_FORWARD_BATCH < len(originals) < 2 * infer.REFINEMENT_FORWARD_BATCH  # two passes, the last one partial
    batched_px, batched_signals = predictor.refine(originals, priors_original_px)
    monkeypatch.setattr(infer, "REFINEMENT_FORWARD_BATCH", 1)
    one_by_one_px, one_by_one_signals = predictor.refine(originals, priors_original_px)
    assert np.max(np.abs(batched_px - one_by_one_px)) < 1e-3
    half = len(originals) // 2  # each image twice, in different passes and next to different images
    assert np.max(np.abs(batched_px[:half] - batched_px[half:])) < 1e-3
    assert np.allclose(batched_signals["outline_spread"], one_by_one_signals["outline_spread"], atol=1e-5)
