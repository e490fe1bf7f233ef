"""The phantom as an nnU-Net raw dataset, written through the converter's :func:`write_dataset`.

Besides ``imagesTr``/``labelsTr`` (rater labels, what a model is trained on), the dataset holds
``labelsTr_truth``/``labelsTs_truth`` (noise-free labels, declared as ``truth_labels`` in the
``nnunet_pvs`` block of dataset.json) so that ``nnunet-pvs evaluate --truth`` can say how far rater
noise caps a measured Dice. With ``visits`` (``follow_up``, ``rescan``) every labelled subject also
gets later visits under ``visits/`` (:mod:`~nnunet_pvs.dataset_conversion.phantom.visits`); the
baseline files are the same with or without them. Everything is staged in a hidden folder and moved
into place at the end; only a dataset `phantom` wrote is ever replaced (:mod:`nnunet_pvs.staging`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from nnunet_pvs.dataset_conversion.phantom.anatomy import SIZES, SPACING
from nnunet_pvs.dataset_conversion.phantom.subject import generate_subject
from nnunet_pvs.staging import check_writable_target, clean_leftovers, replace_folder, sigterm_raises, staging_name
from nnunet_pvs.errors import UserError

GENERATOR_VERSION = 2
TRUTH_FOLDERS = {"labelsTr": "labelsTr_truth", "labelsTs": "labelsTs_truth"}


def _save(data, affine, path, dtype):
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def check_parameters(contrast: str, size: str, n_subjects: int, n_test: int, n_unlabeled: int,
                     seed: int = 0, dataset_id: int = 900, name: str = "PVSPhantom") -> None:
    """Refuse impossible combinations before anything is generated."""
    import re

    if not 1 <= int(dataset_id) <= 999:
        raise UserError(f"dataset id {dataset_id}: nnU-Net dataset ids are 1..999")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name or ""):
        raise UserError(f"dataset name {name!r}: use letters, digits, '_' and '-' only")
    if int(seed) < 0:
        raise UserError(f"seed {seed}: must be >= 0")
    if size not in SIZES:
        raise UserError(f"size {size!r}: choose one of {', '.join(SIZES)}")
    if contrast not in SPACING:
        raise UserError(f"contrast {contrast!r}: choose one of {', '.join(SPACING)}")
    if n_subjects < 1 or n_unlabeled < 0 or n_test < 0:
        raise UserError(f"subjects {n_subjects}, test {n_test}, unlabeled {n_unlabeled}: "
                        "need >= 1 labelled subject and >= 0 test/unlabeled ones")
    if n_subjects + n_test + n_unlabeled > 999:
        raise UserError(f"{n_subjects + n_test + n_unlabeled} subjects: case ids pvs000..pvs999 allow at most 999")


def make_phantom_dataset(raw_dir, dataset_id: int = 900, name: str | None = None, contrast: str = "T2w",
                         n_subjects: int | None = None, size: str = "tiny", seed: int = 0, n_unlabeled: int = 0,
                         n_test: int = 0, force: bool = False, progress: bool = True, log=print,
                         visits: tuple = ()) -> Path:
    """Generate the phantom and write it as ``raw_dir/Dataset<ID>_<name>``; returns the dataset folder.

    Writes ``imagesTr``/``labelsTr`` (``n_subjects`` cases ``pvs000``...), ``imagesTs``/``labelsTs``
    (``n_test``), ``imagesUnlabeled/CASE_0000.nii.gz`` (``n_unlabeled``, for autoencoder
    pretraining), the truth folders, ``regions/CASE.nii.gz`` (aseg label maps) and
    ``covariates.csv``. ``visits`` (any of ``"follow_up"``, ``"rescan"``) adds ``visits/`` for every
    labelled subject. Re-running with the same parameters is a no-op; different ones need ``force``.
    """
    from nnunet_pvs.dataset_conversion.convert import (check_datasets_owned, dataset_folder_name, existing_datasets,
                                                       write_dataset)
    from nnunet_pvs.dataset_conversion.phantom.visits import VISITS
    from nnunet_pvs.dataset_conversion.validation import Subject

    visits = tuple(v for v in VISITS if v in set(visits))

    n_subjects = SIZES[size].n_subjects if (n_subjects is None and size in SIZES) else n_subjects
    n_subjects = int(n_subjects) if n_subjects is not None else 0
    name = name or f"PVSPhantom{contrast}"
    check_parameters(contrast, size, n_subjects, int(n_test), int(n_unlabeled), int(seed), int(dataset_id), name)
    raw = Path(raw_dir)
    if raw.exists() and not raw.is_dir():
        raise UserError(f"{raw}: is a file, not an nnU-Net raw folder")
    folder = raw / dataset_folder_name(dataset_id, name)
    check_writable_target(folder, "dataset folder", want_dir=True)
    check_writable_target(raw, "nnU-Net raw folder", want_dir=True)  # the dataset is staged beside it
    clean_leftovers(raw, f"Dataset{int(dataset_id):03d}_", log=log)
    params = {"generator_version": GENERATOR_VERSION, "contrast": contrast, "size": size, "seed": int(seed),
              "n_subjects": n_subjects, "n_test": int(n_test), "n_unlabeled": int(n_unlabeled)}
    if visits:  # only then: a dataset made without visits keeps the parameters (and digest) it always had
        params["visits"] = list(visits)
    existing = existing_datasets(raw, dataset_id) if raw.is_dir() else []
    check_datasets_owned(existing, "phantom")  # another command's dataset or the user's: refused, even with force
    if existing == [folder] and (folder / "dataset.json").is_file():
        try:
            old = json.loads((folder / "dataset.json").read_text())["nnunet_pvs"].get("phantom")
        except (OSError, ValueError, KeyError, AttributeError):
            old = None
        if old == params and all((folder / d).is_dir() for d in ("imagesTr", "labelsTr", "labelsTr_truth")):
            log(f"{folder}: up to date (same phantom parameters), nothing written")
            return folder
    if existing and not force:
        raise UserError(f"{existing[0]}: a different dataset with id {int(dataset_id):03d} exists; "
                        "pass --force to replace it")
    raw.mkdir(parents=True, exist_ok=True)
    plan = ([("train", i) for i in range(n_subjects)] + [("test", n_subjects + i) for i in range(n_test)]
            + [("unlabeled", n_subjects + n_test + i) for i in range(n_unlabeled)])
    it = plan
    if progress:
        from tqdm import tqdm
        it = tqdm(plan, desc=f"phantom {contrast} {size}", unit="subject")
    stage = staging_name(folder)
    with sigterm_raises():
        try:
            stage.mkdir()
            out = _generate_into(stage, it, contrast, size, seed, dataset_id, name, n_test, params, progress,
                                 log, write_dataset, Subject, visits)
            replace_folder(out, folder, others=existing)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    log(f"{folder}: wrote {n_subjects} training, {n_test} test, {n_unlabeled} unlabeled case(s)")
    return folder


def _generate_into(stage: Path, it, contrast, size, seed, dataset_id, name, n_test, params, progress, log,
                   write_dataset, Subject, visits=()) -> Path:
    """Generate every subject into ``stage`` and write the dataset there; returns the staged dataset folder."""
    from nnunet_pvs.dataset_conversion.phantom import visits as later_visits

    files, subjects, truths = stage / "files", [], {}
    files.mkdir()
    visit_rows: tuple[list, list] = ([], [])
    for split, i in it:
        sid = f"pvs{i:03d}"
        with_visits = bool(visits) and split != "unlabeled"
        s = generate_subject(contrast, size, seed, i, labelled=split != "unlabeled", keep_scene=with_visits)
        if with_visits:
            truth_rows, motion_rows = later_visits.write_case(stage / "visits", sid, s.scene, s.affine, visits, _save)
            visit_rows[0].extend(truth_rows)
            visit_rows[1].extend(motion_rows)
            s.scene = None  # its arrays are not needed any more
        _save(s.image * 1000.0, s.affine, files / f"{sid}_{contrast}.nii.gz", np.int16)
        _save(s.labels, s.affine, files / f"{sid}_regions.nii.gz", np.int16)
        mask = None
        if split != "unlabeled":
            mask = files / f"{sid}_mask.nii.gz"
            _save(s.mask, s.affine, mask, np.uint8)
            truths[sid] = (split, s.truth, s.affine)
        subjects.append(Subject(id=sid, images={contrast: files / f"{sid}_{contrast}.nii.gz"}, mask=mask,
                                regions=files / f"{sid}_regions.nii.gz", split=split, covariates=s.covariates))
    staged_raw = stage / "raw"
    staged_raw.mkdir()
    extra = {"phantom": params, "truth_labels": TRUTH_FOLDERS["labelsTr"],
             "truth_labels_test": TRUTH_FOLDERS["labelsTs"] if n_test else None}
    if visits:
        extra["visits"] = "visits"
    out, _ = write_dataset(subjects, staged_raw, dataset_id, name, [contrast], force=True, progress=progress,
                           command="phantom",
                           description=f"Synthetic PVS phantom v{GENERATOR_VERSION} ({contrast}-like, size "
                                       f"{size}, seed {seed}) built on the MNI152 template; see docs/data.md",
                           extra_json=extra, log=log)
    for sid, (split, truth, affine) in truths.items():
        sub = out / TRUTH_FOLDERS["labelsTr" if split == "train" else "labelsTs"]
        sub.mkdir(exist_ok=True)
        _save(truth, affine, sub / f"{sid}.nii.gz", np.uint8)
    if visits:
        shutil.move(str(stage / "visits"), str(out / "visits"))
        later_visits.write_tables(out / "visits", *visit_rows)
    return out
