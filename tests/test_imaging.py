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


def test_every_level_decodes_to_the_float32_quotient_exactly():
    """Each uint8 and uint16 level becomes float32(level) / max to the bit: the model's inputs and the size line fitted on
    them stay what they were however the conversion is computed."""
    for levels, maximum in ((np.arange(256, dtype=np.uint8).reshape(16, 16), 255.0),
                            (np.arange(65536, dtype=np.uint16).reshape(256, 256), 65535.0)):
        decoded = decode_image(encoded(levels, ".png")).pixels
        np.testing.assert_array_equal(decoded, levels.astype(np.float32) / np.float32(maximum))


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


@pytest.mark.parametrize("value", [0, 128, 255])
def test_a_blank_frame_is_refused_with_its_grey(value):
    with pytest.raises(ImageDecodeError, match=f"blank image: every pixel is the same grey \\({value} of 255\\)"):
        decode_image(encoded(np.full((540, 800), value, np.uint8), ".png"))
    with pytest.raises(ImageDecodeError, match="blank image"):
        decode_image(encoded(np.full((540, 800), value * 257, np.uint16), ".png"))


def test_a_dark_frame_with_any_content_is_not_blank():
    frame = np.zeros((540, 800), np.uint8)
    frame[200:202, 300:302] = 2  # two grey levels of content in a black frame
    assert decode_image(encoded(frame, ".png")).pixels.max() == pytest.approx(2 / 255)


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


