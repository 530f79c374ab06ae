"""Clinical context for a measured head circumference: gestational age from HC (Hadlock 1984) and where HC lies
against the INTERGROWTH-21st fetal standard for a known gestational age (Papageorghiou et al. 2014).

All functions take and return numpy arrays; a result outside the formula's published range is NaN, never extrapolated."""

from __future__ import annotations

import math

import numpy as np

# Hadlock FP et al., Radiology 1984;152:497-501: GA (weeks) = 8.96 + 0.540 HC + 0.0003 HC^3, HC in cm.
HADLOCK_GA_RANGE_WEEKS = (12.0, 42.0)
# Papageorghiou AT et al., Lancet 2014;384:869-79 (INTERGROWTH-21st fetal growth standards): defined 14-40 weeks.
INTERGROWTH21_GA_RANGE_WEEKS = (14.0, 40.0)


def ga_from_hc_weeks(hc_mm: np.ndarray) -> np.ndarray:
    """Gestational age (weeks) from HC by Hadlock's formula; NaN outside 12-42 weeks or where HC is missing."""
    hc_cm = np.asarray(hc_mm, dtype=np.float64) / 10.0
    ga_weeks = 8.96 + 0.540 * hc_cm + 0.0003 * hc_cm ** 3
    low, high = HADLOCK_GA_RANGE_WEEKS
    return np.where((ga_weeks >= low) & (ga_weeks <= high), ga_weeks, np.nan)


def intergrowth21_hc_mean_sd_mm(ga_weeks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """INTERGROWTH-21st fetal HC: (mean, SD) in mm at exact gestational age in weeks; NaN outside 14-40 weeks."""
    ga = np.asarray(ga_weeks, dtype=np.float64)
    low, high = INTERGROWTH21_GA_RANGE_WEEKS
    ga = np.where((ga >= low) & (ga <= high), ga, np.nan)
    log_ga = np.log(ga)
    mean_mm = -28.2849 + 1.69267 * ga ** 2 - 0.397485 * ga ** 2 * log_ga
    sd_mm = 1.98735 + 0.0136772 * ga ** 3 - 0.00726264 * ga ** 3 * log_ga + 0.000976253 * ga ** 3 * log_ga ** 2
    return mean_mm, sd_mm


def hc_z_intergrowth21(hc_mm: np.ndarray, ga_weeks: np.ndarray) -> np.ndarray:
    """z-score of HC against the INTERGROWTH-21st standard at the given GA; NaN outside 14-40 weeks or without HC."""
    mean_mm, sd_mm = intergrowth21_hc_mean_sd_mm(ga_weeks)
    return (np.asarray(hc_mm, dtype=np.float64) - mean_mm) / sd_mm


def centile_from_z(z: np.ndarray) -> np.ndarray:
    """100·Φ(z), the standard normal CDF as a centile (NaN stays NaN)."""
    z = np.asarray(z, dtype=np.float64)
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return np.where(np.isfinite(z), 50.0 * (1.0 + erf(np.nan_to_num(z) / math.sqrt(2.0))), np.nan)


def hc_for_centile_mm(ga_weeks: np.ndarray, z: float) -> np.ndarray:
    """The HC (mm) at a z-score of the standard, for drawing centile curves (z = ±1.881 for the 3rd/97th)."""
    mean_mm, sd_mm = intergrowth21_hc_mean_sd_mm(ga_weeks)
    return mean_mm + z * sd_mm


# z of the 3rd, 50th and 97th centiles of a normal distribution (the curves the report draws).
CENTILE_Z = {3: -1.880794, 50: 0.0, 97: 1.880794}


def clinical_columns(hc_ellipse_mm: np.ndarray, gestational_age_weeks: np.ndarray | None) -> dict[str, np.ndarray]:
    """The output columns: `ga_from_hc_weeks` always; the INTERGROWTH-21st z and centile where a GA is given (NaN otherwise)."""
    hc_mm = np.asarray(hc_ellipse_mm, dtype=np.float64)
    columns = {"ga_from_hc_weeks": ga_from_hc_weeks(hc_mm)}
    ga_weeks = np.full(len(hc_mm), np.nan) if gestational_age_weeks is None else np.asarray(gestational_age_weeks, dtype=np.float64)
    z = hc_z_intergrowth21(hc_mm, ga_weeks)
    columns["hc_z_intergrowth21"] = z
    columns["hc_centile_intergrowth21"] = centile_from_z(z)
    return columns
