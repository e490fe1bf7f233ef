"""Image formation: tissue mixture -> intensities, white-matter texture, bias field, Rician noise.

Intensities are relative (CSF 1.0 on T2w-like, WM 0.8 on T1w-like); subjects differ by a few per
cent. The noise level is set per subject from a drawn contrast-to-noise ratio (CNR) of the median
labelled PVS voxel (T2w-like 2-4, T1w-like 1.5-3), so PVS visibility varies across subjects as
across scanners. Noise is Rician (magnitude of complex Gaussian noise), the bias field a smooth
multiplicative field of 10-20 % amplitude.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CONTRAST = {
    "T2w": {"csf": 1.00, "gm": 0.52, "wm": 0.38, "dgm": 0.46, "pvs": 0.97, "wmh": 0.70, "rim": 0.66, "void": 0.06},
    "T1w": {"csf": 0.18, "gm": 0.50, "wm": 0.80, "dgm": 0.62, "pvs": 0.20, "wmh": 0.64, "rim": 0.68, "void": 0.05},
}
CNR_RANGE = {"T2w": (2.2, 4.4), "T1w": (1.8, 3.6)}  # drawn; the measured median (bias, texture) lands lower
BIAS_RANGE = (0.10, 0.20)
TEXTURE_SD = 0.04  # relative standard deviation of the white-matter texture


def smooth_field(rng, shape, spacing, grain_mm: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with the given grain."""
    f = ndimage.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), grain_mm / np.asarray(spacing))
    return f / max(float(f.std()), 1e-6)


def tissue_image(rng, contrast: str, an: dict, spacing) -> tuple[np.ndarray, dict]:
    """Noise-free background image from tissue fractions, with WM texture; returns (image, intensities)."""
    c = {k: v * (1.0 + rng.normal(0, 0.03)) for k, v in CONTRAST[contrast].items()}
    wm_val = c["wm"] * (1.0 + TEXTURE_SD * smooth_field(rng, an["wm"].shape, spacing, 4.0))
    tissue = an["csf"] * c["csf"] + an["gm"] * c["gm"] + an["wm"] * wm_val
    deep = an["csf"] * c["csf"] + (an["brain"] - an["csf"]) * c["dgm"]
    return (1 - an["nuclei"]) * tissue + an["nuclei"] * deep, c


def mix(img: np.ndarray, fraction: np.ndarray, value: float, brain: np.ndarray) -> np.ndarray:
    """Replace a fraction of each voxel by a compartment of intensity ``value``."""
    f = np.clip(fraction, 0, 1)
    return (1 - f) * img + f * value * brain


def bias_and_noise(rng, img: np.ndarray, sigma: float, spacing) -> tuple[np.ndarray, float]:
    """Multiplicative smooth bias field (amplitude drawn from 10-20 %), then Rician noise of ``sigma``."""
    amp = rng.uniform(*BIAS_RANGE)
    coarse = rng.normal(0, 1, (4, 4, 4))
    b = ndimage.zoom(coarse, np.array(img.shape) / 4.0, order=3)[: img.shape[0], : img.shape[1], : img.shape[2]]
    bias = np.exp(amp * b / max(float(np.abs(b).max()), 1e-6))
    n1, n2 = rng.normal(0, sigma, (2, *img.shape)).astype(np.float32)
    return np.sqrt((img * bias + n1) ** 2 + n2 ** 2).astype(np.float32), float(amp)
