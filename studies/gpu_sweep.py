"""Recipe sweep on one accelerator: the training loop of `fetalpipe train`, in one process, many runs.

Why: on the 2-core CPU one run of the shipped recipe takes ~28 min, and two runs of the same recipe ended
0.26 mm apart (docs/experiments.md, note 6), so single CPU runs cannot rank recipes that differ by less.
On a GPU a 30-epoch run takes seconds, so every recipe here runs with several seeds and is compared on the
mean. It answers "which recipe, and does more training help?"; the shipped model still comes from
`fetalpipe train` on the CPU.

What is the same as `fetalpipe train`: the model, the heatmap codec, the augmentation functions, the loss, the
cosine schedule and the validation metric (HC MAE of the fitted ellipse on the 135 validation images).
What differs: no Ray; one process steps on the global batch (batch_size × 2 workers = 16, what DDP averages
over), so BatchNorm sees 16 images a step instead of 8; images are the library's resize, stored as uint8.

    python studies/gpu_sweep.py build-cache --manifest runs/hc18.csv --output runs/gpu_cache/hc18_256.npz
    python studies/gpu_sweep.py run --cache runs/gpu_cache/hc18_256.npz --output OUT [--processes 4] [--deadline-s 480]

`run` starts PROCESSES copies of itself; each takes every PROCESSES-th (recipe, seed) in priority order and
appends one JSON line per finished run to OUT/sweep-<index>.jsonl; `summarize OUT... [--json FILE]` prints the table.
With `run --save-models DIR`, each run's weights become a stage-1 model file, and back on the CPU machine

    python studies/gpu_sweep.py behind-refinement --models DIR/*.pt --refinement-run runs/refine_full --output runs/g3 \
        --json studies/results/gpu_stage1_behind_refinement.json

puts the refinement stage of REFINEMENT_RUN (its finished `refinement/` checkpoints) behind each of them with
`fetalpipe train --stage1-model` (which then calibrates), and scores the calibrated file on validation with
`fetalpipe infer` + `fetalpipe evaluate`: the two-stage measurement that the shipped model's rows report."""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fetalpipe.data.augment import AugmentConfig  # noqa: E402
from fetalpipe.data.imaging import ResizeTransform  # noqa: E402
from fetalpipe.model.config import TrainConfig, resolve_config  # noqa: E402
from fetalpipe.model.model_file import read_model_header  # noqa: E402
from fetalpipe.pipeline.evaluate import per_image_errors
from fetalpipe.pipeline.evaluate import summarize as summarize_errors  # noqa: E402
from fetalpipe.pipeline.preprocess import encode_batch  # noqa: E402
from fetalpipe.pipeline.train import _lr_factor, heatmap_loss, split_by_subject  # noqa: E402
from cli_runs import train_infer_evaluate  # noqa: E402  (studies/, the script's own folder)
from recalibrated_bn_eval import recompute_batchnorm  # noqa: E402

RAY_TRAIN_WORKERS = 2  # `fetalpipe train`'s default: the global batch is batch_size × this

