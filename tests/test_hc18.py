import math
import os

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import SAMPLE_DIR
from fetalpipe.cli import main
from fetalpipe.data.hc18 import ANNOTATION_EDGE_OFFSET_PX, fit_annotation_ellipse, hc_reproduction_error_mm, import_hc18
from fetalpipe.data.manifest import load_manifest


def test_fit_recovers_a_drawn_ellipse():
    mask = np.zeros((540, 800), np.uint8)
    centre, axes, angle = (400, 270), (180, 120), 30
    cv2.ellipse(mask, centre, axes, angle, 0, 360, 255, -1)
    centre_x, centre_y, semi_major, semi_minor, major_angle = fit_annotation_ellipse(mask)
    assert (centre_x, centre_y) == pytest.approx(centre, abs=0.5)
    assert semi_major + ANNOTATION_EDGE_OFFSET_PX == pytest.approx(180, abs=1.0)
    assert semi_minor + ANNOTATION_EDGE_OFFSET_PX == pytest.approx(120, abs=1.0)
    assert math.degrees(major_angle) % 180 == pytest.approx(30, abs=1.0)


def test_embedded_sample_reproduces_published_hc():
    manifest = import_hc18(SAMPLE_DIR)
    error_mm = hc_reproduction_error_mm(manifest)
    assert len(manifest) == 20
    assert error_mm.mean() <= 0.1
    assert manifest["subject_id"].str.fullmatch(r"\d{3}").all()


def test_cli_writes_a_valid_manifest_with_relative_paths(tmp_path, capsys):
    output = tmp_path / "out" / "hc18.parquet"
    assert main(["import-hc18", SAMPLE_DIR, "--output", str(output)]) == 0
    assert "mean |diff|" in capsys.readouterr().out
    table = load_manifest(str(output), require_landmarks=True, check_images=True)
    assert len(table) == 20 and os.path.isfile(table["image_path"][0])
    assert not pd.read_parquet(output)["image_path"][0].startswith("/")


@pytest.mark.parametrize("damage, message", [
    (lambda path: os.remove(path), "missing or unreadable annotation"),
    (lambda path: cv2.imwrite(path, np.zeros((540, 800), np.uint8)), "annotation mask is empty"),
])
def test_broken_annotation_stops_the_import_naming_row_and_file(tmp_path, capsys, reliability_log, damage, message):
    import shutil

    copy = tmp_path / "hc18"
    shutil.copytree(SAMPLE_DIR, copy)
    spacing_table = pd.read_csv(copy / "training_set_pixel_size_and_HC.csv")
    third = spacing_table.iloc[2, 0]
    damage(str(copy / "training_set" / third.replace(".png", "_Annotation.png")))
    assert main(["import-hc18", str(copy), "--output", str(tmp_path / "hc18.csv")]) == 2
    error = capsys.readouterr().err
    assert f"row 3 ({third})" in error and message in error
    assert not (tmp_path / "hc18.csv").exists()
    reliability_log(area="import-hc18", case=message.replace("missing or unreadable", "missing"),
                    outcome=f"exit 2, nothing written: 'training_set_pixel_size_and_HC.csv row 3 ({third}): {message} …' (names the file)")


SHARED_HC18 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hc18")


@pytest.mark.skipif(not os.path.isdir(SHARED_HC18), reason="full HC18 data is only beside the repo in development/CI")
def test_full_hc18_meets_the_0_1_mm_acceptance():
    error_mm = hc_reproduction_error_mm(import_hc18(SHARED_HC18))
    assert len(error_mm) == 793
    assert error_mm.mean() <= 0.1
