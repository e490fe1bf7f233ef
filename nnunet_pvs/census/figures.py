"""Pictures of the census (matplotlib, Agg): per-subject axial mosaics and cohort distributions."""

from __future__ import annotations

import io as _io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

FIXED_COLOURS = {"bg": "#ff9f1c", "wm": "#2ec4f6", "outside": "#ff4fd8", "whole": "#ffe135",
                 "mask": "#7cfc00", "bgslice": "#ff9f1c", "csoslice": "#2ec4f6"}
OTHER_COLOURS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6"]


def colours(names) -> dict[str, str]:
    """Region name -> colour: fixed ones for bg, wm, outside, whole; the others in turn."""
    out, k = {}, 0
    for n in names:
        if n in FIXED_COLOURS:
            out[n] = FIXED_COLOURS[n]
        else:
            out[n] = OTHER_COLOURS[k % len(OTHER_COLOURS)]
            k += 1
    return out


def _save(fig, path: Path) -> None:
    """Written plainly: the census writes into a staged folder that appears only when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def png_bytes(fig) -> bytes:
    buf = _io.BytesIO()
    fig.savefig(buf, dpi=100, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def choose_slices(present: np.ndarray, fallback: np.ndarray, k: int, forced: list[int]) -> list[int]:
    """About ``k`` slices spread evenly over those with clusters (else over ``fallback``), ``forced`` included."""
    cand = present if len(present) else fallback
    k_free = max(1, k - len(forced))
    if len(cand) > k_free:  # the middles of k_free equal parts, so the sparse extremes are skipped
        cand = cand[np.unique(((np.arange(k_free) + 0.5) * len(cand) / k_free).astype(int))]
    return sorted(set(int(v) for v in cand) | set(forced))


def display_range(back: np.ndarray) -> tuple[float, float]:
    """Grey-level window of an overlay's background: 1st to 99.5th percentile of its non-zero voxels."""
    vals = back[back != 0] if back.any() else back.ravel()
    sample = vals[:: max(1, len(vals) // 200000)]
    lo, hi = (np.percentile(sample, [1, 99.5]) if len(sample) else (0.0, 1.0))
    return float(lo), float(hi if hi > lo else lo + 1.0)


def slice_panels(shape, ras_zooms, n_panels: int):
    """A black grid of up to 4 axial panels a row, sized about one screen pixel per voxel, axes off;
    returns (figure, axes, extent in mm with x reversed: radiological)."""
    cols = min(4, n_panels)
    rows = int(np.ceil(n_panels / cols))
    sx, sy = shape[0] * ras_zooms[0], shape[1] * ras_zooms[1]
    w = float(np.clip(shape[0] * 1.2 / 100, 2.0, 3.2))
    h = w * sy / sx
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows + 1.0), squeeze=False, facecolor="black")
    for ax in axes.ravel():
        ax.set_axis_off()
    return fig, axes, (sx, 0, 0, sy)


def draw_panel(ax, back2d: np.ndarray, lab2d: np.ndarray, colours2d: np.ndarray, lo: float, hi: float,
               extent) -> None:
    """One axial panel: the background in grey, and where ``lab2d`` is set, ``colours2d`` (RGBA per pixel)."""
    ax.imshow(back2d, cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=extent, interpolation="nearest")
    if lab2d.any():
        ax.imshow(colours2d, origin="lower", extent=extent, interpolation="nearest")


