"""Data-parallel training on CPUs: Ray Data preprocessing feeding a Ray Train TorchTrainer (gloo).

`train_loop_per_worker` is the single-process loop with three Ray touches: it reads its data shard
with `ray.train.get_dataset_shard`, wraps the model with `prepare_model` (DDP over gloo), and
reports metrics plus a checkpoint every epoch. Rerunning on the same RUN_DIR resumes."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
import time

import numpy as np
import pandas as pd

from fetalpipe.data.augment import AUGMENT_PRESETS, REFINEMENT_AUGMENT_PRESETS, AcquisitionAugmentConfig, AugmentConfig
from fetalpipe.data.manifest import STAGE1_PRIOR_COLUMNS
from fetalpipe.model.config import RefinementConfig, TrainConfig
from fetalpipe.runtime import storage


def is_validation_subject(subject_id: str, val_fraction: float) -> bool:
    """Deterministic split by subject: a stable hash, so adding subjects never moves old ones."""
    digest = int(hashlib.sha256(str(subject_id).encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < val_fraction


def split_by_subject(table: pd.DataFrame, val_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    subjects = table["subject_id"] if "subject_id" in table.columns else table["image_path"]
    is_val = np.array([is_validation_subject(subject, val_fraction) for subject in subjects])
    return table[~is_val].reset_index(drop=True), table[is_val].reset_index(drop=True)


def heatmap_loss(predicted, target, kind: str, foreground_weight: float, image_weights=None):
    """The batch's loss: each image's mean over its map, averaged over the images with `image_weights` ([B], mean 1;
    None: all equal, `image_loss_weights`)."""
    import torch

    squared = (predicted.float() - target) ** 2
    if kind == "mse":
        per_image = squared.flatten(1).mean(1)
    elif kind == "weighted_mse":
        per_image = (squared * (1.0 + foreground_weight * target)).flatten(1).mean(1)
    elif kind in ("bce", "bce_dice"):  # for the filled-ellipse map, a segmentation target
        bce = torch.nn.functional.binary_cross_entropy(predicted.float().clamp(1e-6, 1 - 1e-6), target, reduction="none")
        per_image = bce.flatten(1).mean(1)
        if kind == "bce_dice":
            # Soft Dice per image: weighs a whole head equally whatever its size (late-pregnancy heads fill the frame).
            overlap = (predicted.float() * target).flatten(1).sum(1)
            dice = (2 * overlap + 1) / (predicted.float().flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
            per_image = per_image + (1 - dice)
    else:
        raise ValueError(f"unknown loss {kind!r}")
    return per_image.mean() if image_weights is None else (per_image * image_weights).mean()


def image_loss_weights(batch, weighting: str, heatmap_size: int):
    """Per-image loss weights ([B] float32 tensor, mean 1 in the batch) for `TrainConfig.loss_weighting`; None for
    "uniform". "mm_per_map_pixel": an outline one map pixel off costs HC in proportion to the mm that pixel covers
    (0.3–2.5 mm on the training split, most in late pregnancy), so each image weighs what its errors cost in mm. The
    training loss only: the validation loss stays unweighted, comparable between recipes."""
    import torch

    if weighting == "uniform":
        return None
    mm_per_map_pixel = torch.as_tensor(batch["pixel_spacing_mm"], dtype=torch.float32) * torch.as_tensor(batch["scan_region"], dtype=torch.float32)[:, 2] / heatmap_size
    known = torch.isfinite(mm_per_map_pixel)
    if not known.any():
        return None
    mm_per_map_pixel = torch.where(known, mm_per_map_pixel, mm_per_map_pixel[known].mean())  # no spacing: the batch's mean
    return mm_per_map_pixel / mm_per_map_pixel.mean()


def _lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    if schedule == "cosine":
        return 0.5 * (1 + np.cos(np.pi * epoch / max(epochs, 1)))
    return 1.0


# CPU flags (Linux /proc/cpuinfo) of instructions that compute in bf16 natively: x86's AVX512_BF16 and AMX, ARM's BF16.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_flags(cpuinfo_text: str | None = None) -> frozenset[str]:
    """The CPU's feature flags (x86's `flags`, ARM's `Features`), from /proc/cpuinfo; none where there is no such file."""
    if cpuinfo_text is None:
        try:
            with open("/proc/cpuinfo") as handle:
                cpuinfo_text = handle.read()
        except OSError:
            return frozenset()
    for line in cpuinfo_text.splitlines():
        name, _, values = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(values.split())
    return frozenset()


def native_bf16(cpuinfo_text: str | None = None) -> bool:
    """Whether this CPU computes in bf16 natively. bf16 autocast (`TrainConfig.bf16`) trained stage 1 1.6-1.7x faster than
    fp32 on a CPU with AMX, and is about 25x slower on AVX2-only CPUs, which emulate it (docs/performance.md). torch's own check
    (`torch.ops.mkldnn._is_mkldnn_bf16_supported`) says yes to any AVX-512 CPU, so the flags are read instead."""
    return not cpu_flags(cpuinfo_text).isdisjoint(NATIVE_BF16_FLAGS)


