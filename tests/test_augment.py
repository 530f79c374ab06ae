"""Augmentation moves image and landmarks together, for stage 1 (model pixels) and the refinement stage (original pixels)."""

import numpy as np

from fetalpipe.data.augment import (ARCHIVE_AUGMENT, AcquisitionAugmentConfig, AugmentConfig, degrade_acquisition, degrade_intensity, random_affine,
                                   random_screenshot)


def _blob_centre(image):
    ys, xs = np.nonzero(image > 0.5)
    return np.array([xs.mean(), ys.mean()])


def test_archive_affine_moves_each_landmark_with_the_image_under_any_rotation_and_stretch():
    rng = np.random.default_rng(0)
    angles, aspects = [], []
    for _ in range(20):
        image = np.zeros((256, 256), np.float32)
        image[120:130, 60:70] = 1.0  # a blob at (64.5, 124.5)
        points = np.array([[64.5, 124.5], [10.0, 10.0], [200.0, 30.0], [128.0, 128.0]])
        warped, moved = random_affine(image, points, ARCHIVE_AUGMENT, rng)
        if (warped > 0.5).sum() > 20:  # still inside the frame
            assert np.linalg.norm(_blob_centre(warped) - moved[0]) < 1.0
        linear = np.linalg.lstsq(np.c_[points, np.ones(4)], moved, rcond=None)[0][:2].T
        angles.append(np.degrees(np.arctan2(linear[1, 0], linear[0, 0])))
        aspects.append(np.linalg.norm(linear[:, 0]) / np.linalg.norm(linear[:, 1]))
    assert np.ptp(angles) > 180  # the full circle, not ±20°
    assert max(aspects) / min(aspects) > 1.2  # frames of another shape


def test_standard_affine_keeps_the_square_aspect():
    rng = np.random.default_rng(1)
    points = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [50.0, 50.0]])
    for _ in range(10):
        _, moved = random_affine(np.zeros((256, 256), np.float32), points, AugmentConfig(), rng)
        assert np.linalg.norm(moved[1] - moved[0]) == np.linalg.norm(moved[2] - moved[0]) or np.isclose(
            np.linalg.norm(moved[1] - moved[0]), np.linalg.norm(moved[2] - moved[0]))


def test_acquisition_degradations_keep_shape_type_and_range():
    rng = np.random.default_rng(2)
    config = AcquisitionAugmentConfig(resample_probability=1.0, jpeg_probability=1.0, speckle_probability=1.0, noise_probability=1.0)
    pixels = (rng.random((60, 80)) * 255).astype(np.uint8)
    degraded = degrade_acquisition(pixels, config, rng)
    assert degraded.shape == pixels.shape and degraded.dtype == np.uint8 and not np.array_equal(degraded, pixels)
    crop = degrade_intensity(rng.random((32, 16)).astype(np.float32), config, rng)
    assert crop.dtype == np.float32 and crop.min() >= 0.0 and crop.max() <= 1.0


def test_screenshot_shrinks_the_frame_into_a_canvas_and_moves_each_landmark_with_it():
    rng = np.random.default_rng(1)
    for _ in range(10):
        image = np.full((256, 256), 0.3, np.float32)
        image[120:130, 60:70] = 1.0  # a blob at (64.5, 124.5)
        points = np.array([[64.5, 124.5], [0.0, 0.0], [255.0, 255.0], [128.0, 128.0]])
        canvas, moved = random_screenshot(image, points, rng)
        assert canvas.shape == image.shape and canvas.dtype == np.float32
        blob = canvas > 0.99  # the canvas is darker than the image; text and the bar are drawn outside the image
        import cv2

        content = (np.abs(canvas - 0.3) < 0.002).astype(np.uint8)  # text is drawn in 8-bit steps, none of them 0.3
        _, labels, stats, _ = cv2.connectedComponentsWithStats(content)
        ys, xs = np.nonzero(labels == 1 + np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        assert np.ptp(xs) < 0.9 * 256 and np.ptp(ys) < 0.9 * 256  # shrunk: margins for the screen around it
        near = np.hypot(*(np.stack(np.nonzero(blob)[::-1]) - moved[0][:, None]))
        assert near.min() < 1.5
        assert xs.min() - 1 <= moved[1][0] and moved[2][0] <= xs.max() + 1  # the frame's corners stay the content's corners
