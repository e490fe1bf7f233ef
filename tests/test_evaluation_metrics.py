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