def train_loop_per_worker(loop_config: dict) -> None:
    """One training worker. Reads like a plain PyTorch loop; Ray provides data, DDP and checkpoints."""
    import ray.train
    import ray.train.torch
    import torch

    from fetalpipe.model.networks import HeatmapUNet
    from fetalpipe.pipeline.evaluate import per_image_errors
    from fetalpipe.pipeline.preprocess import transforms_of

    torch.set_num_threads(loop_config["threads_per_worker"])
    config = TrainConfig.from_dict(loop_config["train_config"])
    if config.bf16 and not native_bf16():  # a cluster node unlike the driver's (a local run is refused in `run_training`)
        print(f"fetalpipe train: bf16 on a node whose CPU has no native bf16 ({os.uname().nodename}): expect it far slower than fp32", flush=True)
    codec = config.codec()
    context = ray.train.get_context()
    world_size, rank = context.get_world_size(), context.get_world_rank()

    model = HeatmapUNet(config.model)
    if config.init_from:  # fine-tuning; a checkpoint, when there is one, replaces these weights below
        from fetalpipe.model.model_file import load_model

        model.load_state_dict(load_model(config.init_from)[2]["state_dict"])
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    start_epoch, history = _restore_checkpoint(model, optimizer, loop_config)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    bare_model = model
    model = ray.train.torch.prepare_model(model) if world_size > 1 else model
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    for epoch in range(start_epoch, config.epochs):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(config.lr_schedule, epoch, config.epochs)
        started = time.perf_counter()

        def batch_loss(batch):
            images = batch["image"].float().contiguous(memory_format=memory_format)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                predicted = model(images)
            weights = image_loss_weights(batch, config.loss_weighting, codec.heatmap_size)
            return heatmap_loss(predicted, batch["heatmaps"].float(), config.loss, config.foreground_weight, weights), len(images)

        loss_sum, seen = _train_one_epoch(model, optimizer, train_shard, config.batch_size, batch_loss)
        train_seconds = time.perf_counter() - started
        _score_with_rank0_batchnorm(bare_model, world_size)
        val_loss_sum, val_seen, error_tables = 0.0, 0, []
        # Every rank sees all of validation (an equal split would drop images) and scores every world_size-th batch.
        with torch.no_grad():
            val_batches = val_shard.iter_batches(batch_size=16, batch_format="numpy")
            for batch in (batch for index, batch in enumerate(val_batches) if index % world_size == rank):
                images = torch.from_numpy(np.ascontiguousarray(batch["image"], dtype=np.float32)).contiguous(memory_format=memory_format)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                    predicted = bare_model(images).float()  # not the DDP wrapper: ranks may score different batch counts
                targets = torch.from_numpy(batch["heatmaps"].astype(np.float32))
                val_loss_sum += float(heatmap_loss(predicted, targets, config.loss, config.foreground_weight)) * len(images)
                val_seen += len(images)
                transforms = transforms_of(batch, config.input_size)
                points_model, _ = codec.decode(predicted.numpy(), np.array([t.frame_size for t in transforms]).reshape(-1, 2))
                points_original = np.stack([t.to_original(p) for t, p in zip(transforms, points_model)])
                error_tables.append(per_image_errors(points_original, batch["points_original"], batch["pixel_spacing_mm"], batch.get("hc_mm")))
        epoch_seconds = time.perf_counter() - started  # train + validation, what a user waits for
        errors = pd.concat(error_tables) if error_tables else pd.DataFrame()
        sums = np.array([
            loss_sum, seen, val_loss_sum, val_seen,
            errors["mean_radial_error_px"].sum() if len(errors) else 0.0,
            errors["mean_radial_error_mm"].sum(skipna=True) if len(errors) else 0.0,
            errors["hc_ellipse_diff_mm"].abs().sum(skipna=True) if len(errors) else 0.0,
            errors["hc_diff_mm"].abs().sum(skipna=True) if len(errors) else 0.0,
            errors["mean_radial_error_mm"].notna().sum() if len(errors) else 0.0,
            train_seconds,
            epoch_seconds,
        ], dtype=np.float64)
        sums = _sum_over_ranks(sums, world_size)
        with_mm = max(sums[8], 1)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": sums[0] / max(sums[1], 1),
            "val_loss": sums[2] / max(sums[3], 1),
            "val_mre_px": sums[4] / max(sums[3], 1),
            "val_mre_mm": sums[5] / with_mm if sums[8] else float("nan"),
            "val_hc_mae_mm": sums[6] / with_mm if sums[8] else float("nan"),
            "val_hc_seed_formula_mae_mm": sums[7] / with_mm if sums[8] else float("nan"),
            "train_images": int(sums[1]),
            "val_images": int(sums[3]),
            "train_seconds": sums[9] / world_size,
            "epoch_seconds": sums[10] / world_size,
            "train_img_per_s": sums[1] / max(sums[9] / world_size, 1e-9),
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(metrics)
        _checkpoint_and_report(rank, epoch, history, bare_model, optimizer, config.to_dict(), metrics)


