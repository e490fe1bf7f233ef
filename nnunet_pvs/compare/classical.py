"""The Frangi baseline as a model of ``compare``: tuned per fold on training cases, cached.

For every fold the scales and threshold are chosen on that fold's *training* cases (from
``splits_final.json``) and applied unchanged to the cases the fold is scored on (validation, or
Cai's test group); with ``--test-set`` they are tuned on all labelled training cases. The filter
reads channel 0 of ``imagesTr``; bright or dark ridges follow that channel's name in dataset.json
(T2 -> bright, T1/FLAIR -> dark) unless ``--frangi-ridges`` says otherwise. Predictions are NIfTI
masks with the reference's geometry, in ``<predictions>/frangi/<fold>/`` beside a
``tuning.json``; a folder is reused while its settings, cases and images are unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from nnunet_pvs.classical import tuning, vesselness
from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation import io

RIDGES = ("auto", "bright", "dark")


@dataclass(frozen=True)
class FoldJob:
    name: str                 # "fold_0", ... or "all"
    train: tuple[str, ...]
    targets: tuple[str, ...]


@dataclass(frozen=True)
class FrangiSettings:
    bright: bool
    brain_mask: bool = True
    scale_sets: tuple[tuple[float, ...], ...] = tuning.DEFAULT_SCALE_SETS
    thresholds: tuple[float, ...] = tuning.DEFAULT_THRESHOLDS

    def as_dict(self) -> dict:
        return {"ridges": "bright" if self.bright else "dark", "brain_mask": self.brain_mask,
                "scale_sets_mm": [list(s) for s in self.scale_sets], "thresholds": list(self.thresholds)}


def ridge_polarity(raw_dataset_dir: Path, ridges: str = "auto") -> bool:
    """True for bright ridges; ``auto`` reads channel 0's name from dataset.json."""
    if ridges not in RIDGES:
        raise UserError(f"--frangi-ridges {ridges!r}: choose auto, bright or dark")
    if ridges != "auto":
        return ridges == "bright"
    dj = raw_dataset_dir / "dataset.json"
    try:
        channels = json.loads(dj.read_text()).get("channel_names") or {}
    except (OSError, ValueError):
        raise UserError(f"{dj}: cannot read the channel names for frangi; pass --frangi-ridges bright|dark") from None
    name = channels.get("0", "")
    pol = vesselness.ridge_polarity(name)
    if pol is None:
        raise UserError(f"{dj}: channel 0 is {name!r}, neither T2- nor T1/FLAIR-like; pass --frangi-ridges "
                        "bright (CSF bright, T2w) or dark (CSF dark, T1w)")
    return pol == "bright"


def _image_path(images_dir: Path, case: str, ending: str) -> Path:
    p = images_dir / f"{case}_0000{ending}"
    if not p.is_file():
        raise UserError(f"frangi: image {p} not found")
    return p


def _identity(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def _responses(image: io.Volume, settings: FrangiSettings) -> tuple[list[np.ndarray], np.ndarray | None]:
    mask = vesselness.brain_mask(image.data, image.spacing) if settings.brain_mask else None
    img = vesselness.normalise(image.data, mask)
    return [vesselness.frangi_response(img, image.spacing, s, settings.bright) for s in settings.scale_sets], mask


def _fold_record(job: FoldJob, settings: FrangiSettings, files: dict[str, list]) -> dict:
    return {"settings": settings.as_dict(), "train": list(job.train), "targets": list(job.targets),
            "train_files": {c: files[("train", c)] for c in job.train},
            "target_files": {c: files[("target", c)] for c in job.targets}}


def run_frangi(jobs: list[FoldJob], images_dir: Path, labels: dict[str, Path], target_images_dir: Path,
               refs: dict[str, Path], out_root: Path, settings: FrangiSettings, ending: str = ".nii.gz"):
    """Tune per job on its training cases, segment its targets. Returns (case -> PredFiles,
    one dict per job with the chosen parameters)."""
    out_root = Path(out_root)
    files = {}
    for job in jobs:
        for c in job.train:
            if c not in labels:
                raise UserError(f"frangi: training case {c} has no label")
            files[("train", c)] = _identity(_image_path(images_dir, c, ending)) + _identity(labels[c])
        for c in job.targets:
            files[("target", c)] = _identity(_image_path(target_images_dir, c, ending))
    records, todo = {}, []
    for job in jobs:
        rec = _fold_record(job, settings, files)
        done = out_root / job.name
        try:
            old = json.loads((done / "tuning.json").read_text())
        except (OSError, ValueError):
            old = None
        found = io.list_niftis(done) if done.is_dir() else {}
        if old is not None and {k: old.get(k) for k in rec} == rec and not set(job.targets) - set(found):
            records[job.name] = old
        else:
            todo.append((job, rec))
    grids: dict[str, np.ndarray] = {}
    need = sorted({c for job, _ in todo for c in job.train})
    for c in tqdm(need, desc="frangi: tune", unit="case", file=sys.stderr, disable=not need):
        image = io.read_nifti(_image_path(images_dir, c, ending), c, "image")
        label = io.read_nifti(labels[c], c, "label").data != 0
        responses, mask = _responses(image, settings)
        grids[c] = tuning.case_dice_grid(responses, label, mask, settings.thresholds)
    for job, rec in todo:
        params = tuning.select([grids[c] for c in job.train], settings.scale_sets, settings.thresholds)
        index = [tuple(s) for s in settings.scale_sets].index(params.sigmas_mm)
        out = out_root / job.name
        out_root.mkdir(parents=True, exist_ok=True)
        tmp = out_root / f".{job.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for c in tqdm(job.targets, desc=f"frangi: {job.name}", unit="case", file=sys.stderr):
                image = io.read_nifti(_image_path(target_images_dir, c, ending), c, "image")
                mask = vesselness.brain_mask(image.data, image.spacing) if settings.brain_mask else None
                img = vesselness.normalise(image.data, mask)
                resp = vesselness.frangi_response(img, image.spacing, settings.scale_sets[index], settings.bright)
                seg = tuning.segment(resp, params.threshold, mask).astype(np.uint8)
                geom = nib.load(str(refs[c])) if c in refs else nib.load(str(_image_path(target_images_dir, c, ending)))
                out_img = nib.Nifti1Image(seg, geom.affine, geom.header)
                out_img.set_data_dtype(np.uint8)
                nib.save(out_img, str(tmp / f"{c}.nii.gz"))
            rec = {**rec, "params": params.as_dict()}
            (tmp / "tuning.json").write_text(json.dumps(rec, indent=1))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        records[job.name] = rec
    preds = {}
    for job in jobs:
        found = io.list_niftis(out_root / job.name)
        for c in job.targets:
            preds[c] = io.PredFiles(seg=found[c])
    summary = [{"fold": job.name, "n_train": len(job.train), "n_targets": len(job.targets),
                "sigmas_mm": " ".join(f"{s:g}" for s in records[job.name]["params"]["sigmas_mm"]),
                "threshold": records[job.name]["params"]["threshold"],
                "train_dice": records[job.name]["params"]["train_dice"]} for job in jobs]
    return preds, summary
