"""Validation of saved epoch checkpoints, as logged and with BatchNorm statistics recomputed.

During training, BatchNorm keeps running statistics of the last ~10 augmented batches (momentum 0.1), and
validation uses them. This script recomputes them (a cumulative average, as "precise BN" does) in two ways and
scores the same weights again: over all un-augmented training images, and over 2 augmented passes of the training
images in training-size batches (what averaging the running statistics over whole epochs would give). Neither depends on which batches
happened to come last, so they compare configurations and epochs without that noise.

    python studies/recalibrated_bn_eval.py --manifest runs/hc18.csv runs/deep_full runs/shipped_full
    python studies/recalibrated_bn_eval.py --manifest runs/hc18.csv --last 0 runs/deep_full runs/shipped_full --average-last 3 6 10 15

Prints one line per (run, checkpoint) and writes studies/results/recalibrated_bn.json."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fetalpipe.data.augment import AugmentConfig, random_affine, random_intensity  # noqa: E402
from fetalpipe.data.imaging import ResizeTransform, read_image, resize_to_model  # noqa: E402
from fetalpipe.data.manifest import landmarks_original_px, load_manifest  # noqa: E402
from fetalpipe.model.config import TrainConfig  # noqa: E402
from fetalpipe.model.networks import HeatmapUNet  # noqa: E402
from fetalpipe.pipeline.evaluate import per_image_errors  # noqa: E402
from fetalpipe.pipeline.train import split_by_subject  # noqa: E402


def load_images(paths, input_size: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 [N, S, S] model-input images and [N, 2] original (width, height)."""
    images, sizes = [], []
    for path in paths:
        pixels = read_image(path).pixels
        images.append(resize_to_model(pixels, input_size)[0])
        sizes.append((pixels.shape[1], pixels.shape[0]))
    return np.stack(images), np.array(sizes)


def augmented_passes(images: np.ndarray, passes: int, seed: int = 0) -> np.ndarray:
    """`passes` shuffled copies of `images`, each through the training augmentation (affine + intensity)."""
    rng = np.random.default_rng(seed)
    config = AugmentConfig()
    no_points = np.zeros((4, 2))
    copies = [random_intensity(random_affine(image, no_points, config, rng)[0], config, rng) for image in np.concatenate([images] * passes)]
    return np.stack(copies)[rng.permutation(len(copies))]


