"""Finding and pairing the census inputs: predictions, optional images and region maps, threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation import io
from nnunet_pvs.evaluation.regions import owner, region_files

SWEEP_METRIC = "dice"
SWEEP_REGION = "whole"


@dataclass(frozen=True)
class Case:
    """Input files of one subject."""

    case: str
    pred: io.PredFiles
    image: Path | None = None
    has_regions: bool = False
    all_ids: tuple[str, ...] = ()  # every predicted id: region files go to the longest id they match


def find_image(folder: Path, case: str) -> Path | None:
    """``CASE_0000.nii.gz`` (nnU-Net's first channel), else ``CASE.nii.gz`` (or ``.nii``)."""
    for stem in (f"{case}_0000", case):
        for suf in io.NIFTI_SUFFIXES:
            p = folder / f"{stem}{suf}"
            if p.is_file():
                return p
    return None


def _image_owner(path: Path, cases: set[str]) -> str | None:
    """The predicted case an image file belongs to (``CASE_dddd`` or ``CASE``), or None."""
    cid = io.case_id(path)
    if cid is None:
        return None
    if cid in cases:
        return cid
    if len(cid) > 5 and cid[-5] == "_" and cid[-4:].isdigit() and cid[:-5] in cases:
        return cid[:-5]
    return None


def _listing(items: list[str], limit: int = 5) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def gather_cases(pred_dir: Path, image_dir: Path | None, region_dir: Path | None,
                 allow_missing: bool) -> tuple[list[Case], dict[str, list[str]], dict[str, list[str]]]:
    """Cases to census; predictions left out for lacking an image or region map (only with
    ``allow_missing``, else an error); images / region maps of ids that were not predicted.

    The predictions define the cohort: a prediction without its image or region map is an error
    (ids on one side only), while images and region maps of other ids (a whole dataset's
    ``imagesTs`` or ``regions/`` for a predicted subset) are simply not used, and listed.
    """
    preds = io.gather_predictions(pred_dir)
    for role, folder in (("image", image_dir), ("region", region_dir)):
        if folder is not None and not folder.is_dir():
            raise UserError(f"{folder}: {role} folder does not exist")
    cases = set(preds)
    missing: dict[str, list[str]] = {}
    unused: dict[str, list[str]] = {}
    images: dict[str, Path] = {}
    if image_dir is not None:
        for c in sorted(cases):
            p = find_image(image_dir, c)
            if p is None:
                missing.setdefault(f"no image (CASE_0000.nii.gz or CASE.nii.gz) in {image_dir} for prediction(s)",
                                   []).append(str(preds[c].npz or preds[c].seg))
            else:
                images[c] = p
        extra = sorted({str(p) for p in image_dir.iterdir() if p.is_file() and io.case_id(p) is not None
                        and not p.name.endswith(".npz") and _image_owner(p, cases) is None})
        if extra:
            unused[f"image(s) in {image_dir} without a prediction"] = extra
    with_regions: set[str] = set()
    if region_dir is not None:
        for c in sorted(cases):
            if region_files(region_dir, c, cases):
                with_regions.add(c)
            else:
                missing.setdefault(f"no region map (CASE.nii.gz or CASE_<name>.nii.gz) in {region_dir} for "
                                   "prediction(s)", []).append(str(preds[c].npz or preds[c].seg))
        extra = sorted(str(p) for p in region_dir.iterdir() if p.is_file()
                       and p.name.endswith(io.NIFTI_SUFFIXES) and owner(io.case_id(p), cases) is None)
        if extra:
            unused[f"region map(s) in {region_dir} without a prediction"] = extra
    if missing and not allow_missing:
        what, items = next(iter(missing.items()))
        others = sum(len(v) for v in missing.values()) - len(items)
        tail = f"; and {others} prediction(s) lacking another input" if others else ""
        raise UserError(f"ids present on one side only: {what} {_listing(items)}{tail} "
                        "(--allow-missing: census only the predictions that have every input)")
    keep = sorted(c for c in cases if (image_dir is None or c in images)
                  and (region_dir is None or c in with_regions))
    if not keep:
        raise UserError(f"{pred_dir}: no prediction has every input (image, region map)")
    ids = tuple(sorted(cases))
    return [Case(c, preds[c], images.get(c), c in with_regions, ids) for c in keep], missing, unused


def threshold_from_sweep(path: Path) -> dict:
    """The threshold of an ``nnunet-pvs evaluate`` sweep with the highest mean Dice in ``whole``.

    Reads ``thresholds.csv`` (columns case, region, threshold, metric, value) of the evaluation
    folder (or that file itself); the mean is over the cases with a defined Dice at that
    threshold; among thresholds within 1e-12 of the best mean, the lowest wins.
    """
    path = Path(path)
    csv = path / "thresholds.csv" if path.is_dir() else path
    if not path.exists():
        raise UserError(f"{path}: evaluation folder does not exist")
    if not csv.is_file():
        raise UserError(f"{path}: no thresholds.csv, i.e. no threshold sweep; run `nnunet-pvs evaluate` on "
                        "probability predictions (nnUNetv2_predict --save_probabilities, or nnUNetv2_train "
                        "--npz for cross-validation) with --thresholds")
    try:
        df = pd.read_csv(csv, dtype={"case": str, "region": str, "metric": str})
    except Exception as e:
        raise UserError(f"{csv}: cannot read the threshold sweep: {e}") from None
    need = {"case", "region", "threshold", "metric", "value"}
    if not need <= set(df.columns):
        raise UserError(f"{csv}: lacks column(s) {', '.join(sorted(need - set(df.columns)))}; "
                        "expected the thresholds.csv of `nnunet-pvs evaluate`")
    sel = df[(df["region"] == SWEEP_REGION) & (df["metric"] == SWEEP_METRIC)]
    sel = sel.assign(value=pd.to_numeric(sel["value"], errors="coerce"),
                     threshold=pd.to_numeric(sel["threshold"], errors="coerce")).dropna(subset=["value", "threshold"])
    if not len(sel):
        raise UserError(f"{csv}: no defined '{SWEEP_METRIC}' values in region '{SWEEP_REGION}'")
    means = sel.groupby("threshold")["value"].agg(["mean", "count"]).sort_index()
    best = float(means["mean"].max())
    t = float(means.index[means["mean"] >= best - 1e-12][0])
    if not 0.0 < t <= 1.0:
        raise UserError(f"{csv}: best threshold {t:g} is outside (0, 1]")
    return {"value": t, "source": "sweep", "sweep": str(csv.resolve()), "metric": SWEEP_METRIC,
            "region": SWEEP_REGION, "mean_dice": best, "n_cases": int(means.loc[t, "count"]),
            "means": {f"{k:g}": float(v) for k, v in means["mean"].items()}}


def check_number(name: str, value: float, low: float, high: float = math.inf, low_open: bool = False) -> None:
    ok = (value > low if low_open else value >= low) and value <= high and np.isfinite(value)
    if not ok:
        rng = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise UserError(f"{name} must be in {rng}, got {value:g}")
