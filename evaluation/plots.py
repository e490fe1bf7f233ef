"""PNG figures after Boutinaud et al. 2021 (Figs. 6-8, 12) and Cai et al. 2024 (Fig. 6), Agg backend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def save(fig, path: Path) -> str:
    """Written plainly: every caller writes into a staged folder (``nnunet_pvs.staging.staged_folder``)
    that appears only when complete."""
    fig.savefig(path, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path.name


def tpr_ppv_over_thresholds(thr: pd.DataFrame, path: Path) -> str:
    """Mean TPR vs PPV at each threshold, voxel and cluster level, one line per region."""
    wide = thr.pivot_table(index=["case", "region", "threshold"], columns="metric", values="value").reset_index()
    mean = wide.groupby(["region", "threshold"]).mean(numeric_only=True).reset_index()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, (x, y, title) in zip(axes, [("ppv", "sensitivity", "voxel level"),
                                         ("cluster_ppv", "cluster_tpr", "cluster level")]):
        for region, g in mean.groupby("region", sort=False):
            ax.plot(g[x], g[y], "o-", label=region)
            for _, r in g.iterrows():
                ax.annotate(f"{r['threshold']:g}", (r[x], r[y]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set(xlabel="PPV", ylabel="TPR", title=f"TPR vs PPV over thresholds, {title}",
               xlim=(0, 1.02), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, path)


def dice_cl_grid(pooled: pd.DataFrame, path: Path) -> str:
    """Pooled Dice-CL over (threshold x minimum cluster size), one panel per region."""
    regions = list(pooled["region"].unique())
    fig, axes = plt.subplots(1, len(regions), figsize=(5 * len(regions), 4), squeeze=False)
    for ax, region in zip(axes[0], regions):
        g = pooled[pooled["region"] == region]
        if g["threshold"].isna().all():
            ax.plot(g["min_cluster_size"], g["cluster_dice"], "o-")
            ax.set(xlabel="clusters <= s voxels removed", ylabel="Dice-CL", ylim=(0, 1.02))
        else:
            grid = g.pivot_table(index="threshold", columns="min_cluster_size", values="cluster_dice")
            im = ax.imshow(grid.to_numpy(), aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns], fontsize=7)
            ax.set_yticks(range(grid.shape[0]), [f"{t:g}" for t in grid.index], fontsize=7)
            ax.set(xlabel="clusters <= s voxels removed", ylabel="probability threshold")
            fig.colorbar(im, ax=ax, label="Dice-CL")
        ax.set_title(f"Dice-CL (pooled), {region}")
    return save(fig, path)


def cluster_size_fit(pairs: pd.DataFrame, agreement: pd.DataFrame, threshold, path: Path) -> str:
    """Predicted vs reference size of TP clusters with both linear fits (Boutinaud Fig. 8 axes:
    reference on x, predicted on y)."""
    if not np.isnan(threshold):
        pairs = pairs[np.isclose(pairs["threshold"], threshold)]
        agreement = agreement[np.isclose(agreement["threshold"], threshold)]
    regions = list(pairs["region"].unique()) or ["whole"]
    fig, axes = plt.subplots(1, len(regions), figsize=(4.5 * len(regions), 4), squeeze=False)
    for ax, region in zip(axes[0], regions):
        g = pairs[pairs["region"] == region]
        ax.scatter(g["ref_size_mm3"], g["pred_size_mm3"], s=8, alpha=0.5)
        fits = agreement[agreement["region"] == region].set_index("dependent")
        if len(g) and "predicted" in fits.index and np.isfinite(fits.loc["predicted", "slope"]):
            f, b = fits.loc["predicted"], fits.loc["reference"]
            xs = np.linspace(0, g["ref_size_mm3"].max(), 50)
            ax.plot(xs, f["slope"] * xs + f["intercept"], "k-",
                    label=f"pred = {f['slope']:.2f} ref + {f['intercept']:.2f}, R$^2$ {f['r2']:.2f}, n {int(f['n'])}")
            if np.isfinite(b["slope"]) and b["slope"] != 0:
                ax.plot(xs, (xs - b["intercept"]) / b["slope"], "k:",
                        label=f"ref = {b['slope']:.2f} pred + {b['intercept']:.2f}")
            ax.legend(fontsize=7)
        ax.set(xlabel="reference cluster size (mm$^3$)", ylabel="predicted cluster size (mm$^3$)",
               title=f"cluster size, {region}")
    return save(fig, path)


def evaluation_plots(out_dir: Path, frames: dict, pooled: pd.DataFrame, pairs: pd.DataFrame,
                     agreement: pd.DataFrame, opts) -> list[str]:
    """Every plot of ``evaluate`` that the inputs allow; returns the file names written."""
    out = []
    if len(frames["thresholds"]):
        out.append(tpr_ppv_over_thresholds(frames["thresholds"], out_dir / "tpr_ppv_thresholds.png"))
    if len(pooled):
        out.append(dice_cl_grid(pooled, out_dir / "dice_cl_grid.png"))
    is_prob = (frames["inputs"]["kind"] == "probabilities").any()
    out.append(cluster_size_fit(pairs, agreement, opts.threshold if is_prob else np.nan,
                                out_dir / "cluster_size_fit.png"))
    return out


def counts_vs_visual(df: pd.DataFrame, raters: list[str], stats: pd.DataFrame, path: Path) -> str:
    """Predicted cluster counts vs each rater's visual counts with Spearman r (Cai et al. Fig. 6)."""
    fig, axes = plt.subplots(1, len(raters), figsize=(4.5 * len(raters), 4), squeeze=False)
    for ax, rater in zip(axes[0], raters):
        ax.scatter(df[rater], df["n_clusters"], s=14)
        s = stats[stats["rater"] == rater]
        r = s["spearman_r"].iloc[0] if len(s) else np.nan
        p = s["p"].iloc[0] if len(s) else np.nan
        ax.set(xlabel=f"visual count ({rater})", ylabel="predicted clusters",
               title=f"Spearman r = {r:.2f} (p = {p:.2g})")
    return save(fig, path)


def count_distributions(a: np.ndarray, b: np.ndarray, labels: tuple[str, str], title: str, path: Path) -> str:
    """Empirical CDFs of two cohorts' cluster counts (Boutinaud Fig. 12)."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for v, lab in zip((a, b), labels):
        v = np.sort(v)
        ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=lab)
    ax.set(xlabel="clusters per subject", ylabel="cumulative fraction", title=title)
    ax.legend()
    return save(fig, path)
