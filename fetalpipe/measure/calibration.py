"""Size calibration: a straight-line correction of the measured head size, fitted on the training split.

Why: every ellipse-map model trained here measures small heads too small and large heads too large, on its own
training images as on validation (-1.05 to -1.62 mm HC in the quarter with the finest pixels, +1.20 to +2.32 mm
in the coarsest, over six runs; docs/experiments.md, note 9). The error is close to linear in the measured HC, so a line fitted
on the training split predicts it for new images. The correction scales the ellipse about its centre: the
landmarks move, and BPD, OFD and HC, in pixels and mm, stay consistent with them.

It needs the pixel spacing (the error is linear in mm, not in pixels): images without one are left as measured."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fetalpipe.measure.biometry import biometry_mm

# A correction is a few mm on heads of 100-350 mm; a factor outside this range means a measurement the line was never fitted on.
SCALE_LIMITS = (0.95, 1.05)


@dataclass(frozen=True)
class SizeCalibration:
    """HC error (measured - reference, mm) = intercept_mm + slope × measured HC (mm), fitted on `images` training images."""

    intercept_mm: float
    slope: float
    images: int

    @classmethod
    def fit(cls, measured_hc_mm: np.ndarray, reference_hc_mm: np.ndarray) -> "SizeCalibration":
        measured = np.asarray(measured_hc_mm, dtype=np.float64)
        reference = np.asarray(reference_hc_mm, dtype=np.float64)
        usable = np.isfinite(measured) & np.isfinite(reference)
        if usable.sum() < 10:
            raise ValueError(f"size calibration needs at least 10 measured images with a reference HC; got {int(usable.sum())}")
        slope, intercept_mm = np.polyfit(measured[usable], measured[usable] - reference[usable], 1)
        return cls(intercept_mm=float(intercept_mm), slope=float(slope), images=int(usable.sum()))

    def scale(self, measured_hc_mm: np.ndarray) -> np.ndarray:
        """Factor for the ellipse axes, (HC - predicted error) / HC; 1 where the HC in mm is unknown."""
        measured = np.asarray(measured_hc_mm, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            factor = (measured - (self.intercept_mm + self.slope * measured)) / measured
        return np.where(np.isfinite(factor) & (measured > 0), np.clip(factor, *SCALE_LIMITS), 1.0)

    def apply(self, points_original_px: np.ndarray, pixel_spacing_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N, 4, 2] ellipse endpoints (original pixels) -> (calibrated endpoints, scale [N]). Both diameters pass
        through the centre, so the mean of the four endpoints is the centre the ellipse is scaled about."""
        points = np.asarray(points_original_px, dtype=np.float64)
        scale = self.scale(biometry_mm(points, pixel_spacing_mm)["hc_ellipse_mm"])
        centre = points.mean(axis=-2, keepdims=True)
        return centre + (points - centre) * scale[:, None, None], scale

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> "SizeCalibration | None":
        """From a model file's ``calibration`` entry (which also keeps the fit's report); None when there is none."""
        return cls(float(values["intercept_mm"]), float(values["slope"]), int(values["images"])) if values else None
