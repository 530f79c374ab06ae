import numpy as np
import pytest

from fetalpipe.measure.biometry import biometry_px, canonical_order
from fetalpipe.model.heatmaps import HeatmapCodec
from fetalpipe.pipeline.evaluate import matched_radial_errors_px


def realistic_points(count, seed=0):
    """Ellipse-axis endpoints (far apart, like heads) at random sub-pixel positions, model pixels."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(100, 156, (count, 2))
    angle = rng.uniform(0, np.pi, count)
    major = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    minor = np.stack([-major[:, 1], major[:, 0]], axis=1)
    a, b = rng.uniform(50, 90, count)[:, None], rng.uniform(35, 50, count)[:, None]
    return canonical_order(np.stack([centre - a * major, centre + a * major, centre - b * minor, centre + b * minor], axis=1))


@pytest.mark.parametrize("layout", ["ordered", "pairs", "ellipse"])
@pytest.mark.parametrize("heatmap_size", [256, 128, 64])
def test_encode_decode_round_trip_is_subpixel(layout, heatmap_size):
    codec = HeatmapCodec(input_size=256, heatmap_size=heatmap_size, sigma_px=5.0, layout=layout, refine=True)
    points = realistic_points(32)
    heatmaps = codec.encode(points)
    assert heatmaps.shape == (32, codec.num_maps, heatmap_size, heatmap_size) and heatmaps.dtype == np.float32
    decoded, peaks = codec.decode(heatmaps)
    # Compared order-free: an axis within a hair of vertical may legitimately swap names.
    assert matched_radial_errors_px(decoded, points).max() < (0.1 if layout != "ellipse" else 1.0)
    assert (peaks > 0.5).all()


def test_argmax_decoding_is_the_seed_and_quantised():
    codec = HeatmapCodec(refine=False)
    points = realistic_points(16, seed=1)
    decoded, _ = codec.decode(codec.encode(points))
    assert np.abs(decoded - points).max() <= 0.5 + 1e-9
    assert np.allclose(decoded, np.round(decoded))


def test_single_image_encode_and_peak_at_target():
    codec = HeatmapCodec()
    points = np.array([[40.0, 128.0], [216.0, 128.0], [128.0, 60.0], [128.0, 196.0]])
    maps = codec.encode(points)
    assert maps.shape == (4, 256, 256)
    assert maps[0, 128, 40] == pytest.approx(1.0)
    assert maps[0, 128, 45] == pytest.approx(np.exp(-0.5), rel=1e-5)  # one sigma away


def test_unknown_layout_rejected():
    with pytest.raises(ValueError, match="layout"):
        HeatmapCodec(layout="bogus")


@pytest.mark.parametrize("edge_scale_px", [0.0, 4.0])
def test_ellipse_map_keeps_hc_unbiased_through_an_anisotropic_resize(edge_scale_px):
    """Axes fitted in original-pixel geometry: HC survives 800x540 -> 256² -> 128² map -> back, hard or soft edge."""
    from fetalpipe.data.imaging import ResizeTransform

    rng = np.random.default_rng(3)
    transform = ResizeTransform(800, 540, 256)
    truth = []
    for _ in range(32):
        centre = rng.uniform([300, 200], [500, 340])
        semi_major, semi_minor, angle = rng.uniform(150, 220), rng.uniform(100, 140), rng.uniform(0, np.pi)
        major = np.array([np.cos(angle), np.sin(angle)])
        minor = np.array([-major[1], major[0]])
        truth.append([centre - semi_major * major, centre + semi_major * major, centre - semi_minor * minor, centre + semi_minor * minor])
    truth = np.array(truth)
    codec = HeatmapCodec(heatmap_size=128, layout="ellipse", edge_scale_px=edge_scale_px)
    decoded, _ = codec.decode(codec.encode(transform.to_model(truth)), np.tile([800, 540], (32, 1)))
    hc_error_px = biometry_px(transform.to_original(decoded))["hc_ellipse_px"] - biometry_px(truth)["hc_ellipse_px"]
    assert abs(hc_error_px.mean()) < 0.5 and np.abs(hc_error_px).max() < 3.0  # HC is ~1000 px here


def test_soft_edge_ellipse_target_is_a_logistic_of_the_distance_to_the_outline():
    """Along the axis of a circle the soft target is sigmoid(signed distance / scale): 0.5 on the outline."""
    radius_model_px, scale_model_px = 80.0, 4.0
    centre = np.array([128.0, 128.0])
    points = np.array([centre - [radius_model_px, 0], centre + [radius_model_px, 0], centre - [0, radius_model_px], centre + [0, radius_model_px]])
    hard = HeatmapCodec(heatmap_size=128, layout="ellipse").encode(points)[0]
    soft = HeatmapCodec(heatmap_size=128, layout="ellipse", edge_scale_px=scale_model_px).encode(points)[0]
    assert soft.shape == hard.shape == (128, 128) and soft.dtype == np.float32
    row = 64  # heatmap pixel 64 has its centre at model pixel 129.5 (stride 2): within 1.5 px of the centre row
    for column in (14, 20, 24, 30, 40):
        centre_x_model = (column + 0.5) * 2 - 0.5
        signed_distance_model_px = radius_model_px - np.hypot(centre_x_model - 128.0, 129.5 - 128.0)
        expected = 1 / (1 + np.exp(-signed_distance_model_px / scale_model_px))
        assert soft[row, column] == pytest.approx(expected, abs=0.03)
    # The soft edge spreads over many more pixels than the anti-aliased one, and both agree far from it.
    assert ((soft > 0.05) & (soft < 0.95)).sum() > 5 * ((hard > 0.05) & (hard < 0.95)).sum()
    assert soft[64, 64] > 0.99 and soft[0, 0] < 0.01


def test_coordinate_targets_round_trip_exactly_and_in_unit_range():
    """The §d baseline's target: ordered endpoints / input size, decoded back to the same model pixels."""
    codec = HeatmapCodec(input_size=256, layout="coordinates")
    points = realistic_points(16, seed=3)
    targets = codec.encode(points)
    assert targets.shape == (16, *codec.target_shape) == (16, 8) and targets.dtype == np.float32
    assert targets.min() > 0 and targets.max() < 1
    decoded, confidence = codec.decode(targets)
    assert np.abs(decoded - points).max() < 1e-3
    assert np.isnan(confidence).all()  # a regressed point has no peak value
