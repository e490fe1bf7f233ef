"""All metrics of one case: voxel, cluster, surface, lesion-wise, at each threshold and
cluster-size filter, in each region.

The reference-side work (labels, surfaces) is done once per region and reused for every threshold
of the sweep; both masks are cropped to a box holding every voxel either side can have in that
region, which changes no metric (everything outside is background on both sides).

Regions (``region_mode``): ``majority`` (default) gives each cluster of either mask to the one
region holding most of its voxels (``nnunet_pvs.cluster_regions.majority_regions``; ties to the region listed
first), so a cluster is counted once and per-region counts add up to the whole-brain count
(SHiVAi; Boutinaud et al. 2021). ``cut`` restricts both masks voxel-wise to the region, so a
cluster crossing a border is cut there (as the EPVS 2024 evaluation does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from nnunet_pvs.evaluation import clusters as cl
from nnunet_pvs.evaluation import lesion_metrics as lm
from nnunet_pvs.evaluation import protocols as proto
from nnunet_pvs.evaluation import surface_dice as nsd
from nnunet_pvs.evaluation import surface_distance as sd
from nnunet_pvs.cluster_regions import majority_regions
from nnunet_pvs.evaluation.voxel_metrics import voxel_metrics

# Columns of per_case.csv in order (the first 13 are the papers' core metrics).
CASE_METRICS = [
    "dice", "sensitivity", "ppv", "cluster_tpr", "cluster_ppv", "cluster_dice",
    "n_ref_clusters", "n_pred_clusters", "ref_volume_mm3", "pred_volume_mm3",
    "abs_volume_diff_mm3", "hd95_mm", "cluster_hd95_mm", "ref_detection_rate",
    "cluster_tp", "cluster_fp", "cluster_fn", "ref_clusters_detected",
    "tp_voxels", "fp_voxels", "fn_voxels",
    "iou", "hausdorff_mm", "surface_dice", "surface_dice_voxels", "rq", "sq", "pq", "lesion_dice",
]
# Metrics against a noise-free truth (``truth`` argument): prefixed truth_ (prediction vs truth)
# and rater_truth_ (reference vs truth).
TRUTH_METRICS = ["dice", "sensitivity", "ppv", "cluster_tpr", "cluster_ppv", "cluster_dice", "surface_dice"]
REGION_MODES = ("majority", "cut")


@dataclass(frozen=True)
class Options:
    """What to compute for each case."""

    threshold: float = 0.5                     # binarisation of probability maps for per_case.csv
    thresholds: tuple[float, ...] = ()         # sweep (probability inputs only)
    min_cluster_sizes: tuple[int, ...] = (0,)  # clusters of <= s voxels removed (asymmetric rule)
    connectivity: int = 26
    rule: cl.MatchRule = field(default_factory=cl.MatchRule)
    surface_connectivity: int = 6              # neighbourhood defining surface voxels
    nsd_tolerance: float = 1.0                 # surface Dice tolerance, mm
    region_mode: str = "majority"              # "majority" or "cut"
    size_groups: lm.SizeGroups | None = None
    protocols: tuple[str, ...] = ()            # names in protocols.PROTOCOL_METRICS

    @property
    def metrics(self) -> list[str]:
        """Columns of per_case.csv after the keys, for these options."""
        return CASE_METRICS + [c for p in self.protocols for c in proto.PROTOCOL_METRICS[p]]


def bbox(mask: np.ndarray, pad: int = 1) -> tuple[slice, ...]:
    """Bounding box of a mask, padded and clipped to the image; a 1-voxel box if the mask is empty."""
    if not mask.any():
        return tuple(slice(0, 1) for _ in mask.shape)
    out = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        nz = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(0, nz[0] - pad), min(mask.shape[ax], nz[-1] + 1 + pad)))
    return tuple(out)


class _Side:
    """Labels, sizes and per-cluster surface points of one binary mask."""

    def __init__(self, mask: np.ndarray, spacing, connectivity: int, surface_connectivity: int = 6):
        self.mask = mask = np.ascontiguousarray(mask, dtype=bool)
        self.labels, self.n = cl.label(mask, connectivity)
        self.index = np.flatnonzero(mask)
        lab = self.labels.ravel()
        at = lab[self.index]
        self.sizes = np.bincount(at, minlength=self.n + 1)[: self.n + 1]
        sidx = self.index[sd.surface_of(mask, self.index, surface_connectivity)]
        self.points = np.stack(np.unravel_index(sidx, mask.shape), axis=1) * np.asarray(spacing, float)
        self.groups = sd.group_points(self.points, lab[sidx], self.n)
        # C-order flat index of each cluster's first voxel (label order of a raster scan)
        self.first_index = np.zeros(self.n + 1, np.int64)
        u, first = np.unique(at, return_index=True)
        self.first_index[u] = self.index[first]
        self.elements = nsd.surface_elements(mask, spacing, self.index)  # area-weighted surface (Nikolov)

    @cached_property
    def point_tree(self):
        """k-d tree of the surface voxel positions (built once, reused over a threshold sweep)."""
        from scipy.spatial import cKDTree

        return cKDTree(self.points) if len(self.points) else None

    @cached_property
    def element_tree(self):
        """k-d tree of the surface element positions."""
        from scipy.spatial import cKDTree

        return cKDTree(self.elements[0]) if len(self.elements[0]) else None


def evaluate_pair(ref: "_Side", pred_mask: np.ndarray, spacing, opts: Options,
                  soft_volume_vox: float | None = None) -> tuple[dict, list, tuple, list]:
    """Metrics of one binary prediction against a prepared reference (same cropped grid).

    ``soft_volume_vox``: sum of the probabilities >= threshold (VALDO's volume on soft maps).
    Returns the per-case row, size-filter rows, (predicted, reference) sizes in mm3 of the TP
    predicted clusters matched to exactly one reference cluster, and size-group rows.
    """
    vv = float(np.prod(spacing))
    pred = _Side(pred_mask, spacing, opts.connectivity, opts.surface_connectivity)
    m = cl.match_clusters(ref.labels, ref.n, pred.labels, pred.n, opts.rule,
                          ref_sizes=ref.sizes, ref_index=ref.index, pred_sizes=pred.sizes)
    row = voxel_metrics(ref.mask, pred.mask, vv)
    tp, fp, fn = row["tp_voxels"], row["fp_voxels"], row["fn_voxels"]
    row["iou"] = 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn)
    row.update(cl.cluster_metrics(m))
    row.update(sd.surface_metrics(ref.points, pred.points, opts.nsd_tolerance, ref.point_tree))
    row["surface_dice"] = nsd.surface_dice_elements(*ref.elements, *pred.elements, opts.nsd_tolerance,
                                                    tree_a=ref.element_tree)
    sel = m.matched
    row["cluster_hd95_mm"] = sd.cluster_hd95(ref.groups, pred.groups, m.pair_ref[sel],
                                             m.pair_pred[sel], ref.n > 0, pred.n > 0)
    o2o = m.matched if opts.rule.kind == "one-to-one" else cl.one_to_one(m, 0.0)
    row.update(lm.panoptic(m, o2o))
    for p in opts.protocols:
        if p == "valdo":
            vol = pred.mask.sum() if soft_volume_vox is None else soft_volume_vox
            row.update(proto.valdo(m, ref.first_index, tp + fn, vol, vv))
        elif p == "epvs":
            row.update(proto.epvs(m, tp, tp + fn, tp + fp))
        elif p == "shivai":
            row.update(proto.shivai(m, tp, fp, fn))
    size_rows = [cl.size_filtered_metrics(m, s) for s in opts.min_cluster_sizes]
    ps, rs = cl.size_pairs(m)
    groups = lm.size_group_rows(m, o2o, opts.size_groups, vv) if opts.size_groups else []
    return row, size_rows, (ps * vv, rs * vv), groups


def _region_masks(mask: np.ndarray, regions: dict[str, np.ndarray], opts: Options) -> dict[str, np.ndarray]:
    """``mask`` split into the regions: cut voxel-wise, or whole clusters by majority."""
    if opts.region_mode == "cut":
        return {name: mask & r for name, r in regions.items()}
    labels, n = cl.label(mask, opts.connectivity)
    names = majority_regions(labels, n, regions)
    out = {}
    for name in regions:
        keep = names == name
        keep[0] = False
        out[name] = keep[labels]
    return out


def evaluate_case(case: str, ref: np.ndarray, pred: np.ndarray, spacing, opts: Options,
                  regions: dict[str, np.ndarray] | None = None, truth: np.ndarray | None = None) -> dict:
    """Every metric of one case.

    ``ref``: boolean mask. ``pred``: boolean mask or float probability map (then binarised at
    ``opts.threshold`` for per_case rows and at each of ``opts.thresholds`` for the sweep, with
    ``p >= t``). ``regions``: name -> boolean mask (see the module docstring for how clusters are
    given to regions). ``truth``: optional noise-free truth; per_case rows then also hold
    ``truth_<metric>`` (prediction vs truth) and ``rater_truth_<metric>`` (reference vs truth).
    Returns lists of rows for the CSVs.
    """
    if opts.region_mode not in REGION_MODES:
        raise ValueError(f"region mode must be one of {REGION_MODES}, got {opts.region_mode!r}")
    regions = regions or {}
    is_prob = pred.dtype != bool
    thr_all = sorted(set(opts.thresholds) | {opts.threshold}) if is_prob else [math.nan]
    metrics = opts.metrics
    out = {"per_case": [], "thresholds": [], "cluster_sizes": [], "size_pairs": [], "size_groups": []}
    ref_by_region = {"whole": ref, **_region_masks(ref, regions, opts)} if regions else {"whole": ref}
    any_pred = pred >= min(thr_all) if is_prob else pred
    if regions and opts.region_mode == "majority":
        # a predicted cluster at any threshold lies inside one cluster of the loosest mask
        lab_any, n_any = cl.label(any_pred, opts.connectivity)
    boxes, sides = {}, {}
    for region, r in ref_by_region.items():
        if region == "whole":
            universe = any_pred
        elif opts.region_mode == "cut":
            universe = any_pred & regions[region]
        else:
            touch = np.zeros(n_any + 1, bool)
            touch[lab_any[regions[region] & (lab_any > 0)]] = True
            touch[0] = False
            universe = touch[lab_any]
        boxes[region] = box = bbox(r | universe)
        sides[region] = _Side(r[box], spacing, opts.connectivity, opts.surface_connectivity)
    for t in thr_all:
        pm = (pred >= t) if is_prob else pred
        pred_by_region = {"whole": pm, **_region_masks(pm, regions, opts)} if regions else {"whole": pm}
        for region in ref_by_region:
            p_mask, box, ref_side = pred_by_region[region], boxes[region], sides[region]
            pc = np.ascontiguousarray(p_mask[box])
            soft = float(pred[box][pc].sum()) if is_prob else None
            row, size_rows, (ps, rs), groups = evaluate_pair(ref_side, pc, spacing, opts, soft)
            key = {"case": case, "region": region, "threshold": t}
            if (not is_prob) or t == opts.threshold:
                out["per_case"].append({**key, **{k: row[k] for k in metrics}})
                out["size_groups"] += [{**key, **g} for g in groups]
            if is_prob and t in opts.thresholds:
                out["thresholds"] += [{**key, "metric": k, "value": row[k]} for k in metrics]
            out["cluster_sizes"] += [{**key, **s} for s in size_rows]
            out["size_pairs"] += [{**key, "pred_size_mm3": a, "ref_size_mm3": b} for a, b in zip(ps, rs)]
    order = {name: i for i, name in enumerate(ref_by_region)}
    for k in ("per_case", "thresholds", "cluster_sizes", "size_pairs", "size_groups"):
        out[k].sort(key=lambda row: (order[row["region"]], -math.inf if math.isnan(row["threshold"])
                                     else row["threshold"]))
    if truth is not None:
        _add_truth(out, case, ref, pred, truth, spacing, opts, regions)
    return out


def _add_truth(out: dict, case, ref, pred, truth, spacing, opts: Options, regions) -> None:
    """Prediction-vs-truth and rater-vs-truth columns of the per_case rows."""
    simple = replace(opts, thresholds=(), min_cluster_sizes=(0,), size_groups=None, protocols=())
    vs_pred = evaluate_case(case, truth, pred, spacing, simple, regions)["per_case"]
    vs_rater = evaluate_case(case, truth, ref, spacing, simple, regions)["per_case"]
    by_region = {r["region"]: (a, r) for a, r in zip(vs_pred, vs_rater)}
    for row in out["per_case"]:
        a, r = by_region[row["region"]]
        row.update({f"truth_{k}": a[k] for k in TRUTH_METRICS})
        row.update({f"rater_truth_{k}": r[k] for k in TRUTH_METRICS})
