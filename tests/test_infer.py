"""The batch-inference contract, on a local Ray instance shared by the session."""

import json
import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import SAMPLE_DIR, SAMPLE_MANIFEST, write_png
from fetalpipe import LANDMARK_COLUMNS
from fetalpipe.cli import main
from fetalpipe.measure.clinical import ga_from_hc_weeks, hc_z_intergrowth21
from fetalpipe.pipeline.infer import InferOptions, run_inference
from fetalpipe.pipeline.predictions import read_predictions
from test_imaging import GRAY, make_dicom

CONTRACT_COLUMNS = [
    "image_path", "status", "error", *LANDMARK_COLUMNS, "ofd_px", "bpd_px", "hc_px", "hc_ellipse_px",
    "pixel_spacing_mm", "ofd_mm", "bpd_mm", "hc_mm", "hc_ellipse_mm", "ga_from_hc_weeks", "hc_z_intergrowth21", "hc_centile_intergrowth21",
    "confidence", "needs_review", "review_reason",
    "stage_disagreement_mm", "outline_fit_residual_mm", "outline_spread_mm", "outline_outside_frame", "axis_ratio", "head_size_fraction",
    "size_calibration_scale", "model_sha256", "precision", "int8_upsampling", "fetalpipe_version",
]


@pytest.fixture
def archive(tmp_path):
    """Four real sample images, one DICOM with spacing, and one of each broken kind."""
    folder = tmp_path / "archive"
    folder.mkdir()
    sample = pd.read_csv(os.path.join(SAMPLE_DIR, "manifest.csv"), dtype={"subject_id": str}).head(4)
    rows = []
    for row in sample.itertuples():
        target = folder / f"scan {row.subject_id} é.png"  # spaces and non-ASCII in names
        shutil.copy(os.path.join(SAMPLE_DIR, row.image_path), target)
        rows.append({"image_path": target.name, "subject_id": row.subject_id, "pixel_spacing_mm": row.pixel_spacing_mm,
                     "gestational_age_weeks": 20.0 + row.Index if row.Index < 3 else np.nan,  # one without a known GA
                     "sonographer": "K. Osei" if row.Index != 1 else np.nan})  # a column of the user's own, with a blank cell
    real = cv2.imread(os.path.join(SAMPLE_DIR, sample.image_path[0]), cv2.IMREAD_GRAYSCALE)
    (folder / "scan.dcm").write_bytes(make_dicom(real.astype(np.uint16), spacing=0.2))
    rows.append({"image_path": "scan.dcm", "subject_id": "dicom", "pixel_spacing_mm": np.nan})
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image")
    png = cv2.imencode(".png", real)[1].tobytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 3])
    (folder / "a_directory.png").mkdir()
    for name in ("empty.png", "text.png", "truncated.png", "a_directory.png", "missing.png"):
        rows.append({"image_path": name, "subject_id": "bad", "pixel_spacing_mm": 0.1})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


EXPECTED_ERRORS = {
    "empty.png": "empty file",
    "text.png": "looks like text",
    "truncated.png": "PNG signature but corrupt or truncated",
    "a_directory.png": "is a directory",
    "missing.png": "file not found",
}


