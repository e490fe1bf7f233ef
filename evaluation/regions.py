"""Region masks for region-wise evaluation (Boutinaud et al. 2021: basal ganglia vs deep white matter).

Per case, ``REGION_DIR`` holds either ``CASE.nii.gz``, a FreeSurfer/SynthSeg label map in aseg
numbering (or a plain 0/1 mask, then named ``mask``), and/or ``CASE_<name>.nii.gz`` binary masks
(for instance the slice masks used for visual counts), each becoming region ``<name>``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nnunet_pvs import aseg
from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation.io import NIFTI_SUFFIXES, Volume, as_binary, read_nifti

# aseg labels (nnunet_pvs.aseg): thalamus, caudate, putamen, pallidum, accumbens, both sides; cerebral
# white matter with the white-matter hypointensities FreeSurfer/SynthSeg label inside it
ASEG_BASAL_GANGLIA = aseg.BASAL_GANGLIA
ASEG_WHITE_MATTER = aseg.WHITE_MATTER


def masks_from_label_map(data: np.ndarray) -> dict[str, np.ndarray]:
    """``{"mask": ...}`` for a 0/1 map, else ``{"bg": ..., "wm": ...}`` from aseg numbering."""
    values = np.unique(data)
    if np.isin(values, (0, 1)).all():
        return {"mask": data == 1}
    return {"bg": np.isin(data, ASEG_BASAL_GANGLIA), "wm": np.isin(data, ASEG_WHITE_MATTER)}


def owner(stem: str, case_ids) -> str | None:
    """The case a region file stem belongs to: the longest id equal to the stem or followed by
    ``_`` (so ``pvs001_rescan_bg`` is ``pvs001_rescan``'s, not a region ``rescan_bg`` of ``pvs001``)."""
    best = None
    for c in case_ids:
        if (stem == c or stem.startswith(c + "_")) and (best is None or len(c) > len(best)):
            best = c
    return best


def region_files(region_dir: Path, case: str, case_ids=None) -> list[tuple[str | None, Path]]:
    """(name or None for a label map, path) of the region files of one case.

    ``case_ids``: every case id of the evaluation; a file goes to the longest id it matches, so
    ids that extend another id (``pvs001`` and ``pvs001_rescan``) never take each other's files.
    """
    ids = set(case_ids or ()) | {case}
    out = []
    for p in sorted(Path(region_dir).iterdir()):
        for suf in NIFTI_SUFFIXES:
            if not p.name.endswith(suf):
                continue
            stem = p.name[: -len(suf)]
            if owner(stem, ids) != case:
                break
            out.append((None, p) if stem == case else (stem[len(case) + 1:], p))
            break
    return out


def load_regions(region_dir: Path, case: str, case_ids=None) -> list[tuple[str, np.ndarray, Volume, Path]]:
    """(name, mask, volume, path) for each region of the case; no file is a user error."""
    files = region_files(region_dir, case, case_ids)
    if not files:
        raise UserError(f"{case}: no region file {case}.nii.gz or {case}_<name>.nii.gz in {region_dir}")
    out = []
    for name, path in files:
        vol = read_nifti(path, case, "region map")
        if name is None:
            for rname, m in masks_from_label_map(vol.data).items():
                out.append((rname, m, vol, path))
        else:
            out.append((name, as_binary(vol.data, case, "region mask", path), vol, path))
    names = [n for n, *_ in out]
    if len(set(names)) != len(names) or "whole" in names:
        raise UserError(f"{case}: region names {names} in {region_dir} repeat or use the reserved name 'whole'")
    return out