def _train_one_epoch(model, optimizer, shard, batch_size: int, batch_loss) -> tuple[float, int]:
    """One pass over this worker's shard; `batch_loss(batch)` -> (loss tensor, images). Returns (loss sum, images)."""
    model.train()
    loss_sum, seen = 0.0, 0
    for batch in shard.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=4 * batch_size, drop_last=False):
        loss, images = batch_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * images
        seen += images
    return loss_sum, seen


def _sum_over_ranks(sums: np.ndarray, world_size: int) -> np.ndarray:
    if world_size == 1:
        return sums
    import torch
    import torch.distributed as dist

    tensor = torch.from_numpy(sums)
    dist.all_reduce(tensor)
    return tensor.numpy()


def _score_with_rank0_batchnorm(bare_model, world_size: int) -> None:
    """Eval mode, and every rank scores with rank 0's BatchNorm statistics, the ones the checkpoint keeps."""
    bare_model.eval()
    if world_size > 1:
        import torch.distributed as dist

        for buffer in bare_model.buffers():
            dist.broadcast(buffer, src=0)


def _restore_checkpoint(model, optimizer, loop_config: dict) -> tuple[int, list]:
    """(first epoch to run, history so far). A worker restarted after a failure gets Ray's latest checkpoint; a rerun
    of the command gets RUN_DIR's."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint() or (ray.train.Checkpoint(loop_config["resume_from"]) if loop_config.get("resume_from") else None)
    if not checkpoint:
        return 0, []
    with checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, "state.pt"), weights_only=False)
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    return state["epoch"] + 1, state["history"]


def _checkpoint_and_report(rank: int, epoch: int, history: list, model, optimizer, config_dict: dict, metrics: dict) -> None:
    """Rank 0 writes the epoch's checkpoint (weights, optimizer, history); every rank reports the metrics."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as directory:
        saved = None
        if rank == 0:
            torch.save(
                {"epoch": epoch, "history": history, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "train_config": config_dict},
                os.path.join(directory, "state.pt"),
            )
            with open(os.path.join(directory, "metrics.json"), "w") as handle:
                json.dump(metrics, handle)
            saved = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=saved)


def polar_loss(logits, target, kind: str = "cross_entropy"):
    """Cross-entropy of each row's softmax over radii against its target Gaussian; rows without a target are skipped.
    "cross_entropy_integral" adds, in columns, the L1 distance between each row's softmax mean and its target's, and
    between their means over the image's rows: the outline's radius is what HC is measured from, and a shift of every
    row by one column costs the cross-entropy little when the softmax is wide."""
    import torch

    log_probability = torch.log_softmax(logits[:, 0].float(), dim=-1)
    valid = (target.sum(dim=-1) > 0).float()
    cross_entropy = -(target * log_probability).sum(dim=-1)
    valid_rows = valid.sum().clamp(min=1.0)
    loss = (cross_entropy * valid).sum() / valid_rows
    if kind == "cross_entropy":
        return loss
    grid = torch.arange(target.shape[-1], dtype=torch.float32)
    predicted_column = (log_probability.exp() * grid).sum(dim=-1)
    target_column = (target * grid).sum(dim=-1)
    column_error = (predicted_column - target_column) * valid
    shift_per_image = (column_error.sum(dim=-1) / valid.sum(dim=-1).clamp(min=1.0)).abs()
    return loss + column_error.abs().sum() / valid_rows + shift_per_image.mean()


def refinement_errors(ellipses: np.ndarray, references: np.ndarray, pixel_spacing_mm: np.ndarray, reference_hc_mm: np.ndarray) -> pd.DataFrame:
    """Per image: HC, BPD and OFD differences in mm of [N, 5] ellipses (original pixels) against the references."""
    from fetalpipe.measure import ellipse as ellipse_geometry

    spacing = np.asarray(pixel_spacing_mm, dtype=np.float64)
    reference_hc = np.where(np.isfinite(reference_hc_mm), reference_hc_mm, ellipse_geometry.perimeter(references) * spacing)
    return pd.DataFrame({
        "hc_diff_mm": ellipse_geometry.perimeter(ellipses) * spacing - reference_hc,
        "bpd_diff_mm": 2 * (ellipses[:, 3] - references[:, 3]) * spacing,
        "ofd_diff_mm": 2 * (ellipses[:, 2] - references[:, 2]) * spacing,
    })


