"""The manifest: one table (CSV or Parquet) that names images and, for training, their landmarks.

Columns: ``image_path`` (absolute, or relative to the manifest's folder), optional ``subject_id``,
optional ``pixel_spacing_mm``, optional ``gestational_age_weeks`` (decimal weeks) or ``gestational_age_days``
(clinical context: `fetalpipe.measure.clinical`), and for training ``ofd1_x … bpd2_y`` in original image pixels.
For the refinement stage's training, optional ``stage1_prior_ofd1_x … stage1_prior_bpd2_y``: a stage-1 ellipse's
endpoints for the image, in original pixels (`STAGE1_PRIOR_COLUMNS`; NaN where there is none).
Any other column is carried through to the outputs untouched.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from fetalpipe import LANDMARK_COLUMNS

STAGE1_PRIOR_COLUMNS = tuple(f"stage1_prior_{column}" for column in LANDMARK_COLUMNS)

# A seed-style landmark CSV (image file + 4 points) maps onto manifest columns like this.
SEED_COLUMN_MAPPING = {
    "image": "image_path",
    "filename": "image_path",
    "ofd_1_x": "ofd1_x", "ofd_1_y": "ofd1_y", "ofd_2_x": "ofd2_x", "ofd_2_y": "ofd2_y",
    "bpd_1_x": "bpd1_x", "bpd_1_y": "bpd1_y", "bpd_2_x": "bpd2_x", "bpd_2_y": "bpd2_y",
}


# A head can be clipped by the frame, so an endpoint may lie slightly outside the image (one HC18
# annotation does, by 0.06 px); further out than this is an annotation error.
LANDMARK_MARGIN_PX = 16.0


class ManifestError(ValueError):
    """A manifest problem, with the file, row and column it was found in."""


def read_table(path: str) -> pd.DataFrame:
    """Read a CSV or Parquet manifest (local path or pyarrow-filesystem URI such as s3://)."""
    import io

    import pyarrow.parquet as pq

    from fetalpipe.runtime import storage

    if path.endswith(".parquet") or (not path.endswith(".csv") and not storage.is_uri(path) and os.path.isdir(path)):
        fs, inner_path = storage.filesystem(path)
        return pq.read_table(inner_path, filesystem=fs).to_pandas()
    if path.endswith(".csv"):
        return pd.read_csv(io.BytesIO(storage.read_bytes(path)), dtype={"subject_id": str})
    raise ManifestError(f"{path}: manifest must be a .csv or .parquet file")


def load_manifest(path: str, require_landmarks: bool = False, check_images: bool = False) -> pd.DataFrame:
    """Read, resolve relative image paths against the manifest's folder, and validate."""
    if "://" not in path and not os.path.exists(path):
        raise ManifestError(f"{path}: manifest file not found")
    try:
        table = read_table(path)
    except ManifestError:
        raise
    except Exception as error:
        raise ManifestError(f"{path}: cannot read manifest: {error}") from error
    table = table.rename(columns={k: v for k, v in SEED_COLUMN_MAPPING.items() if k in table.columns and v not in table.columns})
    base_dir = os.path.dirname(path) if "://" not in path else path.rsplit("/", 1)[0]
    return validate_manifest(table, source=path, base_dir=base_dir, require_landmarks=require_landmarks, check_images=check_images)


def validate_manifest(
    table: pd.DataFrame,
    source: str = "<manifest>",
    base_dir: str | None = None,
    require_landmarks: bool = False,
    check_images: bool = False,
) -> pd.DataFrame:
    """Check every rule; raise `ManifestError` naming file, row (1-based data row) and column."""
    if len(table) == 0:
        raise ManifestError(f"{source}: manifest has no rows")
    if "image_path" not in table.columns:
        raise ManifestError(f"{source}: missing required column 'image_path' (columns: {list(table.columns)})")
    table = table.reset_index(drop=True).copy()
    for row, value in enumerate(table["image_path"]):
        if not isinstance(value, str) or not value.strip():
            raise ManifestError(f"{source}: row {row + 1}, column 'image_path': empty or not a string ({value!r})")
    if base_dir is not None:
        table["image_path"] = [_resolve(base_dir, value) for value in table["image_path"]]
    duplicated = table["image_path"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise ManifestError(f"{source}: row {row + 1}, column 'image_path': duplicate of an earlier row ({table['image_path'][row]})")
    if "subject_id" in table.columns:
        table["subject_id"] = table["subject_id"].astype(str)
    if "pixel_spacing_mm" in table.columns:
        table["pixel_spacing_mm"] = _optional_number_column(table, "pixel_spacing_mm", source, allow_zero=False)
    for column in ("gestational_age_weeks", "gestational_age_days"):
        if column in table.columns:
            table[column] = _optional_number_column(table, column, source, allow_zero=True)
    if "gestational_age_days" in table.columns and "gestational_age_weeks" not in table.columns:
        table["gestational_age_weeks"] = table["gestational_age_days"] / 7.0
    if require_landmarks:
        missing = [column for column in LANDMARK_COLUMNS if column not in table.columns]
        if missing:
            raise ManifestError(f"{source}: missing landmark column(s) {missing}: training, calibration and evaluation "
                                "need the reference landmarks (`import-hc18` writes them for HC18)")
        for column in LANDMARK_COLUMNS:
            values = pd.to_numeric(table[column], errors="coerce")
            bad = values.isna() | ~np.isfinite(values)
            if bad.any():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                raise ManifestError(f"{source}: row {row + 1}, column '{column}': not a finite number ({table[column][row]!r})")
            outside = values < -0.5 - LANDMARK_MARGIN_PX
            if outside.any():
                row = int(np.flatnonzero(outside.to_numpy())[0])
                raise ManifestError(f"{source}: row {row + 1}, column '{column}': point outside the image ({values[row]})")
            table[column] = values.astype("float64")
    if check_images:
        _check_images(table, source, require_landmarks)
    return table


def _optional_number_column(table: pd.DataFrame, column: str, source: str, allow_zero: bool) -> pd.Series:
    """The column as float64: empty cells are NaN (unknown); text, infinities and negative values (or zero, unless
    `allow_zero`) are errors that name the row."""
    raw = table[column]
    values = pd.to_numeric(raw, errors="coerce").astype("float64")
    not_a_number = (values.isna() & raw.notna()) | np.isinf(values)
    if not_a_number.any():
        row = int(np.flatnonzero(not_a_number.to_numpy())[0])
        raise ManifestError(f"{source}: row {row + 1}, column '{column}': not a number ({raw.iloc[row]!r})")
    out_of_range = (values < 0) | ((values == 0) & (not allow_zero))
    if out_of_range.any():
        row = int(np.flatnonzero(out_of_range.to_numpy())[0])
        raise ManifestError(f"{source}: row {row + 1}, column '{column}': must be {'non-negative' if allow_zero else 'positive'}, got {values.iloc[row]}")
    return values.astype("float64")


def _check_images(table: pd.DataFrame, source: str, check_points: bool) -> None:
    """Open each image header: it must exist and, for training, contain every landmark."""
    import cv2

    for row, path in enumerate(table["image_path"]):
        if not os.path.isfile(path):
            raise ManifestError(f"{source}: row {row + 1}, column 'image_path': file not found ({path})")
        if not check_points:
            continue
        image = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise ManifestError(f"{source}: row {row + 1}, column 'image_path': not a readable image ({path})")
        height, width = image.shape
        for column in LANDMARK_COLUMNS:
            limit = (width if column.endswith("_x") else height) - 0.5 + LANDMARK_MARGIN_PX
            if table[column][row] > limit:
                raise ManifestError(
                    f"{source}: row {row + 1}, column '{column}': point outside the image "
                    f"({table[column][row]} > {limit} for a {width}x{height} image)"
                )


def landmarks_original_px(table: pd.DataFrame) -> np.ndarray:
    """[N, 4, 2] landmark array (ofd1, ofd2, bpd1, bpd2; x, y) in original pixels."""
    return table[list(LANDMARK_COLUMNS)].to_numpy(dtype=np.float64).reshape(-1, 4, 2)


def _resolve(base_dir: str, image_path: str) -> str:
    if "://" in image_path or os.path.isabs(image_path):
        return image_path
    if "://" in base_dir:
        return f"{base_dir}/{image_path}"
    return os.path.abspath(os.path.join(base_dir, image_path))