def recompute_batchnorm(model: torch.nn.Module, images: np.ndarray, batch_size: int = 16, device: str = "cpu") -> None:
    """Running statistics = the average over all `images` (float32 [N, S, S]; momentum None), then back to eval mode."""
    norms = [module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(torch.from_numpy(images[start:start + batch_size, None]).to(device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def average_state_dicts(states: list[dict]) -> dict:
    """Element-wise mean of floating-point tensors; integer buffers (BatchNorm batch counts) from the last state."""
    return {
        name: (sum(state[name].double() for state in states) / len(states)).to(states[-1][name].dtype) if states[-1][name].is_floating_point() else states[-1][name]
        for name in states[-1]
    }


def validation_hc_mae_mm(model, codec, images, sizes, reference_points, spacing_mm, reference_hc_mm) -> tuple[float, float]:
    """(HC MAE, MRE) in mm, as the training loop computes them."""
    model.eval()
    with torch.no_grad():
        maps = np.concatenate([model(torch.from_numpy(images[start:start + 16, None])).numpy() for start in range(0, len(images), 16)])
    points_model, _ = codec.decode(maps, sizes)
    points_original = np.stack([ResizeTransform(int(w), int(h), codec.input_size).to_original(p) for (w, h), p in zip(sizes, points_model)])
    errors = per_image_errors(points_original, reference_points, spacing_mm, reference_hc_mm)
    return float(errors["hc_ellipse_diff_mm"].abs().mean()), float(errors["mean_radial_error_mm"].mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", help="training run folders (RUN_DIR of `fetalpipe train`)")
    parser.add_argument("--manifest", default="runs/hc18.csv")
    parser.add_argument("--last", type=int, default=3, help="also score this many final epochs")
    parser.add_argument("--average-last", type=int, nargs="*", default=[], help="also score the weights averaged over the last K epochs, for each K")
    parser.add_argument("--augmented-passes", type=int, default=2, help="augmented passes over the training images for the second recompute (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    table = load_manifest(args.manifest)
    rows = []
    for run in args.runs:
        config = TrainConfig.from_dict(json.load(open(os.path.join(run, "train_config.json"))))
        train, val = split_by_subject(table, config.val_fraction)
        train_images, _ = load_images(train["image_path"], config.input_size)
        # Runs trained without augmentation have only the un-augmented statistics to compare against.
        augmented_images = augmented_passes(train_images, args.augmented_passes) if config.augment and args.augmented_passes else None
        val_images, val_sizes = load_images(val["image_path"], config.input_size)
        reference = landmarks_original_px(val)
        spacing, reference_hc = val["pixel_spacing_mm"].to_numpy(np.float64), val["hc_mm"].to_numpy(np.float64)
        checkpoints = sorted(path for path in glob.glob(os.path.join(run, "ray_train", "checkpoint_*")) if os.path.isdir(path))
        logged = [json.load(open(os.path.join(path, "metrics.json"))) for path in checkpoints]
        best = min(range(len(logged)), key=lambda index: logged[index]["val_hc_mae_mm"])
        for index in sorted({best, *range(max(len(checkpoints) - args.last, 0), len(checkpoints))}):
            state = torch.load(os.path.join(checkpoints[index], "state.pt"), weights_only=False)
            model = HeatmapUNet(config.model)
            model.load_state_dict(state["state_dict"])
            as_logged = validation_hc_mae_mm(model, config.codec(), val_images, val_sizes, reference, spacing, reference_hc)
            started = time.perf_counter()
            recompute_batchnorm(model, train_images)
            recompute_seconds = time.perf_counter() - started
            recomputed = validation_hc_mae_mm(model, config.codec(), val_images, val_sizes, reference, spacing, reference_hc)
            row = {
                "run": run, "epoch": logged[index]["epoch"], "best_logged_epoch": index == best,
                "hc_mae_mm_as_logged": round(as_logged[0], 3), "mre_mm_as_logged": round(as_logged[1], 3),
                "hc_mae_mm_recomputed_bn": round(recomputed[0], 3), "mre_mm_recomputed_bn": round(recomputed[1], 3),
                "recompute_seconds": round(recompute_seconds, 1),
            }
            if augmented_images is not None:
                recompute_batchnorm(model, augmented_images, batch_size=config.batch_size)
                recomputed_augmented = validation_hc_mae_mm(model, config.codec(), val_images, val_sizes, reference, spacing, reference_hc)
                row["hc_mae_mm_recomputed_bn_augmented"] = round(recomputed_augmented[0], 3)
                row["mre_mm_recomputed_bn_augmented"] = round(recomputed_augmented[1], 3)
            rows.append(row)
            augmented_text = f", {row['hc_mae_mm_recomputed_bn_augmented']:.2f} mm on augmented images" if augmented_images is not None else ""
            print(f"{run} epoch {row['epoch']:2d}{' (best logged)' if row['best_logged_epoch'] else ''}: HC MAE {row['hc_mae_mm_as_logged']:.2f} mm as logged, "
                  f"{row['hc_mae_mm_recomputed_bn']:.2f} mm with BatchNorm recomputed on un-augmented images{augmented_text}", flush=True)
        for count in args.average_last:  # SWA-style: the mean of the last `count` epochs' weights, statistics recomputed
            states = [torch.load(os.path.join(path, "state.pt"), weights_only=False)["state_dict"] for path in checkpoints[-count:]]
            model = HeatmapUNet(config.model)
            model.load_state_dict(average_state_dicts(states))
            recompute_batchnorm(model, train_images)
            recomputed = validation_hc_mae_mm(model, config.codec(), val_images, val_sizes, reference, spacing, reference_hc)
            rows.append({"run": run, "epoch": logged[-1]["epoch"], "averaged_last_epochs": count,
                         "hc_mae_mm_recomputed_bn": round(recomputed[0], 3), "mre_mm_recomputed_bn": round(recomputed[1], 3)})
            print(f"{run} weights averaged over the last {count} epochs: HC MAE {recomputed[0]:.2f} mm with BatchNorm recomputed on un-augmented images", flush=True)
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    path = os.path.join(os.path.dirname(__file__), "results", "recalibrated_bn.json")
    key = lambda row: (row["run"], row["epoch"], row.get("averaged_last_epochs"))  # noqa: E731
    kept = []  # rows not scored now are kept, so the file can grow one run (or one option) at a time
    if os.path.exists(path):
        with open(path) as handle:
            scored = {key(row) for row in rows}
            kept = [row for row in json.load(handle)["rows"] if key(row) not in scored]
    with open(path, "w") as handle:
        json.dump({"manifest": args.manifest, "rows": kept + rows}, handle, indent=2)


if __name__ == "__main__":
    main()
