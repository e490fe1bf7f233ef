"""The cohort outputs of the census (clusters.csv, subjects.csv, failures.csv, summary.json, plots,
report.html), assembled from the finished subjects, and the rules of its output folder."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from nnunet_pvs import tables
from nnunet_pvs.census.case import CLUSTER_COLUMNS, SLICE_REGIONS, WHOLE
from nnunet_pvs.staging import check_output_folder, write_file_atomic, write_text_atomic

COMMAND = "nnunet-pvs census"
FAILURES = "failures.csv"


# --- output folder: owned by the census, filled subject by subject (nnunet_pvs.resume) --------------

def check_output(out: Path) -> None:
    """OUT must be new, empty, or an earlier census output (then refilled: see nnunet_pvs.census.cohort).
    Another command's output folder is refused too, so a census never replaces an evaluation."""
    check_output_folder(out, "census", legacy=is_census_output)


def is_census_output(out: Path) -> bool:
    """A census output of a version before the ownership marker: its summary.json names the command."""
    try:
        return json.loads((out / "summary.json").read_text()).get("command") == COMMAND
    except (OSError, ValueError, AttributeError):
        return False



# --- files ------------------------------------------------------------------------------------------

DIGITS = 6
FLOAT_FORMAT = f"%.{DIGITS}g"   # what tables.write_csv(digits=DIGITS) writes (clusters.csv is streamed with it)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """A cohort table, atomically: OUT is not staged as a whole, so a reader never sees half a table."""
    tables.write_csv(df, path, digits=DIGITS, atomic=True)


def region_order(subjects: pd.DataFrame) -> list[str]:
    """Regions in the order they first appear (whole, the region maps' own order, outside, slices)."""
    seen = list(dict.fromkeys(subjects["region"].astype(str)))
    return seen


def write_outputs(folder: Path, clusters: pd.DataFrame, subjects: pd.DataFrame, summary: dict,
                  plots: bool, failures: pd.DataFrame | None = None, clusters_csv: bool = True) -> None:
    """Every cohort file, each written atomically (report.html last: it names the others).
    ``clusters_csv=False``: clusters.csv is written already (streamed), ``clusters`` holds the columns
    the plots and the report use (region, volume, length, width, elevation)."""
    if clusters_csv:
        write_csv(clusters, folder / "clusters.csv")
    write_csv(subjects, folder / "subjects.csv")
    if failures is not None:
        write_csv(failures, folder / FAILURES)
    write_text_atomic(folder / "summary.json", json.dumps(summary, indent=2, default=_json_default) + "\n")
    images = {}
    if plots and len(subjects):
        from nnunet_pvs.census import figures

        order = region_order(subjects)
        images["subjects"] = figures.subject_distributions(subjects, order)
        images["clusters"] = figures.cluster_distributions(clusters, [r for r in order if r not in SLICE_REGIONS])
        (folder / "plots").mkdir(exist_ok=True)
        for name, data in images.items():
            write_file_atomic(folder / "plots" / f"{name}.png", lambda tmp, data=data: tmp.write_bytes(data))
    write_text_atomic(folder / "report.html", build_html(clusters, subjects, summary, images))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if math.isnan(o) else float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


