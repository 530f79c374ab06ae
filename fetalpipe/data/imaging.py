"""Decode ultrasound images of any common format to gray float, and map points between spaces.

Two coordinate spaces exist in fetalpipe:
  * original pixels: the decoded image as stored on disk (x right, y down, OpenCV pixel-centre
    convention: the centre of the top-left pixel is (0, 0));
  * model pixels: the resized network input (``input_size`` × ``input_size``): the frame, or the scan region found
    in it (`scan_region`: a scanner screenshot's scan without its margins), stretched to a square.
`ResizeTransform` is the only place that converts between them. A frame turned by a scanner or an export tool (its
scan tilted) can be measured a second time turned upright (`upright_turn`); `TurnTransform` maps between its
original pixels and the upright frame's, which then play the part of original pixels.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import cv2
import numpy as np

from fetalpipe.runtime import storage

DICOM_MAGIC_OFFSET = 128
# The training split's darkest scans: the 1st percentile, over its 658 images, of each image's median content pixel
# (`content_median`), measured by `python studies/content_brightness.py --manifest runs/hc18_train.csv`.
TRAINING_DARKEST_CONTENT_MEDIAN = 0.059
# Its lower quartile, from the same measurement (`studies/brightness_clamp.py`'s p25 threshold): a flagged frame darker than
# this is measured again brightened to it (`LandmarkPredictor.measure_dark_frames_brightened`).
TRAINING_LOWER_QUARTILE_CONTENT_MEDIAN = 0.125
BLACK_LEVEL = 5 / 255  # pixels at or below this are the black outside the scan's sector, not content
# `scan_region`: a frame is cropped to its scan only where its border is not black (inside black margins the crop is a
# candidate that stage 1 confirms), the scan covers less than this share of it (a screenshot's scan: 45 %) and the rest
# is nearly all the border's colour (text and a greyscale bar are the rest). No HC18 frame is cropped at once
# (python studies/scan_region.py --manifest runs/hc18.csv).
SCAN_MAX_AREA_FRACTION = 0.75
SCAN_MIN_AREA_FRACTION = 0.2  # less is a mark on a blank frame, not a scan: the frame is used whole
SCAN_MIN_BACKGROUND_FRACTION = 0.9
SCAN_BACKGROUND_TOLERANCE = 0.03  # grey levels within this of the border's median are background
SCAN_PART_MIN_FRACTION = 0.1  # a region this share of the largest one's size is part of the scan
SCAN_MARGIN_FRACTION = 0.04  # kept around the scan, of its size on each side
SCAN_SEARCH_LONG_SIDE_PX = 256  # the search runs on the frame shrunk to at most this (about 1 ms a frame)
# `upright_turn`: a frame is turned upright where its scan is tilted at least TILT_MIN_DEG (stage 1 trained on ±20°). A
# scan that fills TILT_MIN_FILL of its smallest box is a rectangle turned with its frame, tilted as that box; at 0.8 a
# dark scan's ragged edge does not pass for one (docs/experiments.md). Any other scan (HC18's fan-shaped sector) is tilted
# by the turn that makes it most nearly mirror-symmetric, searched over ±60° and used up to ±45°: the search's best
# angle at its ends (±60°) is no symmetry found, and beyond 45° a frame is nearer a quarter turn.
TILT_MIN_DEG = 20.0
TILT_MIN_FILL = 0.8
SECTOR_SEARCH_ANGLES_DEG = np.arange(-60, 61, 3)
SECTOR_MAX_TILT_DEG = 45.0
TILT_SEARCH_LONG_SIDE_PX = 256  # the search runs on the frame shrunk by a whole factor to at most this (4 for 800 × 540)
UPRIGHT_MARGIN_FRACTION = 0.02  # kept around the turned scan's box, of its size on each side
UPRIGHT_ASPECT = 800 / 540  # the upright frame is grown to HC18's landscape shape, the frames stage 1 was trained on


class ImageDecodeError(ValueError):
    """The bytes are not an image fetalpipe can read, or hold nothing to measure; the message says why."""


# A frame whose pixels span less than this (of the [0, 1] grey range: under 2 of 8-bit's 256 levels) is blank: a
# dropped or black frame in an archive. It holds no head, and stage 1 would outline one anyway at low confidence.
BLANK_MAX_RANGE = 2 / 255


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # float32 [H, W] gray, scaled to [0, 1]
    pixel_spacing_mm: float | None  # from the file itself (DICOM); None when the format has none


@dataclass(frozen=True)
class ResizeTransform:
    """The stretch from an original image (width × height), or from its `region` (left, top, width, height in original
    pixels: the scan inside a screenshot, `scan_region`), to a square model input. With `quarter_turn` (portrait
    frames: `for_image`) the region is first turned 90° clockwise, so that stage 1 always sees a landscape frame and a
    head stretched the way it was in training; a head upside down after the turn is one the flips of training cover."""

    original_width: int
    original_height: int
    input_size: int
    quarter_turn: bool = False
    region: tuple[int, int, int, int] | None = None  # None: the whole frame

    @classmethod
    def for_image(cls, width: int, height: int, input_size: int, region=None) -> "ResizeTransform":
        region = (0, 0, int(width), int(height)) if region is None else tuple(int(value) for value in region)
        return cls(int(width), int(height), input_size, quarter_turn=region[3] > region[2], region=region)

    @property
    def region_box(self) -> tuple[int, int, int, int]:
        """(left, top, width, height) of the part of the original that is stretched."""
        return self.region if self.region is not None else (0, 0, self.original_width, self.original_height)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the frame that is stretched: the region, or the region turned a quarter."""
        _, _, width, height = self.region_box
        return (height, width) if self.quarter_turn else (width, height)

    @property
    def scale_xy(self) -> np.ndarray:
        """Model pixels per frame pixel along x and y."""
        frame_width, frame_height = self.frame_size
        return np.array([self.input_size / frame_width, self.input_size / frame_height])

    def to_model(self, points_original_px: np.ndarray) -> np.ndarray:
        """Original-pixel points [..., 2] to model-input pixels (pixel-centre aligned, as cv2.resize)."""
        left, top, _, height = self.region_box
        points = np.asarray(points_original_px, dtype=np.float64) - [left, top]
        if self.quarter_turn:  # clockwise: (x, y) -> (H - 1 - y, x)
            points = np.stack([height - 1 - points[..., 1], points[..., 0]], axis=-1)
        return (points + 0.5) * self.scale_xy - 0.5

    def to_original(self, points_model_px: np.ndarray) -> np.ndarray:
        """Model-input pixel points [..., 2] back to original pixels."""
        left, top, _, height = self.region_box
        points = (np.asarray(points_model_px, dtype=np.float64) + 0.5) / self.scale_xy - 0.5
        if self.quarter_turn:
            points = np.stack([points[..., 1], height - 1 - points[..., 0]], axis=-1)
        return points + [left, top]

    @property
    def is_cropped(self) -> bool:
        return self.region_box != (0, 0, self.original_width, self.original_height)

    def outline_share_off_region(self, points_original_px: np.ndarray) -> float:
        """Of an ellipse's outline (its [4, 2] endpoints, original pixels) inside the frame, the share outside the region:
        above 0, the crop may have cut the head."""
        from fetalpipe.measure import ellipse as ellipse_geometry

        outline = ellipse_geometry.outline(ellipse_geometry.from_endpoints(points_original_px), 180)
        left, top, width, height = self.region_box
        in_frame = (outline >= 0).all(axis=1) & (outline[:, 0] <= self.original_width - 1) & (outline[:, 1] <= self.original_height - 1)
        in_region = (outline[:, 0] >= left) & (outline[:, 0] <= left + width - 1) & (outline[:, 1] >= top) & (outline[:, 1] <= top + height - 1)
        return float(np.mean(in_frame & ~in_region))


