"""Writing the evaluation outputs: CSVs, summary, Markdown report and plots, into a staging folder
that replaces the output folder as a whole (``nnunet_pvs.staging.staged_folder``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from nnunet_pvs import tables
from nnunet_pvs.staging import earlier_layout, staged_folder
from nnunet_pvs.tables import markdown_table
from nnunet_pvs.evaluation.sweeps import pool_cluster_sizes, size_agreement

KEY_COLUMNS = ("case", "region", "threshold")
SUMMARY_COLUMNS = ["region", "metric", "mean", "std", "median", "q1", "q3", "min", "max", "n", "n_undefined"]

COMMAND = "evaluate"
# an evaluation output of a version before the ownership marker (nnunet_pvs.staging.MARKER)
EARLIER_OUTPUT = earlier_layout("report.md", "# PVS evaluation")

TABLE_METRICS = ["dice", "sensitivity", "ppv", "cluster_tpr", "cluster_ppv", "cluster_dice",
                 "ref_detection_rate", "hd95_mm", "cluster_hd95_mm", "surface_dice", "pq", "lesion_dice",
                 "n_ref_clusters", "n_pred_clusters"]


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """One evaluation table as CSV (10 significant digits), into the staging folder of ``staged_folder``."""
    tables.write_csv(df, path, digits=10)


def metric_columns(per_case: pd.DataFrame) -> list[str]:
    """The metric columns of a per-case table (every column but the keys and file names)."""
    return [c for c in per_case.columns if c not in KEY_COLUMNS and per_case[c].dtype != object]


def summarize(per_case: pd.DataFrame) -> pd.DataFrame:
    """Per (region, metric): mean, sample std (ddof = 1), median, quartiles (linear interpolation),
    min, max, number of defined values and of undefined ones; NaN skipped."""
    rows = []
    for region, g in per_case.groupby("region", sort=False):
        for m in metric_columns(per_case):
            v = g[m].to_numpy(float)
            v = v[~np.isnan(v)]
            if len(v):
                q1, med, q3 = np.percentile(v, [25, 50, 75])
                stats = {"mean": v.mean(), "std": v.std(ddof=1) if len(v) > 1 else math.nan,
                         "median": med, "q1": q1, "q3": q3, "min": v.min(), "max": v.max()}
            else:
                stats = dict.fromkeys(("mean", "std", "median", "q1", "q3", "min", "max"), math.nan)
            rows.append({"region": region, "metric": m, **stats, "n": len(v), "n_undefined": len(g) - len(v)})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def pool_size_groups(df: pd.DataFrame) -> pd.DataFrame:
    """Size-group counts pooled over cases: detection rate and lesion Dice from the pooled counts."""
    if not len(df):
        return pd.DataFrame()
    sums = ["n_ref_clusters", "ref_detected", "n_pred_clusters", "false_positives", "n_lesion_pairs",
            "lesion_dice_sum"]
    g = df.groupby(["region", "threshold", "size_group"], sort=False, dropna=False)[sums].sum().reset_index()
    g["detection_rate"] = g["ref_detected"] / g["n_ref_clusters"].where(g["n_ref_clusters"] > 0)
    g["lesion_dice"] = g["lesion_dice_sum"] / g["n_lesion_pairs"].where(g["n_lesion_pairs"] > 0)
    g["n_cases"] = df.groupby(["region", "threshold", "size_group"], sort=False, dropna=False).size().to_numpy()
    return g


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
    regions = ("given whole to their majority region" if opts.region_mode == "majority"
               else "cut at region borders")
    out = ["# PVS evaluation", "",
           f"{pc['case'].nunique()} case(s), predictions: {kinds}. Clusters: {opts.connectivity}-connected, "
           f"matching rule `{opts.rule}`; probability maps binarised with p >= {opts.threshold:g}. "
           f"Surfaces: {opts.surface_connectivity}-neighbourhood, surface Dice at {opts.nsd_tolerance:g} mm. "
           f"Regions: clusters {regions}."
           + (f" Protocols: {', '.join(opts.protocols)}." if opts.protocols else ""),
           "Summary: mean, sample standard deviation (ddof = 1), median, quartiles, min, max over cases.",
           "Empty-case convention: a ratio with a zero denominator is 1 when reference and prediction "
           "are both empty, else undefined (n/a, left out of means); distances are 0 mm when both are "
           "empty, undefined when only one is.", ""]
    for side, ids in missing.items():
        if ids:
            out += [f"**Ids with {side} ({len(ids)})**: {', '.join(ids)}", ""]
    for region in pc["region"].unique():
        out += [f"## Per case, region `{region}`", "", markdown_table(case_table(pc, region)), ""]
    extra = [c for c in metric_columns(pc) if c.startswith(("valdo_", "epvs_", "shivai_", "truth_", "rater_truth_"))]
    out += ["## Summary (all regions)", "",
            markdown_table(summary[summary["metric"].isin(TABLE_METRICS + extra)]), ""]
    if "rater_truth_dice" in pc.columns:
        w = summary[summary["region"] == "whole"].set_index("metric")
        out += ["## Against the noise-free truth", "",
                f"Mean Dice of the prediction: {w.loc['dice', 'mean']:.3f} against the rater labels, "
                f"{w.loc['truth_dice', 'mean']:.3f} against the truth. The rater labels themselves reach "
                f"Dice {w.loc['rater_truth_dice', 'mean']:.3f} against the truth (median "
                f"{w.loc['rater_truth_dice', 'median']:.3f}): annotation noise caps the Dice that can be "
                "measured against rater labels.", ""]
    if len(agreement):
        out += ["## Cluster size agreement (TP clusters matched to one reference cluster, mm^3, both directions)", "",
                markdown_table(agreement), ""]
    sg = frames.get("size_groups_pooled")
    if sg is not None and len(sg):
        out += ["## Size groups, pooled over cases", "",
                markdown_table(sg[["region", "threshold", "size_group", "n_ref_clusters", "detection_rate",
                                   "n_pred_clusters", "false_positives", "lesion_dice"]]), ""]
    if len(pooled):
        sel = pooled[pooled["min_cluster_size"].isin({0, 1, 5, 10, 15} & set(pooled["min_cluster_size"]))]
        out += ["## Cluster-size filtering, pooled over cases (excerpt; all in cluster_sizes_pooled.csv)", "",
                markdown_table(sel[["region", "threshold", "min_cluster_size", "cluster_tpr",
                                    "cluster_ppv", "cluster_dice"]]), ""]
    if pngs:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    return "\n".join(out)


def write_outputs(out_dir: Path, frames: dict, opts, missing: dict, plots: bool = True) -> None:
    """Write every output file of ``nnunet-pvs evaluate``; ``out_dir`` is replaced as a whole."""
    pc = frames["per_case"]
    summary = summarize(pc)
    pooled = pool_cluster_sizes(frames["cluster_sizes"]) if len(frames["cluster_sizes"]) else pd.DataFrame()
    pairs = frames["size_pairs"]
    if not len(pairs):
        pairs = pd.DataFrame(columns=["case", "region", "threshold", "pred_size_mm3", "ref_size_mm3"])
    agreement = size_agreement(pairs)
    frames["size_groups_pooled"] = pool_size_groups(frames.get("size_groups", pd.DataFrame()))
    with staged_folder(out_dir, COMMAND, legacy=EARLIER_OUTPUT) as stage:
        pngs = []
        if plots:
            from nnunet_pvs.evaluation import plots as pl
            pngs = pl.evaluation_plots(stage, frames, pooled, pairs, agreement, opts)
        write_csv(pc, stage / "per_case.csv")
        if len(frames["thresholds"]):
            write_csv(frames["thresholds"], stage / "thresholds.csv")
        write_csv(frames["cluster_sizes"], stage / "cluster_sizes.csv")
        if len(pooled):
            write_csv(pooled, stage / "cluster_sizes_pooled.csv")
        if len(frames.get("size_groups", [])):
            write_csv(frames["size_groups"], stage / "size_groups.csv")
            write_csv(frames["size_groups_pooled"], stage / "size_groups_pooled.csv")
        write_csv(pairs, stage / "cluster_pairs.csv")
        write_csv(agreement, stage / "size_agreement.csv")
        write_csv(summary, stage / "summary.csv")
        write_csv(frames["inputs"], stage / "inputs.csv")
        (stage / "report.md").write_text(build_report(frames, summary, pooled, agreement, opts, missing, pngs))
