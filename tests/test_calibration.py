import os

import numpy as np
import pandas as pd
import pytest

from conftest import SAMPLE_MANIFEST
from fetalpipe.measure.biometry import biometry_mm
from fetalpipe.measure.calibration import SCALE_LIMITS, SizeCalibration


def ellipse_endpoints(centre, semi_major_px, semi_minor_px, angle_rad):
    major = np.array([np.cos(angle_rad), np.sin(angle_rad)])
    minor = np.array([-major[1], major[0]])
    return np.stack([centre - semi_major_px * major, centre + semi_major_px * major, centre - semi_minor_px * minor, centre + semi_minor_px * minor])


def sample_with_training_subjects(tmp_path) -> tuple[pd.DataFrame, str]:
    """The embedded sample as a manifest whose rows are mostly in the training split: its images are all validation
    subjects of the HC18 split, so each gets its own subject id and the same split rule puts most of them in training."""
    manifest = pd.read_csv(SAMPLE_MANIFEST)
    manifest["image_path"] = [os.path.join(os.path.dirname(SAMPLE_MANIFEST), p) for p in manifest["image_path"]]
    manifest["subject_id"] = [f"subject-{index}" for index in range(len(manifest))]
    manifest_path = str(tmp_path / "manifest.csv")
    manifest.to_csv(manifest_path, index=False)
    return manifest, manifest_path


@pytest.fixture(scope="module")
def calibrated_sample(ray_local, tmp_path_factory) -> dict:
    """The shipped weights saved without int8 parameters, size line or review rules ("uncalibrated", with their "config"
    and "payload"), and that file put through `fetalpipe calibrate` on `sample_with_training_subjects` ("calibrated"):
    one calibrate run for the tests that read what it wrote."""
    from fetalpipe.cli import main
    from fetalpipe.model.model_file import DEFAULT_MODEL_PATH, load_model, refinement_entries, save_model

    folder = tmp_path_factory.mktemp("calibrated_sample")
    _, config, payload = load_model(DEFAULT_MODEL_PATH)
    uncalibrated = str(folder / "uncalibrated.pt")
    save_model(uncalibrated, payload["state_dict"], config, **refinement_entries(payload))
    manifest, manifest_path = sample_with_training_subjects(folder)
    calibrated = str(folder / "calibrated.pt")
    assert main(["calibrate", "--model", uncalibrated, "--manifest", manifest_path, "--output", calibrated]) == 0
    return {"uncalibrated": uncalibrated, "config": config, "payload": payload, "manifest": manifest, "manifest_path": manifest_path,
            "calibrated": calibrated}


def test_fit_recovers_a_linear_size_error_and_apply_removes_it():
    rng = np.random.default_rng(0)
    reference_hc_mm = rng.uniform(60, 340, 200)
    intercept_mm, slope = -3.0, 0.018
    measured_hc_mm = (reference_hc_mm + intercept_mm) / (1 - slope)  # measured - reference = intercept + slope * measured
    calibration = SizeCalibration.fit(measured_hc_mm, reference_hc_mm)
    assert calibration.intercept_mm == pytest.approx(intercept_mm) and calibration.slope == pytest.approx(slope)
    assert calibration.images == 200

    # Applied to ellipse endpoints: the HC becomes the reference, the centre, the axes' directions and their ratio stay.
    spacing_mm = 0.2
    points = []
    for hc_mm in measured_hc_mm[:5]:
        semi_major_px = hc_mm / spacing_mm / (2 * np.pi) * 1.1
        points.append(ellipse_endpoints(np.array([400.0, 270.0]), semi_major_px, semi_major_px / 1.2, 0.3))
    points = np.array(points)
    scaled_hc = biometry_mm(points, spacing_mm)["hc_ellipse_mm"]
    calibrated, scale = calibration.apply(points, np.full(5, spacing_mm))
    after = biometry_mm(calibrated, spacing_mm)
    np.testing.assert_allclose(after["hc_ellipse_mm"], scaled_hc * scale)
    np.testing.assert_allclose(after["hc_ellipse_mm"], scaled_hc - (intercept_mm + slope * scaled_hc), rtol=1e-9)
    np.testing.assert_allclose(calibrated.mean(axis=1), points.mean(axis=1))
    np.testing.assert_allclose(after["bpd_px"] / after["ofd_px"], biometry_mm(points, spacing_mm)["bpd_px"] / biometry_mm(points, spacing_mm)["ofd_px"])


