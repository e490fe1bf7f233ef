"""How much smooth intensity non-uniformity (bias field) an MR image carries, from a tissue model.

A receive coil multiplies the image by a smooth field; uncorrected, a strong one shifts the
intensities a network learnt from one side of the brain to the other (on the reliability benchmark a
0.5-2x field lowers Dice from 0.40 to 0.30). The field cannot be read off the image directly:
anatomy also varies slowly (the share of white matter, CSF and cortex changes across a brain), and
methods without a tissue model take that for field. Measured on the phantom (docs/check_inputs.md):
N4's estimated field (Tustison et al. 2010, IEEE TMI 29:1310), block medians, a polynomial of the log
image, and per-class trends after k-means all spread as much on the training images as on images
under a 0.5-2x field.

What separates them is the model of Wells et al. (1996, IEEE TMI 15:429) and Van Leemput et al.
(1999, IEEE TMI 18:885), the one behind FSL FAST and SPM's segmentation: the log intensity of a voxel
is its tissue class's mean plus a smooth log field plus noise. Tissue classes are a Gaussian
mixture, the field a second-order polynomial of position (smooth on the scale of a head and too
coarse to mimic anatomy); expectation-maximisation alternates the class posteriors with a weighted
least-squares fit of the field. Because each voxel's intensity is explained by its class, a change of
tissue composition does not move the field, while a real field moves every class together.

EM finds a local optimum: from a flat start, a strong field can settle where one tissue class has
swallowed a brighter one. It is therefore started seven times (flat, and a linear ramp of either sign
along each axis), each run briefly, and the one with the highest likelihood is run to the end.

The measure is the standard deviation of the fitted log field over the head: 0 without a field;
about 0.25 for a field spanning 0.5-2x; the phantom's own 10-20 % field plus what the fit cannot tell
from anatomy gives 0.002-0.03 on whole brains and up to 0.14 on a 44 x 44 x 16 mm slab
(benchmarks/results/bias_field.md).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CLASSES = 3                 # tissue classes of the mixture (e.g. WM, GM, CSF)
DEGREE = 2                  # polynomial degree of the log field
SMOOTH_MM = 2.0             # Gaussian smoothing before the fit: noise out, tissue classes separable
SAMPLE_VOXELS = 20_000      # voxels of the head the model is fitted on (fixed seed: the same every run)
RAMP = 0.25                 # starting ramps: log-field standard deviation along one axis
START_ITERATIONS = 15
FINAL_ITERATIONS = 40
MIN_VOXELS = 500            # fewer head voxels: no estimate


def smoothed_within(image: np.ndarray, mask: np.ndarray, spacing, sigma_mm: float) -> np.ndarray:
    """Gaussian smoothing inside ``mask`` (normalised convolution, so the background does not bleed
    in); axes whose voxels are much coarser than ``sigma_mm`` are left unsmoothed."""
    sigma = [sigma_mm / float(s) if sigma_mm / float(s) > 0.3 else 0.0 for s in spacing]
    num = ndimage.gaussian_filter(np.where(mask, image, 0.0), sigma)
    den = ndimage.gaussian_filter(mask.astype(np.float64), sigma)
    return num / np.maximum(den, 1e-6)


def polynomial_basis(coords: np.ndarray, degree: int = DEGREE) -> np.ndarray:
    """Monomials x^i y^j z^k with 1 <= i + j + k <= degree of (n, 3) coordinates in [-1, 1], each
    centred; constant columns (an axis of one slice) are dropped."""
    cols = [coords[:, 0] ** i * coords[:, 1] ** j * coords[:, 2] ** k
            for i in range(degree + 1) for j in range(degree + 1 - i) for k in range(degree + 1 - i - j)
            if 0 < i + j + k]
    basis = np.column_stack(cols)
    basis = basis[:, basis.std(0) > 1e-9]
    return basis - basis.mean(0)


def _log_densities(y: np.ndarray, mean, sd, weight) -> np.ndarray:
    return -0.5 * ((y[:, None] - mean) / sd) ** 2 - np.log(sd) + np.log(weight)


def _mean_log_likelihood(y: np.ndarray, mean, sd, weight) -> float:
    d = _log_densities(y, mean, sd, weight)
    top = d.max(1)
    return float(np.mean(top + np.log(np.exp(d - top[:, None]).sum(1))))


def fit_field(values: np.ndarray, basis: np.ndarray, start: np.ndarray, iterations: int,
              classes: int = CLASSES) -> tuple[np.ndarray, float]:
    """EM for log intensities ``values`` = class mean + ``basis`` @ coefficients + noise, from the
    field ``start``; returns the fitted field at the voxels and the mean log-likelihood."""
    field = start
    quantiles = np.linspace(100 / (2 * classes), 100 - 100 / (2 * classes), classes)
    mean = np.percentile(values - field, quantiles)
    sd = np.full(classes, max(float((values - field).std()), 1e-3) / classes)
    weight = np.full(classes, 1.0 / classes)
    for _ in range(iterations):
        y = values - field
        d = _log_densities(y, mean, sd, weight)
        post = np.exp(d - d.max(1, keepdims=True))
        post /= post.sum(1, keepdims=True)
        n = post.sum(0) + 1e-9
        mean = (post * y[:, None]).sum(0) / n
        sd = np.sqrt((post * (y[:, None] - mean) ** 2).sum(0) / n) + 1e-3
        weight = n / n.sum()
        # field step: weighted least squares of each voxel's residual from its expected class mean
        precision = (post / sd ** 2).sum(1)
        target = values - (post * mean / sd ** 2).sum(1) / precision
        target -= np.average(target, weights=precision)
        root = np.sqrt(precision)
        coef, *_ = np.linalg.lstsq(basis * root[:, None], target * root, rcond=None)
        field = basis @ coef
    return field, _mean_log_likelihood(values - field, mean, sd, weight)


def log_field_spread(raw: np.ndarray, head: np.ndarray, spacing, seed: int = 0) -> float:
    """Standard deviation over ``head`` of the smooth log field the tissue model finds in ``raw``
    (a cropped MR image in its own units, positive in tissue); NaN with too few head voxels."""
    if head.sum() < MIN_VOXELS:
        return float("nan")
    smooth = smoothed_within(raw.astype(np.float64), head, spacing, SMOOTH_MM)
    idx = np.argwhere(head)
    rng = np.random.default_rng(seed)
    idx = idx[np.sort(rng.choice(len(idx), min(SAMPLE_VOXELS, len(idx)), replace=False))]
    v = smooth[tuple(idx.T)]
    floor = 1e-3 * float(np.percentile(v, 99))
    if not floor > 0:
        return float("nan")
    values = np.log(np.maximum(v, floor))
    coords = idx * np.asarray(spacing, float)
    coords -= coords.mean(0)
    coords /= max(float(np.abs(coords).max()), 1e-9)
    basis = polynomial_basis(coords)
    starts = [np.zeros(len(values))]
    for axis in range(3):
        ramp = coords[:, axis] - coords[:, axis].mean()
        if ramp.std() > 1e-9:
            starts += [s * RAMP * ramp / ramp.std() for s in (1.0, -1.0)]
    fits = [fit_field(values, basis, s, START_ITERATIONS) for s in starts]
    best = max(range(len(fits)), key=lambda i: fits[i][1])
    field, _ = fit_field(values, basis, fits[best][0], FINAL_ITERATIONS)
    return float(field.std())
