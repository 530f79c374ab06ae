"""Inference with everything on an S3-compatible object store: manifest, images, model and output.

By default a local S3 server (moto's, on 127.0.0.1) is started for the session; with FETALPIPE_TEST_S3_ENDPOINT (plus
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally FETALPIPE_TEST_S3_BUCKET) the same tests run against that
endpoint instead, so that an operator can check their own MinIO or cloud bucket. Runs are CLI processes, as users
start them, pointed at the store by the standard AWS environment variables."""

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pandas as pd
import pytest

from conftest import SAMPLE_DIR, SAMPLE_MANIFEST
from fetalpipe.runtime import storage


@pytest.fixture(scope="session")
def s3_bucket():
    """(bucket URI, environment for the runs): a fresh bucket on the test endpoint."""
    endpoint = os.environ.get("FETALPIPE_TEST_S3_ENDPOINT")
    server = None
    if endpoint:
        credentials = {name: os.environ[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    else:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    environment = {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"), **credentials}
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)  # for this process's own storage calls (uploads, reads)
    bucket = os.environ.get("FETALPIPE_TEST_S3_BUCKET") or f"fetalpipe-test-{uuid.uuid4().hex[:8]}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name=environment["AWS_DEFAULT_REGION"])
    if not os.environ.get("FETALPIPE_TEST_S3_BUCKET"):
        client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}", {**os.environ, **environment, "RAY_USAGE_STATS_ENABLED": "0"}
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if server is not None:
        server.stop()


@pytest.fixture
def s3_archive(s3_bucket, tiny_model_path):
    """The sample's first 8 images, a manifest naming them by relative path plus one missing object, and the model, all
    uploaded under a fresh prefix. Returns (prefix URI, environment)."""
    bucket, environment = s3_bucket
    prefix = f"{bucket}/{uuid.uuid4().hex[:8]}"
    sample = pd.read_csv(SAMPLE_MANIFEST, dtype={"subject_id": str}).head(8)
    for path in sample["image_path"]:
        storage.write_bytes(f"{prefix}/archive/{os.path.basename(path)}", open(os.path.join(SAMPLE_DIR, path), "rb").read())
    manifest = sample.assign(image_path=[os.path.basename(path) for path in sample["image_path"]])
    manifest = pd.concat([manifest, manifest.head(1).assign(image_path="missing.png", subject_id="gone")], ignore_index=True)
    storage.write_text(f"{prefix}/archive/manifest.csv", manifest.to_csv(index=False))
    storage.write_bytes(f"{prefix}/models/model.pt", open(tiny_model_path, "rb").read())
    return prefix, environment


def fetalpipe(environment, *arguments, timeout=300, cwd=None):
    return subprocess.run([sys.executable, "-m", "fetalpipe.cli", *arguments], env=environment, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def read_csv(uri) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(storage.read_bytes(uri)))


def test_infer_from_s3_into_s3_then_an_idempotent_rerun(s3_archive, tmp_path):
    prefix, environment = s3_archive
    command = ["infer", "--manifest", f"{prefix}/archive/manifest.csv", "--model", f"{prefix}/models/model.pt",
               "--output", f"{prefix}/out", "--actors", "1", "--batch-size", "4", "--overlays"]
    working_dir = tmp_path / "cwd"
    working_dir.mkdir()
    first = fetalpipe(environment, *command, cwd=working_dir)
    assert first.returncode == 0, first.stdout + first.stderr
    assert list(working_dir.iterdir()) == []  # an s3:// output writes nothing in the working directory (no local "s3:" folder)
    csv = read_csv(f"{prefix}/out/predictions.csv")
    assert len(csv) == 9 and csv["image_path"].is_unique and csv["image_path"].str.startswith(f"{prefix}/archive/").all()
    missing = csv.set_index("image_path").loc[f"{prefix}/archive/missing.png"]
    assert missing["status"] == "error" and "file not found" in missing["error"]  # a missing object: its own error row
    assert (csv["status"] == "ok").sum() == 8
    assert storage.exists(f"{prefix}/out/run.json") and storage.exists(f"{prefix}/out/report.html")
    assert len(storage.list_files(f"{prefix}/out/overlays", ".png")) == 8
    assert len(storage.list_files(f"{prefix}/out/predictions", ".parquet")) == 3  # one object per batch, nothing temporary

    again = fetalpipe(environment, *command)
    assert again.returncode == 0 and "9 already done, 0 to process" in again.stdout, again.stdout + again.stderr
    pd.testing.assert_frame_equal(read_csv(f"{prefix}/out/predictions.csv"), csv)

    evaluated = fetalpipe(environment, "evaluate", "--predictions", f"{prefix}/out", "--manifest", f"{prefix}/archive/manifest.csv",
                          "--output", f"{prefix}/evaluation")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(storage.read_bytes(f"{prefix}/evaluation/metrics.json"))["images"] == 8
    assert len(read_csv(f"{prefix}/evaluation/per_image_errors.csv")) == 8 and storage.exists(f"{prefix}/evaluation/bland_altman_hc.png")


def test_killed_driver_on_s3_then_rerun_gives_every_row_once(s3_archive):
    prefix, environment = s3_archive
    command = [sys.executable, "-m", "fetalpipe.cli", "infer", "--manifest", f"{prefix}/archive/manifest.csv",
               "--model", f"{prefix}/models/model.pt", "--output", f"{prefix}/killed", "--actors", "1", "--batch-size", "1"]
    driver = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None and not storage.list_files(f"{prefix}/killed/predictions", ".parquet"):
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    assert not storage.exists(f"{prefix}/killed/predictions.csv")  # it died before the end
    landed = len(storage.list_files(f"{prefix}/killed/predictions", ".parquet"))
    assert 1 <= landed < 9

    rerun = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    csv = read_csv(f"{prefix}/killed/predictions.csv")
    assert len(csv) == 9 and csv["image_path"].is_unique


def test_dry_run_plans_without_starting_or_writing(s3_archive):
    prefix, environment = s3_archive
    before = storage.list_files(f"{prefix}/archive")
    planned = fetalpipe(environment, "infer", "--manifest", f"{prefix}/archive/manifest.csv", "--model", f"{prefix}/models/model.pt",
                        "--output", f"{prefix}/planned", "--dry-run")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "9 of 9 rows (0 already done)" in planned.stdout and "1 (missing or unreadable" in planned.stdout
    assert f"{prefix}/archive/missing.png" in planned.stdout
    assert storage.list_files(f"{prefix}/planned") == [] and storage.list_files(f"{prefix}/archive") == before


def test_a_missing_manifest_and_an_output_without_access_stop_with_exit_2(s3_archive):
    prefix, environment = s3_archive
    gone = fetalpipe(environment, "infer", "--manifest", f"{prefix}/archive/no-such-manifest.csv", "--output", f"{prefix}/x")
    assert gone.returncode == 2 and "cannot read manifest" in gone.stderr.strip().splitlines()[-1], gone.stderr
    no_bucket = f"s3://fetalpipe-no-such-bucket-{uuid.uuid4().hex[:8]}/out"
    refused = fetalpipe(environment, "infer", "--manifest", f"{prefix}/archive/manifest.csv", "--model", f"{prefix}/models/model.pt",
                        "--output", no_bucket)
    assert refused.returncode == 2 and "cannot write to the output location" in refused.stderr.strip().splitlines()[-1], refused.stderr


def test_training_from_s3_on_two_workers_past_a_corrupt_image_then_resumed_on_one(s3_archive, reliability_log, tmp_path):
    """Manifest and images on S3, checkpoints and the model under an s3:// run dir (Ray Train's storage_path). Two
    workers train past a corrupt image and a missing one (each skipped with a warning and listed, never fatal); a
    second command with more epochs and one worker resumes from the stored checkpoint. The project's one `train` rerun:
    each training run costs about 50 s of Ray Train start-up on 2 cores."""
    prefix, environment = s3_archive
    storage.write_bytes(f"{prefix}/archive/broken.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    manifest = read_csv(f"{prefix}/archive/manifest.csv")
    manifest = pd.concat([manifest, manifest.head(1).assign(image_path="broken.png")], ignore_index=True)
    manifest = manifest.assign(subject_id=[f"subject-{index}" for index in range(len(manifest))])  # 8 images, a missing and a corrupt one
    storage.write_text(f"{prefix}/archive/train.csv", manifest.to_csv(index=False))
    config = tmp_path / "tiny.yaml"
    config.write_text("base: ellipse\nmodel: {base_width: 4, depth: 2}\nepochs: 1\nval_fraction: 0.3\n")
    run_dir = f"{prefix}/runs/tiny"
    command = ["train", "--manifest", f"{prefix}/archive/train.csv", "--output", run_dir, "--config", str(config), "--no-calibrate"]
    first = fetalpipe(environment, *command, "--workers", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "fetalpipe train\n" in first.stdout and re.search(r"stage 1: epoch 1/1  train loss \d\.\d{4}  val loss .* val HC MAE .* mm .* ETA 0:00", first.stdout)
    assert "skipping 2 unreadable image(s)" in first.stdout
    for name in ("metrics.csv", "loss_curves.png", "model.pt", "train_config.json"):
        assert storage.exists(f"{run_dir}/{name}")
    from fetalpipe.pipeline.train import list_checkpoints, split_by_subject

    assert [epoch for epoch, _ in list_checkpoints(run_dir)] == [1]  # stored under the run dir, where Ray Train put it
    metrics = read_csv(f"{run_dir}/metrics.csv")
    assert list(metrics["epoch"]) == [1]
    assert {"train_loss", "val_loss", "val_mre_px", "val_mre_mm", "val_hc_mae_mm"} <= set(metrics.columns)
    assert 7 <= metrics["train_images"][0] + metrics["val_images"][0] <= 8  # the two unreadable out (an equal 2-way split may drop one)
    _, val_rows = split_by_subject(manifest, 0.3)
    unreadable = {"missing.png", "broken.png"}
    assert metrics["val_images"][0] == len(val_rows) - len(unreadable & set(val_rows["image_path"]))  # both ranks score, none twice
    skipped = read_csv(f"{run_dir}/skipped_images.csv").set_index("image_path")["error"]
    assert set(skipped.index) == {f"{prefix}/archive/{name}" for name in unreadable}
    assert "corrupt or truncated" in skipped[f"{prefix}/archive/broken.png"] and "file not found" in skipped[f"{prefix}/archive/missing.png"]
    reliability_log(area="train: input file", case="a corrupt PNG and a missing file among the training images",
                    outcome=f"each skipped with a warning, listed in skipped_images.csv ({skipped[f'{prefix}/archive/broken.png']}); "
                            "training finished on the other 8")

    resumed = fetalpipe(environment, *command, "--epochs", "2", "--workers", "1")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "stage 1: epoch 2/2" in resumed.stdout and "epoch 1/2" not in resumed.stdout  # a resumed run prints only its new epochs
    assert [epoch for epoch, _ in list_checkpoints(run_dir)] == [1, 2]
    assert list(read_csv(f"{run_dir}/metrics.csv")["epoch"]) == [1, 2]
    assert json.loads(storage.read_bytes(f"{run_dir}/run.json"))["resumed_after_epoch"] == {"stage1": 1}
    from fetalpipe.model.model_file import load_model

    _, trained_config, payload = load_model(storage.local_copy(f"{run_dir}/model.pt"))
    # A 1-2 epoch toy model may find no head in any validation image; then selection falls back to pixel error.
    assert trained_config.model.base_width == 4 and payload["metrics"]["selected_by"] in ("val_hc_mae_mm", "val_mre_px")