# (name, config, TrainConfig overrides, ModelConfig overrides, AugmentConfig overrides, options, seeds), in priority order.
RECIPES = [
    ("shipped", "ellipse_deep", {}, {}, {}, {}, (0, 1, 2)),
    ("epochs60", "ellipse_deep", {"epochs": 60}, {}, {}, {}, (0, 1, 2)),
    ("groupnorm", "ellipse_deep", {}, {}, {}, {"norm": "group"}, (0, 1, 2)),
    ("epochs120", "ellipse_deep", {"epochs": 120}, {}, {}, {}, (0, 1)),
    ("lr1e-3", "ellipse_deep", {"lr": 1e-3}, {}, {}, {}, (0, 1)),
    ("lr4e-3", "ellipse_deep", {"lr": 4e-3}, {}, {}, {}, (0, 1)),
    ("no_intensity_aug", "ellipse_deep", {}, {}, {"gamma_range": (1.0, 1.0), "contrast_range": (1.0, 1.0)}, {}, (0, 1)),
    ("strong_aug", "ellipse_deep", {}, {}, {"rotation_deg": 30.0, "scale_range": (0.8, 1.2), "shift_fraction": 0.08}, {}, (0, 1)),
    ("width24", "ellipse_deep", {}, {"base_width": 24, "max_width": 192}, {}, {}, (0, 1)),
    ("global_batch8", "ellipse_deep", {"batch_size": 4}, {}, {}, {}, (0, 1)),
    ("groupnorm_epochs60", "ellipse_deep", {"epochs": 60}, {}, {}, {"norm": "group"}, (0, 1)),
    ("shipped", "ellipse_deep", {}, {}, {}, {}, (3, 4, 5)),
    # Second sweep, after global_batch8 led the first: smaller batches, each BatchNorm over one worker's share.
    ("per_worker_bn", "ellipse_deep", {}, {}, {}, {"split_batchnorm": True}, (0, 1, 2)),
    ("per_worker_bn_batch4", "ellipse_deep", {"batch_size": 4}, {}, {}, {"split_batchnorm": True}, (0, 1, 2)),
    ("per_worker_bn_batch2", "ellipse_deep", {"batch_size": 2}, {}, {}, {"split_batchnorm": True}, (0, 1)),
    ("per_worker_bn_batch4_lr1e-3", "ellipse_deep", {"batch_size": 4, "lr": 1e-3}, {}, {}, {"split_batchnorm": True}, (0, 1)),
    ("per_worker_bn_batch4_epochs60", "ellipse_deep", {"batch_size": 4, "epochs": 60}, {}, {}, {"split_batchnorm": True}, (0, 1)),
    # The seed report's own row: its config as it trained, in one process with batch 8 (no Ray, so no global batch of 16).
    ("seed", "seed", {}, {}, {}, {"workers": 1}, (0, 1, 2)),
    # Third sweep, saved (--save-models) to run behind the refinement stage: does a stage 1 trained 4x as long, with or
    # without R7's intensity ranges (augment.INTENSITY_FINE_TUNE_AUGMENT), move the two-stage measurement?
    ("stage1_120", "ellipse_deep", {"epochs": 120}, {}, {}, {}, (0, 1, 2)),
    ("stage1_120_intensity", "ellipse_deep", {"epochs": 120}, {}, {"gamma_range": (0.5, 1.8), "contrast_range": (0.6, 1.4), "noise_probability": 0.2}, {}, (0, 1, 2)),
    # A cheaper stage 1 trained longer (R14's half width, 2.5x cheaper a pass): 90 epochs cost what 36 min on the CPU.
    ("stage1_narrow_90", "ellipse_deep", {"epochs": 90}, {"base_width": 8}, {}, {}, (0, 1, 2)),
]


def build_cache(manifest_path: str, output_path: str, input_size: int = 256) -> None:
    """Decode + resize every labelled image once (the library's resize), store uint8 with landmarks and the split."""
    from fetalpipe.data.imaging import read_image, resize_to_model
    from fetalpipe.data.manifest import landmarks_original_px, load_manifest

    table = load_manifest(manifest_path, require_landmarks=True)
    train_table, val_table = split_by_subject(table, 0.15)
    images, sizes = [], []
    for path in pd.concat([train_table, val_table])["image_path"]:
        pixels = read_image(path).pixels
        images.append(np.round(resize_to_model(pixels, input_size)[0] * 255).astype(np.uint8))
        sizes.append((pixels.shape[1], pixels.shape[0]))
    both = pd.concat([train_table, val_table], ignore_index=True)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    np.savez_compressed(
        output_path,
        images=np.stack(images),
        original_sizes=np.array(sizes),
        points_original=landmarks_original_px(both),
        pixel_spacing_mm=both["pixel_spacing_mm"].to_numpy(np.float64),
        hc_mm=both["hc_mm"].to_numpy(np.float64),
        is_validation=np.r_[np.zeros(len(train_table), bool), np.ones(len(val_table), bool)],
    )
    print(f"{output_path}: {len(train_table)} train + {len(val_table)} validation images, {os.path.getsize(output_path) / 1e6:.1f} MB")


class AugmentedEllipses:
    """torch Dataset: one training image through the library's training step (`preprocess.encode_batch`: affine +
    intensity augmentation where the config augments, then the target map)."""

    def __init__(self, images_u8, points_model_px, codec, augment: AugmentConfig | None):
        self.images_u8, self.points_model_px, self.codec, self.augment = images_u8, points_model_px, codec, augment

    def __len__(self):
        return len(self.images_u8)

    def __getitem__(self, index):
        batch = {"image": self.images_u8[index:index + 1].astype(np.float32) / 255.0, "points_model": self.points_model_px[index:index + 1]}
        encoded = encode_batch(batch, self.codec, self.augment)  # fresh random numbers on every call
        return encoded["image"][0], encoded["heatmaps"][0]


