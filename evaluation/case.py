"""All metrics of one case: voxel, cluster, surface, at each threshold and cluster-size filter,
in each region. The reference-side work (labels, surfaces) is done once per region and reused
for every threshold of the sweep; both masks are cropped to the bounding box of their union,
which changes no metric (everything outside is background on both sides).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from nnunet_pvs.evaluation import clusters as cl
from nnunet_pvs.evaluation import surface_distance as sd
from nnunet_pvs.evaluation.voxel_metrics import voxel_metrics

# Columns of per_case.csv in order (the first 13 are fixed by issue 5).
CASE_METRICS = [
    "dice", "sensitivity", "ppv", "cluster_tpr", "cluster_ppv", "cluster_dice",
    "n_ref_clusters", "n_pred_clusters", "ref_volume_mm3", "pred_volume_mm3",
    "abs_volume_diff_mm3", "hd95_mm", "cluster_hd95_mm", "ref_detection_rate",
    "cluster_tp", "cluster_fp", "cluster_fn", "ref_clusters_detected",
    "tp_voxels", "fp_voxels", "fn_voxels",
]


@dataclass(frozen=True)
class Options:
    """What to compute for each case."""

    threshold: float = 0.5                     # binarisation of probability maps for per_case.csv
    thresholds: tuple[float, ...] = ()         # sweep (probability inputs only)
    min_cluster_sizes: tuple[int, ...] = (0,)  # clusters of <= s voxels removed (asymmetric rule)
    connectivity: int = 26
    rule: cl.MatchRule = field(default_factory=cl.MatchRule)


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

    def __init__(self, mask: np.ndarray, spacing, connectivity: int):
        self.mask = mask = np.ascontiguousarray(mask, dtype=bool)
        self.labels, self.n = cl.label(mask, connectivity)
        self.index = np.flatnonzero(mask)
        lab = self.labels.ravel()
        self.sizes = np.bincount(lab[self.index], minlength=self.n + 1)[: self.n + 1]
        sidx = self.index[sd.surface_of(mask, self.index)]
        self.points = np.stack(np.unravel_index(sidx, mask.shape), axis=1) * np.asarray(spacing, float)
        self.groups = sd.group_points(self.points, lab[sidx], self.n)


def evaluate_pair(ref: "_Side", pred_mask: np.ndarray, spacing, opts: Options) -> tuple[dict, list, tuple]:
    """Metrics of one binary prediction against a prepared reference (same cropped grid)."""
    vv = float(np.prod(spacing))
    pred = _Side(pred_mask, spacing, opts.connectivity)
    m = cl.match_clusters(ref.labels, ref.n, pred.labels, pred.n, opts.rule,
                          ref_sizes=ref.sizes, ref_index=ref.index, pred_sizes=pred.sizes)
    row = voxel_metrics(ref.mask, pred.mask, vv)
    row.update(cl.cluster_metrics(m))
    row["hd95_mm"] = sd.hd95_points(ref.points, pred.points)
    sel = m.matched
    row["cluster_hd95_mm"] = sd.cluster_hd95(ref.groups, pred.groups, m.pair_ref[sel],
                                             m.pair_pred[sel], ref.n > 0, pred.n > 0)
    size_rows = [cl.size_filtered_metrics(m, s) for s in opts.min_cluster_sizes]
    ps, rs = cl.size_pairs(m)
    return row, size_rows, (ps * vv, rs * vv)


def evaluate_case(case: str, ref: np.ndarray, pred: np.ndarray, spacing, opts: Options,
                  regions: dict[str, np.ndarray] | None = None) -> dict:
    """Every metric of one case.

    ``ref``: boolean mask. ``pred``: boolean mask or float probability map (then binarised at
    ``opts.threshold`` for per_case rows and at each of ``opts.thresholds`` for the sweep, with
    ``p >= t``). ``regions``: name -> boolean mask; both masks are restricted to each region
    (clusters crossing a region border are cut there). Returns lists of rows for the CSVs.
    """
    is_prob = pred.dtype != bool
    thr_all = sorted(set(opts.thresholds) | {opts.threshold}) if is_prob else [math.nan]
    out = {"per_case": [], "thresholds": [], "cluster_sizes": [], "size_pairs": []}
    for region, rmask in [("whole", None), *(regions or {}).items()]:
        r = ref if rmask is None else ref & rmask
        p = pred if rmask is None else (np.where(rmask, pred, 0) if is_prob else pred & rmask)
        any_pred = p >= min(thr_all) if is_prob else p
        box = bbox(r | any_pred)
        r, p = np.ascontiguousarray(r[box]), p[box]
        ref_side = _Side(r, spacing, opts.connectivity)
        for t in thr_all:
            pm = (p >= t) if is_prob else p
            row, size_rows, (ps, rs) = evaluate_pair(ref_side, pm, spacing, opts)
            key = {"case": case, "region": region, "threshold": t}
            if (not is_prob) or t == opts.threshold:
                out["per_case"].append({**key, **{k: row[k] for k in CASE_METRICS}})
            if is_prob and t in opts.thresholds:
                out["thresholds"] += [{**key, "metric": k, "value": row[k]} for k in CASE_METRICS]
            out["cluster_sizes"] += [{**key, **s} for s in size_rows]
            out["size_pairs"] += [{**key, "pred_size_mm3": a, "ref_size_mm3": b}
                                  for a, b in zip(ps, rs)]
    return out
