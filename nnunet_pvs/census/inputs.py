"""Finding and pairing the census inputs: predictions, optional images and region maps, threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation import io

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
    # found once for the whole cohort by gather_cases (one listing per folder, not one per subject)
    region_files: tuple[tuple[str | None, Path], ...] = ()
    channels: tuple[Path, ...] = ()  # every image file of the case (CASE_0000, CASE_0001, ...)

    @property
    def input_files(self) -> list[Path]:
        """Every file the subject's result depends on (for resuming: see nnunet_pvs.resume)."""
        files = [self.pred.seg, self.pred.npz, self.pred.npz.with_suffix(".pkl") if self.pred.npz else None,
                 *(self.channels or (self.image,)), *(p for _, p in self.region_files)]
        return [p for p in files if p is not None]


def find_image(folder: Path, case: str) -> Path | None:
    """``CASE_0000.nii.gz`` (nnU-Net's first channel), else ``CASE.nii.gz`` (or ``.nii``)."""
    for stem in (f"{case}_0000", case):
        for suf in io.NIFTI_SUFFIXES:
            p = folder / f"{stem}{suf}"
            if p.is_file():
                return p
    return None


def _channel_split(cid: str) -> tuple[str, int | None]:
    """``CASE_dddd`` -> (CASE, dddd), nnU-Net's channel suffix; anything else -> (id, None)."""
    if len(cid) > 5 and cid[-5] == "_" and cid[-4:].isdigit():
        return cid[:-5], int(cid[-4:])
    return cid, None


def _image_owner(path: Path, cases: set[str]) -> str | None:
    """The predicted case an image file belongs to (``CASE_dddd`` or ``CASE``), or None."""
    cid = io.case_id(path)
    if cid is None:
        return None
    if cid in cases:
        return cid
    base, channel = _channel_split(cid)
    return base if channel is not None and base in cases else None


def list_images(folder: Path) -> dict[str, list[Path]]:
    """id -> image files of a folder of scans, as :func:`find_image` would pick them, for the whole
    cohort in one listing: the channels ``CASE_0000``, ``CASE_0001``, ... in order, else the single
    ``CASE.nii.gz``; ``.nii.gz`` before ``.nii`` for the same name."""
    channels: dict[str, dict[int, Path]] = {}
    plain: dict[str, Path] = {}
    for p in sorted(Path(folder).iterdir(), key=lambda q: (not q.name.endswith(".nii.gz"), q.name)):
        cid = io.case_id(p)
        if cid is None or p.name.endswith(".npz") or not p.is_file():
            continue
        plain.setdefault(cid, p)
        base, channel = _channel_split(cid)
        if channel is not None:
            channels.setdefault(base, {}).setdefault(channel, p)
    out = {c: [p] for c, p in plain.items()}
    out.update({c: [chans[k] for k in sorted(chans)] for c, chans in channels.items() if 0 in chans})
    return out


def nnunet_image_ids(folder: Path) -> list[str]:
    """The case ids nnUNetv2_predict finds in a folder of scans (``CASE_dddd.nii.gz`` -> CASE, sorted),
    so a census part splits the cohort exactly as ``nnUNetv2_predict -num_parts`` does; a file without
    a channel suffix counts as its own id (the census accepts ``CASE.nii.gz`` images)."""
    ids = set()
    for p in Path(folder).iterdir():
        cid = io.case_id(p)
        if cid is not None and not p.name.endswith(".npz") and p.is_file():
            ids.add(_channel_split(cid)[0])
    return sorted(ids)


def region_owner(stem: str, ids: set[str]) -> str | None:
    """The case a region file stem belongs to: the longest id equal to the stem or followed by ``_``
    (as :func:`nnunet_pvs.evaluation.regions.owner`, found among the stem's own prefixes in a set, so
    indexing F files of N cases costs O(F), not O(F N))."""
    if stem in ids:
        return stem
    for i in range(len(stem) - 1, 0, -1):
        if stem[i] == "_" and stem[:i] in ids:
            return stem[:i]
    return None