def refinement_loop_per_worker(loop_config: dict) -> None:
    """One training worker of stage 2: the same plain loop, on polar crops around jittered reference ellipses.
    Validation scores the refined ellipse (and, for comparison, the jittered prior it started from) in mm."""
    import ray.train
    import ray.train.torch
    import torch

    from fetalpipe.model.networks import HeatmapUNet

    torch.set_num_threads(loop_config["threads_per_worker"])
    config = RefinementConfig.from_dict(loop_config["refinement_config"])
    codec = config.codec()
    context = ray.train.get_context()
    world_size, rank = context.get_world_size(), context.get_world_rank()
    model = HeatmapUNet(config.model).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    start_epoch, history = _restore_checkpoint(model, optimizer, loop_config)
    bare_model = model
    model = ray.train.torch.prepare_model(model) if world_size > 1 else model
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")

    for epoch in range(start_epoch, config.epochs):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor("cosine", epoch, config.epochs)
        started = time.perf_counter()

        def batch_loss(batch):
            images = batch["image"].float().contiguous(memory_format=torch.channels_last)
            return polar_loss(model(images), batch["target"].float(), config.loss), len(images)

        loss_sum, seen = _train_one_epoch(model, optimizer, train_shard, config.batch_size, batch_loss)
        train_seconds = time.perf_counter() - started
        _score_with_rank0_batchnorm(bare_model, world_size)
        val_loss_sum, error_tables = 0.0, []
        with torch.no_grad():
            val_batches = val_shard.iter_batches(batch_size=32, batch_format="numpy")
            for batch in (batch for index, batch in enumerate(val_batches) if index % world_size == rank):
                images = torch.from_numpy(np.ascontiguousarray(batch["image"], dtype=np.float32)).contiguous(memory_format=torch.channels_last)
                logits = bare_model(images)
                val_loss_sum += float(polar_loss(logits, torch.from_numpy(batch["target"]), config.loss)) * len(images)
                refined, _ = codec.decode(logits[:, 0].numpy(), batch["prior"])
                hc_mm = batch.get("hc_mm", np.full(len(images), np.nan))
                errors = refinement_errors(refined, batch["reference"], batch["pixel_spacing_mm"], hc_mm)
                errors["prior_hc_diff_mm"] = refinement_errors(batch["prior"], batch["reference"], batch["pixel_spacing_mm"], hc_mm)["hc_diff_mm"]
                error_tables.append(errors)
        errors = pd.concat(error_tables) if error_tables else pd.DataFrame(columns=["hc_diff_mm", "bpd_diff_mm", "ofd_diff_mm", "prior_hc_diff_mm"])
        sums = np.array([loss_sum, seen, val_loss_sum, len(errors), *(errors[c].abs().sum() for c in ("hc_diff_mm", "bpd_diff_mm", "ofd_diff_mm", "prior_hc_diff_mm")),
                         train_seconds, time.perf_counter() - started], dtype=np.float64)
        sums = _sum_over_ranks(sums, world_size)
        val_images = max(sums[3], 1)
        metrics = {
            "epoch": epoch + 1, "train_loss": sums[0] / max(sums[1], 1), "val_loss": sums[2] / val_images,
            "val_hc_mae_mm": sums[4] / val_images, "val_bpd_mae_mm": sums[5] / val_images, "val_ofd_mae_mm": sums[6] / val_images,
            "val_prior_hc_mae_mm": sums[7] / val_images, "train_images": int(sums[1]), "val_images": int(sums[3]),
            "train_seconds": sums[8] / world_size, "epoch_seconds": sums[9] / world_size, "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(metrics)
        _checkpoint_and_report(rank, epoch, history, bare_model, optimizer, dataclasses.asdict(config), metrics)


def build_datasets(train_table: pd.DataFrame, val_table: pd.DataFrame, config: TrainConfig, blocks: int = 8):
    """Ray Data: decode/resize/scale once (materialised; float32 at 256² is ~0.26 MB an image), then
    per epoch a lazy augment + heatmap-encode stage that re-runs on every pass."""
    import functools

    import ray.data

    from fetalpipe.pipeline.preprocess import decode_batch, encode_batch, rows_with_status, scale_landmarks_batch

    codec = config.codec()
    columns = [c for c in train_table.columns if c in {"image_path", "subject_id", "pixel_spacing_mm", "hc_mm"} or c.endswith(("_x", "_y"))]

    def prepared(part: pd.DataFrame, augment: AugmentConfig | None):
        if "pixel_spacing_mm" not in part.columns:
            part = part.assign(pixel_spacing_mm=np.nan)
        if "hc_mm" not in part.columns:
            part = part.assign(hc_mm=np.nan)
        part = part[columns + [c for c in ("pixel_spacing_mm", "hc_mm") if c not in columns]]
        rows_per_block = int(np.ceil(len(part) / blocks))
        dataset = ray.data.from_pandas([part.iloc[start:start + rows_per_block] for start in range(0, len(part), rows_per_block)])
        decoded = dataset.map_batches(functools.partial(decode_batch, input_size=config.input_size), batch_format="numpy", batch_size=16).materialize()
        # Policy: an image that cannot be decoded is skipped, never fatal, and never silent (skipped_images.csv).
        failed = decoded.select_columns(["image_path", "status", "error"]).map_batches(rows_with_status, fn_kwargs={"ok": False}, batch_format="numpy")
        skipped.append(failed.select_columns(["image_path", "error"]).to_pandas())
        dataset = decoded.map_batches(rows_with_status, fn_kwargs={"ok": True}, batch_format="numpy")
        dataset = dataset.map_batches(functools.partial(scale_landmarks_batch, input_size=config.input_size), batch_format="numpy", batch_size=64)
        dataset = dataset.materialize()
        encoded = dataset.map_batches(
            functools.partial(encode_batch, codec=codec, augment=augment),
            batch_format="numpy", batch_size=config.batch_size,
            # Training workers hold the CPUs; this light step runs beside them (0 CPU, at most 2 tasks).
            num_cpus=0, compute=ray.data.TaskPoolStrategy(size=2),
        )
        # Without augmentation the targets never change: encode them once, not on every epoch and rank.
        return encoded if augment is not None else encoded.materialize()

    skipped: list[pd.DataFrame] = []
    train_ds = prepared(train_table, AUGMENT_PRESETS[config.augmentation] if config.augment else None)
    val_ds = prepared(val_table, None)
    skipped_table = pd.concat(skipped, ignore_index=True)
    return train_ds, val_ds, len(train_table) - len(skipped[0]), len(val_table) - len(skipped[1]), skipped_table


def build_refinement_datasets(train_table: pd.DataFrame, val_table: pd.DataFrame, refinement: RefinementConfig, blocks: int = 8):
    """Ray Data for stage 2: each image decoded once at its original size (kept as uint8, materialised), then per epoch
    a lazy step that jitters the prior, augments and crops. Validation's priors are fixed (seeded per image).
    Returns (train, validation, skipped rows)."""
    import functools

    import ray.data

    from fetalpipe import LANDMARK_COLUMNS
    from fetalpipe.pipeline.preprocess import decode_original_batch, encode_polar_batch, rows_with_status

    codec = refinement.codec()
    skipped = []

    def prepared(part: pd.DataFrame, augment: AcquisitionAugmentConfig | None, seed: int | None, stage1_prior_share: float = 0.0):
        part = part.assign(**{c: part[c] if c in part.columns else np.nan for c in ("pixel_spacing_mm", "hc_mm")})
        part = part[["image_path", *LANDMARK_COLUMNS, "pixel_spacing_mm", "hc_mm", *(STAGE1_PRIOR_COLUMNS if stage1_prior_share > 0 else ())]]
        rows_per_block = int(np.ceil(len(part) / blocks))
        dataset = ray.data.from_pandas([part.iloc[start:start + rows_per_block] for start in range(0, len(part), rows_per_block)])
        decoded = dataset.map_batches(decode_original_batch, batch_format="numpy", batch_size=16).materialize()
        failed = decoded.select_columns(["image_path", "status", "error"]).map_batches(rows_with_status, fn_kwargs={"ok": False}, batch_format="numpy")
        skipped.append(failed.select_columns(["image_path", "error"]).to_pandas())
        decoded = decoded.map_batches(rows_with_status, fn_kwargs={"ok": True}, batch_format="numpy").materialize()
        return decoded.map_batches(
            functools.partial(encode_polar_batch, codec=codec, augment=augment, jitter_scale=refinement.jitter_scale, seed=seed,
                              axis_jitter_scale=refinement.axis_jitter_scale, stage1_prior_share=stage1_prior_share),
            batch_format="numpy", batch_size=refinement.batch_size, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=2),
        )

    augment = REFINEMENT_AUGMENT_PRESETS[refinement.augmentation] if refinement.augment else None
    train_ds = prepared(train_table, augment, None, refinement.stage1_prior_share)
    val_ds = prepared(val_table, None, seed=0).materialize()  # the same priors every epoch
    return train_ds, val_ds, pd.concat(skipped, ignore_index=True)


