"""Metrics on hand-built cases, and against independent implementations (medpy, brute force)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from nnunet_pvs.evaluation import clusters as cl
from nnunet_pvs.evaluation import surface_distance as sd
from nnunet_pvs.evaluation.case import Options, evaluate_case
from nnunet_pvs.evaluation.voxel_metrics import harmonic_mean, voxel_metrics


def vol(shape=(12, 12, 12)):
    return np.zeros(shape, bool)


def whole(out):
    rows = [r for r in out["per_case"] if r["region"] == "whole"]
    assert len(rows) == 1
    return rows[0]


# ---------------------------------------------------------------- voxel level
def test_voxel_metrics_hand_case():
    ref, pred = vol(), vol()
    ref[1, 1, 1:5] = True          # 4 voxels
    pred[1, 1, 3:6] = True         # 3 voxels, 2 shared
    m = voxel_metrics(ref, pred, voxel_volume_mm3=0.5)
    assert (m["tp_voxels"], m["fp_voxels"], m["fn_voxels"]) == (2, 1, 2)
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["ppv"] == pytest.approx(2 / 3)
    assert m["dice"] == pytest.approx(4 / 7)
    assert m["dice"] == pytest.approx(harmonic_mean(0.5, 2 / 3))
    assert (m["ref_volume_mm3"], m["pred_volume_mm3"], m["abs_volume_diff_mm3"]) == (2.0, 1.5, 0.5)


# ---------------------------------------------------------------- cluster level
def boutinaud_case():
    """Reference A (split by two predictions), B and C (merged by one prediction), D (missed);
    predictions P1, P2, P5 on A, P3 over B and C, P4 false positive."""
    ref, pred = vol((20, 20, 20)), vol((20, 20, 20))
    ref[2, 2, 2:12] = True                      # A: 10 voxels
    ref[8, 8, 8] = True                         # B: 1 voxel
    ref[8, 8, 10:13] = True                     # C: 3 voxels (gap at z=9 keeps B and C apart)
    ref[15, 15, 15:17] = True                   # D: 2 voxels, missed
    pred[2, 2, 2:4] = True                      # P1 on A
    pred[2, 2, 6:8] = True                      # P2 on A
    pred[2, 2, 10:11] = True                    # P5 on A
    pred[8, 8, 8:12] = True                     # P3 covers B and C
    pred[15, 2, 2] = True                       # P4: FP
    return ref, pred


def test_boutinaud_cluster_rule_counts():
    ref, pred = boutinaud_case()
    row = whole(evaluate_case("c", ref, pred, (1, 1, 1), Options()))
    assert (row["n_ref_clusters"], row["n_pred_clusters"]) == (4, 5)
    assert (row["cluster_tp"], row["cluster_fp"], row["cluster_fn"]) == (4, 1, 1)
    assert row["cluster_tpr"] == pytest.approx(4 / 5)       # TP / (TP + FN), predicted-side TP
    assert row["cluster_ppv"] == pytest.approx(4 / 5)
    assert row["cluster_dice"] == pytest.approx(0.8)
    assert row["ref_clusters_detected"] == 3
    assert row["ref_detection_rate"] == pytest.approx(3 / 4)  # A, B, C touched; D missed


@pytest.mark.parametrize("conn,expected", [(26, 2), (18, 3), (6, 4)])
def test_connectivity_option(conn, expected):
    m = vol()
    m[1, 1, 1] = m[2, 2, 2] = True   # corner neighbours: joined only with 26-connectivity
    m[4, 4, 4] = m[5, 5, 4] = True   # edge neighbours: joined with 18 and 26
    assert cl.label(m, conn)[1] == expected
    row = whole(evaluate_case("c", m, m, (1, 1, 1), Options(connectivity=conn)))
    assert row["n_ref_clusters"] == row["n_pred_clusters"] == expected


def test_iou_matching_rule():
    ref, pred = vol(), vol()
    ref[3, 3, 0:10] = True                   # 10 voxels
    pred[3, 3, 9] = True                     # shares 1 voxel
    pred[4, 4, 0:9] = True                   # ... and 9 outside the reference (26-connected to it)
    # IoU = 1 / (10 + 10 - 1) = 0.0526
    row_any = whole(evaluate_case("c", ref, pred, (1, 1, 1), Options()))
    assert (row_any["cluster_tp"], row_any["cluster_fp"], row_any["cluster_fn"]) == (1, 0, 0)
    row_iou = whole(evaluate_case("c", ref, pred, (1, 1, 1), Options(rule=cl.MatchRule.parse("iou:0.1"))))
    assert (row_iou["cluster_tp"], row_iou["cluster_fp"], row_iou["cluster_fn"]) == (0, 1, 1)
    row_iou5 = whole(evaluate_case("c", ref, pred, (1, 1, 1), Options(rule=cl.MatchRule.parse("iou:0.05"))))
    assert row_iou5["cluster_tp"] == 1
    with pytest.raises(ValueError):
        cl.MatchRule.parse("iou:0")


def test_cluster_size_filter_is_asymmetric():
    ref, pred = vol((16, 16, 16)), vol((16, 16, 16))
    ref[1, 1, 1] = True                      # R1: 1 voxel, missed
    ref[8, 8, 2:7] = True                    # R2: 5 voxels
    pred[8, 8, 2:5] = True                   # P1: 3 voxels on R2
    pred[8, 8, 6] = True                     # P3: 1 voxel on R2 (gap at z=5 keeps it apart from P1)
    pred[14, 14, 14] = True                  # P2: 1 voxel, false positive
    ref[12, 2, 2] = True                     # R3: 1 voxel ...
    pred[12, 2, 1:4] = True                  # ... covered by P4 (3 voxels)
    rows = evaluate_case("c", ref, pred, (1, 1, 1), Options(min_cluster_sizes=(0, 1, 3, 5)))["cluster_sizes"]
    by = {r["min_cluster_size"]: r for r in rows}
    s0 = by[0]
    assert (s0["tpr_tp"], s0["tpr_fn"], s0["ppv_tp"], s0["ppv_fp"]) == (3, 1, 3, 1)
    assert s0["cluster_tpr"] == pytest.approx(3 / 4) and s0["cluster_ppv"] == pytest.approx(3 / 4)
    s1 = by[1]  # R1, R3 leave the reference (TPR side); P2, P3 leave the prediction (PPV side)
    assert (s1["tpr_tp"], s1["tpr_fn"]) == (2, 0)     # P3 still counts as TP: prediction unfiltered
    assert (s1["ppv_tp"], s1["ppv_fp"]) == (2, 0)     # P4 still TP: reference unfiltered
    assert s1["cluster_tpr"] == 1.0 and s1["cluster_ppv"] == 1.0 and s1["cluster_dice"] == 1.0
    s3 = by[3]  # P1 (3 voxels) removed too: no prediction left on the PPV side, reference not empty
    assert s3["cluster_tpr"] == 1.0 and math.isnan(s3["cluster_ppv"]) and math.isnan(s3["cluster_dice"])
    s5 = by[5]  # R2 (5 voxels) removed: nothing left to find, but the prediction is not empty
    assert math.isnan(s5["cluster_tpr"]) and s5["n_ref_clusters_kept"] == 0


def test_size_pairs_exclude_merging_predictions_and_fit():
    ref, pred = vol((30, 30, 30)), vol((30, 30, 30))
    # three one-to-one pairs with ref size = 2 * pred size + 1
    for i, (ps, rs) in enumerate([(1, 3), (2, 5), (4, 9)]):
        ref[2 + 4 * i, 2, 0:rs] = True
        pred[2 + 4 * i, 2, 0:ps] = True
    # one prediction covering two reference clusters: excluded from the fit
    ref[20, 20, 0:2] = True
    ref[20, 20, 3:5] = True
    pred[20, 20, 0:5] = True
    m = cl.match_clusters(*cl.label(ref), *cl.label(pred))
    ps, rs = cl.size_pairs(m)
    assert sorted(zip(ps, rs)) == [(1, 3), (2, 5), (4, 9)]
    fit = cl.linear_fit(ps, rs)
    assert fit["slope"] == pytest.approx(2) and fit["intercept"] == pytest.approx(1)
    assert fit["r2"] == pytest.approx(1) and fit["n"] == 3
    assert math.isnan(cl.linear_fit([1.0], [2.0])["slope"])


# ---------------------------------------------------------------- distances
def test_hd95_and_cluster_hausdorff_hand_case():
    ref, pred = vol((20, 20, 20)), vol((20, 20, 20))
    ref[5, 5, 5] = True
    pred[5, 5, 8] = True                          # 3 voxels away along z, spacing 2 mm
    assert sd.hd95(ref, pred, (1, 1, 2)) == pytest.approx(6.0)
    # per-cluster Hausdorff: a 3-voxel reference line vs one predicted voxel at its end -> 2 voxels
    ref, pred = vol((20, 20, 20)), vol((20, 20, 20))
    ref[2, 2, 2:5] = True
    pred[2, 2, 2] = True
    ref[10, 10, 10] = True                        # second cluster, exact match: HD 0
    pred[10, 10, 10] = True
    row = whole(evaluate_case("c", ref, pred, (0.5, 0.5, 1.5), Options()))
    assert row["cluster_hd95_mm"] == pytest.approx(np.percentile([3.0, 0.0], 95))
    # 95th percentile of the 6 pooled surface distances: ref->pred (0, 1.5, 3, 0), pred->ref (0, 0)
    assert row["hd95_mm"] == pytest.approx(np.percentile([0, 1.5, 3, 0, 0, 0], 95))


def test_empty_case_conventions():
    e, m = vol(), vol()
    m[3, 3, 3:5] = True
    both = whole(evaluate_case("c", e, e, (1, 1, 1), Options()))
    for k in ("dice", "sensitivity", "ppv", "cluster_tpr", "cluster_ppv", "cluster_dice", "ref_detection_rate"):
        assert both[k] == 1.0, k
    assert both["hd95_mm"] == 0.0 and both["cluster_hd95_mm"] == 0.0
    assert both["n_ref_clusters"] == both["n_pred_clusters"] == 0

    fp_only = whole(evaluate_case("c", e, m, (1, 1, 1), Options()))  # empty reference
    assert math.isnan(fp_only["sensitivity"]) and fp_only["ppv"] == 0.0 and fp_only["dice"] == 0.0
    assert math.isnan(fp_only["cluster_tpr"]) and fp_only["cluster_ppv"] == 0.0
    assert fp_only["cluster_dice"] == 0.0 and math.isnan(fp_only["ref_detection_rate"])
    assert math.isnan(fp_only["hd95_mm"]) and math.isnan(fp_only["cluster_hd95_mm"])

    miss = whole(evaluate_case("c", m, e, (1, 1, 1), Options()))  # empty prediction
    assert miss["sensitivity"] == 0.0 and math.isnan(miss["ppv"]) and miss["dice"] == 0.0
    assert miss["cluster_tpr"] == 0.0 and math.isnan(miss["cluster_ppv"]) and miss["cluster_dice"] == 0.0
    assert miss["ref_detection_rate"] == 0.0
    assert math.isnan(miss["hd95_mm"]) and math.isnan(miss["cluster_hd95_mm"])


# ---------------------------------------------------------------- independent implementations
def random_pair(rng, shape=(24, 20, 16)):
    ref = ndimage.binary_dilation(rng.random(shape) > 0.985, iterations=1)
    pred = ref.copy()
    pred ^= ndimage.binary_dilation(rng.random(shape) > 0.99) & (rng.random(shape) > 0.3)
    return ref, pred


def brute_surface_distances(a, b, spacing):
    """Surface voxels by scipy erosion; all-pairs Euclidean distances (no k-d tree, no EDT)."""
    st = ndimage.generate_binary_structure(3, 1)
    sa = np.argwhere(a & ~ndimage.binary_erosion(a, st, border_value=0)) * spacing
    sb = np.argwhere(b & ~ndimage.binary_erosion(b, st, border_value=0)) * spacing
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return d.min(1), d.min(0)


def brute_clusters(ref, pred):
    """Boutinaud counts with scipy.ndimage.label (26-connectivity) and a loop over clusters."""
    st = np.ones((3, 3, 3))
    rl, nr = ndimage.label(ref, st)
    pl, npred = ndimage.label(pred, st)
    tp = sum(ref[pl == i].any() for i in range(1, npred + 1))
    fn = sum(not pred[rl == i].any() for i in range(1, nr + 1))
    return tp, npred - tp, fn, nr, npred


@pytest.mark.parametrize("seed", range(6))
def test_against_medpy_and_brute_force(seed):
    from medpy.metric import binary as mb

    rng = np.random.default_rng(seed)
    ref, pred = random_pair(rng)
    spacing = np.array([0.69, 0.8, 2.0]) if seed % 2 else np.array([1.0, 1.0, 1.0])
    assert ref.any() and pred.any()
    row = whole(evaluate_case("c", ref, pred, tuple(spacing), Options()))
    assert row["dice"] == pytest.approx(mb.dc(pred, ref))
    assert row["sensitivity"] == pytest.approx(mb.sensitivity(pred, ref))
    assert row["ppv"] == pytest.approx(mb.precision(pred, ref))
    assert row["hd95_mm"] == pytest.approx(mb.hd95(pred, ref, voxelspacing=spacing))
    d1, d2 = brute_surface_distances(ref, pred, spacing)
    assert row["hd95_mm"] == pytest.approx(np.percentile(np.concatenate([d2, d1]), 95))
    tp, fp, fn, nr, npred = brute_clusters(ref, pred)
    assert (row["cluster_tp"], row["cluster_fp"], row["cluster_fn"]) == (tp, fp, fn)
    assert (row["n_ref_clusters"], row["n_pred_clusters"]) == (nr, npred)


def test_cluster_hd95_against_brute_force():
    rng = np.random.default_rng(7)
    ref, pred = random_pair(rng, (30, 30, 20))
    spacing = np.array([0.7, 0.7, 1.5])
    row = whole(evaluate_case("c", ref, pred, tuple(spacing), Options()))
    st = np.ones((3, 3, 3))
    rl, nr = ndimage.label(ref, st)
    pl, _ = ndimage.label(pred, st)
    hds = []
    for i in range(1, nr + 1):
        partners = np.unique(pl[(rl == i) & pred])
        if len(partners) == 0:
            continue
        d1, d2 = brute_surface_distances(rl == i, np.isin(pl, partners), spacing)
        hds.append(max(d1.max(), d2.max()))
    assert len(hds) > 3
    assert row["cluster_hd95_mm"] == pytest.approx(np.percentile(hds, 95))


def test_threshold_sweep_matches_binarised_inputs():
    rng = np.random.default_rng(3)
    ref, _ = random_pair(rng)
    prob = np.clip(ndimage.gaussian_filter(ref.astype(float), 1.0) * 1.6 + rng.random(ref.shape) * 0.15, 0, 1)
    opts = Options(thresholds=(0.2, 0.5, 0.8), min_cluster_sizes=(0, 2))
    out = evaluate_case("c", ref, prob.astype(np.float32), (1, 1, 1), opts)
    long = {(r["threshold"], r["metric"]): r["value"] for r in out["thresholds"]}
    for t in (0.2, 0.5, 0.8):
        direct = whole(evaluate_case("c", ref, prob.astype(np.float32) >= t, (1, 1, 1), opts))
        for k in ("dice", "cluster_tpr", "cluster_ppv", "hd95_mm", "cluster_hd95_mm", "n_pred_clusters"):
            assert long[(t, k)] == pytest.approx(direct[k], nan_ok=True), (t, k)
    assert len(out["per_case"]) == 1 and out["per_case"][0]["threshold"] == 0.5
    assert {r["threshold"] for r in out["cluster_sizes"]} == {0.2, 0.5, 0.8}


def test_regions_restrict_both_masks():
    ref, pred = boutinaud_case()
    left = vol((20, 20, 20))
    left[:5] = True                           # holds A and its predictions only
    out = evaluate_case("c", ref, pred, (1, 1, 1), Options(), regions={"left": left})
    r = {row["region"]: row for row in out["per_case"]}
    assert set(r) == {"whole", "left"}
    assert (r["left"]["n_ref_clusters"], r["left"]["n_pred_clusters"]) == (1, 3)
    assert r["left"]["cluster_tpr"] == 1.0 and r["left"]["cluster_ppv"] == 1.0
    assert r["left"]["dice"] == pytest.approx(voxel_metrics(ref & left, pred & left)["dice"])


# ---------------------------------------------------------------- one-to-one matching, panoptic quality
def challenge_case():
    """Hand-built case (1 mm voxels) with a split, a merge, an IoU of exactly 0.1, a miss and a FP.

    Reference A (10 voxels) split by P1 (5, IoU 0.5) and P2 (2, IoU 0.2); B (2) and C (3) merged
    by P3 (6; IoU 1/3 with B, 0.5 with C); D (10) touched by the single voxel P4 (IoU exactly
    0.1); E (1) missed; P5 a false positive.
    """
    ref, pred = vol((30, 30, 30)), vol((30, 30, 30))
    ref[2, 2, 0:10] = True
    pred[2, 2, 0:5] = True
    pred[2, 2, 6:8] = True
    ref[8, 8, 0:2] = True
    ref[8, 8, 3:6] = True
    pred[8, 8, 0:6] = True
    ref[14, 14, 0:10] = True
    pred[14, 14, 0] = True
    ref[20, 20, 0] = True
    pred[25, 25, 25] = True
    return ref, pred


@pytest.mark.parametrize("rule,tp,fp,fn", [
    ("overlap", 4, 1, 1),              # P1..P4 touch a reference; only E is missed
    ("iou:0.1", 4, 1, 1),              # many-to-many, IoU >= 0.1 keeps P4 (IoU exactly 0.1)
    ("iou:0.2", 3, 2, 2),              # P4 drops out, D becomes a miss
    ("one-to-one", 3, 2, 2),           # A-P1, C-P3, D-P4 (sum of IoU 1.1 beats A-P1, B-P3, D-P4)
    ("one-to-one:iou:0.1", 3, 2, 2),
    ("one-to-one:iou:0.5", 2, 3, 3),   # A-P1, C-P3
])
def test_matching_rules_hand_case(rule, tp, fp, fn):
    ref, pred = challenge_case()
    row = whole(evaluate_case("c", ref, pred, (1, 1, 1), Options(rule=cl.MatchRule.parse(rule))))
    assert (row["cluster_tp"], row["cluster_fp"], row["cluster_fn"]) == (tp, fp, fn)
    if rule.startswith("one-to-one"):   # one-to-one: TPR, PPV and their harmonic mean are the F1 counts
        assert row["cluster_dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_panoptic_quality_hand_case():
    ref, pred = challenge_case()
    row = whole(evaluate_case("c", ref, pred, (1, 1, 1), Options()))   # PQ uses one-to-one at IoU > 0
    assert row["rq"] == pytest.approx(3 / (3 + 0.5 * 2 + 0.5 * 2))
    assert row["sq"] == pytest.approx((0.5 + 0.5 + 0.1) / 3)
    assert row["pq"] == pytest.approx(0.6 * 1.1 / 3)
    assert row["lesion_dice"] == pytest.approx((10 / 15 + 6 / 9 + 2 / 11) / 3)
    row5 = whole(evaluate_case("c", ref, pred, (1, 1, 1), Options(rule=cl.MatchRule.parse("one-to-one:iou:0.5"))))
    assert (row5["rq"], row5["sq"], row5["lesion_dice"]) == (pytest.approx(0.4), pytest.approx(0.5),
                                                            pytest.approx(2 / 3))


def greedy_vs_maximum_case():
    """R1 (6 voxels) overlaps P1 (IoU 1/3) and P2 (IoU 1/6); R2 (3) overlaps P1 only (IoU 2/7).
    Greedy matching on IoU takes R1-P1 first and matches one pair; maximum matching takes R1-P2
    and R2-P1 (summed IoU 0.45 > 1/3)."""
    ref, pred = vol((6, 6, 12)), vol((6, 6, 12))
    ref[2, 2, 0:6] = True
    ref[2, 2, 7:10] = True
    pred[2, 2, 3:9] = True
    pred[2, 2, 0] = True
    return ref, pred


def test_one_to_one_is_maximum_not_greedy():
    from panoptica.instance_matcher import NaiveThresholdMatching

    ref, pred = greedy_vs_maximum_case()
    row = whole(evaluate_case("c", ref, pred, (1, 1, 1), Options(rule=cl.MatchRule.parse("one-to-one:iou:0.1"))))
    assert (row["cluster_tp"], row["cluster_fp"], row["cluster_fn"]) == (2, 0, 0)
    assert row["sq"] == pytest.approx((1 / 6 + 2 / 7) / 2)
    # panoptica's greedy matcher, on the same case, finds one pair only
    greedy = panoptica_result(ref, pred, NaiveThresholdMatching(matching_threshold=0.1))
    assert greedy.tp == 1


def panoptica_result(ref, pred, matcher):
    """panoptica on 26-connected instances labelled by scipy (independent of our labelling)."""
    from panoptica import InputType, Panoptica_Evaluator

    st = np.ones((3, 3, 3))
    ev = Panoptica_Evaluator(expected_input=InputType.UNMATCHED_INSTANCE, instance_matcher=matcher, verbose=False)
    res = ev.evaluate(ndimage.label(pred, st)[0].astype(np.int32), ndimage.label(ref, st)[0].astype(np.int32),
                      verbose=False)
    return list(res.values())[0] if isinstance(res, dict) else res


@pytest.mark.parametrize("seed,threshold", [(0, 0.5), (1, 0.1), (2, 0.0), (3, 0.3)])
def test_one_to_one_against_panoptica(seed, threshold):
    from panoptica.instance_matcher import MaxBipartiteMatching

    rng = np.random.default_rng(seed)
    ref, pred = random_pair(rng, (28, 24, 16))
    rule = "one-to-one" if threshold == 0 else f"one-to-one:iou:{threshold}"
    row = whole(evaluate_case("c", ref, pred, (1, 1, 1), Options(rule=cl.MatchRule.parse(rule))))
    # threshold 0: panoptica's strict comparison (IoU > 0) is our "any overlap"
    res = panoptica_result(ref, pred, MaxBipartiteMatching(matching_threshold=threshold,
                                                           strict_threshold=threshold == 0))
    assert row["cluster_tp"] == res.tp and row["cluster_fp"] == res.fp and row["cluster_fn"] == res.fn
    for ours, theirs in (("rq", "rq"), ("sq", "sq"), ("pq", "pq"), ("lesion_dice", "sq_dsc")):
        assert row[ours] == pytest.approx(getattr(res, theirs), rel=1e-9), ours
    assert res.tp > 3


def test_panoptic_empty_conventions_match_panoptica():
    from panoptica.instance_matcher import MaxBipartiteMatching

    e, m = vol(), vol()
    m[3, 3, 3:5] = True
    for a, b in ((e, e), (e, m), (m, e)):
        row = whole(evaluate_case("c", a, b, (1, 1, 1), Options()))
        res = panoptica_result(a, b, MaxBipartiteMatching(matching_threshold=0.0, strict_threshold=True))
        for ours, theirs in (("rq", "rq"), ("sq", "sq"), ("pq", "pq"), ("lesion_dice", "sq_dsc")):
            assert row[ours] == pytest.approx(getattr(res, theirs), nan_ok=True), (ours, a.any(), b.any())


def test_maximum_matching_takes_isolated_pairs_without_assignment():
    # three isolated pairs and one competing block: the answer must not depend on the split
    pr = np.array([1, 2, 3, 4, 4, 5])
    pp = np.array([1, 2, 3, 4, 5, 4])
    w = np.array([0.9, 0.5, 0.2, 0.6, 0.5, 0.55])
    got = cl.maximum_matching(pr, pp, w, np.ones(6, bool))
    # block {ref 4, 5} x {pred 4, 5}: 4-5 + 5-4 = 1.05 beats 4-4 = 0.6
    assert got.tolist() == [True, True, True, False, True, True]


# ---------------------------------------------------------------- named protocols
PROTOCOLS = ("valdo", "epvs", "shivai")


def test_protocols_hand_case():
    ref, pred = challenge_case()
    row = whole(evaluate_case("c", ref, pred, (1, 1, 1), Options(protocols=PROTOCOLS)))
    # VALDO: P1 (best of A's two pieces) and P3 (chooses C, 3 shared voxels) are TP; P2, P4
    # (IoU 0.1 is not > 0.1) and P5 FP; FN: the references no prediction chose, B and E (D was
    # chosen by P4, so VALDO's F1 counts it neither TP nor FN); VALDO's code gives F1 4/9
    assert (row["valdo_tp"], row["valdo_fp"], row["valdo_fn"]) == (2, 3, 2)
    assert row["valdo_f1"] == pytest.approx(4 / 9)
    assert row["valdo_mean_tp_dice"] == pytest.approx((14 / 17 + 6 / 9) / 2)   # A with P1 + P2; C with P3
    assert row["valdo_abs_count_diff"] == 0 and row["valdo_abs_volume_diff_mm3"] == 11
    # EPVS: references hit A, B, C, D over 5 references and over 5 predictions
    assert row["epvs_recall"] == pytest.approx(0.8) and row["epvs_precision"] == pytest.approx(0.8)
    assert row["epvs_dice"] == pytest.approx(26 / 41) and row["epvs_nvd"] == pytest.approx(11 / 26)
    # SHiVAi: hits 4, one predicted cluster hitting nothing (P5), one reference missed (E)
    assert (row["shivai_tp"], row["shivai_fp"], row["shivai_fn"]) == (4, 1, 1)
    assert row["shivai_sensitivity"] == pytest.approx(0.8) and row["shivai_precision"] == pytest.approx(0.8)
    assert row["shivai_voxel_sensitivity"] == pytest.approx(0.5)
    assert row["shivai_voxel_precision"] == pytest.approx(13 / 15)


def test_epvs_precision_exceeds_one_on_merges():
    ref, pred = vol(), vol()
    ref[2, 2, 0:2] = ref[2, 2, 3:5] = True      # two references ...
    pred[2, 2, 0:5] = True                      # ... merged by one prediction
    row = whole(evaluate_case("c", ref, pred, (1, 1, 1), Options(protocols=PROTOCOLS)))
    assert row["epvs_precision"] == 2.0 and row["epvs_recall"] == 1.0
    assert (row["valdo_tp"], row["valdo_fn"]) == (1, 1)  # the second reference of a merge is FN
    assert row["shivai_precision"] == 1.0


def test_valdo_overlap_tie_goes_to_the_first_reference_in_scan_order():
    ref, pred = vol(), vol()
    ref[2, 2, 0:2] = True        # R1, first in C order
    ref[2, 2, 3:5] = True        # R2
    pred[2, 2, 1:4] = True       # one voxel in each: IoU 1/4 with both
    row = whole(evaluate_case("c", ref, pred, (1, 1, 1), Options(protocols=("valdo",))))
    assert (row["valdo_tp"], row["valdo_fp"], row["valdo_fn"]) == (1, 0, 1)
    assert row["valdo_mean_tp_dice"] == pytest.approx(2 / 5)


@pytest.mark.parametrize("kind", ["both", "ref_empty", "pred_empty"])
def test_protocol_empty_conventions(kind):
    e, m = vol(), vol()
    m[3, 3, 3:5] = True
    ref, pred = {"both": (e, e), "ref_empty": (e, m), "pred_empty": (m, e)}[kind]
    row = whole(evaluate_case("c", ref, pred, (1, 1, 1), Options(protocols=PROTOCOLS)))
    nan = math.nan
    expect = {  # from each evaluator's code (see evaluation/protocols.py)
        "both": dict(valdo_f1=nan, valdo_mean_tp_dice=nan, epvs_dice=nan, epvs_recall=0, epvs_precision=0,
                     epvs_nvd=1, shivai_sensitivity=1, shivai_precision=1, shivai_f1=1, shivai_voxel_f1=1),
        "ref_empty": dict(valdo_f1=nan, valdo_mean_tp_dice=nan, epvs_dice=0, epvs_recall=0, epvs_precision=0,
                          epvs_nvd=1, shivai_sensitivity=0, shivai_precision=0, shivai_f1=0, shivai_voxel_f1=0),
        "pred_empty": dict(valdo_f1=0, valdo_mean_tp_dice=0, epvs_dice=0, epvs_recall=0, epvs_precision=0,
                           epvs_nvd=1, shivai_sensitivity=0, shivai_precision=0, shivai_f1=0, shivai_voxel_f1=0),
    }[kind]
    for k, v in expect.items():
        assert row[k] == pytest.approx(v, nan_ok=True), k


def valdo_loop(ref, pred, thr=0.1):
    """VALDO 2021's EPVS rule written as a loop over predicted clusters (independent of ours)."""
    st = np.ones((3, 3, 3))
    rl, nr = ndimage.label(ref, st)
    pl, npred = ndimage.label(pred, st)
    if not ref.any():
        return math.nan
    if not pred.any():
        return 0.0
    choice = {}
    for s in range(1, npred + 1):
        under = rl[pl == s]
        under = under[under > 0]
        if len(under) == 0:
            continue
        labs, cnt = np.unique(under, return_counts=True)
        r = labs[np.argmax(cnt)]                 # first maximum = lowest label = first in C order
        inter = cnt.max()
        choice[s] = (r, inter / ((pl == s).sum() + (rl == r).sum() - inter))
    tp = 0
    for s, (r, iou) in choice.items():
        best = max(i for (rr, i) in choice.values() if rr == r)
        tp += iou > thr and iou == best
    fp = npred - tp
    fn = nr - len({r for r, _ in choice.values()})   # references no prediction chose
    return 2 * tp / (2 * tp + fp + fn)


