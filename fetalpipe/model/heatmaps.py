"""Gaussian heatmap codec: landmarks in model-input pixels <-> heatmaps (encode and decode in one class).

Two target layouts:
  * ``ordered`` (the seed): 4 maps, one per landmark, endpoints ordered by `biometry.canonical_order`;
  * ``pairs`` (order-free): 2 maps, both OFD endpoints in map 0 and both BPD endpoints in map 1, so
    the target never depends on which end is called "1"; decode finds the two strongest peaks;
  * ``ellipse`` (order-free, geometric): 1 map, the filled head ellipse through the four endpoints.
    Decode thresholds it at 0.5, fits an ellipse to the outline in original-pixel geometry and returns
    its axis endpoints, so OFD ⟂ BPD and both cross at the centre by construction.
  * ``coordinates`` (no heatmap; the seed report's §d baseline): 8 numbers, the ordered endpoints in
    model pixels divided by the input size, for a network that regresses coordinates directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fetalpipe.measure.biometry import canonical_order

LAYOUTS = ("ordered", "pairs", "ellipse", "coordinates")
ELLIPSE_OUTLINE_SAMPLES = 256
HULL_SOLIDITY_THRESHOLD = 0.98  # blob area / hull area below this: fit the hull instead


@dataclass(frozen=True)
class HeatmapCodec:
    input_size: int = 256  # model input, pixels per side
    heatmap_size: int = 256  # heatmap pixels per side (input_size / heatmap stride)
    sigma_px: float = 5.0  # Gaussian sigma in model-input pixels
    layout: str = "ordered"
    # ``ellipse`` only: 0 draws the filled ellipse with an anti-aliased edge; > 0 makes the target a logistic of the
    # signed distance to the outline with this scale (model-input pixels), so pixels near the edge say how far it is.
    edge_scale_px: float = 0.0
    refine: bool = True  # sub-pixel decoding; False is the seed's plain argmax

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"heatmap layout must be one of {LAYOUTS}, got {self.layout!r}")

    @property
    def num_maps(self) -> int:
        """Model outputs: heatmaps, or numbers for ``coordinates``."""
        return {"ordered": 4, "pairs": 2, "ellipse": 1, "coordinates": 8}[self.layout]

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one image's target (and of the model output per image)."""
        if self.layout == "coordinates":
            return (self.num_maps,)
        return (self.num_maps, self.heatmap_size, self.heatmap_size)

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
        if self.layout == "coordinates":
            targets = ((points + 0.5) / self.input_size).reshape(len(points), 8).astype(np.float32)
            return targets[0] if single else targets
        centres = self._to_heatmap(points)  # [B, 4, 2]
        if self.layout == "ellipse":
            edge_scale_heatmap_px = self.edge_scale_px / self.stride
            maps = np.stack([_filled_ellipse(c, self.heatmap_size, edge_scale_heatmap_px) for c in centres])[:, None]
            return maps[0] if single else maps
        grid = np.arange(self.heatmap_size, dtype=np.float64)
        two_sigma_sq = 2 * self.sigma_heatmap_px**2
        gauss_x = np.exp(-((grid[None, None, :] - centres[..., 0:1]) ** 2) / two_sigma_sq)  # [B, 4, S]
        gauss_y = np.exp(-((grid[None, None, :] - centres[..., 1:2]) ** 2) / two_sigma_sq)
        maps = gauss_y[..., :, None] * gauss_x[..., None, :]  # [B, 4, S, S]
        if self.layout == "pairs":
            maps = np.stack([np.maximum(maps[:, 0], maps[:, 1]), np.maximum(maps[:, 2], maps[:, 3])], axis=1)
        maps = maps.astype(np.float32)
        return maps[0] if single else maps

    def decode(self, heatmaps: np.ndarray, original_sizes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """[B, num_maps, S, S] (or [B, 8] for ``coordinates``) -> (points [B, 4, 2] in model pixels, confidence [B, 4]).

        `original_sizes` [B, 2] (width, height) lets the ``ellipse`` layout fit in original-pixel
        geometry (the model input is a non-uniform stretch, which does not keep axes as axes)."""
        maps = np.asarray(heatmaps, dtype=np.float32)
        if self.layout == "coordinates":  # no heatmap, so no peak value: confidence is unknown
            points = maps.reshape(len(maps), 4, 2).astype(np.float64) * self.input_size - 0.5
            return canonical_order(points), np.full((len(maps), 4), np.nan)
        if self.layout == "ellipse":
            return self._decode_ellipse(maps, original_sizes)
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

    def _decode_ellipse(self, maps: np.ndarray, original_sizes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        from fetalpipe.data.imaging import ResizeTransform

        points = np.full((len(maps), 4, 2), np.nan)
        confidence = np.zeros((len(maps), 4))
        for index, probability in enumerate(maps[:, 0]):
            width, height = (int(v) for v in original_sizes[index]) if original_sizes is not None else (self.input_size, self.input_size)
            # Upsample to original pixels (cv2.resize is pixel-centre aligned, as ResizeTransform), then trace the 0.5 level.
            upsampled = cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR)
            contours, _ = cv2.findContours((upsampled > 0.5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            if not contours or len(max(contours, key=len)) < 5:
                continue
            contour = max(contours, key=len)
            hull = cv2.convexHull(contour)
            if cv2.contourArea(contour) < HULL_SOLIDITY_THRESHOLD * cv2.contourArea(hull):
                # The head is convex: a map with bites out of it (under-segmented large heads) is fitted by its hull.
                hull_mask = np.zeros((height, width), np.uint8)
                cv2.fillPoly(hull_mask, [hull], 1)
                contour = cv2.findContours(hull_mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0][0]
            contour = contour[:, 0, :]
            # Where the head runs off the frame the outline follows the image edge, not the skull: fit the rest.
            on_skull = (contour[:, 0] > 0) & (contour[:, 0] < width - 1) & (contour[:, 1] > 0) & (contour[:, 1] < height - 1)
            if on_skull.sum() >= 5:
                contour = contour[on_skull]
            (centre_x, centre_y), (axis_a, axis_b), angle_deg = cv2.fitEllipse(contour.astype(np.float32))
            # Contour pixels are the inner boundary, half a pixel inside the 0.5 level.
            semi_a, semi_b = axis_a / 2 + 0.5, axis_b / 2 + 0.5
            angle = np.deg2rad(angle_deg)
            axis_a_dir = np.array([np.cos(angle), np.sin(angle)])
            axis_b_dir = np.array([-axis_a_dir[1], axis_a_dir[0]])
            if semi_a < semi_b:
                semi_a, semi_b, axis_a_dir, axis_b_dir = semi_b, semi_a, axis_b_dir, axis_a_dir
            centre = np.array([centre_x, centre_y])
            endpoints = np.stack([centre - semi_a * axis_a_dir, centre + semi_a * axis_a_dir, centre - semi_b * axis_b_dir, centre + semi_b * axis_b_dir])
            points[index] = ResizeTransform(width, height, self.input_size).to_model(endpoints)
            inside = upsampled > 0.5
            confidence[index] = float(np.clip(upsampled[inside].mean() * 2 - 1 if inside.any() else 0.0, 0, 1))
        return canonical_order(points), confidence


def _filled_ellipse(points_heatmap_px: np.ndarray, size: int, edge_scale_heatmap_px: float = 0.0) -> np.ndarray:
    """Filled ellipse with OFD and BPD as conjugate semi-diameters (exact under any affine map,
    so it stays right after the anisotropic resize and augmentation). Anti-aliased edge, or with
    `edge_scale_heatmap_px` > 0 a soft edge: sigmoid(signed distance / scale), still 0.5 on the outline."""
    import cv2

    centre = (points_heatmap_px[0] + points_heatmap_px[1] + points_heatmap_px[2] + points_heatmap_px[3]) / 4
    half_ofd = (points_heatmap_px[1] - points_heatmap_px[0]) / 2
    half_bpd = (points_heatmap_px[3] - points_heatmap_px[2]) / 2
    angles = np.linspace(0, 2 * np.pi, ELLIPSE_OUTLINE_SAMPLES, endpoint=False)[:, None]
    outline = centre + half_ofd * np.cos(angles) + half_bpd * np.sin(angles)
    supersample = 4  # draw 4x larger then area-average: a soft, sub-pixel-true edge
    canvas = np.zeros((size * supersample, size * supersample), np.uint8)
    outline_ss = (outline + 0.5) * supersample - 0.5
    centre_ss = (centre + 0.5) * supersample - 0.5
    radial = outline_ss - centre_ss
    # fillPoly also fills pixels the outline passes through: pull it in by half a (supersampled) pixel.
    outline_ss -= 0.5 * radial / np.maximum(np.linalg.norm(radial, axis=1, keepdims=True), 1e-9)
    polygon = np.round(outline_ss * 16).astype(np.int32)
    cv2.fillPoly(canvas, [polygon], 255, lineType=cv2.LINE_8, shift=4)
    if edge_scale_heatmap_px > 0:
        # Euclidean distance (5x5 mask, within ~1 %) from each supersampled pixel centre to the nearest pixel across the outline;
        # the outline lies half a pixel before that one. Positive inside.
        inside_mask = canvas // 255  # fillPoly drew exactly 0 or 255
        inside = cv2.distanceTransform(inside_mask, cv2.DIST_L2, cv2.DIST_MASK_5)
        outside = cv2.distanceTransform(1 - inside_mask, cv2.DIST_L2, cv2.DIST_MASK_5)
        signed_heatmap_px = (inside - outside - inside_mask + 0.5) / supersample  # inside: d - 0.5; outside: -(d - 0.5)
        # Averaging over each 4x4 block gives the distance at the block centre (it is linear across the outline).
        signed_heatmap_px = cv2.resize(signed_heatmap_px, (size, size), interpolation=cv2.INTER_AREA)
        return (1.0 / (1.0 + np.exp(np.clip(-signed_heatmap_px / edge_scale_heatmap_px, -50, 50)))).astype(np.float32)
    return cv2.resize(canvas.astype(np.float32) / 255.0, (size, size), interpolation=cv2.INTER_AREA)
