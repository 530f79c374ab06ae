"""Stage 2's representation: the head's outline in polar pixels around a prior ellipse (encode and decode in one class).

A third coordinate space, beside original and model pixels. *Polar pixels* (row, column) sample the original image
along rays of a prior ellipse (stage 1's at inference, a jittered reference in training): row k is the angle
t_k = 2π (k − wrap_rows) / angles in the ellipse's own frame (t = 0 along the major axis), and column j the radius
s_j, a fraction of the prior ellipse's radius along that ray. So the crop is aligned to the prior's axes and
normalised by its size: a late-pregnancy head and an early one look alike, at any orientation and pixel size.
The first and last `wrap_rows` rows repeat the far end of the circle, so that convolutions see across angle 0.
`PolarCodec.to_original` and `to_polar` are the only code that converts between polar and original pixels.

Each row of the target is a Gaussian over columns at the radius where the ray meets the reference ellipse; the
network predicts one logit per column and the decoder takes a softmax per row, the expected radius near its peak,
and fits the final ellipse to those points in original pixels."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from fetalpipe.measure import ellipse as ellipse_geometry

# Above this many original pixels per radial step the image is first shrunk (area average), so that a double-
# resolution scan is sampled like a plain one instead of aliasing its speckle.
MAX_PIXELS_PER_RADIAL_STEP = 1.5
PEAK_WINDOW_BINS = 3  # the soft-argmax reads the softmax within this many columns of the row's peak


@dataclass(frozen=True)
class PolarCodec:
    angles: int = 96  # rays around the ellipse
    radii: int = 64  # samples along each ray
    radius_range: tuple[float, float] = (0.75, 1.25)  # of the prior ellipse's radius along the ray
    wrap_rows: int = 16  # rows repeated at each end so that the crop is periodic for the convolutions
    sigma_bins: float = 1.5  # target Gaussian, in columns

    @property
    def input_shape(self) -> tuple[int, int]:
        """(rows, columns) of a crop: the network input is [B, 1, rows, columns]."""
        return self.angles + 2 * self.wrap_rows, self.radii

    def row_angles_rad(self) -> np.ndarray:
        return 2 * np.pi * (np.arange(self.input_shape[0]) - self.wrap_rows) / self.angles

    def column_radii(self) -> np.ndarray:
        low, high = self.radius_range
        return np.linspace(low, high, self.radii)

    # ---- coordinates -------------------------------------------------------------------------------------------
    def to_original(self, prior: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Polar pixels (row, column: any shape, fractional allowed) -> original-pixel points [..., 2]."""
        low, high = self.radius_range
        angle = 2 * np.pi * (np.asarray(rows, dtype=np.float64) - self.wrap_rows) / self.angles
        radius = low + np.asarray(columns, dtype=np.float64) * (high - low) / (self.radii - 1)
        unit = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1)
        return prior[:2] + unit @ ellipse_geometry.frame_matrix(prior).T

    def to_polar(self, prior: np.ndarray, points_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Original-pixel points [..., 2] -> (row, column) in polar pixels, rows in the central copy [wrap, wrap + angles)."""
        low, high = self.radius_range
        unit = (np.asarray(points_px, dtype=np.float64) - prior[:2]) @ np.linalg.inv(ellipse_geometry.frame_matrix(prior)).T
        angle = np.mod(np.arctan2(unit[..., 1], unit[..., 0]), 2 * np.pi)
        rows = angle * self.angles / (2 * np.pi) + self.wrap_rows
        columns = (np.linalg.norm(unit, axis=-1) - low) * (self.radii - 1) / (high - low)
        return rows, columns

    def pixels_per_radial_step(self, prior: np.ndarray) -> float:
        """Original pixels between two columns along the minor axis (the finest direction)."""
        low, high = self.radius_range
        return float(prior[ellipse_geometry.SEMI_MINOR] * (high - low) / (self.radii - 1))

    # ---- the crop ----------------------------------------------------------------------------------------------
    def crop(self, pixels: np.ndarray, prior: np.ndarray) -> np.ndarray:
        """Original image [H, W] (uint8 or float in [0, 1]) -> float32 [rows, columns] in [0, 1]. Outside the image is 0."""
        image = pixels.astype(np.float32) / 255.0 if pixels.dtype == np.uint8 else pixels.astype(np.float32, copy=False)
        shrink = min(1.0, MAX_PIXELS_PER_RADIAL_STEP / max(self.pixels_per_radial_step(prior), 1e-9))
        points = prior[:2] + _unit_grid(self) @ ellipse_geometry.frame_matrix(prior).T  # = to_original at every pixel
        if shrink < 0.75:
            height, width = image.shape
            small = (max(int(round(width * shrink)), 2), max(int(round(height * shrink)), 2))
            scale_xy = np.array([small[0] / width, small[1] / height])
            image = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
            points = (points + 0.5) * scale_xy - 0.5  # pixel-centre aligned, as cv2.resize
        map_x = np.ascontiguousarray(points[..., 0], dtype=np.float32)
        map_y = np.ascontiguousarray(points[..., 1], dtype=np.float32)
        return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)

    # ---- target ------------------------------------------------------------------------------------------------
    def target_columns(self, prior: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """[rows] fractional column where each ray of `prior` meets the `reference` ellipse (NaN: outside the crop)."""
        angles = self.row_angles_rad()
        directions = np.stack([np.cos(angles), np.sin(angles)], axis=1) @ ellipse_geometry.frame_matrix(prior).T
        radius = ellipse_geometry.ray_intersections(prior[:2], directions, reference)  # in units of the prior's radius
        low, high = self.radius_range
        columns = (radius - low) * (self.radii - 1) / (high - low)
        return np.where((columns >= 0) & (columns <= self.radii - 1), columns, np.nan)

    def encode(self, prior: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """float32 [rows, columns]: per row a Gaussian summing to 1 at the reference outline; rows whose outline falls
        outside the crop are all zero (the loss skips them)."""
        columns = self.target_columns(prior, reference)
        grid = np.arange(self.radii, dtype=np.float64)
        target = np.exp(-((grid[None, :] - np.nan_to_num(columns, nan=-1e3)[:, None]) ** 2) / (2 * self.sigma_bins**2))
        sums = target.sum(axis=1, keepdims=True)
        target = np.where(np.isfinite(columns)[:, None] & (sums > 0), target / np.maximum(sums, 1e-12), 0.0)
        return target.astype(np.float32)

    # ---- decode ------------------------------------------------------------------------------------------------
    def central_softmax(self, logits: np.ndarray) -> np.ndarray:
        """[B, rows, columns] logits -> [B, angles, columns]: each central row's softmax over the radius."""
        central = np.asarray(logits, dtype=np.float64)[:, self.wrap_rows:self.wrap_rows + self.angles]
        probability = np.exp(central - central.max(axis=-1, keepdims=True))
        return probability / probability.sum(axis=-1, keepdims=True)

    def decode_columns(self, logits: np.ndarray, probability: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """[B, rows, columns] logits -> (fractional column per central row [B, angles], peak mass [B, angles]): the
        softmax's mean within PEAK_WINDOW_BINS of its peak, and how much of the softmax lies there (1 = certain).
        `probability`: `central_softmax(logits)` when the caller has it already."""
        probability = self.central_softmax(logits) if probability is None else probability
        peak = probability.argmax(axis=-1)
        grid = np.arange(self.radii)
        window = np.abs(grid[None, None, :] - peak[..., None]) <= PEAK_WINDOW_BINS
        mass = (probability * window).sum(axis=-1)
        columns = (probability * window * grid).sum(axis=-1) / np.maximum(mass, 1e-12)
        return columns, mass

    def decode(self, logits: np.ndarray, priors: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """[B, rows, columns] logits and [B, 5] priors -> ([B, 5] ellipses fitted in original pixels, diagnostics [B]).

        Diagnostics: `peak_mass` (mean certainty of the rays), `fit_residual` (RMS radial distance of the ray points
        from the fitted ellipse, as a fraction of its mean semi-axis), `radial_spread_px` (the mean over rays of the
        softmax's standard deviation, in original pixels). One robust pass: points further than 3× the
        median residual (and 1 % of the radius) from the first fit are left out of the second."""
        probability = self.central_softmax(logits)
        columns, mass = self.decode_columns(logits, probability)
        spread_columns = self.column_spread(probability)
        rows = np.arange(self.angles) + self.wrap_rows
        spread_px = np.full(len(priors), np.nan)
        ellipses = np.full((len(priors), 5), np.nan)
        residual = np.full(len(priors), np.nan)
        for index, prior in enumerate(np.asarray(priors, dtype=np.float64)):
            points = self.to_original(prior, rows, columns[index])
            fitted = ellipse_geometry.fit(points)
            distance = np.abs(ellipse_geometry.radial_residuals_px(points, fitted))
            mean_radius = (fitted[2] + fitted[3]) / 2
            keep = distance <= max(3 * np.median(distance), 0.01 * mean_radius)
            if 5 <= keep.sum() < len(points):
                fitted = ellipse_geometry.fit(points[keep])
            ellipses[index] = fitted
            spread_px[index] = float(np.mean(spread_columns[index] * self.pixels_per_column(prior)))
            residual[index] = np.sqrt(np.mean(ellipse_geometry.radial_residuals_px(points, fitted) ** 2)) / ((fitted[2] + fitted[3]) / 2)
        return ellipses, {"peak_mass": mass.mean(axis=1), "fit_residual": residual, "radial_spread_px": spread_px}

    def column_spread(self, probability: np.ndarray) -> np.ndarray:
        """[B, angles, columns] `central_softmax` -> [B, angles]: the standard deviation of each row's softmax over columns
        (two candidate edges on one ray give a large one, where the peak mass alone may not say so)."""
        grid = np.arange(self.radii)
        mean = (probability * grid).sum(axis=-1)
        return np.sqrt(np.maximum((probability * grid**2).sum(axis=-1) - mean**2, 0.0))

    def pixels_per_column(self, prior: np.ndarray) -> np.ndarray:
        """[angles]: original pixels between two columns along each central ray."""
        low, high = self.radius_range
        angles = self.row_angles_rad()[self.wrap_rows:self.wrap_rows + self.angles]
        directions = np.stack([np.cos(angles), np.sin(angles)], axis=1) @ ellipse_geometry.frame_matrix(prior).T
        return np.linalg.norm(directions, axis=1) * (high - low) / (self.radii - 1)


@functools.lru_cache(maxsize=8)
def _unit_grid(codec: PolarCodec) -> np.ndarray:
    """[rows, columns, 2]: every polar pixel on the unit circle's frame (radius × (cos t, sin t)), computed once per codec."""
    rows, columns = np.meshgrid(np.arange(codec.input_shape[0]), np.arange(codec.radii), indexing="ij")
    return codec.to_original(np.array([0.0, 0.0, 1.0, 1.0, 0.0]), rows, columns)


def jitter(reference: np.ndarray, rng: np.random.Generator, scale: float = 1.0, axis_scale: float = 1.0) -> np.ndarray:
    """A prior ellipse about as wrong as stage 1 can be: centre moved by ~3 % of the axes, each axis scaled by ~4 %,
    turned by ~4°, and one time in five all of it 2.5× larger (stage 1's occasional large errors). `scale` = 0 returns
    the reference itself; `axis_scale` widens the axes' share alone (how far the prior's size may be off)."""
    spread = scale * (2.5 if rng.random() < 0.2 else 1.0)
    mean_axis = (reference[2] + reference[3]) / 2
    centre = reference[:2] + rng.normal(0, 0.03 * spread, 2) * mean_axis
    axes = reference[2:4] * np.exp(rng.normal(0, 0.04 * spread * axis_scale, 2))
    angle = reference[4] + np.deg2rad(rng.normal(0, 4.0 * spread))
    if rng.random() < 0.5:  # which end of the major axis is angle 0 must not matter
        angle += np.pi
    return np.array([centre[0], centre[1], max(axes[0], 1.0), max(axes[1], 1.0), angle])
