import json
import os

import numpy as np
import pandas as pd
import pytest

from conftest import SAMPLE_MANIFEST
from fetalpipe import LANDMARK_COLUMNS
from fetalpipe.data.manifest import landmarks_original_px, load_manifest
from fetalpipe.pipeline.evaluate import evaluate_predictions, matched_radial_errors_px, per_image_errors, summarize


def test_swapped_endpoint_names_are_not_errors():
    reference = np.array([[[0, 0], [100, 0], [50, -30], [50, 30]]], dtype=float)
    swapped = reference[:, [1, 0, 3, 2]]
    assert np.allclose(matched_radial_errors_px(swapped, reference), 0)
    shifted = reference + np.array([3.0, 4.0])
    assert np.allclose(matched_radial_errors_px(shifted, reference), 5.0)


def test_summary_sdr_and_signed_differences():
    reference = np.array([[[0, 0], [100, 0], [50, -30], [50, 30]]] * 2, dtype=float)
    predicted = reference.copy()
    predicted[0, 1, 0] += 15  # OFD 15 px (3 mm) longer on image 0
    errors = per_image_errors(predicted, reference, np.array([0.2, 0.2]))
    summary = summarize(errors)
    assert summary["ofd_mae_mm"] == pytest.approx(1.5)  # 15 px * 0.2 mm / 2 images
    assert summary["ofd_mean_diff_mm"] == pytest.approx(1.5)
    assert summary["bpd_mae_mm"] == pytest.approx(0.0)
    assert summary["sdr_2mm"] == pytest.approx(7 / 8)  # one of 8 landmarks is 3 mm off
    assert summary["sdr_4mm"] == pytest.approx(1.0)


def test_evaluate_report_from_a_predictions_folder(tmp_path):
    reference = load_manifest(SAMPLE_MANIFEST, require_landmarks=True)
    predictions = reference[["image_path", *LANDMARK_COLUMNS]].copy()
    predictions[list(LANDMARK_COLUMNS)] += 1.0  # every point 1 px right and down
    predictions["status"] = "ok"
    os.makedirs(tmp_path / "out" / "predictions")
    predictions.to_parquet(tmp_path / "out" / "predictions" / "part-0.parquet")
    summary = evaluate_predictions(str(tmp_path / "out"), SAMPLE_MANIFEST, str(tmp_path / "report"))
    assert summary["images"] == 20 and summary["mre_px"] == pytest.approx(np.sqrt(2))
    assert summary["hc_ellipse_mae_mm"] < 0.2  # a pure shift leaves HC unchanged but for the importer's 0.1 mm
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["images"] == 20
    assert len(pd.read_csv(tmp_path / "report" / "per_image_errors.csv")) == 20
    assert (tmp_path / "report" / "bland_altman_hc.png").stat().st_size > 1000


def test_evaluate_says_when_every_matched_prediction_is_an_error_row(tmp_path):
    reference = load_manifest(SAMPLE_MANIFEST, require_landmarks=True)
    predictions = reference[["image_path"]].copy()
    for column in LANDMARK_COLUMNS:
        predictions[column] = np.nan
    predictions["status"] = "error"
    predictions["error"] = "no fetal head found (model output below detection threshold)"
    os.makedirs(tmp_path / "out" / "predictions")
    predictions.to_parquet(tmp_path / "out" / "predictions" / "part-0.parquet")
    with pytest.raises(ValueError, match="every one of the 20 predictions .* is an error row.*no fetal head found"):
        evaluate_predictions(str(tmp_path / "out"), SAMPLE_MANIFEST, str(tmp_path / "report"))
    predictions["image_path"] = "/elsewhere/" + predictions["image_path"].str.rsplit("/", n=1).str[-1]
    predictions.to_parquet(tmp_path / "out" / "predictions" / "part-0.parquet")
    with pytest.raises(ValueError, match="no prediction matches a manifest image_path"):
        evaluate_predictions(str(tmp_path / "out"), SAMPLE_MANIFEST, str(tmp_path / "report"))


def test_an_unmeasured_image_counts_as_a_failure_and_is_listed_with_why(tmp_path):
    reference = load_manifest(SAMPLE_MANIFEST, require_landmarks=True)
    predictions = reference[["image_path", *LANDMARK_COLUMNS]].copy()
    predictions["status"], predictions["error"] = "ok", ""
    os.makedirs(tmp_path / "all" / "predictions")
    predictions.to_parquet(tmp_path / "all" / "predictions" / "part-0.parquet")
    perfect = evaluate_predictions(str(tmp_path / "all"), SAMPLE_MANIFEST, str(tmp_path / "report_all"))
    assert perfect["sdr_2mm"] == pytest.approx(1.0) and perfect["hc_ellipse_images_over_5mm"] == 0
    assert perfect["images_missing_prediction"] == 0 and perfect["images_in_manifest"] == 20

    lost, absent = reference["image_path"].iloc[0], reference["image_path"].iloc[1]
    predictions.loc[predictions["image_path"] == lost, [*LANDMARK_COLUMNS]] = np.nan
    predictions.loc[predictions["image_path"] == lost, ["status", "error"]] = ["error", "no fetal head found"]
    predictions = predictions[predictions["image_path"] != absent]
    os.makedirs(tmp_path / "some" / "predictions")
    predictions.to_parquet(tmp_path / "some" / "predictions" / "part-0.parquet")
    summary = evaluate_predictions(str(tmp_path / "some"), SAMPLE_MANIFEST, str(tmp_path / "report_some"))
    assert summary["images"] == 18 and summary["images_in_manifest"] == 20 and summary["images_missing_prediction"] == 2
    assert summary["sdr_2mm"] == pytest.approx(18 / 20)  # the 8 landmarks never found are misses, not left out
    assert summary["hc_ellipse_images_over_5mm"] == 2
    assert summary["hc_ellipse_mae_mm"] == pytest.approx(perfect["hc_ellipse_mae_mm"], abs=0.2)  # over the measured 18
    unmeasured = pd.read_csv(tmp_path / "report_some" / "unmeasured_images.csv").set_index("image_path")["reason"]
    assert unmeasured.to_dict() == {lost: "no fetal head found", absent: "no prediction row"}


def test_hc_error_is_reported_apart_for_the_flagged_and_the_other_images(tmp_path):
    reference = load_manifest(SAMPLE_MANIFEST, require_landmarks=True)
    predictions = reference[["image_path", *LANDMARK_COLUMNS]].copy()
    predictions["status"], predictions["needs_review"] = "ok", False
    flagged = predictions.index[:4]
    predictions.loc[flagged, "needs_review"] = True
    predictions.loc[flagged, ["ofd2_x"]] += 100.0  # OFD 100 px longer: several mm of HC on the flagged images only
    os.makedirs(tmp_path / "out" / "predictions")
    predictions.to_parquet(tmp_path / "out" / "predictions" / "part-0.parquet")
    summary = evaluate_predictions(str(tmp_path / "out"), SAMPLE_MANIFEST, str(tmp_path / "report"))
    assert summary["flagged_fraction"] == pytest.approx(4 / 20)
    assert summary["hc_ellipse_mae_mm_not_flagged"] < 0.2 < 5 < summary["hc_ellipse_mae_mm_flagged"]
    assert summary["hc_ellipse_mae_mm"] == pytest.approx((16 * summary["hc_ellipse_mae_mm_not_flagged"] + 4 * summary["hc_ellipse_mae_mm_flagged"]) / 20)
