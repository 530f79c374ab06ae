"""The predictions table: its columns, and reading and writing it as Parquet under OUT/predictions/ (a file per batch,
written whole, newest row per image wins). Shared by the inference job that writes it and the jobs that read it
(`evaluate`, `report`, `calibrate`)."""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from fetalpipe import LANDMARK_COLUMNS
from fetalpipe.measure import review
from fetalpipe.runtime import storage

# The review flag's inputs (`fetalpipe.measure.review`); stage 1's `confidence` is the seventh.
REVIEW_SIGNAL_COLUMNS = tuple(name for name in review.SIGNALS if name != "confidence")
BIOMETRY_COLUMNS = ("ofd_px", "bpd_px", "hc_px", "hc_ellipse_px", "ofd_mm", "bpd_mm", "hc_mm", "hc_ellipse_mm")
# From hc_ellipse_mm (`fetalpipe.measure.clinical`); the INTERGROWTH-21st two need the manifest's gestational age.
CLINICAL_COLUMNS = ("ga_from_hc_weeks", "hc_z_intergrowth21", "hc_centile_intergrowth21")
# Manifest columns that travel to the actors as numbers (every other extra column travels as text).
NUMERIC_MANIFEST_COLUMNS = ("pixel_spacing_mm", "gestational_age_weeks", "gestational_age_days", "file_size_bytes", "file_mtime_ns")
OUTPUT_COLUMNS = (
    "image_path", "status", "error", *LANDMARK_COLUMNS, *BIOMETRY_COLUMNS[:4], "pixel_spacing_mm", *BIOMETRY_COLUMNS[4:], *CLINICAL_COLUMNS,
    "confidence", "needs_review", "review_reason", *REVIEW_SIGNAL_COLUMNS, "size_calibration_scale", "model_sha256", "precision", "int8_upsampling", "fetalpipe_version", "file_sha256", "file_size_bytes", "file_mtime_ns", "original_width", "original_height", "run_id",
)
# What a row without a pixel spacing loses: mm and the size line, and the review rule's strongest signals, which are in
# mm. Such a row is scored by the model's second rule, on the lengths as fractions of the head (`review.ReviewRules`);
# it catches 22 of the archive-like variants' 133 errors above 5 mm, the rule in mm 78 (`studies/without_spacing.py`).
NO_SPACING_CONSEQUENCE = "no mm columns, no size line, and a weaker review flag (its strongest signals are in mm)"
# Actors write one Parquet file per batch; past this many files the run's end rewrites them as parts of this many rows.
MAX_FILES_BEFORE_COMPACTION = 64
ROWS_PER_COMPACTED_FILE = 100_000

# The output columns a resume check needs (a dry run reads only these).
RESUME_COLUMNS = ("image_path", "model_sha256", "precision", "file_sha256", "file_size_bytes", "file_mtime_ns", "run_sequence")


def write_batch(rows: dict[str, np.ndarray], predictions_dir: str) -> str:
    """One Parquet file per batch, named by the run and the batch's first row: a retried batch (actor
    restarted) overwrites its own file. Written whole (`storage.write_bytes`: a temporary name and a rename on
    disk, one upload on an object store), so a crash never leaves a half file under a name the readers pick up."""
    import pyarrow as pa

    # Text columns typed as strings even when a batch holds only None (no errors): every file has the same
    # schema, so `pandas.read_parquet(OUT/predictions)` can read them as one dataset.
    table = pa.table({
        key: pa.array(list(value), type=pa.string()) if value.dtype == object else value
        for key, value in rows.items() if key != "row_index"
    })
    path = storage.join(predictions_dir, f"{rows['run_id'][0]}-{int(np.min(rows['row_index'])):09d}.parquet")
    storage.write_bytes(path, parquet_bytes(table))
    return path


def parquet_bytes(table) -> bytes:
    import pyarrow as pa

    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return buffer.getvalue().to_pybytes()


def read_predictions(output_dir: str, skip_files: frozenset = frozenset(), columns: list[str] | None = None) -> pd.DataFrame:
    """All rows under OUT/predictions/ (except `skip_files`), newest row per image path (only `columns`, where given).
    A damaged file (not one a crash left: those are never visible) is set aside, and its rows are redone."""
    directory = output_dir if str(output_dir).rstrip("/").endswith("predictions") else storage.join(output_dir, "predictions")
    tables = []
    for path in sorted(set(storage.list_files(directory, ".parquet")) - skip_files):
        fs, inner_path = storage.filesystem(path)
        try:
            wanted = [name for name in columns if name in pq.read_schema(inner_path, filesystem=fs).names] if columns else None
            tables.append(pq.read_table(inner_path, filesystem=fs, columns=wanted).to_pandas())
        except Exception:
            # Leading "_": pyarrow/pandas dataset readers skip it, and it stays for inspection.
            storage.move(path, storage.join(directory, "_corrupt-" + path.rstrip("/").rsplit("/", 1)[-1]))
    return newest_per_image(tables)


def newest_per_image(tables: list[pd.DataFrame]) -> pd.DataFrame:
    tables = [table for table in tables if len(table)]
    if not tables:
        return pd.DataFrame(columns=list(OUTPUT_COLUMNS))
    table = pd.concat(tables, ignore_index=True)
    table = table.sort_values(["run_sequence"], kind="stable") if "run_sequence" in table else table
    return table.drop_duplicates("image_path", keep="last").reset_index(drop=True)


def compact_if_needed(predictions_dir: str, newest: pd.DataFrame) -> None:
    """Rewrite the dataset when rows were superseded by a rerun (changed file, new model), or when the
    one-file-per-batch layout has left many small files (a 1M-image archive would leave ~16,000):
    parts of at most ROWS_PER_COMPACTED_FILE rows. The parts are written under new names first, then the old files
    are deleted; a crash in between leaves each row twice, identical, which readers reduce to one (newest_per_image)."""
    files = storage.list_files(predictions_dir, ".parquet")
    stored = 0
    for path in files:
        fs, inner_path = storage.filesystem(path)
        stored += pq.ParquetFile(fs.open_input_file(inner_path)).metadata.num_rows
    parts_needed = max(-(-len(newest) // ROWS_PER_COMPACTED_FILE), 1)
    if stored == len(newest) and (len(files) <= MAX_FILES_BEFORE_COMPACTION or len(files) <= parts_needed):
        return
    import pyarrow as pa

    token = uuid.uuid4().hex[:8]
    for part in range(parts_needed):
        rows = newest.iloc[part * ROWS_PER_COMPACTED_FILE:(part + 1) * ROWS_PER_COMPACTED_FILE]
        path = storage.join(predictions_dir, f"part-compacted-{token}-{part:05d}.parquet")
        storage.write_bytes(path, parquet_bytes(pa.Table.from_pandas(rows, preserve_index=False)))
    for path in files:
        storage.remove(path)
