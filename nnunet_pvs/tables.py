"""Tables in and out: the user's CSV/TSV tables read strictly, ours written one way.

Every command writes its CSVs through :func:`write_csv` (no index, a stated number of significant
digits, atomically when the file is not inside a staging folder) and its Markdown tables through
:func:`markdown_table`, so two tables of the project never disagree on format. Reading the user's tables (manifests, covariates.csv, participants.tsv):

Spreadsheet exports go wrong in ways pandas accepts silently or answers with a traceback: an
empty file, a non-UTF-8 encoding, a row with more or fewer cells than the header, a repeated or
blank column name, the same id twice. Each becomes one :class:`UserError` line naming the file
and the row. Values are kept as stripped strings; empty cells and ``NA``/``N/A``/``nan`` are
missing (NaN). Numbers are interpreted by the caller, who knows which columns must be numeric.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd

from nnunet_pvs.errors import UserError

MISSING = frozenset({"", "NA", "N/A", "n/a", "na", "nan", "NaN"})
_DELIMITERS = ",;\t"


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                        "save the table as UTF-8 CSV") from None


def _delimiter(path: Path, header_line: str) -> str:
    if path.suffix.lower() == ".tsv":
        return "\t"
    counts = {d: header_line.count(d) for d in _DELIMITERS}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def read_table(path: Path, what: str, required: tuple[str, ...] = (), id_column: str | None = None,
               unique_ids: bool = True) -> pd.DataFrame:
    """The table at ``path`` as a DataFrame of strings (NaN where missing), checked.

    ``required`` columns must exist; ``id_column`` (if given) must have a value in every row and,
    with ``unique_ids``, no value twice. ``what`` names the table in messages ("manifest").
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} does not exist" if not path.exists() else f"{path}: {what} is not a file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror})") from None
    text = _decode(path, raw)
    if not text.strip():
        raise UserError(f"{path}: {what} is empty (a header row and one row per subject expected)")
    first = next(line for line in text.splitlines() if line.strip())
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(path, first))
    header, rows, lines = None, [], []
    try:
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            cells = [c.strip() for c in cells]
            if header is None:
                header = cells
                continue
            if len(cells) != len(header):
                raise UserError(f"{path}: line {reader.line_num} has {len(cells)} cell(s), the header has "
                                f"{len(header)}; fix the row (a stray delimiter or a missing cell)")
            rows.append(cells)
            lines.append(reader.line_num)
    except csv.Error as e:
        raise UserError(f"{path}: line {reader.line_num}: not a valid CSV/TSV row ({e})") from None
    blank = [i + 1 for i, h in enumerate(header) if not h]
    if blank:
        raise UserError(f"{path}: header cell(s) {', '.join(map(str, blank))} have no column name")
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise UserError(f"{path}: column(s) {', '.join(repeated)} appear more than once in the header")
    missing = [c for c in (*required, *([id_column] if id_column else [])) if c not in header]
    if missing:
        raise UserError(f"{path}: {what} lacks column(s) {', '.join(dict.fromkeys(missing))} "
                        f"(has {', '.join(header)})")
    if not rows:
        raise UserError(f"{path}: {what} has a header but no rows")
    df = pd.DataFrame(rows, columns=header, dtype=object)
    df = df.mask(df.isin(MISSING), np.nan)
    df.attrs["lines"] = lines
    if id_column:
        ids = df[id_column]
        empty = [lines[i] for i in np.flatnonzero(ids.isna().to_numpy())]
        if empty:
            raise UserError(f"{path}: line(s) {', '.join(map(str, empty[:10]))} have no {id_column!r}")
        if unique_ids:
            dup = ids[ids.duplicated(keep=False)]
            if len(dup):
                first_dup = dup.iloc[0]
                at = [lines[i] for i in np.flatnonzero((ids == first_dup).to_numpy())]
                raise UserError(f"{path}: {id_column} {first_dup!r} appears on lines "
                                f"{', '.join(map(str, at))}; one row per subject")
    return df


def write_csv(df: pd.DataFrame, path: Path, digits: int = 10, atomic: bool = False) -> None:
    """Write one of our tables: no index, ``digits`` significant digits for floats.

    Inside a staging folder (``nnunet_pvs.staging.staged_folder``) the folder's rename makes the output
    appear at once; a file written on its own (a resumable per-subject result) passes ``atomic=True``
    and is written to a temporary name and renamed, so a reader never sees half a table.
    """
    fmt = f"%.{int(digits)}g"
    if atomic:
        from nnunet_pvs.staging import write_file_atomic

        write_file_atomic(Path(path), lambda tmp: df.to_csv(tmp, index=False, float_format=fmt))
    else:
        df.to_csv(path, index=False, float_format=fmt)


def format_number(v) -> str:
    """A cell of a Markdown table: 3 decimals, 2 significant digits under 0.01, whole numbers >= 10 as
    integers, ``n/a`` for NaN; anything else as ``str``."""
    import math

    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if float(v).is_integer() and abs(v) >= 10:
            return f"{v:.0f}"
        return f"{v:.2g}" if 0 < abs(v) < 0.01 else f"{v:.3f}"
    return str(v)


def markdown_table(df: pd.DataFrame, fmt=format_number) -> str:
    """``df`` as a GitHub Markdown table (no index), each cell through ``fmt``."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
