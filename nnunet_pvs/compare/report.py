"""The comparison report: ``report.md``, CSVs and PNGs, written atomically into one folder that
only `compare` may replace (:mod:`nnunet_pvs.staging`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from nnunet_pvs.staging import check_output_folder, check_writable_target, earlier_layout, staged_folder
from nnunet_pvs import metric_registry
from nnunet_pvs.tables import markdown_table
from nnunet_pvs.compare.training_progress import LEARN_FLOOR, MIN_EPOCHS, NOT_LEARNING, RISE_TOL

VOXEL_METRICS = [("dice", "DSC"), ("sensitivity", "SEN"), ("ppv", "PPV")]
CLUSTER_METRICS = [("cluster_tpr", "cTPR"), ("cluster_ppv", "cPPV"), ("cluster_dice", "cDSC")]
EXTRA_METRICS = [("hd95_mm", "HD95 (mm)"), ("n_ref_clusters", "ref clusters"), ("n_pred_clusters", "pred clusters")]
STATS_METRICS = ["dice", "sensitivity", "ppv", "cluster_tpr", "cluster_ppv", "cluster_dice", "hd95_mm"]
PLOT_METRICS = STATS_METRICS
NAMES = dict(VOXEL_METRICS + CLUSTER_METRICS + EXTRA_METRICS)
REPORT_MARKER = "report.md"
COMMAND = "compare"
# a compare report of a version before the ownership marker: its title. Only this, never any
# report.md: `evaluate` writes one too, and an evaluation must not be taken for an old report.
EARLIER_REPORT = earlier_layout(REPORT_MARKER, "# nnU-Net model comparison")


@dataclass
class ReportData:
    title: str
    command: str
    mode: str                              # "5-fold cross-validation" or "test set ..."
    dataset: str
    reference: Path
    baseline: str
    models: list[str]                      # compared models, baseline included, in order
    excluded: dict[str, str]               # model -> why
    folds: pd.DataFrame                    # model, fold, status, reason
    per_case: pd.DataFrame                 # long: model, case, region, metrics
    stats: pd.DataFrame
    cost: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    models_table: pd.DataFrame = field(default_factory=pd.DataFrame)   # model, checkpoint, budget, convergence
    classical: pd.DataFrame = field(default_factory=pd.DataFrame)      # per model and fold: chosen filter, threshold


# ---------------------------------------------------------------- tables

def wide_table(per_case: pd.DataFrame, models: list[str], metrics: list[str]) -> pd.DataFrame:
    """Rows: cases then ``mean`` and ``std`` (sample, NaN-skipping); columns: (model, metric)."""
    piv = per_case.pivot(index="case", columns="model", values=metrics)
    piv = piv.swaplevel(0, 1, axis=1)
    piv = piv.reindex(columns=pd.MultiIndex.from_product([models, metrics]))
    piv.loc["mean"] = piv.mean(skipna=True)
    piv.loc["std"] = piv.iloc[:-1].std(skipna=True, ddof=1)
    return piv


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def markdown_grouped(table: pd.DataFrame, models: list[str], metrics: list[tuple[str, str]],
                     bold_best: bool = True, digits: int = 3) -> str:
    """Cai et al. Table 2 layout: one row per subject, metric columns grouped by model, mean/std rows,
    the best model of each row and metric in bold (not on the std row), in the metric's direction
    from the metric registry (a descriptive metric is never bolded)."""
    head = ["Subject"] + [f"{m}<br>{short}" for m in models for _, short in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, row in table.iterrows():
        cells = [f"**{case}**" if case in ("mean", "std") else str(case)]
        best = {}
        if bold_best and case != "std" and len(models) > 1:
            for metric, _ in metrics:
                b = metric_registry.get(metric).best(round(float(row[(m, metric)]), digits) for m in models)
                if b is not None:
                    best[metric] = b
        for m in models:
            for metric, _ in metrics:
                v = row[(m, metric)]
                s = _fmt(float(v), digits)
                if metric in best and np.isfinite(v) and round(v, digits) == best[metric]:
                    s = f"**{s}**"
                cells.append(s)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(df: pd.DataFrame) -> str:
    """compare's tables: floats at 3 decimals (``_fmt``), the rest as they are."""
    return markdown_table(df, lambda v: _fmt(v) if isinstance(v, float) else str(v))


def _p(v) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    return f"{v:.2e}" if v < 1e-3 else f"{v:.4f}"


