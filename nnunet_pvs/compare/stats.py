"""Paired statistics of each model against the baseline, per metric.

* Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided, zero differences dropped, exact
  null distribution for small samples as scipy chooses) on the cases where both values are finite;
* Holm's step-down correction of the p-values over a family of tests (per metric: the models
  compared to the baseline on that metric; or all tests of the report);
* median paired difference (model - baseline) with a percentile bootstrap 95 % CI over cases,
  seeded per (model, metric) so results do not depend on the order of the models.
"""

from __future__ import annotations

import math
import warnings
import zlib

import numpy as np
import pandas as pd
from scipy import stats as sst

# metric -> True when higher is better
METRIC_DIRECTION = {
    "dice": True, "sensitivity": True, "ppv": True,
    "cluster_tpr": True, "cluster_ppv": True, "cluster_dice": True,
    "hd95_mm": False, "cluster_hd95_mm": False, "abs_volume_diff_mm3": False,
}


def finite_pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def wilcoxon_paired(x, y) -> dict:
    """Two-sided Wilcoxon signed-rank test of x vs y (already paired, finite)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    d = x - y
    n_nonzero = int(np.count_nonzero(d))
    if n_nonzero == 0:
        # every pair tied: no evidence of a difference (scipy cannot rank an empty set)
        return {"n_nonzero": 0, "statistic": math.nan, "p": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-sample / ties warnings: the result is still reported
        r = sst.wilcoxon(x, y)
    return {"n_nonzero": n_nonzero, "statistic": float(r.statistic), "p": float(r.pvalue)}


def holm(pvalues) -> np.ndarray:
    """Holm-adjusted p-values; NaNs are left out of the family and stay NaN."""
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = len(idx)
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def bootstrap_median_ci(d, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the median of ``d`` (resampling cases with replacement)."""
    d = np.asarray(d, float)
    if len(d) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    med = np.median(d[idx], axis=1)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(med, [a, 1.0 - a])
    return float(lo), float(hi)


def pair_seed(seed: int, model: str, metric: str, region: str = "whole") -> int:
    return int(seed) * 1_000_003 + zlib.crc32(f"{model}|{metric}|{region}".encode())


def paired_tests(per_case: pd.DataFrame, baseline: str, models: list[str], metrics: list[str],
                 n_boot: int = 10000, seed: int = 0, family: str = "metric", alpha: float = 0.05) -> pd.DataFrame:
    """One row per (region, model, metric) for every model other than ``baseline``.

    ``per_case``: long table with columns ``model``, ``case``, ``region`` and the metrics.
    """
    rows = []
    for region, sub in per_case.groupby("region", sort=False):
        wide = {m: sub[sub["model"] == m].set_index("case") for m in [baseline, *models]}
        for model in models:
            if model == baseline:
                continue
            for metric in metrics:
                a = wide[model][metric]
                b = wide[baseline][metric].reindex(a.index)
                x, y = finite_pairs(a.to_numpy(), b.to_numpy())
                w = wilcoxon_paired(x, y) if len(x) else {"n_nonzero": 0, "statistic": math.nan, "p": math.nan}
                d = x - y
                lo, hi = bootstrap_median_ci(d, n_boot, pair_seed(seed, model, metric, region))
                rows.append({
                    "region": region, "model": model, "baseline": baseline, "metric": metric,
                    "higher_is_better": METRIC_DIRECTION.get(metric, True),
                    "n_pairs": len(x), "n_excluded_nonfinite": int(len(a) - len(x)),
                    "n_nonzero_diff": w["n_nonzero"],
                    "model_median": float(np.median(x)) if len(x) else math.nan,
                    "baseline_median": float(np.median(y)) if len(y) else math.nan,
                    "median_diff": float(np.median(d)) if len(d) else math.nan,
                    "ci95_low": lo, "ci95_high": hi,
                    "wilcoxon_W": w["statistic"], "p": w["p"],
                })
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    if family == "all":
        out["p_holm"] = holm(out["p"].to_numpy())
    elif family == "metric":
        out["p_holm"] = math.nan
        for _, g in out.groupby(["region", "metric"], sort=False):
            out.loc[g.index, "p_holm"] = holm(g["p"].to_numpy())
    else:
        raise ValueError(f"unknown Holm family {family!r} (metric or all)")
    out["significant"] = out["p_holm"] < alpha
    return out
