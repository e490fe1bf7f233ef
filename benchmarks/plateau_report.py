"""The plateau study's report from what ``bench_plateau.py`` recorded: ``plateau_study.md`` and
``plateau_curves.png`` (kept apart from the training loop so a report can be rebuilt at any time)."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

CONTRAST_TEXT = {"T2w": "T2w-like, 2D (axial slices of 0.69 x 0.69 x 2 mm)", "T1w": "T1w-like, 3D (1 mm isotropic)"}


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}f}"
    return str(v)


def plot_curves(rows: pd.DataFrame, curves: pd.DataFrame, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contrasts = [c for c in ("T2w", "T1w") if c in set(rows["contrast"])]
    fig, axes = plt.subplots(len(contrasts), 2, figsize=(12, 4.2 * len(contrasts)), squeeze=False)
    for i, contrast in enumerate(contrasts):
        sub = curves[curves["contrast"] == contrast]
        r = rows[rows["contrast"] == contrast]
        for j, (x, xlabel) in enumerate((("iterations", "training iterations"),
                                         ("train_seconds", "training seconds (nnU-Net's epoch durations)"))):
            ax = axes[i, j]
            for k, (model, c) in enumerate(sub.groupby("model", sort=False)):
                color = f"C{k}"
                ax.plot(c[x], c["ema_pseudo_dice"], color=color, label=f"{model}: online validation Dice (EMA)")
                ax.plot(c[x], c["pseudo_dice"], color=color, alpha=0.25, lw=0.8)
                end = r[r["model"] == model]
                if len(end):
                    ax.scatter([c[x].iloc[-1]], [end["dice_rater"].iloc[0]], color=color, marker="o", zorder=3,
                               label=f"{model}: full-volume Dice at the end")
            classical = r[r["convergence"].astype(str).str.startswith("n/a")]
            for _, c in classical.iterrows():
                ax.axhline(c["dice_rater"], color="k", ls="--", lw=1, label=f"{c['model']} ({c['trainer']})")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out Dice")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.set_title(f"{CONTRAST_TEXT[contrast]}, fold 0")
            if j == 0:
                ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = dest.with_name(f".{dest.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, dest)


def _compare_lines(study: Path, contrast: str) -> list[str]:
    folder = study / f"compare_{contrast}"
    stats = folder / "stats.csv"
    if not stats.exists():
        return [f"The paired comparison (`nnunet-pvs compare`) of the {contrast}-like models runs once all of "
                "them are trained; not yet."]
    s = pd.read_csv(stats)
    s = s[s["metric"] == "dice"] if "metric" in s.columns else s
    lines = [f"Paired comparison (`nnunet-pvs compare`, Wilcoxon signed-rank over the fold's validation subjects, "
             f"Holm-corrected): [{folder.name}/report.md]({folder.name}/report.md).", ""]
    cols = [c for c in ("model", "baseline", "median_diff", "ci_low", "ci_high", "p", "p_holm", "n") if c in s.columns]
    if cols:
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(v, 4) for v in rec) + " |" for rec in s[cols].itertuples(index=False)]
    return lines


def write_report(results: Path, rows_csv: Path, curves_csv: Path, study: Path) -> None:
    from nnunet_pvs.staging import write_text_atomic

    if not rows_csv.exists():
        print("nothing recorded yet")
        return
    rows = pd.read_csv(rows_csv)
    curves = pd.read_csv(curves_csv) if curves_csv.exists() else pd.DataFrame()
    if len(curves):
        plot_curves(rows, curves, results / "plateau_curves.png")
    digests = json.loads((study / "phantom_digest.json").read_text()) if (study / "phantom_digest.json").exists() else {}
    lines = [
        "# Trained to a plateau: MfNS_De, stock nnU-Net, the AE U-Net and the best classical filter on the phantom",
        "",
        f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `benchmarks/bench_plateau.py` from the rows in "
        "`plateau_study.csv` (each recorded when its model finished; the time is in the column `recorded_utc`). "
        f"{os.cpu_count()} CPU cores, no GPU, `-device cpu`, `nnUNet_compile=f`, one augmentation worker.",
        "",
        "**Protocol.** `nnunet-pvs phantom --size small --subjects 20 --seed 0` (generator "
        + ", ".join(f"`{k}` digest `{v[:12]}`" for k, v in digests.items())
        + "), `nnUNetv2_plan_and_preprocess`, `nnUNetv2_train DATASET CONFIG 0 -tr <model>_budget` (fold 0 of "
        "nnU-Net's own 5-fold split: 16 training, 4 held-out subjects), scores on the 4 held-out subjects inside "
        "white matter + basal ganglia. Epochs of 50 training and 10 validation iterations (nnU-Net's 5 : 1). "
        "**Budget:** a cap of " + ", ".join(sorted({f"{v:g}" for v in rows["cap_minutes"].dropna()}) or ["?"])
        + " minutes of training per model (the sum of nnU-Net's epoch durations; less than the issue's 75 so that "
        "both T2w models and their comparison fit one 180-minute session on 2 cores); after 3 "
        "epochs each trainer measured its epoch time and planned the epochs that fit the cap, in the learning-rate "
        "schedule too, so stock nnU-Net's poly decay ends inside the cap (MfNS_De's Adagrad and the AE U-Net's Adam "
        "run at a constant rate, as in the papers). **Plateau:** training stopped once the online validation Dice "
        "(nnU-Net's pseudo Dice on patches of the held-out subjects, every epoch) gained less than 0.01 over the "
        "last fifth of at least 10 epochs, the gain being its least-squares trend over the last two fifths "
        "projected over the last fifth. A first rule on nnU-Net's EMA of that Dice stopped MfNS_De after 500 "
        "iterations: the EMA lags (it moves a tenth of the way per epoch), so it was replaced and MfNS_De resumed "
        "(`nnUNetv2_train --c`). Process CPU seconds are recorded beside "
        "the training seconds: the machine was shared with lighter work (niced), so wall times are upper bounds.",
        "",
    ]
    show = ["model", "iterations", "batch_size", "samples_seen", "train_seconds", "cpu_seconds", "convergence",
            "dice_rater", "dice_truth", "cluster_f1"]
    for contrast in ("T2w", "T1w"):
        r = rows[rows["contrast"] == contrast]
        if not len(r):
            continue
        lines += [f"## {CONTRAST_TEXT[contrast]}", "",
                  "| " + " | ".join(show) + " | stopped |", "|" + "---|" * (len(show) + 1)]
        for _, rec in r.iterrows():
            lines.append("| " + " | ".join(_fmt(rec.get(c), 0 if c in ("train_seconds", "cpu_seconds", "iterations",
                                                                    "batch_size", "samples_seen") else 3)
                                           if not isinstance(rec.get(c), str) else rec.get(c) for c in show)
                         + f" | {rec.get('stopped', '')} |")
        lines.append("")
        mf = r[r["model"] == "MfNS_De"]
        if len(mf) and "paper_epoch50_note" in mf.columns:
            lines += [f"MfNS_De and the paper's tested epoch 50 (12,500 iterations of batch 4): "
                      f"{mf['paper_epoch50_note'].iloc[0]}.", ""]
        lines += _compare_lines(study, contrast) + [""]
    lines += ["**Limits.** One fold, 4 held-out subjects: a Wilcoxon signed-rank test on 4 pairs cannot reach "
              "p < 0.125, so no difference here is significant. The online validation Dice per epoch (10 batches) "
              "varies by about +-0.02, so the plateau rule cannot resolve gains of 0.01 reliably over a few epochs. "
              "Stock nnU-Net's plan uses batch 24 at 160 x 160, so its epochs take minutes on 2 cores and it "
              "completed only the epochs that fit the cap (its poly schedule ended there, but its Dice was still "
              "rising): a budget comparison, not a comparison at plateau. The machine was shared with niced "
              "test runs during the trainings (compare each row's `cpu_seconds` with its `train_seconds`).", "",
              "Columns: `dice_rater` against the rater labels, `dice_truth` against the noise-free truth, "
              "`cluster_f1` = harmonic mean of cluster sensitivity and precision (26-connected, any overlap), all "
              "inside white matter + basal ganglia, mean over the held-out subjects. The classical row's filter, "
              "scales and threshold were all chosen on the 16 training subjects only.",
              "", "![curves](plateau_curves.png)", ""]
    write_text_atomic(results / "plateau_study.md", "\n".join(lines))
    print(f"written {results / 'plateau_study.md'}")
