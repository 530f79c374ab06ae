import io

import cv2
import numpy as np
import pytest

from fetalpipe.data.imaging import ImageDecodeError, ResizeTransform, decode_image, read_image, resize_to_model


def encoded(image, extension, params=()):
    ok, buffer = cv2.imencode(extension, image, list(params))
    assert ok
    return buffer.tobytes()


GRAY = (np.arange(60 * 80).reshape(60, 80) % 256).astype(np.uint8)


@pytest.mark.parametrize("extension", [".png", ".bmp", ".tif"])
def test_lossless_8bit_gray_formats_decode_exactly(extension):
    decoded = decode_image(encoded(GRAY, extension))
    assert decoded.pixels.dtype == np.float32 and decoded.pixels.shape == (60, 80)
    assert np.allclose(decoded.pixels, GRAY / 255.0)
    assert decoded.pixel_spacing_mm is None


def test_jpeg_decodes_close_to_source():
    smooth = cv2.GaussianBlur(GRAY, (9, 9), 3)
    decoded = decode_image(encoded(smooth, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]))
    assert np.abs(decoded.pixels - smooth / 255.0).mean() < 0.02


@pytest.mark.parametrize("extension", [".png", ".tif"])
def test_16bit_scaled_to_unit(extension):
    image = (GRAY.astype(np.uint16) * 257)
    decoded = decode_image(encoded(image, extension))
    assert np.allclose(decoded.pixels, GRAY / 255.0, atol=1e-6)


def test_colour_becomes_gray():
    colour = np.dstack([GRAY, GRAY, GRAY])
    decoded = decode_image(encoded(colour, ".png"))
    assert decoded.pixels.shape == (60, 80)
    assert np.allclose(decoded.pixels, GRAY / 255.0, atol=1 / 255)


def test_format_is_found_by_content_not_name(tmp_path):
    path = tmp_path / "really_a_jpeg.png"
    path.write_bytes(encoded(GRAY, ".jpg"))
    assert read_image(str(path)).pixels.shape == (60, 80)


def make_dicom(pixels, spacing=None, frames=1):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # ultrasound image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "US"
    dataset.Rows, dataset.Columns = pixels.shape[-2:]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
    dataset.PixelRepresentation = 0
    if frames > 1:
        dataset.NumberOfFrames = frames
    if spacing is not None:
        dataset.PixelSpacing = [spacing, spacing]
    dataset.PixelData = pixels.astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_dicom_pixels_and_spacing():
    pixels = GRAY.astype(np.uint16) * 100
    decoded = decode_image(make_dicom(pixels, spacing=0.125))
    assert decoded.pixel_spacing_mm == pytest.approx(0.125)
    assert decoded.pixels.shape == (60, 80)
    assert decoded.pixels.max() == pytest.approx(1.0) and decoded.pixels.min() == pytest.approx(0.0)


def test_dicom_without_spacing_and_multiframe():
    frames = np.stack([GRAY, 255 - GRAY]).astype(np.uint16)
    decoded = decode_image(make_dicom(frames, frames=2))
    assert decoded.pixel_spacing_mm is None
    assert decoded.pixels.shape == (60, 80)
    assert np.allclose(decoded.pixels, GRAY / 255.0, atol=1e-3)  # first frame


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"hello, this is not an image\n", "text"),
        (encoded(GRAY, ".png")[:100], "PNG signature"),
        (b"\x00\x01\x02\x03" * 50, "unknown format"),
    ],
)
def test_bad_bytes_raise_clear_errors(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(ImageDecodeError, match="not found"):
        read_image(str(tmp_path / "nope.png"))
    with pytest.raises(ImageDecodeError, match="directory"):
        read_image(str(tmp_path))


def test_one_pixel_image_rejected():
    with pytest.raises(ImageDecodeError, match="too small"):
        decode_image(encoded(np.zeros((1, 1), np.uint8), ".png"))


def test_transform_round_trip_and_matches_cv2_resize():
    transform = ResizeTransform(original_width=800, original_height=540, input_size=256)
    points = np.array([[0.0, 0.0], [799.0, 539.0], [123.4, 456.7]])
    assert np.allclose(transform.to_original(transform.to_model(points)), points)
    # A bright square centred at a known original point lands where the transform says.
    image = np.zeros((540, 800), np.float32)
    image[300:310, 400:410] = 1.0  # centre (404.5, 304.5)
    resized, transform = resize_to_model(image, 256)
    ys, xs = np.mgrid[0:256, 0:256]
    centroid = np.array([(resized * xs).sum(), (resized * ys).sum()]) / resized.sum()
    assert np.allclose(transform.to_model(np.array([404.5, 304.5])), centroid, atol=0.05)
    assert np.allclose(transform.to_original(centroid), [404.5, 304.5], atol=0.2)


def test_portrait_frames_are_turned_a_quarter_before_the_stretch_and_points_follow():
    from fetalpipe.data.imaging import ResizeTransform, resize_to_model

    portrait = np.zeros((800, 540), np.float32)
    portrait[600:606, 100:106] = 1.0  # a dot at original (102.5, 602.5)
    resized, transform = resize_to_model(portrait, 256)
    assert transform.quarter_turn and transform.frame_size == (800, 540)
    ys, xs = np.nonzero(resized > 0.2)
    weights = resized[ys, xs]
    dot_model = np.array([np.average(xs, weights=weights), np.average(ys, weights=weights)])
    assert np.linalg.norm(transform.to_model(np.array([102.5, 602.5])) - dot_model) < 0.5
    points = np.array([[0.0, 0.0], [539.0, 799.0], [102.5, 602.5]])
    assert np.allclose(transform.to_original(transform.to_model(points)), points)
    assert not ResizeTransform.for_image(800, 540, 256).quarter_turn


def test_clamp_brightness_brightens_only_scans_darker_than_the_training_images():
    from fetalpipe.data.imaging import BLACK_LEVEL, TRAINING_DARKEST_CONTENT_MEDIAN, clamp_brightness, content_median

    rng = np.random.default_rng(0)
    scan = np.zeros((540, 800), np.float32)  # black outside the sector
    scan[40:500, 100:700] = np.clip(rng.gamma(2.0, 0.08, (460, 600)), 0, 1)
    assert content_median(scan) > TRAINING_DARKEST_CONTENT_MEDIAN
    assert clamp_brightness(scan) is scan  # as bright as training scans: untouched
    bright = scan ** 0.4
    assert clamp_brightness(bright) is bright  # brighter ones too: clipped echoes cannot be recovered
    dark = scan ** 2.2
    assert content_median(dark) < TRAINING_DARKEST_CONTENT_MEDIAN
    clamped = clamp_brightness(dark)
    assert clamped.dtype == np.float32 and clamped.shape == scan.shape
    was_content = dark[::4, ::4] > BLACK_LEVEL  # the pixels whose median was measured, now at the training's darkest
    assert np.median(clamped[::4, ::4][was_content]) == pytest.approx(TRAINING_DARKEST_CONTENT_MEDIAN, abs=0.002)
    assert (clamped[scan == 0] == 0).all()  # black stays black
    order = np.argsort(dark[40:500, 100:700].ravel()[:5000])
    assert (np.diff(clamped[40:500, 100:700].ravel()[:5000][order]) >= 0).all()  # a gamma keeps the order of grey levels
    assert clamp_brightness(np.zeros((10, 10), np.float32)).max() == 0  # all black: nothing to measure