def means_markdown(per_case: pd.DataFrame, models: list[str], metrics: list[str], digits: int = 3) -> str:
    """One row per metric: which way is better (metric registry), its unit and each model's mean over
    subjects (NaN skipped), the best mean in bold; a descriptive metric is tabulated, never bolded."""
    lines = ["| Metric | better | unit | " + " | ".join(models) + " |", "|" + "---|" * (3 + len(models))]
    for metric in metrics:
        entry = metric_registry.get(metric)
        means = [float(per_case.loc[per_case["model"] == m, metric].astype(float).mean()) for m in models]
        best = entry.best(round(v, digits) for v in means) if len(models) > 1 else None
        cells = [f"`{metric}`", entry.better, entry.unit]
        for v in means:
            text = _fmt(v, digits)
            cells.append(f"**{text}**" if best is not None and np.isfinite(v) and round(v, digits) == best else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stats_markdown(stats: pd.DataFrame, region: str = "whole") -> str:
    s = stats[stats["region"] == region]
    lines = ["| Model | Metric | better | n | baseline median | model median | median Δ [95 % CI] | W | p | p (Holm) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in s.iterrows():
        sig = " *" if r["significant"] else ""
        lines.append(
            f"| {r['model']} | {NAMES.get(r['metric'], r['metric'])} | {metric_registry.get(r['metric']).better} "
            f"| {r['n_pairs']} | {_fmt(r['baseline_median'])} "
            f"| {_fmt(r['model_median'])} | {_fmt(r['median_diff'])} [{_fmt(r['ci95_low'])}, {_fmt(r['ci95_high'])}] "
            f"| {_fmt(r['wilcoxon_W'], 1)} | {_p(r['p'])} | {_p(r['p_holm'])}{sig} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- plots

def plot_boxes(per_case: pd.DataFrame, models: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    whole = per_case[per_case["region"] == "whole"]
    n = len(PLOT_METRICS)
    ncol = 4
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.6 * nrow), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes.flat, PLOT_METRICS):
        data = [whole.loc[whole["model"] == m, metric].to_numpy(float) for m in models]
        data = [d[np.isfinite(d)] for d in data]
        ax.boxplot(data, showfliers=False, widths=0.6)
        for i, d in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(d)), d, s=12, alpha=0.7, zorder=3)
        ax.set_title(NAMES.get(metric, metric))
        ax.set_xticks(range(1, len(models) + 1))
        ax.set_xticklabels(models, rotation=30, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_differences(per_case: pd.DataFrame, models: list[str], baseline: str, path: Path) -> None:
    """Per-subject difference (model - baseline) of DSC, SEN, PPV and cluster Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    whole = per_case[per_case["region"] == "whole"]
    metrics = ["dice", "sensitivity", "ppv", "cluster_dice"]
    base = whole[whole["model"] == baseline].set_index("case")
    cases = list(base.index)
    others = [m for m in models if m != baseline]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(min(20, max(6, 0.35 * len(cases) + 3)), 2.6 * len(metrics)),
                             squeeze=False, sharex=True)
    x = np.arange(len(cases))
    width = 0.8 / max(1, len(others))
    for ax, metric in zip(axes[:, 0], metrics):
        for k, m in enumerate(others):
            d = whole[whole["model"] == m].set_index("case")[metric].reindex(cases) - base[metric]
            ax.bar(x - 0.4 + width * (k + 0.5), d.to_numpy(float), width, label=m)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel(f"Δ {NAMES.get(metric, metric)}")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_title(f"per-subject difference vs baseline {baseline}")
    axes[0, 0].legend(fontsize=7, loc="best")
    if len(cases) <= 60:
        axes[-1, 0].set_xticks(x)
        axes[-1, 0].set_xticklabels(cases, rotation=60, ha="right", fontsize=7)
    else:  # too many subjects to name: subject index instead
        axes[-1, 0].set_xlabel("subject (order of table2_voxel.csv)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- report

def render_markdown(d: ReportData, plots: bool) -> str:
    whole = d.per_case[d.per_case["region"] == "whole"]
    n_cases = whole["case"].nunique()
    out = [f"# {d.title}", ""]
    # Exclusions first: a reader must see at once which models are not in the tables.
    if d.excluded:
        out += ["## Models excluded (missing folds, still training, not validated or checkpoint deleted)", ""]
        out += [f"- **{m}**: {why}" for m, why in d.excluded.items()]
        out += [""]
    else:
        out += ["All requested models are complete (no missing folds, none still training).", ""]
    out += [f"- Dataset: `{d.dataset}`", f"- Evaluation: {d.mode}, {n_cases} case(s), identical for every model",
            f"- Reference labels: `{d.reference}`", f"- Baseline: **{d.baseline}**",
            f"- Models compared: {', '.join(d.models)}",
            f"- Command: `{d.command}`", ""]
    out += [f"- {n}" for n in d.notes]
    if d.notes:
        out += [""]
    out += [f"**Warning:** {w}" for w in d.warnings] + ([""] if d.warnings else [])
    if not d.models_table.empty:
        out += ["## Models: checkpoint, budget and convergence", "",
                "Budget = epochs run x training iterations per epoch, read from each fold's `training_log_*.txt` "
                "and `debug.json`, as are the batch size and the training device. Convergence: the EMA pseudo Dice nnU-Net logs per epoch; a fold is "
                f"\"not converged at this budget\" when it rose by more than {RISE_TOL} over the last fifth of the "
                f"epochs, \"undetermined\" with fewer than {MIN_EPOCHS} epochs, and \"{NOT_LEARNING}\" when it "
                f"never exceeded {LEARN_FLOOR} (the network still predicts background only).", ""]
        mt = d.models_table.rename(columns={
            "model": "Model", "status": "Status", "checkpoint": "Checkpoint used (classical: filter chosen)",
            "budget": "Budget run", "batch_size": "Batch", "device": "Device",
            "convergence": "Convergence", "ema_pseudo_dice_last": "final EMA pseudo Dice (mean of folds)"})
        out += [_markdown(mt), ""]
    if not d.classical.empty:
        best = {c: f"best {c.rsplit('_', 1)[1]}" for c in d.classical.columns if c.startswith("best_train_dice_")}
        shown = d.classical.assign(threshold=d.classical["threshold"].map(lambda t: f"{t:.4g}"))
        out += ["### classical: filter, scales and threshold tuned on training folds", "",
                "Per fold, the filter (family and scales: sigmas, or the top-hat's radius r) and threshold with the "
                "highest mean Dice on the fold's training subjects only, applied unchanged to the subjects it is "
                "scored on; *best frangi/sato/tophat*: each family's best mean training Dice.", "",
                _markdown(shown.rename(columns={
                    "model": "Model", "fold": "Fold", "n_train": "training subjects", "n_targets": "scored subjects",
                    "filter": "filter", "scales_mm": "scales (mm)", "threshold": "threshold",
                    "train_dice": "mean training Dice", **best})), ""]
    out += ["## Voxel-level results (Cai et al. 2024, Table 2 layout)", "",
            "One row per subject; DSC = Dice, SEN = sensitivity, PPV = positive predictive value; "
            "mean and sample std over subjects; best model per row in bold.", "",
            markdown_grouped(wide_table(whole, d.models, [m for m, _ in VOXEL_METRICS]), d.models, VOXEL_METRICS),
            "", "## Cluster-level results", "",
            "cTPR = fraction of reference clusters detected, cPPV = fraction of predicted clusters that are "
            "true, cDSC = their harmonic mean (cluster matching rule: "
            f"{d.settings.get('match', 'overlap')}, {d.settings.get('connectivity', 26)}-connectivity).", "",
            markdown_grouped(wide_table(whole, d.models, [m for m, _ in CLUSTER_METRICS]), d.models, CLUSTER_METRICS),
            "", "## Surface distance and cluster counts (mean ± std over subjects)", ""]
    summ = []
    for m in d.models:
        w = whole[whole["model"] == m]
        row = {"Model": m}
        for metric, name in EXTRA_METRICS:
            v = w[metric].astype(float)
            v = v[np.isfinite(v)]
            row[name] = f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else (f"{v.mean():.2f}" if len(v) else "n/a")
        summ.append(row)
    out += [_markdown(pd.DataFrame(summ)), ""]
    regions = [r for r in d.per_case["region"].unique() if r != "whole"]
    further = [m for m in str(d.settings.get("extra_metrics", "none")).split(",") if m and m != "none"]
    if further:
        out += ["## Further metrics (`--metrics`, mean over subjects)", "",
                "*better*: each metric's direction from the metric registry; the best mean in bold "
                "(a descriptive metric is not ranked).", "", means_markdown(whole, d.models, further), ""]
        for region in regions:
            out += [f"### Region `{region}`", "",
                    means_markdown(d.per_case[d.per_case["region"] == region], d.models, further), ""]
    for region in regions:
        reg = d.per_case[d.per_case["region"] == region]
        out += [f"### Region `{region}` (DSC / SEN / PPV / cluster metrics, mean over subjects)", ""]
        t = wide_table(reg, d.models, [m for m, _ in VOXEL_METRICS + CLUSTER_METRICS])
        out += [markdown_grouped(t.loc[["mean", "std"]], d.models, VOXEL_METRICS + CLUSTER_METRICS), ""]
    s = d.settings
    fam = ("the models compared with the baseline on the same metric" if s.get("holm_family") == "metric"
           else "every test of this report")
    out += ["## Paired comparison with the baseline", "",
            f"Wilcoxon signed-rank test (two-sided, `scipy.stats.wilcoxon`, zero differences dropped) of each "
            f"model against **{d.baseline}** on the same subjects, per metric; p-values Holm-corrected over {fam}; "
            f"* marks p (Holm) < {s.get('alpha', 0.05)}. Δ = model − baseline: the median paired difference with a "
            f"percentile bootstrap 95 % CI ({s.get('n_boot')} resamples of subjects, seed {s.get('seed')}). "
            "Pairs with a non-finite value (e.g. HD95 of an empty mask) are left out, so n can differ per "
            "metric. *better*: which way each metric improves (the metric registry); a descriptive metric "
            "(*none*) is tested for a difference only, never called better or worse.", ""]
    if d.stats.empty:
        out += ["(no model besides the baseline)", ""]
    else:
        out += [stats_markdown(d.stats, "whole"), ""]
        for region in regions:
            out += [f"### Region `{region}`", "", stats_markdown(d.stats, region), ""]
    if plots:
        out += ["## Plots", "", "![per-metric box plots](boxplots.png)", "",
                "![per-subject differences vs baseline](differences.png)", ""]
    out += ["## Training cost", "",
            "From nnU-Net's `fold_*/training_log_*.txt` (`Epoch N` and `Epoch time: X s` lines); "
            "epochs are distinct epoch numbers per fold, time per epoch the mean over all logged epochs.", ""]
    cost = d.cost.rename(columns={
        "model": "Model", "status": "Status", "folds_with_logs": "folds logged", "epochs_per_fold": "epochs/fold",
        "epochs_total": "epochs total", "s_per_epoch_mean": "s/epoch (mean)", "s_per_epoch_median": "s/epoch (median)",
        "train_hours_total": "hours total"})
    out += [_markdown(cost), ""]
    out += ["## Files", "",
            "- `per_case_metrics.csv`: every metric of the evaluation module, per model, case and region",
            "- `table2_voxel.csv`, `table_cluster.csv`: the tables above (cases, mean, std)",
            "- `stats.csv`: the paired tests; `training_cost.csv`; `folds.csv`: status of every requested fold",
            "- `models.csv`: checkpoint, budget and convergence per model"
            + ("; `classical_tuning.csv`: the classical filter chosen per fold" if not d.classical.empty else ""), ""]
    return "\n".join(out) + "\n"


def check_output_path(output: Path, what: str = "report folder", report: bool = True) -> None:
    """Refuse an output that cannot be written, before anything is computed: a file, a non-empty
    folder another command or the user wrote (for the report), or a location without write
    permission."""
    output = Path(output).resolve()
    if report:
        check_output_folder(output, COMMAND, legacy=EARLIER_REPORT, what=what)
    else:
        check_writable_target(output, what, want_dir=True)


def write_report(output: Path, d: ReportData, plots: bool = True) -> Path:
    """Everything into a staged folder that then replaces ``output`` as a whole."""
    output = Path(output).resolve()
    with staged_folder(output, COMMAND, legacy=EARLIER_REPORT, what="report folder") as tmp:
        whole = d.per_case[d.per_case["region"] == "whole"]
        d.per_case.to_csv(tmp / "per_case_metrics.csv", index=False)
        for name, metrics in (("table2_voxel.csv", VOXEL_METRICS), ("table_cluster.csv", CLUSTER_METRICS)):
            t = wide_table(whole, d.models, [m for m, _ in metrics])
            t.columns = [f"{m}|{metric}" for m, metric in t.columns]
            t.index.name = "case"
            t.to_csv(tmp / name)
        d.stats.to_csv(tmp / "stats.csv", index=False)
        d.cost.to_csv(tmp / "training_cost.csv", index=False)
        d.folds.to_csv(tmp / "folds.csv", index=False)
        d.models_table.to_csv(tmp / "models.csv", index=False)
        if not d.classical.empty:
            d.classical.to_csv(tmp / "classical_tuning.csv", index=False)
        if plots:
            plot_boxes(d.per_case, d.models, tmp / "boxplots.png")
            plot_differences(d.per_case, d.models, d.baseline, tmp / "differences.png")
        (tmp / REPORT_MARKER).write_text(render_markdown(d, plots))
    return output / REPORT_MARKER