@dataclass(frozen=True)
class TurnTransform:
    """A frame turned upright: original pixels -> upright pixels by a rotation about the scan's centre and a shift
    (`matrix`, 2 × 3, as cv2.warpAffine takes it), into a `width` × `height` upright frame."""

    matrix: tuple[tuple[float, float, float], tuple[float, float, float]]
    width: int
    height: int

    def to_upright(self, points_original_px: np.ndarray) -> np.ndarray:
        matrix = np.array(self.matrix)
        return np.asarray(points_original_px, dtype=np.float64) @ matrix[:, :2].T + matrix[:, 2]

    def to_original(self, points_upright_px: np.ndarray) -> np.ndarray:
        inverse = cv2.invertAffineTransform(np.array(self.matrix))
        return np.asarray(points_upright_px, dtype=np.float64) @ inverse[:, :2].T + inverse[:, 2]

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """The upright frame, float32 [height, width]; black where the original has no pixels."""
        return cv2.warpAffine(pixels, np.array(self.matrix), (self.width, self.height), flags=cv2.INTER_LINEAR, borderValue=0.0).astype(np.float32)


def upright_turn(pixels: np.ndarray) -> TurnTransform | None:
    """How to turn a [H, W] float frame upright, or None where its scan is not tilted. The scan is the largest region
    brighter than `BLACK_LEVEL`. Where its convex hull fills the smallest box around it (`TILT_MIN_FILL`: a rectangular
    scan), the tilt is the box's; otherwise (a fan-shaped sector, as HC18's) it is the turn that makes the region most
    nearly mirror-symmetric about a vertical line (`SECTOR_SEARCH_ANGLES_DEG`), taken only up to `SECTOR_MAX_TILT_DEG`.
    Either is used from `TILT_MIN_DEG`. The upright frame holds the region, with a margin, grown to `UPRIGHT_ASPECT`."""
    shrink = max(1, int(np.ceil(max(pixels.shape) / TILT_SEARCH_LONG_SIDE_PX)))
    mask = cv2.morphologyEx((pixels[::shrink, ::shrink] > BLACK_LEVEL).astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask)
    if count < 2:
        return None
    largest = (labels == 1 + np.argmax(stats[1:, cv2.CC_STAT_AREA])).astype(np.uint8)
    contours, _ = cv2.findContours(largest, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(max(contours, key=cv2.contourArea))[:, 0, :].astype(np.float32)
    (centre_x, centre_y), (box_width, box_height), angle_deg = cv2.minAreaRect(hull)
    if cv2.contourArea(hull) >= TILT_MIN_FILL * box_width * box_height:
        angle_deg %= 90  # the box's tilt, whichever of its sides OpenCV measured it from, in (-45, 45]
        if angle_deg > 45:
            angle_deg -= 90
    else:
        angle_deg = _mirror_symmetric_turn_deg(largest)
        if abs(angle_deg) > SECTOR_MAX_TILT_DEG:
            return None
    if abs(angle_deg) < TILT_MIN_DEG:
        return None
    # Rotating by that angle makes the box axis-aligned, or the sector's axis vertical: landscape, or portrait (then
    # `ResizeTransform.for_image` turns it a quarter more, as it does any portrait frame).
    centre = np.array([centre_x, centre_y]) * shrink
    matrix = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), float(angle_deg), 1.0)
    hull_upright = hull.astype(np.float64) * shrink @ matrix[:, :2].T + matrix[:, 2]
    size = np.ptp(hull_upright, axis=0) * (1 + 2 * UPRIGHT_MARGIN_FRACTION)
    aspect = UPRIGHT_ASPECT if size[0] >= size[1] else 1 / UPRIGHT_ASPECT
    width, height = (int(np.ceil(value)) for value in np.maximum(size, [size[1] * aspect, size[0] / aspect]))
    middle = (hull_upright.min(axis=0) + hull_upright.max(axis=0)) / 2
    matrix[:, 2] += [width / 2 - middle[0], height / 2 - middle[1]]
    return TurnTransform(matrix=tuple(tuple(float(value) for value in row) for row in matrix), width=width, height=height)