def index_region_files(region_dir: Path, ids: set[str]) -> tuple[dict[str, list[tuple[str | None, Path]]],
                                                                   list[Path]]:
    """case -> [(region name or None for a label map, path)] in file-name order (as
    ``nnunet_pvs.evaluation.regions.region_files`` gives them), and the region files of no case."""
    index: dict[str, list[tuple[str | None, Path]]] = {}
    orphans = []
    for p in sorted(Path(region_dir).iterdir()):
        if not p.is_file() or not p.name.endswith(io.NIFTI_SUFFIXES):
            continue
        stem = io.case_id(p)
        c = region_owner(stem, ids)
        if c is None:
            orphans.append(p)
        else:
            index.setdefault(c, []).append((None, p) if stem == c else (stem[len(c) + 1:], p))
    return index, orphans


def _listing(items: list[str], limit: int = 5) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def gather_cases(pred_dir: Path, image_dir: Path | None, region_dir: Path | None, allow_missing: bool,
                 cohort_from_images: bool = False) -> tuple[list[Case], dict[str, list[str]], dict[str, list[str]]]:
    """Cases to census; predictions left out for lacking an image or region map (only with
    ``allow_missing``, else an error); images / region maps of ids that were not predicted.

    The predictions define the cohort: a prediction without its image or region map is an error
    (ids on one side only), while images and region maps of other ids (a whole dataset's
    ``imagesTs`` or ``regions/`` for a predicted subset) are simply not used, and listed.

    ``cohort_from_images`` (census parts run beside ``nnUNetv2_predict -num_parts``, whose other parts
    may not have written their predictions yet): the cohort is every scan in ``image_dir`` (and every
    prediction); a scan not predicted yet is a Case with no prediction files, which fails when censused.

    Each folder is listed once, so gathering 40,000 subjects costs seconds.
    """
    pred_dir = Path(pred_dir)
    for option, folder, holding in (("--images", image_dir, "the images"), ("--regions", region_dir,
                                                                            "the region maps")):
        if folder is not None:
            io.require_folder(folder, option, holding)
    if cohort_from_images and pred_dir.is_dir() and not any(
            io.case_id(p) is not None for p in pred_dir.iterdir()):
        preds: dict[str, io.PredFiles] = {}   # no part has finished a prediction yet
    else:
        preds = io.gather_predictions(pred_dir)
    cases = set(preds)
    images: dict[str, list[Path]] = {}
    if image_dir is not None:
        images = list_images(image_dir)
        if cohort_from_images:
            cases |= set(nnunet_image_ids(image_dir))
    missing: dict[str, list[str]] = {}
    unused: dict[str, list[str]] = {}

    def name_of(c: str) -> str:
        return str(preds[c].npz or preds[c].seg) if c in preds else c

    if image_dir is not None:
        for c in sorted(cases):
            if c not in images:
                missing.setdefault(f"no image (CASE_0000.nii.gz or CASE.nii.gz) in {image_dir} for prediction(s)",
                                   []).append(name_of(c))
        extra = sorted({str(p) for p in Path(image_dir).iterdir() if p.is_file() and io.case_id(p) is not None
                        and not p.name.endswith(".npz") and _image_owner(p, cases) is None})
        if extra:
            unused[f"image(s) in {image_dir} without a prediction"] = extra
    regions: dict[str, list[tuple[str | None, Path]]] = {}
    if region_dir is not None:
        regions, orphans = index_region_files(region_dir, cases)
        for c in sorted(cases):
            if c not in regions:
                missing.setdefault(f"no region map (CASE.nii.gz or CASE_<name>.nii.gz) in {region_dir} for "
                                   "prediction(s)", []).append(name_of(c))
        if orphans:
            unused[f"region map(s) in {region_dir} without a prediction"] = [str(p) for p in orphans]
    if missing and not allow_missing:
        what, items = next(iter(missing.items()))
        others = sum(len(v) for v in missing.values()) - len(items)
        tail = f"; and {others} prediction(s) lacking another input" if others else ""
        raise UserError(f"ids present on one side only: {what} {_listing(items)}{tail} "
                        "(--allow-missing: census only the predictions that have every input)")
    keep = sorted(c for c in cases if (image_dir is None or c in images)
                  and (region_dir is None or c in regions))
    if not keep:
        raise UserError(f"{pred_dir}: no prediction has every input (image, region map)")
    ids = tuple(sorted(cases))
    return [Case(c, preds.get(c, io.PredFiles()), images[c][0] if c in images else None, c in regions, ids,
                 tuple(regions.get(c, ())), tuple(images.get(c, ()))) for c in keep], missing, unused


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


