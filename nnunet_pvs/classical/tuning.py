"""Choosing Frangi scales and threshold on training cases, and applying them unchanged.

The grid is a few scale sets x a fixed set of thresholds on the response (which lies in [0, 1]).
For each training case the Dice of every grid point is computed once (``case_dice_grid``); a
fold's parameters are the grid point with the highest mean Dice over that fold's training cases
(``select``); ties go to the earlier scale set, then the lower threshold. The reference count
includes label voxels outside the brain mask, so the Dice is the true Dice of the segmentation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: sigma sets in mm: PVS are 0.4-3 mm wide (the best sigma for a tube is about its radius)
DEFAULT_SCALE_SETS: tuple[tuple[float, ...], ...] = ((0.5, 1.0), (0.75, 1.5), (1.0, 2.0), (0.5, 1.0, 1.5, 2.0))
#: thresholds on the vesselness response
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(float(t) for t in np.round(np.geomspace(1e-3, 0.95, 40), 6))


@dataclass(frozen=True)
class FrangiParams:
    sigmas_mm: tuple[float, ...]
    threshold: float
    train_dice: float          # mean Dice over the training cases at these parameters
    n_train: int

    def as_dict(self) -> dict:
        return asdict(self)


def dice_at_thresholds(response: np.ndarray, label: np.ndarray, mask: np.ndarray | None,
                       thresholds) -> np.ndarray:
    """Dice of ``response > t`` (inside ``mask``) against ``label`` for every threshold t.
    Empty prediction and empty label give 1."""
    label = np.asarray(label, bool)
    inside = np.ones(label.shape, bool) if mask is None else np.asarray(mask, bool)
    r_all = np.sort(response[inside].ravel())
    r_fg = np.sort(response[inside & label].ravel())
    t = np.asarray(thresholds, float)
    pred = r_all.size - np.searchsorted(r_all, t, side="right")
    tp = r_fg.size - np.searchsorted(r_fg, t, side="right")
    ref = int(label.sum())
    denom = pred + ref
    return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 1.0)


def case_dice_grid(responses: list[np.ndarray], label: np.ndarray, mask: np.ndarray | None,
                   thresholds=DEFAULT_THRESHOLDS) -> np.ndarray:
    """(scale sets x thresholds) Dice of one case; ``responses`` holds one response per scale set."""
    return np.stack([dice_at_thresholds(r, label, mask, thresholds) for r in responses])


def select(grids: list[np.ndarray], scale_sets=DEFAULT_SCALE_SETS, thresholds=DEFAULT_THRESHOLDS) -> FrangiParams:
    """The grid point with the highest mean Dice over the given (training) cases."""
    if not grids:
        raise ValueError("no training case to tune on")
    mean = np.mean(np.stack(grids), axis=0)
    i, j = np.unravel_index(int(np.argmax(mean)), mean.shape)  # argmax: first maximum in C order
    return FrangiParams(tuple(float(s) for s in scale_sets[i]), float(thresholds[j]), float(mean[i, j]), len(grids))


def segment(response: np.ndarray, threshold: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Binary segmentation: response above the threshold, inside the mask."""
    seg = response > threshold
    return seg & mask if mask is not None else seg