def epvs_loop(ref, pred):
    st = np.ones((3, 3, 3))
    rl, nr = ndimage.label(ref, st)
    pl, npred = ndimage.label(pred, st)
    hits = sum(pred[rl == i].any() for i in range(1, nr + 1))
    return (hits / nr if nr else 0.0), (hits / npred if npred else 0.0)


@pytest.mark.parametrize("seed", range(4))
def test_protocols_against_loop_implementations(seed):
    rng = np.random.default_rng(seed + 10)
    ref, pred = random_pair(rng, (26, 22, 14))
    row = whole(evaluate_case("c", ref, pred, (1, 1, 1), Options(protocols=PROTOCOLS)))
    assert row["valdo_f1"] == pytest.approx(valdo_loop(ref, pred))
    rec, prec = epvs_loop(ref, pred)
    assert (row["epvs_recall"], row["epvs_precision"]) == (pytest.approx(rec), pytest.approx(prec))


# ---------------------------------------------------------------- surfaces
def test_surface_connectivity_hand_case():
    m = vol((7, 7, 7))
    m[1:6, 1:6, 1:6] = True
    # 6-neighbourhood: the 27-voxel core (3 x 3 x 3) is interior; 26: the core too (all its
    # neighbours are inside); a voxel on a face is surface in both
    assert sd.surface(m, 6).sum() == 125 - 27 and sd.surface(m, 26).sum() == 125 - 27
    m[3, 3, 5] = False   # a dent: its diagonal neighbours become surface only with 26
    s6, s26 = sd.surface(m, 6), sd.surface(m, 26)
    assert s6.sum() == 124 - 27 + 1      # (3, 3, 4) now has a face neighbour outside
    assert s26.sum() == 124 - 27 + 9     # the 3 x 3 voxels at z = 4 around the dent all touch it
    assert (s6 <= s26).all()


