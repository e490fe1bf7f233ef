"""Cluster-level (lesion-wise) detection metrics.

Default rule from Boutinaud et al. 2021 (Front. Neuroinform., section 2.5): clusters are
26-connected components of each mask; a predicted cluster is TP if it holds at least one
reference voxel, else FP; a reference cluster is FN if it holds no predicted voxel;
TPR-CL = TP / (TP + FN), PPV-CL = TP / (TP + FP) with TP counted on the predicted side, and
Dice-CL their harmonic mean. Optional rule from the VALDO 2021 challenge: a pair of clusters
matches only if their IoU reaches a threshold (``iou:0.1``).

All counting goes through one table of overlapping (reference label, predicted label) pairs built
with a single ``np.unique`` over the voxels where both masks are set, so there is no loop over
clusters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cc3d
import numpy as np

from nnunet_pvs.evaluation.voxel_metrics import harmonic_mean, safe_ratio


@dataclass(frozen=True)
class MatchRule:
    """How two overlapping clusters are declared a match: ``overlap`` (any shared voxel) or ``iou``."""

    kind: str = "overlap"
    threshold: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "MatchRule":
        text = text.strip().lower()
        if text in ("overlap", "any"):
            return cls("overlap", 0.0)
        if text.startswith("iou:"):
            t = float(text.split(":", 1)[1])
            if not 0.0 < t <= 1.0:
                raise ValueError(f"IoU threshold must be in (0, 1], got {t}")
            return cls("iou", t)
        raise ValueError(f"unknown match rule {text!r} (use 'overlap' or 'iou:T')")

    def __str__(self) -> str:
        return "overlap" if self.kind == "overlap" else f"iou:{self.threshold:g}"


def label(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask (cc3d): label image and number of clusters."""
    labels, n = cc3d.connected_components(np.ascontiguousarray(mask, dtype=np.uint8),
                                          connectivity=connectivity, return_N=True)
    return labels, int(n)


def sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """Voxel count of each label; index 0 is the background and is set to 0."""
    s = np.bincount(labels[labels > 0], minlength=n + 1)[: n + 1]
    s[0] = 0
    return s


@dataclass
class ClusterMatch:
    """Clusters of both masks and their overlap table; label ``i`` is row ``i`` of the size arrays."""

    n_ref: int
    n_pred: int
    ref_sizes: np.ndarray   # (n_ref + 1,) voxels
    pred_sizes: np.ndarray  # (n_pred + 1,) voxels
    pair_ref: np.ndarray    # (k,) reference label of each overlapping pair
    pair_pred: np.ndarray   # (k,) predicted label
    pair_inter: np.ndarray  # (k,) shared voxels
    matched: np.ndarray     # (k,) bool: the pair counts as a match under the rule


def match_clusters(ref_labels: np.ndarray, n_ref: int, pred_labels: np.ndarray, n_pred: int,
                   rule: MatchRule = MatchRule(), ref_sizes: np.ndarray | None = None,
                   ref_index: np.ndarray | None = None, pred_sizes: np.ndarray | None = None) -> ClusterMatch:
    """Build the overlap table of two label images (same shape) and apply the matching rule.

    Sizes and ``ref_index`` (flat indices of the reference voxels) may be passed when already
    known, e.g. when the same reference is matched against every threshold of a sweep.
    """
    rs = sizes(ref_labels, n_ref) if ref_sizes is None else ref_sizes
    ps = sizes(pred_labels, n_pred) if pred_sizes is None else pred_sizes
    idx = np.flatnonzero(ref_labels) if ref_index is None else ref_index
    r_at, p_at = ref_labels.ravel()[idx], pred_labels.ravel()[idx]
    hit = p_at > 0
    key = r_at[hit].astype(np.int64) * (n_pred + 1) + p_at[hit]
    uniq, inter = np.unique(key, return_counts=True)
    pr, pp = uniq // (n_pred + 1), uniq % (n_pred + 1)
    if rule.kind == "iou":
        iou = inter / (rs[pr] + ps[pp] - inter)
        matched = iou >= rule.threshold - 1e-12
    else:
        matched = inter > 0
    return ClusterMatch(n_ref, n_pred, rs, ps, pr, pp, inter, matched)


