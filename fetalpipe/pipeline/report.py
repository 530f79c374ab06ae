"""OUT/report.html: one self-contained page to read a run by (provenance, counts, distributions, errors, and the images to look at).

Self-contained: plots (SVG, `svg_plots`) and thumbnails (JPEG) are embedded as data URIs and the page has no script, font or stylesheet to
fetch, so it opens from a hospital share with no network. It stays readable at any size: the plots aggregate, and
the tables and galleries are capped with a note of how many rows were left out (all of them are in predictions.csv)."""

from __future__ import annotations

import base64
import concurrent.futures
import datetime
import html
import io
import json
import os

import numpy as np
import pandas as pd

from fetalpipe.measure.clinical import CENTILE_Z, hc_for_centile_mm
from fetalpipe.pipeline import svg_plots
from fetalpipe.pipeline.predictions import NO_SPACING_CONSEQUENCE
from fetalpipe.runtime import storage

MAX_GALLERY_IMAGES = 48
MAX_ERROR_ROWS = 200
THUMBNAIL_WIDTH_PX = 320
SCATTER_POINTS_BEFORE_BINNING = 2000

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; } td, th { padding: 0.2em 0.8em; text-align: left; border-bottom: 1px solid #eee; vertical-align: top; }
.counts td { font-size: 1.3em; } .note { color: #666; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; width: 320px; } figcaption { font-size: 0.8em; word-break: break-all; }
img.thumbnail { width: 320px; height: auto; } .plots { display: flex; flex-wrap: wrap; gap: 1em; }
"""


def write_report(output_dir: str, predictions: pd.DataFrame | None = None, run: dict | None = None) -> str:
    """Write OUT/report.html (atomically) from the run's rows and record; returns its path. `infer` passes the ones it has
    just written; otherwise they are read from OUT/predictions.csv and OUT/run.json."""
    if predictions is None:
        csv_path = storage.join(output_dir, "predictions.csv")
        if not storage.exists(csv_path):
            raise FileNotFoundError(f"{output_dir} holds no predictions.csv: give the OUT folder of `fetalpipe infer` or of a study run")
        predictions = pd.read_csv(io.BytesIO(storage.read_bytes(csv_path)), dtype={"error": str, "review_reason": str})
    if run is None:
        run_path = storage.join(output_dir, "run.json")
        run = json.loads(storage.read_bytes(run_path)) if storage.exists(run_path) else {}
    path = storage.join(output_dir, "report.html")
    storage.write_text(path, render_report(predictions, run, output_dir))
    return path


def render_report(predictions: pd.DataFrame, run: dict, output_dir: str) -> str:
    status = predictions["status"].astype(str)
    needs_review = predictions["needs_review"].fillna(False).astype(bool) if "needs_review" in predictions else pd.Series(False, index=predictions.index)
    ok = predictions[status == "ok"]
    errors = predictions[status == "error"]
    flagged = predictions[needs_review & (status == "ok")]
    sections = [
        f"<h1>fetalpipe run report</h1><p class='note'>Written {html.escape(datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))} "
        f"from <code>{html.escape(storage.absolute(output_dir))}</code>.</p>",
        _provenance(run),
        _counts(len(predictions), len(ok), len(errors), len(flagged), run, without_spacing=int(ok["pixel_spacing_mm"].isna().sum()) if "pixel_spacing_mm" in ok else len(ok)),
        _distributions(ok),
        _error_table(errors),
        _gallery("Flagged for review", "flagged", flagged, output_dir, "review_reason"),
    ]
    if "hc_centile_intergrowth21" in ok and ok["hc_centile_intergrowth21"].notna().any():
        centile = ok["hc_centile_intergrowth21"]
        outside = ok[(centile < 3) | (centile > 97)]
        sections.append(_gallery("Outside the INTERGROWTH-21st 3rd–97th centiles", "outside-centiles", outside, output_dir, "hc_centile_intergrowth21"))
    links = ["<a href='predictions.csv'>predictions.csv</a>", "<a href='predictions/'>predictions/</a> (Parquet)"]
    if storage.exists(storage.join(output_dir, "overlays")):
        links.append("<a href='overlays/'>overlays/</a>")
    sections.append("<h2>Outputs</h2><p>" + " · ".join(links) + "</p>")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>fetalpipe report</title><style>{STYLE}</style></head>"
            f"<body>{''.join(sections)}</body></html>")


def _table(rows: list[tuple[str, object]], css_class: str = "") -> str:
    body = "".join(f"<tr><th>{html.escape(str(name))}</th><td>{value}</td></tr>" for name, value in rows)
    return f"<table class='{css_class}'>{body}</table>"


def _provenance(run: dict) -> str:
    if not run:
        return "<h2>Provenance</h2><p class='note'>No run.json in this folder.</p>"
    versions = run.get("versions", {})
    rows = [
        ("model", f"<code>{html.escape(str(run.get('model_path', '')))}</code>"),
        ("model sha256", f"<code>{html.escape(str(run.get('model_sha256', '')))}</code>"),
        ("fetalpipe", html.escape(str(versions.get("fetalpipe", "")))),
        ("precision", html.escape(_precision(run))),
        ("run id", html.escape(str(run.get("run_id", "")))),
        ("finished", html.escape(str(run.get("finished_at", "")))),
        ("input", f"<code>{html.escape(str(run.get('input', '')))}</code>"),
        ("command", f"<code>{html.escape(str(run.get('command', '')))}</code>"),
    ]
    return "<h2>Provenance</h2>" + _table(rows)


def _precision(run: dict) -> str:
    """The arithmetic, and under int8 on how many rows the upsampling ran in int8: each node decides by its CPU."""
    precision, counts = str(run.get("precision", "")), run.get("counts", {})
    if precision != "int8" or "int8_upsampling" not in counts:
        return precision
    rows, in_int8 = counts.get("rows", 0), counts["int8_upsampling"]
    return f"int8; the upsampling in int8 (CPUs with VNNI) on {in_int8:,} of {rows:,} rows"  # rows of an older version may not say


def _counts(rows: int, ok: int, error: int, flagged: int, run: dict, without_spacing: int = 0) -> str:
    timings = run.get("timings", {})
    counts = run.get("counts", {})
    rate = timings.get("images_per_second")
    cells = [
        ("rows", f"<span id='count-rows'>{rows}</span>"),
        ("ok", f"<span id='count-ok'>{ok}</span>"),
        ("error", f"<span id='count-error'>{error}</span>"),
        ("needs review", f"<span id='count-needs-review'>{flagged}</span>"),
    ]
    timing = (f"The last run processed {counts.get('processed_this_run', '?')} images in {timings.get('seconds', '?')} s"
              + (f" ({rate} img/s through the model actors)" if rate else "") + ".") if timings else ""
    spacing = (f"<p id='no-spacing'>{without_spacing} ok rows have no pixel spacing: {html.escape(NO_SPACING_CONSEQUENCE)}. "
               "Give the manifest a <code>pixel_spacing_mm</code> column.</p>") if without_spacing else ""
    return "<h2>Counts</h2>" + _table(cells, "counts") + f"<p class='note'>{html.escape(timing)}</p>" + spacing


def _svg_data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def _distributions(ok: pd.DataFrame) -> str:
    columns = [(name, label) for name, label in (("hc_ellipse_mm", "HC (mm)"), ("bpd_mm", "BPD (mm)"), ("ofd_mm", "OFD (mm)"))
               if name in ok and ok[name].notna().any()]
    if not columns:
        return "<h2>Distributions</h2><p class='note'>No measurement in mm (no ok row with a pixel spacing).</p>"
    plots = "".join(f"<img id='plot-{name}' alt='histogram of {label}' src='{_svg_data_uri(svg_plots.histogram(ok[name].to_numpy(float), label))}'>"
                    for name, label in columns)
    parts = [f"<h2>Distributions</h2><div class='plots'>{plots}</div>"]
    known = ok.dropna(subset=["hc_ellipse_mm"]) if "gestational_age_weeks" in ok else ok.iloc[:0]
    known = known[known["gestational_age_weeks"].notna()] if len(known) else known
    if len(known):
        curve_weeks = np.linspace(14, 40, 105)
        curves = [(f"{centile}{'rd' if centile == 3 else 'th'} centile", curve_weeks, hc_for_centile_mm(curve_weeks, z), "#222222" if centile == 50 else "#cc3311")
                  for centile, z in sorted(CENTILE_Z.items(), reverse=True)]
        svg = svg_plots.points_with_curves(known["gestational_age_weeks"], known["hc_ellipse_mm"], curves, "gestational age (weeks)", "HC (mm)",
                                           max_points=SCATTER_POINTS_BEFORE_BINNING)
        parts.append(f"<h3>HC against gestational age</h3><img id='plot-hc-ga' alt='HC against gestational age with INTERGROWTH-21st centiles' "
                     f"src='{_svg_data_uri(svg)}'>"
                     "<p class='note'>Curves: the INTERGROWTH-21st fetal HC standard's 3rd, 50th and 97th centiles (Papageorghiou et al., Lancet 2014).</p>")
    return "".join(parts)


def _error_table(errors: pd.DataFrame) -> str:
    if errors.empty:
        return "<h2>Errors</h2><p>None.</p>"
    shown = errors.head(MAX_ERROR_ROWS)
    rows = "".join(f"<tr><td><code>{html.escape(str(row.image_path))}</code></td><td>{html.escape(str(row.error))}</td></tr>" for row in shown.itertuples())
    note = f"<p class='note'>{len(errors) - len(shown)} more error rows are in predictions.csv.</p>" if len(errors) > len(shown) else ""
    return f"<h2>Errors ({len(errors)})</h2><table id='error-rows'><tr><th>image</th><th>reason</th></tr>{rows}</table>{note}"


def _thumbnail_data_uri(row: dict, output_dir: str) -> str | None:
    """The run's overlay when it drew one, else the overlay drawn now; a JPEG data URI at THUMBNAIL_WIDTH_PX (None: unreadable)."""
    import cv2

    from fetalpipe.pipeline.overlays import overlay_filename, render_overlay

    overlay_path = storage.join(output_dir, "overlays", overlay_filename(str(row["image_path"])))
    try:
        canvas = cv2.imdecode(np.frombuffer(storage.read_bytes(overlay_path), np.uint8), cv2.IMREAD_COLOR) if storage.exists(overlay_path) else render_overlay(row)
    except Exception:  # the image moved or changed since the run: the caption still says what it was
        return None
    if canvas is None:
        return None
    height, width = canvas.shape[:2]
    thumbnail = cv2.resize(canvas, (THUMBNAIL_WIDTH_PX, max(1, round(height * THUMBNAIL_WIDTH_PX / width))), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", thumbnail, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode("ascii") if ok else None


def _gallery(title: str, element_id: str, rows: pd.DataFrame, output_dir: str, reason_column: str) -> str:
    if rows.empty:
        return f"<h2>{html.escape(title)}</h2><p>None.</p>"
    shown = rows.head(MAX_GALLERY_IMAGES)
    records = shown.to_dict("records")
    # Decoding and drawing release the GIL: the thumbnails render on every core (the run's actors are done by now).
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        uris = list(pool.map(lambda row: _thumbnail_data_uri(row, output_dir), records))
    figures = []
    for row, uri in zip(records, uris):
        reason = row.get(reason_column)
        reason_text = f"centile {reason:.1f}" if isinstance(reason, float) and reason_column.startswith("hc_centile") else str(reason or "")
        caption = f"<code>{html.escape(os.path.basename(str(row['image_path'])))}</code> HC {row.get('hc_ellipse_mm', float('nan')):.1f} mm<br>{html.escape(reason_text)}"
        image = f"<img class='thumbnail' alt='overlay' src='{uri}'>" if uri else "<p class='note'>(image no longer readable)</p>"
        figures.append(f"<figure>{image}<figcaption>{caption}</figcaption></figure>")
    note = f"<p class='note'>{len(rows) - len(shown)} more are in predictions.csv.</p>" if len(rows) > len(shown) else ""
    return f"<h2>{html.escape(title)} ({len(rows)})</h2><div class='gallery' id='{element_id}'>{''.join(figures)}</div>{note}"
