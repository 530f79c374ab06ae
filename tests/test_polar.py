"""The refinement stage's geometry: polar crops around a prior ellipse, their inverse, the target and its decoding."""

import numpy as np
import pytest

from fetalpipe.measure import ellipse as ellipse_geometry
from fetalpipe.model.polar import PolarCodec, jitter

REFERENCE = np.array([400.0, 260.0, 180.0, 140.0, np.deg2rad(25.0)])  # original pixels


def test_endpoints_and_ellipse_round_trip():
    endpoints = ellipse_geometry.to_endpoints(REFERENCE)
    assert np.linalg.norm(endpoints[0] - endpoints[1]) == pytest.approx(2 * 180.0)
    assert np.linalg.norm(endpoints[2] - endpoints[3]) == pytest.approx(2 * 140.0)
    back = ellipse_geometry.from_endpoints(endpoints)
    assert np.allclose(back[:4], REFERENCE[:4])
    assert np.isclose(np.mod(back[4] - REFERENCE[4], np.pi), 0) or np.isclose(np.mod(back[4] - REFERENCE[4], np.pi), np.pi)


def test_polar_pixels_map_back_to_original_pixels_within_a_tenth_of_a_pixel():
    codec = PolarCodec()
    prior = jitter(REFERENCE, np.random.default_rng(3))
    rows, columns = np.meshgrid(np.linspace(codec.wrap_rows, codec.wrap_rows + codec.angles - 0.01, 97), np.linspace(0, codec.radii - 1, 33), indexing="ij")
    points = codec.to_original(prior, rows, columns)
    rows_back, columns_back = codec.to_polar(prior, points)
    assert np.abs(codec.to_original(prior, rows_back, columns_back) - points).max() < 0.1
    assert np.abs(columns_back - columns).max() < 1e-6


def test_wrapped_rows_repeat_the_far_end_of_the_circle():
    codec = PolarCodec()
    prior = REFERENCE.copy()
    first = codec.to_original(prior, np.array([0.0]), np.array([10.0]))
    same_angle = codec.to_original(prior, np.array([float(codec.angles)]), np.array([10.0]))
    assert np.allclose(first, same_angle)


def test_crop_samples_the_original_image_where_to_original_says():
    codec = PolarCodec()
    prior = jitter(REFERENCE, np.random.default_rng(5), scale=0.5)
    ys, xs = np.mgrid[0:540, 0:800]
    grid = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    distance_px = ellipse_geometry.radial_residuals_px(grid, REFERENCE).reshape(540, 800)
    image = np.round(255 * np.exp(-(distance_px**2) / (2 * 2.0**2))).astype(np.uint8)  # the reference outline, a 2 px Gaussian ridge
    crop = codec.crop(image, prior)
    assert crop.shape == codec.input_shape and crop.dtype == np.float32
    target = codec.target_columns(prior, REFERENCE)
    central = slice(codec.wrap_rows, codec.wrap_rows + codec.angles)
    peak_columns = crop[central].argmax(axis=1)
    assert np.nanmax(np.abs(peak_columns - target[central])) <= 0.75


def test_target_decodes_to_the_reference_ellipse():
    codec = PolarCodec()
    rng = np.random.default_rng(0)
    for _ in range(5):
        prior = jitter(REFERENCE, rng)
        target = codec.encode(prior, REFERENCE)
        assert target.shape == codec.input_shape
        valid = target.sum(axis=1) > 0
        assert np.allclose(target[valid].sum(axis=1), 1.0, atol=1e-5)
        fitted, diagnostics = codec.decode(np.log(target + 1e-9)[None], prior[None])
        outline = ellipse_geometry.outline(REFERENCE, 90)
        assert np.abs(ellipse_geometry.radial_residuals_px(outline, fitted[0])).max() < 0.1
        assert diagnostics["fit_residual"][0] < 1e-3


def test_rays_that_miss_the_crop_get_no_target():
    codec = PolarCodec()
    far_too_small = REFERENCE * np.array([1, 1, 0.5, 0.5, 1])
    assert np.isnan(codec.target_columns(far_too_small, REFERENCE)).all()
    assert codec.encode(far_too_small, REFERENCE).sum() == 0


def test_crop_shrinks_a_double_resolution_image_instead_of_aliasing_it():
    import cv2

    codec = PolarCodec()
    rng = np.random.default_rng(1)
    image = (rng.random((540, 800)) * 255).astype(np.uint8)
    double = cv2.resize(image, (1600, 1080), interpolation=cv2.INTER_LINEAR)
    prior = REFERENCE
    prior_double = np.array([2 * prior[0] + 0.5, 2 * prior[1] + 0.5, 2 * prior[2], 2 * prior[3], prior[4]])
    plain, doubled = codec.crop(image, prior), codec.crop(double, prior_double)
    assert np.corrcoef(plain.ravel(), doubled.ravel())[0, 1] > 0.8


def test_axis_jitter_scale_widens_only_the_size_of_the_prior():
    """`axis_jitter_scale` (RefinementConfig) teaches the refinement stage to trust the prior's size less; its centre
    and angle must stay jittered as before, draw for draw."""
    plain = np.stack([jitter(REFERENCE, np.random.default_rng(seed)) for seed in range(400)])
    wide = np.stack([jitter(REFERENCE, np.random.default_rng(seed), axis_scale=2.0) for seed in range(400)])
    assert np.allclose(plain[:, [0, 1, 4]], wide[:, [0, 1, 4]])
    plain_spread = np.log(plain[:, 2:4] / REFERENCE[2:4]).std()
    assert np.log(wide[:, 2:4] / REFERENCE[2:4]).std() == pytest.approx(2 * plain_spread, rel=1e-6)
