import pytest
import torch

from fetalpipe.model.networks import MODEL_CONFIGS, HeatmapUNet, ModelConfig


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_output_shape_and_range(name):
    config = MODEL_CONFIGS[name]
    model = HeatmapUNet(config).eval()
    with torch.no_grad():
        maps = model(torch.rand(2, 1, 64, 64))
    assert maps.shape == (2, config.out_maps, 64 // config.stem_stride, 64 // config.stem_stride)
    assert maps.min() >= 0 and maps.max() <= 1


def test_seed_matches_report_cost_scale():
    """Two encoder blocks, bottleneck, two decoder blocks: the report's ≈12.7 GFLOP per 256² image."""
    model = HeatmapUNet(MODEL_CONFIGS["seed"])
    flops = 0

    def count(module, inputs, output):
        nonlocal flops
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            spatial = output.shape[2] * output.shape[3] if isinstance(module, torch.nn.Conv2d) else inputs[0].shape[2] * inputs[0].shape[3]
            flops += 2 * spatial * module.in_channels * module.out_channels * module.kernel_size[0] * module.kernel_size[1]

    for module in model.modules():
        module.register_forward_hook(count)
    with torch.no_grad():
        model(torch.rand(1, 1, 256, 256))
    assert flops / 1e9 == pytest.approx(12.7, rel=0.05)
    assert len(model.encoders) == 2 and len(model.decoders) == 2


def test_coordinate_head_keeps_only_the_encoder():
    """The §d baseline: 8 numbers in [0, 1], and no decoder parameters left unused (DDP would refuse them)."""
    config = ModelConfig(base_width=8, depth=3, stem_stride=2, out_maps=8, head="coordinates")
    model = HeatmapUNet(config).eval()
    with torch.no_grad():
        coordinates = model(torch.rand(3, 1, 64, 64))
    assert coordinates.shape == (3, 8) and coordinates.min() >= 0 and coordinates.max() <= 1
    assert not hasattr(model, "decoders")
    model.train()
    model(torch.rand(2, 1, 64, 64)).sum().backward()
    assert all(parameter.grad is not None for parameter in model.parameters())
    with pytest.raises(ValueError, match="head"):
        HeatmapUNet(ModelConfig(head="boxes"))


def test_folding_batchnorm_keeps_outputs():
    import torch

    from fetalpipe.model.networks import MODEL_CONFIGS, HeatmapUNet, fold_batchnorm

    torch.manual_seed(0)
    model = HeatmapUNet(MODEL_CONFIGS["fast_deep"])
    model.train()
    with torch.no_grad():  # give the running statistics non-trivial values
        for _ in range(3):
            model(torch.rand(4, 1, 64, 64))
    model.eval()
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = model(images)
        folded = fold_batchnorm(model)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        assert torch.allclose(folded(images), expected, atol=1e-5)


def test_model_header_is_read_without_torch_and_matches_the_full_load(tiny_model_path, tmp_path):
    """`fetalpipe infer`'s driver checks the model file and reads its config without importing torch (it slowed ray.init)."""
    import subprocess
    import sys

    from fetalpipe.model.model_file import ModelFileError, load_model, read_model_header

    _, _, payload = load_model(tiny_model_path)
    assert read_model_header(tiny_model_path) == {key: value for key, value in payload.items() if key != "state_dict"}
    probe = ("import sys, fetalpipe.pipeline.infer, fetalpipe.pipeline.preprocess; from fetalpipe.model.model_file import read_model_header; "
             "print(read_model_header(sys.argv[1])['train_config']['input_size'], 'torch' in sys.modules)")
    printed = subprocess.run([sys.executable, "-c", probe, tiny_model_path], capture_output=True, text=True, check=True).stdout.split()
    assert printed == [str(payload["train_config"]["input_size"]), "False"]

    other = tmp_path / "other.pt"
    torch.save({"format": "something-else", "state_dict": {}}, other)
    with pytest.raises(ModelFileError, match="is not a fetalpipe model"):
        read_model_header(str(other))
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "fetalpipe-model-v1", "train_config": {}, "path": tmp_path}, foreign)  # an object no model file holds
    with pytest.raises(ModelFileError, match="cannot read model file"):
        read_model_header(str(foreign))
    with pytest.raises(ModelFileError, match="cannot read model file"):
        read_model_header(__file__)  # not a zip at all


def test_damaged_or_mismatched_weights_are_refused_with_the_reason(tiny_model_path, tmp_path, capsys, reliability_log):
    """torch.load accepts a flipped byte in the weights (it would measure wrongly): both readers check the zip's checksums.
    Weights from another architecture fail with a ModelFileError that names what is missing."""
    import shutil
    import struct
    import zipfile

    from conftest import model_missing_a_weight
    from fetalpipe.model.model_file import ModelFileError, load_model, read_model_header

    damaged = tmp_path / "damaged.pt"
    shutil.copy(tiny_model_path, damaged)
    with zipfile.ZipFile(damaged) as archive:
        largest = max(archive.infolist(), key=lambda entry: entry.file_size)
    with open(damaged, "r+b") as handle:
        handle.seek(largest.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        data_start = largest.header_offset + 30 + name_length + extra_length
        handle.seek(data_start + largest.file_size // 2)
        byte = handle.read(1)[0]
        handle.seek(data_start + largest.file_size // 2)
        handle.write(bytes([byte ^ 0xFF]))
    assert torch.load(damaged, weights_only=False)["format"] == "fetalpipe-model-v1"  # torch alone does not notice
    for reader in (read_model_header, load_model):
        with pytest.raises(ModelFileError, match=f"is damaged: {largest.filename} fails its checksum"):
            reader(str(damaged))
    from conftest import SAMPLE_MANIFEST
    from fetalpipe.cli import main

    assert main(["infer", "--manifest", SAMPLE_MANIFEST, "--output", str(tmp_path / "out"), "--model", str(damaged)]) == 2
    error = capsys.readouterr().err.strip()
    assert "fails its checksum" in error and not (tmp_path / "out" / "predictions.csv").exists()
    reliability_log(area="infer: model file", case="one flipped byte in the weights (torch.load alone accepts it)",
                    outcome="refused before Ray starts, exit 2, nothing written: "
                    + error.split(": error: ", 1)[1].replace(largest.filename, "zip entry " + largest.filename.replace("/", " / ")))

    mismatched = model_missing_a_weight(tiny_model_path, tmp_path / "mismatched.pt")
    assert read_model_header(mismatched)["format"] == "fetalpipe-model-v1"  # the header alone cannot tell
    with pytest.raises(ModelFileError, match="weights do not fit the architecture.*Missing key"):
        load_model(mismatched)


def test_every_committed_recipe_resolves_and_names_its_experiments_row():
    """docs/experiments.md gives each row's command with a file in configs/: each must still load, build on a named
    base, and say in its first comment which row it is."""
    import glob
    import os

    from fetalpipe.model.config import TrainConfig, resolve_config

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    paths = sorted(glob.glob(os.path.join(folder, "*.yaml")))
    assert len(paths) >= 20
    for path in paths:
        config = resolve_config(path)
        assert isinstance(config, TrainConfig)
        assert TrainConfig.from_dict(config.to_dict()) == config, path
        with open(path) as handle:
            first_line = handle.readline()
        assert first_line.startswith("# docs/experiments.md"), f"{path}: its first line should name its experiments row"
