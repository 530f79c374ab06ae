"""The head ellipse as five numbers, and the conversions both stages share.

An ellipse is a float64 array [..., 5]: (centre_x, centre_y, semi_major, semi_minor, angle_rad), in original
pixels, with `angle_rad` the direction of the major axis from +x (y down). The OFD endpoints are the major axis's
ends and the BPD endpoints the minor axis's, which is how HC18's references and both stages' outputs are built."""

from __future__ import annotations

import numpy as np

from fetalpipe.measure.biometry import canonical_order

CENTRE_X, CENTRE_Y, SEMI_MAJOR, SEMI_MINOR, ANGLE = range(5)


def from_endpoints(points_px: np.ndarray) -> np.ndarray:
    """[..., 4, 2] (ofd1, ofd2, bpd1, bpd2) -> [..., 5]. OFD and BPD are taken as conjugate semi-diameters (exact
    for perpendicular ones, and still the right ellipse when a manifest's diameters are not quite perpendicular)."""
    points = np.asarray(points_px, dtype=np.float64)
    centre = points.mean(axis=-2)
    half_ofd = (points[..., 1, :] - points[..., 0, :]) / 2
    half_bpd = (points[..., 3, :] - points[..., 2, :]) / 2
    matrix = np.stack([half_ofd, half_bpd], axis=-1)  # columns: the two semi-diameters
    axes, singular, _ = np.linalg.svd(matrix)
    angle = np.arctan2(axes[..., 1, 0], axes[..., 0, 0])
    return np.stack([centre[..., 0], centre[..., 1], singular[..., 0], singular[..., 1], angle], axis=-1)


def to_endpoints(ellipses: np.ndarray) -> np.ndarray:
    """[..., 5] -> [..., 4, 2] endpoints in `biometry.canonical_order` (OFD = major axis, BPD = minor axis)."""
    ellipses = np.asarray(ellipses, dtype=np.float64)
    centre = ellipses[..., :2]
    major_dir = np.stack([np.cos(ellipses[..., ANGLE]), np.sin(ellipses[..., ANGLE])], axis=-1)
    minor_dir = np.stack([-major_dir[..., 1], major_dir[..., 0]], axis=-1)
    half_major = major_dir * ellipses[..., SEMI_MAJOR, None]
    half_minor = minor_dir * ellipses[..., SEMI_MINOR, None]
    return canonical_order(np.stack([centre - half_major, centre + half_major, centre - half_minor, centre + half_minor], axis=-2))


def frame_matrix(ellipse: np.ndarray) -> np.ndarray:
    """2x2 matrix taking the unit circle to the ellipse (rotation × diag(semi-axes)), about its centre."""
    cos, sin = np.cos(ellipse[ANGLE]), np.sin(ellipse[ANGLE])
    return np.array([[cos, -sin], [sin, cos]]) @ np.diag([ellipse[SEMI_MAJOR], ellipse[SEMI_MINOR]])


def outline(ellipse: np.ndarray, samples: int = 360) -> np.ndarray:
    """[samples, 2] points on the ellipse, original pixels."""
    t = np.linspace(0, 2 * np.pi, samples, endpoint=False)
    return ellipse[:2] + np.stack([np.cos(t), np.sin(t)], axis=1) @ frame_matrix(ellipse).T


def ray_intersections(origin_px: np.ndarray, directions_px: np.ndarray, ellipse: np.ndarray) -> np.ndarray:
    """Distance s > 0 along each ray origin + s·direction to where it leaves `ellipse` (NaN when the origin is outside
    and the ray misses). directions [N, 2]; returns [N] in units of the direction vectors."""
    inverse = np.linalg.inv(frame_matrix(ellipse))
    start = inverse @ (np.asarray(origin_px, dtype=np.float64) - ellipse[:2])  # origin in unit-circle coordinates
    step = np.asarray(directions_px, dtype=np.float64) @ inverse.T
    # |start + s·step|² = 1
    a = (step**2).sum(axis=1)
    b = step @ start
    c = start @ start - 1.0
    discriminant = b**2 - a * c
    with np.errstate(invalid="ignore"):
        root = (-b + np.sqrt(discriminant)) / a
    return np.where((discriminant >= 0) & (root > 0), root, np.nan)


def fit(points_px: np.ndarray) -> np.ndarray:
    """Least-squares ellipse through [N >= 5, 2] outline points (OpenCV's fitEllipse), as [5] with semi-major first."""
    import cv2

    (centre_x, centre_y), (axis_a, axis_b), angle_deg = cv2.fitEllipse(np.asarray(points_px, dtype=np.float32))
    angle = np.deg2rad(angle_deg)
    if axis_a < axis_b:
        axis_a, axis_b, angle = axis_b, axis_a, angle + np.pi / 2
    angle = (angle + np.pi / 2) % np.pi - np.pi / 2  # an axis is a direction up to sign
    return np.array([centre_x, centre_y, axis_a / 2, axis_b / 2, angle])


def radial_residuals_px(points_px: np.ndarray, ellipse: np.ndarray) -> np.ndarray:
    """Signed distance, along the ray from the centre, from the ellipse to each point (positive outside), in pixels."""
    offsets = np.asarray(points_px, dtype=np.float64) - ellipse[:2]
    radius_px = np.linalg.norm(offsets, axis=1)
    normalised = np.linalg.norm(offsets @ np.linalg.inv(frame_matrix(ellipse)).T, axis=1)  # 1 on the ellipse
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(normalised > 0, radius_px - radius_px / normalised, 0.0)


def perimeter(ellipses: np.ndarray) -> np.ndarray:
    from fetalpipe.measure.biometry import ramanujan_perimeter

    ellipses = np.asarray(ellipses, dtype=np.float64)
    return ramanujan_perimeter(ellipses[..., SEMI_MAJOR], ellipses[..., SEMI_MINOR])
