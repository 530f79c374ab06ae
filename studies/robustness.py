"""Robustness: the validation images as archives hold scans, each variant measured like the clean images.

    python studies/robustness.py --manifest runs/hc18_val.csv --model fetalpipe/assets/model.pt --output runs/robustness

Every variant is built from the validation split, with the landmarks and the pixel spacing moved along with the
image (so the reference HC is unchanged): a scanner screenshot (the image inside a larger frame with text, a
greyscale bar and margins; the frame dark grey, or black like the scan's own margins), rotations by 90°, 180° and 37° (the 90° and 37° frames are portrait or larger), heavier
speckle and noise, brighter and darker gain and gamma, JPEG at quality 30, and half and double resolution.
Each goes through `fetalpipe infer` and `fetalpipe evaluate` in one Ray session. The goal: HC MAE within +0.3 mm of
the clean images, and no head lost. Prints the table and writes studies/results/robustness.json (or --results),
including the review flag's catch on every variant and over all of them (`docs/experiments.md`).

    python studies/robustness.py --summarize studies/results/robustness.json runs/robust_r26.json

prints those totals for results files already written, side by side (comparing models)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import cv2
import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fetalpipe import LANDMARK_COLUMNS, __version__  # noqa: E402
from fetalpipe.data.imaging import read_image  # noqa: E402
from fetalpipe.data.manifest import landmarks_original_px, load_manifest  # noqa: E402

VARIANTS = ("clean", "screenshot", "screenshot_black", "rotate90", "rotate180", "rotate37", "speckle", "bright", "dark", "jpeg30", "half_resolution",
            "double_resolution")


def _affine_points(points_px: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return points_px @ matrix[:, :2].T + matrix[:, 2]


def make_variant(name: str, pixels_uint8: np.ndarray, points_px: np.ndarray, spacing_mm: float, rng: np.random.Generator):
    """(image uint8, points [4, 2] in the new image's original pixels, pixel spacing mm, file extension)."""
    height, width = pixels_uint8.shape
    if name == "clean":
        return pixels_uint8, points_px, spacing_mm, ".png"
    if name in ("screenshot", "screenshot_black"):
        canvas = np.full((height + 260, width + 420), 18 if name == "screenshot" else 0, np.uint8)
        top, left = 130, 260
        canvas[top:top + height, left:left + width] = pixels_uint8
        bar = np.linspace(255, 0, 256).astype(np.uint8)[:, None].repeat(24, axis=1)  # the greyscale bar
        canvas[top + 20:top + 276, 40:64] = bar
        for line, text in enumerate(("HOSPITAL  US-3  C5-1", "FR 32Hz  MI 0.9  TIs 0.2", "Gn 54  DR 66  P Med", "2D  18cm")):
            cv2.putText(canvas, text, (20, 30 + 28 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.7, 230, 1, cv2.LINE_AA)
        cv2.putText(canvas, "HC  ---  BPD ---", (left + width - 200, top + height + 60), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2, cv2.LINE_AA)
        return canvas, points_px + [left, top], spacing_mm, ".png"
    if name == "rotate90":
        return cv2.rotate(pixels_uint8, cv2.ROTATE_90_CLOCKWISE), np.stack([height - 1 - points_px[:, 1], points_px[:, 0]], axis=1), spacing_mm, ".png"
    if name == "rotate180":
        return cv2.rotate(pixels_uint8, cv2.ROTATE_180), np.stack([width - 1 - points_px[:, 0], height - 1 - points_px[:, 1]], axis=1), spacing_mm, ".png"
    if name == "rotate37":
        matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), 37.0, 1.0)
        corners = _affine_points(np.array([[0, 0], [width - 1, 0], [0, height - 1], [width - 1, height - 1]], np.float64), matrix)
        new_width, new_height = int(np.ceil(np.ptp(corners[:, 0]))) + 1, int(np.ceil(np.ptp(corners[:, 1]))) + 1
        matrix[:, 2] -= corners.min(axis=0)
        rotated = cv2.warpAffine(pixels_uint8, matrix, (new_width, new_height), flags=cv2.INTER_LINEAR, borderValue=0)
        return rotated, _affine_points(points_px, matrix), spacing_mm, ".png"
    if name == "speckle":
        image = pixels_uint8.astype(np.float32) / 255
        speckle = cv2.GaussianBlur(rng.normal(1.0, 0.5, image.shape).astype(np.float32), (0, 0), 1.2)
        noisy = image * np.clip(speckle, 0, None) + rng.normal(0, 0.05, image.shape)
        return np.clip(noisy * 255, 0, 255).astype(np.uint8), points_px, spacing_mm, ".png"
    if name in ("bright", "dark"):
        gamma, gain = (0.6, 1.3) if name == "bright" else (1.6, 0.7)
        image = (pixels_uint8.astype(np.float32) / 255) ** gamma * gain
        return np.clip(image * 255, 0, 255).astype(np.uint8), points_px, spacing_mm, ".png"
    if name == "jpeg30":
        return pixels_uint8, points_px, spacing_mm, ".jpg"
    if name in ("half_resolution", "double_resolution"):
        factor = 0.5 if name == "half_resolution" else 2.0
        size = (int(round(width * factor)), int(round(height * factor)))
        resized = cv2.resize(pixels_uint8, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC)
        scale_xy = np.array([size[0] / width, size[1] / height])
        return resized, (points_px + 0.5) * scale_xy - 0.5, spacing_mm / factor, ".png"
    raise ValueError(f"unknown variant {name!r}")


