"""The PVS challenges' own metric rules (``--protocol``), each with its own empty-volume convention.

Read from the evaluators' released code (not re-used; cited for the definitions):

- ``valdo``: VALDO 2021, task 1 (EPVS), WhereIsValdo/valdo-eval-2021,
  ``evaluation_comparison/pairwise_measures.py`` (``PairwiseMeasures.assign_tp_fp``,
  ``f1_count_element``, ``mean_dsc_whenoverlap``, ``absolute_difference``,
  ``absolute_vol_difference``), as ``compare_segmentations.py`` runs them for ``-task epvs``.
  Each predicted cluster chooses the reference cluster it overlaps most (ties: the reference
  cluster met first in a C-order scan, as ``np.unique`` over ``ndimage.label`` labels does); it
  is TP if their IoU is strictly above 0.1 and, when several predicted clusters chose the same
  reference, its IoU is the largest of them (equal largest IoUs are all TP); every other
  predicted cluster is FP. FN is what ``f1_count_element`` counts: reference clusters that *no*
  predicted cluster chose. A reference chosen only at IoU <= 0.1, or only by losing pieces of a
  split, is neither TP nor FN; a reference tied by two pieces gives two TP (TP counts predicted
  clusters). So FN is not n_ref - TP. F1 = 2TP / (2TP + FP + FN). (VALDO's separate ``numb_fn``,
  used only by its ``demographic`` tasks, subtracts the distinct ``ref`` entries of its table,
  background 0 of non-overlapping predictions included, so it is one lower whenever a predicted
  cluster overlaps nothing, and -1 on an empty reference; its F1 does not use it.) Mean Dice over
  TP reference clusters: the union of every predicted cluster that chose the reference (TP or not)
  against it. Empty reference -> F1 and mean Dice undefined (NaN, also when the prediction is
  empty too); empty prediction -> 0. Absolute count difference |n_ref - n_pred| and absolute
  volume difference in mm3; on probability maps VALDO sums the probabilities >= the threshold.
  ``tests/test_protocols_valdo.py`` pins all of this against VALDO's code run on the same cases.
- ``epvs``: EPVS challenge 2024, hzlab/EPVS_challenge, ``evaluate.py`` and
  ``evaluate_participant_test.py``: Dice = 2|R and P| / (|R| + |P|) (both empty: NaN),
  recall = reference clusters hit / reference clusters (0 if none), precision = reference clusters
  hit / predicted clusters (0 if none; above 1 when one prediction covers several references),
  normalised volume difference |V_P - V_R| / V_R capped at 1 (empty reference: 1).
- ``shivai``: SHiVAi, pboutinaud/SHiVAi, ``src/shivai/utils/metrics.py`` (``image_metrics``,
  no size filter): cluster sensitivity = reference clusters hit / reference clusters, precision =
  reference clusters hit / (reference clusters hit + predicted clusters hitting nothing), F1 their
  harmonic mean; voxel sensitivity, precision and F1 (= Dice). Empty convention: no TP and no
  error at all -> 1; no TP with any error -> 0 (where this package gives NaN).

All three label clusters with 26-connectivity.
"""

from __future__ import annotations

import math

import numpy as np

from nnunet_pvs.evaluation.clusters import ClusterMatch

PROTOCOL_METRICS: dict[str, list[str]] = {
    "valdo": ["valdo_tp", "valdo_fp", "valdo_fn", "valdo_f1", "valdo_abs_count_diff",
              "valdo_mean_tp_dice", "valdo_abs_volume_diff_mm3"],
    "epvs": ["epvs_dice", "epvs_recall", "epvs_precision", "epvs_nvd"],
    "shivai": ["shivai_sensitivity", "shivai_precision", "shivai_f1", "shivai_tp", "shivai_fp", "shivai_fn",
               "shivai_voxel_sensitivity", "shivai_voxel_precision", "shivai_voxel_f1"],
}
VALDO_IOU = 0.1


def parse_protocols(text: str | None) -> tuple[str, ...]:
    """``valdo,epvs`` -> ("valdo", "epvs"); unknown names are a ValueError."""
    if not text:
        return ()
    names = tuple(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))
    bad = [n for n in names if n not in PROTOCOL_METRICS]
    if bad or not names:
        raise ValueError(f"--protocol {text!r}: unknown protocol(s) {', '.join(bad) or text!r} "
                         f"(choose from {', '.join(PROTOCOL_METRICS)})")
    return names


def _ref_hits(m: ClusterMatch) -> int:
    hit = np.zeros(m.n_ref + 1, bool)
    hit[m.pair_ref] = True
    hit[0] = False
    return int(hit.sum())


