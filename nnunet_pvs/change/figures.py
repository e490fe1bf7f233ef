"""Pictures of the change (matplotlib, Agg): a per-subject axial mosaic of the baseline image with every
track coloured by its status, and the cohort's volume scatter. Slice choice, colours of the
census's regions and PNG encoding are the census's own (:mod:`nnunet_pvs.census.figures`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from nnunet_pvs.census.figures import choose_slices, display_range, draw_panel, png_bytes, slice_panels
from nnunet_pvs.change.tracks import STATUSES

STATUS_COLOURS = {"stable": "#ffe135", "enlarged": "#ff5a1f", "shrunk": "#2e9cff", "new": "#3ddc4a",
                  "vanished": "#ff3df2", "uncertain": "#a8a8a8"}


def status_mosaic(image: np.ndarray, affine: np.ndarray, track_img: np.ndarray, status: np.ndarray, case: str,
                  path: Path, n_slices: int = 12) -> None:
    """Axial slices of the baseline image, radiological convention (patient's right on the left),
    each track (baseline clusters and the registered follow-up clusters) in its status colour; the
    slices are spread over those holding a change (over all tracks when nothing changed)."""
    ornt = nib.orientations.io_orientation(affine)
    back = nib.orientations.apply_orientation(np.asarray(image, np.float32), ornt)
    tracks = nib.orientations.apply_orientation(track_img, ornt)
    zooms = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    ras_zooms = np.empty(3)
    for i in range(3):
        ras_zooms[int(ornt[i, 0])] = zooms[i]
    src_axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    flipped = ornt[src_axis, 1] < 0
    nz = tracks.shape[2]
    code = np.zeros(len(status) + 1, np.int16)
    code[1:] = [STATUSES.index(s) + 1 for s in status]
    rgba = np.zeros((len(STATUSES) + 1, 4))
    for i, s in enumerate(STATUSES, start=1):
        rgba[i] = matplotlib.colors.to_rgba(STATUS_COLOURS[s], 0.85)
    changed = np.isin(code[tracks], [STATUSES.index(s) + 1 for s in STATUSES if s != "stable"])
    chosen = choose_slices(np.flatnonzero(changed.any(axis=(0, 1))), np.flatnonzero(tracks.any(axis=(0, 1)))
                           if tracks.any() else np.arange(nz), n_slices, [])
    lo, hi = display_range(back)
    fig, axes, extent = slice_panels(tracks.shape, ras_zooms, len(chosen))
    for ax, k in zip(axes.ravel(), chosen):
        lab2d = tracks[:, :, k].T
        draw_panel(ax, back[:, :, k].T, lab2d, rgba[code[lab2d]], lo, hi, extent)
        ax.set_title(f"slice {nz - 1 - k if flipped else k}", color="white", fontsize=8)
    axes[0, 0].text(0.02, 0.02, "R", color="white", fontsize=9, transform=axes[0, 0].transAxes)
    axes[0, 0].text(0.94, 0.02, "L", color="white", fontsize=9, transform=axes[0, 0].transAxes)
    counts = pd.Series(status).value_counts() if len(status) else pd.Series(dtype=int)
    handles = [Patch(color=STATUS_COLOURS[s], label=f"{s} ({int(counts.get(s, 0))})") for s in STATUSES]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white", fontsize=8)
    height = float(fig.get_size_inches()[1])  # h * rows + 1 inches (slice_panels)
    fig.suptitle(f"{case}: {len(status)} tracks, baseline image", color="white", fontsize=10, y=1 - 0.12 / height)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.55 / height, bottom=0.5 / height, wspace=0.03, hspace=0.18)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def volume_scatter(changes: pd.DataFrame) -> bytes:
    """Follow-up against baseline volume of every track of the cohort, coloured by status; new and
    vanished tracks (one volume 0) sit on the axes' lower edges."""
    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    v0 = changes["volume_baseline_mm3"].to_numpy(float)
    v1 = changes["volume_follow_up_mm3"].to_numpy(float)
    pos = np.concatenate([v0[v0 > 0], v1[v1 > 0]])
    lo = float(pos.min()) / 2 if len(pos) else 0.1
    hi = float(pos.max()) * 1.5 if len(pos) else 10.0
    for s in STATUSES:
        sel = changes["status"].to_numpy() == s
        if sel.any():
            ax.scatter(np.maximum(v0[sel], lo), np.maximum(v1[sel], lo), s=14, color=STATUS_COLOURS[s],
                       edgecolor="k", linewidth=0.3, label=f"{s} ({int(sel.sum())})", zorder=3)
    ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, zorder=1)
    ax.set(xscale="log", yscale="log", xlim=(lo * 0.9, hi), ylim=(lo * 0.9, hi), xlabel="baseline volume (mm$^3$)",
           ylabel="follow-up volume (mm$^3$)", title="every track of the cohort")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return png_bytes(fig)