def to_group_norm(model, groups: int = 8):
    """Replace every BatchNorm2d by GroupNorm: statistics per image, so none to track or recompute."""
    import torch

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(module, name, torch.nn.GroupNorm(min(groups, child.num_features), child.num_features))
    return model


def validate(model, images, original_sizes, points_original, spacing, hc_mm, codec, device) -> dict:
    import torch

    model.eval()
    maps = []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            batch = torch.from_numpy(images[start:start + 64].astype(np.float32)[:, None] / 255.0).to(device)
            maps.append(model(batch.contiguous(memory_format=torch.channels_last)).float().cpu().numpy())
    points_model, _ = codec.decode(np.concatenate(maps), original_sizes)
    points = np.stack([ResizeTransform(int(w), int(h), codec.input_size).to_original(p) for (w, h), p in zip(original_sizes, points_model)])
    errors = per_image_errors(points, points_original, spacing, hc_mm)
    summary = summarize_errors(errors)
    return {"hc_mae_mm": float(errors["hc_ellipse_diff_mm"].abs().mean()), "mre_mm": float(errors["mean_radial_error_mm"].mean()),
            "hc_errors_over_5mm": int((errors["hc_ellipse_diff_mm"].abs() > 5).sum()), "decode_failures": int(errors["hc_ellipse_diff_mm"].isna().sum()),
            "bpd_mae_mm": summary.get("bpd_mae_mm"), "ofd_mae_mm": summary.get("ofd_mae_mm"), "sdr_2mm": summary.get("sdr_2mm")}


def train_one(cache, recipe, seed: int, device: str, loader_workers: int, epochs_override: int | None, train_limit: int | None,
              save_dir: str | None = None) -> dict:
    import torch

    from fetalpipe.model.networks import HeatmapUNet

    name, base, overrides, model_overrides, augment_overrides, options, _ = recipe
    values = resolve_config(base).to_dict()
    values.update(overrides)
    values["model"].update(model_overrides)
    if epochs_override:
        values["epochs"] = epochs_override
    config = TrainConfig.from_dict(values)
    codec = config.codec()
    torch.manual_seed(seed)
    np.random.seed(seed)
    is_val = cache["is_validation"]
    train_index = np.flatnonzero(~is_val)[:train_limit]
    val_index = np.flatnonzero(is_val)
    sizes = cache["original_sizes"]
    points_model = np.stack([ResizeTransform(int(w), int(h), config.input_size).to_model(p) for (w, h), p in zip(sizes, cache["points_original"])])
    augment = AugmentConfig(**augment_overrides) if config.augment else None
    dataset = AugmentedEllipses(cache["images"][train_index], points_model[train_index], codec, augment)
    workers = options.get("workers", RAY_TRAIN_WORKERS)
    global_batch = config.batch_size * workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=global_batch, shuffle=True, num_workers=loader_workers,
                                         persistent_workers=loader_workers > 0, generator=torch.Generator().manual_seed(seed))
    model = HeatmapUNet(config.model)
    if options.get("norm") == "group":
        model = to_group_norm(model)
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    val_args = (cache["images"][val_index], sizes[val_index], cache["points_original"][val_index], cache["pixel_spacing_mm"][val_index], cache["hc_mm"][val_index], codec, device)
    started, curve = time.perf_counter(), []
    for epoch in range(config.epochs):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(config.lr_schedule, epoch, config.epochs)
        model.train()
        for images, targets in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            if options.get("split_batchnorm"):  # as DDP: each worker's share through BatchNorm alone, losses averaged
                shares = zip(images.chunk(workers), targets.chunk(workers))
                losses = [heatmap_loss(model(share), target, config.loss, config.foreground_weight) for share, target in shares]
                loss = sum(losses) / len(losses)
            else:
                loss = heatmap_loss(model(images), targets, config.loss, config.foreground_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if (epoch + 1) % 10 == 0 and epoch + 1 < config.epochs:
            curve.append({"epoch": epoch + 1, **validate(model, *val_args)})
    train_seconds = time.perf_counter() - started
    final = validate(model, *val_args)
    saved = None
    if save_dir:  # a stage-1 model file, the BatchNorm statistics as trained (what `fetalpipe train` ships)
        from fetalpipe.model.model_file import save_model

        saved = os.path.join(save_dir, f"{name}-{seed}.pt")
        weights = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
        save_model(saved, weights, config, metrics={"hc_mae_mm": final["hc_mae_mm"], "epoch": config.epochs},
                   training={"trainer": "studies/gpu_sweep.py", "recipe": name, "seed": seed, "augment": {key: list(value) if isinstance(value, tuple) else value for key, value in augment_overrides.items()}})
    result = {"recipe": name, "seed": seed, "epochs": config.epochs, "train_images": len(train_index), "val_images": len(val_index),
              "global_batch": global_batch, "lr": config.lr, "options": options, "model": values["model"], "augment": augment_overrides,
              "final_running_stats": final, "curve": curve, "seconds": round(train_seconds, 1), "saved_model": saved}
    if options.get("norm") != "group":
        recompute_batchnorm(model, cache["images"][train_index].astype(np.float32) / 255.0, device=device)  # rule (a)
        result["final_recomputed_a"] = validate(model, *val_args)
    return result


def run_worker(args) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = dict(np.load(args.cache))
    jobs = [(recipe, seed) for recipe in RECIPES for seed in recipe[-1]]
    if args.only:
        jobs = [job for job in jobs if job[0][0] in args.only]
    mine = jobs[args.worker_index::args.processes]
    deadline = time.time() + args.deadline_s
    path = os.path.join(args.output, f"sweep-{args.worker_index}.jsonl")
    for recipe, seed in mine:
        if time.time() > deadline:
            print(f"[{args.worker_index}] deadline: skipping {recipe[0]} seed {seed}", flush=True)
            continue
        result = train_one(cache, recipe, seed, device, args.loader_workers, args.epochs, args.train_limit, args.save_models)
        result.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__)
        with open(path, "a") as handle:
            handle.write(json.dumps(result) + "\n")
        print(f"[{args.worker_index}] {recipe[0]} seed {seed}: HC MAE {result['final_running_stats']['hc_mae_mm']:.2f} mm "
              f"(rule a {result.get('final_recomputed_a', {}).get('hc_mae_mm', float('nan')):.2f}) in {result['seconds']:.0f} s", flush=True)


