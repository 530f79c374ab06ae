"""What every benchmark result records besides its figures (the machine, Python, the commit), and how it is reported."""

from __future__ import annotations

import json
import os
import platform
import subprocess


def provenance() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(), "commit": commit}


def report(result: dict, json_path: str | None) -> None:
    """Print RESULT with the provenance, and write both to JSON_PATH when given."""
    result = {**result, **provenance()}
    print(json.dumps(result, indent=2))
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(result, handle, indent=2)
