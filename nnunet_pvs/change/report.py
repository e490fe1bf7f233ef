"""The cohort outputs of ``nnunet-pvs change``: tables assembled from the per-subject results,
summary.json and an offline report.html in the census's style (its table, number and CSS helpers)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd

from nnunet_pvs import tables
from nnunet_pvs.census.report import CSS, _json_default, _num, _table
from nnunet_pvs.change.case import (
    CHANGE_COLUMNS,
    REGISTRATION_COLUMNS,
    SUBJECT_COLUMNS,
    WHOLE,
)
from nnunet_pvs.change.figures import STATUS_COLOURS
from nnunet_pvs.change.tracks import STATUSES
from nnunet_pvs.staging import check_output_folder, write_text_atomic

COMMAND = "change"
EMBED_OVERLAYS_UP_TO = 20  # subjects: more and report.html links the PNGs instead of holding them


def check_output(out: Path) -> None:
    """OUT must be new, empty, or an earlier ``change`` output (then refilled subject by subject)."""
    check_output_folder(out, COMMAND)


def _read(path: Path, columns: list[str]) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"case": str, "cluster_baseline": str, "cluster_follow_up": str, "region": str,
                                  "levels": str, "stop": str}, keep_default_na=False, na_values=[""])
    return df.reindex(columns=columns)


def assemble(store, cases: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[dict]]:
    """changes, subjects and registration tables and the records of the finished ``cases``, in order."""
    parts: dict[str, list[pd.DataFrame]] = {"changes": [], "subjects": [], "registration": []}
    records = []
    for c in cases:
        folder = store.folder(c)
        parts["changes"].append(_read(folder / "changes.csv", CHANGE_COLUMNS))
        parts["subjects"].append(_read(folder / "subjects.csv", SUBJECT_COLUMNS))
        parts["registration"].append(_read(folder / "registration.csv", REGISTRATION_COLUMNS))
        records.append(store.record(c))

    def cat(name, columns):
        frames = [f for f in parts[name] if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)

    return (cat("changes", CHANGE_COLUMNS), cat("subjects", SUBJECT_COLUMNS),
            cat("registration", REGISTRATION_COLUMNS), records)


def write_outputs(out: Path, changes: pd.DataFrame, subjects: pd.DataFrame, registration: pd.DataFrame,
                  failures: dict[str, str], summary: dict, plots: bool) -> None:
    """Each cohort file replaces its predecessor whole (per-subject results stay in ``cases/``)."""
    out = Path(out)
    if len(summary["cases"]):
        tables.write_csv(changes, out / "changes.csv", digits=6, atomic=True)
        tables.write_csv(subjects, out / "subjects.csv", digits=6, atomic=True)
        tables.write_csv(registration, out / "registration.csv", digits=6, atomic=True)
    else:
        for name in ("changes.csv", "subjects.csv", "registration.csv"):
            (out / name).unlink(missing_ok=True)
    if failures:
        tables.write_csv(pd.DataFrame({"case": list(failures), "reason": list(failures.values())}),
                         out / "failures.csv", atomic=True)
    else:
        (out / "failures.csv").unlink(missing_ok=True)
    images = {}
    if plots and len(changes):
        from nnunet_pvs.change.figures import volume_scatter

        images["volumes"] = volume_scatter(changes)
        (out / "plots").mkdir(exist_ok=True)
        from nnunet_pvs.staging import write_file_atomic

        for name, data in images.items():
            write_file_atomic(out / "plots" / f"{name}.png", lambda tmp, d=data: tmp.write_bytes(d))
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=_json_default) + "\n")
    write_text_atomic(out / "report.html", build_html(out, changes, subjects, registration, failures, summary, images))


# --- report.html ----------------------------------------------------------------------------------

def _swatch(status: str) -> str:
    return f'<span class="swatch" style="background:{STATUS_COLOURS[status]}"></span>'


def _img(data: bytes, alt: str, style: str = "max-width:100%") -> str:
    return f'<img alt="{html.escape(alt)}" style="{style}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def build_html(out: Path, changes: pd.DataFrame, subjects: pd.DataFrame, registration: pd.DataFrame,
               failures: dict[str, str], summary: dict, images: dict) -> str:
    esc = html.escape
    rules = summary["rules"]
    meta = [["baseline predictions", esc(summary["inputs"]["baseline"])],
            ["follow-up predictions", esc(summary["inputs"]["follow_up"])],
            ["images", esc(summary["inputs"]["images_baseline"]) + " / " + esc(summary["inputs"]["images_follow_up"])],
            ["region maps (baseline)", esc(str(summary["inputs"]["regions"] or "none"))],
            ["probability threshold", f"p &ge; {summary['threshold']:g} (binary masks used as they are)"],
            ["clusters", f"{summary['connectivity']}-connected; matched within {summary['tolerance_voxels']} voxel(s)"],
            ["enlarged / shrunk", (f"volume ratio above {1 + rules['min_relative_change']['value']:g} (up or down) "
                                   f"and |&Delta;V| &gt; {rules['min_change_voxels']['value']:g} baseline voxels")],
            ["new / vanished", f"at least {rules['min_size_voxels']['value']:g} baseline voxels, no partner within the "
                               "tolerance" + (f"; for probability maps the other visit's probability below "
                                              f"{rules['absence_prob']['value']:g}"
                                              if rules['absence_prob']['value'] is not None else "")],
            ["uncertain", ("unmatched clusters too small or too close to the threshold, and changes of tracks "
                           "not wholly inside both fields of view")],
            ["registration", f"rigid, Mattes MI; refused below NCC {summary['registration']['min_ncc']:g}"],
            ["subjects / tracks", f"{len(summary['cases'])} / {summary['n_tracks']}"
             + (f" ({len(failures)} failed)" if failures else "")],
            ["nnunet-pvs", esc(summary["version"]) + ", " + esc(summary["created"])]]
    parts = [(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>PVS change</title><style>{CSS}</style>"
             "</head><body>"), "<h1>PVS change between two visits</h1>",
             "<table class='meta'>" + "".join(f"<tr><th class='l'>{a}</th><td>{b}</td></tr>" for a, b in meta)
             + "</table>"]
    if failures:
        parts += ["<h2>Failed subjects</h2><p>Listed in <code>failures.csv</code>; not in the tables below.</p><ul>"]
        parts += [f"<li><b>{esc(c)}</b>: {esc(r)}</li>" for c, r in failures.items()] + ["</ul>"]
    unused = summary.get("unused") or {}
    if unused:
        parts.append("<p>Not used: " + "; ".join(f"{len(v)} {esc(k)}" for k, v in unused.items())
                     + " (listed in <code>summary.json</code>).</p>")

    overlays = {r["case"]: r["files"].get("overlay") for r in summary["cases"]}
    whole = subjects[subjects["region"] == WHOLE].set_index("case") if len(subjects) else None
    reg = registration.set_index("case") if len(registration) else None
    header = (["case", "NCC", "rotation (°)", "shift (mm)"] + [s for s in STATUSES]
              + ["clusters", "volume (mm³)", "overlay"])
    rows = []
    for case in (whole.index if whole is not None else []):
        w, g = whole.loc[case], reg.loc[case]
        link = f"cases/{case}/{overlays[case]}" if overlays.get(case) else None
        rows.append([esc(case), _num(g["ncc"], 3), _num(g["rotation_deg"], 2), _num(g["translation_mm"], 2)]
                    + [_num(w[f"n_{s}"]) for s in STATUSES]
                    + [f"{_num(w['n_clusters_baseline'])} &rarr; {_num(w['n_clusters_follow_up'])}",
                       (f"{_num(w['volume_baseline_mm3'])} &rarr; {_num(w['volume_follow_up_mm3'])} "
                       f"({'+' if w['volume_change_mm3'] > 0 else ''}{_num(w['volume_change_mm3'])})"),
                       f'<a href="{esc(link)}">PNG</a>' if link else ""])
    if len(rows) > 1:
        tot = whole[[f"n_{s}" for s in STATUSES]].sum()
        rows.append(["all", "", "", ""] + [_num(int(tot[f"n_{s}"])) for s in STATUSES] + ["", "", ""])
    parts += ["<h2>Subjects</h2>",
              ("<p>Registration quality (NCC: correlation of the baseline image and the registered follow-up "
               "inside the brain) and head motion; tracks per status ("
               + " ".join(_swatch(s) + s for s in STATUSES)
               + "); clusters and PVS volume at baseline &rarr; follow-up.</p>"),
              _table(header, rows, agg_rows=1 if len(rows) > 2 else 0)]

    regions = [r for r in dict.fromkeys(subjects["region"].astype(str))] if len(subjects) else []
    if len(regions) > 1:
        rrows = []
        for r in regions:
            g = subjects[subjects["region"] == r]
            rrows.append([esc(r)] + [_num(int(g[f"n_{s}"].sum())) for s in STATUSES]
                         + [_num(int(g["count_change"].sum())), _num(float(g["volume_change_mm3"].sum()))])
        parts += [("<h2>Per region</h2><p>Tracks per status, summed over the cohort; each track counted once, in "
                  "the baseline region holding most of its voxels.</p>"),
                  _table(["region", *STATUSES, "count change", "volume change (mm³)"], rrows)]
    if images:
        parts.append("<h2>Volumes</h2>")
        parts += [f"<p>{_img(data, name, 'max-width:640px')}</p>" for name, data in images.items()]
    gallery = [(r["case"], r["files"]["overlay"]) for r in summary["cases"] if r["files"].get("overlay")]
    if gallery:
        embed = len(gallery) <= EMBED_OVERLAYS_UP_TO
        parts += ["<h2>Overlays</h2><p>Baseline image, axial slices through the changes, radiological convention "
                  "(patient's right on the left); each track in its status colour, follow-up clusters drawn where "
                  "the registration puts them." + ("" if embed else " Click for full size.") + "</p>"
                  "<div class='gallery'>"]
        for case, rel in gallery:
            path = f"cases/{case}/{rel}"
            src = _img((Path(out) / path).read_bytes(), case, "") if embed else \
                f'<a href="{esc(path)}"><img loading="lazy" src="{esc(path)}" alt="{esc(case)}"></a>'
            parts.append(f"<figure>{src}<figcaption>{esc(case)}</figcaption></figure>")
        parts.append("</div>")
    parts += ["<h2>Files</h2><ul>",
              "<li><code>changes.csv</code>: one row per track (" + ", ".join(CHANGE_COLUMNS) + ")</li>",
              "<li><code>subjects.csv</code>: one row per subject and region</li>",
              "<li><code>registration.csv</code>: one row per subject: quality and head motion</li>",
              "<li><code>summary.json</code>: inputs, thresholds and their meaning, version</li>",
              "<li><code>cases/CASE/</code>: each subject's own results (kept for resuming)</li>",
              "</ul><p>Every column is explained in the project's <code>docs/change.md</code>.</p></body></html>"]
    return "\n".join(parts)


def status_totals(changes: pd.DataFrame) -> dict[str, int]:
    counts = changes["status"].value_counts() if len(changes) else pd.Series(dtype=int)
    return {s: int(counts.get(s, 0)) for s in STATUSES}