def run_training(
    manifest_path: str,
    run_dir: str,
    config: TrainConfig,
    workers: int = 2,
    threads_per_worker: int = 1,
    max_failures: int = 2,
    ray_address: str | None = None,
    stage1_model: str | None = None,
    verbose: bool = False,
) -> dict:
    """Train (or resume) into RUN_DIR; write metrics.csv, loss_curves.png and the best model.pt. With a refinement stage,
    stage 2 trains after stage 1 (in RUN_DIR/refinement/) and model.pt holds both. `stage1_model`: take stage 1 from
    that model file instead of training it (stage 2 never sees stage 1's output in training, so any stage 1 fits)."""
    from fetalpipe.data.manifest import load_manifest
    from fetalpipe.runtime import console
    from fetalpipe.runtime.cluster import connect, ray_address_or_local

    started = time.perf_counter()
    if config.bf16 and not native_bf16() and ray_address_or_local(ray_address) == "local":
        raise ValueError("bf16 needs a CPU with native bf16 (AVX512_BF16 or AMX on x86, BF16 on ARM); this one would emulate it, "
                         "about 25x slower than fp32: train without --bf16")
    table = load_manifest(manifest_path, require_landmarks=True)
    check_stored_priors(table, config.refinement)  # before stage 1's training, not after it
    run_dir = storage.absolute(run_dir)  # a path every node can reach, or an object-store URI (Ray Train's storage_path)
    storage.makedirs(run_dir)
    if stage1_model:
        if config.refinement is None:
            raise ValueError("--stage1-model needs a configuration with a refinement stage (e.g. ellipse_refine)")
        config = _stage1_from_file(stage1_model, run_dir, config)
    _write_or_check_config(run_dir, config)
    log_path = console.ray_log_location(run_dir, f"train-{time.strftime('%Y%m%dT%H%M%S')}.log")
    stages = ([] if stage1_model else [f"stage 1, {config.epochs} epochs"]) + ([f"refinement stage, {config.refinement.epochs} epochs"] if config.refinement else [])
    console.header("train", {
        "manifest": f"{manifest_path}: {len(table)} labelled images, split by subject_id ({config.val_fraction:.0%} validation)",
        "stages": " then ".join(stages) + (f" (stage 1 from {stage1_model})" if stage1_model else ""),
        "workers": f"{workers} Ray Train worker(s) × {threads_per_worker} thread(s), gloo" + (", stage 1 in bf16 autocast" if config.bf16 else ""),
        "output": run_dir + " (a rerun resumes from its checkpoints)",
        "Ray log": "this console (--verbose)" if verbose else log_path,
    })
    resumed_after = {}
    with console.ray_logs_to_file(log_path, verbose):
        connect(ray_address, quiet_ray_train=True)
        if stage1_model:
            result = {"stage1_model": storage.absolute(stage1_model)}
        else:
            result, resumed_after["stage1"] = _train_stage(run_dir, manifest_path, table, config, workers, threads_per_worker, max_failures)
        if config.refinement is not None:
            result["refinement"], resumed_after["refinement"] = _train_stage(
                storage.join(run_dir, "refinement"), manifest_path, table, config, workers, threads_per_worker, max_failures, refinement=True)
            write_refinement_outputs(run_dir)
    wall_seconds = time.perf_counter() - started
    storage.write_text(storage.join(run_dir, "run.json"), json.dumps(  # the wall clock of this invocation, start-up included
        {"wall_seconds": round(wall_seconds, 1), "workers": workers, "threads_per_worker": threads_per_worker,
         "resumed_after_epoch": resumed_after, "ray_log": log_path}, indent=2))
    result["ray_log"] = log_path
    result["wall_seconds"] = round(wall_seconds, 1)
    return result


