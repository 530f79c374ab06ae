"""The review flag: which measurements a person should look at before trusting them.

Every prediction row carries a few signals, each computed in the inference actors at no extra forward pass:
  * ``stage_disagreement_mm``: |HC of stage 2 − HC of stage 1| (the refinement moved the outline a lot);
  * ``outline_fit_residual_mm``: RMS radial distance of stage 2's ray points from the ellipse fitted to them (the
    outline is not an ellipse: a shadow, a cut, another structure);
  * ``outline_spread_mm``: the mean spread of stage 2's softmax along each ray (it cannot tell where the skull is);
  * ``outline_outside_frame``: the fraction of the final ellipse outside the image (a head cut by the frame);
  * ``axis_ratio``: BPD / OFD (too flat for a head);
  * ``head_size_fraction``: OFD / the image diagonal (too small to be the head that fills a standard plane);
  * ``confidence``: stage 1's map confidence.
The first three are in mm, like the error they predict: the same 1 % uncertainty is 1 mm of HC on an early head and
3 mm on a late one (on the validation split, in mm they rank the images above 5 mm far better than as fractions).
`ReviewRule` flags a row when any signal passes its threshold. `fetalpipe calibrate` fits the thresholds on the
model's training split (as it fits the size calibration), to catch the images whose HC is off by more than
`LARGE_ERROR_MM` while flagging at most `MAX_FLAGGED_FRACTION` of them, and stores them in the model file."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

# Signal -> "high" (flag above the threshold) or "low" (flag below it).
SIGNALS = {
    "stage_disagreement_mm": "high",
    "outline_fit_residual_mm": "high",
    "outline_spread_mm": "high",
    "outline_outside_frame": "high",
    "axis_ratio": "low",
    "head_size_fraction": "low",
    "confidence": "low",
}
LARGE_ERROR_MM = 5.0
MAX_FLAGGED_FRACTION = 0.12  # on the training split (the goal: at most 15 % of new images)
CANDIDATE_QUANTILES = (0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.9, 0.88, 0.85, 0.8)


@dataclass(frozen=True)
class ReviewRule:
    """{signal: threshold}; signals not listed never flag."""

    thresholds: dict[str, float] = field(default_factory=dict)
    fit_report: dict = field(default_factory=dict)

    def flags(self, signals: pd.DataFrame) -> pd.DataFrame:
        """Boolean [rows, signal] table: which signal passes its threshold (NaN never passes)."""
        columns = {}
        for name, threshold in self.thresholds.items():
            values = pd.to_numeric(signals[name], errors="coerce") if name in signals else pd.Series(np.nan, index=signals.index)
            columns[name] = (values > threshold) if SIGNALS[name] == "high" else (values < threshold)
        return pd.DataFrame(columns, index=signals.index, dtype=bool)

    def apply(self, signals: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(needs_review bool [N], review_reason text [N]: '' or 'signal value > threshold; …')."""
        flags = self.flags(signals)
        reasons = np.full(len(signals), "", dtype=object)
        for name in flags.columns:
            comparison = ">" if SIGNALS[name] == "high" else "<"
            for row in np.flatnonzero(flags[name].to_numpy()):
                value = float(signals[name].iloc[row])
                text = f"{name} {value:.3g} {comparison} {self.thresholds[name]:.3g}"
                reasons[row] = f"{reasons[row]}; {text}" if reasons[row] else text
        return flags.any(axis=1).to_numpy(dtype=bool) if len(flags.columns) else np.zeros(len(signals), dtype=bool), reasons

    def to_dict(self) -> dict:
        return {"thresholds": dict(self.thresholds), "fit_report": dict(self.fit_report)}

    @classmethod
    def from_dict(cls, values: dict | None) -> "ReviewRule | None":
        return cls(thresholds={k: float(v) for k, v in values["thresholds"].items()}, fit_report=dict(values.get("fit_report", {}))) if values else None

    @classmethod
    def fit(cls, signals: pd.DataFrame, hc_abs_error_mm: np.ndarray, max_flagged_fraction: float = MAX_FLAGGED_FRACTION,
            large_error_mm: float = LARGE_ERROR_MM) -> "ReviewRule":
        """Greedy choice of thresholds at quantiles of the training split: each step adds or tightens the one signal
        that catches the most images with |HC error| > `large_error_mm` (then: flags fewest), as long as at most
        `max_flagged_fraction` of the images are flagged."""
        errors = np.asarray(hc_abs_error_mm, dtype=np.float64)
        large = errors > large_error_mm
        available = [name for name in SIGNALS if name in signals and pd.to_numeric(signals[name], errors="coerce").notna().any()]
        candidates = {}
        for name in available:
            values = pd.to_numeric(signals[name], errors="coerce").to_numpy(dtype=np.float64)
            levels = np.nanquantile(values, CANDIDATE_QUANTILES if SIGNALS[name] == "high" else [1 - q for q in CANDIDATE_QUANTILES])
            flagged = [(values > level) if SIGNALS[name] == "high" else (values < level) for level in levels]
            candidates[name] = list(zip(levels, flagged))
        chosen: dict[str, tuple[float, np.ndarray]] = {}
        limit = max_flagged_fraction * len(errors)

        def union(selection):
            masks = [mask for _, mask in selection.values()]
            return np.logical_or.reduce(masks) if masks else np.zeros(len(errors), dtype=bool)

        while True:
            current = union(chosen)
            best, best_key = None, (int((current & large).sum()), -int(current.sum()))
            for name, options in candidates.items():
                for level, mask in options:
                    trial = union({**chosen, name: (level, mask)})
                    key = (int((trial & large).sum()), -int(trial.sum()))
                    if trial.sum() <= limit and key > best_key:
                        best, best_key = (name, level, mask), key
            if best is None:
                break
            chosen[best[0]] = (best[1], best[2])
        flagged = union(chosen)
        report = {
            "images": int(len(errors)), "large_errors": int(large.sum()), "large_error_mm": large_error_mm,
            "flagged_fraction": float(flagged.mean()) if len(errors) else 0.0,
            "caught_fraction": float((flagged & large).sum() / large.sum()) if large.any() else None,
            "max_flagged_fraction": max_flagged_fraction,
        }
        return cls(thresholds={name: float(level) for name, (level, _) in chosen.items()}, fit_report=report)


def catch_curve(signals: pd.DataFrame, hc_abs_error_mm: np.ndarray, rule: ReviewRule, large_error_mm: float = LARGE_ERROR_MM) -> dict:
    """What `rule` flags on a labelled set, and how many of its large errors it catches."""
    needs_review, _ = rule.apply(signals)
    large = np.asarray(hc_abs_error_mm, dtype=np.float64) > large_error_mm
    return {
        "images": int(len(large)), "flagged": int(needs_review.sum()), "flagged_fraction": float(needs_review.mean()) if len(large) else 0.0,
        "large_errors": int(large.sum()), "caught": int((needs_review & large).sum()),
        "caught_fraction": float((needs_review & large).sum() / large.sum()) if large.any() else None,
    }
