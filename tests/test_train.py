"""Ray Train on the embedded sample: the split, checkpoints, losses, the refinement stage and its inference. Training
through the command (two workers, an unreadable image, outputs, resume) is in test_object_storage.py, on S3."""

import os

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import SAMPLE_MANIFEST
from fetalpipe.model.config import resolve_config
from fetalpipe.model.model_file import load_model
from fetalpipe.pipeline.infer import InferOptions, run_inference
from fetalpipe.pipeline.train import list_checkpoints, run_training, split_by_subject


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"base": "ellipse", "model": {"base_width": 4, "depth": 2}, "epochs": 1, "val_fraction": 0.07}))
    return resolve_config(str(path))


def test_split_is_by_subject_and_deterministic():
    table = pd.DataFrame({"image_path": [f"{i}.png" for i in range(200)], "subject_id": [str(i // 2) for i in range(200)]})
    train, val = split_by_subject(table, 0.15)
    assert set(train["subject_id"]).isdisjoint(val["subject_id"])
    assert 0.05 < len(val) / len(table) < 0.3
    again_train, _ = split_by_subject(table.sample(frac=1, random_state=1), 0.15)
    assert set(again_train["image_path"]) == set(train["image_path"])


def test_checkpoint_listing_reads_each_metrics_file_once_with_a_cache(tmp_path):
    """The epoch lines poll every 2 s; on object storage a reread of every checkpoint's metrics.json each time adds up."""
    root = tmp_path / "ray_train"

    def write_checkpoint(name: str, epoch: int) -> None:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "metrics.json").write_text(f'{{"epoch": {epoch}}}')

    write_checkpoint("checkpoint_a", 1)
    (root / "checkpoint_b").mkdir()  # being written: no metrics.json yet
    cache: dict[str, dict] = {}
    assert [epoch for epoch, _ in list_checkpoints(str(tmp_path), cache)] == [1]
    write_checkpoint("checkpoint_a", 99)  # not read again: the cached epoch stands
    write_checkpoint("checkpoint_b", 2)  # now complete: picked up
    assert [epoch for epoch, _ in list_checkpoints(str(tmp_path), cache)] == [1, 2]
    assert [epoch for epoch, _ in list_checkpoints(str(tmp_path))] == [2, 99]  # without a cache: read afresh


def test_changed_config_on_existing_run_dir_is_refused(ray_local, tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train_config.json").write_text('{"lr": 123}')
    with pytest.raises(ValueError, match="different configuration"):
        run_training(SAMPLE_MANIFEST, str(run_dir), tiny_config, workers=1)


def test_a_run_folder_from_before_a_config_field_existed_still_resumes(tmp_path):
    import json

    from fetalpipe.model.config import resolve_config
    from fetalpipe.pipeline.train import _write_or_check_config

    config = resolve_config("ellipse_refine")
    stored = config.to_dict()
    del stored["loss_weighting"]  # written by a version without the field: its default is what the run used
    (tmp_path / "train_config.json").write_text(json.dumps(stored))
    _write_or_check_config(str(tmp_path), config)
    assert json.loads((tmp_path / "train_config.json").read_text())["loss_weighting"] == "uniform"
    with pytest.raises(ValueError, match="different configuration"):
        _write_or_check_config(str(tmp_path), resolve_config("ellipse_refine", {"loss_weighting": "mm_per_map_pixel"}))
    stored["no_such_field"] = 1
    (tmp_path / "train_config.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="different configuration"):
        _write_or_check_config(str(tmp_path), config)


def test_losses_are_zero_for_a_perfect_map_and_grow_with_error():
    import torch

    from fetalpipe.pipeline.train import heatmap_loss

    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:12, 4:12] = 1.0
    for kind in ("mse", "weighted_mse", "bce", "bce_dice"):
        perfect = heatmap_loss(target.clone(), target, kind, 10.0).item()
        half = heatmap_loss(torch.full_like(target, 0.5), target, kind, 10.0).item()
        wrong = heatmap_loss(1 - target, target, kind, 10.0).item()
        assert perfect < 1e-3 < half < wrong, kind


def test_mm_per_map_pixel_weighting_weighs_each_image_by_the_mm_its_map_pixels_cover():
    import numpy as np
    import torch

    from fetalpipe.pipeline.train import heatmap_loss, image_loss_weights

    batch = {"pixel_spacing_mm": np.array([0.1, 0.3, np.nan]), "scan_region": np.array([[0, 0, 800, 540]] * 3)}
    assert image_loss_weights(batch, "uniform", 128) is None
    weights = image_loss_weights(batch, "mm_per_map_pixel", 128)
    assert weights.tolist() == pytest.approx([0.5, 1.5, 1.0])  # no spacing: the batch's mean; mean 1 over the batch
    target = torch.zeros(3, 1, 16, 16)
    target[:, :, 4:12, 4:12] = 1.0
    predicted = target.clone()
    predicted[1] = 0.5  # only the coarse-pixel image is wrong: the weighted loss counts it 1.5 times
    uniform = heatmap_loss(predicted, target, "bce", 10.0).item()
    assert heatmap_loss(predicted, target, "bce", 10.0, weights).item() == pytest.approx(1.5 * uniform, rel=1e-4)
    with pytest.raises(ValueError, match="loss weighting"):
        from fetalpipe.model.config import resolve_config

        resolve_config("ellipse_deep", {"loss_weighting": "by_size"})


def test_polar_loss_integral_terms_are_zero_on_target_and_count_a_whole_outline_shift_in_columns():
    import numpy as np
    import torch

    from fetalpipe.model.polar import PolarCodec
    from fetalpipe.pipeline.train import polar_loss

    codec = PolarCodec()
    prior = np.array([400.0, 270.0, 150.0, 110.0, 0.2])
    target = torch.from_numpy(codec.encode(prior, prior * [1, 1, 1.03, 1.03, 1]))[None]
    on_target = torch.log(target.clamp(min=1e-9))[:, None]  # logits whose softmax is the target
    shifted = torch.roll(on_target, 2, dims=-1)  # every row two columns further out
    assert polar_loss(on_target, target, "cross_entropy_integral").item() == pytest.approx(polar_loss(on_target, target).item(), abs=1e-3)
    extra = polar_loss(shifted, target, "cross_entropy_integral").item() - polar_loss(shifted, target).item()
    assert extra == pytest.approx(4.0, abs=0.05)  # 2 columns per row + 2 columns for the image's mean


@pytest.mark.parametrize("recipe", [{"augmentation": "archve"}, {"refinement": {"augmentation": "wide"}}, {"refinement": {"loss": "l2"}}])
def test_a_misspelt_preset_or_loss_fails_when_the_recipe_is_read(tmp_path, recipe):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"base": "ellipse_refine", **recipe}))
    with pytest.raises(ValueError, match="unknown (refinement )?(augmentation|loss)"):
        resolve_config(str(path))


def test_every_shipped_recipe_file_reads():
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    names = sorted(name for name in os.listdir(folder) if name.endswith(".yaml"))
    assert len(names) >= 10
    for name in names:
        config = resolve_config(os.path.join(folder, name))
        assert config.epochs > 0, name


def test_named_coordinate_config_builds_a_regression_model():
    config = resolve_config("coordinates")
    assert config.model.head == "coordinates" and config.model.out_maps == 8 and config.codec().target_shape == (8,)
    assert resolve_config("ellipse_deep").model.head == "heatmap"


def test_training_jobs_silence_ray_trains_repeated_state_api_warning():
    """Without the dashboard, Ray Train's placement-group cleaner logs a warning about once a second."""
    import logging

    from fetalpipe.runtime.cluster import NOISY_RAY_LOGGERS, quiet_noisy_ray_loggers

    logger = logging.getLogger(NOISY_RAY_LOGGERS[0])
    logger.setLevel(logging.NOTSET)
    quiet_noisy_ray_loggers()
    assert not logger.isEnabledFor(logging.WARNING) and logger.isEnabledFor(logging.ERROR)
    from ray.train.v2._internal.execution.controller import placement_group_cleaner  # the logger's module still exists

    assert placement_group_cleaner.logger.name == NOISY_RAY_LOGGERS[0]


def test_training_stops_without_waiting_out_the_placement_group_cleaners_10_s_poll():
    """Without a dashboard each of the cleaner's State API polls waits out its timeout, and each training stage waits
    for the poll in flight (`cluster.PLACEMENT_GROUP_CLEANER_POLL_TIMEOUT_S`). This fails if Ray Train stops building
    its default callbacks where `cluster.torch_trainer` replaces the cleaner's."""
    import ray.train
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from fetalpipe.runtime.cluster import PLACEMENT_GROUP_CLEANER_POLL_TIMEOUT_S, torch_trainer

    trainer = torch_trainer(train_loop_per_worker=lambda config: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
    callbacks = trainer._create_default_callbacks()
    cleaners = [callback for callback in callbacks if isinstance(callback, PlacementGroupCleanerCallback)]
    assert len(cleaners) == 1 and len(callbacks) > 1
    assert cleaners[0]._get_actor_timeout_s == PLACEMENT_GROUP_CLEANER_POLL_TIMEOUT_S <= 1
    assert cleaners[0]._stop_timeout <= 3  # Ray's default: 12 s


def test_ray_trains_controller_polls_its_workers_every_half_second_unless_the_user_chose(monkeypatch):
    """Only a poll sees that training ended (Ray Train's default: every 2 s); the interval reaches the controller and
    the workers through the environment variables Ray Train passes on, and a value the user set stays."""
    import ray.train
    from ray.train.v2._internal.constants import HEALTH_CHECK_INTERVAL_S_ENV_VAR, get_env_vars_to_propagate

    from fetalpipe.runtime.cluster import TRAIN_HEALTH_CHECK_INTERVAL_S, torch_trainer

    monkeypatch.delenv(HEALTH_CHECK_INTERVAL_S_ENV_VAR, raising=False)
    torch_trainer(train_loop_per_worker=lambda config: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
    assert float(get_env_vars_to_propagate()[HEALTH_CHECK_INTERVAL_S_ENV_VAR]) == TRAIN_HEALTH_CHECK_INTERVAL_S < 2
    monkeypatch.setenv(HEALTH_CHECK_INTERVAL_S_ENV_VAR, "3")
    torch_trainer(train_loop_per_worker=lambda config: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
    assert get_env_vars_to_propagate()[HEALTH_CHECK_INTERVAL_S_ENV_VAR] == "3"


def test_refinement_stage_trains_after_a_given_stage1_and_both_run_in_inference(ray_local, sample_manifest_copy, tmp_path):
    """`--config ellipse_refine --stage1-model FILE`: stage 1 is taken from the file, the refinement stage trains through
    Ray Data + Ray Train into RUN_DIR/refinement/, model.pt holds both, and `infer` runs both in the same actors."""
    from fetalpipe.model.model_file import DEFAULT_MODEL_PATH, load_refinement_model, read_model_header

    path = tmp_path / "tiny_refine.yaml"
    path.write_text(yaml.safe_dump({"base": "ellipse_refine", "refinement": {"epochs": 1, "batch_size": 4, "model": {"base_width": 4, "depth": 3}}}))
    config = resolve_config(str(path))
    # The split is stage 1's (its file's val_fraction); the sample's own subjects are all on the validation side of it.
    manifest = pd.read_csv(sample_manifest_copy)
    manifest["subject_id"] = [f"subject-{index}" for index in range(len(manifest))]
    manifest_path = str(tmp_path / "manifest.csv")
    manifest.to_csv(manifest_path, index=False)
    run_dir = tmp_path / "run"
    result = run_training(manifest_path, str(run_dir), config, workers=2, threads_per_worker=1, stage1_model=DEFAULT_MODEL_PATH)
    metrics = pd.read_csv(run_dir / "refinement" / "metrics.csv")
    assert list(metrics["epoch"]) == [1] and result["refinement"]["best_epoch"] == 1
    assert {"val_hc_mae_mm", "val_prior_hc_mae_mm", "val_bpd_mae_mm", "val_ofd_mae_mm"} <= set(metrics.columns)
    assert 19 <= metrics["train_images"][0] + metrics["val_images"][0] <= 20  # an equal 2-way split may drop one
    model, loaded_config, payload = load_model(str(run_dir / "model.pt"))
    assert loaded_config.refinement.model.base_width == 4 and loaded_config.model == load_model(DEFAULT_MODEL_PATH)[1].model
    assert load_refinement_model(loaded_config, payload) is not None
    assert "refinement_state_dict" not in read_model_header(str(run_dir / "model.pt"))  # the header stays weight-free

    summary = run_inference(InferOptions(output_dir=str(tmp_path / "out"), manifest=SAMPLE_MANIFEST, model_path=str(run_dir / "model.pt"), actors=1))
    assert summary["ok"] == 20
    predictions = pd.read_csv(tmp_path / "out" / "predictions.csv")
    for column in ("stage_disagreement_mm", "outline_fit_residual_mm", "outline_spread_mm"):  # stage 2 ran on every image
        assert predictions[column].notna().all()
    assert (predictions["needs_review"] == False).all() and predictions["review_reason"].isna().all()  # no rule before calibrate  # noqa: E712


def _polar_batch(stored_prior_px: np.ndarray) -> dict:
    """One 120 x 160 image whose reference head is centred at (80, 60), with a stored stage-1 prior's endpoints."""
    from fetalpipe import LANDMARK_COLUMNS
    from fetalpipe.data.manifest import STAGE1_PRIOR_COLUMNS
    from fetalpipe.measure import ellipse as ellipse_geometry

    reference_px = ellipse_geometry.to_endpoints(np.array([80.0, 60.0, 40.0, 30.0, 0.3]))
    batch = {"image_path": np.array(["a.png"], dtype=object), "original_height": np.array([120]), "original_width": np.array([160]),
             "original_pixels": np.array([np.full((120, 160), 90, np.uint8).tobytes()], dtype=object)}
    batch.update({column: np.array([value]) for column, value in zip(LANDMARK_COLUMNS, reference_px.ravel())})
    batch.update({column: np.array([value]) for column, value in zip(STAGE1_PRIOR_COLUMNS, np.asarray(stored_prior_px, float).ravel())})
    return batch


def test_stored_stage1_priors_replace_the_jittered_reference_in_their_share_of_refinement_crops():
    """With `stage1_prior_share` 1 the crop follows the stored stage-1 prior (moved a little), mirrored with the image;
    a row without one, or a share of 0, jitters the reference as before."""
    from fetalpipe.data.augment import AcquisitionAugmentConfig
    from fetalpipe.measure import ellipse as ellipse_geometry
    from fetalpipe.model.config import RefinementConfig
    from fetalpipe.pipeline.preprocess import encode_polar_batch

    codec = RefinementConfig().codec()
    stored = ellipse_geometry.to_endpoints(np.array([95.0, 50.0, 44.0, 27.0, 0.5]))  # 18 px off the reference's centre
    for seed in range(5):
        prior = encode_polar_batch(_polar_batch(stored), codec, None, jitter_scale=1.0, seed=seed, stage1_prior_share=1.0)["prior"][0]
        assert np.hypot(prior[0] - 95, prior[1] - 50) < 3 and abs(prior[2] / 44 - 1) < 0.1
        jittered = encode_polar_batch(_polar_batch(stored), codec, None, jitter_scale=1.0, seed=seed)["prior"][0]
        assert np.hypot(jittered[0] - 80, jittered[1] - 60) < 10
        without = encode_polar_batch(_polar_batch(np.full((4, 2), np.nan)), codec, None, jitter_scale=1.0, seed=seed, stage1_prior_share=1.0)["prior"][0]
        assert np.hypot(without[0] - 80, without[1] - 60) < 10
    mirrored = AcquisitionAugmentConfig(flip_probability=1.0, resample_probability=0, jpeg_probability=0, speckle_probability=0, noise_probability=0)
    output = encode_polar_batch(_polar_batch(stored), codec, mirrored, jitter_scale=1.0, seed=0, stage1_prior_share=1.0)
    assert np.hypot(output["prior"][0, 0] - (159 - 95), output["prior"][0, 1] - 50) < 3
    assert abs(output["reference"][0, 0] - (159 - 80)) < 1e-6


def test_a_stage1_prior_share_without_stored_priors_is_refused_before_training(sample_manifest_copy, tmp_path):
    """Refused when the run starts (no Ray, no stage-1 epochs first)."""
    import dataclasses

    from fetalpipe.model.config import RefinementConfig

    config = dataclasses.replace(resolve_config("ellipse_refine"), refinement=RefinementConfig(stage1_prior_share=0.5))
    with pytest.raises(ValueError, match="stage1_prior_share = 0.5 needs stored stage-1 priors.*stage1_prior_ofd1_x"):
        run_training(str(sample_manifest_copy), str(tmp_path / "run"), config)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="must lie in"):
        RefinementConfig(stage1_prior_share=1.5)


AMX_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n"
AVX512_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512vl avx512dq avx512_vnni\n"
GRAVITON3_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_native_bf16_is_read_from_the_cpus_flags_not_from_avx512_alone():
    from fetalpipe.pipeline.train import native_bf16

    assert native_bf16(AMX_CPUINFO) and native_bf16(GRAVITON3_CPUINFO)
    assert not native_bf16(AVX512_CPUINFO)  # torch's own check says yes here, and bf16 is emulated
    assert not native_bf16("processor\t: 0\nflags\t\t: fpu sse avx2\n") and not native_bf16("")


def test_bf16_from_the_command_line_reaches_the_recipe_and_a_cpu_without_it_is_refused_before_training(monkeypatch, tmp_path, capsys):
    """`--bf16` sets the recipe's bf16 (recorded in RUN_DIR/train_config.json like every field); on a local run whose CPU
    would emulate bf16, the command stops before Ray starts and says why."""
    import fetalpipe.pipeline.train as train
    from fetalpipe.cli import main

    assert resolve_config("ellipse_deep", {"bf16": True}).bf16 and not resolve_config("ellipse_deep", {"bf16": None}).bf16
    assert resolve_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "stage1_bf16.yaml")).bf16
    monkeypatch.setattr(train, "native_bf16", lambda cpuinfo_text=None: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["train", "--manifest", SAMPLE_MANIFEST, "--output", str(tmp_path / "run"), "--config", "ellipse_deep", "--bf16"])
    assert code != 0
    assert "bf16 needs a CPU with native bf16" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