def brute_surface_dice_voxels(a, b, spacing, tol, conn=6):
    """Surface voxels by scipy erosion, distances by brute force (independent of the k-d tree)."""
    st = ndimage.generate_binary_structure(3, 1 if conn == 6 else 3)
    sa = np.argwhere(a & ~ndimage.binary_erosion(a, st, border_value=0)) * spacing
    sb = np.argwhere(b & ~ndimage.binary_erosion(b, st, border_value=0)) * spacing
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    dab, dba = d.min(1), d.min(0)
    both = np.concatenate([dab, dba])
    return (np.count_nonzero(dab <= tol + 1e-9) + np.count_nonzero(dba <= tol + 1e-9)) / len(both), both.max(), \
        np.percentile(both, 95)


@pytest.mark.parametrize("conn", [6, 26])
@pytest.mark.parametrize("seed", range(3))
def test_surface_metrics_against_brute_force(seed, conn):
    rng = np.random.default_rng(seed)
    ref, pred = random_pair(rng)
    spacing = np.array([0.69, 0.8, 2.0])
    row = whole(evaluate_case("c", ref, pred, tuple(spacing), Options(surface_connectivity=conn, nsd_tolerance=1.5)))
    nsd, hd, h95 = brute_surface_dice_voxels(ref, pred, spacing, 1.5, conn)
    assert row["surface_dice_voxels"] == pytest.approx(nsd)
    assert row["hausdorff_mm"] == pytest.approx(hd) and row["hd95_mm"] == pytest.approx(h95)


