"""``nnunet-pvs regions``: BG / WM masks (and visual-count slices) from aseg label maps.

Output files ``CASE_bg.nii.gz``, ``CASE_wm.nii.gz`` (+ ``CASE_bgslice``, ``CASE_csoslice``) are what
``nnunet-pvs evaluate --regions`` reads; ``slices.csv`` lists the chosen slice indices.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from nnunet_pvs.errors import UserError
from nnunet_pvs.dataset_conversion.convert import find_dataset, raw_root
from nnunet_pvs.dataset_conversion.regions import region_masks
from nnunet_pvs.dataset_conversion.validation import NIFTI_SUFFIXES


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-i", "--input", type=Path, help="a label map (CASE.nii.gz) or a folder of them")
    src.add_argument("-d", "--dataset-id", type=int, help="use the regions/ folder of this raw dataset")
    p.add_argument("-o", "--output", type=Path, help="output folder (default with -d: <dataset>/region_masks)")
    p.add_argument("--raw", type=Path, help="nnU-Net raw folder for -d (default $nnUNet_raw)")
    p.add_argument("--slices", action="store_true", help="also the BG (anterior commissure level) and "
                   "centrum semiovale (1 cm above the lateral ventricles) slice masks")


def _inputs(args) -> tuple[dict[str, Path], Path]:
    if args.dataset_id is not None:
        ds = find_dataset(raw_root(args.raw), args.dataset_id)
        folder = ds / "regions"
        if not folder.is_dir():
            raise UserError(f"{ds}: no regions/ folder of label maps")
        out = args.output or ds / "region_masks"
    else:
        folder = args.input
        if args.output is None:
            raise UserError("-o/--output is required with -i")
        out = args.output
        if folder.is_file():
            return {_case(folder): folder}, out
        if not folder.is_dir():
            raise UserError(f"{folder}: does not exist")
    files = {_case(p): p for p in sorted(folder.iterdir()) if p.name.endswith(NIFTI_SUFFIXES)}
    if not files:
        raise UserError(f"{folder}: no NIfTI label maps")
    return files, out


def _case(p: Path) -> str:
    for suf in NIFTI_SUFFIXES:
        if p.name.endswith(suf):
            return p.name[: -len(suf)]
    raise UserError(f"{p}: not a NIfTI file")


def run(args) -> int:
    from tqdm import tqdm

    files, out = _inputs(args)
    loaded = {}
    for case, path in files.items():  # validate all before writing anything
        try:
            img = nib.load(str(path))
            data = np.asanyarray(img.dataobj)
        except Exception as e:
            raise UserError(f"{case}: {path}: cannot be read as NIfTI ({e})") from None
        if data.ndim != 3:
            raise UserError(f"{case}: {path}: label map is {data.ndim}D, 3D expected")
        if not np.all(np.isfinite(data)) or not np.allclose(data, np.round(data)):
            raise UserError(f"{case}: {path}: label map has non-integer values (aseg numbering expected)")
        loaded[case] = (path, img.affine)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "slices.csv").is_file()):
        raise UserError(f"{out}: exists and was not written by 'nnunet-pvs regions'; choose another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    rows = []
    try:
        for case, (path, affine) in tqdm(loaded.items(), desc="regions", unit="case", leave=False):
            res = region_masks(np.asanyarray(nib.load(str(path)).dataobj), affine, slices=args.slices)
            for name, m in res.masks.items():
                nib.save(nib.Nifti1Image(m.astype(np.uint8), affine), str(tmp / f"{case}_{name}.nii.gz"))
            if not res.masks["bg"].any() or not res.masks["wm"].any():
                res.notes.append("empty bg or wm mask: is this an aseg label map?")
            rows.append({"case_id": case, "bg_voxels": int(res.masks["bg"].sum()),
                         "wm_voxels": int(res.masks["wm"].sum()), "axis": res.axis,
                         "bg_slice": res.bg_slice, "cso_slice": res.cso_slice, "notes": "; ".join(res.notes)})
        table = pd.DataFrame(rows)
        for c in ("bg_slice", "cso_slice"):
            table[c] = table[c].astype("Int64")
        table.to_csv(tmp / "slices.csv", index=False)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
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
