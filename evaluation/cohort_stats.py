"""Cohort statistics of PVS cluster counts.

- Spearman correlation of predicted counts with each rater's visual counts, and between raters
  (Cai et al. 2024, Figure 6: counts on a basal-ganglia and a centrum-semiovale slice).
- Proportional-odds (ordinal logistic) regression of a 4-level visual rating on the count, with
  McFadden and Nagelkerke pseudo-R^2 and a likelihood-ratio p (Boutinaud et al. 2021, Figs. 10-11
  report a logistic regression's R^2 and p; the rating is ordinal, hence the ordinal model),
  fitted by statsmodels' ``OrderedModel``.
- Two-sample Kolmogorov-Smirnov test of two cohorts' count distributions, with and without small
  clusters (Boutinaud et al. 2021, Figure 12).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

from nnunet_pvs.evaluation.clusters import label, sizes


def count_clusters(mask: np.ndarray, connectivity: int = 26, min_sizes=(0,)) -> dict[int, int]:
    """Number of clusters larger than ``s`` voxels for each ``s`` (``0``: all clusters)."""
    labels, n = label(mask, connectivity)
    sz = sizes(labels, n)[1:]
    return {int(s): int(np.count_nonzero(sz > s)) for s in min_sizes}


def spearman(x, y) -> dict:
    """Spearman r and two-sided p over the pairs where both values are defined."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = ~(np.isnan(x) | np.isnan(y))
    n = int(ok.sum())
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return {"spearman_r": math.nan, "p": math.nan, "n": n}
    res = stats.spearmanr(x[ok], y[ok])
    return {"spearman_r": float(res.statistic), "p": float(res.pvalue), "n": n}


