"""The QC table: one row per case (``case``, ``verdict``, ``reasons``, then the measured values), its
CSV and Markdown forms, and reading it back (``read_qc``, for the census)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from nnunet_pvs.errors import UserError
from nnunet_pvs.input_check.case import AXES, CHANNEL_MEASURES, REFERENCE_MEASURES, channel_column
from nnunet_pvs.input_check.checks import VERDICTS, Finding, verdict

QC_FILE = "inputs_qc.csv"
REPORT_FILE = "inputs_qc.md"
REQUIRED_COLUMNS = ("case", "verdict", "reasons")
TEXT_COLUMNS = ("failed_checks", "not_checked", "shape", "axcodes", "axis_order")
REASON_SEPARATOR = "; "
GEOMETRY_COLUMNS = ("ndim", "shape", "nonfinite", *(f"spacing_{a}_mm" for a in AXES), "anisotropy", "axcodes",
                    "axis_order", *(f"fov_{a}_mm" for a in AXES), "relative_size_after_crop")


def qc_row(case: str, findings: list[Finding], measures: dict, not_checked: list[str]) -> dict:
    return {"case": case, "verdict": verdict(findings),
            "reasons": REASON_SEPARATOR.join(f.text.replace(REASON_SEPARATOR, ", ") for f in findings),
            "failed_checks": " ".join(dict.fromkeys(f.check for f in findings)),
            "not_checked": REASON_SEPARATOR.join(not_checked), **measures}


def qc_frame(rows: list[dict], n_channels: int) -> pd.DataFrame:
    """Rows in a fixed column order (measures a case lacks, e.g. of an unreadable file, are empty)."""
    columns = [*REQUIRED_COLUMNS, "failed_checks", "not_checked", *GEOMETRY_COLUMNS,
               *(channel_column(m, c) for c in range(n_channels) for m in (*CHANNEL_MEASURES, *REFERENCE_MEASURES))]
    return pd.DataFrame(rows).reindex(columns=columns)


def summary_line(qc: pd.DataFrame) -> str:
    counts = qc["verdict"].value_counts()
    return f"{len(qc)} scans: " + ", ".join(f"{int(counts.get(v, 0))} {v}" for v in VERDICTS)


def read_qc(path: Path) -> pd.DataFrame:
    """An ``inputs_qc.csv`` with its columns and verdicts checked; problems are one-line user errors."""
    path = Path(path)
    if path.is_dir():
        path = path / QC_FILE
    try:
        text = pd.read_csv(path, dtype=str, keep_default_na=False)  # ids such as "NA" stay strings
        qc = pd.read_csv(path, dtype={"case": str})  # measured values as numbers
    except FileNotFoundError:
        raise UserError(f"{path}: QC table does not exist (written by nnunet-pvs check-inputs as {QC_FILE})") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"{path}: cannot be read as a CSV table ({str(e).splitlines()[0] if str(e) else e})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in qc.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; not an {QC_FILE} of nnunet-pvs check-inputs")
    for c in (*REQUIRED_COLUMNS, *TEXT_COLUMNS):
        if c in qc.columns:
            qc[c] = text[c]
    bad = qc.loc[~qc["verdict"].isin(VERDICTS), "verdict"]
    if len(bad):
        raise UserError(f"{path}: verdict {bad.iloc[0]!r} (row {bad.index[0] + 2}) is not one of {', '.join(VERDICTS)}")
    empty = qc["case"].str.strip() == ""
    if empty.any():
        raise UserError(f"{path}: empty case id in row {int(empty.idxmax()) + 2}")
    dup = qc.loc[qc["case"].duplicated(), "case"]
    if len(dup):
        raise UserError(f"{path}: case {dup.iloc[0]!r} is listed more than once")
    return qc


def markdown_report(qc: pd.DataFrame, header: list[str], thresholds: dict[str, str], not_checked: list[str]) -> str:
    """Summary, the thresholds in force, and every flagged case with its reasons."""
    lines = ["# Input check", "", *header, "", f"**{summary_line(qc)}**", "", "## Thresholds",
             "", "| measure | training range and bounds |", "|---|---|"]
    lines += [f"| {column} | {words} |" for column, words in thresholds.items()]
    if not_checked:
        lines += ["", "Not checked: " + REASON_SEPARATOR.join(not_checked)]
    flagged = qc[qc["verdict"] != "ok"]
    lines += ["", "## Flagged scans", ""]
    if flagged.empty:
        lines.append("None.")
    else:
        lines += ["| case | verdict | reasons |", "|---|---|---|"]
        lines += [f"| {r.case} | {r.verdict} | {str(r.reasons).replace('|', '/')} |" for r in flagged.itertuples()]
    lines += ["", f"Measured values of every scan: `{QC_FILE}`. Thresholds and their reasons: docs/check_inputs.md.", ""]
    return "\n".join(lines)