@pytest.mark.parametrize("seed", range(3))
def test_surface_dice_voxels_against_monai(seed):
    import torch
    from monai.metrics import compute_surface_dice

    rng = np.random.default_rng(seed + 3)
    ref, pred = random_pair(rng)
    spacing = (0.69, 0.8, 2.0) if seed % 2 else (1.0, 1.0, 1.0)
    for tol in (0.7, 1.0, 2.5):
        row = whole(evaluate_case("c", ref, pred, spacing, Options(nsd_tolerance=tol)))
        theirs = compute_surface_dice(torch.tensor(pred[None, None], dtype=torch.float32),
                                      torch.tensor(ref[None, None], dtype=torch.float32),
                                      class_thresholds=[tol], include_background=True, spacing=spacing).item()
        assert row["surface_dice_voxels"] == pytest.approx(theirs, abs=1e-6), tol


@pytest.mark.parametrize("seed", range(4))
def test_area_weighted_surface_dice_against_deepmind(seed):
    """DeepMind's surface-distance (Nikolov et al.'s own code); non-empty masks only: its 0.1
    release uses np.Inf, which NumPy 2 removed, on the empty-mask path."""
    import surface_distance as dm

    rng = np.random.default_rng(seed)
    ref, pred = random_pair(rng)
    spacing = (0.69, 0.8, 2.0) if seed % 2 else (1.0, 1.0, 1.0)
    dists = dm.compute_surface_distances(ref, pred, spacing)
    for tol in (0.5, 1.0, 2.0):
        row = whole(evaluate_case("c", ref, pred, spacing, Options(nsd_tolerance=tol)))
        assert row["surface_dice"] == pytest.approx(dm.compute_surface_dice_at_tolerance(dists, tol), abs=1e-6)


