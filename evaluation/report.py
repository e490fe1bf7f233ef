"""Writing the evaluation outputs: CSVs, summary, Markdown report and plots, each atomically."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from nnunet_pvs.evaluation.case import CASE_METRICS
from nnunet_pvs.evaluation.sweeps import pool_cluster_sizes, size_agreement

TABLE_METRICS = ["dice", "sensitivity", "ppv", "cluster_tpr", "cluster_ppv", "cluster_dice",
                 "ref_detection_rate", "hd95_mm", "cluster_hd95_mm", "n_ref_clusters", "n_pred_clusters"]


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False, float_format="%.10g")
    os.replace(tmp, path)


def summarize(per_case: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof 1), median and number of defined values per (region, metric); NaN skipped."""
    rows = []
    for region, g in per_case.groupby("region", sort=False):
        for m in CASE_METRICS:
            v = g[m].to_numpy(float)
            v = v[~np.isnan(v)]
            rows.append({"region": region, "metric": m,
                         "mean": v.mean() if len(v) else math.nan,
                         "std": v.std(ddof=1) if len(v) > 1 else math.nan,
                         "median": float(np.median(v)) if len(v) else math.nan,
                         "n": len(v), "n_undefined": len(g) - len(v)})
    return pd.DataFrame(rows)


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "n/a"
        if float(v).is_integer() and abs(v) >= 10:
            return f"{v:.0f}"
        return f"{v:.2g}" if 0 < abs(v) < 0.01 else f"{v:.3f}"
    return str(v)


def markdown_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def case_table(per_case: pd.DataFrame, region: str) -> pd.DataFrame:
    """Cai et al. Table 2 style: one row per case, then mean and std rows."""
    g = per_case[per_case["region"] == region][["case", *TABLE_METRICS]].reset_index(drop=True)
    num = g[TABLE_METRICS].astype(float)
    extra = pd.DataFrame([["mean", *num.mean().tolist()], ["std", *num.std(ddof=1).tolist()]],
                         columns=g.columns)
    return pd.concat([g, extra], ignore_index=True)


def build_report(frames: dict, summary: pd.DataFrame, pooled: pd.DataFrame, agreement: pd.DataFrame,
                 opts, missing: dict, pngs: list[str]) -> str:
    pc = frames["per_case"]
    kinds = ", ".join(sorted(frames["inputs"]["kind"].unique()))
    out = ["# PVS evaluation", "",
           f"{pc['case'].nunique()} case(s), predictions: {kinds}. Clusters: {opts.connectivity}-connected, "
           f"matching rule `{opts.rule}`; probability maps binarised with p >= {opts.threshold:g}.",
           "Empty-case convention: a ratio with a zero denominator is 1 when reference and prediction "
           "are both empty, else undefined (n/a, left out of means); distances are 0 mm when both are "
           "empty, undefined when only one is.", ""]
    for side, ids in missing.items():
        if ids:
            out += [f"**Ids with {side} ({len(ids)})**: {', '.join(ids)}", ""]
    for region in pc["region"].unique():
        out += [f"## Per case, region `{region}`", "", markdown_table(case_table(pc, region)), ""]
    out += ["## Summary (all regions)", "",
            markdown_table(summary[summary["metric"].isin(TABLE_METRICS)]), ""]
    if len(agreement):
        out += ["## Cluster size agreement (reference size ~ predicted size, TP clusters, mm^3)", "",
                markdown_table(agreement), ""]
    if len(pooled):
        sel = pooled[pooled["min_cluster_size"].isin({0, 1, 5, 10, 15} & set(pooled["min_cluster_size"]))]
        out += ["## Cluster-size filtering, pooled over cases (excerpt; all in cluster_sizes_pooled.csv)", "",
                markdown_table(sel[["region", "threshold", "min_cluster_size", "cluster_tpr",
                                    "cluster_ppv", "cluster_dice"]]), ""]
    if pngs:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    return "\n".join(out)


def write_outputs(out_dir: Path, frames: dict, opts, missing: dict, plots: bool = True) -> None:
    """Write every output file of ``nnunet-pvs evaluate`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pc = frames["per_case"]
    summary = summarize(pc)
    pooled = pool_cluster_sizes(frames["cluster_sizes"]) if len(frames["cluster_sizes"]) else pd.DataFrame()
    pairs = frames["size_pairs"]
    if not len(pairs):
        pairs = pd.DataFrame(columns=["case", "region", "threshold", "pred_size_mm3", "ref_size_mm3"])
    agreement = size_agreement(pairs)
    pngs = []
    if plots:
        from nnunet_pvs.evaluation import plots as pl
        pngs = pl.evaluation_plots(out_dir, frames, pooled, pairs, agreement, opts)
    atomic_csv(pc, out_dir / "per_case.csv")
    if len(frames["thresholds"]):
        atomic_csv(frames["thresholds"], out_dir / "thresholds.csv")
    atomic_csv(frames["cluster_sizes"], out_dir / "cluster_sizes.csv")
    if len(pooled):
        atomic_csv(pooled, out_dir / "cluster_sizes_pooled.csv")
    atomic_csv(pairs, out_dir / "cluster_pairs.csv")
    atomic_csv(agreement, out_dir / "size_agreement.csv")
    atomic_csv(summary, out_dir / "summary.csv")
    atomic_csv(frames["inputs"], out_dir / "inputs.csv")
    atomic_write_text(out_dir / "report.md", build_report(frames, summary, pooled, agreement, opts,
                                                          missing, pngs))
