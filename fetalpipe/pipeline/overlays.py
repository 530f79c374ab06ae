"""Overlay PNGs: the measurement drawn on the original image, for a human to check at a glance."""

from __future__ import annotations

import hashlib
import math
import os

import cv2
import numpy as np

from fetalpipe.data.imaging import read_image

OFD_COLOR_BGR = (255, 0, 0)  # blue, as in the seed's Figure 2
BPD_COLOR_BGR = (0, 200, 0)  # green
ELLIPSE_COLOR_BGR = (0, 215, 255)


def overlay_filename(image_path: str) -> str:
    """Unique per input path (two folders may both hold 001_HC.png)."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    return f"{stem}-{hashlib.sha1(image_path.encode()).hexdigest()[:8]}.png"


def draw_overlay(row: dict, overlay_dir: str) -> str:
    """Write `render_overlay(row)` to OVERLAY_DIR/`overlay_filename`; returns its path."""
    from fetalpipe.runtime import storage

    ok, encoded = cv2.imencode(".png", render_overlay(row))
    if not ok:
        raise ValueError("PNG encoding failed")
    path = storage.join(overlay_dir, overlay_filename(str(row["image_path"])))
    storage.write_bytes(path, encoded.tobytes())
    return path


def render_overlay(row: dict) -> np.ndarray:
    """The overlay as a uint8 BGR [H, W, 3] image at the original size. `row` holds image_path, the 8 landmark columns
    (original pixels) and the biometry columns."""
    pixels = read_image(str(row["image_path"])).pixels
    canvas = cv2.cvtColor((pixels * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    points = np.array([[row[f"{name}_x"], row[f"{name}_y"]] for name in ("ofd1", "ofd2", "bpd1", "bpd2")], dtype=np.float64)
    thickness = max(1, round(max(canvas.shape) / 400))
    as_int = [tuple(int(round(v)) for v in point) for point in points]
    cv2.line(canvas, as_int[0], as_int[1], OFD_COLOR_BGR, thickness, cv2.LINE_AA)
    cv2.line(canvas, as_int[2], as_int[3], BPD_COLOR_BGR, thickness, cv2.LINE_AA)
    centre = points.mean(axis=0)
    semi_ofd = np.linalg.norm(points[0] - points[1]) / 2
    semi_bpd = np.linalg.norm(points[2] - points[3]) / 2
    angle_deg = math.degrees(math.atan2(points[1, 1] - points[0, 1], points[1, 0] - points[0, 0]))
    cv2.ellipse(canvas, (int(round(centre[0])), int(round(centre[1]))), (int(round(semi_ofd)), int(round(semi_bpd))), angle_deg, 0, 360, ELLIPSE_COLOR_BGR, thickness, cv2.LINE_AA)
    for point in as_int:
        cv2.circle(canvas, point, thickness + 2, (0, 0, 255), -1)
    unit = "mm" if np.isfinite(row.get("hc_mm", np.nan)) else "px"  # px only when spacing is unknown
    text = f"BPD {row[f'bpd_{unit}']:.1f} {unit}  OFD {row[f'ofd_{unit}']:.1f} {unit}  HC {row[f'hc_ellipse_{unit}']:.1f} {unit}"
    font_scale = max(0.5, canvas.shape[1] / 1200)
    cv2.putText(canvas, text, (10, int(30 * font_scale + 5)), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), thickness, cv2.LINE_AA)
    if bool(row.get("needs_review", False)):  # a flagged measurement says so on its picture, and why
        review_color_bgr = (0, 0, 255)
        cv2.putText(canvas, "NEEDS REVIEW", (10, int(60 * font_scale + 10)), cv2.FONT_HERSHEY_SIMPLEX, font_scale, review_color_bgr, thickness + 1, cv2.LINE_AA)
        for line_index, reason in enumerate(str(row.get("review_reason", "")).split("; ")):
            cv2.putText(canvas, reason, (10, int((90 + 28 * line_index) * font_scale + 15)), cv2.FONT_HERSHEY_SIMPLEX, 0.8 * font_scale,
                        review_color_bgr, thickness, cv2.LINE_AA)
    return canvas