def test_surface_dice_tolerance_edge_and_anisotropy():
    ref, pred = vol((9, 9, 9)), vol((9, 9, 9))
    ref[4, 4, 2] = True
    pred[4, 4, 4] = True          # two voxels apart along z
    # voxel variant: centres 2 x 1.5 = 3 mm apart; in at exactly 3 mm, out just below
    at = whole(evaluate_case("c", ref, pred, (0.5, 0.5, 1.5), Options(nsd_tolerance=3.0)))
    below = whole(evaluate_case("c", ref, pred, (0.5, 0.5, 1.5), Options(nsd_tolerance=2.999)))
    assert at["surface_dice_voxels"] == 1.0 and below["surface_dice_voxels"] == 0.0
    assert at["hausdorff_mm"] == pytest.approx(3.0)
    # area-weighted: a lone voxel's marching-cubes surface is 8 corner triangles (vertices at the
    # edge midpoints); the corner planes facing each other are 1.5 mm apart, the far ones 3 mm
    from nnunet_pvs.evaluation.surface_dice import surface_elements

    pts, areas = surface_elements(ref, (0.5, 0.5, 1.5))
    tri = 0.5 * math.sqrt((0.25 * 0.75) ** 2 + (0.25 * 0.75) ** 2 + (0.25 * 0.25) ** 2)
    assert len(areas) == 8 and areas == pytest.approx(np.full(8, tri))
    for tol, expect in ((1.5, 0.5), (1.499, 0.0), (3.0, 1.0)):
        row = whole(evaluate_case("c", ref, pred, (0.5, 0.5, 1.5), Options(nsd_tolerance=tol)))
        assert row["surface_dice"] == pytest.approx(expect), tol


