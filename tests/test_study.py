import json
import os

import pandas as pd
import pytest

from conftest import SAMPLE_MANIFEST
from fetalpipe.cli import main
from fetalpipe.pipeline.study import load_study


def test_study_runs_into_dated_folder_and_rerun_is_idempotent(ray_local, tiny_model_path, tmp_path):
    spec = tmp_path / "study.yaml"
    spec.write_text(f"name: nightly\ninput: {SAMPLE_MANIFEST}\nmodel: {tiny_model_path}\noutput_root: results\nactors: 1\n")
    assert main(["study", "run", str(spec), "--run-date", "2026-11-25"]) == 0
    run_dir = tmp_path / "results" / "nightly" / "2026-11-25"
    first = pd.read_csv(run_dir / "predictions.csv")
    assert len(first) == 20 and (run_dir / "run.json").is_file()
    assert "<span id='count-rows'>20</span>" in (run_dir / "report.html").read_text()  # the run report, with the CSV's count
    assert main(["study", "run", str(spec), "--run-date", "2026-11-25"]) == 0
    assert json.loads((run_dir / "study.json").read_text())["summary"]["processed_this_run"] == 0
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "predictions.csv"), first)


@pytest.mark.parametrize("text, message", [("name: x\n", "missing key"), ("name: a/b\ninput: x\noutput_root: y\n", "name must be"), ("name: x\ninput: x\noutput_root: y\ncolour: red\n", "unknown key")])
def test_bad_specs(tmp_path, text, message):
    spec = tmp_path / "s.yaml"
    spec.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_study(str(spec))
