"""Reading the user's inputs into :class:`Subject` rows: a CSV manifest, a folder per subject, or BIDS.

Users arrive with folders of scans and masks, not nnU-Net datasets (issue 4). All three readers
only collect paths and covariates; nothing is opened here, :mod:`.validation` checks the files.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pandas as pd

from nnunet_pvs.errors import UserError
from nnunet_pvs.tables import read_table
from nnunet_pvs.dataset_conversion.validation import NIFTI_SUFFIXES, Subject

RESERVED_COLUMNS = ("id", "mask", "regions", "split")


def _covariates(row: dict, skip: set[str]) -> dict:
    out = {}
    for k, v in row.items():
        if k in skip or pd.isna(v) or str(v).strip() == "":
            continue
        out[k] = v
    return out


def _path(value, base: Path) -> Path | None:
    if value is None or pd.isna(value) or str(value).strip() == "":
        return None
    p = Path(str(value).strip()).expanduser()
    return p if p.is_absolute() else base / p


def read_csv_manifest(csv_path: Path, channels: list[str]) -> list[Subject]:
    """One row per subject: ``id``, one column per channel (named like the channel, e.g. ``T2w``),
    optional ``mask``, ``regions``, ``split`` (train/test/unlabeled); every other column is a
    covariate (age, sex, site, ...). Relative paths are relative to the CSV's folder."""
    csv_path = Path(csv_path)
    # duplicate ids are reported by validation, together with every other problem
    df = read_table(csv_path, "manifest", required=tuple(channels), id_column="id", unique_ids=False)
    base = csv_path.parent
    skip = set(RESERVED_COLUMNS) | set(channels)
    subjects = []
    for row in df.to_dict("records"):
        sid = str(row["id"])
        subjects.append(Subject(
            id=sid,
            images={c: _path(row[c], base) for c in channels if _path(row[c], base) is not None},
            mask=_path(row.get("mask"), base),
            regions=_path(row.get("regions"), base),
            split=None if pd.isna(row.get("split")) or not str(row.get("split")).strip()
            else str(row["split"]).strip().lower(),
            covariates=_numeric(_covariates(row, skip)),
        ))
    return subjects


def _numeric(cov: dict) -> dict:
    out = {}
    for k, v in cov.items():
        try:
            f = float(v)
            out[k] = int(f) if f.is_integer() and "." not in str(v) else f
        except (TypeError, ValueError):
            out[k] = str(v).strip()
    return out


def _find(folder: Path, stem: str) -> Path | None:
    for suf in NIFTI_SUFFIXES:
        p = folder / f"{stem}{suf}"
        if p.is_file():
            return p
    return None


def _side_table(path: Path, id_col: str) -> dict[str, dict]:
    """Covariates keyed by id from a CSV/TSV (``covariates.csv`` or BIDS ``participants.tsv``)."""
    df = read_table(path, "covariate table", id_column=id_col)
    return {str(r[id_col]): r for r in df.to_dict("records")}


def read_subject_folders(root: Path, channels: list[str]) -> list[Subject]:
    """``ROOT/<id>/<channel>.nii.gz`` (+ optional ``mask.nii.gz``, ``regions.nii.gz``); covariates and
    an optional ``split`` column from ``ROOT/covariates.csv`` (column ``id``)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: input folder does not exist")
    table = _side_table(root / "covariates.csv", "id") if (root / "covariates.csv").is_file() else {}
    subjects = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        row = table.get(d.name, {})
        split = row.get("split")
        subjects.append(Subject(
            id=d.name,
            images={c: p for c in channels if (p := _find(d, c)) is not None},
            mask=_find(d, "mask"), regions=_find(d, "regions"),
            split=None if split is None or pd.isna(split) else str(split).strip().lower(),
            covariates=_numeric(_covariates(row, {"id", "split"})),
        ))
    return subjects


def read_bids(root: Path, channels: list[str], mask_pattern: str = "*_label-PVS*_mask.nii*",
              regions_pattern: str = "*_dseg.nii*") -> list[Subject]:
    """BIDS: ``sub-*/[ses-*/]anat/*_<channel>.nii[.gz]``; masks and aseg label maps from
    ``derivatives/*/sub-*/[ses-*/]anat/`` matching the patterns; covariates from ``participants.tsv``.
    Case id: ``sub-X`` or ``sub-X_ses-Y``."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: BIDS folder does not exist")
    table = (_side_table(root / "participants.tsv", "participant_id")
             if (root / "participants.tsv").is_file() else {})
    subjects = []
    for anat in sorted(list(root.glob("sub-*/anat")) + list(root.glob("sub-*/ses-*/anat"))):
        rel = anat.parent.relative_to(root)
        parts = rel.parts  # (sub-X,) or (sub-X, ses-Y)
        sid = "_".join(parts)
        images = {}
        for c in channels:
            hits = sorted(p for p in anat.iterdir() if p.name.endswith(tuple(f"_{c}{s}" for s in NIFTI_SUFFIXES)))
            if len(hits) > 1:
                raise UserError(f"{sid}: {anat}: {len(hits)} files for channel {c} "
                                f"({', '.join(h.name for h in hits)}); keep one per subject")
            if hits:
                images[c] = hits[0]
        mask = _derivative(root, rel, mask_pattern, sid, "mask")
        regions = _derivative(root, rel, regions_pattern, sid, "region map")
        row = table.get(parts[0], {})
        split = row.get("split")
        subjects.append(Subject(id=sid, images=images, mask=mask, regions=regions,
                                split=None if split is None or pd.isna(split) else str(split).strip().lower(),
                                covariates=_numeric(_covariates(row, {"participant_id", "split"}))))
    if not subjects:
        raise UserError(f"{root}: no sub-*/anat or sub-*/ses-*/anat folder found")
    return subjects


def _derivative(root: Path, rel: Path, pattern: str, sid: str, kind: str) -> Path | None:
    hits = []
    deriv = root / "derivatives"
    if deriv.is_dir():
        for pipeline in sorted(p for p in deriv.iterdir() if p.is_dir()):
            anat = pipeline / rel / "anat"
            if anat.is_dir():
                hits += [p for p in sorted(anat.iterdir()) if fnmatch.fnmatch(p.name, pattern)]
    if len(hits) > 1:
        raise UserError(f"{sid}: {len(hits)} {kind} files match {pattern!r} "
                        f"({', '.join(str(h) for h in hits)}); keep one")
    return hits[0] if hits else None