def test_without_spacing_or_out_of_range_the_correction_is_none_or_bounded():
    calibration = SizeCalibration(intercept_mm=-3.0, slope=0.018, images=100)
    points = ellipse_endpoints(np.array([100.0, 80.0]), 60.0, 45.0, 0.0)[None]
    unchanged, scale = calibration.apply(points, np.array([np.nan]))
    np.testing.assert_array_equal(unchanged, points)
    np.testing.assert_array_equal(scale, [1.0])
    assert calibration.scale(np.array([0.5]))[0] == SCALE_LIMITS[1]  # a size the line was never fitted on: at most the bound
    assert SizeCalibration(intercept_mm=0.0, slope=0.2, images=100).scale(np.array([200.0]))[0] == SCALE_LIMITS[0]
    with pytest.raises(ValueError, match="at least 10"):
        SizeCalibration.fit(np.array([100.0, np.nan]), np.array([101.0, 99.0]))
    # The model file keeps the fit's report beside the line; only the line is read back.
    assert SizeCalibration.from_dict({**calibration.to_dict(), "train_hc_mae_mm_after": 2.0}) == calibration
    assert SizeCalibration.from_dict(None) is None


def test_calibrate_fits_on_the_training_split_and_infer_applies_it(calibrated_sample, tmp_path):
    """`fetalpipe calibrate` with the shipped weights on the embedded sample: the line is fitted on the training split only,
    stored in the model file, and `infer` scales each ellipse by it (the scale is in the output; 1 without spacing)."""
    from fetalpipe.model.model_file import load_model, read_model_header, refinement_entries, save_model
    from fetalpipe.pipeline.calibrate import calibrate_model
    from fetalpipe.pipeline.infer import InferOptions, run_inference
    from fetalpipe.pipeline.predictions import read_predictions
    from fetalpipe.pipeline.train import split_by_subject

    uncalibrated, config, payload = calibrated_sample["uncalibrated"], calibrated_sample["config"], calibrated_sample["payload"]
    manifest, calibrated = calibrated_sample["manifest"], calibrated_sample["calibrated"]
    train_rows, val_rows = split_by_subject(manifest, config.val_fraction)
    assert len(train_rows) >= 10 and len(val_rows) > 0

    fit = read_model_header(calibrated)["calibration"]
    line = SizeCalibration.from_dict(fit)
    assert fit["images"] == len(train_rows) and fit["split"] == "train"
    measured_split = pd.read_csv(calibrated + ".calibration/report/per_image_errors.csv")  # kept for inspection, on the output's storage
    assert len(measured_split) == len(train_rows) and not os.path.exists(calibrated + ".calibration/uncalibrated_model.pt")
    with pytest.raises(ValueError, match="no image is in the training split"):  # the sample as shipped: all validation subjects
        calibrate_model(uncalibrated, SAMPLE_MANIFEST, str(tmp_path / "x.pt"))

    spacing_mm = manifest["pixel_spacing_mm"].to_numpy()
    measured = manifest.assign(pixel_spacing_mm=np.where(np.arange(len(manifest)) < 2, np.nan, spacing_mm))  # two without spacing
    measured_path = tmp_path / "measured.csv"
    measured.to_csv(measured_path, index=False)
    # Calibrate also stored int8 ranges, and measured the split in int8: compare with the same int8 model without the line.
    calibrated_payload = load_model(calibrated)[2]
    int8_without_line = str(tmp_path / "int8_without_line.pt")
    save_model(int8_without_line, payload["state_dict"], config, int8_quantization=calibrated_payload["int8_quantization"],
               **refinement_entries(calibrated_payload, with_int8=True))
    outputs = {}
    for name, path in (("plain", int8_without_line), ("calibrated", calibrated)):
        run_inference(InferOptions(output_dir=str(tmp_path / name), manifest=str(measured_path), model_path=path, actors=1))
        outputs[name] = read_predictions(str(tmp_path / name)).set_index("image_path").loc[manifest["image_path"]]
    plain, corrected = outputs["plain"], outputs["calibrated"]
    assert (plain["size_calibration_scale"] == 1.0).all()
    assert (plain["precision"] == "int8").all() and (corrected["precision"] == "int8").all() and fit["measured_in"] == "int8"
    expected_scale = line.scale(plain["hc_ellipse_mm"].to_numpy())
    np.testing.assert_allclose(corrected["size_calibration_scale"].to_numpy(), np.where(np.isnan(plain["hc_ellipse_mm"]), 1.0, expected_scale))
    np.testing.assert_allclose(corrected["hc_ellipse_px"], plain["hc_ellipse_px"] * corrected["size_calibration_scale"], rtol=1e-9)
    np.testing.assert_allclose(corrected["hc_ellipse_mm"], corrected["hc_ellipse_px"] * corrected["pixel_spacing_mm"], rtol=1e-9)
    assert (corrected["size_calibration_scale"].iloc[:2] == 1.0).all() and (corrected["size_calibration_scale"].iloc[2:] != 1.0).all()

    # The stored line is the one the training split alone gives (the validation subjects left out).
    is_train = manifest["subject_id"].isin(set(train_rows["subject_id"])).to_numpy()
    measured_mm = plain["hc_ellipse_px"].to_numpy() * spacing_mm  # the spacing the calibration saw
    refit = SizeCalibration.fit(measured_mm[is_train], manifest["hc_mm"].to_numpy()[is_train])
    assert refit.intercept_mm == pytest.approx(line.intercept_mm, abs=1e-6) and refit.slope == pytest.approx(line.slope, abs=1e-9)