def ordinal_logistic(x, y) -> dict:
    """Proportional-odds model logit P(Y <= j) = theta_j - beta * x, fitted by maximum likelihood
    (statsmodels ``OrderedModel``, logit link, BFGS).

    ``y``: ordered ratings (any sortable values; the levels present are used in order). Returns
    beta (per unit of x), the cut-points, McFadden and Nagelkerke pseudo-R^2 and the
    likelihood-ratio test p against the thresholds-only model. With two levels this is ordinary
    logistic regression of P(Y = upper) on x, with intercept ``-theta``. The count is standardised
    for the fit (counts run to hundreds; the optimiser converges better on unit scale) and beta and
    the cut-points are transformed back.
    """
    from statsmodels.miscmodels.ordinal_model import OrderedModel  # imported on use: about 1 s

    x = np.asarray(x, float)
    y_raw = np.asarray(y)
    ok = ~np.isnan(x) & ~np.isnan(y_raw.astype(float))
    x, y_raw = x[ok], y_raw[ok]
    levels, y = np.unique(y_raw, return_inverse=True)
    n, k = len(x), len(levels)
    nan = {"beta": math.nan, "cutpoints": [], "mcfadden_r2": math.nan, "nagelkerke_r2": math.nan,
           "lr_stat": math.nan, "p": math.nan, "n": n, "levels": [float(v) for v in levels]}
    if k < 2 or n < 3 or np.ptp(x) == 0:
        return nan
    mu, sd = x.mean(), x.std()
    model = OrderedModel(y, ((x - mu) / sd)[:, None], distr="logit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence / separation warnings: the fit is still reported
        res = model.fit(method="bfgs", maxiter=2000, gtol=1e-8, disp=False)
    beta = float(res.params[0] / sd)
    theta_s = model.transform_threshold_params(res.params)[1:-1]   # drop the -inf / inf ends
    theta = theta_s + beta * mu          # theta_s - beta_s * (x - mu)/sd = (theta_s + beta*mu) - beta*x
    ll, ll0 = float(res.llf), float(res.llnull)
    lr = max(0.0, 2.0 * (ll - ll0))
    r2_cs = 1.0 - math.exp(-lr / n)
    r2_max = 1.0 - math.exp(2.0 * ll0 / n)
    return {"beta": beta, "cutpoints": [float(t) for t in theta],
            "mcfadden_r2": 1.0 - ll / ll0 if ll0 < 0 else math.nan,
            "nagelkerke_r2": r2_cs / r2_max if r2_max > 0 else math.nan,
            "lr_stat": lr, "p": float(stats.chi2.sf(lr, 1)), "n": n,
            "levels": [float(v) for v in levels]}


def ks_two_samples(a, b) -> dict:
    """Two-sample Kolmogorov-Smirnov statistic D and two-sided p."""
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if len(a) == 0 or len(b) == 0:
        return {"ks_statistic": math.nan, "p": math.nan, "n_a": len(a), "n_b": len(b)}
    res = stats.ks_2samp(a, b)
    return {"ks_statistic": float(res.statistic), "p": float(res.pvalue), "n_a": len(a), "n_b": len(b),
            "mean_a": float(a.mean()), "mean_b": float(b.mean())}


def icc(ratings) -> dict:
    """Intraclass correlations of an ``n subjects x k measurements`` table (e.g. PVS counts at scan and
    rescan), from the two-way ANOVA mean squares (Shrout & Fleiss 1979; McGraw & Wong 1996):

    - ``icc_a1``: ICC(2,1)/ICC(A,1), absolute agreement of single measurements (a rescan that counts
      10 % more every time lowers it);
    - ``icc_c1``: ICC(3,1)/ICC(C,1), consistency (the ranking of subjects only),

    each with its 95 % confidence interval (McGraw & Wong's F-based intervals). Published PVS-count
    scan-rescan reliabilities (0.82-0.93) are of this kind. Subjects with a missing value are dropped.
    """
    x = np.asarray(ratings, float)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"ratings must be subjects x measurements with at least 2 measurements, got shape {x.shape}")
    x = x[np.isfinite(x).all(1)]
    n, k = x.shape
    nan = {"n": int(n), "icc_a1": math.nan, "icc_a1_low": math.nan, "icc_a1_high": math.nan,
           "icc_c1": math.nan, "icc_c1_low": math.nan, "icc_c1_high": math.nan}
    if n < 3:
        return nan
    grand = x.mean()
    ss_rows = k * ((x.mean(1) - grand) ** 2).sum()
    ss_cols = n * ((x.mean(0) - grand) ** 2).sum()
    ss_err = ((x - grand) ** 2).sum() - ss_rows - ss_cols
    msr, msc = ss_rows / (n - 1), ss_cols / (k - 1)
    mse = ss_err / ((n - 1) * (k - 1))
    if msr == 0 and mse == 0:
        return nan
    a1 = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
    c1 = (msr - mse) / (msr + (k - 1) * mse)
    out = dict(nan, icc_a1=float(a1), icc_c1=float(c1))
    df1, df2 = n - 1, (n - 1) * (k - 1)
    if mse > 0 and a1 < 1:  # consistency: F = MSR / MSE
        f = msr / mse
        fl, fu = f / stats.f.ppf(0.975, df1, df2), f * stats.f.ppf(0.975, df2, df1)
        out.update(icc_c1_low=float((fl - 1) / (fl + k - 1)), icc_c1_high=float((fu - 1) / (fu + k - 1)))
        # absolute agreement: Satterthwaite's degrees of freedom for the denominator (McGraw & Wong, Table 7)
        a, b = k * a1 / (n * (1 - a1)), 1 + k * a1 * (n - 1) / (n * (1 - a1))
        v = (a * msc + b * mse) ** 2 / ((a * msc) ** 2 / (k - 1) + (b * mse) ** 2 / df2)
        fs, fi = stats.f.ppf(0.975, df1, v), stats.f.ppf(0.975, v, df1)
        out.update(icc_a1_low=float(n * (msr - fs * mse) / (fs * (k * msc + (k * n - k - n) * mse) + n * msr)),
                   icc_a1_high=float(n * (fi * msr - mse) / (k * msc + (k * n - k - n) * mse + n * fi * msr)))
    return out
