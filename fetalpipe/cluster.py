"""Where Ray runs: a fresh local instance by default, a cluster when given an address."""

from __future__ import annotations

import os


def ray_address_or_local(address: str | None) -> str:
    """--address wins; then RAY_ADDRESS (set by `ray job submit`); else a new local instance, never
    a cluster that happens to be running on this machine."""
    return address or os.environ.get("RAY_ADDRESS") or "local"