def test_surface_empty_conventions():
    e, m = vol(), vol()
    m[3, 3, 3:5] = True
    both = whole(evaluate_case("c", e, e, (1, 1, 1), Options()))
    assert both["surface_dice"] == 1.0 and both["surface_dice_voxels"] == 1.0 and both["hausdorff_mm"] == 0.0
    for a, b in ((e, m), (m, e)):
        row = whole(evaluate_case("c", a, b, (1, 1, 1), Options()))
        assert row["surface_dice"] == 0.0 and row["surface_dice_voxels"] == 0.0
        assert math.isnan(row["hausdorff_mm"])
    assert both["iou"] == 1.0


def test_iou_column():
    ref, pred = vol(), vol()
    ref[1, 1, 1:5] = True
    pred[1, 1, 3:6] = True   # 2 shared, union 5
    assert whole(evaluate_case("c", ref, pred, (1, 1, 1), Options()))["iou"] == pytest.approx(2 / 5)


# ---------------------------------------------------------------- regions, sizes
def test_majority_regions_count_each_cluster_once():
    ref, pred = vol((20, 20, 20)), vol((20, 20, 20))
    ref[4, 4, 2:9] = True      # 7 voxels: 3 in "a" (z < 5), 4 in "b"  -> b
    ref[10, 10, 3:7] = True    # 4 voxels: 2 in each                   -> a (listed first wins the tie)
    pred[4, 4, 2:9] = True
    a = vol((20, 20, 20))
    a[:, :, :5] = True
    regions = {"a": a, "b": ~a}
    out = evaluate_case("c", ref, pred, (1, 1, 1), Options(), regions=regions)
    r = {row["region"]: row for row in out["per_case"]}
    assert r["a"]["n_ref_clusters"] == 1 and r["b"]["n_ref_clusters"] == 1
    assert r["a"]["n_ref_clusters"] + r["b"]["n_ref_clusters"] == r["whole"]["n_ref_clusters"]
    assert r["b"]["n_pred_clusters"] == 1 and r["a"]["n_pred_clusters"] == 0
    assert r["b"]["ref_volume_mm3"] == 7 and r["b"]["dice"] == 1.0      # whole clusters, not cut
    assert r["a"]["cluster_fn"] == 1
    cut = {row["region"]: row for row in evaluate_case("c", ref, pred, (1, 1, 1), Options(region_mode="cut"),
                                                       regions=regions)["per_case"]}
    assert cut["a"]["n_ref_clusters"] == 2 and cut["b"]["n_ref_clusters"] == 2   # both clusters cut
    assert cut["b"]["ref_volume_mm3"] == 4 + 2