def min_size_from_sweep(path: Path, threshold: float) -> dict:
    """``--min-size-mm3`` from the cluster-size sweep of the ``nnunet-pvs evaluate`` folder that gave the threshold.

    The size chosen is the ``min_cluster_size`` s with the highest pooled cluster Dice in region
    ``whole`` at ``threshold`` (``cluster_sizes_pooled.csv``: clusters of all cases pooled, as
    Boutinaud et al. 2021 chose threshold and size on their Figure 7 grid); on a tie (within 1e-12)
    the smallest s, i.e. the least filtering. ``evaluate`` removes clusters of **s voxels or fewer**
    (``n <= s``); census removes clusters of **volume below V** (``volume < V``). With v the voxel
    volume of the evaluated cases (``inputs.csv``), ``n <= s`` is ``n v < (s + 1) v``, so
    V = (s + 1) v: on that grid exactly the clusters evaluate kept are kept (s = 0, no filter: V = 0).
    Evaluated cases of different voxel volumes have no single V: an error asking for ``--min-size-mm3``.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    pooled_csv, inputs_csv = folder / "cluster_sizes_pooled.csv", folder / "inputs.csv"
    hint = "; give --min-size-mm3 yourself (0 keeps every cluster)"
    for f in (pooled_csv, inputs_csv):
        if not f.is_file():
            raise UserError(f"{folder}: no {f.name}, so the cluster-size filter chosen by the evaluation "
                            f"cannot be taken over (an evaluation by an older nnunet-pvs?){hint}")
    try:
        pooled = pd.read_csv(pooled_csv, dtype={"region": str})
        spacings = pd.read_csv(inputs_csv, dtype={"case": str, "spacing": str})["spacing"]
        sel = pooled[(pooled["region"] == SWEEP_REGION)
                     & np.isclose(pd.to_numeric(pooled["threshold"], errors="coerce"), threshold, rtol=0, atol=1e-9)]
        dice = pd.to_numeric(sel["cluster_dice"], errors="coerce")
        sizes = pd.to_numeric(sel["min_cluster_size"], errors="coerce")
        volumes = sorted({float(np.prod([float(v) for v in str(sp).split("x")])) for sp in spacings})
    except (KeyError, ValueError, pd.errors.ParserError) as e:
        raise UserError(f"{folder}: cannot read the cluster-size sweep ({type(e).__name__}: {e}){hint}") from None
    ok = dice.notna() & sizes.notna()
    if not ok.any():
        raise UserError(f"{pooled_csv}: no defined cluster Dice in region '{SWEEP_REGION}' at threshold "
                        f"{threshold:g}{hint}")
    best = float(dice[ok].max())
    s = int(sizes[ok & (dice >= best - 1e-12)].min())
    if not volumes or not all(v > 0 for v in volumes):
        raise UserError(f"{inputs_csv}: no usable voxel spacing{hint}")
    if volumes[-1] > volumes[0] * (1 + 1e-6):
        raise UserError(f"{inputs_csv}: the evaluated cases have {len(volumes)} different voxel volumes "
                        f"({', '.join(f'{v:g}' for v in volumes[:5])} mm3), so the filter of {s} voxel(s) "
                        f"is no single volume{hint}")
    v = volumes[0]
    return {"value": (s + 1) * v if s > 0 else 0.0, "source": "sweep", "sweep": str(pooled_csv.resolve()),
            "min_cluster_size_voxels": s, "voxel_volume_mm3": v, "threshold": threshold,
            "metric": "cluster_dice", "region": SWEEP_REGION, "pooled_cluster_dice": best,
            "rule": f"evaluate removes clusters of <= {s} voxel(s); census removes clusters below "
                    f"{s + 1} x {v:g} mm3" if s > 0 else "no size filter was best (s = 0)"}


def check_number(name: str, value: float, low: float, high: float = math.inf, low_open: bool = False) -> None:
    ok = (value > low if low_open else value >= low) and value <= high and np.isfinite(value)
    if not ok:
        rng = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise UserError(f"{name} must be in {rng}, got {value:g}")
