"""The bad-input corpus through `infer` (generated here, never committed), an inference actor killed
mid-run, SIGTERM to the driver, and two independent runs that must agree row for row."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import SAMPLE_DIR, SAMPLE_MANIFEST
from fetalpipe import LANDMARK_COLUMNS
from fetalpipe.model.model_file import DEFAULT_MODEL_PATH
from fetalpipe.pipeline.infer import InferOptions, run_inference
from fetalpipe.pipeline.predictions import read_predictions
from test_imaging import make_dicom

PREDICTION_COLUMNS = ["image_path", "status", "error", *LANDMARK_COLUMNS, "ofd_px", "bpd_px", "hc_px", "hc_ellipse_px",
                      "pixel_spacing_mm", "hc_mm", "hc_ellipse_mm", "confidence", "model_sha256", "file_sha256"]


def sample_image():
    table = pd.read_csv(SAMPLE_MANIFEST)
    row = table.iloc[0]
    return cv2.imread(os.path.join(SAMPLE_DIR, row["image_path"]), cv2.IMREAD_GRAYSCALE), float(row["pixel_spacing_mm"])


def corrupt_png_body(image: np.ndarray) -> bytes:
    """A PNG whose signature and header are intact but whose compressed pixel data is damaged."""
    data = bytearray(cv2.imencode(".png", image)[1].tobytes())
    start = data.find(b"IDAT") + 200
    data[start:start + 200] = bytes(byte ^ 0x5A for byte in data[start:start + 200])
    return bytes(data)


def build_corpus(folder) -> tuple[pd.DataFrame, dict]:
    """Each case: file name -> (what it is, 'ok' or a substring the error message must contain)."""
    gray, spacing_mm = sample_image()
    height, width = gray.shape
    png = cv2.imencode(".png", gray)[1].tobytes()
    huge = cv2.resize(gray, (6000, int(round(6000 * height / width))), interpolation=cv2.INTER_LINEAR)
    files = {
        "scan with spaces é ü.png": (png, "name with spaces and non-ASCII characters", "ok"),
        "reference.png": (png, "the reference image (8-bit gray PNG)", "ok"),
        "rgb.png": (cv2.imencode(".png", cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))[1].tobytes(), "RGB PNG", "ok"),
        "sixteen_bit.png": (cv2.imencode(".png", gray.astype(np.uint16) * 257)[1].tobytes(), "16-bit PNG", "ok"),
        "jpeg_bytes.png": (cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(), "JPEG bytes named .png", "ok"),
        "huge.png": (cv2.imencode(".png", huge)[1].tobytes(), f"huge image ({huge.shape[1]}x{huge.shape[0]})", "ok"),
        "no_spacing.dcm": (make_dicom(gray.astype(np.uint16)), "DICOM without pixel spacing", "ok"),
        "multiframe.dcm": (make_dicom(np.stack([gray, gray[::-1]]).astype(np.uint16), spacing=spacing_mm, frames=2), "multi-frame DICOM (spacing in the file)", "ok"),
        "empty.png": (b"", "zero-byte file", "empty file"),
        "text.png": (b"patient list\nnot an image\n", "text file named .png", "looks like text"),
        "truncated.png": (png[: len(png) // 3], "truncated PNG", "corrupt or truncated"),
        "corrupt_body.png": (corrupt_png_body(gray), "PNG with a corrupt body (damaged IDAT)", "corrupt or truncated"),
        "one_pixel.png": (cv2.imencode(".png", np.zeros((1, 1), np.uint8))[1].tobytes(), "1x1 image", "too small"),
        "black.png": (cv2.imencode(".png", np.zeros_like(gray))[1].tobytes(), "a blank (all-black) frame", "blank image"),
    }
    cases, rows = {}, []
    for name, (data, description, expected) in files.items():
        (folder / name).write_bytes(data)
        cases[name] = (description, expected)
    (folder / "a_directory.png").mkdir()
    cases["a_directory.png"] = ("a directory where a file should be", "is a directory")
    cases["missing.png"] = ("a path that does not exist", "file not found")
    for name in cases:
        spacing = np.nan if name.endswith(".dcm") else spacing_mm  # DICOM: spacing comes from the file, or is unknown
        spacing = spacing * width / huge.shape[1] if name == "huge.png" else spacing  # the same head, in smaller pixels
        rows.append({"image_path": name, "pixel_spacing_mm": spacing})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest, cases


def test_bad_input_corpus_through_infer(ray_local, reliability_log, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    manifest, cases = build_corpus(folder)
    summary = run_inference(InferOptions(output_dir=str(tmp_path / "out"), manifest=str(manifest), model_path=DEFAULT_MODEL_PATH, batch_size=4, actors=1))
    output = pd.read_csv(tmp_path / "out" / "predictions.csv").fillna({"error": ""})
    assert summary["rows"] == len(cases) and output["image_path"].is_unique
    by_name = output.set_index(output["image_path"].map(os.path.basename))
    reference = by_name.loc["reference.png"]
    for name, (description, expected) in cases.items():
        row = by_name.loc[name]
        if expected == "ok":
            assert row["status"] == "ok", f"{name}: {row['error']}"
            outcome = f"ok: HC {row['hc_ellipse_px']:.0f} px" + (f", {row['hc_ellipse_mm']:.1f} mm" if np.isfinite(row["hc_ellipse_mm"]) else ", no mm (no spacing)")
        else:
            assert row["status"] == "error" and expected in row["error"], f"{name}: {row['status']} {row['error']!r}"
            outcome = f"error row: {row['error']}"
        reliability_log(area="infer: input file", case=description, outcome=outcome, crashes=0, lost_rows=0, duplicated_rows=0)

    # Valid oddities are measured like the reference image they were made from. Compared as decoded, before the shipped
    # model's size calibration: it needs a pixel spacing, so it scales every image here but no_spacing.dcm.
    assert by_name.loc["no_spacing.dcm", "size_calibration_scale"] == 1.0 and reference["size_calibration_scale"] != 1.0

    def points(name):
        row = by_name.loc[name]
        landmarks = row[list(LANDMARK_COLUMNS)].to_numpy(dtype=float).reshape(4, 2)
        centre = landmarks.mean(axis=0)
        return centre + (landmarks - centre) / row["size_calibration_scale"]

    for name in ("scan with spaces é ü.png", "rgb.png", "sixteen_bit.png"):
        assert np.abs(points(name) - points("reference.png")).max() < 0.5, name
    for name in ("multiframe.dcm", "no_spacing.dcm"):  # DICOM intensities are rescaled min-max, not /255
        assert np.abs(points(name) - points("reference.png")).max() < 2.0, name
    assert abs(by_name.loc["jpeg_bytes.png", "hc_ellipse_px"] / reference["hc_ellipse_px"] - 1) < 0.02
    huge_scale = 6000 / sample_image()[0].shape[1]
    assert abs(by_name.loc["huge.png", "hc_ellipse_px"] / (huge_scale * reference["hc_ellipse_px"]) - 1) < 0.02  # original-pixel space
    assert np.isnan(by_name.loc["no_spacing.dcm", "hc_mm"])
    assert by_name.loc["multiframe.dcm", "hc_mm"] == pytest.approx(by_name.loc["multiframe.dcm", "hc_px"] * reference["pixel_spacing_mm"])
    assert by_name.loc["huge.png", "hc_ellipse_mm"] == pytest.approx(reference["hc_ellipse_mm"], rel=0.02)  # mm only from original pixels


@pytest.fixture(scope="module")
def forty_image_archive(tmp_path_factory):
    """The 20 sample images twice, under different names: long enough to interrupt mid-run."""
    folder = tmp_path_factory.mktemp("archive40")
    table = pd.read_csv(SAMPLE_MANIFEST, dtype={"subject_id": str})
    rows = []
    for copy in ("a", "b"):
        for row in table.itertuples():
            name = f"{copy}_{os.path.basename(row.image_path)}"
            shutil.copy(os.path.join(SAMPLE_DIR, row.image_path), folder / name)
            rows.append({"image_path": name, "subject_id": row.subject_id, "pixel_spacing_mm": row.pixel_spacing_mm})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def predictions_table(output_dir) -> pd.DataFrame:
    table = pd.read_csv(os.path.join(output_dir, "predictions.csv")).fillna({"error": ""})
    return table[PREDICTION_COLUMNS].sort_values("image_path").reset_index(drop=True)


@pytest.fixture(scope="module")
def reference_run(ray_local, tiny_model_path, forty_image_archive, tmp_path_factory):
    output = tmp_path_factory.mktemp("reference")
    run_inference(InferOptions(output_dir=str(output), manifest=str(forty_image_archive), model_path=tiny_model_path, batch_size=4, actors=1))
    return predictions_table(output)


def test_two_independent_runs_agree_row_for_row(reference_run, tiny_model_path, forty_image_archive, reliability_log, tmp_path):
    run_inference(InferOptions(output_dir=str(tmp_path / "second"), manifest=str(forty_image_archive), model_path=tiny_model_path, batch_size=8, actors=2))
    second = predictions_table(tmp_path / "second")
    pd.testing.assert_frame_equal(second, reference_run, check_exact=False, atol=1e-6, rtol=0)
    reliability_log(area="infer: fault", case="two independent runs (batch 4 × 1 actor, batch 8 × 2 actors), separate output folders",
                    outcome="identical predictions row for row (40 of 40)", crashes=0, lost_rows=0, duplicated_rows=0)


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def processes_named(fragment: str) -> list[int]:
    """PIDs of this test run's Ray workers (children of the raylet this test process started) whose
    command line (Ray sets it to the actor's class) contains `fragment`. Other Ray instances on the machine are left alone."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if fragment.encode() in handle.read() and parent_pid(parent_pid(int(entry))) == os.getpid():
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


def test_inference_actor_killed_mid_run(reference_run, tiny_model_path, forty_image_archive, reliability_log, tmp_path):
    output = tmp_path / "out"
    options = InferOptions(output_dir=str(output), manifest=str(forty_image_archive), model_path=tiny_model_path, batch_size=2, actors=1)
    result = {}
    runner = threading.Thread(target=lambda: result.update(summary=run_inference(options)), daemon=True)
    runner.start()
    killed = None
    deadline = time.time() + 180
    while killed is None and time.time() < deadline and runner.is_alive():
        actors = processes_named("LandmarkPredictor")
        if actors and list((output / "predictions").glob("*.parquet")):  # mid-run: some batches have landed
            os.kill(actors[0], signal.SIGKILL)
            killed = actors[0]
        time.sleep(0.05)
    runner.join(timeout=300)
    assert killed is not None, "the run ended before an actor could be killed"
    assert not runner.is_alive() and "summary" in result, "the run did not complete after its actor was killed"
    assert result["summary"]["rows"] == 40
    after = predictions_table(output)
    assert after["image_path"].is_unique and len(after) == 40
    pd.testing.assert_frame_equal(after, reference_run, check_exact=False, atol=1e-6, rtol=0)
    assert len(pd.read_parquet(output / "predictions")) == 40  # the Parquet dataset too: no duplicates
    reliability_log(area="infer: fault", case="SIGKILL of the inference actor's process mid-run",
                    outcome="Ray restarted the actor and retried its batch; 40 of 40 rows, identical to an uninterrupted run",
                    crashes=0, lost_rows=40 - len(after), duplicated_rows=0)


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_sigterm_to_driver_then_rerun(ray_local, tiny_model_path, forty_image_archive, reference_run, reliability_log, tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "fetalpipe.cli", "infer", "--manifest", str(forty_image_archive), "--output", str(output),
               "--model", tiny_model_path, "--batch-size", "2", "--actors", "1"]
    driver = subprocess.Popen(command, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None and not list((output / "predictions").glob("*.parquet")):
            time.sleep(0.05)
        driver.send_signal(signal.SIGTERM)  # as a scheduler does: to the driver only
        returncode = driver.wait(timeout=60)
        stderr = driver.stderr.read().decode()
        assert returncode == 128 + signal.SIGTERM, stderr
        assert "interrupted" in stderr and not (output / "predictions.csv").exists()
        deadline = time.time() + 60
        while process_group_alive(driver.pid) and time.time() < deadline:
            time.sleep(0.5)
        assert not process_group_alive(driver.pid), "the driver left Ray processes behind"
    finally:
        if process_group_alive(driver.pid):
            os.killpg(driver.pid, signal.SIGKILL)
    done_before = len(read_predictions(str(output)))
    summary = run_inference(InferOptions(output_dir=str(output), manifest=str(forty_image_archive), model_path=tiny_model_path, batch_size=4, actors=1))
    assert summary["processed_this_run"] == 40 - done_before
    after = predictions_table(output)
    pd.testing.assert_frame_equal(after, reference_run, check_exact=False, atol=1e-6, rtol=0)
    reliability_log(area="infer: fault", case="SIGTERM to the infer driver mid-run, then the same command again",
                    outcome=f"driver exits 143 and stops its local Ray; rerun processes the {40 - done_before} missing rows; 40 of 40, identical to an uninterrupted run",
                    crashes=0, lost_rows=40 - len(after), duplicated_rows=int(after["image_path"].duplicated().sum()))