def mosaic(ld, res: dict, case: str, path: Path, n_slices: int = 12) -> None:
    """Axial mosaic of one subject, radiological convention (patient's right on the left), clusters
    coloured by region over the image (or over the prediction without --images)."""
    affine = ld.affine
    ornt = nib.orientations.io_orientation(affine)
    back = ld.image if ld.image is not None else ld.pred.astype(np.float32)
    back = nib.orientations.apply_orientation(back, ornt)
    labels = nib.orientations.apply_orientation(res["labels"], ornt)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    ras_zooms = np.empty(3)
    for i in range(3):
        ras_zooms[int(ornt[i, 0])] = zooms[i]
    src_axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])  # voxel axis that became superior
    flipped = ornt[src_axis, 1] < 0
    nz = labels.shape[2]
    to_src = (lambda k: nz - 1 - k) if flipped else (lambda k: k)
    names = list(ld.regions) + ["outside"] if ld.regions else ["whole"]
    cmap = colours(names)
    code = {n: i + 1 for i, n in enumerate(names)}
    per_cluster = np.zeros(res["n"] + 1, np.int16)
    if res["n"]:
        per_cluster[1:] = [code[r] for r in res["regions"]]
    rgba = np.zeros((len(names) + 1, 4))
    for n_, i in code.items():
        rgba[i] = matplotlib.colors.to_rgba(cmap[n_], 0.8)
    present = np.flatnonzero(labels.any(axis=(0, 1)))
    fallback = np.flatnonzero(back.any(axis=(0, 1))) if back.any() else np.arange(nz)
    marks = {}
    for s in ld.slices:
        if s.index is not None and s.axis == src_axis:
            marks[int(nz - 1 - s.index if flipped else s.index)] = SLICE_TITLE.get(s.name, s.name)
    chosen = choose_slices(present, fallback, n_slices, list(marks))
    lo, hi = display_range(back)
    fig, axes, extent = slice_panels(labels.shape, ras_zooms, len(chosen))
    for ax, k in zip(axes.ravel(), chosen):
        lab2d = labels[:, :, k].T
        draw_panel(ax, back[:, :, k].T, lab2d, rgba[per_cluster[lab2d]], lo, hi, extent)
        n_here = len(np.unique(lab2d)) - (1 if (lab2d == 0).any() else 0)
        title = f"slice {to_src(k)}: {n_here} cluster{'s' if n_here != 1 else ''}"
        if k in marks:
            title = f"{marks[k]}, {title}"
        ax.set_title(title, color="white", fontsize=8)
    axes[0, 0].text(0.02, 0.02, "R", color="white", fontsize=9, transform=axes[0, 0].transAxes)
    axes[0, 0].text(0.94, 0.02, "L", color="white", fontsize=9, transform=axes[0, 0].transAxes)
    counts = pd.Series(res["regions"]).value_counts() if res["n"] else pd.Series(dtype=int)
    handles = [Patch(color=cmap[n_], label=f"{n_} ({int(counts.get(n_, 0))})") for n_ in names]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white",
               fontsize=8)
    height = float(fig.get_size_inches()[1])  # h * rows + 1 inches (slice_panels)
    fig.suptitle(f"{case}: {res['n']} clusters", color="white", fontsize=10, y=1 - 0.12 / height)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.55 / height, bottom=0.5 / height,
                        wspace=0.03, hspace=0.18)
    _save(fig, path)


SLICE_TITLE = {"bgslice": "BG slice", "csoslice": "CSO slice"}


def subject_distributions(subjects: pd.DataFrame, region_order: list[str]) -> bytes:
    """Per-subject count and volume per region: box plots with every subject as a point."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    cmap = colours(region_order)
    rng = np.random.default_rng(0)
    for ax, col, ylabel in zip(axes, ("n_clusters", "volume_mm3"), ("clusters per subject", "PVS volume (mm$^3$)")):
        data = [subjects.loc[subjects["region"] == r, col].to_numpy(float) for r in region_order]
        ax.boxplot(data, showfliers=False, widths=0.5)
        ax.set_xticks(range(1, len(region_order) + 1), region_order)
        for i, (r, d) in enumerate(zip(region_order, data), start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, s=12, color=cmap[r], edgecolor="k",
                       linewidth=0.4, zorder=3)
        ax.set(ylabel=ylabel)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_title("cluster count per subject and region")
    axes[1].set_title("PVS volume per subject and region")
    fig.tight_layout()
    return png_bytes(fig)


def cluster_distributions(clusters: pd.DataFrame, region_order: list[str]) -> bytes:
    """Distributions of cluster volume, length, width and elevation per region (all subjects pooled)."""
    cmap = colours(region_order)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    specs = [("volume_mm3", "cluster volume (mm$^3$)", True), ("length_mm", "length (mm)", False),
             ("width_mm", "width (mm)", False), ("elevation_deg", "elevation (degrees)", False)]
    for ax, (col, xlabel, logx) in zip(axes.ravel(), specs):
        v_all = clusters[col].to_numpy(float)
        v_all = v_all[np.isfinite(v_all)]
        if not len(v_all):
            ax.text(0.5, 0.5, "no clusters", ha="center", va="center", transform=ax.transAxes)
            ax.set(xlabel=xlabel)
            continue
        if logx:
            lo, hi = max(v_all.min(), 1e-3), max(v_all.max(), v_all.min() * 1.01, 1e-3 * 1.01)
            bins = np.geomspace(lo, hi * 1.0001, 30)
            ax.set_xscale("log")
        elif col == "elevation_deg":
            bins = np.linspace(0, 90, 19)
        else:
            bins = np.linspace(0, np.percentile(v_all, 99.5) * 1.05 + 1e-9, 30)
        for r in region_order:
            v = clusters.loc[clusters["region"] == r, col].to_numpy(float)
            v = v[np.isfinite(v)]
            if len(v):
                ax.hist(np.clip(v, bins[0], bins[-1]), bins=bins, histtype="step", lw=1.6, color=cmap[r],
                        label=f"{r} (n={len(v)})")
        ax.set(xlabel=xlabel, ylabel="clusters")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("cluster shape per region, all subjects pooled")
    fig.tight_layout()
    return png_bytes(fig)
