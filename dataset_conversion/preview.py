"""PNG preview of an nnU-Net raw dataset: axial slices of a few cases, with the PVS mask overlaid.

People judge a dataset by looking at it; the slice shown per case is the one with most PVS voxels.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from nnunet_pvs import aseg
from nnunet_pvs.staging import write_file_atomic


# aseg label pairs (left, right) -> one colour per structure, both hemispheres alike
_CATEGORIES = [aseg.STRUCTURES[s] for s in ("cerebral_white_matter", "cortex", "lateral_ventricle", "thalamus",
                                             "caudate", "putamen", "pallidum", "accumbens")]
_CATEGORIES[2] = _CATEGORIES[2] + aseg.STRUCTURES["csf"]  # ventricles and extra-ventricular CSF alike


def _categories(lab: np.ndarray) -> np.ndarray:
    out = np.where(lab > 0, len(_CATEGORIES) + 1, 0)
    for k, labels in enumerate(_CATEGORIES, start=1):
        out[np.isin(lab, labels)] = k
    return out


def write_preview(dataset_dir: Path, out_png: Path | None = None, n_cases: int = 4) -> Path:
    """Rows: cases of ``labelsTr``; columns: image, image + mask (red), region labels. Returns the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset_dir = Path(dataset_dir)
    out_png = Path(out_png) if out_png else dataset_dir / "preview.png"
    ds = json.loads((dataset_dir / "dataset.json").read_text())
    channel = ds["channel_names"]["0"]
    cases = sorted(p.name[: -len(".nii.gz")] for p in (dataset_dir / "labelsTr").glob("*.nii.gz"))[:n_cases]
    if not cases:
        raise ValueError(f"{dataset_dir}: no labelsTr cases to preview")
    regions_dir = dataset_dir / "regions"
    fig, axes = plt.subplots(len(cases), 3, figsize=(9, 3.1 * len(cases)), squeeze=False)
    for row, cid in zip(axes, cases):
        img_nii = nib.load(str(dataset_dir / "imagesTr" / f"{cid}_0000.nii.gz"))
        img = img_nii.get_fdata(dtype=np.float32)
        seg = np.asanyarray(nib.load(str(dataset_dir / "labelsTr" / f"{cid}.nii.gz")).dataobj) > 0
        z = int(np.argmax(seg.sum((0, 1)))) if seg.any() else img.shape[2] // 2
        sx, sy = img_nii.header.get_zooms()[:2]
        extent = (0, img.shape[0] * sx, 0, img.shape[1] * sy)
        sl = img[:, :, z].T
        vmax = np.percentile(img[img > 0], 99.5) if (img > 0).any() else 1.0
        kw = dict(origin="lower", extent=extent, cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
        row[0].imshow(sl, **kw)
        row[0].set_title(f"{cid} {channel} z={z}", fontsize=9)
        row[1].imshow(sl, **kw)
        overlay = np.ma.masked_where(~seg[:, :, z].T, seg[:, :, z].T)
        row[1].imshow(overlay, origin="lower", extent=extent, cmap="autumn", alpha=0.6, interpolation="nearest")
        row[1].set_title(f"PVS mask ({int(seg[:, :, z].sum())} vox in slice)", fontsize=9)
        rp = regions_dir / f"{cid}.nii.gz"
        if rp.is_file():
            lab = _categories(np.asanyarray(nib.load(str(rp)).dataobj)[:, :, z].T)
            row[2].imshow(np.ma.masked_where(lab == 0, lab), origin="lower", extent=extent, cmap="tab10",
                          vmin=0.5, vmax=10.5, interpolation="nearest")
            row[2].set_title("regions: WM, cortex, CSF, BG nuclei", fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("black")
    fig.suptitle(f"{dataset_dir.name}: axial slices with most PVS (R to the right, A up)", fontsize=10)
    fig.tight_layout()
    write_file_atomic(out_png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out_png