def check_stored_priors(table: pd.DataFrame, refinement: RefinementConfig | None) -> None:
    """A refinement stage trained on stored stage-1 priors needs them in the manifest (`manifest.STAGE1_PRIOR_COLUMNS`)."""
    if refinement is None or refinement.stage1_prior_share == 0:
        return
    missing = [column for column in STAGE1_PRIOR_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"refinement.stage1_prior_share = {refinement.stage1_prior_share} needs stored stage-1 priors in the manifest; "
                         f"missing columns: {', '.join(missing)} (studies/out_of_fold_priors.py writes them)")


def _stage1_from_file(stage1_model: str, run_dir: str, config: TrainConfig) -> TrainConfig:
    """Write RUN_DIR/model.pt from another model file's stage 1 (weights and config; nothing it was calibrated with)."""
    from fetalpipe.model.model_file import load_model, save_model

    model, stage1_config, payload = load_model(stage1_model)
    save_model(storage.join(run_dir, "model.pt"), payload["state_dict"], stage1_config.without_refinement(), metrics=payload.get("metrics"),
               training={**payload.get("training", {}), "stage1_from": storage.absolute(stage1_model)})
    return dataclasses.replace(stage1_config, refinement=config.refinement)


def _train_stage(stage_dir: str, manifest_path: str, table: pd.DataFrame, config: TrainConfig, workers: int, threads_per_worker: int,
                 max_failures: int, refinement: bool = False) -> tuple[dict, int]:
    """One stage's Ray Train run into STAGE_DIR (resumed from its checkpoints), then its outputs. Returns (best-epoch
    metrics, the epoch it resumed after)."""
    import ray.train
    from ray.train.torch import TorchConfig

    from fetalpipe.runtime.cluster import torch_trainer

    name = "refinement stage" if refinement else "stage 1"
    epochs = config.refinement.epochs if refinement else config.epochs
    storage.makedirs(stage_dir)
    done = list_checkpoints(stage_dir)
    if done and done[-1][0] >= epochs:
        print(f"fetalpipe train: {name}: {stage_dir} already holds all {epochs} epochs; rewriting its outputs", flush=True)
        return (write_refinement_metrics(stage_dir) if refinement else write_run_outputs(stage_dir, manifest_path, config)), done[-1][0]
    latest_checkpoint = done[-1][1] if done else None
    if latest_checkpoint:
        print(f"fetalpipe train: {name}: resuming after epoch {done[-1][0]} from {done[-1][1]}", flush=True)
    train_table, val_table = split_by_subject(table, config.val_fraction)
    if len(train_table) == 0 or len(val_table) == 0:
        raise ValueError(f"split by subject left {len(train_table)} train / {len(val_table)} validation images; need both")
    if refinement:
        train_ds, val_ds, skipped = build_refinement_datasets(train_table, val_table, config.refinement)
        train_count, val_count = len(train_table) - len(skipped), None
        loop, loop_config = refinement_loop_per_worker, {"refinement_config": dataclasses.asdict(config.refinement)}
    else:
        train_ds, val_ds, train_count, val_count, skipped = build_datasets(train_table, val_table, config)
        loop, loop_config = train_loop_per_worker, {"train_config": config.to_dict()}
    storage.write_text(storage.join(stage_dir, "skipped_images.csv"), skipped.to_csv(index=False))
    if len(skipped):
        print(f"fetalpipe train: WARNING: skipping {len(skipped)} unreadable image(s), listed in {stage_dir}/skipped_images.csv:", flush=True)
        for row in skipped.head(10).itertuples():
            print(f"  {row.image_path}: {row.error}", flush=True)
    if not refinement:
        print(f"fetalpipe train: {train_count} train / {val_count} validation images (split by subject_id)", flush=True)
        if train_count == 0 or val_count == 0:
            raise ValueError(f"no readable images left in the {'training' if train_count == 0 else 'validation'} split")
    else:
        print(f"fetalpipe train: refinement stage: {epochs} epochs on polar crops of {train_count} training images", flush=True)
    trainer = torch_trainer(
        train_loop_per_worker=loop,
        train_loop_config={**loop_config, "threads_per_worker": threads_per_worker, "resume_from": latest_checkpoint},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": threads_per_worker}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(
            name="ray_train",
            storage_path=stage_dir,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
        ),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    with EpochLines(stage_dir, name, epochs, after_epoch=done[-1][0] if done else 0):
        trainer.fit()
    result = write_refinement_metrics(stage_dir) if refinement else write_run_outputs(stage_dir, manifest_path, config)
    return result, done[-1][0] if done else 0


