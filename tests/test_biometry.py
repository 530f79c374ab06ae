import math

import numpy as np
import pytest

from fetalpipe.measure.biometry import biometry_mm, biometry_px, canonical_order, ramanujan_perimeter


def test_circle_hc_is_two_pi_r_by_both_formulas():
    radius = 37.5
    points = np.array([[100 - radius, 50], [100 + radius, 50], [100, 50 - radius], [100, 50 + radius]])
    values = biometry_px(points)
    assert values["ofd_px"] == pytest.approx(2 * radius)
    assert values["bpd_px"] == pytest.approx(2 * radius)
    assert values["hc_px"] == pytest.approx(2 * math.pi * radius)
    assert values["hc_ellipse_px"] == pytest.approx(2 * math.pi * radius)


def test_ellipse_perimeter_matches_numerical_integral():
    semi_major, semi_minor = 60.0, 35.0
    theta = np.linspace(0, 2 * np.pi, 200001)
    x, y = semi_major * np.cos(theta), semi_minor * np.sin(theta)
    integral = np.sum(np.hypot(np.diff(x), np.diff(y)))
    assert ramanujan_perimeter(semi_major, semi_minor) == pytest.approx(integral, rel=1e-6)
    points = np.array([[-60, 0], [60, 0], [0, -35], [0, 35]], dtype=float)
    values = biometry_px(points)
    assert values["hc_ellipse_px"] == pytest.approx(integral, rel=1e-6)
    assert values["hc_px"] == pytest.approx(math.pi * (120 + 70) / 2)


def test_mm_values_scale_original_pixels_and_nan_without_spacing():
    points = np.array([[[0, 0], [100, 0], [50, -20], [50, 20]]] * 2, dtype=float)
    values = biometry_mm(points, np.array([0.2, np.nan]))
    assert values["ofd_mm"][0] == pytest.approx(20.0)
    assert values["bpd_mm"][0] == pytest.approx(8.0)
    assert np.isnan(values["hc_mm"][1])


def test_canonical_order_left_ofd_first_and_top_bpd_first():
    points = np.array([[90, 10], [10, 20], [50, 80], [50, 5]], dtype=float)
    ordered = canonical_order(points)
    assert ordered[0].tolist() == [10, 20] and ordered[1].tolist() == [90, 10]
    assert ordered[2].tolist() == [50, 5] and ordered[3].tolist() == [50, 80]
