"""A real 2-node Ray cluster on this machine (head + worker, 1 CPU each), driven as a user would.

This file sorts before every test that uses the session's local Ray instance, and it never calls
`ray stop` (which would kill every Ray process on the machine): each node runs `ray start --block`
in its own process group and is killed through that group."""

import os
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from conftest import SAMPLE_MANIFEST

# The nodes check each other's health every second and call a node dead after 3 missed checks (Ray's defaults: 3 s and
# 5), so the killed node's death is noticed in about 3 s instead of 15: a live node still has each check's full timeout.
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
       "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_node(args: list[str], log_path) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen(["ray", "start", "--block", "--num-cpus=1", *args], env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_node(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def wait_for_nodes(address: str, count: int, timeout_s: float = 90) -> None:
    script = "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        result = subprocess.run([sys.executable, "-c", script, address], env=ENV, capture_output=True, text=True, timeout=60)
        if result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise TimeoutError(f"cluster at {address} did not reach {count} live nodes")


@pytest.fixture
def ray_address_file_kept():
    """`ray start --head` records its address in Ray's "current cluster" file, which a plain `ray.init()` or `ray status`
    on this machine then tries to join; the head dies with the test, so the file is put back as it was."""
    from ray._private.utils import get_ray_address_file

    path = get_ray_address_file(None)
    before = open(path).read() if os.path.exists(path) else None
    yield
    if before is None:
        if os.path.exists(path):
            os.remove(path)
    else:
        with open(path, "w") as handle:
            handle.write(before)


@pytest.fixture
def two_node_cluster(tmp_path, ray_address_file_kept):
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = start_node(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false"], tmp_path / "head.log")
    time.sleep(5)
    workers = [start_node([f"--address={address}", "--node-ip-address=127.0.0.1"], tmp_path / "worker.log")]
    try:
        wait_for_nodes(address, 2)
        yield address, workers
    finally:
        for process in [*workers, head]:
            kill_node(process)


@pytest.fixture
def tiny_config_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"base": "ellipse", "model": {"base_width": 4, "depth": 2}, "val_fraction": 0.07}))
    return str(path)


def train_command(address, run_dir, config_file, epochs):
    return [sys.executable, "jobs/train.py", "--manifest", SAMPLE_MANIFEST, "--output", str(run_dir), "--config", config_file,
            "--epochs", str(epochs), "--workers", "2", "--threads-per-worker", "1", "--address", address,
            "--no-calibrate"]  # these tests are about training's fault tolerance; test_calibration covers the step after it


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_worker_node_killed_mid_run_training_finishes_from_checkpoint(two_node_cluster, tiny_config_file, reliability_log, tmp_path):
    """Data-parallel training across two nodes, through a node's death: each node has 1 CPU and each worker needs 1, so
    the two workers can only run on different nodes."""
    address, workers = two_node_cluster
    run_dir = tmp_path / "run"
    log = open(tmp_path / "train.log", "w")
    training = subprocess.Popen(train_command(address, run_dir, tiny_config_file, 3), cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    checkpoints = run_dir / "ray_train"
    deadline = time.time() + 300
    while time.time() < deadline and not any(p.name.startswith("checkpoint_") for p in checkpoints.glob("*")) and training.poll() is None:
        time.sleep(1)
    assert training.poll() is None, "training ended before the fault could be injected"
    kill_node(workers[0])  # the node dies with its training worker
    wait_for_nodes(address, 1, timeout_s=180)  # Ray has noticed the death
    workers.append(start_node([f"--address={address}", "--node-ip-address=127.0.0.1"], tmp_path / "worker2.log"))  # a replacement, as an autoscaler would
    try:
        returncode = training.wait(timeout=600)
    finally:
        if training.poll() is None:
            training.kill()
    output = (tmp_path / "train.log").read_text()
    assert returncode == 0, output[-4000:]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3]  # every epoch exactly once: resumed, not restarted
    assert (run_dir / "model.pt").is_file() and (run_dir / "loss_curves.png").is_file()
    reliability_log(area="train: fault", case="a worker node (and its training worker) killed after the first checkpoint; a replacement node joins",
                    outcome="Ray Train restarted the worker group from the last checkpoint; epochs 1, 2, 3 each reported once", crashes=0)
