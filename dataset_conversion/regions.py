"""Region masks from a FreeSurfer/SynthSeg label map (aseg numbering), for region-wise evaluation.

* ``bg``: basal ganglia as in Boutinaud et al. 2021: thalamus, caudate, putamen, pallidum,
  accumbens, both hemispheres (aseg 10-13, 26, 49-52, 58);
* ``wm``: cerebral white matter (aseg 2, 41, and the white-matter hypointensities 77-79 where the
  evaluation's definition has them) minus the basal ganglia;
* ``bgslice``: the axial slice used for basal-ganglia visual counts (Cai et al. 2024: the slice
  showing the anterior commissure), restricted to ``bg``. The anterior commissure is not an aseg
  label; it crosses the midline at the level of the globus pallidus, so the slice through the
  pallidum's centroid (putamen if no pallidum) stands in for it;
* ``csoslice``: the centrum semiovale slice, 1 cm above the top of the lateral ventricles
  (aseg 4, 43), restricted to ``wm``.

Slices are taken along the voxel axis closest to superior, from the label map's own affine.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

# one vocabulary (nnunet_pvs.aseg), shared with region-wise evaluation. Every aseg/SynthSeg map of a brain
# has cerebral white matter: its absence means a binary mask or a map in another numbering, whose BG/WM
# masks would be silently empty
from nnunet_pvs.aseg import BASAL_GANGLIA, CEREBRAL_WHITE_MATTER, LATERAL_VENTRICLES, PALLIDUM, PUTAMEN, WHITE_MATTER
CSO_ABOVE_VENTRICLES_MM = 10.0


@dataclass
class RegionResult:
    masks: dict[str, np.ndarray]
    axis: int  # voxel axis closest to superior
    bg_slice: int | None
    cso_slice: int | None
    notes: list[str]


def not_aseg_reason(labels_present) -> str | None:
    """Why a label map does not look like aseg numbering (None if it does): it must hold cerebral
    white matter (2 or 41) and at least one basal-ganglia label."""
    present = {int(v) for v in labels_present}
    if present & set(CEREBRAL_WHITE_MATTER) and present & set(BASAL_GANGLIA):
        return None
    shown = ", ".join(map(str, sorted(present)[:12])) + (" ..." if len(present) > 12 else "")
    lacks = [what for what, labs in (("cerebral white matter label (2/41)", CEREBRAL_WHITE_MATTER),
                                     ("basal-ganglia label (10-13, 26, 49-52, 58)", BASAL_GANGLIA))
             if not present & set(labs)]
    return (f"does not look like an aseg label map: no {' and no '.join(lacks)}; labels found: {shown} "
            "(a binary mask or shifted labels? FreeSurfer/SynthSeg aseg numbering is expected)")


def superior_axis(affine: np.ndarray) -> tuple[int, int]:
    """(voxel axis, +1 if increasing index goes superior else -1)."""
    codes = nib.aff2axcodes(affine)
    for i, c in enumerate(codes):
        if c in ("S", "I"):
            return i, 1 if c == "S" else -1
    raise ValueError(f"affine has no superior-inferior axis: {codes}")


def region_masks(labels: np.ndarray, affine: np.ndarray, slices: bool = False) -> RegionResult:
    labels = np.asarray(np.round(labels)).astype(np.int32)
    bg = np.isin(labels, BASAL_GANGLIA)
    wm = np.isin(labels, WHITE_MATTER) & ~bg
    masks = {"bg": bg, "wm": wm}
    axis, sign = superior_axis(affine)
    notes: list[str] = []
    bg_slice = cso_slice = None
    if slices:
        other = tuple(i for i in range(3) if i != axis)
        anchor = np.isin(labels, PALLIDUM)
        if not anchor.any():
            anchor = np.isin(labels, PUTAMEN)
            if anchor.any():
                notes.append("no pallidum label: BG slice through the putamen centroid")
        if anchor.any():
            prof = anchor.sum(other)
            bg_slice = int(round(float((np.arange(len(prof)) * prof).sum() / prof.sum())))
            masks["bgslice"] = _slab(labels.shape, axis, bg_slice) & bg
        else:
            notes.append("no pallidum or putamen label: no BG slice")
        vent = np.isin(labels, LATERAL_VENTRICLES)
        if vent.any():
            present = np.flatnonzero(vent.any(other))
            top = int(present.max() if sign > 0 else present.min())
            step = float(np.linalg.norm(affine[:3, axis]))
            cso = top + sign * int(round(CSO_ABOVE_VENTRICLES_MM / step))
            if 0 <= cso < labels.shape[axis]:
                cso_slice = cso
                masks["csoslice"] = _slab(labels.shape, axis, cso) & wm
            else:
                notes.append(f"CSO slice {cso} (1 cm above the ventricles' top, slice {top}) is outside the image")
        else:
            notes.append("no lateral ventricle label: no CSO slice")
    return RegionResult(masks, axis, bg_slice, cso_slice, notes)


def _slab(shape, axis, index) -> np.ndarray:
    m = np.zeros(shape, bool)
    sl = [slice(None)] * 3
    sl[axis] = index
    m[tuple(sl)] = True
    return m
