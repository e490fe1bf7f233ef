"""Choosing the filter, its scales and its threshold on training cases, and applying them unchanged.

The grid is every filter of the suite (``bank.suite``: a family at one scale set) x that family's
thresholds. For each training case the Dice of every grid point is computed once from the
filters' responses (``case_dice_grid``: one response per filter and case, reused for every
threshold); a fold's choice is the grid point with the highest mean Dice over that fold's
training cases only (``select``). Ties go to the earlier filter (suite order: Frangi, Sato,
top-hat; then the scale sets in order), then the lower threshold. The reference count includes
label voxels outside the brain mask, so the Dice is the true Dice of the segmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nnunet_pvs.classical.bank import Filter


@dataclass(frozen=True)
class Choice:
    filter: Filter
    threshold: float
    train_dice: float          # mean Dice over the training cases at this grid point
    n_train: int
    family_dice: dict = field(default_factory=dict)   # family -> its best mean training Dice

    def as_dict(self) -> dict:
        return {"family": self.filter.family, "scales_mm": list(self.filter.scales_mm),
                "threshold": self.threshold, "train_dice": self.train_dice, "n_train": self.n_train,
                "family_dice": dict(self.family_dice)}

    @classmethod
    def from_dict(cls, d: dict) -> "Choice":
        return cls(Filter(d["family"], tuple(float(s) for s in d["scales_mm"])), float(d["threshold"]),
                   float(d["train_dice"]), int(d["n_train"]), dict(d.get("family_dice", {})))


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
                   thresholds: list) -> list[np.ndarray]:
    """One case's Dice at every grid point: per filter (``responses[k]``) one value per threshold
    of ``thresholds[k]``."""
    if len(responses) != len(thresholds):
        raise ValueError(f"{len(responses)} responses but {len(thresholds)} threshold lists")
    return [dice_at_thresholds(r, label, mask, t) for r, t in zip(responses, thresholds)]


def select(grids: list[list[np.ndarray]], filters, thresholds: list) -> Choice:
    """The grid point with the highest mean Dice over the given (training) cases' grids."""
    if not grids:
        raise ValueError("no training case to tune on")
    filters = list(filters)
    means = [np.mean([g[k] for g in grids], axis=0) for k in range(len(filters))]
    best, family_dice = None, {}
    for k, (f, m) in enumerate(zip(filters, means)):
        j = int(np.argmax(m))                      # first maximum: the lower threshold wins a tie
        family_dice[f.family] = max(family_dice.get(f.family, -1.0), float(m[j]))
        if best is None or m[j] > means[best[0]][best[1]]:
            best = (k, j)
    k, j = best
    return Choice(filters[k], float(thresholds[k][j]), float(means[k][j]), len(grids), family_dice)


def segment(response: np.ndarray, threshold: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Binary segmentation: response above the threshold, inside the mask."""
    seg = response > threshold
    return seg & mask if mask is not None else seg
