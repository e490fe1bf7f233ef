"""The cohort outputs of the census (CSVs, summary.json, report.html) and the atomic swap into OUT."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from nnunet_pvs.census.case import CLUSTER_COLUMNS, SLICE_REGIONS, WHOLE
from nnunet_pvs.staging import check_output_folder, staged_folder

COMMAND = "nnunet-pvs census"


# --- output folder: staged, swapped in only after success (nnunet_pvs.staging) ---------------------

def check_output(out: Path) -> None:
    """OUT must be new, empty, or an earlier census output (then replaced as a whole at the end).
    Another command's output folder is refused too, so a census never replaces an evaluation."""
    check_output_folder(out, "census", legacy=is_census_output)


def is_census_output(out: Path) -> bool:
    """A census output of a version before the ownership marker: its summary.json names the command."""
    try:
        return json.loads((out / "summary.json").read_text()).get("command") == COMMAND
    except (OSError, ValueError, AttributeError):
        return False


def staged(out: Path):
    """The staging folder of OUT: it becomes OUT when the census is complete; on failure it is
    removed with any parent folder it created, so a failed run leaves nothing at all."""
    return staged_folder(out, "census", legacy=is_census_output)


# --- files ------------------------------------------------------------------------------------------

def write_csv(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False, float_format="%.6g")


def region_order(subjects: pd.DataFrame) -> list[str]:
    """Regions in the order they first appear (whole, the region maps' own order, outside, slices)."""
    seen = list(dict.fromkeys(subjects["region"].astype(str)))
    return seen


def write_outputs(folder: Path, clusters: pd.DataFrame, subjects: pd.DataFrame, summary: dict,
                  plots: bool) -> None:
    write_csv(clusters, folder / "clusters.csv")
    write_csv(subjects, folder / "subjects.csv")
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    images = {}
    if plots and len(subjects):
        from nnunet_pvs.census import figures

        order = region_order(subjects)
        images["subjects"] = figures.subject_distributions(subjects, order)
        images["clusters"] = figures.cluster_distributions(clusters, [r for r in order if r not in SLICE_REGIONS])
        (folder / "plots").mkdir(exist_ok=True)
        for name, data in images.items():
            (folder / "plots" / f"{name}.png").write_bytes(data)
    (folder / "report.html").write_text(build_html(clusters, subjects, summary, images))


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
"""


def _num(v, digits=1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    if v.is_integer():
        return f"{v:.0f}"
    return f"{v:.{digits}f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3g}"


def _table(header: list[str], rows: list[list], left: int = 1, agg_rows: int = 0) -> str:
    out = ["<table><tr>" + "".join(f'<th class="l">{html.escape(h)}</th>' if i < left else
                                   f"<th>{html.escape(h)}</th>" for i, h in enumerate(header)) + "</tr>"]
    for k, r in enumerate(rows):
        cls = ' class="agg"' if k >= len(rows) - agg_rows else ""
        out.append(f"<tr{cls}>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>"
                                         for i, c in enumerate(r)) + "</tr>")
    return "\n".join(out) + "</table>"


def _iqr(v: np.ndarray, digits=1) -> str:
    v = v[np.isfinite(v)]
    if not len(v):
        return ""
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return f"{_num(med, digits)} [{_num(q1, digits)}, {_num(q3, digits)}]"


def build_html(clusters: pd.DataFrame, subjects: pd.DataFrame, summary: dict, images: dict) -> str:
    from nnunet_pvs.census.figures import colours

    esc = html.escape
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
            ["subjects / clusters", f"{summary['n_cases']} / {summary['n_clusters']}"],
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

    # cohort table: one row per subject, count and volume per region
    has_overlay = {c["case"]: c["files"].get("overlay") for c in summary["cases"]}
    header = ["case"] + [h for r in order for h in (f"{r} n", f"{r} mm³")] + ["overlay"]
    wide_n = subjects.pivot(index="case", columns="region", values="n_clusters") if len(subjects) else None
    wide_v = subjects.pivot(index="case", columns="region", values="volume_mm3") if len(subjects) else None
    rows = []
    for case in dict.fromkeys(subjects["case"]):
        link = has_overlay.get(case)
        cell = f'<a href="{esc(link)}">PNG</a>' if link else ""
        rows.append([esc(case)] + [v for r in order for v in (_num(wide_n.loc[case, r]), _num(wide_v.loc[case, r]))]
                    + [cell])
    if len(rows) > 1:
        for name, fn in (("mean", np.nanmean), ("median", np.nanmedian)):
            rows.append([name] + [v for r in order for v in (_num(fn(wide_n[r].to_numpy(float))),
                                                                _num(fn(wide_v[r].to_numpy(float))))] + [""])
    parts += ["<h2>Cohort</h2>", "<p>Clusters (<i>n</i>) and PVS volume (mm³) per subject and region. Each "
              "cluster is counted once, in the region holding most of its voxels, so the regions add up to "
              "<code>whole</code>; <code>bgslice</code> / <code>csoslice</code> count the clusters touching the "
              "visual-rating slices (Cai-style counts).</p>",
              _table(header, rows, agg_rows=2 if len(rows) > 2 else 0)]

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
            parts.append(f'<figure><a href="{esc(rel)}"><img loading="lazy" src="{esc(rel)}" alt="{esc(case)}"></a>'
                         f"<figcaption>{esc(case)}: {n} clusters</figcaption></figure>")
        parts.append("</div>")
    notes = [(c["case"], n) for c in summary["cases"] for n in c.get("notes", [])]
    if notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{esc(c)}: {esc(n)}</li>" for c, n in notes] + ["</ul>"]
    parts += ["<h2>Files</h2><ul>",
              "<li><code>clusters.csv</code>: one row per cluster (" + ", ".join(CLUSTER_COLUMNS) + ")</li>",
              "<li><code>subjects.csv</code>: one row per subject and region</li>",
              "<li><code>summary.json</code>: inputs, threshold and its source, size filter, version</li>",
              "</ul><p>Every column is explained in the project's <code>docs/census.md</code>.</p></body></html>"]
    return "\n".join(parts)