def _speckle_scan(rng, height, width):
    """A stand-in for a scan: speckle in a sector-free rectangle, with a dark band inside (fluid) and a bright arc."""
    scan = np.clip(rng.gamma(2.0, 0.12, (height, width)), 0, 1).astype(np.float32)
    scan[height // 3: 2 * height // 3, width // 4: 3 * width // 4] *= 0.1
    return scan


def _screenshot(scan, background):
    """The scan at (260, 130) in a 1220 x 800 frame of one grey, with a greyscale bar and lines of text."""
    frame = np.full((scan.shape[0] + 260, scan.shape[1] + 420), background, np.float32)
    frame[130:130 + scan.shape[0], 260:260 + scan.shape[1]] = scan
    frame[150:406, 40:64] = np.linspace(1, 0, 256, dtype=np.float32)[:, None]
    text = np.zeros(frame.shape, np.uint8)
    for line in range(4):
        cv2.putText(text, "FR 32Hz  MI 0.9  Gn 54", (20, 30 + 28 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.7, 230, 1, cv2.LINE_AA)
    return np.maximum(frame, text.astype(np.float32) / 255)


SCREEN_GREY = 18 / 255  # a scanner screen's dark grey


def test_scan_region_crops_a_screenshot_to_its_scan_without_cutting_it():
    from fetalpipe.data.imaging import scan_region

    scan = _speckle_scan(np.random.default_rng(1), 540, 800)
    frame = _screenshot(scan, SCREEN_GREY)
    left, top, width, height = scan_region(frame)
    assert left <= 260 and top <= 130 and left + width >= 1060 and top + height >= 670  # the whole scan is kept
    assert width * height < 0.6 * frame.size  # and the margins, the bar and the text are not
    assert width / height == pytest.approx(1220 / 800, rel=0.01)  # the frame's stretch, so the head keeps its shape
    # Stage 1's input is the region: a point of the scan lands where the transform says, and maps back exactly.
    resized, transform = resize_to_model(frame, 256, (left, top, width, height))
    assert transform.region_box == (left, top, width, height) and not transform.quarter_turn
    assert np.allclose(resized, cv2.resize(frame[top:top + height, left:left + width], (256, 256), interpolation=cv2.INTER_AREA))
    points = np.array([[260.0, 130.0], [1059.0, 669.0], [612.3, 401.7]])
    assert np.allclose(transform.to_original(transform.to_model(points)), points, atol=1e-9)
    assert np.allclose(transform.to_model(np.array([left - 0.5, top - 0.5])), [-0.5, -0.5])


def test_scan_region_keeps_whole_frames_and_marks_on_blank_frames():
    from fetalpipe.data.imaging import scan_region

    rng = np.random.default_rng(2)
    scan = _speckle_scan(rng, 540, 800)
    assert scan_region(scan) == (0, 0, 800, 540)  # a scan that fills its frame
    framed = np.zeros((540, 800), np.float32)
    framed[20:520, 30:770] = scan[20:520, 30:770]
    assert scan_region(framed) == (0, 0, 800, 540)  # narrow margins: not worth a crop
    dot = np.zeros((540, 800), np.float32)
    dot[300:340, 400:440] = 1.0
    assert scan_region(dot) == (0, 0, 800, 540)  # a mark on a blank frame is not a scan
    busy = _screenshot(scan, SCREEN_GREY)
    busy[700:780, :] = rng.random((80, 1220)).astype(np.float32)  # the margins carry more than text: no crop
    assert scan_region(busy) == (0, 0, 1220, 800)
    # Black margins are never cut: a dark scan's own edge is as black (and every HC18 frame has them outside its sector).
    assert scan_region(_screenshot(scan, 0.0)) == (0, 0, 1220, 800)


def test_scan_region_keeps_the_parts_of_a_scan_that_dark_tissue_separates():
    from fetalpipe.data.imaging import scan_region

    scan = _speckle_scan(np.random.default_rng(3), 540, 800)
    scan[300:540] = SCREEN_GREY  # the far half lost to attenuation, as dark as the screen's grey ...
    # ... but for the skull's far wall. A wall this thick is kept; one of 24 px, under a tenth of the scan's largest
    # part, is not (`imaging.SCAN_PART_MIN_FRACTION`; on HC18's screenshots no crop cuts a head).
    cv2.ellipse(scan, (400, 300), (300, 200), 0, 20, 160, 0.9, 32)
    left, top, width, height = scan_region(_screenshot(scan, SCREEN_GREY))
    assert top + height >= 130 + 500  # the wall (its lowest point: y = 500 in the scan) is inside the region


def test_region_transform_with_a_quarter_turn_round_trips():
    transform = ResizeTransform.for_image(1000, 1400, 256, region=(100, 200, 540, 800))
    assert transform.quarter_turn and transform.frame_size == (800, 540)
    points = np.array([[100.0, 200.0], [639.0, 999.0], [321.5, 654.25]])
    assert np.allclose(transform.to_original(transform.to_model(points)), points, atol=1e-9)
    assert np.allclose(transform.to_model(np.array([[100.0, 200.0]])), [[(799 + 0.5) * 256 / 800 - 0.5, 0.5 * 256 / 540 - 0.5]])



def test_the_scan_region_travels_with_a_batch_from_decode_to_training_targets(tmp_path):
    """Training labels and stage 1's decoding rebuild each row's transform from the batch: the crop must be in it."""
    from fetalpipe import LANDMARK_COLUMNS
    from fetalpipe.model.heatmaps import HeatmapCodec
    from fetalpipe.data.imaging import scan_region
    from fetalpipe.pipeline.preprocess import decode_batch, encode_batch, scale_landmarks_batch, transforms_of

    frame = _screenshot(_speckle_scan(np.random.default_rng(4), 540, 800), SCREEN_GREY)
    path = tmp_path / "screenshot.png"
    cv2.imwrite(str(path), np.round(frame * 255).astype(np.uint8))
    points = np.array([[400.0, 300.0], [900.0, 500.0], [600.0, 250.0], [700.0, 550.0]])  # original pixels
    batch = {"image_path": np.array([str(path)], dtype=object), **{column: np.array([value]) for column, value in zip(LANDMARK_COLUMNS, points.ravel())}}
    decoded = decode_batch(batch, 256)
    region = tuple(decoded["scan_region"][0])
    assert region != (0, 0, 1220, 800) and region == scan_region(decode_image(path.read_bytes()).pixels)
    labelled = scale_landmarks_batch(decoded, 256)
    expected = ResizeTransform.for_image(1220, 800, 256, region).to_model(points)
    assert np.allclose(labelled["points_model"][0], expected, atol=1e-4)
    encoded_batch = encode_batch(labelled, HeatmapCodec(input_size=256, heatmap_size=128, layout="ellipse"), augment=None)
    transform = transforms_of(encoded_batch, 256)[0]  # what the validation loop decodes with
    assert transform.region_box == region and np.allclose(transform.to_original(expected), points)


def test_stage1_input_crops_inside_grey_margins_at_once_and_only_proposes_a_crop_inside_black_ones():
    from fetalpipe.data.imaging import scan_region
    from fetalpipe.pipeline.preprocess import stage1_input

    scan = _speckle_scan(np.random.default_rng(5), 540, 800)
    grey, black = _screenshot(scan, SCREEN_GREY), _screenshot(scan, 0.0)
    _, transform, candidate = stage1_input(grey, 256)
    assert transform.is_cropped and transform.region_box == candidate == scan_region(grey)
    _, transform, candidate = stage1_input(black, 256)
    assert not transform.is_cropped and candidate == scan_region(black, black_margins=True) != (0, 0, 1220, 800)
    _, transform, candidate = stage1_input(scan, 256)
    assert not transform.is_cropped and candidate == (0, 0, 800, 540)


def _turned(frame, angle_deg):
    """FRAME turned by ANGLE_DEG (counter-clockwise) inside a frame grown to hold all of it, and the 2x3 map of its points."""
    height, width = frame.shape
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle_deg, 1.0)
    corners = np.array([[0, 0], [width - 1, 0], [0, height - 1], [width - 1, height - 1]], float) @ matrix[:, :2].T + matrix[:, 2]
    matrix[:, 2] -= corners.min(axis=0)
    size = np.ceil(np.ptp(corners, axis=0)).astype(int) + 1
    return cv2.warpAffine(frame, matrix, (int(size[0]), int(size[1])), flags=cv2.INTER_LINEAR, borderValue=0.0), matrix


@pytest.mark.parametrize("angle_deg", [37.0, -28.0, 127.0])
def test_a_frame_turned_with_its_scan_is_turned_upright_whole_and_its_points_map_back(angle_deg):
    from fetalpipe.data.imaging import upright_turn

    scan = _speckle_scan(np.random.default_rng(2), 540, 800) * 0.8 + 0.1  # no black inside the scan
    scan[300:306, 500:506] = 1.0  # a dot at (502.5, 302.5)
    frame, scan_to_frame = _turned(scan, angle_deg)
    turn = upright_turn(frame)
    assert turn is not None
    upright = turn.apply(frame)
    assert upright_turn(upright) is None  # upright now: nothing left to turn
    corners = np.array([[0, 0], [799, 0], [0, 539], [799, 539]], float) @ scan_to_frame[:, :2].T + scan_to_frame[:, 2]
    corners_upright = turn.to_upright(corners)
    assert (corners_upright >= -1).all() and (corners_upright <= [turn.width, turn.height]).all()  # the whole scan is kept
    long_side, short_side = max(turn.width, turn.height), min(turn.width, turn.height)
    assert long_side / short_side == pytest.approx(800 / 540, rel=0.02) and long_side < 1.1 * 800
    dot_frame = np.array([502.5, 302.5]) @ scan_to_frame[:, :2].T + scan_to_frame[:, 2]
    ys, xs = np.nonzero(upright > 0.95)
    assert np.linalg.norm(turn.to_upright(dot_frame) - [xs.mean(), ys.mean()]) < 1.0  # the dot is where the transform says
    points = np.array([[0.0, 0.0], [812.4, 233.9], dot_frame])
    assert np.allclose(turn.to_original(turn.to_upright(points)), points, atol=1e-9)


def test_frames_whose_scan_is_upright_or_not_a_tilted_box_are_not_turned():
    import pandas as pd

    from fetalpipe.data.imaging import upright_turn
    from conftest import SAMPLE_DIR, SAMPLE_MANIFEST

    scan = _speckle_scan(np.random.default_rng(3), 540, 800) * 0.8 + 0.1
    assert upright_turn(np.pad(scan, 100)) is None
    assert upright_turn(np.rot90(np.pad(scan, 100)).copy()) is None
    assert upright_turn(_turned(scan, 12.0)[0]) is None  # a little tilt is within what stage 1 trained on
    assert upright_turn(np.zeros((540, 800), np.float32)) is None
    for path in pd.read_csv(SAMPLE_MANIFEST)["image_path"]:  # HC18's fan-shaped sectors do not fill a tilted box
        assert upright_turn(read_image(f"{SAMPLE_DIR}/{path}").pixels) is None, path


def _fan_scan(rng, height=540, width=800, half_angle_deg=35.0):
    """A stand-in for HC18's frames: speckle inside a fan-shaped sector (apex at the top middle), black around it."""
    ys, xs = np.mgrid[0:height, 0:width]
    radius, angle = np.hypot(xs - width / 2, ys + 40), np.degrees(np.arctan2(xs - width / 2, ys + 40))
    inside = (np.abs(angle) <= half_angle_deg) & (radius >= 80) & (radius <= height + 20)
    return np.where(inside, np.clip(rng.gamma(2.0, 0.12, (height, width)), 0.05, 1), 0).astype(np.float32)


@pytest.mark.parametrize("angle_deg", [30.0, -40.0])
def test_a_fan_shaped_scan_turned_with_its_frame_is_turned_until_it_is_mirror_symmetric_again(angle_deg):
    from fetalpipe.data.imaging import _mirror_symmetric_turn_deg, upright_turn

    fan = _fan_scan(np.random.default_rng(4))
    assert upright_turn(fan) is None and upright_turn(_turned(fan, 12.0)[0]) is None
    frame, fan_to_frame = _turned(fan, angle_deg)
    turn = upright_turn(frame)
    assert turn is not None
    upright = turn.apply(frame)
    assert upright_turn(upright) is None
    assert abs(_mirror_symmetric_turn_deg((upright[::4, ::4] > 0.02).astype(np.uint8))) <= 3
    apex = np.array([400.0, 0.0]) @ fan_to_frame[:, :2].T + fan_to_frame[:, 2]  # above the fan: the sector's apex side
    arc = np.array([400.0, 539.0]) @ fan_to_frame[:, :2].T + fan_to_frame[:, 2]
    apex_upright, arc_upright = turn.to_upright(apex), turn.to_upright(arc)
    assert abs(apex_upright[0] - arc_upright[0]) < 0.1 * abs(apex_upright[1] - arc_upright[1]) and apex_upright[1] < arc_upright[1]
