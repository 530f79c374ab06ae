"""More images for stage 1 without more annotation: the two stages' own measurements of unlabelled scans as labels.

Stage 1 learns from the labelled images alone, and it is the stage that wants more of them (`studies/learning_curve.py
--both-stages`). The two stages measure better than stage 1 does alone (1.84 against 2.13 mm on validation), so their
ellipses on the HC18 test set's 335 unlabelled scans can teach stage 1 (a student trained on its teacher's output).
Flagged measurements are left out. This script writes the labelled manifest plus those rows, each with a subject id
that the split by subject puts in the training split, so validation stays the same 135 images:

    python -c "import os, pandas as pd; s = pd.read_csv('../shared/data/hc18/test_set_pixel_size.csv'); \
        pd.DataFrame({'image_path': [os.path.abspath('../shared/data/hc18/test_set/' + name) for name in s.iloc[:, 0]], \
                      'pixel_spacing_mm': s.iloc[:, 1]}).to_csv('runs/hc18_test.csv', index=False)"
    fetalpipe infer --manifest runs/hc18_test.csv --output runs/test_pred
    python studies/pseudo_labels.py manifest --manifest runs/hc18.csv --predictions runs/test_pred --output runs/hc18_plus_pseudo.csv
    fetalpipe train --manifest runs/hc18_plus_pseudo.csv --output runs/pseudo --config ellipse_refine --no-calibrate
    python studies/pseudo_labels.py combine --stage1 runs/pseudo/model.pt --refinement fetalpipe/assets/model.pt --output runs/pseudo_r1/model.pt
    fetalpipe calibrate --model runs/pseudo_r1/model.pt --manifest runs/hc18.csv --output runs/pseudo_r1/model_calibrated.pt

(`train` copies the refinement stage's finished checkpoints where `runs/pseudo/refinement/` holds them, as in
`docs/experiments.md` R4; `combine` instead puts the shipped refinement stage behind the new stage 1.) Calibrate on the
labelled manifest alone, so that the size line and the review rule are fitted on real annotations only; then
`fetalpipe infer` + `fetalpipe evaluate` on validation.
"""
from __future__ import annotations

import argparse
import os

import pandas as pd

from fetalpipe import LANDMARK_COLUMNS
from fetalpipe.data.manifest import load_manifest
from fetalpipe.model.config import resolve_config
from fetalpipe.pipeline.predictions import read_predictions
from fetalpipe.pipeline.train import is_validation_subject


def training_subject_id(stem: str, val_fraction: float) -> str:
    """`unlabelled-STEM`, with a counter added until the split's hash puts it in the training split."""
    subject_id, counter = f"unlabelled-{stem}", 0
    while is_validation_subject(subject_id, val_fraction):
        counter += 1
        subject_id = f"unlabelled-{stem}-{counter}"
    return subject_id


def pseudo_labelled_rows(predictions: pd.DataFrame, val_fraction: float, keep_flagged: bool = False) -> pd.DataFrame:
    """Manifest rows (landmarks in original pixels, `hc_mm` = the measured ellipse's HC) for every measured, unflagged row."""
    kept = predictions[(predictions["status"] == "ok") & (keep_flagged | ~predictions["needs_review"].astype(bool))]
    stems = kept["image_path"].map(lambda path: os.path.splitext(os.path.basename(path))[0])
    return pd.DataFrame({
        "image_path": kept["image_path"].to_numpy(),
        "subject_id": [training_subject_id(stem, val_fraction) for stem in stems],
        "pixel_spacing_mm": kept["pixel_spacing_mm"].to_numpy(),
        **{column: kept[column].to_numpy() for column in LANDMARK_COLUMNS},
        "hc_mm": kept["hc_ellipse_mm"].to_numpy(),
    })


def combine(stage1_model: str, refinement_model: str, output: str) -> None:
    """A model file with STAGE1_MODEL's stage 1 and REFINEMENT_MODEL's refinement stage, uncalibrated. STAGE1_MODEL was
    trained with the same refinement settings (`ellipse_refine`), or as stage 1 alone: then it takes REFINEMENT_MODEL's."""
    import dataclasses

    from fetalpipe.model.model_file import load_model, refinement_entries, save_model

    _, config, payload = load_model(stage1_model)
    _, refinement_config, refinement_payload = load_model(refinement_model)
    if config.refinement is None:
        config = dataclasses.replace(config, refinement=refinement_config.refinement)
    if config.refinement != refinement_config.refinement:
        raise ValueError(f"{refinement_model}: its refinement stage's settings differ from {stage1_model}'s")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    save_model(output, payload["state_dict"], config, metrics=payload.get("metrics"),
               training={**payload.get("training", {}), "refinement_from": refinement_model},
               **refinement_entries(refinement_payload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    manifest_parser = commands.add_parser("manifest", help="the labelled manifest plus pseudo-labelled rows")
    manifest_parser.add_argument("--manifest", required=True, help="the labelled manifest (e.g. runs/hc18.csv)")
    manifest_parser.add_argument("--predictions", required=True, help="a `fetalpipe infer` output folder on unlabelled images")
    manifest_parser.add_argument("--output", required=True, help="the labelled rows plus the pseudo-labelled ones")
    manifest_parser.add_argument("--keep-flagged", action="store_true", help="keep measurements the review rule flags too")
    combine_parser = commands.add_parser("combine", help="one model's stage 1 behind another's refinement stage")
    combine_parser.add_argument("--stage1", required=True)
    combine_parser.add_argument("--refinement", required=True)
    combine_parser.add_argument("--output", required=True)
    args = parser.parse_args()

    if args.command == "combine":
        combine(args.stage1, args.refinement, args.output)
        print(f"{args.stage1}'s stage 1 + {args.refinement}'s refinement stage -> {args.output} (uncalibrated)")
        return
    labelled = load_manifest(args.manifest, require_landmarks=True)  # image paths made absolute
    pseudo = pseudo_labelled_rows(read_predictions(args.predictions), resolve_config("ellipse_refine").val_fraction, args.keep_flagged)
    pd.concat([labelled, pseudo], ignore_index=True).to_csv(args.output, index=False)
    print(f"{len(labelled)} labelled rows + {len(pseudo)} pseudo-labelled rows -> {args.output}")


if __name__ == "__main__":
    main()
