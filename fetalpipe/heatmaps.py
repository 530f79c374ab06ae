"""Gaussian heatmap codec: landmarks in model-input pixels <-> heatmaps (encode and decode in one class).

Two target layouts:
  * ``ordered`` (the seed): 4 maps, one per landmark, endpoints ordered by `biometry.canonical_order`;
  * ``pairs`` (order-free): 2 maps, both OFD endpoints in map 0 and both BPD endpoints in map 1, so
    the target never depends on which end is called "1"; decode finds the two strongest peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fetalpipe.biometry import canonical_order

LAYOUTS = ("ordered", "pairs")


@dataclass(frozen=True)
class HeatmapCodec:
    input_size: int = 256  # model input, pixels per side
    heatmap_size: int = 256  # heatmap pixels per side (input_size / heatmap stride)
    sigma_px: float = 5.0  # Gaussian sigma in model-input pixels
    layout: str = "ordered"
    refine: bool = True  # sub-pixel decoding; False is the seed's plain argmax

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"heatmap layout must be one of {LAYOUTS}, got {self.layout!r}")

    @property
    def num_maps(self) -> int:
        return 4 if self.layout == "ordered" else 2

    @property
    def stride(self) -> float:
        return self.input_size / self.heatmap_size

    @property
    def sigma_heatmap_px(self) -> float:
        return self.sigma_px / self.stride

    def _to_heatmap(self, points_model_px: np.ndarray) -> np.ndarray:
        return (np.asarray(points_model_px, dtype=np.float64) + 0.5) / self.stride - 0.5

    def _to_model(self, points_heatmap_px: np.ndarray) -> np.ndarray:
        return (np.asarray(points_heatmap_px, dtype=np.float64) + 0.5) * self.stride - 0.5

    def encode(self, points_model_px: np.ndarray) -> np.ndarray:
        """[B, 4, 2] (ofd1, ofd2, bpd1, bpd2) model pixels -> float32 [B, num_maps, S, S] in [0, 1]."""
        points = canonical_order(np.asarray(points_model_px, dtype=np.float64))
        single = points.ndim == 2
        if single:
            points = points[None]
        centres = self._to_heatmap(points)  # [B, 4, 2]
        grid = np.arange(self.heatmap_size, dtype=np.float64)
        two_sigma_sq = 2 * self.sigma_heatmap_px**2
        gauss_x = np.exp(-((grid[None, None, :] - centres[..., 0:1]) ** 2) / two_sigma_sq)  # [B, 4, S]
        gauss_y = np.exp(-((grid[None, None, :] - centres[..., 1:2]) ** 2) / two_sigma_sq)
        maps = gauss_y[..., :, None] * gauss_x[..., None, :]  # [B, 4, S, S]
        if self.layout == "pairs":
            maps = np.stack([np.maximum(maps[:, 0], maps[:, 1]), np.maximum(maps[:, 2], maps[:, 3])], axis=1)
        maps = maps.astype(np.float32)
        return maps[0] if single else maps

    def decode(self, heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[B, num_maps, S, S] -> (points [B, 4, 2] in model pixels, peak values [B, 4])."""
        maps = np.asarray(heatmaps, dtype=np.float32)
        if self.layout == "ordered":
            peaks, values = self._peaks(maps)
        else:
            first, first_values = self._peaks(maps)
            suppressed = maps.copy()
            radius = max(3.0 * self.sigma_heatmap_px, 2.0)
            grid = np.arange(self.heatmap_size)
            dist_sq = (grid[None, None, None, :] - first[..., 0, None, None]) ** 2 + (
                grid[None, None, :, None] - first[..., 1, None, None]
            ) ** 2
            suppressed[dist_sq <= radius**2] = 0.0
            second, second_values = self._peaks(suppressed)
            peaks = np.stack([first[:, 0], second[:, 0], first[:, 1], second[:, 1]], axis=1)
            values = np.stack([first_values[:, 0], second_values[:, 0], first_values[:, 1], second_values[:, 1]], axis=1)
        points = canonical_order(self._to_model(peaks))
        return points, values

    def _peaks(self, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Argmax per map, then (optionally) a log-parabola fit in x and y: exact for a Gaussian."""
        batch, channels, height, width = maps.shape
        flat_index = maps.reshape(batch, channels, -1).argmax(axis=-1)
        ys, xs = np.divmod(flat_index, width)
        values = np.take_along_axis(maps.reshape(batch, channels, -1), flat_index[..., None], axis=-1)[..., 0]
        points = np.stack([xs, ys], axis=-1).astype(np.float64)
        if not self.refine:
            return points, values
        b_index, c_index = np.meshgrid(np.arange(batch), np.arange(channels), indexing="ij")

        def sample(y, x):
            return np.log(np.maximum(maps[b_index, c_index, np.clip(y, 0, height - 1), np.clip(x, 0, width - 1)], 1e-10))

        centre = sample(ys, xs)
        for axis, (left, right) in enumerate(((sample(ys, xs - 1), sample(ys, xs + 1)), (sample(ys - 1, xs), sample(ys + 1, xs)))):
            at_edge = (xs == 0) | (xs == width - 1) if axis == 0 else (ys == 0) | (ys == height - 1)
            curvature = left - 2 * centre + right
            with np.errstate(divide="ignore", invalid="ignore"):
                offset = np.where((curvature < 0) & ~at_edge, 0.5 * (left - right) / curvature, 0.0)
            points[..., axis] += np.clip(offset, -0.5, 0.5)
        return points, values
