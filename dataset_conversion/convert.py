"""Writing validated subjects as an nnU-Net raw dataset, atomically and idempotently.

Layout of ``$nnUNet_raw/Dataset<ID>_Name/``::

    imagesTr/CASE_0000.nii.gz ...   labelsTr/CASE.nii.gz       (split "train")
    imagesTs/CASE_0000.nii.gz ...   labelsTs/CASE.nii.gz       (split "test"; labels when given)
    imagesUnlabeled/CASE_0000.nii.gz ...                       (no mask: autoencoder pretraining)
    regions/CASE.nii.gz             region label maps (aseg numbering), all splits
    covariates.csv                  case_id, split, pvs_voxels, user covariates (age, sex, ...)
    dataset.json                    nnU-Net's, plus an "nnunet_pvs" entry naming the extras
    conversion.json                 content fingerprint of the inputs (idempotent re-runs)
    .nnunet-pvs.json                which command wrote it (convert or phantom; nnunet_pvs.staging)

Covariates and region maps stay beside the images, never as nnU-Net channels. Images are copied
byte for byte (``.nii.gz``) or re-encoded (``.nii``), never resampled: the 0.69 x 0.69 x 2 mm T2
grid is what makes 2D training work (Cai et al. 2024). Masks are written as uint8 0/1 with the
image's own affine once validation found them within tolerance, so nnU-Net's integrity check
(exact geometry) passes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from nnunet_pvs.errors import UserError
from nnunet_pvs.staging import (check_owner, check_writable_target, clean_leftovers, replace_folder, sigterm_raises,
                                staging_name, write_marker)
from nnunet_pvs.dataset_conversion.validation import Subject, binarize, validate

FOLDERS = {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs"),
           "unlabeled": ("imagesUnlabeled", None)}
REGIONS_DIR = "regions"
COVARIATES_CSV = "covariates.csv"
FINGERPRINT_JSON = "conversion.json"


def raw_root(explicit: Path | None) -> Path:
    """``-o``/``--raw`` or ``$nnUNet_raw``."""
    value = explicit or os.environ.get("nnUNet_raw")
    if not value:
        raise UserError("nnUNet_raw is not set: export it or pass --raw/-o")
    return Path(value)


def earlier_dataset(command: str):
    """Recogniser of a dataset ``command`` wrote before the ownership marker: a phantom's dataset.json
    names its phantom parameters; a converted one has the fingerprint file but no phantom block."""
    def recognise(folder: Path) -> bool:
        try:
            block = json.loads((folder / "dataset.json").read_text()).get("nnunet_pvs") or {}
            phantom = isinstance(block, dict) and "phantom" in block
        except (OSError, ValueError, AttributeError):
            phantom = False
        return phantom if command == "phantom" else (not phantom and _fingerprint(folder) is not None)

    return recognise


def check_datasets_owned(folders: list[Path], command: str) -> None:
    """Datasets of this id that ``command`` may replace (with --force): only its own; another
    command's or one made by hand is refused even then."""
    for folder in folders:
        check_owner(folder, command, legacy=earlier_dataset(command), option="-d")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not (0 < int(dataset_id) < 1000):
        raise UserError(f"dataset id {dataset_id}: must be within 1..999")
    if not name or not all(ch.isalnum() or ch in "-_" for ch in name):
        raise UserError(f"dataset name {name!r}: use letters, digits, '-' or '_'")
    return f"Dataset{int(dataset_id):03d}_{name}"


def existing_datasets(raw: Path, dataset_id: int) -> list[Path]:
    return sorted(p for p in Path(raw).glob(f"Dataset{int(dataset_id):03d}_*") if p.is_dir())


def find_dataset(raw: Path, dataset_id: int) -> Path:
    """The one raw folder of a dataset id, or a user error."""
    hits = existing_datasets(raw, dataset_id)
    if len(hits) != 1:
        raise UserError(f"{raw}: {'no' if not hits else len(hits)} folder(s) Dataset{int(dataset_id):03d}_*")
    return hits[0]


def _write_nifti_like(src: Path, dst: Path) -> None:
    if str(src).endswith(".nii.gz"):
        shutil.copyfile(src, dst)
    else:
        nib.save(nib.load(str(src)), str(dst))


def _write_mask(mask_path: Path, image_path: Path, label_value, dst: Path) -> None:
    img = nib.load(str(image_path))
    m = binarize(np.asanyarray(nib.load(str(mask_path)).dataobj), label_value)
    # the image's own header (qform/sform codes included): nnU-Net compares geometry exactly
    hdr = img.header.copy()
    hdr.set_data_dtype(np.uint8)
    hdr.set_slope_inter(1.0, 0.0)
    nib.save(nib.Nifti1Image(m.astype(np.uint8), img.affine, hdr), str(dst))


