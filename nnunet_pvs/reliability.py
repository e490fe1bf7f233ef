"""A per-subject reliability signal read from the prediction itself, for scans with no reference.

Why: a network shown a scan unlike its training data (another contrast, resolution, noise level, a
bias field, a brain-masked image) rarely fails with an error; it returns a map, but a soft and
hesitant one. Its foreground probabilities pile up around the decision threshold instead of near 0
and 1. The signals here measure that hesitation on one subject's probability map (nnU-Net's
``--save_probabilities`` output, read with ``nnunet_pvs.evaluation.io``), so a cohort study can flag
the subjects whose burden should not be trusted without a look. What the signals are worth is
measured, not assumed: ``benchmarks/bench_reliability.py`` and docs/reliability_signal.md.

Definitions (``p``: foreground probability per voxel; ``t``: threshold, default 0.5):

* predicted PVS ``P = {p >= t}``; the judged region ``R`` is ``P`` dilated by one voxel
  (26-neighbourhood, in voxels, whatever the spacing), so the rim of voxels just below ``t``, where a
  hesitant network leaves its doubt, is judged too;
* hesitant voxels ``U = R ∩ {low <= p <= high}`` (default [0.3, 0.7]);
* ``uncertain_share = sum(p over U) / sum(p over R)``: the share of the predicted PVS's probability
  mass that is hesitant. Weighting by ``p`` makes the rim's near-zero voxels count for almost
  nothing, so the share does not grow merely because PVS are thin (a thin tube has more rim per
  voxel than a blob);
* ``uncertain_voxel_share = |U| / |R|``: the same by voxel count (rim voxels count fully);
* ``mean_core_probability``: the mean ``p`` over ``P``, how sure the network is of what it called PVS
  (between ``t`` and 1; lower = less reliable, the opposite direction of the shares);
* with nothing predicted (``P`` empty) all three are NaN: there is no PVS whose certainty could be judged.

``fold_disagreement`` is for users who run ``nnUNetv2_predict`` once per fold (nnU-Net itself
averages the folds' probabilities into one map, which hides their disagreement): 1 minus the mean
pairwise Dice of the folds' masks, in the spirit of deep-ensemble uncertainty (Lakshminarayanan et
al. 2017, "Simple and scalable predictive uncertainty estimation using deep ensembles").
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import ndimage

from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation.voxel_metrics import voxel_metrics

_NEIGHBOURHOOD_26 = ndimage.generate_binary_structure(3, 3)


def _check_probabilities(prob: np.ndarray, what: str = "probability map") -> np.ndarray:
    """A 3D float array of probabilities in [0, 1]; a mask or label map is refused (it has no doubt to read)."""
    prob = np.asarray(prob)
    if prob.dtype == bool or not np.issubdtype(prob.dtype, np.floating):
        raise UserError(f"{what} has dtype {prob.dtype}: the reliability signal needs foreground probabilities "
                        "(nnUNetv2_predict --save_probabilities), not a binary mask")
    if prob.ndim != 3:
        raise UserError(f"{what} is {prob.ndim}D with shape {prob.shape}; expected a 3D volume")
    if not np.isfinite(prob).all():
        raise UserError(f"{what} contains NaN or Inf values")
    # float rounding of a softmax may pass 1 (or 0) by a few ulps: tolerated and clipped, more is refused
    if prob.size and (prob.min() < -1e-4 or prob.max() > 1 + 1e-4):
        raise UserError(f"{what} has values outside [0, 1] (min {prob.min():g}, max {prob.max():g})")
    return np.clip(prob, 0.0, 1.0) if prob.size and (prob.min() < 0 or prob.max() > 1) else prob


def _check_band(threshold: float, low: float, high: float) -> None:
    if not 0 < threshold <= 1:
        raise UserError(f"threshold {threshold:g}: must be in (0, 1]")
    if not 0 <= low < high <= 1:
        raise UserError(f"hesitation band [{low:g}, {high:g}]: need 0 <= low < high <= 1")


def judged_region(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``R``: the predicted PVS (``p >= threshold``) dilated by one voxel in the 26-neighbourhood."""
    return ndimage.binary_dilation(prob >= threshold, structure=_NEIGHBOURHOOD_26)


def uncertain_share(prob: np.ndarray, threshold: float = 0.5, low: float = 0.3, high: float = 0.7,
                    by: str = "mass") -> float:
    """Share of the predicted PVS (dilated by one voxel) that is hesitant, ``low <= p <= high``.

    ``by="mass"``: weighted by probability (``uncertain_share`` in the module docstring);
    ``by="voxels"``: by voxel count (``uncertain_voxel_share``). NaN when nothing reaches ``threshold``.
    """
    prob = _check_probabilities(prob)
    _check_band(threshold, low, high)
    if by not in ("mass", "voxels"):
        raise UserError(f"by={by!r}: choose 'mass' or 'voxels'")
    region = judged_region(prob, threshold)
    if not region.any():
        return math.nan
    p = prob[region].astype(np.float64)
    hesitant = (p >= low) & (p <= high)
    if by == "voxels":
        return float(np.count_nonzero(hesitant)) / p.size
    return float(p[hesitant].sum() / p.sum())


def mean_core_probability(prob: np.ndarray, threshold: float = 0.5) -> float:
    """Mean probability over the predicted PVS (``p >= threshold``); NaN when nothing reaches it."""
    prob = _check_probabilities(prob)
    _check_band(threshold, 0.0, 1.0)
    core = prob >= threshold
    return float(prob[core].mean(dtype=np.float64)) if core.any() else math.nan


def fold_disagreement(probs_per_fold: list[np.ndarray], threshold: float = 0.5) -> float:
    """1 - mean Dice over every pair of folds' masks (``p >= threshold``); 0 when all folds agree.

    Two empty masks agree (Dice 1, the package's empty-case convention in evaluation/voxel_metrics.py).
    """
    if len(probs_per_fold) < 2:
        raise UserError(f"fold disagreement needs the probabilities of at least 2 folds, got {len(probs_per_fold)}")
    if not 0 < threshold <= 1:
        raise UserError(f"threshold {threshold:g}: must be in (0, 1]")
    masks = []
    for i, prob in enumerate(probs_per_fold):
        prob = _check_probabilities(prob, f"probability map of fold entry {i}")
        if masks and prob.shape != masks[0].shape:
            raise UserError(f"probability map of fold entry {i} has shape {prob.shape}, "
                            f"fold entry 0 has {masks[0].shape}")
        masks.append(prob >= threshold)
    dices = [voxel_metrics(a, b)["dice"] for a, b in itertools.combinations(masks, 2)]
    return float(1.0 - np.mean(dices))


def reliability(prob: np.ndarray, threshold: float = 0.5, low: float = 0.3, high: float = 0.7) -> dict:
    """The subject's reliability columns for a table such as the census's ``subjects.csv``.

    ``predicted_voxels`` (``p >= threshold``), ``uncertain_share`` (probability-weighted; higher = less
    reliable), ``uncertain_voxel_share`` and ``mean_core_probability`` (lower = less reliable); see the
    module docstring, and docs/reliability_signal.md for what each is worth on shifted scans.
    """
    prob = _check_probabilities(prob)
    _check_band(threshold, low, high)
    return {"predicted_voxels": int(np.count_nonzero(prob >= threshold)),
            "uncertain_share": uncertain_share(prob, threshold, low, high, by="mass"),
            "uncertain_voxel_share": uncertain_share(prob, threshold, low, high, by="voxels"),
            "mean_core_probability": mean_core_probability(prob, threshold)}