def test_contract_errors_resume_and_idempotency(ray_local, tiny_model_path, archive, tmp_path):
    output = tmp_path / "out"
    options = InferOptions(output_dir=str(output), manifest=str(archive), model_path=tiny_model_path, batch_size=4, actors=1, overlays=True)

    # An interrupted first run: only the first three rows were done.
    partial = pd.read_csv(archive).head(3)
    partial_manifest = archive.parent / "partial.csv"
    partial.to_csv(partial_manifest, index=False)
    first = run_inference(InferOptions(**{**options.__dict__, "manifest": str(partial_manifest)}))
    assert first["rows"] == 3

    summary = run_inference(options)
    assert summary["processed_this_run"] == 10 - 3  # resume: only what was not done
    assert summary["ok_without_spacing"] == 0  # the DICOM row has no spacing in the manifest, and its file gives one
    parquet = read_predictions(str(output))
    csv = pd.read_csv(output / "predictions.csv")
    for column in ("error", "review_reason"):
        csv[column] = csv[column].fillna("")  # CSV cannot tell an empty string from a missing value
    assert list(csv.columns[: len(CONTRACT_COLUMNS)]) == CONTRACT_COLUMNS
    assert "subject_id" in csv.columns
    assert len(csv) == 10 and csv["image_path"].is_unique
    pd.testing.assert_frame_equal(
        parquet.sort_values("image_path").reset_index(drop=True)[CONTRACT_COLUMNS],
        csv.sort_values("image_path").reset_index(drop=True)[CONTRACT_COLUMNS],
        check_dtype=False,
    )
    by_name = csv.set_index(csv["image_path"].map(os.path.basename))
    for name, message in EXPECTED_ERRORS.items():
        assert by_name.loc[name, "status"] == "error"
        assert message in by_name.loc[name, "error"]
    ok = csv[csv["status"] == "ok"]
    assert len(ok) == 5
    assert ok[list(LANDMARK_COLUMNS)].notna().all().all()
    # Clinical context: computed from hc_ellipse_mm, the INTERGROWTH-21st pair only where the manifest gives a GA.
    np.testing.assert_allclose(ok["ga_from_hc_weeks"], ga_from_hc_weeks(ok["hc_ellipse_mm"].to_numpy()), equal_nan=True)
    np.testing.assert_allclose(ok["hc_z_intergrowth21"], hc_z_intergrowth21(ok["hc_ellipse_mm"].to_numpy(), ok["gestational_age_weeks"].to_numpy()), equal_nan=True)
    assert ok["gestational_age_weeks"].notna().sum() == 3 and ok.loc[ok["gestational_age_weeks"].isna(), "hc_z_intergrowth21"].isna().all()
    assert (csv["sonographer"] == "K. Osei").sum() == 3 and csv["sonographer"].isna().sum() == 7  # carried through, blanks blank
    dicom = by_name.loc["scan.dcm"]
    assert dicom["pixel_spacing_mm"] == pytest.approx(0.2)  # read from the file
    assert dicom["hc_mm"] == pytest.approx(dicom["hc_px"] * 0.2)
    assert len(os.listdir(output / "overlays")) == 5
    assert "<span id='count-error'>5</span>" in (output / "report.html").read_text()
    record = json.loads((output / "run.json").read_text())
    assert record["counts"] == {"rows": 10, "ok": 5, "error": 5, "needs_review": int(csv["needs_review"].astype(bool).sum()), "ok_without_spacing": 0,
                                "int8_upsampling": int(csv["int8_upsampling"].sum()), "processed_this_run": 7}
    assert record["model_sha256"] == ok["model_sha256"].iloc[0]

    # Rerun: nothing to do, identical rows, also for a file whose time changed but not its content (a copy, a touch).
    touched = archive.parent / pd.read_csv(archive)["image_path"][1]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    again = run_inference(options)
    assert again["processed_this_run"] == 0
    pd.testing.assert_frame_equal(pd.read_csv(output / "predictions.csv").fillna({"error": "", "review_reason": ""}), csv)

    # A changed file is redone and replaces its old row (never a duplicate).
    first_image = archive.parent / pd.read_csv(archive)["image_path"][0]
    write_png(first_image, GRAY)
    changed = run_inference(options)
    assert changed["processed_this_run"] == 1
    final = read_predictions(str(output))
    assert len(final) == 10 and final["image_path"].is_unique
    stored = pd.concat(pd.read_parquet(output / "predictions" / name) for name in os.listdir(output / "predictions"))
    assert len(stored) == 10
    assert len(pd.read_parquet(output / "predictions")) == 10  # the folder reads as one dataset, as the README says

    # A run over a smaller manifest into the same folder: its CSV shows its 3 images, and the other 7 rows stay stored.
    subset = run_inference(InferOptions(**{**options.__dict__, "manifest": str(partial_manifest)}))
    assert subset["processed_this_run"] == 0 and subset["rows"] == 3 and len(pd.read_csv(output / "predictions.csv")) == 3
    assert len(read_predictions(str(output))) == 10


