"""Parsing of sweep arguments and cohort-level (pooled) aggregation of the sweeps.

Boutinaud et al. 2021 compute the threshold x cluster-size grid (their Figure 7) from all the
clusters of the evaluation set pooled, not from per-subject averages; ``pool_cluster_sizes``
does that from the per-case counts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from nnunet_pvs.evaluation.clusters import linear_fit
from nnunet_pvs.evaluation.voxel_metrics import harmonic_mean, safe_ratio


def parse_range(text: str, kind=float) -> tuple:
    """``a:b:step`` (inclusive) or ``a,b,c`` into a sorted tuple; for integers ``a:b`` has step 1.

    A float range without a step (``0.1:0.9``) is an error rather than a guess: it would otherwise
    silently give one value.
    """
    raw, text = text, text.strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (2, 3) or (len(parts) == 2 and kind is not int):
                hint = "start:stop:step, e.g. 0.1:0.9:0.1" if kind is not int else "start:stop[:step]"
                raise ValueError(f"bad range {raw!r}; use {hint}")
            start, stop = float(parts[0]), float(parts[1])
            step = float(parts[2]) if len(parts) == 3 else 1.0
            if not step > 0 or stop < start:
                raise ValueError(f"bad range {raw!r}: need stop >= start and step > 0")
            n = int(np.floor((stop - start) / step + 1e-9)) + 1
            vals = [round(start + i * step, 10) for i in range(n)]
        else:
            vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        if str(e).startswith("bad range"):
            raise
        raise ValueError(f"bad range {raw!r}: not a number") from None
    if not vals or not all(np.isfinite(vals)):
        raise ValueError(f"bad range {raw!r}: give at least one finite value")
    if kind is int:
        if any(v != int(v) or v < 0 for v in vals):
            raise ValueError(f"{text!r}: cluster sizes must be non-negative integers")
        return tuple(sorted({int(v) for v in vals}))
    return tuple(sorted(set(vals)))


def pool_cluster_sizes(df: pd.DataFrame) -> pd.DataFrame:
    """Cohort TPR-CL / PPV-CL / Dice-CL per (region, threshold, min size) from pooled counts."""
    rows = []
    for (region, thr, s), g in df.groupby(["region", "threshold", "min_cluster_size"], dropna=False):
        tp_a, fn, tp_b, fp = (int(g[c].sum()) for c in ("tpr_tp", "tpr_fn", "ppv_tp", "ppv_fp"))
        n_ref, n_pred = int(g["n_ref_clusters_kept"].sum()), int(g["n_pred_clusters_kept"].sum())
        tpr = safe_ratio(tp_a, tp_a + fn, n_ref == 0 and int(g["tpr_n_pred"].sum()) == 0)
        ppv = safe_ratio(tp_b, tp_b + fp, n_pred == 0 and int(g["ppv_n_ref"].sum()) == 0)
        rows.append({"region": region, "threshold": thr, "min_cluster_size": s,
                     "cluster_tpr": tpr, "cluster_ppv": ppv, "cluster_dice": harmonic_mean(tpr, ppv),
                     "tpr_tp": tp_a, "tpr_fn": fn, "ppv_tp": tp_b, "ppv_fp": fp,
                     "n_ref_clusters_kept": n_ref, "n_pred_clusters_kept": n_pred, "n_cases": len(g)})
    return pd.DataFrame(rows)


AGREEMENT_COLUMNS = ["region", "threshold", "dependent", "independent", "slope", "intercept", "r2", "n"]


def size_agreement(pairs: pd.DataFrame) -> pd.DataFrame:
    """Linear fits of cluster size per (region, threshold), pooled over cases, in both directions.

    Boutinaud et al. 2021 write that manual (reference) size was fitted on predicted size, while
    their Figure 8 plots predicted size on manual size (slopes 0.58 / 0.87, "sizes
    underestimated"); both fits are given, each row naming its dependent variable. ``pairs`` holds
    only predicted clusters matched to exactly one reference cluster (merges excluded, as the
    paper does).
    """
    rows = []
    for (region, thr), g in pairs.groupby(["region", "threshold"], dropna=False, sort=False):
        ps, rs = g["pred_size_mm3"].to_numpy(), g["ref_size_mm3"].to_numpy()
        rows.append({"region": region, "threshold": thr, "dependent": "reference",
                     "independent": "predicted", **linear_fit(ps, rs)})
        rows.append({"region": region, "threshold": thr, "dependent": "predicted",
                     "independent": "reference", **linear_fit(rs, ps)})
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)