def test_size_agreement_both_directions():
    import pandas as pd

    from nnunet_pvs.evaluation.sweeps import size_agreement

    pairs = pd.DataFrame({"case": "c", "region": "whole", "threshold": np.nan,
                          "pred_size_mm3": [1.0, 2.0, 4.0], "ref_size_mm3": [3.0, 5.0, 9.0]})
    sa = size_agreement(pairs).set_index("dependent")
    assert sa.loc["reference", "slope"] == pytest.approx(2) and sa.loc["reference", "intercept"] == pytest.approx(1)
    assert sa.loc["predicted", "slope"] == pytest.approx(0.5)
    assert sa.loc["predicted", "intercept"] == pytest.approx(-0.5)
    assert sa.loc["predicted", "independent"] == "reference" and (sa["n"] == 3).all()


def test_size_groups_hand_case():
    from nnunet_pvs.evaluation.lesion_metrics import SizeGroups

    ref, pred = challenge_case()
    opts = Options(rule=cl.MatchRule.parse("one-to-one:iou:0.5"), size_groups=SizeGroups.parse("2,5"))
    g = {r["size_group"]: r for r in evaluate_case("c", ref, pred, (1, 1, 1), opts)["size_groups"]}
    assert list(g) == ["(0, 2]", "(2, 5]", "> 5"]
    # references: B (2), E (1) | C (3) | A, D (10); predictions: P2 (2), P4, P5 (1) | P1 (5) | P3 (6)
    assert [g[k]["n_ref_clusters"] for k in g] == [2, 1, 2]
    assert [g[k]["ref_detected"] for k in g] == [0, 1, 1]
    assert [g[k]["n_pred_clusters"] for k in g] == [3, 1, 1]
    assert [g[k]["false_positives"] for k in g] == [3, 0, 0]
    assert g["(2, 5]"]["lesion_dice"] == pytest.approx(6 / 9) and g["> 5"]["lesion_dice"] == pytest.approx(10 / 15)
    assert math.isnan(g["(0, 2]"]["lesion_dice"])
    mm = SizeGroups.parse("4mm3")   # 2 voxels of 2 mm3
    g2 = evaluate_case("c", ref, pred, (1, 1, 2), Options(size_groups=mm))["size_groups"]
    assert [r["n_ref_clusters"] for r in g2] == [2, 3] and g2[0]["size_group"] == "(0, 4] mm3"
    for bad in ("5,2", "0", "abc", "-1"):
        with pytest.raises(ValueError):
            SizeGroups.parse(bad)


def test_white_matter_includes_hypointensities():
    from nnunet_pvs.evaluation.regions import masks_from_label_map

    aseg = np.array([[[0, 2, 41, 77, 78, 79, 12, 4]]])
    m = masks_from_label_map(aseg)
    assert m["wm"].ravel().tolist() == [False, True, True, True, True, True, False, False]
    assert m["bg"].ravel().tolist() == [False] * 6 + [True, False]


def test_valdo_volume_sums_probabilities_on_soft_maps():
    ref = vol()
    ref[2, 2, 2:5] = True                       # 3 voxels
    prob = np.zeros(ref.shape, np.float32)
    prob[2, 2, 2], prob[2, 2, 3], prob[2, 2, 4] = 0.6, 0.8, 0.3   # 0.3 is below the threshold
    row = whole(evaluate_case("c", ref, prob, (1, 1, 2), Options(protocols=("valdo",))))
    assert row["valdo_abs_volume_diff_mm3"] == pytest.approx(abs(0.6 + 0.8 - 3) * 2)
    assert row["abs_volume_diff_mm3"] == pytest.approx(1 * 2)   # ours: binarised voxels