class EpochLines:
    """While Ray Train runs, one console line per finished epoch, read from the checkpoints it stores (rank 0's
    metrics.json): the driver sees them where Ray Train puts them, on this machine or on the cluster's shared storage."""

    def __init__(self, stage_dir: str, name: str, epochs: int, after_epoch: int = 0, poll_s: float = 2.0):
        import threading

        self.stage_dir, self.name, self.epochs, self.printed, self.poll_s = stage_dir, name, epochs, after_epoch, poll_s
        self.seconds: list[float] = []
        self.metrics_by_dir: dict[str, dict] = {}  # checkpoints already read (`list_checkpoints`)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stopped.set()
        self.thread.join()
        self.print_new()

    def _poll(self) -> None:
        while not self.stopped.wait(self.poll_s):
            self.print_new()

    def print_new(self) -> None:
        from fetalpipe.runtime.console import format_seconds

        for epoch, checkpoint in list_checkpoints(self.stage_dir, self.metrics_by_dir):
            if epoch <= self.printed:
                continue
            metrics = self.metrics_by_dir[checkpoint]
            self.seconds.append(metrics.get("epoch_seconds", float("nan")))
            eta = format_seconds(float(np.nanmean(self.seconds)) * (self.epochs - epoch)) if np.isfinite(np.nanmean(self.seconds)) else "?"
            print(f"{self.name}: epoch {epoch}/{self.epochs}  train loss {metrics['train_loss']:.4f}  val loss {metrics['val_loss']:.4f}  "
                  f"val HC MAE {metrics.get('val_hc_mae_mm', float('nan')):.2f} mm  {metrics.get('epoch_seconds', float('nan')):.0f} s  ETA {eta}", flush=True)
            self.printed = epoch


def _write_or_check_config(run_dir: str, config: TrainConfig) -> None:
    """A rerun resumes only the run its folder holds (epochs may grow). The stored config is read with this version's
    defaults for the fields it predates, so a run started before a field existed still resumes (e.g. `loss_weighting`)."""
    def as_stored(values: dict) -> dict:  # tuples become lists, as in the JSON file; epochs may differ
        return {key: value for key, value in json.loads(json.dumps(values)).items() if key != "epochs"}

    path = storage.join(run_dir, "train_config.json")
    if storage.exists(path):
        previous = json.loads(storage.read_bytes(path))
        try:
            previous = TrainConfig.from_dict(previous).to_dict()
        except (TypeError, ValueError):
            pass  # a field this version does not know: compared as stored, so it differs
        if as_stored(previous) != as_stored(config.to_dict()):
            raise ValueError(f"{run_dir} holds a run with a different configuration; use a new --output or delete it")
    storage.write_text(path, json.dumps(config.to_dict(), indent=2))


def list_checkpoints(run_dir: str, metrics_by_dir: dict[str, dict] | None = None) -> list[tuple[int, str]]:
    """(epoch, checkpoint dir) for every checkpoint Ray Train stored under RUN_DIR (a path or an object-store URI).
    `metrics_by_dir`: a cache the caller keeps between calls (a poll) of each checkpoint's metrics.json, read once."""
    import pyarrow.fs

    metrics_by_dir = {} if metrics_by_dir is None else metrics_by_dir
    found = []
    root = storage.join(run_dir, "ray_train")
    fs, root_path = storage.filesystem(root)
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root_path, allow_not_found=True)):
        if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        checkpoint_dir = storage.join(root, info.base_name)
        if checkpoint_dir not in metrics_by_dir:
            metrics_path = storage.join(checkpoint_dir, "metrics.json")
            if not storage.exists(metrics_path):  # still being written
                continue
            metrics_by_dir[checkpoint_dir] = json.loads(storage.read_bytes(metrics_path))
        found.append((int(metrics_by_dir[checkpoint_dir]["epoch"]), checkpoint_dir))
    return sorted(found)