def test_decoding_in_separate_tasks_gives_the_actors_rows(ray_local, archive, tmp_path):
    """`--decode-in tasks` hands decoded frames (the originals the refinement stage reads included) from Ray tasks to the
    actors: the same rows, errors included, as decoding inside the actors."""
    from fetalpipe.model.model_file import DEFAULT_MODEL_PATH

    tables = {}
    for decode_in in ("actors", "tasks"):
        options = InferOptions(output_dir=str(tmp_path / decode_in), manifest=str(archive), model_path=DEFAULT_MODEL_PATH, batch_size=4,
                               actors=1, decode_in=decode_in, report=False, print_summary=False)
        assert run_inference(options)["rows"] == 10
        tables[decode_in] = read_predictions(str(tmp_path / decode_in)).sort_values("image_path").reset_index(drop=True)
    actors, tasks = tables["actors"], tables["tasks"]
    assert list(tasks["image_path"]) == list(actors["image_path"])
    assert list(tasks["status"]) == list(actors["status"]) and (tasks["status"] == "ok").sum() == 5
    assert list(tasks["error"].fillna("")) == list(actors["error"].fillna(""))
    for column in (*LANDMARK_COLUMNS, "hc_mm", "outline_spread_mm", "confidence"):
        np.testing.assert_allclose(tasks[column].to_numpy(float), actors[column].to_numpy(float), atol=1e-4, equal_nan=True)
    assert list(tasks["needs_review"]) == list(actors["needs_review"])