def test_train_command_calibrates_its_model_or_says_why_not(ray_local, monkeypatch, tmp_path, capsys):
    """`fetalpipe train` ends with `calibrate` into RUN_DIR/model_calibrated.pt. Training itself is replaced by copying the
    shipped weights (without int8 parameters or line) into RUN_DIR: the calibration step is what is under test."""
    import fetalpipe.pipeline.train
    from fetalpipe.cli import main
    from fetalpipe.model.model_file import DEFAULT_MODEL_PATH, load_model, read_model_header, refinement_entries, save_model

    model, config, payload = load_model(DEFAULT_MODEL_PATH)

    def fake_training(manifest_path, run_dir, train_config, **options):
        os.makedirs(run_dir, exist_ok=True)
        save_model(os.path.join(run_dir, "model.pt"), payload["state_dict"], config, **refinement_entries(payload))
        return {"best_epoch": 1}

    monkeypatch.setattr(fetalpipe.pipeline.train, "run_training", fake_training)
    _, manifest_path = sample_with_training_subjects(tmp_path)

    assert main(["train", "--manifest", manifest_path, "--output", str(tmp_path / "run")]) == 0
    header = read_model_header(str(tmp_path / "run" / "model_calibrated.pt"))
    assert header["int8_quantization"] and header["calibration"]["measured_in"] == "int8"
    assert "calibrated: int8, size line" in capsys.readouterr().out
    assert "int8_quantization" not in read_model_header(str(tmp_path / "run" / "model.pt"))  # the trained file stays as trained

    # The sample as shipped has no image in the training split: the model is trained, not calibrated, and the job says why.
    assert main(["train", "--manifest", SAMPLE_MANIFEST, "--output", str(tmp_path / "run2")]) == 0
    out = capsys.readouterr().out
    assert "not calibrated (" in out and "no image is in the training split" in out
    assert not os.path.exists(tmp_path / "run2" / "model_calibrated.pt")
    assert main(["train", "--manifest", manifest_path, "--output", str(tmp_path / "run3"), "--no-calibrate"]) == 0
    assert not os.path.exists(tmp_path / "run3" / "model_calibrated.pt")


def test_calibrate_stores_both_review_rules_and_add_rule_changes_nothing_else(calibrated_sample, tmp_path, capsys):
    """`calibrate` stores the review rule in mm and the rule for rows without a pixel spacing; `calibrate
    --add-rule-without-spacing` on that file fits the same second rule again (same int8 measurement of the same split)
    and leaves the weights, int8 parameters, size line and first rule as they were; a file never calibrated is refused."""
    import torch

    from fetalpipe.cli import main
    from fetalpipe.measure.review import ReviewRule
    from fetalpipe.model.model_file import load_model, read_model_header

    uncalibrated, manifest_path, calibrated = calibrated_sample["uncalibrated"], calibrated_sample["manifest_path"], calibrated_sample["calibrated"]
    header = read_model_header(calibrated)
    in_mm, without_spacing = ReviewRule.from_dict(header["review"]), ReviewRule.from_dict(header["review_without_spacing"])
    assert in_mm is not None and without_spacing is not None
    assert not any(name.endswith("_mm") for name in without_spacing.signals)  # no mm signal exists in a row without spacing
    assert header["calibration"]["review_without_spacing"]["flagged_fraction"] <= 0.15

    again = str(tmp_path / "again.pt")
    assert main(["calibrate", "--add-rule-without-spacing", "--model", calibrated, "--manifest", manifest_path, "--output", again]) == 0
    added = read_model_header(again)
    assert ReviewRule.from_dict(added["review_without_spacing"]) == without_spacing
    for entry in ("review", "int8_quantization"):
        assert added[entry] == header[entry]
    assert {k: v for k, v in added["calibration"].items() if k != "review_without_spacing"} == \
           {k: v for k, v in header["calibration"].items() if k != "review_without_spacing"}
    before, after = load_model(calibrated)[2]["state_dict"], load_model(again)[2]["state_dict"]
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)

    capsys.readouterr()
    refused = str(tmp_path / "refused.pt")
    assert main(["calibrate", "--add-rule-without-spacing", "--model", uncalibrated, "--manifest", manifest_path, "--output", refused]) == 2
    assert "is not calibrated" in capsys.readouterr().err and not os.path.exists(refused)
