"""Learning curve: validation accuracy against the number of labelled training images, stage by stage.

For each fraction, the training split is cut to that share of its subjects (the validation subjects all stay, so the
validation split is the same 135 images), and the refinement stage is trained on it behind the shipped stage 1, then
calibrated on the same cut (`fetalpipe train --config ellipse_refine --stage1-model MODEL`: what a user with fewer
labelled images would run), and measured on validation with `fetalpipe infer` + `fetalpipe evaluate`. Stage 1 itself
was trained on the whole training split, so the curve measures the refinement stage's and the calibration's appetite
for data, not stage 1's. With `--both-stages`, stage 1 is trained on the cut as well (`--config ellipse_refine` without
`--stage1-model`; the refinement stage's checkpoints of the same fraction are reused where that run exists, since
stage 2 never sees stage 1 in training).

    python studies/learning_curve.py --manifest runs/hc18.csv --val-manifest runs/hc18_val.csv --fractions 0.25 0.5 0.75 1 \
        --output runs/learning_curve --json studies/results/learning_curve.json
    python studies/learning_curve.py --manifest runs/hc18.csv --val-manifest runs/hc18_val.csv --fractions 0.5 --draws 2 \
        --output runs/learning_curve --json studies/results/learning_curve_half_draws.json
    python studies/learning_curve.py --manifest runs/hc18.csv --val-manifest runs/hc18_val.csv --fractions 0.5 --both-stages --draws 2 \
        --output runs/learning_curve --json studies/results/learning_curve_both_stages.json

A finished fraction is read back, not run again.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys

import pandas as pd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from bench_record import provenance  # noqa: E402  (the machine, Python and commit every result records)
from cli_runs import train_infer_evaluate  # noqa: E402  (studies/, the script's own folder)

from fetalpipe.data.manifest import load_manifest
from fetalpipe.model.config import resolve_config
from fetalpipe.model.model_file import read_model_header
from fetalpipe.pipeline.train import is_validation_subject, split_by_subject

SHIPPED_MODEL = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fetalpipe", "assets", "model.pt"))
METRICS = ("hc_ellipse_mae_mm", "hc_ellipse_mean_diff_mm", "bpd_mae_mm", "ofd_mae_mm", "mre_mm", "sdr_2mm",
           "hc_ellipse_images_over_5mm", "flagged_fraction", "flagged_of_images_over_5mm")


def kept_training_subject(subject_id: str, fraction: float) -> bool:
    """A stable hash of its own (salted, so it is independent of the validation split's): nested cuts, 0.25 ⊂ 0.5."""
    digest = int(hashlib.sha256(f"learning-curve:{subject_id}".encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < fraction


def cut_manifest(table: pd.DataFrame, fraction: float, val_fraction: float) -> pd.DataFrame:
    """Every validation row, and the training rows of `fraction` of the training subjects."""
    subjects = table["subject_id"].astype(str)
    is_val = subjects.map(lambda subject: is_validation_subject(subject, val_fraction))
    kept = subjects.map(lambda subject: kept_training_subject(subject, fraction))
    return table[is_val | kept].reset_index(drop=True)


def run_fraction(table: pd.DataFrame, fraction: float, stage1_model: str | None, val_manifest: str, output: str, val_fraction: float,
                 draw: int = 1) -> dict:
    """Train (stage 2 behind STAGE1_MODEL, or both stages where it is None) on the cut, calibrate, infer and evaluate.
    `draw` > 1: another training run of the same cut (no seed is fixed), in a folder of its own."""
    run_dir = os.path.join(output, (f"fraction_{fraction:g}" if stage1_model else f"both_stages_fraction_{fraction:g}") + (f"_draw{draw}" if draw > 1 else ""))
    metrics_path = os.path.join(run_dir, "val", "report", "metrics.json")
    cut = cut_manifest(table, fraction, val_fraction)
    training_rows = len(split_by_subject(cut, val_fraction)[0])
    if not os.path.exists(metrics_path):
        os.makedirs(run_dir, exist_ok=True)
        manifest = os.path.join(run_dir, "manifest.csv")
        cut.to_csv(manifest, index=False)
        trained_refinement = os.path.join(output, f"fraction_{fraction:g}", "refinement")
        if stage1_model is None and os.path.isdir(trained_refinement) and not os.path.exists(os.path.join(run_dir, "refinement")):
            shutil.copytree(trained_refinement, os.path.join(run_dir, "refinement"))
        stage1 = ["--stage1-model", stage1_model] if stage1_model else []
        train_infer_evaluate(run_dir, manifest, val_manifest, ["--config", "ellipse_refine", *stage1])
    with open(metrics_path) as handle:
        metrics = json.load(handle)
    with open(os.path.join(run_dir, "run.json")) as handle:
        wall_seconds = json.load(handle)["wall_seconds"]
    trained = read_model_header(os.path.join(run_dir, "model.pt"))["metrics"]  # the best epochs' in-loop validation, both stages
    row = {"fraction": fraction, "draw": draw, "stage1": stage1_model or "trained on the cut", "training_images": training_rows, "train_and_calibrate_wall_s": wall_seconds,
           "stage1_alone_val_hc_mae_mm": trained["val_hc_mae_mm"], "refinement_in_loop_val_hc_mae_mm": trained["refinement_val_hc_mae_mm"],
           **{key: metrics[key] for key in METRICS}}
    print(f"fraction {fraction:g} ({training_rows} training images): HC MAE {metrics['hc_ellipse_mae_mm']:.3f} mm", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="the labelled manifest (e.g. runs/hc18.csv)")
    parser.add_argument("--val-manifest", required=True, help="its validation rows (e.g. runs/hc18_val.csv)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--stage1-model", default=SHIPPED_MODEL, help="stage 1 from this file (default: the shipped model)")
    parser.add_argument("--both-stages", action="store_true", help="train stage 1 on the cut too (30 epochs of ellipse_refine's stage 1)")
    parser.add_argument("--draws", type=int, default=1, help="training runs per fraction (each a new draw)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--json", help="write the rows here, with the commit and the machine")
    args = parser.parse_args()

    table = load_manifest(args.manifest, require_landmarks=True)
    val_fraction = resolve_config("ellipse_refine").val_fraction
    stage1_model = None if args.both_stages else args.stage1_model
    rows = [run_fraction(table, fraction, stage1_model, args.val_manifest, args.output, val_fraction, draw)
            for fraction in args.fractions for draw in range(1, args.draws + 1)]
    print(pd.DataFrame(rows).round(3).to_string(index=False))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({**provenance(), "runs": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
