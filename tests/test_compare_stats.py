"""Statistics and training-log parsing of ``nnunet-pvs compare``, against hand computations and scipy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from scipy import stats as sst

from nnunet_pvs.compare.stats import bootstrap_median_diff_ci, holm, paired_tests, wilcoxon_paired
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
    zero = np.zeros_like(d)
    a = bootstrap_median_diff_ci(d, zero, 300, seed=3)
    assert a == bootstrap_median_diff_ci(d, zero, 300, seed=3)
    assert a != bootstrap_median_diff_ci(d, zero, 300, seed=4)
    assert a[0] <= np.median(d) <= a[1]
    assert d.min() <= a[0] and a[1] <= d.max()
    assert bootstrap_median_diff_ci([0.7], [0.5], 100, 0) == pytest.approx((0.2, 0.2))   # one pair
    assert all(math.isnan(v) for v in bootstrap_median_diff_ci([], [], 100, 0))
    assert bootstrap_median_diff_ci([0.6, 0.7], [0.5, 0.6], 100, 0) == pytest.approx((0.1, 0.1))  # all equal


# Outputs of the hand-written code this module had before statsmodels / scipy.stats.bootstrap
# (nnunet_pvs/compare/stats.py at fa95f6d), computed on these inputs before the change.
P_BEFORE = [0.01, 0.04, 0.03, 0.005, math.nan, 0.2, 0.03, 0.5]
HOLM_BEFORE = [0.06, 0.15, 0.15, 0.035, math.nan, 0.4, 0.15, 0.5]
D_BEFORE = [0.0595, -0.0169, 0.0767, 0.0647, 0.1056, -0.0238, -0.0503, 0.0096, -0.0123, -0.0498, 0.0205,
            -0.0557, -0.0187, -0.0701, 0.0086, 0.0526, 0.0278, 0.1152, -0.0392, 0.1691, 0.0639, 0.0122,
            0.062, 0.002, 0.0735]
CI_BEFORE = (-0.0169, 0.062)            # 10000 resamples, the same for seeds 0..4
# a fine-grained case: mean over seeds 0..19 of the old CI, and the spread of one seed's CI (sd)
CI_FINE_BEFORE, CI_FINE_SD = (-0.00450209, 0.04516002), (0.00078491, 0.00020563)


def test_holm_reproduces_the_hand_written_version():
    np.testing.assert_allclose(holm(P_BEFORE), HOLM_BEFORE, rtol=1e-12)


def test_bootstrap_reproduces_the_hand_written_version():
    """Within Monte-Carlo tolerance: on 25 differences rounded to 1e-4 the percentile CI falls on
    data values, and the old code gave the same two for every seed; on 120 distinct differences,
    the mean CI over 5 seeds lies within 4 single-seed standard deviations of the old mean."""
    d = np.asarray(D_BEFORE)
    for seed in range(5):
        assert bootstrap_median_diff_ci(d + 0.5, np.full(len(d), 0.5), 10000, seed) == pytest.approx(CI_BEFORE,
                                                                                                   abs=1e-12)
    fine = 0.1 * np.sin(np.arange(120) * 1.7) + 0.002 * np.arange(120) - 0.1
    got = np.mean([bootstrap_median_diff_ci(fine, np.zeros(120), 10000, s) for s in range(5)], axis=0)
    assert np.all(np.abs(got - CI_FINE_BEFORE) < 4 * np.asarray(CI_FINE_SD)), got


def test_bootstrap_keeps_pairs_together():
    """Model and baseline vary a lot over cases but their difference is 0.1 +- 0.01: resampling pairs
    gives a CI about 0.1 of width ~0.01; resampling the two sides apart would span ~0.5."""
    base = np.linspace(0.1, 0.9, 40)
    model = base + 0.1 + 0.01 * np.sin(np.arange(40))
    lo, hi = bootstrap_median_diff_ci(model, base, 2000, 0)
    assert 0.085 < lo < 0.1 < hi < 0.115


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


def test_paired_tests_take_directions_from_the_registry():
    from nnunet_pvs.metric_registry import UnknownMetric

    cases = [f"c{i}" for i in range(5)]
    metrics = ["dice", "hausdorff_mm", "valdo_abs_count_diff", "epvs_nvd", "n_pred_clusters"]
    df = pd.DataFrame([{"model": m, "case": c, "region": "whole", **{k: i + (m == "M") for k in metrics}}
                       for m in ("B", "M") for i, c in enumerate(cases)])
    out = paired_tests(df, "B", ["M"], metrics, n_boot=50).set_index("metric")
    assert out["direction"].to_dict() == {"dice": "higher", "hausdorff_mm": "lower", "valdo_abs_count_diff": "lower",
                                          "epvs_nvd": "lower", "n_pred_clusters": "neither"}
    assert out["higher_is_better"].to_dict() == {"dice": True, "hausdorff_mm": False, "valdo_abs_count_diff": False,
                                                 "epvs_nvd": False, "n_pred_clusters": None}
    with pytest.raises(UnknownMetric, match="not_a_metric"):
        paired_tests(df.assign(not_a_metric=1.0), "B", ["M"], ["dice", "not_a_metric"], n_boot=50)


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


def _write_voxels(path, xs):
    """A prediction holding the voxels x in ``xs`` on the line y = z = 3 (test_compare's geometry)."""
    import nibabel as nib
    from test_compare import SHAPE

    arr = np.zeros(SHAPE, np.uint8)
    arr[list(xs), 3, 3] = 1
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


def _line_hausdorff(a, b) -> float:
    """Hausdorff distance of two point sets on one line, by brute force."""
    d = np.abs(np.subtract.outer(np.asarray(a, float), np.asarray(b, float)))
    return float(max(d.min(axis=1).max(), d.min(axis=0).max()))


def test_compare_labels_and_bolds_lower_is_better_metrics(nnunet_env, tmp_path):
    """compare on test_compare's fabricated results folders (no training), three of TWO_D's predictions
    split in two by a one-voxel gap: hausdorff_mm, valdo_abs_count_diff and epvs_nvd are lower-is-better
    in stats.csv and report.md, whose --metrics table bolds the smallest mean (computed here by hand);
    a descriptive column is tabulated unranked; an unknown one is refused with one line."""
    from test_compare import BASE, CASES, FOLD_OF, MFNS, REF_RUN, RUNS, TWO_D, compare_cmd, make_dataset, model_folder

    make_dataset(nnunet_env)
    voxels = {m: [list(range(s, e)) for s, e in RUNS[m]] for m in RUNS}
    for i in range(3):
        gap = voxels[TWO_D][i][len(voxels[TWO_D][i]) // 2]
        voxels[TWO_D][i] = [x for x in voxels[TWO_D][i] if x != gap]
        c = CASES[i]
        _write_voxels(model_folder(nnunet_env["nnUNet_results"], TWO_D) / f"fold_{FOLD_OF[c]}" / "validation"
                      / f"{c}.nii.gz", voxels[TWO_D][i])
    ref = list(range(*REF_RUN))
    n_clusters = lambda xs: 1 + int(np.count_nonzero(np.diff(xs) > 1))  # noqa: E731
    hand = {m: {"hausdorff_mm": np.mean([_line_hausdorff(v, ref) for v in voxels[m]]),
                "valdo_abs_count_diff": np.mean([abs(n_clusters(v) - 1) for v in voxels[m]]),
                "epvs_nvd": np.mean([min(1.0, abs(len(v) - len(ref)) / len(ref)) for v in voxels[m]])}
            for m in RUNS}
    lower = ["hausdorff_mm", "valdo_abs_count_diff", "epvs_nvd"]
    out = tmp_path / "report"
    run_cli(compare_cmd(out, "--eval-protocol", "valdo,epvs", "--metrics", ",".join([*lower, "n_pred_clusters"])),
            env=nnunet_env["env"])

    per_case = pd.read_csv(out / "per_case_metrics.csv")
    whole = per_case[per_case.region == "whole"]
    for m in RUNS:
        for metric in lower:
            assert whole.loc[whole.model == m, metric].mean() == pytest.approx(hand[m][metric], abs=1e-12)
    st = pd.read_csv(out / "stats.csv")
    for metric in lower:
        rows = st[st.metric == metric]
        assert len(rows) == 2 and (rows["direction"] == "lower").all() and not rows["higher_is_better"].any()
    desc = st[st.metric == "n_pred_clusters"]
    assert (desc["direction"] == "neither").all() and desc["higher_is_better"].isna().all()
    assert (st[st.metric == "dice"]["direction"] == "higher").all()

    md = (out / "report.md").read_text().splitlines()
    models = [MFNS, BASE, TWO_D]                 # compare_cmd's order, the report's columns
    for metric in lower:
        row = next(line for line in md if line.startswith(f"| `{metric}` |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:3] == ["lower", {"hausdorff_mm": "mm", "valdo_abs_count_diff": "clusters",
                                        "epvs_nvd": "fraction"}[metric]]
        best = min(round(hand[m][metric], 3) for m in models)
        for m, cell in zip(models, cells[3:]):
            assert cell == (f"**{hand[m][metric]:.3f}**" if round(hand[m][metric], 3) == best
                            else f"{hand[m][metric]:.3f}"), (metric, m, cell)
        assert sum(c.startswith("**") for c in cells[3:]) < len(models)   # something is not bold
        for m in (MFNS, TWO_D):                  # the paired-test rows say which way is better
            assert any(line.startswith(f"| {m} | {metric} | lower |") for line in md), (m, metric)
    row = next(line for line in md if line.startswith("| `n_pred_clusters` |"))
    assert "none (descriptive)" in row and "**" not in row
    assert any(line.startswith(f"| {TWO_D} | pred clusters | none (descriptive) |") for line in md)

    bad = run_cli(compare_cmd(tmp_path / "r2", "--metrics", "hausdorff_mm,bogus_metric"), env=nnunet_env["env"],
                  check=False)
    assert bad.returncode == 2 and "bogus_metric" in bad.stderr and "hausdorff_mm" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "r2").exists()
