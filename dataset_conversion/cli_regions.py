"""``nnunet-pvs regions``: BG / WM masks (and visual-count slices) from aseg label maps.

Output files ``CASE_bg.nii.gz``, ``CASE_wm.nii.gz`` (+ ``CASE_bgslice``, ``CASE_csoslice``) are what
``nnunet-pvs evaluate --regions`` reads; ``slices.csv`` lists the chosen slice indices. Every label
map is checked first (readable, 3D, integer, aseg numbering, on its image's grid); the output
folder is built beside the target and swapped in whole.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from nnunet_pvs.errors import UserError
from nnunet_pvs.dataset_conversion.convert import FOLDERS, find_dataset, raw_root
from nnunet_pvs.dataset_conversion.regions import not_aseg_reason, region_masks
from nnunet_pvs.dataset_conversion.staging import (check_writable_target, clean_leftovers, replace_folder,
                                                   sigterm_raises, staging_name)
from nnunet_pvs.dataset_conversion.validation import NIFTI_SUFFIXES, Problems, grid_difference

OWN_MARKER = "slices.csv"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-i", "--input", type=Path, help="a label map (CASE.nii.gz) or a folder of them")
    src.add_argument("-d", "--dataset-id", type=int, help="use the regions/ folder of this raw dataset")
    p.add_argument("-o", "--output", type=Path, help="output folder (default with -d: <dataset>/region_masks)")
    p.add_argument("--raw", type=Path, help="nnU-Net raw folder for -d (default $nnUNet_raw)")
    p.add_argument("--images", type=Path, help="with -i: folder of the images (CASE_0000.nii.gz or CASE.nii.gz) "
                   "whose grid each label map must match; with -d the dataset's own images are used")
    p.add_argument("--affine-tol", type=float, default=1e-3,
                   help="largest allowed difference between label map and image affines (default 1e-3)")
    p.add_argument("--slices", action="store_true", help="also the BG (anterior commissure level) and "
                   "centrum semiovale (1 cm above the lateral ventricles) slice masks")


def _inputs(args) -> tuple[dict[str, Path], Path, list[Path] | None]:
    """(case -> label map, output folder, folders holding the images or None)."""
    if args.dataset_id is not None:
        ds = find_dataset(raw_root(args.raw), args.dataset_id)
        folder = ds / "regions"
        if not folder.is_dir():
            raise UserError(f"{ds}: no regions/ folder of label maps")
        out = args.output or ds / "region_masks"
        image_dirs = [ds / images for images, _ in FOLDERS.values()]
    else:
        folder = args.input
        if args.output is None:
            raise UserError("-o/--output is required with -i")
        out = args.output
        if args.images is not None and not args.images.is_dir():
            raise UserError(f"{args.images}: --images folder does not exist")
        image_dirs = [args.images] if args.images is not None else None
        if folder.is_file():
            return {_case(folder): folder}, out, image_dirs
        if not folder.is_dir():
            raise UserError(f"{folder}: does not exist")
    files = {_case(p): p for p in sorted(folder.iterdir()) if p.name.endswith(NIFTI_SUFFIXES)}
    if not files:
        raise UserError(f"{folder}: no NIfTI label maps")
    return files, out, image_dirs


def _case(p: Path) -> str:
    for suf in NIFTI_SUFFIXES:
        if p.name.endswith(suf):
            return p.name[: -len(suf)]
    raise UserError(f"{p}: not a NIfTI file")


def _image_of(case: str, image_dirs: list[Path]) -> Path | None:
    for d in image_dirs:
        for stem in (f"{case}_0000", case):
            for suf in NIFTI_SUFFIXES:
                if (d / f"{stem}{suf}").is_file():
                    return d / f"{stem}{suf}"
    return None


def _check_output(out: Path) -> None:
    """Before any label map is read: the output must be a folder we may create or replace."""
    check_writable_target(out, "output folder", want_dir=True)
    if out.is_dir() and any(out.iterdir()) and not (out / OWN_MARKER).is_file():
        raise UserError(f"{out}: exists and was not written by 'nnunet-pvs regions'; choose another -o")


def _check_label_maps(files: dict[str, Path], image_dirs: list[Path] | None, tol: float) -> None:
    """All problems of all label maps in one error: unreadable, not 3D, not integer, not aseg
    numbering, or on another grid than the case's image."""
    problems = Problems()
    for case, path in files.items():
        try:
            img = nib.load(str(path))
            data = np.asanyarray(img.dataobj)
        except Exception as e:
            problems.add(case, path, f"cannot be read as NIfTI ({e})")
            continue
        if data.ndim != 3:
            problems.add(case, path, f"label map is {data.ndim}D, 3D expected")
            continue
        if not np.all(np.isfinite(data)) or not np.allclose(data, np.round(data)):
            problems.add(case, path, "label map has non-integer values (aseg numbering expected)")
            continue
        reason = not_aseg_reason(np.unique(np.round(data)))
        if reason:
            problems.add(case, path, reason)
        if image_dirs is not None:
            image = _image_of(case, image_dirs)
            if image is None:
                problems.add(case, path, f"no image {case}_0000.nii.gz or {case}.nii.gz in "
                                         f"{', '.join(str(d) for d in image_dirs)} to check the grid against")
                continue
            ref = nib.load(str(image))
            why = grid_difference(data.shape, img.affine, ref.shape[:3], ref.affine, image.name, tol)
            if why:
                problems.add(case, path, f"label map {why}; it must be on its image's grid")
    problems.raise_if_any("label maps")


def run(args) -> int:
    from tqdm import tqdm

    files, out, image_dirs = _inputs(args)
    _check_output(out)
    clean_leftovers(out.parent, out.name)
    _check_label_maps(files, image_dirs, args.affine_tol)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_name(out)
    rows = []
    with sigterm_raises():
        try:
            tmp.mkdir()
            for case, path in tqdm(files.items(), desc="regions", unit="case", leave=False):
                img = nib.load(str(path))
                res = region_masks(np.asanyarray(img.dataobj), img.affine, slices=args.slices)
                for name, m in res.masks.items():
                    nib.save(nib.Nifti1Image(m.astype(np.uint8), img.affine), str(tmp / f"{case}_{name}.nii.gz"))
                rows.append({"case_id": case, "bg_voxels": int(res.masks["bg"].sum()),
                             "wm_voxels": int(res.masks["wm"].sum()), "axis": res.axis,
                             "bg_slice": res.bg_slice, "cso_slice": res.cso_slice, "notes": "; ".join(res.notes)})
            table = pd.DataFrame(rows)
            for c in ("bg_slice", "cso_slice"):
                table[c] = table[c].astype("Int64")
            table.to_csv(tmp / OWN_MARKER, index=False)  # written last: marks the folder as ours and complete
            replace_folder(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    cols = ["case_id", "bg_voxels", "wm_voxels"] + (["bg_slice", "cso_slice"] if args.slices else [])
    print(table[cols].to_string(index=False))
    for r in rows:
        if r["notes"]:
            print(f"note: {r['case_id']}: {r['notes']}")
    print(f"{out}: {len(rows)} case(s)")
    return 0
