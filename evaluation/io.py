"""Reading references, predictions and region maps, pairing cases, and checking geometry.

Predictions come as binary NIfTI masks, or as nnU-Net probability files (``--save_probabilities``
/ ``--npz``): ``CASE.npz`` holding ``probabilities`` of shape (C, z, y, x) and ``CASE.pkl`` with
the image properties. nnU-Net's readers give arrays in reversed axis order relative to nibabel's
(x, y, z), so the foreground channel is transposed back before it is compared with the reference
(see nnunetv2/imageio/simpleitk_reader_writer.py and nnunetv2/inference/export_prediction.py).
The geometry comes from whichever reader the dataset used: SimpleITKIO (``sitk_stuff``: spacing,
origin, direction) or NibabelIO / NibabelIOWithReorient (``nibabel_stuff``: the file's affine, and
for the latter the RAS reorientation that is undone; see ``_nibabel_volume``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from nnunet_pvs.errors import UserError
from nnunet_pvs.safe_files import UnsafeFileError, load_properties

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Volume:
    """A 3D array in nibabel (x, y, z) order with its voxel spacing (mm) and affine."""

    data: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray | None


@dataclass(frozen=True)
class PredFiles:
    """Prediction files of one case: a NIfTI mask and/or an nnU-Net probability file."""

    seg: Path | None = None
    npz: Path | None = None


def case_id(path: Path) -> str | None:
    """Case id of a NIfTI or npz file name, None for other files."""
    name = path.name
    for suf in (*NIFTI_SUFFIXES, ".npz"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return None


def require_folder(path: Path, option: str, holding: str) -> None:
    """``path``, given to a folder option, must be a folder: a file is said to be one, not "missing"."""
    path = Path(path)
    if path.is_dir():
        return
    if path.exists():
        raise UserError(f"{path}: {option} is a file, not a folder; give the folder holding {holding}")
    raise UserError(f"{path}: {option} folder does not exist")


def refuse_twins(files: list[Path]) -> None:
    """``X.nii`` beside ``X.nii.gz``: two files for one case id, and which one is meant cannot be known
    (a re-export, a half-finished gzip); refused, naming both, rather than one picked silently."""
    by_id: dict[str, list[Path]] = {}
    for p in files:
        if p.name.endswith(NIFTI_SUFFIXES):
            by_id.setdefault(case_id(p), []).append(p)
    twins = {c: ps for c, ps in by_id.items() if len(ps) > 1}
    if twins:
        c, ps = next(iter(sorted(twins.items())))
        more = f" (and {len(twins) - 1} more id(s) like it)" if len(twins) > 1 else ""
        raise UserError(f"{c}: both {ps[0]} and {ps[1]} exist{more}; keep one file per case "
                        "(remove or move the other)")


def list_niftis(folder: Path) -> dict[str, Path]:
    """id -> NIfTI path of every NIfTI directly inside ``folder`` (one file per id, see refuse_twins)."""
    files = [p for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)]
    refuse_twins(files)
    return {case_id(p): p for p in files}


def is_results_folder(folder: Path) -> bool:
    """An nnU-Net training output folder (``Trainer__Plans__config`` with ``fold_*``)."""
    return any(p.is_dir() and re.fullmatch(r"fold_\d+", p.name) for p in Path(folder).iterdir())


def gather_predictions(pred_dir: Path) -> dict[str, PredFiles]:
    """id -> prediction files, from a folder of predictions or an nnU-Net results folder
    (``fold_*/validation`` gathered into one cross-validation set)."""
    pred_dir = Path(pred_dir)
    if pred_dir.is_file():
        raise UserError(f"{pred_dir}: is a file, not a prediction folder; give the folder holding the "
                        "predictions (CASE.nii.gz and/or CASE.npz + CASE.pkl)")
    if not pred_dir.is_dir():
        raise UserError(f"{pred_dir}: prediction folder does not exist")
    if is_results_folder(pred_dir):
        folders = sorted(p / "validation" for p in pred_dir.glob("fold_*") if (p / "validation").is_dir())
        if not folders:
            raise UserError(f"{pred_dir}: nnU-Net results folder without any fold_*/validation folder")
    else:
        folders = [pred_dir]
    out: dict[str, PredFiles] = {}
    seen_in: dict[str, Path] = {}
    for folder in folders:
        found: dict[str, dict] = {}
        refuse_twins([p for p in sorted(folder.iterdir()) if p.is_file()])
        for p in sorted(folder.iterdir()):
            cid = case_id(p)
            if cid is None or not p.is_file():
                continue
            found.setdefault(cid, {})["npz" if p.name.endswith(".npz") else "seg"] = p
        for cid, files in found.items():
            if cid in out:
                raise UserError(f"{cid}: predicted in both {seen_in[cid]} and {folder}")
            out[cid], seen_in[cid] = PredFiles(**files), folder
    if not out:
        raise UserError(f"{pred_dir}: no prediction files (.nii.gz, .nii or .npz) found")
    return out


def read_nifti(path: Path, case: str, role: str) -> Volume:
    """A 3D NIfTI as a Volume; unreadable, non-3D or non-finite files are user errors."""
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for broken files
        raise UserError(f"{case}: cannot read {role} {path}: {e}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"{case}: {role} {path} is {data.ndim}D with shape {data.shape}; expected a 3D volume")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise UserError(f"{case}: {role} {path} contains NaN or Inf values")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Volume(data, zooms, np.asarray(img.affine, float))


def as_binary(data: np.ndarray, case: str, role: str, path: Path) -> np.ndarray:
    """Boolean mask from a 0/1 array; any other value is a user error naming it."""
    if data.dtype == bool:
        return data
    bad = (data != 0) & (data != 1)
    if bad.any():
        vals = np.unique(data[bad])[:5]
        raise UserError(f"{case}: {role} {path} is not binary (values other than 0/1, e.g. "
                        f"{', '.join(f'{v:g}' for v in vals)})")
    return data == 1


def read_mask(path: Path, case: str, role: str) -> Volume:
    v = read_nifti(path, case, role)
    v.data = as_binary(v.data, case, role, path)
    return v


def read_probabilities(npz: Path, case: str) -> Volume:
    """Foreground probability of an nnU-Net ``.npz`` in nibabel axis order, geometry from ``.pkl``.

    Channel 1 is the foreground of a binary (background, PVS) task; a single-channel file is taken
    as the foreground itself. The ``.pkl`` nnU-Net writes beside every ``.npz`` is required:
    without it a flipped or transposed map of the right shape could not be told from a correct one.
    """
    pkl = npz.with_suffix(".pkl")
    if not pkl.is_file():
        raise UserError(f"{case}: {npz} has no {pkl.name} beside it (nnU-Net writes one with every .npz); "
                        "without it the orientation cannot be checked against the reference")
    try:
        with np.load(npz) as f:
            if "probabilities" not in f:
                raise UserError(f"{case}: {npz} has no 'probabilities' array (keys: {list(f.keys())})")
            probs = f["probabilities"]
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{case}: cannot read probabilities {npz}: {e}") from None
    if probs.ndim != 4:
        raise UserError(f"{case}: {npz} probabilities have shape {probs.shape}; expected (C, z, y, x)")
    fg = probs[1] if probs.shape[0] >= 2 else probs[0]
    fg = np.ascontiguousarray(fg.transpose(2, 1, 0), dtype=np.float32)
    if not np.isfinite(fg).all():
        raise UserError(f"{case}: {npz} contains NaN or Inf probabilities")
    lo, hi = float(fg.min()), float(fg.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise UserError(f"{case}: {npz} probabilities outside [0, 1] (min {lo:g}, max {hi:g})")
    np.clip(fg, 0.0, 1.0, out=fg)
    try:
        props = load_properties(pkl)
    except UnsafeFileError:
        raise
    except Exception as e:
        raise UserError(f"{case}: cannot read nnU-Net properties {pkl}: {e}") from None
    try:
        if isinstance(props, dict) and "sitk_stuff" in props:
            return Volume(fg, *_sitk_geometry(props["sitk_stuff"]))
        if isinstance(props, dict) and "nibabel_stuff" in props:
            return _nibabel_volume(fg, props, pkl)
    except UserError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:  # a field missing or malformed
        raise UserError(f"{case}: cannot read the geometry in nnU-Net properties {pkl}: "
                        f"{type(e).__name__}: {e}") from None
    keys = sorted(props) if isinstance(props, dict) else type(props).__name__
    raise UserError(f"{case}: nnU-Net properties {pkl} hold neither 'sitk_stuff' (SimpleITKIO) nor "
                    f"'nibabel_stuff' (NibabelIO) geometry (found {keys})")


def _sitk_geometry(st: dict) -> tuple[tuple[float, float, float], np.ndarray]:
    """Spacing and RAS affine of SimpleITKIO's properties (spacing, origin, direction in LPS)."""
    spacing = tuple(float(s) for s in st["spacing"])
    direction = np.asarray(st["direction"], float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(st["origin"], float)
    return spacing, affine


def _nibabel_volume(fg: np.ndarray, props: dict, pkl: Path) -> Volume:
    """The foreground of a file written through nnU-Net's NibabelIO or NibabelIOWithReorient readers.

    Both readers transpose nibabel's (x, y, z) array to (z, y, x) (undone by the caller) and keep the
    file's affine as ``nibabel_stuff['original_affine']``; ``spacing`` is nibabel's zooms reversed.
    NibabelIO leaves the voxel order as in the file, so the array lies on that affine.
    NibabelIOWithReorient first reorients the image to the closest RAS orientation
    (``as_reoriented(io_orientation(original_affine))``) and keeps that image's affine as
    ``reoriented_affine``; its predictions are in that RAS voxel order, and its ``write_seg`` turns them
    back to the file's orientation with ``ornt_transform(RAS, io_orientation(original_affine))``, so
    the same is done here (nnunetv2/imageio/nibabel_reader_writer.py): the probabilities then lie on
    the grid of the NIfTI nnU-Net writes beside them, and of the scan and reference.
    """
    from nibabel.orientations import (
        apply_orientation,
        axcodes2ornt,
        io_orientation,
        ornt_transform,
    )

    nb = props["nibabel_stuff"]
    original = np.asarray(nb["original_affine"], float)
    if original.shape != (4, 4):
        raise UserError(f"{pkl}: nibabel_stuff['original_affine'] has shape {original.shape}; expected 4 x 4")
    spacing_zyx = [float(v) for v in props["spacing"]]
    if "reoriented_affine" in nb:
        file_ornt = io_orientation(original)
        # the array as the reader reoriented it: voxel axis j of the file went to axis file_ornt[j, 0]
        fg = np.ascontiguousarray(apply_orientation(fg, ornt_transform(axcodes2ornt("RAS"), file_ornt)))
        spacing_xyz = spacing_zyx[::-1]
        spacing = tuple(spacing_xyz[int(file_ornt[j, 0])] for j in range(3))
    else:
        spacing = tuple(spacing_zyx[::-1])
    return Volume(fg, spacing, original)


def check_geometry(case: str, ref: Volume, ref_path: Path, other: Volume, other_path: Path,
                   tol: float = 1e-3) -> None:
    """Shape must match exactly; spacing and affine (when known) within ``tol`` mm."""
    if ref.data.shape != other.data.shape:
        raise UserError(f"{case}: shape {other.data.shape} of {other_path} differs from "
                        f"reference {ref_path} {ref.data.shape}")
    if other.spacing is not None and not np.allclose(other.spacing, ref.spacing, atol=tol, rtol=0):
        raise UserError(f"{case}: spacing {tuple(round(s, 4) for s in other.spacing)} of {other_path} "
                        f"differs from reference {ref_path} {tuple(round(s, 4) for s in ref.spacing)}")
    if other.affine is not None and ref.affine is not None and not np.allclose(
            other.affine, ref.affine, atol=tol, rtol=0):
        raise UserError(f"{case}: affine of {other_path} differs from reference {ref_path} "
                        f"(max difference {np.abs(other.affine - ref.affine).max():.4g} mm)")


def load_prediction(files: PredFiles, case: str, prefer_probabilities: bool = True) -> tuple[Volume, Path]:
    """The case's prediction: probabilities (float32) when an npz exists, else the binary mask."""
    if files.npz is not None and (prefer_probabilities or files.seg is None):
        return read_probabilities(files.npz, case), files.npz
    return read_mask(files.seg, case, "prediction"), files.seg
