"""HC18 challenge importer: ellipse annotations -> OFD/BPD endpoint landmarks + spacing + reference HC.

The annotation PNG is a filled ellipse whose edge lies about 1 px outside the ellipse the published
HC was computed from. We fit an ellipse to the mask's outer contour (cv2.fitEllipse) and shrink both
semi-axes by `ANNOTATION_EDGE_OFFSET_PX`; the major axis gives OFD, the minor axis BPD.
"""

from __future__ import annotations

import math
import os
import re

import cv2
import numpy as np
import pandas as pd

from fetalpipe.measure.biometry import canonical_order, ramanujan_perimeter

ANNOTATION_EDGE_OFFSET_PX = 1.0
SPACING_CSV = "training_set_pixel_size_and_HC.csv"


def fit_annotation_ellipse(mask: np.ndarray) -> tuple[float, float, float, float, float]:
    """(centre_x, centre_y, semi_major, semi_minor, major_angle_rad) in original pixels."""
    binary = (mask > 127).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        raise ValueError("annotation mask is empty")
    contour = max(contours, key=len)
    if len(contour) < 5:
        raise ValueError("annotation contour too small to fit an ellipse")
    (centre_x, centre_y), (width, height), angle_deg = cv2.fitEllipse(contour)
    # cv2 returns full axes; `width` lies along angle_deg.
    if width >= height:
        semi_major, semi_minor, major_angle = width / 2, height / 2, math.radians(angle_deg)
    else:
        semi_major, semi_minor, major_angle = height / 2, width / 2, math.radians(angle_deg + 90)
    return (
        centre_x,
        centre_y,
        semi_major - ANNOTATION_EDGE_OFFSET_PX,
        semi_minor - ANNOTATION_EDGE_OFFSET_PX,
        major_angle,
    )


def ellipse_endpoints(centre_x, centre_y, semi_major, semi_minor, major_angle) -> np.ndarray:
    """[4, 2] ofd1, ofd2 (major axis), bpd1, bpd2 (minor axis) in canonical order."""
    major = np.array([math.cos(major_angle), math.sin(major_angle)])
    minor = np.array([-major[1], major[0]])
    centre = np.array([centre_x, centre_y])
    points = np.stack([centre - semi_major * major, centre + semi_major * major, centre - semi_minor * minor, centre + semi_minor * minor])
    return canonical_order(points)


def import_hc18(hc18_dir: str) -> pd.DataFrame:
    """Build a training manifest from the challenge layout (image paths relative to `hc18_dir`)."""
    table = pd.read_csv(os.path.join(hc18_dir, SPACING_CSV))
    table.columns = ["filename", "pixel_spacing_mm", "hc_mm"]
    rows = []
    for row_number, (filename, pixel_spacing_mm, hc_mm) in enumerate(table.itertuples(index=False), start=1):
        annotation_path = os.path.join(hc18_dir, "training_set", filename.replace(".png", "_Annotation.png"))
        where = f"{SPACING_CSV} row {row_number} ({filename})"
        mask = cv2.imread(annotation_path, cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise ValueError(f"{where}: missing or unreadable annotation {annotation_path}")
        try:
            points = ellipse_endpoints(*fit_annotation_ellipse(mask))
        except ValueError as error:
            raise ValueError(f"{where}: {error} in {annotation_path}") from None
        rows.append(
            {
                "image_path": f"training_set/{filename}",
                "subject_id": re.match(r"(\d+)", filename).group(1),
                "pixel_spacing_mm": float(pixel_spacing_mm),
                **{f"{name}_{axis}": float(points[index, coord]) for index, name in enumerate(("ofd1", "ofd2", "bpd1", "bpd2")) for coord, axis in enumerate("xy")},
                "hc_mm": float(hc_mm),
            }
        )
    return pd.DataFrame(rows)


def hc_reproduction_error_mm(manifest: pd.DataFrame) -> np.ndarray:
    """Per-image |Ramanujan HC from written endpoints - published HC| in mm (the importer's check)."""
    from fetalpipe.data.manifest import landmarks_original_px

    points = landmarks_original_px(manifest)
    semi_major = np.linalg.norm(points[:, 0] - points[:, 1], axis=-1) / 2
    semi_minor = np.linalg.norm(points[:, 2] - points[:, 3], axis=-1) / 2
    return np.abs(ramanujan_perimeter(semi_major, semi_minor) * manifest["pixel_spacing_mm"].to_numpy() - manifest["hc_mm"].to_numpy())
