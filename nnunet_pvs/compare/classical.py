"""The classical baseline as a model of ``compare``: a filter suite tuned per fold on training cases, cached.

Model specs: ``classical`` (the whole suite: Frangi, Sato, top-hat; ``nnunet_pvs.classical.bank``),
``classical:sato`` or ``classical:sato,tophat`` (the suite restricted to those families) and
``frangi`` (the suite restricted to Frangi, compare's baseline before the suite; same as
``classical:frangi``). For every fold the filter, its scales and the threshold are chosen on that
fold's *training* cases (from ``splits_final.json``) and applied unchanged to the cases the fold is
scored on (validation, or Cai's test group); with ``--test-set`` they are tuned on all labelled
training cases. The filters read channel 0 of ``imagesTr``; bright or dark ridges follow that
channel's name in dataset.json (T2 -> bright, T1/FLAIR -> dark) unless ``--classical-ridges``
says otherwise. Predictions are NIfTI masks with the reference's geometry, in
``<predictions>/<model>/<fold>/`` beside a ``tuning.json``; a folder is reused while its
settings, cases and images are unchanged.

Cost: every filter of the suite runs once per training case (its response is reused for every
threshold), the chosen one once more per scored case. On a ``phantom --size small`` T2w fold the
suite takes about 1.4 times Frangi alone (docs/compare.md has the figures).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from nnunet_pvs.classical import bank, tuning, vesselness
from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation import io
from nnunet_pvs.staging import replace_folder, staging_name

RIDGES = ("auto", "bright", "dark")


@dataclass(frozen=True)
class FoldJob:
    name: str                 # "fold_0", ... or "all"
    train: tuple[str, ...]
    targets: tuple[str, ...]


@dataclass(frozen=True)
class ClassicalSettings:
    bright: bool
    families: tuple[str, ...] = bank.FAMILIES
    brain_mask: bool = True

    @property
    def filters(self) -> tuple[bank.Filter, ...]:
        return bank.suite(self.families)

    @property
    def thresholds(self) -> list[tuple[float, ...]]:
        """One threshold grid per filter of ``filters``."""
        return [bank.DEFAULT_THRESHOLDS[f.family] for f in self.filters]

    def as_dict(self) -> dict:
        return {"ridges": "bright" if self.bright else "dark", "brain_mask": self.brain_mask,
                "filters": [str(f) for f in self.filters],
                "thresholds": {fam: list(bank.DEFAULT_THRESHOLDS[fam]) for fam in self.families}}


def ridge_polarity(raw_dataset_dir: Path, ridges: str = "auto") -> bool:
    """True for bright ridges; ``auto`` reads channel 0's name from dataset.json."""
    if ridges not in RIDGES:
        raise UserError(f"--classical-ridges {ridges!r}: choose auto, bright or dark")
    if ridges != "auto":
        return ridges == "bright"
    dj = raw_dataset_dir / "dataset.json"
    try:
        channels = json.loads(dj.read_text()).get("channel_names") or {}
    except (OSError, ValueError):
        raise UserError(f"{dj}: cannot read the channel names for the classical filters; pass "
                        "--classical-ridges bright|dark") from None
    name = channels.get("0", "")
    pol = vesselness.ridge_polarity(name)
    if pol is None:
        raise UserError(f"{dj}: channel 0 is {name!r}, neither T2- nor T1/FLAIR-like; pass --classical-ridges "
                        "(or --frangi-ridges) bright (CSF bright, T2w) or dark (CSF dark, T1w)")
    return pol == "bright"


def _image_path(images_dir: Path, case: str, ending: str, label: str) -> Path:
    p = images_dir / f"{case}_0000{ending}"
    if not p.is_file():
        raise UserError(f"{label}: image {p} not found")
    return p