def build_variant(name: str, table: pd.DataFrame, folder: str) -> str:
    """Write the variant's images and manifest under FOLDER/NAME/; returns the manifest path."""
    rng = np.random.default_rng(0)
    variant_dir = os.path.abspath(os.path.join(folder, name))
    os.makedirs(variant_dir, exist_ok=True)
    rows = []
    for row, points in zip(table.itertuples(index=False), landmarks_original_px(table)):
        pixels = np.round(read_image(row.image_path).pixels * 255).astype(np.uint8)
        image, moved, spacing, extension = make_variant(name, pixels, points, float(row.pixel_spacing_mm), rng)
        path = os.path.join(variant_dir, os.path.splitext(os.path.basename(row.image_path))[0] + extension)
        parameters = [cv2.IMWRITE_JPEG_QUALITY, 30] if extension == ".jpg" else []
        assert cv2.imwrite(path, image, parameters)
        rows.append({"image_path": path, "subject_id": row.subject_id, "pixel_spacing_mm": spacing, "hc_mm": row.hc_mm,
                     **dict(zip(LANDMARK_COLUMNS, moved.reshape(8)))})
    manifest = os.path.join(variant_dir, "manifest.csv")
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def frame_errors(output_dir: str, variant: str) -> pd.Series:
    """|HC error| (mm) of each frame of a variant, by file name without extension (each variant holds the same frames
    under the clean one's names, JPEG's with its own extension)."""
    table = pd.read_csv(os.path.join(output_dir, "predictions", variant, "report", "per_image_errors.csv"))
    return table.set_index(table["image_path"].map(lambda path: os.path.splitext(os.path.basename(path))[0]))["hc_ellipse_diff_mm"].abs()


def worst_frame(variant_errors: pd.Series, clean_errors: pd.Series) -> dict:
    """The frame whose |HC error| grows most from its clean measurement to this variant's (`frame_errors` of each), how
    much, and the variant's excess over clean without that frame: whether a variant's excess is one frame or all of them."""
    excess = (variant_errors - clean_errors).dropna()
    frame = str(excess.idxmax())
    return {"frame": frame, "excess_mm": float(excess[frame]), "hc_mae_excess_without_it_mm": float(excess.drop(frame).mean())}


def totals(results: dict[str, dict]) -> dict:
    """All sets together: the mean of the variants' HC MAEs and the sum of their excesses over the clean images, and the
    review flag over every set's images, the clean ones included (as `review_curve.py` pools them): the share flagged,
    the images above 5 mm, and how many of those it flags."""
    variants = {name: result for name, result in results.items() if name != "clean"}
    images = sum(result["images"] for result in results.values())
    large = sum(result["hc_ellipse_images_over_5mm"] for result in results.values())
    # `evaluate` stores None for the share caught where a set has no image above 5 mm: none to catch there.
    caught = sum(round((result.get("flagged_of_images_over_5mm") or 0) * result["hc_ellipse_images_over_5mm"]) for result in results.values())
    clean = results.get("clean", {}).get("hc_ellipse_mae_mm")
    return {"variants": len(variants), "clean_hc_mae_mm": clean,
            "mean_hc_mae_mm": float(np.mean([result["hc_ellipse_mae_mm"] for result in variants.values()])),
            "sum_of_excess_over_clean_mm": None if clean is None else float(sum(result["hc_ellipse_mae_mm"] - clean for result in variants.values())),
            "flagged_fraction": sum(result.get("flagged_fraction", 0) * result["images"] for result in results.values()) / images,
            "images_over_5mm": large, "flagged_of_images_over_5mm": caught}


