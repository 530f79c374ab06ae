import os

import numpy as np
import pandas as pd
import pytest

from conftest import ultrasound_like, write_png
from fetalpipe.data.manifest import ManifestError, landmarks_original_px, load_manifest

POINTS = {"ofd1_x": 20.0, "ofd1_y": 60.0, "ofd2_x": 140.0, "ofd2_y": 60.0, "bpd1_x": 80.0, "bpd1_y": 20.0, "bpd2_x": 80.0, "bpd2_y": 100.0}


@pytest.fixture
def folder(tmp_path):
    write_png(tmp_path / "a.png", ultrasound_like())
    write_png(tmp_path / "b.png", ultrasound_like(seed=1))
    return tmp_path


def write(folder, rows, name="manifest.csv"):
    path = folder / name
    frame = pd.DataFrame(rows)
    frame.to_parquet(path, index=False) if name.endswith(".parquet") else frame.to_csv(path, index=False)
    return str(path)


def good_rows():
    return [{"image_path": "a.png", "subject_id": "001", "pixel_spacing_mm": 0.1, **POINTS}, {"image_path": "b.png", "subject_id": "002", "pixel_spacing_mm": 0.2, **POINTS}]


@pytest.mark.parametrize("name", ["manifest.csv", "manifest.parquet"])
def test_valid_manifest_resolves_relative_paths(folder, name):
    table = load_manifest(write(folder, good_rows(), name), require_landmarks=True, check_images=True)
    assert table["image_path"][0] == os.path.join(str(folder), "a.png")
    assert table["subject_id"].tolist() == ["001", "002"]
    assert landmarks_original_px(table).shape == (2, 4, 2)


def test_seed_style_columns_are_mapped(folder):
    rows = [{"image": "a.png", "ofd_1_x": 20, "ofd_1_y": 60, "ofd_2_x": 140, "ofd_2_y": 60, "bpd_1_x": 80, "bpd_1_y": 20, "bpd_2_x": 80, "bpd_2_y": 100}]
    table = load_manifest(write(folder, rows), require_landmarks=True)
    assert table["ofd2_x"][0] == 140


BAD_CASES = {
    "missing image_path column": (lambda rows: [{k: v for k, v in r.items() if k != "image_path"} for r in rows], "missing required column 'image_path'"),
    "missing landmark column": (lambda rows: [{k: v for k, v in r.items() if k != "bpd2_y"} for r in rows], r"missing landmark column\(s\) \['bpd2_y'\]"),
    "NaN landmark": (lambda rows: [rows[0], {**rows[1], "ofd1_x": np.nan}], "row 2, column 'ofd1_x': not a finite number"),
    "negative pixel spacing": (lambda rows: [rows[0], {**rows[1], "pixel_spacing_mm": -0.1}], "row 2, column 'pixel_spacing_mm': must be positive"),
    "non-numeric pixel spacing": (lambda rows: [rows[0], {**rows[1], "pixel_spacing_mm": "abc"}], "row 2, column 'pixel_spacing_mm': not a number"),
    "landmark far outside the image": (lambda rows: [{**rows[0], "bpd1_y": -100.0}, rows[1]], "row 1, column 'bpd1_y': point outside the image"),
    "duplicate rows (same image twice)": (lambda rows: [rows[0], {**rows[1], "image_path": "a.png"}], "row 2, column 'image_path': duplicate"),
    "empty image path": (lambda rows: [rows[0], {**rows[1], "image_path": ""}], "row 2, column 'image_path': empty"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_each_bad_case_names_file_row_and_column(folder, reliability_log, case):
    change, message = BAD_CASES[case]
    path = write(folder, change(good_rows()))
    with pytest.raises(ManifestError, match=message) as raised:
        load_manifest(path, require_landmarks=True)
    assert str(path) in str(raised.value)
    reliability_log(area="manifest", case=case, outcome="refused before any work: " + str(raised.value).replace(str(path), "manifest.csv"))


def test_nan_spacing_means_unknown(folder, reliability_log):
    table = load_manifest(write(folder, [good_rows()[0], {**good_rows()[1], "pixel_spacing_mm": np.nan}]), require_landmarks=True)
    assert table["pixel_spacing_mm"].isna().tolist() == [False, True]
    reliability_log(area="manifest", case="NaN pixel spacing", outcome="accepted as unknown: that row is measured in pixels, its mm columns are empty")


def test_point_beyond_image_edge_found_when_checking_images(folder):
    path = write(folder, [{**good_rows()[0], "ofd2_x": 400.0}])
    with pytest.raises(ManifestError, match="row 1, column 'ofd2_x': point outside the image"):
        load_manifest(path, require_landmarks=True, check_images=True)


def test_empty_and_missing_manifest(folder, reliability_log):
    path = folder / "empty.csv"
    path.write_text("image_path\n")
    with pytest.raises(ManifestError, match="no rows") as raised:
        load_manifest(str(path))
    reliability_log(area="manifest", case="empty manifest (header only)", outcome="refused: " + str(raised.value).replace(str(path), "manifest.csv"))
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(str(folder / "absent.csv"))


def test_missing_image_found_when_checking(folder):
    path = write(folder, [{**good_rows()[0], "image_path": "gone.png"}])
    with pytest.raises(ManifestError, match="row 1, column 'image_path': file not found"):
        load_manifest(path, check_images=True)