def summarize(outputs: list[str], json_path: str | None = None) -> pd.DataFrame:
    """Mean over seeds per recipe; with `json_path`, every run and the table in one JSON file."""
    rows, results = [], []
    for path in sorted(path for output in outputs for path in glob.glob(os.path.join(output, "sweep-*.jsonl"))):
        with open(path) as handle:
            for line in handle:
                result = json.loads(line)
                results.append(result)
                rows.append({"recipe": result["recipe"], "seed": result["seed"], "epochs": result["epochs"],
                             "hc_mae_mm": result["final_running_stats"]["hc_mae_mm"],
                             "hc_mae_rule_a_mm": result.get("final_recomputed_a", {}).get("hc_mae_mm", np.nan),
                             "mre_mm": result["final_running_stats"]["mre_mm"], "seconds": result["seconds"],
                             **{key: result["final_running_stats"].get(key, np.nan) for key in ("bpd_mae_mm", "ofd_mae_mm", "sdr_2mm", "hc_errors_over_5mm")}})
    table = pd.DataFrame(rows)
    if table.empty:
        print("no results")
        return table
    grouped = table.groupby(["recipe", "epochs"], sort=False).agg(
        runs=("seed", "count"), hc_mae_mm=("hc_mae_mm", "mean"), hc_mae_sd=("hc_mae_mm", "std"),
        hc_mae_rule_a_mm=("hc_mae_rule_a_mm", "mean"), hc_mae_rule_a_sd=("hc_mae_rule_a_mm", "std"), mre_mm=("mre_mm", "mean"),
        bpd_mae_mm=("bpd_mae_mm", "mean"), ofd_mae_mm=("ofd_mae_mm", "mean"), sdr_2mm=("sdr_2mm", "mean"),
        hc_errors_over_5mm=("hc_errors_over_5mm", "mean"), seconds=("seconds", "mean"))
    print(grouped.round(3).to_string())
    if json_path:
        with open(json_path, "w") as handle:
            json.dump({"table": grouped.round(3).reset_index().to_dict(orient="records"), "runs": results}, handle, indent=1)
    return table


