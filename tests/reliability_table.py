"""Renders the rows the reliability tests record into docs/reliability.md."""

import datetime
import platform
import re

import pandas as pd

AREAS = ["infer: input file", "infer: model file", "infer: fault", "train: input file", "train: fault", "manifest", "import-hc18"]
HEADER = """# Reliability

Every bad input and fault below was tried by a test in `tests/`, and the row was written by that test from what it
observed. Regenerate the table with:

    FETALPIPE_RELIABILITY_TABLE=docs/reliability.md python -m pytest -q -p no:warnings

Policies:
- **infer**: an input that cannot be measured gives one `status="error"` row whose `error` says why. The job goes on.
  Oddities that are still valid images (RGB, 16-bit, JPEG bytes named `.png`, huge frames, odd names,
  DICOM without spacing or with several frames) are measured. A multi-frame DICOM is measured on its first frame.
- **model file** (infer): the driver checks the file's format and its zip checksums before Ray starts (torch.load alone
  loads a damaged file). Weights that do not fit the architecture are found when the actors load them: the job stops there,
  exit code 2, with the actors' reason as the last line. No row is written in either case.
- **manifest** (infer, train, evaluate): the manifest is checked in full before any image is read. A bad manifest stops the
  job before it starts, with exit code 2 and a message that names the file, the row and the column. Nothing is half-done.
- **train**: an image that cannot be decoded is skipped with a warning and listed in `RUN_DIR/skipped_images.csv`.
- **import-hc18**: a missing or empty annotation stops the import and names the file. The challenge data is curated, so
  a gap means a broken copy.
- **faults**: each inference actor writes its batch's rows to one Parquet file as it finishes the batch. A rerun on the same output folder
  redoes only the rows that are missing. If the driver is killed, an actor may still land the batch it was working on: a rerun counts those rows as done, never twice.

"""


def write_reliability_table(rows: list[dict], path: str) -> None:
    table = pd.DataFrame(rows)
    for column, default in (("crashes", 0), ("lost_rows", 0), ("duplicated_rows", 0)):
        table[column] = table[column].fillna(default).astype(int) if column in table else default
    table["order"] = table["area"].map({area: index for index, area in enumerate(AREAS)}).fillna(len(AREAS))
    table = table.sort_values(["order"], kind="stable")
    lines = [HEADER, "| area | input or fault | outcome | crashes | lost rows | duplicated rows |", "|---|---|---|---|---|---|"]
    for row in table.itertuples():
        outcome = re.sub(r"(/[^\s/]+)+/(?=[^/\s])", "", str(row.outcome))  # no machine-specific folders
        outcome = outcome.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {row.area} | {row.case} | {outcome} | {row.crashes} | {row.lost_rows} | {row.duplicated_rows} |")
    totals = table[["crashes", "lost_rows", "duplicated_rows"]].sum()
    lines += [
        "",
        f"**Totals over {len(table)} cases: {totals.crashes} crashes, {totals.lost_rows} lost rows, {totals.duplicated_rows} duplicated rows.**",
        "",
        f"Generated {datetime.date.today().isoformat()} on {platform.machine()} / Python {platform.python_version()}.",
        "",
    ]
    with open(path, "w") as handle:
        handle.write("\n".join(lines))
