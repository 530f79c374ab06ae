"""Where Ray runs: a fresh local instance by default, a cluster when given an address."""

from __future__ import annotations

import logging
import os
import signal
import threading

# Ray Train V2's placement-group cleaner asks the State API (served by the dashboard, which fetalpipe does not
# start) whether the controller is alive, and logs this warning every poll when it cannot: some 1,000 identical
# lines in a 30-minute training log. Its job (removing the placement group if the controller dies)
# does not depend on the message.
NOISY_RAY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


# Ray Train's placement-group cleaner (a detached actor that removes a training's placement group if its controller
# dies) polls the State API for the controller; the controller waits for the poll in flight before it stops. Without a
# dashboard (fetalpipe's own local Ray; a cluster started without `ray[default]`) every poll waits out its timeout, 10 s
# by default: 12 s at the end of every training stage. With a dashboard a poll answers in milliseconds, and one that
# times out is simply made again. The controller then waits for the cleaner to stop, by default 2 × its 1 s check
# interval + the poll timeout (3 s), and logs that it did not stop gracefully when it has not; the stop request stays
# queued, and the cleaner stops when its poll returns (it is dead 2 s after the stage, docs/performance.md). So the
# controller waits half a second, not three, at the end of every training stage.
PLACEMENT_GROUP_CLEANER_POLL_TIMEOUT_S = 1
PLACEMENT_GROUP_CLEANER_STOP_WAIT_S = 0.5

# Ray Train's controller polls its workers every 2 s by default, and only a poll sees that training has ended: on a
# 1-epoch run, 2.5-2.9 s passed between rank 0's last checkpoint and "Shutting down 2 workers", 0.9 s at 0.5 s
# (docs/performance.md). A poll is one small actor call per worker. A value the user set in the environment wins.
TRAIN_HEALTH_CHECK_INTERVAL_S = 0.5


def ray_address_or_local(address: str | None) -> str:
    """--address wins; then RAY_ADDRESS (set by `ray job submit`); else a new local instance, never
    a cluster that happens to be running on this machine."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def quiet_noisy_ray_loggers() -> None:
    """Runs in every Ray worker process of a training job (`worker_process_setup_hook`)."""
    for name in NOISY_RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def torch_trainer(**trainer_options):
    """Ray Train's TorchTrainer, built from the same options, with the cleaner's poll timeout and stop wait and the
    controller's poll interval above (Ray Train passes the environment variable on to its controller and workers)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.constants import HEALTH_CHECK_INTERVAL_S_ENV_VAR

    os.environ.setdefault(HEALTH_CHECK_INTERVAL_S_ENV_VAR, str(TRAIN_HEALTH_CHECK_INTERVAL_S))

    class QuickCleanerTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [
                PlacementGroupCleanerCallback(get_actor_timeout_s=PLACEMENT_GROUP_CLEANER_POLL_TIMEOUT_S,
                                              stop_timeout=PLACEMENT_GROUP_CLEANER_STOP_WAIT_S) if isinstance(callback, PlacementGroupCleanerCallback) else callback
                for callback in super()._create_default_callbacks()
            ]

    return QuickCleanerTorchTrainer(**trainer_options)


def connect(address: str | None, quiet_ray_train: bool = False) -> None:
    """ray.init on the address above, unless this process is already connected. `quiet_ray_train` silences
    the repeated Ray Train warning above in the job's workers.

    Ray installs a native SIGTERM handler that aborts the driver. `fetalpipe` wants SIGTERM to stop like Ctrl-C
    (shut down the local Ray, keep what was written), so a Python handler set before is put back."""
    import ray

    from fetalpipe.runtime.console import ray_logs_redirected

    if ray.is_initialized():
        return
    handler = signal.getsignal(signal.SIGTERM)
    runtime_env = {"worker_process_setup_hook": "fetalpipe.runtime.cluster.quiet_noisy_ray_loggers"} if quiet_ray_train else None
    # With Ray's logs in a file (`console.ray_logs_to_file`), the workers' output stays in Ray's session logs too.
    options = {"address": ray_address_or_local(address), "include_dashboard": False, "log_to_driver": not ray_logs_redirected()}
    try:
        ray.init(**options, runtime_env=runtime_env)
    except ValueError as error:  # `ray job submit --runtime-env` set its own setup hook: keep the job's
        if runtime_env is None or "Failed to merge" not in str(error):
            raise
        ray.init(**options)
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
