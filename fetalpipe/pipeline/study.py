"""Scheduled retrospective studies: a small YAML spec run into ROOT/<name>/<run-date>/.

    name: nightly-archive
    input: /data/archive/manifest.csv   # a manifest (.csv/.parquet), a folder or a glob
    model: /models/fetalpipe.pt         # optional: the shipped model by default
    output_root: /results/studies
    overlays: false                     # optional
    actors: 2                           # optional

A rerun of the same spec on the same date resumes/idempotently skips finished images (the infer
job's own resume), so cron can simply run it again after a failure."""

from __future__ import annotations

import datetime
import json
import os
import re

import yaml

from fetalpipe.pipeline.infer import InferOptions, run_inference

REQUIRED_KEYS = ("name", "input", "output_root")
OPTIONAL_KEYS = ("model", "overlays", "actors", "threads_per_actor", "batch_size")


def load_study(path: str) -> dict:
    with open(path) as handle:
        spec = yaml.safe_load(handle) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a study spec is a YAML mapping")
    missing = [key for key in REQUIRED_KEYS if key not in spec]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    unknown = set(spec) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", str(spec["name"])):
        raise ValueError(f"{path}: name must be letters, digits, '.', '_' or '-' (it becomes a folder)")
    base = os.path.dirname(os.path.abspath(path))
    for key in ("input", "model", "output_root"):
        if spec.get(key) and "://" not in str(spec[key]) and not os.path.isabs(str(spec[key])):
            spec[key] = os.path.join(base, str(spec[key]))
    return spec


def run_study(path: str, run_date: str | None = None, ray_address: str | None = None, verbose: bool = False) -> str:
    spec = load_study(path)
    run_date = run_date or datetime.date.today().isoformat()
    datetime.date.fromisoformat(run_date)  # validates YYYY-MM-DD
    output_dir = os.path.join(spec["output_root"], spec["name"], run_date)
    source = spec["input"]
    is_manifest = str(source).endswith((".csv", ".parquet"))
    summary = run_inference(
        InferOptions(
            output_dir=output_dir,
            manifest=source if is_manifest else None,
            input_glob=None if is_manifest else source,
            model_path=spec.get("model"),
            overlays=bool(spec.get("overlays", False)),
            actors=int(spec.get("actors", 2)),
            threads_per_actor=int(spec.get("threads_per_actor", 1)),
            batch_size=int(spec.get("batch_size", 16)),
            ray_address=ray_address,
            verbose=verbose,
        )
    )
    with open(os.path.join(output_dir, "study.json"), "w") as handle:
        json.dump({"spec": spec, "run_date": run_date, "summary": summary}, handle, indent=2, default=str)
    return output_dir