# --- report.html ----------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222;max-width:1300px}
table{border-collapse:collapse;margin:0.6em 0 1.4em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0} td.l,th.l{text-align:left}
tr.agg td{background:#fafafa;font-weight:600}
.gallery{display:flex;flex-wrap:wrap;gap:12px}
.gallery figure{margin:0;width:330px} .gallery img{width:330px;background:#000}
figcaption{font-size:12px;text-align:center}
.meta td{text-align:left} code{background:#f4f4f4;padding:0 3px}
.swatch{display:inline-block;width:0.9em;height:0.9em;margin-right:4px;vertical-align:-1px}
.badge{display:inline-block;padding:0 5px;margin-left:5px;border-radius:3px;font-size:11px;font-weight:600;color:#fff}
.badge.warn{background:#b26a00} .badge.refuse{background:#c62828}
tr.qc-warn td{background:#fff4dc} tr.qc-refuse td{background:#fde4e4}
"""

QC_FLAGS = ("warn", "refuse")   # verdicts of `nnunet-pvs check-inputs` that are flagged (the third is ok)


def _num(v, digits=1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    if v.is_integer():
        return f"{v:.0f}"
    return f"{v:.{digits}f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3g}"


def _table(header: list[str], rows: list[list], left: int = 1, agg_rows: int = 0,
           row_classes: dict[int, str] | None = None) -> str:
    out = ["<table><tr>" + "".join(f'<th class="l">{html.escape(h)}</th>' if i < left else
                                   f"<th>{html.escape(h)}</th>" for i, h in enumerate(header)) + "</tr>"]
    for k, r in enumerate(rows):
        name = "agg" if k >= len(rows) - agg_rows else (row_classes or {}).get(k, "")
        cls = f' class="{name}"' if name else ""
        out.append(f"<tr{cls}>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>"
                                         for i, c in enumerate(r)) + "</tr>")
    return "\n".join(out) + "</table>"


def _iqr(v: np.ndarray, digits=1) -> str:
    v = v[np.isfinite(v)]
    if not len(v):
        return ""
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return f"{_num(med, digits)} [{_num(q1, digits)}, {_num(q3, digits)}]"


def qc_flags(subjects: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """case -> (verdict, reasons) of the subjects the input check flagged (warn or refuse)."""
    if "qc_verdict" not in subjects.columns or not len(subjects):
        return {}
    first = subjects.drop_duplicates("case")
    return {str(c): (str(v), "" if not isinstance(r, str) else r)
            for c, v, r in zip(first["case"], first["qc_verdict"], first["qc_reasons"]) if v in QC_FLAGS}


def _badge(verdict: str, reasons: str = "") -> str:
    title = f' title="{html.escape(reasons)}"' if reasons else ""
    return f'<span class="badge {html.escape(verdict)}"{title}>{html.escape(verdict)}</span>'


def _qc_section(summary: dict, flags: dict[str, tuple[str, str]]) -> list[str]:
    qc = summary.get("qc")
    if not qc:
        return []
    counts = ", ".join(f"{n} {v}" for v, n in qc.get("counts", {}).items())
    parts = ["<h2>Input check</h2>", f"<p>Verdicts of <code>nnunet-pvs check-inputs</code> ({html.escape(qc['source'])}"
             f"): {html.escape(counts)}. A flagged subject's burden may be wrong: the scan differs from what "
             "the model was trained on in the ways listed.</p>"]
    if flags:
        rows = [[html.escape(c) + _badge(v), html.escape(r)] for c, (v, r) in flags.items()]
        parts.append(_table(["case", "reasons"], rows, left=2,
                            row_classes={i: f"qc-{v}" for i, (v, _) in enumerate(flags.values())}))
    return parts


def build_html(clusters: pd.DataFrame, subjects: pd.DataFrame, summary: dict, images: dict) -> str:
    from nnunet_pvs.census.figures import colours

    esc = html.escape
    flags = qc_flags(subjects)
    order = region_order(subjects) if len(subjects) else [WHOLE]
    cmap = colours(order)
    thr = summary["threshold"]
    src = {"default": "default", "option": "--threshold", "sweep": f"best mean Dice in region 'whole' of "
           f"{thr.get('sweep', '')} (mean Dice {thr.get('mean_dice', float('nan')):.3f} over "
           f"{thr.get('n_cases', 0)} case(s))"}[thr["source"]]
    meta = [["predictions", esc(summary["inputs"]["predictions"])],
            ["images", esc(str(summary["inputs"]["images"] or "none (overlays over the prediction)"))],
            ["region maps", esc(str(summary["inputs"]["regions"] or "none"))],
            ["probability threshold", f"p &ge; {thr['value']:g} ({esc(src)})"],
            ["minimum cluster size", f"{summary['min_size_mm3']:g} mm<sup>3</sup>"],
            ["connectivity", f"{summary['connectivity']}-connected clusters"],
            ["subjects / clusters", f"{summary['n_cases']} / {summary['n_clusters']}"
             + (f" ({len(summary['failures'])} subject(s) failed, listed below)" if summary.get("failures") else "")],
            ["nnunet-pvs", esc(summary["version"]) + ", " + esc(summary["created"])]]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>PVS census</title><style>{CSS}</style>"
             "</head><body>", "<h1>PVS census</h1>",
             "<table class='meta'>" + "".join(f"<tr><th class='l'>{a}</th><td>{b}</td></tr>" for a, b in meta)
             + "</table>"]
    left_out = summary.get("left_out") or {}
    if left_out:
        parts.append("<p><b>Left out (--allow-missing):</b> " + "; ".join(
            f"{esc(k)} {esc(', '.join(v))}" for k, v in left_out.items()) + "</p>")
    unused = summary.get("unused") or {}
    if unused:
        parts.append("<p>Not used: " + "; ".join(f"{len(v)} {esc(k)}" for k, v in unused.items())
                     + " (listed in <code>summary.json</code>).</p>")
    failures = summary.get("failures") or []
    if failures:
        parts += ["<h2>Failed subjects</h2>", "<p>Not censused (listed in <code>failures.csv</code>); the "
                  "other subjects are complete. Fix the files and run the same command again: only these are "
                  "redone.</p>", _table(["case", "reason"], [[esc(f["case"]), esc(f["reason"])] for f in failures],
                                        left=2)]
    parts += _qc_section(summary, flags)

    # cohort table: one row per subject, count and volume per region
    has_overlay = {c["case"]: c["files"].get("overlay") for c in summary["cases"]}
    header = ["case"] + [h for r in order for h in (f"{r} n", f"{r} mm³")] + ["overlay"]
    wide_n = subjects.pivot(index="case", columns="region", values="n_clusters") if len(subjects) else None
    wide_v = subjects.pivot(index="case", columns="region", values="volume_mm3") if len(subjects) else None
    rows, row_classes = [], {}
    for case in dict.fromkeys(subjects["case"]):
        link = has_overlay.get(case)
        cell = f'<a href="{esc(link)}">PNG</a>' if link else ""
        name = esc(case)
        if case in flags:
            row_classes[len(rows)] = f"qc-{flags[case][0]}"
            name += _badge(*flags[case])
        rows.append([name] + [v for r in order for v in (_num(wide_n.loc[case, r]), _num(wide_v.loc[case, r]))]
                    + [cell])
    if len(rows) > 1:
        for name, fn in (("mean", np.nanmean), ("median", np.nanmedian)):
            rows.append([name] + [v for r in order for v in (_num(fn(wide_n[r].to_numpy(float))),
                                                                _num(fn(wide_v[r].to_numpy(float))))] + [""])
    parts += ["<h2>Cohort</h2>", "<p>Clusters (<i>n</i>) and PVS volume (mm³) per subject and region. Each "
              "cluster is counted once, in the region holding most of its voxels, so the regions add up to "
              "<code>whole</code>; <code>bgslice</code> / <code>csoslice</code> count the clusters touching the "
              "visual-rating slices (Cai-style counts).</p>",
              _table(header, rows, agg_rows=2 if len(rows) > 2 else 0, row_classes=row_classes)]

    # per-region summary
    srows = []
    for r in order:
        g = subjects[subjects["region"] == r]
        cl = clusters[clusters["region"] == r] if r not in SLICE_REGIONS else None
        if r == WHOLE:
            cl = clusters
        swatch = f'<span class="swatch" style="background:{cmap[r]}"></span>'
        srows.append([swatch + esc(r), str(len(g)), _iqr(g["n_clusters"].to_numpy(float)),
                      _iqr(g["volume_mm3"].to_numpy(float)), _iqr(g["volume_fraction"].to_numpy(float) * 100, 3),
                      "" if cl is None else str(len(cl)),
                      "" if cl is None else _iqr(cl["length_mm"].to_numpy(float)),
                      "" if cl is None else _iqr(cl["width_mm"].to_numpy(float), 2)])
    parts += ["<h2>Per region</h2>", "<p>Median [first quartile, third quartile] over subjects (count, volume, "
              "volume fraction) and over all clusters of the cohort (length, width).</p>",
              _table(["region", "subjects", "clusters per subject", "volume per subject (mm³)",
                      "volume fraction (%)", "clusters", "length (mm)", "width (mm)"], srows)]
    if images:
        parts.append("<h2>Distributions</h2>")
        for name, data in images.items():
            b64 = base64.b64encode(data).decode("ascii")
            parts.append(f'<p><img alt="{esc(name)}" style="max-width:100%" src="data:image/png;base64,{b64}"></p>')
    gallery = [(c["case"], c["files"]["overlay"], c["n_clusters"]) for c in summary["cases"] if c["files"].get("overlay")]
    if gallery:
        parts += ["<h2>Overlays</h2>", "<p>Axial slices, radiological convention (patient's right on the left); "
                  "clusters coloured by region: " + " ".join(
                      f'<span class="swatch" style="background:{cmap[r]}"></span>{esc(r)}'
                      for r in order if r not in SLICE_REGIONS and (r != WHOLE or len(order) == 1))
                  + ". Click for full size.</p><div class='gallery'>"]
        for case, rel, n in gallery:
            badge = _badge(*flags[case]) if case in flags else ""
            parts.append(f'<figure><a href="{esc(rel)}"><img loading="lazy" src="{esc(rel)}" alt="{esc(case)}"></a>'
                         f"<figcaption>{esc(case)}: {n} clusters{badge}</figcaption></figure>")
        parts.append("</div>")
    notes = [(c["case"], n) for c in summary["cases"] for n in c.get("notes", [])]
    if notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{esc(c)}: {esc(n)}</li>" for c, n in notes] + ["</ul>"]
    parts += ["<h2>Files</h2><ul>",
              "<li><code>clusters.csv</code>: one row per cluster (" + ", ".join(CLUSTER_COLUMNS) + ")</li>",
              "<li><code>subjects.csv</code>: one row per subject and region"
              + (" (with <code>qc_verdict</code>, <code>qc_reasons</code>)" if summary.get("qc") else "") + "</li>",
              "<li><code>failures.csv</code>: the subjects that could not be censused, and why</li>",
              "<li><code>summary.json</code>: inputs, threshold and its source, size filter, version</li>",
              "<li><code>cases/CASE/</code>: each subject's own results (its rows of the tables, overlay, "
              "label map), from which the tables are assembled</li>",
              "</ul><p>Every column is explained in the project's <code>docs/census.md</code>.</p></body></html>"]
    return "\n".join(parts)
