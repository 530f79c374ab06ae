"""Stage 1's maps averaged over several training runs, behind one refinement stage: is the average of runs a better
prior than each run alone? Stage 1's runs spread widely (docs/experiments.md, note 16), and averaging maps removes part
of that spread, at one more stage-1 pass an image for each run averaged.

    python studies/stage1_ensemble.py --train-manifest runs/hc18_train.csv --manifest runs/hc18_val.csv \
        --refinement fetalpipe/assets/model.pt \
        --stage1 row4=fetalpipe/assets/model.pt r22=runs/r22_stage1/model.pt r23=runs/r23_stage1/model.pt \
        --results studies/results/stage1_ensemble.json

Each STAGE1 file is run alone, and all of them averaged, each behind REFINEMENT's refinement stage, in fp32, in-process,
on the images as `fetalpipe infer` decodes them (without its second measurement of flagged tilted or dark frames). For
each, a size line is fitted on the training manifest's measurement and applied to the manifest's, as `calibrate` does.
Prints HC MAE, bias and images above 5 mm, and writes them to --results."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from bench_record import provenance  # noqa: E402
from fetalpipe.data.manifest import landmarks_original_px, load_manifest  # noqa: E402
from fetalpipe.measure.biometry import biometry_mm  # noqa: E402
from fetalpipe.measure.calibration import SizeCalibration  # noqa: E402
from fetalpipe.pipeline.evaluate import per_image_errors  # noqa: E402
from fetalpipe.pipeline.infer import LandmarkPredictor, load_inference_model  # noqa: E402
from fetalpipe.pipeline.preprocess import decode_batch, transforms_of  # noqa: E402

BATCH = 16


class MeanOfNetworks(torch.nn.Module):
    """Stage 1 as the mean of several networks' maps, put where `LandmarkPredictor.model` is."""

    def __init__(self, networks: list[torch.nn.Module]):
        super().__init__()
        self.networks = torch.nn.ModuleList(networks)

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack([network(tensor) for network in self.networks]).mean(dim=0)


def decoded_batches(table: pd.DataFrame, input_size: int) -> list[dict]:
    batches = []
    for start in range(0, len(table), BATCH):
        part = table.iloc[start:start + BATCH]
        batch = decode_batch({"image_path": part["image_path"].to_numpy(dtype=object), "pixel_spacing_mm": part["pixel_spacing_mm"].to_numpy()},
                             input_size, keep_original=True)
        if (batch["status"] != "ok").any():
            raise RuntimeError(f"images that do not decode: {list(batch['image_path'][batch['status'] != 'ok'])}")
        batches.append(batch)
    return batches


def measure(predictor: LandmarkPredictor, batches: list[dict]) -> np.ndarray:
    """[N, 4, 2] endpoints in original pixels, both stages, no size line."""
    points = []
    for batch in batches:
        transforms = transforms_of(batch, predictor.codec.input_size)
        points.append(predictor.measure(batch["image"], transforms, batch["original_pixels"], batch["scan_candidate"], batch["pixel_spacing_mm"])[0])
    return np.concatenate(points)


def scored(points_px: np.ndarray, table: pd.DataFrame, calibration: SizeCalibration) -> dict:
    calibrated, _ = calibration.apply(points_px.copy(), table["pixel_spacing_mm"].to_numpy())
    errors = per_image_errors(calibrated, landmarks_original_px(table), table["pixel_spacing_mm"].to_numpy(), table["hc_mm"].to_numpy())
    hc_error_mm = errors["hc_ellipse_diff_mm"]
    return {"hc_mae_mm": float(hc_error_mm.abs().mean()), "hc_bias_mm": float(hc_error_mm.mean()), "hc_median_abs_mm": float(hc_error_mm.abs().median()),
            "bpd_mae_mm": float(errors["bpd_diff_mm"].abs().mean()), "ofd_mae_mm": float(errors["ofd_diff_mm"].abs().mean()),
            "images_over_5mm": int((hc_error_mm.abs() > 5).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-manifest", required=True, help="the size line is fitted on these images' measurement")
    parser.add_argument("--manifest", required=True, help="the images scored (validation)")
    parser.add_argument("--refinement", required=True, help="a two-stage model file: its refinement stage is used")
    parser.add_argument("--stage1", nargs="+", required=True, help="NAME=MODEL_FILE, each a file whose stage 1 is used")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", help="write the table here (JSON)")
    args = parser.parse_args()

    predictor = LandmarkPredictor(args.refinement, threads=args.threads, precision="fp32")
    predictor.calibration = None  # a size line is fitted here, per stage 1
    networks = {}
    for item in args.stage1:
        name, path = item.split("=", 1)
        network, config, _ = load_inference_model(path, "fp32")
        if config.codec() != predictor.codec:
            raise ValueError(f"{path}: its stage 1 decodes another map than {args.refinement}'s")
        networks[name] = network
    tables = {split: load_manifest(path, require_landmarks=True) for split, path in (("train", args.train_manifest), ("scored", args.manifest))}
    batches = {split: decoded_batches(table, predictor.codec.input_size) for split, table in tables.items()}

    rows = []
    for name, members in [*((name, [name]) for name in networks), ("average of " + ", ".join(networks), list(networks))]:
        predictor.model = MeanOfNetworks([networks[member] for member in members])
        points = {split: measure(predictor, split_batches) for split, split_batches in batches.items()}
        train = tables["train"]
        calibration = SizeCalibration.fit(biometry_mm(points["train"], train["pixel_spacing_mm"].to_numpy())["hc_ellipse_mm"], train["hc_mm"].to_numpy())
        row = {"stage1": name, "runs": len(members), **scored(points["scored"], tables["scored"], calibration),
               "train_hc_mae_mm": scored(points["train"], train, calibration)["hc_mae_mm"]}
        rows.append(row)
        print(f"{name}: HC MAE {row['hc_mae_mm']:.3f} mm (bias {row['hc_bias_mm']:+.2f}), {row['images_over_5mm']} above 5 mm; "
              f"training split {row['train_hc_mae_mm']:.3f}", flush=True)
    print(pd.DataFrame(rows).round(3).to_string(index=False))
    if args.results:
        with open(args.results, "w") as handle:
            json.dump({**provenance(), "refinement": args.refinement, "stage1": dict(item.split("=", 1) for item in args.stage1),
                       "train_manifest": args.train_manifest, "manifest": args.manifest, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
