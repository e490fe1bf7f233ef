"""Statistics and training-log parsing of ``nnunet-pvs compare``, against hand computations and scipy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sst

from nnunet_pvs.compare.stats import bootstrap_median_ci, holm, paired_tests, wilcoxon_paired
from nnunet_pvs.compare.training_cost import fold_cost, model_cost


def test_holm_by_hand():
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> max 0.06)
    got = holm(p)
    np.testing.assert_allclose(got[:4], [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    assert math.isnan(got[4])
    np.testing.assert_allclose(holm([0.6, 0.5]), [1.0, 1.0])  # capped at 1, monotone


def test_wilcoxon_matches_scipy_with_ties_and_zeros():
    x = np.array([0.9, 0.8, 0.85, 0.7, 0.95, 0.6, 0.8, 0.75])
    y = np.array([0.8, 0.8, 0.80, 0.6, 0.90, 0.7, 0.7, 0.70])
    w = wilcoxon_paired(x, y)
    ref = sst.wilcoxon(x, y)
    assert w["statistic"] == pytest.approx(ref.statistic) and w["p"] == pytest.approx(ref.pvalue)
    assert w["n_nonzero"] == 7
    z = wilcoxon_paired(x, x)  # every pair tied: no evidence of a difference
    assert z["n_nonzero"] == 0 and z["p"] == 1.0 and math.isnan(z["statistic"])


def test_bootstrap_is_seeded_and_brackets_the_median():
    d = np.random.default_rng(0).normal(0.05, 0.1, 30)
    a = bootstrap_median_ci(d, 300, seed=3)
    assert a == bootstrap_median_ci(d, 300, seed=3)
    assert a != bootstrap_median_ci(d, 300, seed=4)
    assert a[0] <= np.median(d) <= a[1]
    assert d.min() <= a[0] and a[1] <= d.max()


def test_paired_tests_drop_nonfinite_pairs_and_are_order_independent():
    cases = [f"c{i}" for i in range(6)]
    base = [0.5, 0.6, 0.7, 0.4, 0.55, 0.65]
    m1 = [0.6, 0.7, 0.75, 0.5, math.nan, 0.7]
    m2 = [0.4, 0.65, 0.6, 0.45, 0.5, 0.6]
    rows = [{"model": m, "case": c, "region": "whole", "dice": v}
            for m, vals in (("B", base), ("M1", m1), ("M2", m2)) for c, v in zip(cases, vals)]
    df = pd.DataFrame(rows)
    out = paired_tests(df, "B", ["B", "M1", "M2"], ["dice"], n_boot=500, seed=1).set_index("model")
    assert out.loc["M1", "n_pairs"] == 5 and out.loc["M1", "n_excluded_nonfinite"] == 1
    keep = [0, 1, 2, 3, 5]
    ref = sst.wilcoxon(np.array(m1)[keep], np.array(base)[keep])
    assert out.loc["M1", "p"] == pytest.approx(ref.pvalue)
    rev = paired_tests(df, "B", ["M2", "M1"], ["dice"], n_boot=500, seed=1).set_index("model")
    for col in ("ci95_low", "ci95_high", "p", "p_holm"):
        assert rev.loc["M1", col] == pytest.approx(out.loc["M1", col])
    allfam = paired_tests(df, "B", ["M1", "M2"], ["dice"], n_boot=100, family="all")
    np.testing.assert_allclose(allfam["p_holm"], holm(allfam["p"]))


def test_training_log_parsing_counts_resumed_epochs_once(tmp_path):
    fd = tmp_path / "fold_0"
    fd.mkdir()
    (fd / "training_log_2026_1_1_10_00_00.txt").write_text(
        "2026-01-01 10:00:00.1: Epoch 0 \n2026-01-01 10:00:01.1: Epoch time: 10.0 s \n"
        "2026-01-01 10:00:02.1: Epoch 1 \n2026-01-01 10:00:03.1: Epoch time: 12.0 s \n"
        "2026-01-01 10:00:04.1: Epoch 2 \n")  # killed during epoch 2
    (fd / "training_log_2026_1_1_11_00_00.txt").write_text(
        "2026-01-01 11:00:00.1: Epoch 2 \n2026-01-01 11:00:01.1: Epoch time: 14.0 s \n"
        "2026-01-01 11:00:02.1: This epoch took 3 s\n")
    c = fold_cost(fd)
    assert c["epochs"] == 3 and c["epoch_times"] == [10.0, 12.0, 14.0]
    m = model_cost("M", tmp_path, [0, 1], "compared")
    assert m["folds_with_logs"] == 1 and m["epochs_total"] == 3
    assert m["s_per_epoch_mean"] == pytest.approx(12.0)
    assert m["train_hours_total"] == pytest.approx(36.0 / 3600)


def _signed(neg_ranks: set[int]) -> list[float]:
    """Six paired differences 0.01..0.06 (ranks 1..6), negative at the given ranks."""
    return [(-1 if r in neg_ranks else 1) * r / 100 for r in range(1, 7)]


def test_holm_families_differ_over_metrics_and_regions():
    """Two models x two metrics x two regions on six subjects without ties. scipy's exact two-sided
    p of the signed-rank test is 2 * #{subsets of ranks 1..6 with sum <= W} / 64, so W = 0, 1, 2, 3
    give p = 2/64, 4/64, 6/64, 10/64. Holm is then applied by hand to each family."""
    p_of = {0: 2 / 64, 1: 4 / 64, 2: 6 / 64, 3: 10 / 64}
    negative = {  # (region, metric, model) -> the rank that is negative (W), or none
        ("whole", "dice", "M1"): set(), ("whole", "dice", "M2"): {1},
        ("whole", "ppv", "M1"): {2}, ("whole", "ppv", "M2"): {3},
        ("wm", "dice", "M1"): set(), ("wm", "dice", "M2"): {2},
        ("wm", "ppv", "M1"): {1}, ("wm", "ppv", "M2"): {3},
    }
    cases = [f"s{i}" for i in range(6)]
    rows = []
    for region in ("whole", "wm"):
        for model in ("B", "M1", "M2"):
            for i, c in enumerate(cases):
                row = {"model": model, "case": c, "region": region}
                for metric in ("dice", "ppv"):
                    d = 0.0 if model == "B" else _signed(negative[(region, metric, model)])[i]
                    row[metric] = 0.5 + d
                rows.append(row)
    df = pd.DataFrame(rows)
    fam_metric = paired_tests(df, "B", ["B", "M1", "M2"], ["dice", "ppv"], n_boot=50, alpha=0.07, family="metric")
    fam_all = paired_tests(df, "B", ["B", "M1", "M2"], ["dice", "ppv"], n_boot=50, alpha=0.07, family="all")
    assert len(fam_all) == 8
    for out in (fam_metric, fam_all):
        for _, r in out.iterrows():
            w = min(negative[(r["region"], r["metric"], r["model"])], default=0)
            assert r["p"] == pytest.approx(p_of[w], rel=1e-12)
    # family "metric": two tests per (region, metric), (M1, M2):
    # whole/dice 2/64, 4/64 -> 2 * 2/64 = 0.0625, max(0.0625, 4/64) = 0.0625
    # whole/ppv  6/64, 10/64 -> 0.1875, max(0.1875, 0.15625) = 0.1875
    # wm/dice    2/64, 6/64 -> 0.0625, 0.09375;  wm/ppv 4/64, 10/64 -> 0.125, 0.15625
    expected_metric = {("whole", "dice"): (0.0625, 0.0625), ("whole", "ppv"): (0.1875, 0.1875),
                       ("wm", "dice"): (0.0625, 0.09375), ("wm", "ppv"): (0.125, 0.15625)}
    for (region, metric), (h1, h2) in expected_metric.items():
        sub = fam_metric[(fam_metric.region == region) & (fam_metric.metric == metric)].set_index("model")
        assert sub.loc["M1", "p_holm"] == pytest.approx(h1, rel=1e-12)
        assert sub.loc["M2", "p_holm"] == pytest.approx(h2, rel=1e-12)
    # family "all": eight tests; sorted p 2/64 x2, 4/64 x2, 6/64 x2, 10/64 x2
    # -> 8*2/64 = 0.25, max(0.25, 7*2/64) = 0.25, 6*4/64 = 0.375, then max(0.375, ...) = 0.375 for the rest
    for _, r in fam_all.iterrows():
        w = negative[(r["region"], r["metric"], r["model"])]
        assert r["p_holm"] == pytest.approx(0.25 if not w else 0.375, rel=1e-12)
    # the families disagree on significance at alpha 0.07: M1 and M2 on whole-brain Dice
    sig_metric = fam_metric[fam_metric.significant][["region", "metric", "model"]].values.tolist()
    assert sorted(map(tuple, sig_metric)) == [("whole", "dice", "M1"), ("whole", "dice", "M2"), ("wm", "dice", "M1")]
    assert not fam_all["significant"].any()