def behind_refinement(models: list[str], refinement_run: str, manifest: str, val_manifest: str, output: str, json_path: str | None) -> pd.DataFrame:
    """Each saved stage 1 behind one trained refinement stage, calibrated and evaluated; resumes (a finished model is
    read back, not run again)."""
    import shutil

    rows = []
    for model in models:
        name = os.path.splitext(os.path.basename(model))[0]
        run_dir = os.path.join(output, name)
        metrics_path = os.path.join(run_dir, "val", "report", "metrics.json")
        if not os.path.exists(metrics_path):
            shutil.rmtree(run_dir, ignore_errors=True)
            os.makedirs(run_dir)
            shutil.copytree(os.path.join(refinement_run, "refinement"), os.path.join(run_dir, "refinement"))
            train_infer_evaluate(run_dir, manifest, val_manifest, ["--config", "ellipse_refine", "--stage1-model", model])
        with open(metrics_path) as handle:
            metrics = json.load(handle)
        stage1 = read_model_header(model)
        rows.append({"stage1": name, "recipe": stage1["training"].get("recipe"), "seed": stage1["training"].get("seed"),
                     "stage1_hc_mae_mm": stage1["metrics"].get("hc_mae_mm"),
                     **{key: metrics[key] for key in ("hc_ellipse_mae_mm", "hc_ellipse_mean_diff_mm", "bpd_mae_mm", "ofd_mae_mm", "mre_mm", "sdr_2mm",
                                                      "hc_ellipse_images_over_5mm", "flagged_fraction", "flagged_of_images_over_5mm")}})
        print(f"{name}: two stages HC MAE {metrics['hc_ellipse_mae_mm']:.3f} mm", flush=True)
    table = pd.DataFrame(rows)
    print(table.round(3).to_string(index=False))
    grouped = table.groupby("recipe", sort=False)[["stage1_hc_mae_mm", "hc_ellipse_mae_mm", "bpd_mae_mm", "ofd_mae_mm", "mre_mm", "sdr_2mm", "hc_ellipse_images_over_5mm"]].agg(["mean", "min", "max"])
    print(grouped.round(3).to_string())
    if json_path:
        with open(json_path, "w") as handle:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
            machine = f"{os.uname().machine}, {os.cpu_count()} CPUs (infer, evaluate and calibrate)"
            json.dump({"refinement_run": refinement_run, "commit": commit, "machine": machine, "runs": rows}, handle, indent=1)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cache_parser = commands.add_parser("build-cache")
    cache_parser.add_argument("--manifest", required=True)
    cache_parser.add_argument("--output", required=True)
    run_parser = commands.add_parser("run")
    run_parser.add_argument("--cache", required=True)
    run_parser.add_argument("--output", required=True)
    run_parser.add_argument("--processes", type=int, default=4)
    run_parser.add_argument("--loader-workers", type=int, default=3)
    run_parser.add_argument("--deadline-s", type=float, default=480, help="start no new run after this many seconds")
    run_parser.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    run_parser.add_argument("--epochs", type=int, help="override every recipe's epochs (smoke tests)")
    run_parser.add_argument("--train-limit", type=int, help="use only the first N training images (smoke tests)")
    run_parser.add_argument("--save-models", help="write each run's weights here as a stage-1 model file, RECIPE-SEED.pt")
    run_parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    summary_parser = commands.add_parser("summarize")
    summary_parser.add_argument("outputs", nargs="+", help="run --output folders")
    summary_parser.add_argument("--json", help="also write every run and the table here")
    behind_parser = commands.add_parser("behind-refinement")
    behind_parser.add_argument("--models", nargs="+", required=True, help="stage-1 model files from run --save-models")
    behind_parser.add_argument("--refinement-run", required=True, help="a `fetalpipe train --config ellipse_refine` run folder")
    behind_parser.add_argument("--manifest", default="runs/hc18.csv")
    behind_parser.add_argument("--val-manifest", default="runs/hc18_val.csv")
    behind_parser.add_argument("--output", required=True)
    behind_parser.add_argument("--json", help="also write every run here")
    args = parser.parse_args()
    if args.command == "build-cache":
        build_cache(args.manifest, args.output)
    elif args.command == "summarize":
        summarize(args.outputs, args.json)
    elif args.command == "behind-refinement":
        behind_refinement(args.models, args.refinement_run, args.manifest, args.val_manifest, args.output, args.json)
    elif args.worker_index is not None:
        run_worker(args)
    else:
        os.makedirs(args.output, exist_ok=True)
        if args.save_models:
            os.makedirs(args.save_models, exist_ok=True)
        children = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--worker-index", str(index)]) for index in range(args.processes)]
        codes = [child.wait() for child in children]
        summarize([args.output])
        if any(codes):
            sys.exit(f"worker exit codes: {codes}")


if __name__ == "__main__":
    main()