def _load_checkpoint_state(checkpoint_dir: str) -> dict:
    import torch

    return torch.load(io.BytesIO(storage.read_bytes(storage.join(checkpoint_dir, "state.pt"))), weights_only=False)


def write_run_outputs(run_dir: str, manifest_path: str | None = None, config: TrainConfig | None = None) -> dict:
    """From the checkpoints: metrics.csv, loss_curves.png, and model.pt of the best epoch (stage 1 alone; a refinement
    stage is added to it by `write_refinement_outputs`)."""
    from fetalpipe.model.model_file import save_model

    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise RuntimeError(f"no checkpoint was written under {run_dir}")
    history = pd.DataFrame(_load_checkpoint_state(checkpoints[-1][1])["history"])
    storage.write_text(storage.join(run_dir, "metrics.csv"), history.to_csv(index=False))
    plot_loss_curves(history, storage.join(run_dir, "loss_curves.png"))
    criterion = "val_hc_mae_mm" if history["val_hc_mae_mm"].notna().any() else "val_mre_px"
    best_epoch = int(history.loc[history[criterion].idxmin(), "epoch"])
    best_dir = dict(checkpoints)[best_epoch]
    best = _load_checkpoint_state(best_dir)
    config = TrainConfig.from_dict(best["train_config"]).without_refinement()
    best_metrics = history[history["epoch"] == best_epoch].iloc[0].to_dict()
    save_model(
        storage.join(run_dir, "model.pt"), best["state_dict"], config,
        metrics={"selected_by": criterion, **{k: float(v) for k, v in best_metrics.items()}},
        training={"manifest": manifest_path, "epochs_run": int(history["epoch"].max()), "total_train_seconds": float(history["epoch_seconds"].sum())},
    )
    return {"best_epoch": best_epoch, **best_metrics}


def _best_refinement_checkpoint(stage_dir: str) -> tuple[pd.DataFrame, int, str]:
    checkpoints = list_checkpoints(stage_dir)
    if not checkpoints:
        raise RuntimeError(f"no checkpoint was written under {stage_dir}")
    history = pd.DataFrame(_load_checkpoint_state(checkpoints[-1][1])["history"])
    best_epoch = int(history.loc[history["val_hc_mae_mm"].idxmin(), "epoch"])
    return history, best_epoch, dict(checkpoints)[best_epoch]


def write_refinement_metrics(stage_dir: str) -> dict:
    """RUN_DIR/refinement/metrics.csv from its checkpoints; the best epoch's metrics (by validation HC MAE)."""
    history, best_epoch, _ = _best_refinement_checkpoint(stage_dir)
    storage.write_text(storage.join(stage_dir, "metrics.csv"), history.to_csv(index=False))
    return {"best_epoch": best_epoch, **history[history["epoch"] == best_epoch].iloc[0].to_dict()}


def write_refinement_outputs(run_dir: str) -> None:
    """RUN_DIR/model.pt with both stages: stage 1 as written by `write_run_outputs` (or taken from --stage1-model)
    plus the refinement stage's best epoch."""
    from fetalpipe.model.model_file import load_model, save_model

    stage_dir = storage.join(run_dir, "refinement")
    history, best_epoch, best_dir = _best_refinement_checkpoint(stage_dir)
    best = _load_checkpoint_state(best_dir)
    model_path = storage.join(run_dir, "model.pt")
    _, stage1_config, payload = load_model(model_path)
    config = dataclasses.replace(stage1_config, refinement=RefinementConfig.from_dict(best["train_config"]))
    training = {**payload.get("training", {}), "refinement_epochs_run": int(history["epoch"].max()),
                "refinement_train_seconds": float(history["epoch_seconds"].sum())}
    refinement_metrics = {f"refinement_{k}": float(v) for k, v in history[history["epoch"] == best_epoch].iloc[0].items()}
    save_model(model_path, payload["state_dict"], config, metrics={**payload.get("metrics", {}), **refinement_metrics}, training=training,
               refinement_state_dict=best["state_dict"])


def plot_loss_curves(history: pd.DataFrame, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(history["epoch"], history["train_loss"], label="train")
    axes[0].plot(history["epoch"], history["val_loss"], label="validation")
    axes[0].set_xlabel("epoch"), axes[0].set_ylabel("heatmap loss"), axes[0].set_yscale("log"), axes[0].legend()
    axes[1].plot(history["epoch"], history["val_hc_mae_mm"], color="C2")
    axes[1].set_xlabel("epoch"), axes[1].set_ylabel("validation HC MAE (mm)")
    figure.suptitle("Training and validation loss")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    storage.write_bytes(path, buffer.getvalue())