def _mirror_symmetric_turn_deg(mask: np.ndarray) -> float:
    """The angle (`SECTOR_SEARCH_ANGLES_DEG`) whose turn about the region's centroid leaves a uint8 [h, w] mask most
    nearly its own mirror image about the vertical through that centroid (overlap with the mirror / area)."""
    ys, xs = np.nonzero(mask)
    centre_x, centre_y = xs.mean(), ys.mean()
    side = int(np.ceil(np.hypot(*mask.shape))) | 1
    scores = []
    for angle_deg in SECTOR_SEARCH_ANGLES_DEG:
        matrix = cv2.getRotationMatrix2D((float(centre_x), float(centre_y)), float(angle_deg), 1.0)
        matrix[:, 2] += [side / 2 - centre_x, side / 2 - centre_y]  # the centroid to the middle column
        turned = cv2.warpAffine(mask, matrix, (side, side), flags=cv2.INTER_NEAREST)
        scores.append((turned & turned[:, ::-1]).sum() / max(int(turned.sum()), 1))
    return float(SECTOR_SEARCH_ANGLES_DEG[int(np.argmax(scores))])


def is_dicom(data: bytes) -> bool:
    return len(data) >= DICOM_MAGIC_OFFSET + 4 and data[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM"


def decode_image(data: bytes) -> DecodedImage:
    """Decode PNG/JPEG/BMP/TIFF (8/16-bit, gray or colour) or DICOM bytes, recognised by content."""
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    if is_dicom(data):
        decoded = _decode_dicom(data)
    else:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ImageDecodeError(f"not a decodable image ({_describe_bytes(data)})")
        decoded = DecodedImage(pixels=_to_gray_unit(image), pixel_spacing_mm=None)
    low, high = float(decoded.pixels.min()), float(decoded.pixels.max())
    if high - low < BLANK_MAX_RANGE:
        raise ImageDecodeError(f"blank image: every pixel is the same grey ({round(low * 255)} of 255), nothing to measure")
    return decoded


def read_bytes(path: str) -> bytes:
    """Read a local file or a pyarrow-filesystem URI (s3://, gs://, …), naming what is wrong."""
    if storage.is_uri(path):
        import pyarrow.fs

        kind = storage.file_info(path).type
        if kind == pyarrow.fs.FileType.NotFound:
            raise ImageDecodeError(f"file not found: {path}")
        if kind == pyarrow.fs.FileType.Directory:
            raise ImageDecodeError(f"is a directory, not an image file: {path}")
        return storage.read_bytes(path)
    if not os.path.exists(path):
        raise ImageDecodeError(f"file not found: {path}")
    if os.path.isdir(path):
        raise ImageDecodeError(f"is a directory, not an image file: {path}")
    with open(path, "rb") as handle:
        return handle.read()


def read_image(path: str) -> DecodedImage:
    """Read and decode one image (local path or URI)."""
    return decode_image(read_bytes(path))


def content_median(pixels: np.ndarray) -> float:
    """The median of the pixels brighter than `BLACK_LEVEL` (float image in [0, 1]); NaN for an all-black image.
    Taken over every 4th row and column: the same to a grey level, at 1/16 of the cost of a median of 0.4 M pixels."""
    sample = pixels[::4, ::4]
    content = sample[sample > BLACK_LEVEL]
    return float(np.median(content)) if content.size else float("nan")


def clamp_brightness(pixels: np.ndarray, darkest_content_median: float = TRAINING_DARKEST_CONTENT_MEDIAN) -> np.ndarray:
    """A scan darker than almost every training image (its `content_median` below `darkest_content_median`) is
    brightened by a gamma to that level, which keeps black black and white white; any other image is returned as it
    is. Only dark scans: a gamma recovers a low gain's grey levels, but not a high gain's echoes clipped at white, and
    darkening bright scans measured worse (docs/experiments.md, robustness). Both stages see the result, in training
    and in inference."""
    median = content_median(pixels)
    if not np.isfinite(median) or median >= darkest_content_median:
        return pixels
    gamma = np.log(darkest_content_median) / np.log(median)
    return (np.clip(pixels, 0.0, 1.0) ** gamma).astype(np.float32)


def scan_region(pixels: np.ndarray, black_margins: bool = False) -> tuple[int, int, int, int]:
    """Where the scan is in a [H, W] float frame, as (left, top, width, height) in original pixels: the whole frame,
    unless the frame holds the scan inside wide margins of one colour other than black (a scanner screenshot, with its
    text and greyscale bar). Then the scan's box, with a margin, grown to the frame's aspect ratio, so that stage 1 sees the
    head stretched as in training and larger: a screenshot's frame makes an early head small enough to be missed.
    The scan is where the grey level differs from the frame border's median: the largest such region and the parts
    of it that dark tissue leaves apart. The crop is taken only where what it cuts away is nearly all the border's
    colour, so a head is never cut (`studies/scan_region.py` checks that on HC18 and its screenshots). With
    `black_margins` it looks inside black margins too. That box is only a candidate: a dark scan's edge is as black
    (`studies/scan_region.py --black-margins`), so stage 1 must confirm it (`preprocess.stage1_input`,
    `LandmarkPredictor.locate`)."""
    height, width = pixels.shape
    whole = (0, 0, width, height)
    if not black_margins and has_black_margins(pixels):
        # Black margins: HC18's own frames have them outside the sector, and a dark scan's edge is as black: cropped
        # there, 15 of HC18's 793 frames in the darker variant would lose part of the head (docs/experiments.md).
        return whole
    shrink = max(1, int(np.ceil(max(height, width) / SCAN_SEARCH_LONG_SIDE_PX)))  # a whole factor: cv2's fast area average
    small_width, small_height = width // shrink, height // shrink
    if shrink > 1:
        small = cv2.resize(pixels[:small_height * shrink, :small_width * shrink], (small_width, small_height), interpolation=cv2.INTER_AREA)
    else:
        small = pixels
    differs = np.abs(small - _border_median(small)) > SCAN_BACKGROUND_TOLERANCE
    mask = cv2.morphologyEx(differs.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))  # drops text strokes
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((7, 7), np.uint8))  # joins the scan across dark tissue
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask)
    if count < 2:
        return whole
    # The scan, and every part of it its dark tissue leaves apart (a late head's far wall): each region at least a
    # fraction of the largest one's size. Text and small marks are left out; a crop only grows by what is kept.
    areas = stats[1:, cv2.CC_STAT_AREA]
    kept = stats[1:][areas >= SCAN_PART_MIN_FRACTION * areas.max()]
    x, y = kept[:, 0].min(), kept[:, 1].min()
    box_width, box_height = (kept[:, 0] + kept[:, 2]).max() - x, (kept[:, 1] + kept[:, 3]).max() - y
    outside = np.ones_like(differs)
    outside[y:y + box_height, x:x + box_width] = False
    area_fraction = box_width * box_height / (small_width * small_height)
    if not SCAN_MIN_AREA_FRACTION <= area_fraction < SCAN_MAX_AREA_FRACTION or np.mean(differs[outside]) > 1 - SCAN_MIN_BACKGROUND_FRACTION:
        return whole
    # Back to original pixels, with the margin, then grown to the frame's aspect ratio about the box's centre.
    centre = np.array([x + box_width / 2, y + box_height / 2]) * shrink
    size = np.array([box_width, box_height]) * shrink * (1 + 2 * SCAN_MARGIN_FRACTION)
    size = np.maximum(size, [size[1] * width / height, size[0] * height / width])
    size = np.minimum(np.ceil(size), [width, height]).astype(int)
    left, top = np.clip(np.round(centre - size / 2).astype(int), 0, [width - size[0], height - size[1]])
    return int(left), int(top), int(size[0]), int(size[1])