def test_folder_input_and_overwrite(ray_local, tiny_model_path, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(os.path.join(SAMPLE_DIR, "training_set", sorted(n for n in os.listdir(os.path.join(SAMPLE_DIR, "training_set")) if "Annotation" not in n)[0]), folder / name)
    (folder / "notes.txt").write_text("ignored: not an image extension")
    output = tmp_path / "out"
    summary = run_inference(InferOptions(output_dir=str(output), input_glob=str(folder), model_path=tiny_model_path, actors=1))
    assert summary["rows"] == 2 and summary["ok"] == 2
    csv = pd.read_csv(output / "predictions.csv")
    assert csv["hc_mm"].isna().all()  # no spacing known: no mm
    # ... and the run says so, before it starts and at its end, and so do run.json and the report: without a spacing the
    # review flag loses its signals in mm, and with them much of what it catches.
    printed = capsys.readouterr().out
    assert re.search(r"\n  spacing +none for 2 of the 2 images", printed) and re.search(r"\n  no spacing +2 ok rows: no mm columns, no size line, and a weaker review flag", printed)
    assert summary["ok_without_spacing"] == 2
    assert json.loads((output / "run.json").read_text())["counts"]["ok_without_spacing"] == 2
    assert "2 ok rows have no pixel spacing" in (output / "report.html").read_text()
    redo = run_inference(InferOptions(output_dir=str(output), input_glob=str(folder), model_path=tiny_model_path, actors=1, overwrite=True))
    assert redo["processed_this_run"] == 2 and redo["rows"] == 2


def test_cli_exit_codes_for_jobs_that_cannot_run(tmp_path, tiny_model_path, capsys):
    bad_manifest = tmp_path / "bad.csv"
    bad_manifest.write_text("path\nx.png\n")
    assert main(["infer", "--manifest", str(bad_manifest), "--output", str(tmp_path / "o"), "--model", tiny_model_path]) == 2
    assert "missing required column 'image_path'" in capsys.readouterr().err
    not_a_model = tmp_path / "model.pt"
    not_a_model.write_bytes(b"garbage")
    assert main(["infer", "--manifest", str(bad_manifest), "--output", str(tmp_path / "o"), "--model", str(not_a_model)]) == 2
    assert "cannot read model file" in capsys.readouterr().err


def test_model_actors_that_cannot_start_stop_the_job_with_their_reason(ray_local, tiny_model_path, tmp_path, capsys, reliability_log):
    """Weights that do not fit the architecture pass the driver's header check and fail in the actors: the job stops
    at once (no error row for every image) and the CLI ends on the actors' reason, exit code 2."""
    from conftest import model_missing_a_weight
    from fetalpipe.pipeline.infer import ActorStartError

    mismatched = model_missing_a_weight(tiny_model_path, tmp_path / "mismatched.pt")
    with pytest.raises(ActorStartError, match="could not start: .*ModelFileError: .*weights do not fit the architecture.*Missing key"):
        run_inference(InferOptions(output_dir=str(tmp_path / "out"), manifest=SAMPLE_MANIFEST, model_path=mismatched, actors=1))
    assert read_predictions(str(tmp_path / "out")).empty
    assert main(["infer", "--manifest", SAMPLE_MANIFEST, "--output", str(tmp_path / "cli"), "--model", mismatched, "--actors", "1"]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("fetalpipe infer: error: the model actors could not start")
    assert read_predictions(str(tmp_path / "cli")).empty
    reliability_log(area="infer: model file", case="weights that do not fit the architecture (a tensor missing): the header reads fine",
                    outcome=f"the job stops when the actors load the weights, exit 2, no row written: {last_line.split(': error: ', 1)[1]}")


def test_console_script_exits_quickly_with_everything_written(tiny_model_path, tmp_path):
    """`fetalpipe.cli.run` leaves with os._exit: the exit code, the printed summary and every output must be complete."""
    output = tmp_path / "out"
    base = [sys.executable, "-m", "fetalpipe.cli", "infer", "--model", tiny_model_path, "--output", str(output)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([*base, "--manifest", SAMPLE_MANIFEST, "--batch-size", "8", "--actors", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    last_lines = done.stdout.strip().splitlines()[-6:]  # the summary, printed last, so flushed before the exit
    counts = re.search(r"^fetalpipe infer: (\d+) rows \((\d+) ok, (\d+) error", last_lines[0])
    assert counts and int(counts[1]) == int(counts[2]) + int(counts[3]) == 20, done.stdout
    assert last_lines[-1].split()[-1] == str(output / "logs" / "ray.log")
    assert len(pd.read_csv(output / "predictions.csv")) == 20 and len(read_predictions(str(output))) == 20
    assert json.loads((output / "run.json").read_text())["counts"]["rows"] == 20
    failed = subprocess.run([*base, "--manifest", str(tmp_path / "missing.csv")], env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "missing.csv" in failed.stderr


def test_dry_run_plans_from_the_output_and_writes_nothing(tiny_model_path, archive, tmp_path, capsys):
    """No Ray, no file: the plan counts what is done (here: nothing), what is to do, and the files it already sees missing."""
    output = tmp_path / "planned"
    plan = run_inference(InferOptions(output_dir=str(output), manifest=str(archive), model_path=tiny_model_path, dry_run=True))
    assert plan == {**plan, "rows": 10, "to_process": 10, "done": 0, "unreadable": 2}  # missing.png and a directory
    assert not output.exists()
    printed = capsys.readouterr().out
    assert "10 of 10 rows (0 already done)" in printed and "missing.png" in printed and "nothing started, nothing written" in printed


def test_write_batch_names_files_by_batch_and_leaves_no_partial_file(tmp_path):
    """A retried batch (its actor restarted) must replace its own file, not add a second copy."""
    from fetalpipe.pipeline.predictions import write_batch

    rows = {
        "image_path": np.array(["a.png", "b.png"], dtype=object), "status": np.array(["ok", "error"], dtype=object),
        "error": np.array([None, "cannot decode"], dtype=object), "hc_mm": np.array([180.5, np.nan]),
        "run_id": np.array(["run1", "run1"], dtype=object), "row_index": np.array([64, 65]),
    }
    predictions_dir = tmp_path / "predictions"
    predictions_dir.mkdir()
    first = write_batch(rows, str(predictions_dir))
    rows["hc_mm"] = np.array([181.0, np.nan])
    second = write_batch(rows, str(predictions_dir))
    assert first == second and os.path.basename(first) == "run1-000000064.parquet"
    assert sorted(os.listdir(predictions_dir)) == ["run1-000000064.parquet"]
    table = read_predictions(str(tmp_path))
    assert table["hc_mm"].tolist()[0] == 181.0 and "row_index" not in table
    assert table["error"].tolist()[1] == "cannot decode"
    # A batch with no errors at all has the same schema: the folder reads as one dataset.
    write_batch({**rows, "error": np.array([None, None], dtype=object), "row_index": np.array([0, 1])}, str(predictions_dir))
    assert pd.read_parquet(predictions_dir)["error"].isna().sum() == 3


def test_many_batch_files_are_compacted_into_parts_and_nothing_changes(tmp_path, monkeypatch):
    """One file per batch would leave ~16,000 files for a million images: past the limit, the run's end rewrites them."""
    import fetalpipe.pipeline.predictions as predictions

    predictions_dir = tmp_path / "predictions"
    predictions_dir.mkdir()
    rows = pd.DataFrame({"image_path": [f"/scans/{index:03d}.png" for index in range(70)], "status": "ok", "hc_mm": np.arange(70, dtype=float)})
    for index in range(0, 70, 5):  # 14 files of 5 rows
        rows.iloc[index:index + 5].to_parquet(predictions_dir / f"run-{index:09d}.parquet", index=False)
    monkeypatch.setattr(predictions, "ROWS_PER_COMPACTED_FILE", 30)

    monkeypatch.setattr(predictions, "MAX_FILES_BEFORE_COMPACTION", 20)
    predictions.compact_if_needed(str(predictions_dir), rows)  # 14 files, within the limit: untouched
    assert len(list(predictions_dir.glob("*.parquet"))) == 14

    monkeypatch.setattr(predictions, "MAX_FILES_BEFORE_COMPACTION", 10)
    predictions.compact_if_needed(str(predictions_dir), rows)
    parts = sorted(predictions_dir.glob("*.parquet"))
    assert [len(pd.read_parquet(part)) for part in parts] == [30, 30, 10]
    pd.testing.assert_frame_equal(pd.read_parquet(predictions_dir).sort_values("image_path").reset_index(drop=True), rows)
    assert not (tmp_path / "predictions.old").exists() and not (tmp_path / "predictions.compact").exists()

    predictions.compact_if_needed(str(predictions_dir), rows)  # already compact: left as it is
    assert sorted(predictions_dir.glob("*.parquet")) == parts



def _ellipse_endpoints(centre_x, centre_y, semi_major, semi_minor):
    from fetalpipe.measure import ellipse as ellipse_geometry

    return ellipse_geometry.to_endpoints(np.array([[centre_x, centre_y, semi_major, semi_minor, 0.0]]))[0]


def _stub_stage1(answer):
    """A LandmarkPredictor whose stage 1 is ANSWER(transforms) -> (points, confidence); `calls` holds each call's regions."""
    from fetalpipe.pipeline.infer import LandmarkPredictor

    class Stub(LandmarkPredictor):
        def __init__(self):
            self.codec = type("Codec", (), {"input_size": 256})()
            self.calls = []

        def _locate(self, images, transforms):
            self.calls.append([transform.region_box for transform in transforms])
            return answer(transforms)

    return Stub()


def test_stage1_measures_a_cropped_frame_again_whole_when_its_head_runs_off_the_crop():
    """A cropped frame whose stage-1 outline runs off the crop (its scan's edge passed for margin) is measured again,
    alone and whole."""
    from fetalpipe.data.imaging import ResizeTransform

    inside, off_the_crop, whole_frame_answer = _ellipse_endpoints(500, 400, 150, 100), _ellipse_endpoints(500, 400, 300, 200), _ellipse_endpoints(520, 410, 320, 210)
    region, whole_box = (260, 130, 800, 540), (0, 0, 1220, 800)
    cropped = ResizeTransform.for_image(1220, 800, 256, region=region)

    def answer(transforms):
        if all(t.is_cropped for t in transforms):
            return np.stack([inside, off_the_crop, inside]), np.array([0.9, 0.9, 0.9])
        return np.stack([whole_frame_answer] * len(transforms)), np.full(len(transforms), 0.5)

    originals = [np.zeros((800, 1220), np.float32)] * 3
    assert cropped.outline_share_off_region(off_the_crop) > 0 and cropped.outline_share_off_region(inside) == 0
    predictor = _stub_stage1(answer)
    points, confidence = predictor.locate(np.zeros((3, 256, 256), np.float32), [cropped] * 3, originals)
    assert predictor.calls == [[region] * 3, [whole_box]]  # one more pass, for the one frame whose head ran off its crop
    assert np.allclose(points[[0, 2]], [inside, inside]) and np.allclose(points[1], whole_frame_answer)
    assert confidence.tolist() == [0.9, 0.5, 0.9]
    predictor = _stub_stage1(answer)
    predictor.locate(np.zeros((1, 256, 256), np.float32), [ResizeTransform.for_image(1220, 800, 256)], originals[:1])
    assert predictor.calls == [[whole_box]]  # an uncropped frame without a candidate is measured once


def test_stage1_confirms_a_scan_inside_black_margins_only_where_both_passes_find_the_head_inside_it():
    """Inside black margins the scan's box may be a dark scan's edge: the crop is measured only where the whole frame's
    head lies inside it, and its answer kept only where that head lies inside it too."""
    from fetalpipe.data.imaging import ResizeTransform

    candidate, whole_box = (260, 130, 800, 540), (0, 0, 1220, 800)
    small_inside, large_off = _ellipse_endpoints(600, 400, 150, 100), _ellipse_endpoints(600, 400, 380, 250)
    crop_answers = [_ellipse_endpoints(610, 405, 160, 110), large_off]  # row 0's crop pass stays inside, row 1's runs off

    def answer(transforms):
        if all(not t.is_cropped for t in transforms):  # the whole frames: rows 0 and 1 inside the candidate, row 2 not
            return np.stack([small_inside, small_inside, large_off]), np.array([0.5, 0.5, 0.5])
        return np.stack(crop_answers[:len(transforms)]), np.full(len(transforms), 0.9)

    whole = ResizeTransform.for_image(1220, 800, 256)
    originals = [np.zeros((800, 1220), np.float32)] * 3
    predictor = _stub_stage1(answer)
    points, confidence = predictor.locate(np.zeros((3, 256, 256), np.float32), [whole] * 3, originals, np.array([candidate] * 3))
    assert predictor.calls == [[whole_box] * 3, [candidate, candidate]]  # row 2's head runs off the candidate: not tried
    assert np.allclose(points[0], crop_answers[0]) and confidence[0] == 0.9  # confirmed twice: the crop's answer
    assert np.allclose(points[1], small_inside) and confidence[1] == 0.5  # the crop's head ran off it: the whole frame's
    assert np.allclose(points[2], large_off)


def test_a_flagged_dark_frame_is_measured_again_brightened_and_kept_only_where_stage1_is_as_sure_and_the_score_lower():
    """Frames 0, 2, 4, 5 are darker than the training split's lower quartile and flagged; frame 1 is flagged, and its
    scan is bright inside a dark screenshot frame; frame 3 is dark but not flagged, frame 2 was measured upright (skipped).
    The brightened measurement replaces frame 0's (surer, lower score), not frame 4's (stage 1 less sure) nor frame 5's
    (a higher score)."""
    from fetalpipe.data.imaging import TRAINING_LOWER_QUARTILE_CONTENT_MEDIAN, content_median
    from fetalpipe.measure.review import ReviewRule, ReviewRules
    from fetalpipe.pipeline.infer import SIGNAL_KEYS, LandmarkPredictor

    predictor = _stub_stage1(None)
    # flagged where log(stage disagreement in mm) − (confidence − 0.9) / 0.1 > 0
    predictor.review_rules = ReviewRules(ReviewRule(signals=("stage_disagreement_mm", "confidence"), mean=(0.0, 0.9), scale=(1.0, 0.1),
                                                    weights=(1.0, -1.0), bias=0.0, threshold=0.0))
    levels = [0.05, 0.4, 0.05, 0.05, 0.05, 0.05]  # each frame's content median
    batch = {"original_pixels": np.empty(6, dtype=object), "pixel_spacing_mm": np.full(6, 0.1)}
    batch["original_pixels"][:] = [np.full((90, 120), level, np.float32) for level in levels]
    batch["scan_region"] = np.array([(0, 0, 120, 90)] * 6)
    batch["original_pixels"][1] = np.full((90, 120), 0.05, np.float32)
    batch["original_pixels"][1][20:70, 30:90] = 0.4  # the scan, in a dark frame
    batch["scan_region"][1] = (30, 20, 60, 50)
    first_points = np.stack([_ellipse_endpoints(60, 45, 40, 30)] * 6)
    points, confidence, scale = first_points.copy(), np.full(6, 0.9), np.ones(6)
    signals = {name: np.full(6, 0.5) for name in SIGNAL_KEYS}
    signals["stage_disagreement_mm"] = np.array([3.0, 3.0, 3.0, 0.5, 3.0, 3.0])
    retried_levels = []
    brightened_points = _ellipse_endpoints(61, 46, 42, 31)

    def measure(images, transforms, originals, candidates, pixel_spacing_mm):
        retried_levels.extend(content_median(pixels) for pixels in originals)
        count = len(originals)  # frames 0, 4, 5 in that order
        retry_signals = {name: np.full(count, 0.5) for name in SIGNAL_KEYS}
        retry_signals["stage_disagreement_mm"] = np.array([0.5, 0.5, 10.0])
        return np.stack([brightened_points] * count), np.array([0.95, 0.85, 0.95]), np.full(count, 1.01), retry_signals

    predictor.measure = measure
    replaced = LandmarkPredictor.measure_dark_frames_brightened(predictor, batch, points, confidence, scale, signals, skip=[2])
    assert replaced == [0]
    assert retried_levels == pytest.approx([TRAINING_LOWER_QUARTILE_CONTENT_MEDIAN] * 3, abs=0.005)  # brightened to the quartile
    assert np.allclose(points[0], brightened_points) and confidence[0] == 0.95 and scale[0] == 1.01
    assert signals["stage_disagreement_mm"][0] == 0.5
    assert np.allclose(points[1:], first_points[1:]) and confidence[1:].tolist() == [0.9] * 5 and scale[1:].tolist() == [1.0] * 5


def test_a_flagged_frame_turned_with_its_scan_is_measured_upright_and_its_points_mapped_back(tmp_path):
    """The shipped model on sample frames turned by 37° in a grown frame, with a review rule that flags every frame (so
    each is measured again upright) and with one that flags none: upright, HC and the head's centre agree with the
    frame measured as stored, and the points are in the turned frame's own pixels."""
    import dataclasses

    from fetalpipe.model.model_file import DEFAULT_MODEL_PATH
    from fetalpipe.pipeline.infer import LandmarkPredictor
    from test_imaging import _turned

    table = pd.read_csv(SAMPLE_MANIFEST).head(4)
    paths, turned_paths, maps = [], [], []
    for row in table.itertuples():
        image = cv2.imread(os.path.join(SAMPLE_DIR, row.image_path), cv2.IMREAD_GRAYSCALE)
        turned, matrix = _turned(image.astype(np.float32), 37.0)
        paths.append(os.path.join(SAMPLE_DIR, row.image_path))
        turned_paths.append(write_png(tmp_path / f"turned_{row.Index}.png", np.round(turned).astype(np.uint8)))
        maps.append(matrix)
    predictor = LandmarkPredictor(DEFAULT_MODEL_PATH, threads=1, precision="int8")

    def measure(image_paths):
        batch = {"image_path": np.array(image_paths, dtype=object), "pixel_spacing_mm": table["pixel_spacing_mm"].to_numpy(float),
                 "run_id": np.full(len(image_paths), "t", dtype=object)}
        output = predictor(batch)
        return output["hc_ellipse_mm"], np.stack([np.stack([output[f"{name}_x"], output[f"{name}_y"]], axis=1) for name in ("ofd1", "ofd2", "bpd1", "bpd2")], axis=1)

    clean_hc_mm, clean_points = measure(paths)
    rule = predictor.review_rules.with_spacing
    predictor.review_rules = dataclasses.replace(predictor.review_rules, with_spacing=dataclasses.replace(rule, threshold=float("inf")))  # flags none
    as_turned_hc_mm, as_turned_points = measure(turned_paths)
    predictor.review_rules = dataclasses.replace(predictor.review_rules, with_spacing=dataclasses.replace(rule, threshold=float("-inf")))  # flags every frame
    upright_hc_mm, upright_points = measure(turned_paths)
    assert not np.allclose(upright_points, as_turned_points)  # the second measurement replaced the first
    clean_centres = np.stack([m[:, :2] @ c.mean(axis=0) + m[:, 2] for m, c in zip(maps, clean_points)])  # in the turned frame
    assert np.abs(upright_points.mean(axis=1) - clean_centres).max() < 4.0  # px, in the turned frame
    assert np.abs(upright_hc_mm - clean_hc_mm).max() < 1.5


def test_an_actor_measures_a_batch_in_parts_of_bounded_decoded_size_with_the_same_rows(tmp_path):
    """Frames are decoded a bounded part of the batch at a time (`preprocess.decoded_chunks`): parts never hold more than
    the budget (one row at least), keep the rows' order, and the actor's output is the same whatever the parts."""
    from fetalpipe.model.model_file import DEFAULT_MODEL_PATH
    from fetalpipe.pipeline.infer import LandmarkPredictor
    from fetalpipe.pipeline.preprocess import decoded_chunks

    table = pd.read_csv(SAMPLE_MANIFEST).head(5)
    paths = [os.path.join(SAMPLE_DIR, path) for path in table["image_path"]]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    paths.insert(2, str(tmp_path / "corrupt.png"))
    batch = {"image_path": np.array(paths, dtype=object), "pixel_spacing_mm": np.full(len(paths), 0.15),
             "run_id": np.full(len(paths), "t", dtype=object)}

    assert {cv2.imread(path, cv2.IMREAD_GRAYSCALE).shape for path in paths if "corrupt" not in path} == {(540, 800)}
    input_bytes = 256 * 256 * 4  # a model input, float32
    frame_bytes = 800 * 540 * 4 + input_bytes  # a frame as float32, with its model input
    parts = list(decoded_chunks(batch, 256, keep_original=True, max_decoded_bytes=2 * frame_bytes + input_bytes))
    assert [len(part["image_path"]) for part in parts] == [3, 2, 1]  # the corrupt row holds only its (empty) model input
    assert [path for part in parts for path in part["image_path"]] == paths
    assert [status for part in parts for status in part["status"]] == ["ok", "ok", "error", "ok", "ok", "ok"]
    assert len(list(decoded_chunks(batch, 256, keep_original=True, max_decoded_bytes=1))) == len(paths)

    whole = LandmarkPredictor(DEFAULT_MODEL_PATH, threads=1, precision="int8")(dict(batch))
    by_row = LandmarkPredictor(DEFAULT_MODEL_PATH, threads=1, precision="int8", max_decoded_bytes=1)(dict(batch))
    assert set(whole) == set(by_row)
    assert list(by_row["image_path"]) == paths and list(by_row["status"]) == list(whole["status"])
    for column in (*LANDMARK_COLUMNS, "hc_ellipse_mm", "confidence"):
        np.testing.assert_allclose(np.asarray(by_row[column], float), np.asarray(whole[column], float), atol=1e-6)
    assert list(by_row["needs_review"]) == list(whole["needs_review"])


def test_each_row_says_whether_its_node_ran_the_upsampling_in_int8(tmp_path, monkeypatch):
    """Nodes of one cluster can build different int8 models (the upsampling in int8 only on CPUs with VNNI), and their
    measurements can differ by a mm: every row, error rows too, says which build measured it."""
    from fetalpipe.model import quantize
    from fetalpipe.model.model_file import DEFAULT_MODEL_PATH
    from fetalpipe.pipeline.infer import LandmarkPredictor
    from fetalpipe.pipeline.report import _precision

    paths = [os.path.join(SAMPLE_DIR, path) for path in pd.read_csv(SAMPLE_MANIFEST)["image_path"].head(2)] + [str(tmp_path / "missing.png")]
    batch = {"image_path": np.array(paths, dtype=object), "pixel_spacing_mm": np.full(3, 0.15), "run_id": np.full(3, "t", dtype=object)}
    for cpu_has_vnni in (True, False):
        monkeypatch.setattr(quantize, "int8_upsampling_pays", lambda: cpu_has_vnni)
        rows = LandmarkPredictor(DEFAULT_MODEL_PATH, threads=1, precision="int8")(dict(batch))
        assert list(rows["status"]) == ["ok", "ok", "error"]
        assert rows["int8_upsampling"].dtype == bool and list(rows["int8_upsampling"]) == [cpu_has_vnni] * 3
    monkeypatch.setattr(quantize, "int8_upsampling_pays", lambda: True)
    assert not LandmarkPredictor(DEFAULT_MODEL_PATH, threads=1, precision="fp32")(dict(batch))["int8_upsampling"].any()
    assert _precision({"precision": "int8", "counts": {"rows": 1005, "int8_upsampling": 600}}) == \
        "int8; the upsampling in int8 (CPUs with VNNI) on 600 of 1,005 rows"
    assert _precision({"precision": "fp32", "counts": {"rows": 3, "int8_upsampling": 0}}) == "fp32"
