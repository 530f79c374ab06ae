"""What every benchmark result records besides its figures (the machine, Python, the commit), and how it is reported."""

from __future__ import annotations

import json
import os
import platform
import subprocess


def provenance() -> dict:
    """Figures move with the CPU's vector units as much as with its cores (int8 and the seed's fp32 loop gain unequally
    from AVX-512), so the record names the CPU and torch's capability on it."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"machine": f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} cores, torch CPU capability {cpu_capability()}",
            "cpu_features": cpu_features(), "python": platform.python_version(), "commit": commit}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


# The vector and matrix units that move this project's figures: torch's capability stops at AVX512, but oneDNN also runs
# int8 (VNNI, AMX) and bf16 (AVX512_BF16, AMX) kernels where the CPU has them. VMs sold as the same "Intel Xeon" differ here.
NOTABLE_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_features() -> list[str]:
    from fetalpipe.pipeline.train import cpu_flags

    flags = cpu_flags()
    return [flag for flag in NOTABLE_CPU_FLAGS if flag in flags]


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def report(result: dict, json_path: str | None) -> None:
    """Print RESULT with the provenance, and write both to JSON_PATH when given."""
    result = {**result, **provenance()}
    print(json.dumps(result, indent=2))
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(result, handle, indent=2)
