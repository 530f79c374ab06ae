"""Where Ray runs: a fresh local instance by default, a cluster when given an address."""

from __future__ import annotations

import os
import signal
import threading


def ray_address_or_local(address: str | None) -> str:
    """--address wins; then RAY_ADDRESS (set by `ray job submit`); else a new local instance, never
    a cluster that happens to be running on this machine."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def connect(address: str | None) -> None:
    """ray.init on the address above, unless this process is already connected.

    Ray installs a native SIGTERM handler that aborts the driver. `fetalpipe` wants SIGTERM to stop like Ctrl-C
    (shut down the local Ray, keep what was written), so a Python handler set before is put back."""
    import ray

    if ray.is_initialized():
        return
    handler = signal.getsignal(signal.SIGTERM)
    ray.init(address=ray_address_or_local(address), include_dashboard=False)
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