def valdo(m: ClusterMatch, ref_first_index: np.ndarray, n_ref_voxels: int, pred_volume_vox: float,
          voxel_mm3: float) -> dict:
    """VALDO 2021 EPVS rules (see module docstring): the assignment of VALDO's
    ``PairwiseMeasures.assign_tp_fp`` and the TP/FP/FN of its ``f1_count_element`` (FN: reference
    clusters no predicted cluster chose), read and re-written here. ``ref_first_index``: C-order
    flat index of the first voxel of each reference cluster (ties in overlap go to the earliest);
    ``pred_volume_vox``: predicted volume in voxels (the sum of probabilities >= threshold for
    probability maps)."""
    n_ref, n_pred = m.n_ref, m.n_pred
    out = {"valdo_abs_count_diff": abs(n_ref - n_pred),
           "valdo_abs_volume_diff_mm3": abs(float(pred_volume_vox) - float(n_ref_voxels)) * voxel_mm3}
    if n_ref_voxels == 0 or n_pred == 0:
        f = math.nan if n_ref_voxels == 0 else 0.0
        return {"valdo_tp": 0, "valdo_fp": n_pred, "valdo_fn": n_ref, "valdo_f1": f,
                "valdo_mean_tp_dice": f, **out}
    # each predicted cluster's chosen reference: most shared voxels, then earliest reference
    order = np.lexsort((ref_first_index[m.pair_ref], -m.pair_inter, m.pair_pred))
    pp_sorted = m.pair_pred[order]
    first = order[np.r_[True, pp_sorted[1:] != pp_sorted[:-1]]]
    cp, cr, ci = m.pair_pred[first], m.pair_ref[first], m.pair_inter[first]
    iou = ci / (m.pred_sizes[cp] + m.ref_sizes[cr] - ci)
    best = np.full(n_ref + 1, -np.inf)
    np.maximum.at(best, cr, iou)
    tp_mask = (iou > VALDO_IOU) & (iou == best[cr])
    tp = int(tp_mask.sum())
    chosen = np.zeros(n_ref + 1, bool)
    chosen[cr] = True
    fp, fn = n_pred - tp, n_ref - int(chosen[1:].sum())   # FN: chosen by no predicted cluster
    tp_refs = np.unique(cr[tp_mask])
    inter_sum = np.bincount(cr, weights=ci, minlength=n_ref + 1)
    pred_sum = np.bincount(cr, weights=m.pred_sizes[cp], minlength=n_ref + 1)
    dice = 2 * inter_sum[tp_refs] / (pred_sum[tp_refs] + m.ref_sizes[tp_refs])
    return {"valdo_tp": tp, "valdo_fp": fp, "valdo_fn": fn, "valdo_f1": 2 * tp / (2 * tp + fp + fn),
            "valdo_mean_tp_dice": float(dice.mean()) if len(dice) else 0.0, **out}


def epvs(m: ClusterMatch, tp_vox: int, n_ref_vox: int, n_pred_vox: int) -> dict:
    """EPVS 2024 rules (see module docstring)."""
    hits = _ref_hits(m)
    den = n_ref_vox + n_pred_vox
    nvd = 1.0 if n_ref_vox == 0 else min(1.0, abs(n_pred_vox - n_ref_vox) / n_ref_vox)
    return {"epvs_dice": 2.0 * tp_vox / den if den else math.nan,
            "epvs_recall": hits / m.n_ref if m.n_ref else 0.0,
            "epvs_precision": hits / m.n_pred if m.n_pred else 0.0,
            "epvs_nvd": nvd}


def _shivai_ratios(tp_a: int, fn: int, tp_b: int, fp: int) -> tuple[float, float, float]:
    """SHiVAi's sensitivity tp_a / (tp_a + fn), precision tp_b / (tp_b + fp) and F1, with its
    convention when a TP count is 0 (1 if there is no error at all, else 0)."""
    nothing = fn == 0 and fp == 0
    sens = (1.0 if nothing else 0.0) if tp_a == 0 else tp_a / (tp_a + fn)
    prec = (1.0 if nothing else 0.0) if tp_b == 0 else tp_b / (tp_b + fp)
    if tp_a == 0 and tp_b == 0:
        return sens, prec, sens
    f1 = 2 * prec * sens / (prec + sens) if prec + sens > 0 else math.nan
    return sens, prec, f1


def shivai(m: ClusterMatch, tp_vox: int, fp_vox: int, fn_vox: int) -> dict:
    """SHiVAi rules without size filter (see module docstring)."""
    hits = _ref_hits(m)
    pred_hit = np.zeros(m.n_pred + 1, bool)
    pred_hit[m.pair_pred] = True
    fp = m.n_pred - int(pred_hit[1:].sum())
    fn = m.n_ref - hits
    sens, prec, f1 = _shivai_ratios(hits, fn, hits, fp)
    if tp_vox == 0:
        v = 1.0 if fp_vox == 0 and fn_vox == 0 else 0.0
        vs = vp = vf = v
    else:
        vs, vp = tp_vox / (tp_vox + fn_vox), tp_vox / (tp_vox + fp_vox)
        vf = 2 * tp_vox / (2 * tp_vox + fp_vox + fn_vox)
    return {"shivai_sensitivity": sens, "shivai_precision": prec, "shivai_f1": f1,
            "shivai_tp": hits, "shivai_fp": fp, "shivai_fn": fn,
            "shivai_voxel_sensitivity": vs, "shivai_voxel_precision": vp, "shivai_voxel_f1": vf}
