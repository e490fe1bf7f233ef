"""``nnunet-pvs regions``: BG / WM masks (and visual-count slices) from aseg label maps.

Output files ``CASE_bg.nii.gz``, ``CASE_wm.nii.gz`` (+ ``CASE_bgslice``, ``CASE_csoslice``) are what
``nnunet-pvs evaluate --regions`` reads; ``slices.csv`` lists the chosen slice indices. Every label
map is checked first (readable, 3D, integer, aseg numbering, on its image's grid); the output
folder is staged and swapped in whole, and only a folder `regions` wrote is replaced
(:mod:`nnunet_pvs.staging`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from nnunet_pvs.errors import UserError
from nnunet_pvs.dataset_conversion.convert import FOLDERS, find_dataset, raw_root
from nnunet_pvs.dataset_conversion.regions import not_aseg_reason, region_masks
from nnunet_pvs.staging import check_output_folder, earlier_layout, staged_folder
from nnunet_pvs.dataset_conversion.validation import NIFTI_SUFFIXES, Problems, grid_difference

OWN_MARKER = "slices.csv"  # before the ownership marker (nnunet_pvs.staging), this marked our folders


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
            raise UserError(f"{args.images}: --images is a file, not a folder; give the folder holding the images"
                            if args.images.exists() else f"{args.images}: --images folder does not exist")
        image_dirs = [args.images] if args.images is not None else None
        if folder.is_file():
            return {_case(folder): folder}, out, image_dirs
        if not folder.is_dir():
            raise UserError(f"{folder}: -i is neither a label map nor a folder"
                            if folder.exists() else f"{folder}: does not exist")
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


# a regions output of a version before the ownership marker: its slices.csv, as written then
is_legacy_output = earlier_layout(OWN_MARKER, "case_id,bg_voxels,wm_voxels,axis,")


def _check_output(out: Path) -> None:
    """Before any label map is read: the output must be a folder we may create or replace."""
    check_output_folder(out, "regions", legacy=is_legacy_output)


def stored_voxel_size_problem(path: Path) -> str | None:
    """Why the label map's voxel size in mm is unknown, or None: a voxel size of 0 in the header
    (pixdim) with no sform. nibabel then quietly takes 1 mm, and the CSO slice, 10 mm above the
    ventricles, would be placed on invented voxels; so the stored header is read, unrepaired."""
    from nibabel.openers import ImageOpener

    for header_class in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            with ImageOpener(str(path)) as f:
                hdr = header_class.from_fileobj(f, check=False)
        except Exception:  # not this header type, or unreadable: nib.load reports that later
            continue
        sizes = [float(v) for v in hdr["pixdim"][1:4]]
        if int(hdr["sform_code"]) == 0 and any(v == 0 for v in sizes):
            return (f"voxel size {' x '.join(f'{v:g}' for v in sizes)} mm in the header and no sform, so "
                    "the size of a voxel is unknown (nibabel would take 1 mm) and the CSO slice, 10 mm above "
                    "the ventricles, cannot be placed; fix the header (e.g. copy its image's geometry) or "
                    "run without --slices")
        return None
    return None


def _check_label_maps(files: dict[str, Path], image_dirs: list[Path] | None, tol: float,
                      slices: bool = False) -> None:
    """All problems of all label maps in one error: unreadable, not 3D, not integer, not aseg
    numbering, on another grid than the case's image, or (for ``slices``, which measure in mm)
    without a voxel size."""
    problems = Problems()
    for case, path in files.items():
        why = stored_voxel_size_problem(path) if slices else None
        if why:
            problems.add(case, path, why)
            continue
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
    _check_label_maps(files, image_dirs, args.affine_tol, slices=args.slices)
    rows = []
    with staged_folder(out, "regions", legacy=is_legacy_output) as tmp:
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
        table.to_csv(tmp / OWN_MARKER, index=False)
    cols = ["case_id", "bg_voxels", "wm_voxels"] + (["bg_slice", "cso_slice"] if args.slices else [])
    print(table[cols].to_string(index=False))
    for r in rows:
        if r["notes"]:
            print(f"note: {r['case_id']}: {r['notes']}")
    print(f"{out}: {len(rows)} case(s)")
    return 0