def has_black_margins(pixels: np.ndarray) -> bool:
    """Whether the frame's border (its outer 2 % on every side) is mostly black, as HC18's frames are outside the sector."""
    return _border_median(pixels[::4, ::4]) <= BLACK_LEVEL


def _border_median(image: np.ndarray) -> float:
    height, width = image.shape
    edge = max(1, round(0.02 * min(width, height)))
    return float(np.median(np.concatenate([image[:edge].ravel(), image[-edge:].ravel(), image[:, :edge].ravel(), image[:, -edge:].ravel()])))


def region_pixels(pixels: np.ndarray, region) -> np.ndarray:
    """The REGION (left, top, width, height, original pixels) of a [H, W] image: the part stage 1 reads."""
    left, top, width, height = (int(value) for value in region)
    return pixels[top:top + height, left:left + width]


def resize_to_model(pixels: np.ndarray, input_size: int, region=None) -> tuple[np.ndarray, ResizeTransform]:
    """Stretch a [H, W] float image, or its REGION (left, top, width, height: the scan, `scan_region`), to
    [input_size, input_size] (the seed's resize; a portrait frame is turned a quarter first, `ResizeTransform.for_image`),
    with its transform."""
    height, width = pixels.shape
    transform = ResizeTransform.for_image(width, height, input_size, region)
    width, height = transform.region_box[2:]
    pixels = region_pixels(pixels, transform.region_box)
    if transform.quarter_turn:
        pixels = cv2.rotate(pixels, cv2.ROTATE_90_CLOCKWISE)
    interpolation = cv2.INTER_AREA if (width > input_size or height > input_size) else cv2.INTER_LINEAR
    resized = cv2.resize(pixels, (input_size, input_size), interpolation=interpolation).astype(np.float32)
    return resized, transform