def print_totals(named_totals: dict[str, dict]) -> None:
    print("\n| results | clean HC MAE (mm) | variants' mean HC MAE (mm) | sum of excesses over clean (mm) | flagged | images > 5 mm, flagged |")
    print("|---|---|---|---|---|---|")
    for name, total in named_totals.items():
        excess = total["sum_of_excess_over_clean_mm"]
        print(f"| {name} | {total['clean_hc_mae_mm']:.2f} | {total['mean_hc_mae_mm']:.2f} | {'—' if excess is None else f'{excess:+.2f}'} | "
              f"{100 * total['flagged_fraction']:.1f} % | {total['images_over_5mm']}, {total['flagged_of_images_over_5mm']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", help="the validation manifest (e.g. runs/hc18_val.csv)")
    parser.add_argument("--model", help="model file (default: the shipped model)")
    parser.add_argument("--output")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "robustness.json"))
    parser.add_argument("--summarize", nargs="+", metavar="RESULTS", help="print the totals of results files already written, and stop")
    args = parser.parse_args()
    if args.summarize:
        named = {}
        for path in args.summarize:
            with open(path) as handle:
                named[path] = totals(json.load(handle)["variants"])
        print_totals(named)
        return
    if not args.manifest or not args.output:
        parser.error("--manifest and --output are required (or --summarize)")

    from fetalpipe.model.model_file import DEFAULT_MODEL_PATH, file_sha256
    from fetalpipe.pipeline.evaluate import evaluate_predictions
    from fetalpipe.pipeline.infer import InferOptions, run_inference

    table = load_manifest(args.manifest, require_landmarks=True)
    model_path = os.path.abspath(args.model or DEFAULT_MODEL_PATH)
    results = {}
    for name in args.variants:
        manifest = build_variant(name, table, os.path.join(args.output, "images"))
        output = os.path.join(args.output, "predictions", name)
        started = time.perf_counter()
        summary = run_inference(InferOptions(output_dir=output, manifest=manifest, model_path=model_path, overwrite=True))
        metrics = evaluate_predictions(output, manifest, os.path.join(output, "report"))
        # `metrics` counts as "images" only the frames measured: the variant's own count of frames and heads found goes last.
        results[name] = {**metrics, "images": summary["rows"], "heads_found": summary["ok"], "seconds": round(time.perf_counter() - started, 1)}
        print(f"{name}: HC MAE {metrics['hc_ellipse_mae_mm']:.3f} mm, {summary['rows'] - summary['ok']} lost", flush=True)
    clean = results.get("clean", {}).get("hc_ellipse_mae_mm")
    if clean is not None:
        clean_errors = frame_errors(args.output, "clean")
        for name in results:
            if name != "clean":
                results[name]["worst_frame"] = worst_frame(frame_errors(args.output, name), clean_errors)
    print("\n| variant | images | heads lost | HC MAE (mm) | vs clean (mm) | images > 5 mm | flagged | of those > 5 mm, flagged "
          "| the frame that worsens most (mm) | vs clean without it (mm) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        delta = f"{result['hc_ellipse_mae_mm'] - clean:+.2f}" if clean is not None else "—"
        caught = result.get("flagged_of_images_over_5mm")
        worst = result.get("worst_frame")
        worst_cells = ("—", "—") if worst is None else (f"{worst['frame']} (+{worst['excess_mm']:.1f})", f"{worst['hc_mae_excess_without_it_mm']:+.2f}")
        print(f"| {name} | {result['images']} | {result['images'] - result['heads_found']} | {result['hc_ellipse_mae_mm']:.2f} | {delta} | "
              f"{result['hc_ellipse_images_over_5mm']} | {100 * result.get('flagged_fraction', 0):.1f} % | "
              f"{'—' if caught is None else f'{100 * caught:.0f} %'} | {worst_cells[0]} | {worst_cells[1]} |")
    total = totals(results)
    print_totals({model_path: total})
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as handle:
        json.dump({"command": " ".join(sys.argv), "model": model_path, "model_sha256": file_sha256(model_path), "fetalpipe": __version__,
                   "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "variants": results, "totals": total}, handle, indent=2, default=float)


if __name__ == "__main__":
    main()
