"""Voxel-level overlap metrics (Cai et al. 2024 Table 2; Boutinaud et al. 2021 "VL" metrics).

Empty-case convention, shared by every ratio in this package: a ratio whose denominator is zero
is 1.0 when both sides it compares are empty ("nothing to find and nothing found") and NaN
otherwise (e.g. sensitivity with an empty reference but a non-empty prediction is undefined;
that prediction is still penalised by PPV = 0 and Dice = 0). Dice, the harmonic mean of
sensitivity and PPV, is 0 as soon as either of them is 0.
"""

from __future__ import annotations

import math

import numpy as np


def safe_ratio(num: float, den: float, both_empty: bool) -> float:
    """``num / den`` with the package's empty-case convention (see module docstring)."""
    if den == 0:
        return 1.0 if both_empty else math.nan
    return float(num) / float(den)


def harmonic_mean(a: float, b: float) -> float:
    """Harmonic mean, as the papers define Dice from TPR and PPV: 0 if either is 0, NaN if undefined."""
    if a == 0 or b == 0:
        return 0.0
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return 2.0 * a * b / (a + b)


def confusion(ref: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    """(TP, FP, FN) voxel counts of two boolean masks of the same shape."""
    n_ref = int(np.count_nonzero(ref))
    n_pred = int(np.count_nonzero(pred))
    tp = int(np.count_nonzero(ref & pred))
    return tp, n_pred - tp, n_ref - tp


def voxel_metrics(ref: np.ndarray, pred: np.ndarray, voxel_volume_mm3: float = 1.0) -> dict:
    """DSC, SEN = TP/(TP+FN), PPV = TP/(TP+FP) and volumes of two boolean masks."""
    tp, fp, fn = confusion(ref, pred)
    n_ref, n_pred = tp + fn, tp + fp
    both_empty = n_ref == 0 and n_pred == 0
    sen = safe_ratio(tp, tp + fn, both_empty)
    ppv = safe_ratio(tp, tp + fp, both_empty)
    dice = 1.0 if both_empty else 2.0 * tp / (2.0 * tp + fp + fn)
    return {
        "dice": dice, "sensitivity": sen, "ppv": ppv,
        "tp_voxels": tp, "fp_voxels": fp, "fn_voxels": fn,
        "ref_volume_mm3": n_ref * voxel_volume_mm3,
        "pred_volume_mm3": n_pred * voxel_volume_mm3,
        "abs_volume_diff_mm3": abs(n_pred - n_ref) * voxel_volume_mm3,
    }
