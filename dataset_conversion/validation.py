"""Checks of every input before a single file is written (issue 4).

A :class:`Subject` is one row of the manifest: an id, one image per channel, an optional PVS mask,
an optional region label map and free covariates. :func:`validate` loads everything once, collects
*all* problems (so a user fixes a manifest in one pass), and returns the arrays' content hash so a
re-run on the same data is recognised whatever the files' gzip timestamps say.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from nnunet_pvs.errors import UserError

SPLITS = ("train", "test", "unlabeled")
# nnU-Net builds file names as CASE_0000.nii.gz and parses them back: keep ids plain.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*(?:_[A-Za-z0-9-]+)*$")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class Subject:
    """One subject (nnU-Net case) of the input."""

    id: str
    images: dict[str, Path]  # channel name -> file
    mask: Path | None = None
    regions: Path | None = None
    split: str | None = None  # train / test / unlabeled; None: train if it has a mask, else unlabeled
    covariates: dict[str, object] = field(default_factory=dict)

    @property
    def resolved_split(self) -> str:
        if self.split:
            return self.split
        return "train" if self.mask is not None else "unlabeled"


@dataclass
class Checked:
    """What validation learnt: per-subject mask voxel counts, warnings and a content fingerprint."""

    pvs_voxels: dict[str, int]
    warnings: list[str]
    fingerprint: str


class Problems(list):
    """Collected ``subject: file: problem`` lines."""

    def add(self, subject: str, path: Path | str | None, problem: str) -> None:
        self.append(f"{subject}: {path}: {problem}" if path is not None else f"{subject}: {problem}")

    def raise_if_any(self, what: str = "input") -> None:
        if self:
            head = f"{len(self)} problem(s) in the {what}, nothing was written:"
            raise UserError("\n  ".join([head, *self]))


def is_nifti(path: Path) -> bool:
    return Path(path).name.endswith(NIFTI_SUFFIXES)


def _load(path: Path, sid: str, kind: str, problems: Problems):
    """(array, affine) of a 3D NIfTI, or None after recording why not."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        problems.add(sid, path, f"{kind} file does not exist")
        return None
    if not is_nifti(path):
        problems.add(sid, path, f"{kind} is not a NIfTI file (.nii or .nii.gz)")
        return None
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for corrupt files
        problems.add(sid, path, f"{kind} cannot be read as NIfTI ({type(e).__name__}: {e})")
        return None
    if data.ndim != 3:
        what = "4D" if data.ndim == 4 else f"{data.ndim}D"
        problems.add(sid, path, f"{kind} is {what} (shape {data.shape}); one 3D volume per file is required")
        return None
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n = int((~np.isfinite(data)).sum())
        problems.add(sid, path, f"{kind} contains {n} NaN/Inf voxel(s)")
        return None
    return data, img.affine


def binarize(data: np.ndarray, label_value: float | None) -> np.ndarray | None:
    """The 0/1 PVS mask, or None when the values are not 0/1 and no label value was chosen."""
    if label_value is not None:
        return (data == label_value).astype(np.uint8)
    values = np.unique(data)
    if not np.isin(values, (0, 1)).all():
        return None
    return (data == 1).astype(np.uint8)


def grid_difference(shape, affine, ref_shape, ref_affine, ref_name: str, tol: float) -> str | None:
    """Why a voxel grid differs from the reference ``ref_name`` (shape, spacing, or affine beyond
    ``tol``), or None when they match."""
    if tuple(shape) != tuple(ref_shape):
        return f"shape {tuple(shape)} differs from {ref_name} shape {tuple(ref_shape)}"
    affine, ref_affine = np.asarray(affine, float), np.asarray(ref_affine, float)
    diff = float(np.abs(affine - ref_affine).max())
    if diff <= tol:
        return None
    zooms, ref_zooms = (np.linalg.norm(a[:3, :3], axis=0) for a in (affine, ref_affine))
    if np.abs(zooms - ref_zooms).max() > tol:
        def fmt(z):
            return " x ".join(f"{v:.3g}" for v in z)
        return (f"affine differs from {ref_name} by {diff:.3g}: spacing {fmt(zooms)} mm vs "
                f"{fmt(ref_zooms)} mm (tolerance {tol:g})")
    return f"affine differs from {ref_name} by {diff:.3g} (tolerance {tol:g})"