def counts(m: ClusterMatch, ref_keep: np.ndarray | None = None,
           pred_keep: np.ndarray | None = None) -> dict:
    """Cluster counts with optional per-label keep masks (index 0 ignored).

    TP: kept predicted clusters matched to a kept reference cluster; FP: the other kept predicted
    clusters; FN: kept reference clusters matched by no kept predicted cluster.
    """
    rk = np.ones(m.n_ref + 1, bool) if ref_keep is None else ref_keep.copy()
    pk = np.ones(m.n_pred + 1, bool) if pred_keep is None else pred_keep.copy()
    rk[0] = pk[0] = False
    sel = m.matched & rk[m.pair_ref] & pk[m.pair_pred]
    pred_hit = np.zeros(m.n_pred + 1, bool)
    pred_hit[m.pair_pred[sel]] = True
    ref_hit = np.zeros(m.n_ref + 1, bool)
    ref_hit[m.pair_ref[sel]] = True
    n_ref_kept, n_pred_kept = int(rk.sum()), int(pk.sum())
    tp = int(pred_hit.sum())
    detected = int(ref_hit.sum())
    return {"tp": tp, "fp": n_pred_kept - tp, "fn": n_ref_kept - detected,
            "ref_detected": detected, "n_ref": n_ref_kept, "n_pred": n_pred_kept}


def cluster_metrics(m: ClusterMatch) -> dict:
    """Per-case cluster metrics without size filtering (columns of per_case.csv)."""
    c = counts(m)
    both_empty = c["n_ref"] == 0 and c["n_pred"] == 0
    tpr = safe_ratio(c["tp"], c["tp"] + c["fn"], both_empty)
    ppv = safe_ratio(c["tp"], c["tp"] + c["fp"], both_empty)
    return {
        "cluster_tpr": tpr, "cluster_ppv": ppv, "cluster_dice": harmonic_mean(tpr, ppv),
        "ref_detection_rate": safe_ratio(c["ref_detected"], c["n_ref"], both_empty),
        "cluster_tp": c["tp"], "cluster_fp": c["fp"], "cluster_fn": c["fn"],
        "ref_clusters_detected": c["ref_detected"],
        "n_ref_clusters": c["n_ref"], "n_pred_clusters": c["n_pred"],
    }


def size_filtered_metrics(m: ClusterMatch, min_size: int) -> dict:
    """Boutinaud's asymmetric cluster-size filter: clusters of ``min_size`` voxels or fewer are
    removed from the reference for TPR-CL and from the prediction for PPV-CL (``0``: no filter).
    """
    rk, pk = m.ref_sizes > min_size, m.pred_sizes > min_size
    a = counts(m, ref_keep=rk)     # for TPR-CL: filtered reference, whole prediction
    b = counts(m, pred_keep=pk)    # for PPV-CL: whole reference, filtered prediction
    tpr = safe_ratio(a["tp"], a["tp"] + a["fn"], a["n_ref"] == 0 and a["n_pred"] == 0)
    ppv = safe_ratio(b["tp"], b["tp"] + b["fp"], b["n_ref"] == 0 and b["n_pred"] == 0)
    return {"min_cluster_size": min_size, "cluster_tpr": tpr, "cluster_ppv": ppv,
            "cluster_dice": harmonic_mean(tpr, ppv),
            "tpr_tp": a["tp"], "tpr_fn": a["fn"], "tpr_n_pred": a["n_pred"],
            "n_ref_clusters_kept": a["n_ref"],
            "ppv_tp": b["tp"], "ppv_fp": b["fp"], "ppv_n_ref": b["n_ref"],
            "n_pred_clusters_kept": b["n_pred"]}


def size_pairs(m: ClusterMatch) -> tuple[np.ndarray, np.ndarray]:
    """(predicted size, reference size) in voxels for each TP predicted cluster matched to exactly
    one reference cluster (Boutinaud Fig. 8 drops predicted clusters covering several)."""
    sel = m.matched
    pp, pr = m.pair_pred[sel], m.pair_ref[sel]
    n_ref_per_pred = np.bincount(pp, minlength=m.n_pred + 1)
    one = n_ref_per_pred[pp] == 1
    return m.pred_sizes[pp[one]].astype(float), m.ref_sizes[pr[one]].astype(float)


def linear_fit(x: np.ndarray, y: np.ndarray) -> dict:
    """Least-squares fit ``y = slope * x + intercept`` with R^2; NaN when fewer than 2 distinct x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 2 or np.ptp(x) == 0:
        return {"slope": math.nan, "intercept": math.nan, "r2": math.nan, "n": n}
    slope, intercept = np.polyfit(x, y, 1)
    ss_res = float(np.sum((y - (slope * x + intercept)) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2, "n": n}