def _identity(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def _prepared(image: io.Volume, settings: ClassicalSettings) -> tuple[np.ndarray, np.ndarray | None]:
    """The normalised image the filters see, and the brain mask they are thresholded in."""
    mask = vesselness.brain_mask(image.data, image.spacing) if settings.brain_mask else None
    return vesselness.normalise(image.data, mask), mask


def _fold_record(job: FoldJob, settings: ClassicalSettings, files: dict[str, list]) -> dict:
    return {"settings": settings.as_dict(), "train": list(job.train), "targets": list(job.targets),
            "train_files": {c: files[("train", c)] for c in job.train},
            "target_files": {c: files[("target", c)] for c in job.targets}}


def summary_row(fold: str, n_train: int, n_targets: int, choice: tuning.Choice,
                families=bank.FAMILIES) -> dict:
    """One row of ``classical_tuning.csv``: the filter chosen for a fold and each family's best."""
    row = {"fold": fold, "n_train": n_train, "n_targets": n_targets, "filter": choice.filter.family,
           "scales_mm": choice.filter.scale_text, "threshold": choice.threshold, "train_dice": choice.train_dice}
    row.update({f"best_train_dice_{fam}": choice.family_dice.get(fam, float("nan")) for fam in families})
    return row


def describe_suite(bright: bool, brain_mask: bool) -> str:
    """What the filters look for and where, for the report's notes."""
    return (f"scikit-image Frangi and Sato vesselness and {'white' if bright else 'black'} top-hat, "
            f"{'bright' if bright else 'dark'} ridges{', inside a brain mask from the image' if brain_mask else ''}")


def describe_choices(rows: list[dict]) -> str:
    """The filters chosen over the folds in one line, e.g. ``sato 0.5 mm (folds 0-2); tophat r=2 mm (fold 3)``."""
    chosen: dict[str, list[str]] = {}
    for r in rows:
        chosen.setdefault(f"{r['filter']} {r['scales_mm']} mm", []).append(str(r["fold"]).replace("fold_", ""))
    parts = []
    for name, folds in chosen.items():
        if folds == ["all"]:
            parts.append(name)
        else:
            parts.append(f"{name} (fold{'s' if len(folds) > 1 else ''} {', '.join(folds)})")
    return "; ".join(parts)


def run_classical(jobs: list[FoldJob], images_dir: Path, labels: dict[str, Path], target_images_dir: Path,
                  refs: dict[str, Path], out_root: Path, settings: ClassicalSettings, ending: str = ".nii.gz",
                  label: str = "classical"):
    """Tune per job on its training cases, segment its targets. Returns (case -> PredFiles,
    one ``summary_row`` per job)."""
    out_root = Path(out_root)
    files = {}
    for job in jobs:
        for c in job.train:
            if c not in labels:
                raise UserError(f"{label}: training case {c} has no label")
            files[("train", c)] = _identity(_image_path(images_dir, c, ending, label)) + _identity(labels[c])
        for c in job.targets:
            files[("target", c)] = _identity(_image_path(target_images_dir, c, ending, label))
    records, todo = {}, []
    for job in jobs:
        rec = _fold_record(job, settings, files)
        done = out_root / job.name
        try:
            old = json.loads((done / "tuning.json").read_text())
        except (OSError, ValueError):
            old = None
        found = io.list_niftis(done) if done.is_dir() else {}
        fresh = old is not None and "choice" in old and {k: old.get(k) for k in rec} == rec
        if fresh and not set(job.targets) - set(found):
            records[job.name] = old
        else:
            todo.append((job, rec))
    filters, thresholds = settings.filters, settings.thresholds
    grids: dict[str, list[np.ndarray]] = {}
    need = sorted({c for job, _ in todo for c in job.train})
    for c in tqdm(need, desc=f"{label}: tune", unit="case", file=sys.stderr, disable=not need):
        image = io.read_nifti(_image_path(images_dir, c, ending, label), c, "image")
        truth = io.read_nifti(labels[c], c, "label").data != 0
        img, mask = _prepared(image, settings)
        grids[c] = tuning.case_dice_grid(bank.responses(filters, img, image.spacing, settings.bright),
                                         truth, mask, thresholds)
    for job, rec in todo:
        choice = tuning.select([grids[c] for c in job.train], filters, thresholds)
        out = out_root / job.name
        out_root.mkdir(parents=True, exist_ok=True)
        tmp = staging_name(out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for c in tqdm(job.targets, desc=f"{label}: {job.name} ({choice.filter})", unit="case",
                          file=sys.stderr):
                image = io.read_nifti(_image_path(target_images_dir, c, ending, label), c, "image")
                img, mask = _prepared(image, settings)
                resp = bank.response(choice.filter, img, image.spacing, settings.bright)
                seg = tuning.segment(resp, choice.threshold, mask).astype(np.uint8)
                geom = (nib.load(str(refs[c])) if c in refs
                        else nib.load(str(_image_path(target_images_dir, c, ending, label))))
                out_img = nib.Nifti1Image(seg, geom.affine, geom.header)
                out_img.set_data_dtype(np.uint8)
                nib.save(out_img, str(tmp / f"{c}.nii.gz"))
            rec = {**rec, "choice": choice.as_dict()}
            (tmp / "tuning.json").write_text(json.dumps(rec, indent=1))
            replace_folder(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        records[job.name] = rec
    preds = {}
    for job in jobs:
        found = io.list_niftis(out_root / job.name)
        for c in job.targets:
            preds[c] = io.PredFiles(seg=found[c])
    summary = [summary_row(job.name, len(job.train), len(job.targets),
                           tuning.Choice.from_dict(records[job.name]["choice"]), settings.families)
               for job in jobs]
    return preds, summary