def _to_gray_unit(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        if image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
        elif image.shape[2] == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        else:
            image = image[..., 0]
    if image.ndim != 2:
        raise ImageDecodeError(f"unsupported image shape {image.shape}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ImageDecodeError(f"image too small to measure ({image.shape[1]}x{image.shape[0]} px)")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    image = image.astype(np.float32)
    low, high = float(image.min()), float(image.max())
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def _decode_dicom(data: bytes) -> DecodedImage:
    import pydicom

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        pixels = dataset.pixel_array
    except Exception as error:  # pydicom raises many types for broken files
        raise ImageDecodeError(f"unreadable DICOM: {error}") from error
    samples = int(getattr(dataset, "SamplesPerPixel", 1))
    if samples == 1 and pixels.ndim == 3:  # multi-frame gray: measure the first frame
        pixels = pixels[0]
    elif samples > 1 and pixels.ndim == 4:  # multi-frame colour
        pixels = pixels[0]
    if pixels.ndim == 3 and samples > 1:
        pixels = cv2.cvtColor(np.ascontiguousarray(pixels[..., :3]).astype(np.uint8), cv2.COLOR_RGB2GRAY)
    pixels = pixels.astype(np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    unit = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    if unit.shape[0] < 2 or unit.shape[1] < 2:
        raise ImageDecodeError(f"image too small to measure ({unit.shape[1]}x{unit.shape[0]} px)")
    return DecodedImage(pixels=unit, pixel_spacing_mm=dicom_pixel_spacing_mm(dataset))


def dicom_pixel_spacing_mm(dataset) -> float | None:
    """Isotropic pixel spacing from PixelSpacing, ImagerPixelSpacing or the ultrasound region calibration."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = getattr(dataset, keyword, None)
        if value is not None and len(value) >= 2 and float(value[0]) > 0:
            return float(value[0])  # rows spacing; HC18-style scans are isotropic
    regions = getattr(dataset, "SequenceOfUltrasoundRegions", None)
    if regions:
        region = regions[0]
        delta_x = getattr(region, "PhysicalDeltaX", None)
        units = getattr(region, "PhysicalUnitsXDirection", None)
        if delta_x is not None and float(delta_x) > 0 and units == 3:  # 3 = cm
            return float(delta_x) * 10.0
    return None


def _describe_bytes(data: bytes) -> str:
    head = data[:8]
    if head.startswith(b"\x89PNG"):
        return f"PNG signature but corrupt or truncated body, {len(data)} bytes"
    if head.startswith(b"\xff\xd8"):
        return f"JPEG signature but corrupt or truncated body, {len(data)} bytes"
    if all(32 <= byte < 127 or byte in (9, 10, 13) for byte in data[:64]):
        return f"looks like text, {len(data)} bytes"
    return f"unknown format, {len(data)} bytes, starts with {head.hex()}"
