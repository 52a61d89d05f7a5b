"""Drift report: one self-contained HTML file per run, plots embedded as PNGs.

People look at drift, they don't read it: per column, the per-component mean
shift, the norm histograms and a 2-D projection (PCA of both samples together)
of this run against its reference window, next to the numbers and the checks
that tripped.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import drift, storage

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def column_plots(name: str, cur: np.ndarray, ref: np.ndarray) -> list[tuple[str, str]]:
    """(caption, base64 PNG) for one column: mean shift, norms, PCA projection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    shift = (cur.mean(axis=0) - ref.mean(axis=0)) / np.maximum(ref.std(axis=0), 1e-6)
    fig, ax = plt.subplots(figsize=(9, 2.6))
    ax.bar(np.arange(len(shift)), shift, width=1.0,
           color=np.where(np.abs(shift) > 0.5, "#c0392b", "#2c7fb8"))
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("component")
    ax.set_ylabel("mean shift (ref. std)")
    ax.set_title(f"{name}: per-component mean shift, this run - reference")
    plots.append(("per-component mean shift in units of the reference's standard deviation",
                  _png(fig)))

    fig, ax = plt.subplots(figsize=(4.5, 3))
    norms_c, norms_r = np.linalg.norm(cur, axis=1), np.linalg.norm(ref, axis=1)
    lo, hi = min(norms_c.min(), norms_r.min()), max(norms_c.max(), norms_r.max())
    pad = max(1e-3, (hi - lo) * 0.05)  # normalized columns: all norms ~1
    bins = np.linspace(lo - pad, hi + pad, 40).tolist()
    ax.hist(norms_r, bins=bins, alpha=0.6, density=True, label=f"reference ({len(ref)})")
    ax.hist(norms_c, bins=bins, alpha=0.6, density=True, label=f"this run ({len(cur)})")
    ax.set_title(f"{name}: vector norms")
    ax.legend(fontsize=8)
    plots.append(("norm histograms", _png(fig)))

    both = np.concatenate([ref, cur])
    centred = both - both.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    n = len(ref)
    ax.scatter(xy[:n, 0], xy[:n, 1], s=5, alpha=0.4, label="reference")
    ax.scatter(xy[n:, 0], xy[n:, 1], s=5, alpha=0.4, label="this run")
    ax.set_title(f"{name}: PCA of both samples")
    ax.legend(fontsize=8, markerscale=3)
    plots.append(("2-D projection (PCA fitted on both samples)", _png(fig)))
    return plots


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def default_report(table_path: str, run_id: str) -> str:
    """Where a run's report goes unless told: beside a local table
    (``<parent>/_drift_reports/<run>.html``); for a table in an object store, a local
    file under the working directory (``_drift_reports/<run>.html``)."""
    folder = storage.parent(table_path) if storage.is_local(table_path) else "."
    return storage.normalize(storage.join(folder, "_drift_reports", f"{run_id}.html"))


def write_report(spark: SparkSession | None, table_path: str, drift_path: str, run_id: str | None,
                 out: str | None = None, sample: int = 2000) -> tuple[Any, str | None]:
    """Build the HTML report of one run's drift (default: the latest run) and write it
    to ``out`` (a local path or an object-store URI; default :func:`default_report`);
    returns (drift rows as pandas, where it went)."""
    from pipeline.encoder.cuts import Calibration
    from pipeline.tables.identity import TableIdentity

    rows = drift.latest(spark, drift_path, table_path, run_id)
    if rows.empty:
        return rows, None
    run_id = rows["run_id"].iloc[0]
    out = storage.normalize(out) if out else default_report(table_path, run_id)
    refs = json.loads(rows["reference_runs"].iloc[0] or "[]")
    version = rows["output_version"].iloc[0]
    version = None if version != version else int(version)
    identity = TableIdentity.read(spark, table_path) or TableIdentity()
    specs = {s["name"]: s for s in json.loads(identity.get("outputs", "[]"))}
    calibration = Calibration.from_json(identity.get("calibration"))
    sections = []
    names = [c for c in rows["column"] if c in specs]
    cur = ref = None
    if refs and names:
        cur, ref = drift.sample_rows(spark, table_path, version,
                                     drift.SampleRequest(run_id, refs, names, sample))
    for row in rows.itertuples():
        metrics = "".join(
            f"<tr><th>{k}</th><td>{_fmt(getattr(row, k))}</td></tr>" for k in (
                "status", "n_current", "n_reference", "centroid_distance", "mmd2",
                "mmd_p_value", "drifted_share", "norm_mean", "ref_norm_mean", "mean_tokens",
                "ref_mean_tokens", "truncation_rate", "ref_truncation_rate", "canary_verdict",
                "canary_min_cosine", "canary_max_abs_diff"))
        flags = json.loads(row.flags or "[]")
        flag_html = ("<p class='bad'>" + "<br>".join(html.escape(f) for f in flags) + "</p>"
                     if flags else "<p class='ok'>no check tripped</p>")
        images = ""
        if cur is not None and ref is not None and len(cur) > 1 and len(ref) > 1 \
                and row.column in specs:
            a = drift.decode(cur[row.column].to_numpy(), specs[row.column], calibration)
            b = drift.decode(ref[row.column].to_numpy(), specs[row.column], calibration)
            images = "".join(f"<figure><img src='data:image/png;base64,{png}'>"
                             f"<figcaption>{html.escape(cap)}</figcaption></figure>"
                             for cap, png in column_plots(row.column, a, b))
        sections.append(f"<section><h2>{html.escape(row.column)}</h2>{flag_html}"
                        f"<table>{metrics}</table>{images}</section>")
    status = rows["status"].iloc[0]
    doc = f"""<!doctype html><html><head><meta charset="utf-8">
<title>drift report {html.escape(run_id)}</title><style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse;margin:.5em 0}} th,td{{border:1px solid #ccc;padding:2px 8px;
text-align:left;font-size:13px}} .bad{{color:#c0392b}} .ok{{color:#1e8449}}
figure{{display:inline-block;margin:.5em}} figcaption{{font-size:12px;color:#555}}
</style></head><body>
<h1>Drift report: run {html.escape(run_id)}</h1>
<p>Output table <code>{html.escape(table_path)}</code>, version {_fmt(version)}.
Reference runs: {html.escape(", ".join(refs) or "none")}.
Status: <b class="{'bad' if status == 'breach' else 'ok'}">{html.escape(status)}</b>.</p>
{''.join(sections)}
</body></html>"""
    storage.write_bytes(out, doc.encode("utf-8"))
    return rows, out
