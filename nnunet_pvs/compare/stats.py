"""Paired statistics of each model against the baseline, per metric.

* Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided, zero differences dropped, exact
  null distribution for small samples as scipy chooses) on the cases where both values are finite;
* Holm's step-down correction of the p-values over a family of tests (per metric: the models
  compared to the baseline on that metric; or all tests of the report), by statsmodels'
  ``multipletests(method="holm")``;
* median paired difference (model - baseline) with a percentile bootstrap 95 % CI over cases
  (``scipy.stats.bootstrap``, paired), seeded per (model, metric) so results do not depend on the
  order of the models;
* each metric's direction (higher / lower is better, or descriptive) from
  :mod:`nnunet_pvs.metric_registry`; an unknown metric is refused, never guessed.
"""

from __future__ import annotations

import math
import warnings
import zlib

import numpy as np
import pandas as pd
from scipy import stats as sst

from nnunet_pvs import metric_registry


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
    """Holm-adjusted p-values (statsmodels' ``multipletests``, method ``holm``); NaNs are left out
    of the family and stay NaN."""
    from statsmodels.stats.multitest import multipletests  # imported on use: about 1 s

    p = np.asarray(pvalues, float)
    out = np.full(p.shape, math.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


def _median_diff(x, y, axis=-1):
    return np.median(x - y, axis=axis)


def bootstrap_median_diff_ci(x, y, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the median paired difference ``x - y``: cases are resampled with
    replacement, each keeping its pair (``scipy.stats.bootstrap``, ``paired=True``,
    ``method="percentile"``). One pair: the CI is its difference; none: NaN. It replaced a
    hand-written resampler that was not much faster (10 000 resamples: 9 vs 16 ms for 25 cases,
    41 vs 63 ms for 100, 131 vs 133 ms for 400)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) == 1:  # every resample is that one pair (scipy needs two observations)
        return float(x[0] - y[0]), float(x[0] - y[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all differences equal: scipy warns, the CI is still that value
        res = sst.bootstrap((x, y), _median_diff, n_resamples=n_boot, paired=True, vectorized=True,
                            confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return float(ci.low), float(ci.high)


def pair_seed(seed: int, model: str, metric: str, region: str = "whole") -> int:
    return int(seed) * 1_000_003 + zlib.crc32(f"{model}|{metric}|{region}".encode())


def paired_tests(per_case: pd.DataFrame, baseline: str, models: list[str], metrics: list[str],
                 n_boot: int = 10000, seed: int = 0, family: str = "metric", alpha: float = 0.05) -> pd.DataFrame:
    """One row per (region, model, metric) for every model other than ``baseline``.

    ``per_case``: long table with columns ``model``, ``case``, ``region`` and the metrics. Each row
    carries the metric's ``direction`` (``higher``, ``lower`` or ``neither``) and
    ``higher_is_better`` (empty for a descriptive metric); a metric the registry does not know is
    an ``UnknownMetric`` error before anything is computed.
    """
    directions = {m: metric_registry.get(m) for m in metrics}
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
                lo, hi = bootstrap_median_diff_ci(x, y, n_boot, pair_seed(seed, model, metric, region))
                rows.append({
                    "region": region, "model": model, "baseline": baseline, "metric": metric,
                    "direction": directions[metric].direction.value,
                    "higher_is_better": directions[metric].higher_is_better,
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
