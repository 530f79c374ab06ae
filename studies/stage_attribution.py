"""Stage attribution: which stage a variant's extra HC error comes from, stage 1's prior or the refinement stage.

    python studies/stage_attribution.py --manifest runs/hc18_val.csv --variants bright dark speckle

For a variant that keeps the image's geometry (gain, gamma, noise, JPEG), every validation image is measured four ways
with the same model file, in int8 as `fetalpipe infer` runs it, size line applied:
  * clean: the clean image behind its own stage-1 prior (what `fetalpipe infer` gives);
  * variant: the variant behind its own prior;
  * variant image, clean prior: the refinement stage's own share of the excess;
  * clean image, variant prior: the share that stage 1's worse prior leaves after the refinement stage.
And the clean images behind priors that are not stage 1's: the reference ellipse itself (a perfect stage 1), and the
reference jittered as the refinement stage's training jitters it, at half and at full size (`polar.jitter`; its in-loop
validation figure is the latter), so that a clean figure can be read against what a better stage 1 would leave.
In-process (no Ray): one predictor, the variant images built in memory by `robustness.make_variant`. Prints a table and
writes studies/results/stage_attribution.json (or --results)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fetalpipe import __version__  # noqa: E402
from robustness import make_variant  # noqa: E402

SAME_GEOMETRY_VARIANTS = ("bright", "dark", "speckle", "jpeg30")
BATCH = 32


def stage_outputs(predictor, table: pd.DataFrame, images_uint8: list[np.ndarray], darkest_content_median: float | None = None):
    """(stage-1 prior ellipses [N, 5], original images float32 [H, W]) in original pixels, for images given in memory;
    dark scans brightened as `imaging.clamp_brightness` does (at its threshold, or at DARKEST_CONTENT_MEDIAN)."""
    from fetalpipe.data.imaging import TRAINING_DARKEST_CONTENT_MEDIAN, clamp_brightness
    from fetalpipe.measure import ellipse as ellipse_geometry
    from fetalpipe.pipeline.preprocess import stage1_input

    threshold = TRAINING_DARKEST_CONTENT_MEDIAN if darkest_content_median is None else darkest_content_median
    priors, originals = [], []
    for start in range(0, len(table), BATCH):
        pixels = [clamp_brightness(image.astype(np.float32) / 255, threshold) for image in images_uint8[start:start + BATCH]]
        images, transforms, candidates = zip(*(stage1_input(image, predictor.codec.input_size) for image in pixels))
        points_original, _ = predictor.locate(np.stack(images), list(transforms), pixels, np.array(candidates))
        priors.append(ellipse_geometry.from_endpoints(points_original))
        originals += pixels
    return np.concatenate(priors), originals


def load_labelled_images(manifest_path: str, model_path: str | None, threads: int):
    """(model path, the model's int8 predictor, the manifest's labelled rows, their images as uint8 [H, W])."""
    import cv2

    from fetalpipe.data.manifest import load_manifest
    from fetalpipe.model.model_file import DEFAULT_MODEL_PATH
    from fetalpipe.pipeline.infer import LandmarkPredictor

    model_path = os.path.abspath(model_path or DEFAULT_MODEL_PATH)
    predictor = LandmarkPredictor(model_path, threads=threads, precision="int8")
    table = load_manifest(manifest_path, require_landmarks=True).reset_index(drop=True)
    return model_path, predictor, table, [cv2.imread(path, cv2.IMREAD_GRAYSCALE) for path in table["image_path"]]


def variant_images(name: str, clean_images: list[np.ndarray], table: pd.DataFrame) -> tuple[list[np.ndarray], np.ndarray]:
    """(the variant NAME of each image, in memory, its pixel spacing in mm [N]), with its noise drawn as
    `robustness.build_variant` draws it (the JPEG variant is the clean image written at quality 30 and read back). The
    spacing changes only for the half- and double-resolution variants."""
    import cv2

    from fetalpipe.data.manifest import landmarks_original_px

    rng = np.random.default_rng(0)
    images, spacing_mm = [], []
    for image, points, pixel_spacing_mm in zip(clean_images, landmarks_original_px(table), table["pixel_spacing_mm"]):
        variant, _, variant_spacing_mm, extension = make_variant(name, image, points, float(pixel_spacing_mm), rng)
        if extension == ".jpg":
            variant = cv2.imdecode(cv2.imencode(".jpg", variant, [cv2.IMWRITE_JPEG_QUALITY, 30])[1], cv2.IMREAD_GRAYSCALE)
        images.append(variant)
        spacing_mm.append(variant_spacing_mm)
    return images, np.array(spacing_mm, dtype=np.float64)


def measured_hc_mm(predictor, originals: list[np.ndarray], priors: np.ndarray, pixel_spacing_mm: np.ndarray) -> np.ndarray:
    """HC (mm) of the refinement stage behind the given priors, size line applied, as `LandmarkPredictor` measures it."""
    from fetalpipe.measure import ellipse as ellipse_geometry

    points = ellipse_geometry.to_endpoints(priors)
    refined = np.concatenate([predictor.refine(originals[start:start + BATCH], points[start:start + BATCH])[0] for start in range(0, len(priors), BATCH)])
    calibrated, _ = predictor.calibration.apply(refined, pixel_spacing_mm)
    return ellipse_geometry.perimeter(ellipse_geometry.from_endpoints(calibrated)) * pixel_spacing_mm


def reference_priors(table: pd.DataFrame, seed: int = 0) -> dict[str, np.ndarray]:
    """[N, 5] priors in original pixels that are not stage 1's: the reference ellipse, and the reference jittered at
    half and at full the refinement stage's training jitter (one draw per image, seeded)."""
    from fetalpipe.data.manifest import landmarks_original_px
    from fetalpipe.measure import ellipse as ellipse_geometry
    from fetalpipe.model.polar import jitter

    reference = ellipse_geometry.from_endpoints(landmarks_original_px(table))
    rng = np.random.default_rng(seed)
    return {
        "reference_ellipse": reference,
        "reference_jittered_x0.5": np.stack([jitter(ellipse, rng, 0.5) for ellipse in reference]),
        "reference_jittered_x1": np.stack([jitter(ellipse, rng, 1.0) for ellipse in reference]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="the validation manifest (e.g. runs/hc18_val.csv)")
    parser.add_argument("--model", help="model file (default: the shipped model)")
    parser.add_argument("--variants", nargs="*", default=list(SAME_GEOMETRY_VARIANTS), choices=SAME_GEOMETRY_VARIANTS)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "stage_attribution.json"))
    args = parser.parse_args()

    from fetalpipe.model.model_file import file_sha256

    model_path, predictor, table, clean_images = load_labelled_images(args.manifest, args.model, args.threads)
    spacing = table["pixel_spacing_mm"].to_numpy(dtype=np.float64)
    reference_hc = table["hc_mm"].to_numpy(dtype=np.float64)
    clean_priors, clean_originals = stage_outputs(predictor, table, clean_images)

    def errors(hc_mm: np.ndarray) -> dict:
        difference = hc_mm - reference_hc
        return {"hc_mae_mm": float(np.nanmean(np.abs(difference))), "hc_mean_diff_mm": float(np.nanmean(difference))}

    results = {"clean": errors(measured_hc_mm(predictor, clean_originals, clean_priors, spacing))}
    results["clean_behind_other_priors"] = {
        name: errors(measured_hc_mm(predictor, clean_originals, priors, spacing)) for name, priors in reference_priors(table).items()}
    for name in args.variants:
        variant_priors, variant_originals = stage_outputs(predictor, table, variant_images(name, clean_images, table)[0])
        results[name] = {
            "variant": errors(measured_hc_mm(predictor, variant_originals, variant_priors, spacing)),
            "variant_image_clean_prior": errors(measured_hc_mm(predictor, variant_originals, clean_priors, spacing)),
            "clean_image_variant_prior": errors(measured_hc_mm(predictor, clean_originals, variant_priors, spacing)),
        }
    clean = results["clean"]["hc_mae_mm"]
    print(f"clean: HC MAE {clean:.2f} mm (bias {results['clean']['hc_mean_diff_mm']:+.2f})")
    for name, figures in results["clean_behind_other_priors"].items():
        print(f"  behind the {name.replace('_', ' ')}: {figures['hc_mae_mm']:.2f} ({figures['hc_mean_diff_mm']:+.2f}), "
              f"{figures['hc_mae_mm'] - clean:+.2f} against stage 1's prior")
    print("\n| variant | variant: HC MAE (bias), mm | its image behind the clean prior | the clean image behind its prior |")
    print("|---|---|---|---|")
    for name in args.variants:
        cells = [f"{results[name][key]['hc_mae_mm']:.2f} ({results[name][key]['hc_mean_diff_mm']:+.2f}), "
                 f"{results[name][key]['hc_mae_mm'] - clean:+.2f} over clean"
                 for key in ("variant", "variant_image_clean_prior", "clean_image_variant_prior")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as handle:
        json.dump({"command": " ".join(sys.argv), "model": model_path, "model_sha256": file_sha256(model_path), "fetalpipe": __version__,
                   "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "images": len(table), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
