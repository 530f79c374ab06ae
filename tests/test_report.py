"""OUT/report.html, as a person sees it: rendered in headless Chromium, with its counts checked against the CSV,
its thumbnails loaded, and no network request made."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from conftest import SAMPLE_DIR, SAMPLE_MANIFEST
from fetalpipe import LANDMARK_COLUMNS
from fetalpipe.measure.biometry import biometry_mm
from fetalpipe.measure.clinical import clinical_columns, intergrowth21_hc_mean_sd_mm
from fetalpipe.pipeline.report import MAX_GALLERY_IMAGES, write_report

# Injected into a copy of the report (the report itself has no script): after load, list every resource the page
# fetched and every image's load state, into an element that --dump-dom prints.
BROWSER_CHECK = """<script>
window.addEventListener('load', () => {
  const result = {
    resources: performance.getEntriesByType('resource').map(entry => entry.name),
    images: Array.from(document.images).map(image => ({complete: image.complete, width: image.naturalWidth, src: image.src.slice(0, 30)})),
    counts: Object.fromEntries(['rows', 'ok', 'error', 'needs-review'].map(name => [name, document.getElementById('count-' + name).textContent])),
    flagged_figures: document.querySelectorAll('#flagged figure').length,
    outside_figures: document.querySelectorAll('#outside-centiles figure').length,
    error_rows: document.querySelectorAll('#error-rows tr').length - 1,
    text: document.body.innerText.slice(0, 20000),
  };
  const element = document.createElement('pre');
  element.id = 'browser-check';
  element.textContent = JSON.stringify(result);
  document.body.appendChild(element);
});
</script>"""


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("no Chromium on this machine: `.ci/run` installs Debian's chromium package (apt-get install chromium)")


def render_in_chromium(report_path, tmp_path) -> dict:
    html = open(report_path, encoding="utf-8").read()
    checked = tmp_path / "checked.html"
    checked.write_text(html.replace("</body>", BROWSER_CHECK + "</body>"), encoding="utf-8")
    completed = subprocess.run(
        [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=10000",
         "--dump-dom", checked.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', completed.stdout, re.S)
    assert found, f"Chromium printed no check result (exit {completed.returncode}): {completed.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&"))


def handmade_run(output_dir, flagged_rows: int, error_rows: int):
    """An inference output folder without running the model: the sample's reference landmarks as predictions, some rows
    flagged, some errors, a GA for every image (a few of them far off, so that HC falls outside the centiles)."""
    sample = pd.read_csv(SAMPLE_MANIFEST, dtype={"subject_id": str})
    rows = sample.copy()
    rows["image_path"] = [os.path.join(SAMPLE_DIR, path) for path in rows["image_path"]]
    points = rows[list(LANDMARK_COLUMNS)].to_numpy(float).reshape(-1, 4, 2)
    for name, values in biometry_mm(points, rows["pixel_spacing_mm"].to_numpy(float)).items():
        rows[name] = values
    # Each head at the GA where it is the INTERGROWTH-21st median, except 3 small heads said to be 39 weeks: below the 3rd centile.
    grid_weeks = np.linspace(14, 40, 2601)
    median_ga_weeks = np.interp(rows["hc_ellipse_mm"], intergrowth21_hc_mean_sd_mm(grid_weeks)[0], grid_weeks, left=np.nan, right=np.nan)
    rows["gestational_age_weeks"] = np.where(np.arange(len(rows)) < 3, 39.0, median_ga_weeks)
    for name, values in clinical_columns(rows["hc_ellipse_mm"], rows["gestational_age_weeks"]).items():
        rows[name] = values
    rows["status"], rows["error"] = "ok", ""
    rows["needs_review"] = np.arange(len(rows)) >= len(rows) - flagged_rows
    rows["review_reason"] = np.where(rows["needs_review"], "outline_spread_mm 2.1 > 1.3", "")
    broken = pd.DataFrame({"image_path": [f"/archive/broken_{index}.png" for index in range(error_rows)], "status": "error",
                           "error": "PNG signature but corrupt or truncated"})
    table = pd.concat([rows, broken], ignore_index=True)
    os.makedirs(output_dir, exist_ok=True)
    table.to_csv(os.path.join(output_dir, "predictions.csv"), index=False)
    with open(os.path.join(output_dir, "run.json"), "w") as handle:
        json.dump({"run_id": "test-run", "model_path": "/models/model.pt", "model_sha256": "ab" * 32, "precision": "int8",
                   "versions": {"fetalpipe": "0.0-test"}, "input": "/archive/manifest.csv", "command": "fetalpipe infer --manifest x",
                   "counts": {"processed_this_run": len(table)}, "timings": {"seconds": 12.5, "images_per_second": 3.2}}, handle)
    return table


def test_report_in_a_browser_shows_the_csv_counts_loads_its_thumbnails_and_fetches_nothing(tmp_path):
    output = tmp_path / "run"
    table = handmade_run(str(output), flagged_rows=4, error_rows=3)
    result = render_in_chromium(write_report(str(output)), tmp_path)
    csv = pd.read_csv(output / "predictions.csv")
    assert result["counts"] == {"rows": str(len(csv)), "ok": str((csv["status"] == "ok").sum()), "error": str((csv["status"] == "error").sum()),
                                "needs-review": str(int(csv["needs_review"].fillna(False).astype(bool).sum()))}
    assert result["resources"] == []  # nothing fetched: every image is a data URI, and there is no script, font or stylesheet
    assert len(result["images"]) >= 4 + 3 + 2  # 4 flagged + 3 outside the centiles + 2 plots
    assert all(image["complete"] and image["width"] > 0 and image["src"].startswith("data:image/") for image in result["images"])
    assert result["flagged_figures"] == 4 and result["outside_figures"] == 3 and result["error_rows"] == 3
    assert "outline_spread_mm 2.1 > 1.3" in result["text"] and "PNG signature but corrupt or truncated" in result["text"]
    assert "fetalpipe infer --manifest x" in result["text"] and "ab" * 32 in result["text"]
    assert "HC against gestational age" in result["text"]
    html = (output / "report.html").read_text()
    assert not re.search(r"(src|href)=['\"](https?:)?//", html) and "<link" not in html and "<script" not in html
    assert len(table) == len(csv)


def test_report_caps_its_galleries_and_says_how_many_were_left_out(tmp_path):
    output = tmp_path / "run"
    handmade_run(str(output), flagged_rows=20, error_rows=0)
    import fetalpipe.pipeline.report as report

    original = report.MAX_GALLERY_IMAGES
    report.MAX_GALLERY_IMAGES = 5
    try:
        html = open(write_report(str(output)), encoding="utf-8").read()
    finally:
        report.MAX_GALLERY_IMAGES = original
    flagged = html.split("id='flagged'")[1].split("</div>")[0]
    assert flagged.count("<figure>") == 5 and "15 more are in predictions.csv" in html
    assert MAX_GALLERY_IMAGES == original


def test_report_command_rewrites_the_report_from_the_outputs(tmp_path):
    from fetalpipe.cli import main

    output = tmp_path / "run"
    handmade_run(str(output), flagged_rows=1, error_rows=1)
    assert not (output / "report.html").exists()
    assert main(["report", str(output)]) == 0
    assert "count-needs-review'>1<" in (output / "report.html").read_text()


def test_report_command_on_a_folder_without_outputs_says_what_it_needs(tmp_path, capsys):
    from fetalpipe.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert "holds no predictions.csv: give the OUT folder of `fetalpipe infer`" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()
