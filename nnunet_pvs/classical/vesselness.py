"""Hessian vesselness for PVS: scikit-image's ``frangi`` (Ballerini et al. 2018) and ``sato``
(Sato et al. 1998), with sigmas in mm.

PVS are CSF-filled tubes: bright ridges on T2w, dark on T1w. Data with thick slices (Cai's
0.69 x 0.69 x 2 mm) are filtered in 2D per slice, because a Hessian across discontinuous slices
is meaningless; near-isotropic data in 3D. Sigmas are given in mm so one grid suits every
resolution; they are converted to voxels with the in-plane (2D) or mean (3D) spacing, since
the filters take one isotropic sigma in voxels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import frangi, sato

#: spacing ratio (largest / smallest) from which the filter runs per slice along the largest axis
ANISOTROPY_FOR_2D = 2.0

_DARK = ("t1", "mprage", "flair")  # CSF is dark on T1w and FLAIR
_BRIGHT = ("t2",)


def ridge_polarity(channel_name: str) -> str | None:
    """``"bright"`` for T2-like channel names, ``"dark"`` for T1/FLAIR-like, None when unknown."""
    name = str(channel_name).lower()
    if any(k in name for k in _BRIGHT):
        return "bright"
    if any(k in name for k in _DARK):
        return "dark"
    return None


def slice_axis(spacing, anisotropy: float = ANISOTROPY_FOR_2D) -> int | None:
    """Axis to filter slice by slice (the thick one), or None to filter in 3D."""
    sp = np.asarray(spacing, float)
    return int(np.argmax(sp)) if sp.max() / sp.min() >= anisotropy else None


def voxel_sigmas(sigmas_mm, spacing, axis: int | None) -> list[float]:
    """Sigmas in voxels: mm divided by the mean in-plane spacing (2D) or the mean spacing (3D)."""
    sp = np.asarray(spacing, float)
    unit = float(np.delete(sp, axis).mean()) if axis is not None else float(sp.mean())
    return sorted(float(s) / unit for s in sigmas_mm)


def brain_mask(image: np.ndarray, spacing, erode_mm: float = 2.0) -> np.ndarray:
    """Brain from the image itself: voxels above the background value, holes filled, eroded by
    ``erode_mm`` so the brain's outer edge (a strong ridge to the filter) is left out. The array
    border is not eroded (cropped images touch it inside the brain)."""
    fg = image > image.min()
    if not fg.any():
        return np.zeros(image.shape, bool)
    fg = ndimage.binary_fill_holes(fg)
    radius = np.maximum(np.round(erode_mm / np.asarray(spacing, float)).astype(int), 0)
    if radius.any():
        footprint = np.ones(tuple(2 * r + 1 for r in radius), bool)
        fg = ndimage.binary_erosion(fg, footprint, border_value=1)
    return fg


def normalise(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Image divided by its 99th percentile (inside ``mask``), so responses compare across subjects."""
    img = image.astype(np.float32)
    vals = img[mask] if mask is not None and mask.any() else img
    scale = float(np.percentile(vals, 99)) if vals.size else 0.0
    return img / scale if scale > 0 else img


def per_slice(fn, image: np.ndarray, axis: int | None) -> np.ndarray:
    """``fn`` on the whole 3D image (``axis`` None) or on each 2D slice along ``axis``."""
    img = np.asarray(image, np.float32)
    if axis is None:
        return np.asarray(fn(img), np.float32)
    out = np.empty(img.shape, np.float32)
    for k in range(img.shape[axis]):
        idx = [slice(None)] * 3
        idx[axis] = k
        out[tuple(idx)] = fn(img[tuple(idx)])
    return out


def frangi_response(image: np.ndarray, spacing, sigmas_mm, bright: bool,
                    anisotropy: float = ANISOTROPY_FOR_2D) -> np.ndarray:
    """Vesselness in [0, 1] of a 3D image: per slice along the thick axis, or in 3D.

    scikit-image's defaults otherwise (alpha = beta = 0.5, gamma = half the maximum Hessian norm
    of each image, or slice in 2D, at the smallest sigma)."""
    axis = slice_axis(spacing, anisotropy)
    sig = voxel_sigmas(sigmas_mm, spacing, axis)
    return per_slice(lambda x: frangi(x, sigmas=sig, black_ridges=not bright), image, axis)


def sato_response(image: np.ndarray, spacing, sigmas_mm, bright: bool,
                  anisotropy: float = ANISOTROPY_FOR_2D) -> np.ndarray:
    """Sato tubeness (>= 0, in the image's intensity units: the Hessian is scaled by sigma^2),
    per slice along the thick axis or in 3D. It is the voxel-wise maximum over the sigmas of
    one-sigma responses, so a scale set's response is the maximum of its sigmas' responses."""
    axis = slice_axis(spacing, anisotropy)
    sig = voxel_sigmas(sigmas_mm, spacing, axis)
    return per_slice(lambda x: sato(x, sigmas=sig, black_ridges=not bright), image, axis)