def write_dataset(subjects: list[Subject], raw_dir: Path, dataset_id: int, name: str, channels: list[str],
                  label_value: float | None = None, affine_tol: float = 1e-3, force: bool = False,
                  description: str = "", extra_json: dict | None = None, progress: bool = True,
                  log=print, allow_empty_labels: bool = False, command: str = "convert") -> tuple[Path, bool]:
    """Validate, then write ``Dataset<ID>_name``; return (folder, whether anything was written).

    Same inputs as an existing, complete dataset of that id and name: nothing is done. A different
    dataset with the same id: :class:`UserError` unless ``force``, which replaces it atomically,
    and only if ``command`` wrote it (``nnunet-pvs convert``, or ``phantom`` calling this).
    Leftovers of a killed earlier run for this id are cleaned first.
    """
    raw = Path(raw_dir)
    folder_name = dataset_folder_name(dataset_id, name)
    if not channels or len(set(channels)) != len(channels):
        raise UserError(f"channels {channels}: give each channel name once")
    check_writable_target(raw, "nnU-Net raw folder", want_dir=True)
    prefix = f"Dataset{int(dataset_id):03d}_"
    clean_leftovers(raw, prefix, log=log,
                    may_restore=lambda original: not existing_datasets(raw, dataset_id))
    final = raw / folder_name
    others = existing_datasets(raw, dataset_id)
    check_datasets_owned(others, command)  # before the (slow) validation, as is the next check
    if others and others != [final] and not force:
        raise UserError(f"{others[0]}: a different dataset with id {int(dataset_id):03d} exists; "
                        "pass --force to replace it")
    checked = validate(subjects, channels, label_value, affine_tol, progress=progress,
                       allow_empty_labels=allow_empty_labels)
    for w in checked.warnings:
        log(f"warning: {w}")
    n_train = sum(s.resolved_split == "train" for s in subjects)
    if n_train == 0:
        raise UserError("input: no training subject (a subject with a PVS mask); nnU-Net needs at least one")

    if others:
        if others == [final] and _fingerprint(final) == checked.fingerprint:
            missing = _missing_files(final)
            if not missing:
                log(f"{final}: up to date (same inputs), nothing written")
                return final, False
            # our own dataset of these very inputs, with files lost since: rewriting it is a repair
            log(f"{final}: same inputs but {len(missing)} file(s) missing (e.g. {missing[0]}): rewriting it")
        elif not force:
            raise UserError(f"{others[0]}: a different dataset with id {int(dataset_id):03d} exists; "
                            "pass --force to replace it")
    raw.mkdir(parents=True, exist_ok=True)
    tmp = staging_name(final)
    with sigterm_raises():
        try:
            _write_all(tmp, subjects, channels, label_value, checked, description, extra_json, progress)
            # the completion marker, written last: names every file, so a folder missing one is not "up to date"
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            (tmp / FINGERPRINT_JSON).write_text(json.dumps(
                {"fingerprint": checked.fingerprint, "channels": channels, "label_value": label_value,
                 "files": files}, indent=2))
            write_marker(tmp, command)
            replace_folder(tmp, final, others=others)  # what it replaces comes back if this fails
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"{final}: wrote {n_train} training, {sum(s.resolved_split == 'test' for s in subjects)} test, "
        f"{sum(s.resolved_split == 'unlabeled' for s in subjects)} unlabeled case(s)")
    return final, True


def _fingerprint(folder: Path) -> str | None:
    """The input fingerprint recorded in a dataset's completion marker, or None."""
    try:
        return json.loads((folder / FINGERPRINT_JSON).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _missing_files(folder: Path) -> list[str]:
    """Files the completion marker names that are gone (a marker without a file list: all of them)."""
    try:
        files = json.loads((folder / FINGERPRINT_JSON).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [FINGERPRINT_JSON]
    return [f for f in files if not (folder / f).is_file()]


def _write_all(root: Path, subjects, channels, label_value, checked, description, extra_json, progress):
    root.mkdir(parents=True)
    used = {s.resolved_split for s in subjects}
    for split in used:
        img_dir, lab_dir = FOLDERS[split]
        (root / img_dir).mkdir()
        if lab_dir and any(s.mask is not None for s in subjects if s.resolved_split == split):
            (root / lab_dir).mkdir()
    if any(s.regions is not None for s in subjects):
        (root / REGIONS_DIR).mkdir()
    it = subjects
    if progress:
        from tqdm import tqdm
        it = tqdm(subjects, desc="writing", unit="subject", leave=False)
    rows = []
    for s in it:
        split = s.resolved_split
        img_dir, lab_dir = FOLDERS[split]
        for k, c in enumerate(channels):
            _write_nifti_like(Path(s.images[c]), root / img_dir / f"{s.id}_{k:04d}.nii.gz")
        if s.mask is not None and lab_dir:
            _write_mask(Path(s.mask), Path(s.images[channels[0]]), label_value, root / lab_dir / f"{s.id}.nii.gz")
        if s.regions is not None:
            _write_nifti_like(Path(s.regions), root / REGIONS_DIR / f"{s.id}.nii.gz")
        rows.append({"case_id": s.id, "split": split, "pvs_voxels": checked.pvs_voxels.get(s.id), **s.covariates})
    table = pd.DataFrame(rows)
    table["pvs_voxels"] = table["pvs_voxels"].astype("Int64")
    table.to_csv(root / COVARIATES_CSV, index=False)
    n_train = sum(s.resolved_split == "train" for s in subjects)
    ds = {
        "name": root.name.split(".tmp-")[0].lstrip("."),
        "description": description or "PVS segmentation dataset converted by nnunet-pvs",
        "channel_names": {str(k): c for k, c in enumerate(channels)},
        "labels": {"background": 0, "PVS": 1},
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "nnunet_pvs": {"covariates": COVARIATES_CSV,
                       "regions": REGIONS_DIR if (root / REGIONS_DIR).is_dir() else None,
                       "unlabeled": FOLDERS["unlabeled"][0] if "unlabeled" in used else None,
                       **(extra_json or {})},
    }
    (root / "dataset.json").write_text(json.dumps(ds, indent=2))
