"""Cluster-level (lesion-wise) detection metrics.

Default rule from Boutinaud et al. 2021 (Front. Neuroinform., section 2.5): clusters are
26-connected components of each mask; a predicted cluster is TP if it holds at least one
reference voxel, else FP; a reference cluster is FN if it holds no predicted voxel;
TPR-CL = TP / (TP + FN), PPV-CL = TP / (TP + FP) with TP counted on the predicted side, and
Dice-CL their harmonic mean. Other rules (``--match``):

- ``iou:T``: many-to-many; every pair of clusters with IoU >= T matches (any number of partners
  on both sides). This is *not* the VALDO 2021 rule (that one is ``--protocol valdo``).
- ``one-to-one[:iou:T]``: each cluster has at most one partner; the partners maximise the summed
  IoU over the pairs with IoU >= T (``one-to-one``: IoU > 0), as panoptica's
  ``MaxBipartiteMatching``; solved with ``scipy.optimize.linear_sum_assignment`` on the pairs that
  compete, isolated pairs being matched directly.

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
    """How clusters are paired: ``overlap`` (any shared voxel), ``iou`` (many-to-many, IoU >= T)
    or ``one-to-one`` (maximum matching on IoU, pairs with IoU >= T, or IoU > 0 when T is 0)."""

    kind: str = "overlap"
    threshold: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "MatchRule":
        raw = text
        text = text.strip().lower()
        if text in ("overlap", "any"):
            return cls("overlap", 0.0)
        if text == "one-to-one":
            return cls("one-to-one", 0.0)
        for prefix, kind in (("one-to-one:iou:", "one-to-one"), ("iou:", "iou")):
            if text.startswith(prefix):
                try:
                    t = float(text[len(prefix):])
                except ValueError:
                    raise ValueError(f"--match {raw!r}: the IoU threshold must be a number") from None
                if not 0.0 < t <= 1.0:
                    raise ValueError(f"--match {raw!r}: IoU threshold must be in (0, 1], got {t:g}")
                return cls(kind, t)
        raise ValueError(f"unknown match rule {raw!r} (use 'overlap', 'iou:T', 'one-to-one' or "
                         "'one-to-one:iou:T')")

    def __str__(self) -> str:
        if self.kind == "overlap":
            return "overlap"
        if self.kind == "iou":
            return f"iou:{self.threshold:g}"
        return "one-to-one" if self.threshold == 0 else f"one-to-one:iou:{self.threshold:g}"


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

    @property
    def pair_iou(self) -> np.ndarray:
        """Intersection over union of each overlapping pair."""
        return self.pair_inter / (self.ref_sizes[self.pair_ref] + self.pred_sizes[self.pair_pred]
                                  - self.pair_inter)

    @property
    def pair_dice(self) -> np.ndarray:
        """Dice of each overlapping pair of clusters."""
        return 2.0 * self.pair_inter / (self.ref_sizes[self.pair_ref] + self.pred_sizes[self.pair_pred])


def maximum_matching(pair_ref: np.ndarray, pair_pred: np.ndarray, weight: np.ndarray,
                     eligible: np.ndarray) -> np.ndarray:
    """One-to-one matching of the eligible pairs that maximises the summed weight (bool per pair).

    A pair whose reference and prediction have no other eligible pair is always part of an
    optimum, so it is taken directly; only the pairs that compete go to
    ``linear_sum_assignment``, on a dense table of just the clusters involved.
    """
    out = np.zeros(len(pair_ref), bool)
    e = np.flatnonzero(eligible)
    if len(e) == 0:
        return out
    r, p = pair_ref[e], pair_pred[e]
    _, r_inv, r_cnt = np.unique(r, return_inverse=True, return_counts=True)
    _, p_inv, p_cnt = np.unique(p, return_inverse=True, return_counts=True)
    alone = (r_cnt[r_inv] == 1) & (p_cnt[p_inv] == 1)
    out[e[alone]] = True
    rest = e[~alone]
    if len(rest):
        from scipy.optimize import linear_sum_assignment  # imported only when pairs compete (slow import)

        rows, ri = np.unique(pair_ref[rest], return_inverse=True)
        cols, ci = np.unique(pair_pred[rest], return_inverse=True)
        w = np.zeros((len(rows), len(cols)))
        which = np.full((len(rows), len(cols)), -1, np.int64)
        w[ri, ci] = weight[rest]
        which[ri, ci] = rest
        a, b = linear_sum_assignment(w, maximize=True)
        chosen = which[a, b]
        out[chosen[chosen >= 0]] = True
    return out


def one_to_one(m: "ClusterMatch", threshold: float = 0.0) -> np.ndarray:
    """Maximum one-to-one matching on IoU of an overlap table (bool per pair): pairs with
    IoU >= ``threshold``, or every overlapping pair (IoU > 0) when ``threshold`` is 0."""
    iou = m.pair_iou
    eligible = iou >= threshold - 1e-12 if threshold > 0 else m.pair_inter > 0
    return maximum_matching(m.pair_ref, m.pair_pred, iou, eligible)


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
    m = ClusterMatch(n_ref, n_pred, rs, ps, pr, pp, inter, inter > 0)
    if rule.kind == "iou":
        m.matched = m.pair_iou >= rule.threshold - 1e-12
    elif rule.kind == "one-to-one":
        m.matched = one_to_one(m, rule.threshold)
    return m


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
