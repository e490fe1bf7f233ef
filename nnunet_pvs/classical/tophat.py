"""Morphological top-hat for PVS: white top-hat on T2w (bright CSF), black top-hat on T1w.

The top-hat keeps what is narrower than the footprint and brighter (white) or darker (black)
than its surroundings, which is what a PVS is. In our phantom benchmark
(``benchmarks/bench_phantom_difficulty.py``) it comes second to Sato inside white matter and basal
ganglia; inside the whole brain mask it wins on the small T2w-like phantom (docs/compare.md).
scikit-image's ``white_tophat``/``black_tophat`` with a flat ellipsoid footprint whose radius is
given in mm (so one grid suits every resolution): a disk in the slice plane for data with thick
slices (filtered per slice, as the Hessian filters are), an ellipsoid in 3D otherwise.
"""

from __future__ import annotations

import numpy as np
from skimage.morphology import black_tophat, white_tophat

from nnunet_pvs.classical.vesselness import ANISOTROPY_FOR_2D, slice_axis


def footprint(radius_mm: float, spacing, axis: int | None) -> np.ndarray:
    """Flat ellipsoid with semi-axes ``max(radius_mm, spacing)`` mm, in voxels of ``spacing``; one
    voxel thick along ``axis`` when filtering per slice. A semi-axis never below one voxel keeps
    it at least the 3 x 3 (x 3) cross, never a point (whose top-hat is zero everywhere)."""
    sp = np.asarray(spacing, float)
    semi = np.maximum(float(radius_mm), sp)
    half = np.floor(semi / sp + 1e-9).astype(int)
    if axis is not None:
        half[axis] = 0
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, sp)], indexing="ij")
    return sum((g / a) ** 2 for g, a in zip(grids, semi)) <= 1.0 + 1e-9


def tophat_response(image: np.ndarray, spacing, radius_mm: float, bright: bool,
                    anisotropy: float = ANISOTROPY_FOR_2D) -> np.ndarray:
    """White (``bright``) or black top-hat, >= 0, in the image's intensity units."""
    fp = footprint(radius_mm, spacing, slice_axis(spacing, anisotropy))
    img = np.asarray(image, np.float32)
    return (white_tophat(img, fp) if bright else black_tophat(img, fp)).astype(np.float32)
