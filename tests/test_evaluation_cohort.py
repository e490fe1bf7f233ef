"""Cohort statistics against independent implementations and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from nnunet_pvs.evaluation.cohort_stats import count_clusters, icc, ks_two_samples, ordinal_logistic, spearman
from nnunet_pvs.evaluation.sweeps import parse_range, pool_cluster_sizes


def test_count_clusters_with_size_filter():
    m = np.zeros((10, 10, 10), bool)
    m[1, 1, 1] = True                    # 1 voxel
    m[5, 5, 0:3] = True                  # 3 voxels
    m[8, 0:6, 8] = True                  # 6 voxels
    m[3, 3, 3] = m[4, 4, 4] = True       # 2 voxels with 26-connectivity, two singles with 6
    assert count_clusters(m, 26, (0, 1, 2, 3, 6)) == {0: 4, 1: 3, 2: 2, 3: 1, 6: 0}
    assert count_clusters(m, 6, (0, 1)) == {0: 5, 1: 2}


def test_ordinal_logistic_two_levels_equals_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(50, 20, 400)
    y = (rng.random(400) < 1 / (1 + np.exp(-(0.05 * x - 2.5)))).astype(int)
    res = ordinal_logistic(x, y)
    ref = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10000).fit(x[:, None], y)
    assert res["beta"] == pytest.approx(ref.coef_[0, 0], rel=1e-4)
    assert res["cutpoints"][0] == pytest.approx(-ref.intercept_[0], rel=1e-4)
    # McFadden R^2 and LR test from the fitted probabilities, computed here by hand
    p1 = ref.predict_proba(x[:, None])[:, 1]
    ll = np.sum(y * np.log(p1) + (1 - y) * np.log(1 - p1))
    f = y.mean()
    ll0 = len(y) * (f * np.log(f) + (1 - f) * np.log(1 - f))
    assert res["mcfadden_r2"] == pytest.approx(1 - ll / ll0, rel=1e-5)
    assert res["p"] == pytest.approx(stats.chi2.sf(2 * (ll - ll0), 1), rel=1e-3)


def test_ordinal_logistic_four_levels_recovers_the_slope():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 100, 3000)
    latent = 0.08 * x + rng.logistic(size=len(x))
    y = np.digitize(latent, [2.0, 4.0, 6.0]) + 1          # ratings 1..4
    res = ordinal_logistic(x, y)
    assert res["levels"] == [1, 2, 3, 4]
    assert res["beta"] == pytest.approx(0.08, rel=0.1)
    assert res["cutpoints"] == pytest.approx([2.0, 4.0, 6.0], abs=0.35)
    assert res["p"] < 1e-10 and 0.2 < res["mcfadden_r2"] < 1
    noise = ordinal_logistic(rng.uniform(0, 100, 300), rng.integers(1, 5, 300))
    assert noise["mcfadden_r2"] < 0.02 and noise["p"] > 0.001
    assert math.isnan(ordinal_logistic([1, 2, 3], [1, 1, 1])["beta"])


# Outputs of the hand-written proportional-odds fit (scipy BFGS on its own likelihood) that
# evaluate-cohort used before statsmodels' OrderedModel, computed on these inputs before the change
# (evaluation/cohort_stats.py at fa95f6d).
ORD_X4 = [127, 58, 132, 152, 55, 124, 145, 191, 179, 100, 170, 194, 90, 94, 87, 60, 69, 173, 43, 3, 48, 172, 165,
          182, 135, 114, 51, 6, 16, 188, 27, 199, 36, 90, 113, 132, 41, 180, 177, 119, 199, 82, 16, 139, 11, 170,
          163, 9, 154, 191, 189, 108, 1, 143, 74, 130, 73, 24, 36, 85]
ORD_Y4 = [2, 4, 4, 2, 1, 2, 2, 4, 3, 1, 1, 4, 3, 2, 1, 1, 2, 2, 1, 1, 2, 2, 3, 4, 4, 4, 2, 1, 1, 3, 2, 4, 1, 1, 4, 4,
          1, 4, 3, 2, 2, 2, 2, 2, 1, 4, 4, 1, 4, 4, 2, 2, 3, 2, 2, 1, 2, 1, 1, 3]
ORD_X3 = [70, 10, 4, 3, 8, 35, 45, 60, 20, 63, 64, 8, 68, 5, 47, 15, 73, 58, 56, 75, 50, 63, 17, 59, 50, 49, 55, 12,
          12, 42, 72, 45, 18, 12, 36, 20, 46, 76, 76, 46, 33, 35, 60, 18, 56]
ORD_Y3 = [1, 2, 0, 0, 2, 0, 2, 2, 2, 1, 0, 0, 1, 1, 0, 1, 2, 2, 2, 2, 1, 2, 1, 1, 2, 1, 2, 0, 0, 0, 1, 1, 0, 0, 0, 1,
          2, 2, 1, 0, 1, 1, 1, 0, 1]
ORD_BEFORE = {
    "four levels": (ORD_X4, ORD_Y4, {
        "beta": 0.022052290980940033, "cutpoints": [1.1209470700940292, 3.1893853927793945, 3.900190918436107],
        "mcfadden_r2": 0.15877359691699622, "nagelkerke_r2": 0.36904790764590284, "lr_stat": 25.187510508677747,
        "p": 5.201797743059486e-07, "n": 60, "levels": [1.0, 2.0, 3.0, 4.0]}),
    "three levels": (ORD_X3, ORD_Y3, {
        "beta": 0.03612570242650246, "cutpoints": [0.6143513758650576, 2.4602223096733336],
        "mcfadden_r2": 0.08291968408565653, "nagelkerke_r2": 0.18690659313049493, "lr_stat": 8.166192508569281,
        "p": 0.004267840398977385, "n": 45, "levels": [0.0, 1.0, 2.0]}),
}


@pytest.mark.parametrize("case", sorted(ORD_BEFORE))
def test_ordinal_logistic_reproduces_the_hand_written_fit(case):
    """Same maximum: the log-likelihood-based values to 1e-9 relative, the coefficients (where two
    optimisers stop at the gradient tolerance) to 1e-6 relative."""
    x, y, before = ORD_BEFORE[case]
    got = ordinal_logistic(x, y)
    assert got["n"] == before["n"] and got["levels"] == before["levels"]
    for k in ("mcfadden_r2", "nagelkerke_r2", "lr_stat", "p"):
        assert got[k] == pytest.approx(before[k], rel=1e-9), k
    assert got["beta"] == pytest.approx(before["beta"], rel=1e-6)
    assert got["cutpoints"] == pytest.approx(before["cutpoints"], rel=1e-6)


def test_spearman_and_ks():
    assert spearman([1, 2, 3, 4], [10, 20, 25, 40])["spearman_r"] == pytest.approx(1.0)
    r = spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    assert r["spearman_r"] == pytest.approx(stats.spearmanr([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]).statistic)
    assert math.isnan(spearman([1, 2], [3, 4])["spearman_r"])
    # D = largest gap between the empirical CDFs: {1,2,3} vs {3,4,5} -> at x = 2.x, 2/3 - 0
    ks = ks_two_samples([1, 2, 3], [3, 4, 5])
    assert ks["ks_statistic"] == pytest.approx(2 / 3)
    assert ks["p"] == pytest.approx(stats.ks_2samp([1, 2, 3], [3, 4, 5]).pvalue)


def test_parse_range_and_pooling():
    assert parse_range("0.1:0.9:0.1") == tuple(round(0.1 * i, 10) for i in range(1, 10))
    assert parse_range("0:15", int) == tuple(range(16))
    assert parse_range("5,0,5", int) == (0, 5)
    with pytest.raises(ValueError):
        parse_range("1.5", int)
    import pandas as pd

    rows = pd.DataFrame([
        dict(region="whole", threshold=0.5, min_cluster_size=0, tpr_tp=3, tpr_fn=1, tpr_n_pred=4,
             n_ref_clusters_kept=4, ppv_tp=3, ppv_fp=1, ppv_n_ref=4, n_pred_clusters_kept=4),
        dict(region="whole", threshold=0.5, min_cluster_size=0, tpr_tp=1, tpr_fn=3, tpr_n_pred=1,
             n_ref_clusters_kept=4, ppv_tp=1, ppv_fp=0, ppv_n_ref=4, n_pred_clusters_kept=1),
    ])
    p = pool_cluster_sizes(rows).iloc[0]
    assert p["cluster_tpr"] == pytest.approx(4 / 8) and p["cluster_ppv"] == pytest.approx(4 / 5)
    assert p["cluster_dice"] == pytest.approx(2 * 0.5 * 0.8 / 1.3)


def test_icc_reproduces_shrout_and_fleiss():
    """Shrout & Fleiss (1979), Table 2: 6 targets, 4 judges; ICC(2,1) = 0.29, ICC(3,1) = 0.71, and the
    95 % intervals McGraw & Wong's formulas give (0.02-0.76, 0.34-0.95, as pingouin's documentation prints)."""
    x = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    r = icc(x)
    assert r["icc_a1"] == pytest.approx(0.2898, abs=1e-4) and r["icc_c1"] == pytest.approx(0.7148, abs=1e-4)
    assert (round(r["icc_a1_low"], 2), round(r["icc_a1_high"], 2)) == (0.02, 0.76)
    assert (round(r["icc_c1_low"], 2), round(r["icc_c1_high"], 2)) == (0.34, 0.95)
    # a constant offset between the two measurements costs agreement, not consistency
    rng = np.random.default_rng(0)
    counts = rng.integers(20, 80, 30).astype(float)
    pair = np.stack([counts, counts + 15 + rng.normal(0, 1, 30)], 1)
    shifted = icc(pair)
    assert shifted["icc_c1"] > 0.99 and shifted["icc_a1"] < shifted["icc_c1"] - 0.05
    assert icc(np.stack([counts, counts], 1))["icc_c1"] == pytest.approx(1.0)
    assert math.isnan(icc([[1, 2], [3, 4]])["icc_a1"])   # fewer than 3 subjects
    with pytest.raises(ValueError, match="at least 2 measurements"):
        icc([[1], [2], [3]])