def _geometry(sid, ref, ref_path, other, other_path, kind, tol, problems) -> bool:
    why = grid_difference(other[0].shape, other[1], ref[0].shape, ref[1], ref_path.name, tol)
    if why is not None:
        problems.add(sid, other_path, f"{kind} {why}; images are never resampled")
    return why is None


def validate(subjects: list[Subject], channels: list[str], label_value: float | None = None,
             affine_tol: float = 1e-3, progress: bool = True, allow_empty_labels: bool = False) -> Checked:
    """Check every subject; raise :class:`UserError` listing all problems, else return :class:`Checked`.

    Training masks that are all empty are an error unless ``allow_empty_labels``: nnU-Net would train on
    them without complaint, and the usual cause is a wrong ``--label-value``. So is a mask that holds
    labelled voxels but none of ``label_value`` (some masks coded 1, others 255): written empty it
    would teach "no PVS here", so it is an error too, naming each such mask.
    """
    problems = Problems()
    warnings: list[str] = []
    if not subjects:
        raise UserError("input: no subjects found")
    seen: dict[str, int] = {}
    for s in subjects:
        seen[s.id] = seen.get(s.id, 0) + 1
    for sid, n in seen.items():
        if n > 1:
            problems.add(sid, None, f"duplicate subject id ({n} rows)")
        if not _ID_RE.match(sid):
            problems.add(sid, None, "invalid id: use letters, digits, '-' and single '_' "
                                    "(nnU-Net parses file names CASE_0000.nii.gz)")
    for s in subjects:
        if s.split is not None and s.split not in SPLITS:
            problems.add(s.id, None, f"split {s.split!r} is not one of {', '.join(SPLITS)}")
        missing = [c for c in channels if c not in s.images or s.images[c] is None]
        if missing:
            problems.add(s.id, None, f"no image for channel(s) {', '.join(missing)}")
        if s.split == "unlabeled" and s.mask is not None:
            problems.add(s.id, s.mask, "unlabeled subject has a mask")
        if s.split == "train" and s.mask is None:
            problems.add(s.id, None, "training subject has no PVS mask")
    problems.raise_if_any()

    digest = hashlib.sha256(repr((list(channels), label_value)).encode())
    pvs_voxels: dict[str, int] = {}
    mask_values: set[float] = set()
    empty: list[str] = []
    lacking: list[str] = []  # non-empty masks without a voxel of --label-value: they would be written empty
    it = subjects
    if progress:
        from tqdm import tqdm
        it = tqdm(subjects, desc="validating", unit="subject", leave=False)
    for s in it:
        ref, ref_path = None, None
        digest.update(f"|{s.id}|{s.resolved_split}|".encode())
        for c in channels:
            loaded = _load(s.images[c], s.id, f"{c} image", problems)
            if loaded is None:
                continue
            if ref is None:
                ref, ref_path = loaded, Path(s.images[c])
            elif not _geometry(s.id, ref, ref_path, loaded, s.images[c], f"{c} image", affine_tol, problems):
                continue
            _hash(digest, *loaded)
        for kind, path in (("mask", s.mask), ("region map", s.regions)):
            loaded = _load(path, s.id, kind, problems)
            if loaded is None:
                continue
            if ref is not None and not _geometry(s.id, ref, ref_path, loaded, path, kind, affine_tol, problems):
                continue
            data = loaded[0]
            if kind == "mask":
                mask_values.update(np.unique(data).tolist()[:20])
                m = binarize(data, label_value)
                if m is None:
                    vals = np.unique(data)
                    shown = ", ".join(f"{v:g}" for v in vals[:10]) + (" ..." if len(vals) > 10 else "")
                    problems.add(s.id, path, f"mask has values other than 0/1 ({shown}); "
                                             "pick the PVS value with --label-value")
                    continue
                pvs_voxels[s.id] = int(m.sum())
                if pvs_voxels[s.id] == 0:
                    empty.append(f"{s.id}: {path}: empty mask (no PVS voxel)")
                    if label_value is not None and data.any():  # labelled, but not with the chosen value
                        lacking.append(f"{s.id} ({path}: values {', '.join(f'{v:g}' for v in np.unique(data)[:5])})")
                _hash(digest, m, loaded[1])
            else:
                if np.issubdtype(data.dtype, np.floating) and not np.allclose(data, np.round(data)):
                    problems.add(s.id, path, "region map has non-integer values (aseg label numbers expected)")
                    continue
                _hash(digest, data, loaded[1])
        for k in sorted(s.covariates):
            digest.update(f"{k}={s.covariates[k]}".encode())
    problems.raise_if_any()
    if empty:
        values = ", ".join(f"{v:g}" for v in sorted(mask_values)[:10])
        rule = f"--label-value {label_value:g}" if label_value is not None else "value 1 = PVS"
        train = [s.id for s in subjects if s.resolved_split == "train" and s.id in pvs_voxels]
        if train and not any(pvs_voxels[i] for i in train) and not allow_empty_labels:
            raise UserError(f"all {len(train)} training mask(s) are empty with {rule} (mask values found: "
                            f"{values}; first: {empty[0].rsplit(': ', 1)[0]}); "
                            "check --label-value and the mask files, or pass --allow-empty-labels if "
                            "empty labels are really meant. Nothing was written")
        if lacking and not allow_empty_labels:
            raise UserError(f"{len(lacking)} of {len(pvs_voxels)} mask(s) have labelled voxels but none of "
                            f"{rule}, so they would be written empty: {'; '.join(lacking[:10])}"
                            f"{' ...' if len(lacking) > 10 else ''}; check those masks and --label-value, or "
                            "pass --allow-empty-labels to write them empty. Nothing was written")
        warnings.append(f"{len(empty)} of {len(pvs_voxels)} mask(s) are empty with {rule} (mask values "
                        f"found: {values}): {', '.join(e.split(':')[0] for e in empty)}")
        warnings.extend(empty)
    warnings.extend(mixed_covariate_warnings(subjects))
    return Checked(pvs_voxels=pvs_voxels, warnings=warnings, fingerprint=digest.hexdigest())


def mixed_covariate_warnings(subjects: list[Subject]) -> list[str]:
    """Covariates that are numbers for some subjects and text for others ("unknown", "61,5"):
    copied as given, but a stratified split on them would refuse them, so say so now."""
    out = []
    keys = sorted({k for s in subjects for k in s.covariates})
    for k in keys:
        vals = [(s.id, s.covariates[k]) for s in subjects if k in s.covariates]
        text = [(sid, v) for sid, v in vals if not isinstance(v, (int, float))]
        if text and len(text) < len(vals):
            shown = ", ".join(f"{sid}={v!r}" for sid, v in text[:5]) + (" ..." if len(text) > 5 else "")
            out.append(f"covariate {k!r}: non-numeric value(s) among numbers ({shown}); written as given, "
                       f"but 'nnunet-pvs splits --by {k}' will refuse them (use '.' as decimal separator, "
                       "fix or remove them)")
    return out


def _hash(digest, data: np.ndarray, affine: np.ndarray) -> None:
    digest.update(str((data.shape, str(data.dtype))).encode())
    digest.update(np.ascontiguousarray(data).tobytes())
    digest.update(np.round(np.asarray(affine, dtype=np.float64), 6).tobytes())
