"""Every per-case metric column ``evaluate`` and ``compare`` write: what it is, which way is better, its
unit and the function that computes it.

One registry, so that a report never guesses a direction: ``compare`` bolds the best model and
labels each paired test from here, and refuses a ``--metrics`` column that is not here. The idea is
panoptica's ``Metric`` enum (Kofler et al. 2023, BrainLesion/panoptica ``metrics/metrics.py``), where
each metric carries its name, long name, a ``decreasing`` flag and its function; ours adds a third
direction, ``neither``, for descriptive columns, and names functions by import path so that this
module imports nothing from the rooms above it.

Directions, by one rule: with the reference fixed (``compare`` scores every model on the same
reference), is a larger value always a better segmentation?

* ``higher``: overlaps, rates, F1s, surface Dice, counts of reference clusters found or of true
  positive voxels;
* ``lower``: distances, absolute differences, counts of errors (false positive or false negative
  voxels and clusters);
* ``neither``: descriptive columns, which are tabulated but never called better or worse:
  the reference's own size (``n_ref_clusters``, ``ref_volume_mm3``: equal for every model), the
  prediction's own size (``n_pred_clusters``, ``pred_volume_mm3``: more is not better by itself;
  its error is ``valdo_abs_count_diff`` / ``abs_volume_diff_mm3``), counts of true positive
  *predicted* clusters (``cluster_tp``, ``tpr_tp``, ``ppv_tp``: splitting one PVS into pieces
  raises them) and the denominators and sums kept for pooling over cases.

Parametric names are resolved by pattern: ``truth_<m>`` (prediction against the noise-free truth)
and ``rater_truth_<m>`` (reference labels against it) take ``<m>``'s direction; size-group columns
``detection_rate_<g>``, ``lesion_dice_<g>``, ``false_positives_<g>`` (``<g>`` as
``SizeGroups.slugs`` writes it: ``le10``, ``10to20``, ``gt20``, with ``mm3`` in mm3) take the
group metric's. Regions are rows (the ``region`` key column), not column prefixes, so they need no
pattern.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, replace
from enum import Enum

from nnunet_pvs.errors import UserError


class Direction(str, Enum):
    """Which way is better."""

    HIGHER = "higher"
    LOWER = "lower"
    NEITHER = "neither"   # descriptive: tabulated, never called better or worse


class UnknownMetric(UserError, ValueError):
    """A metric name the registry does not know, so its direction is unknown."""


@dataclass(frozen=True)
class Metric:
    """One metric column. ``function``: ``module:function`` that computes it (None when it is
    computed inline), resolved only on request by :meth:`computed_by`."""

    name: str
    description: str
    direction: Direction
    unit: str
    function: str | None = None

    @property
    def higher_is_better(self) -> bool | None:
        """True / False, or None for a descriptive metric."""
        return {Direction.HIGHER: True, Direction.LOWER: False}.get(self.direction)

    @property
    def better(self) -> str:
        """A short label for reports: ``higher``, ``lower`` or ``none (descriptive)``."""
        return "none (descriptive)" if self.direction is Direction.NEITHER else self.direction.value

    def best(self, values) -> float | None:
        """The best of the finite ``values`` in this metric's direction; None when it has no
        direction or no finite value."""
        finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not finite or self.direction is Direction.NEITHER:
            return None
        return max(finite) if self.direction is Direction.HIGHER else min(finite)

    def computed_by(self):
        """The function that computes this metric (imported now), or None."""
        if self.function is None:
            return None
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(module), name)


_H, _L, _N = Direction.HIGHER, Direction.LOWER, Direction.NEITHER
_EV = "nnunet_pvs.evaluation."
_VOXEL = _EV + "voxel_metrics:voxel_metrics"
_CLUSTER = _EV + "clusters:cluster_metrics"
_SURFACE = _EV + "surface_distance:surface_metrics"
_PANOPTIC = _EV + "lesion_metrics:panoptic"
_FILTER = _EV + "clusters:size_filtered_metrics"
_GROUP = _EV + "lesion_metrics:size_group_rows"
_VALDO, _EPVS, _SHIVAI = (_EV + f"protocols:{p}" for p in ("valdo", "epvs", "shivai"))

_ENTRIES = [
    # voxel level (per_case.csv)
    ("dice", "voxel Dice 2TP / (2TP + FP + FN)", _H, "fraction", _VOXEL),
    ("sensitivity", "voxel sensitivity TP / (TP + FN)", _H, "fraction", _VOXEL),
    ("ppv", "voxel positive predictive value TP / (TP + FP)", _H, "fraction", _VOXEL),
    ("iou", "voxel intersection over union TP / (TP + FP + FN)", _H, "fraction", _EV + "case:evaluate_pair"),
    ("tp_voxels", "true positive voxels (the reference is fixed, so more is better)", _H, "voxels", _VOXEL),
    ("fp_voxels", "false positive voxels", _L, "voxels", _VOXEL),
    ("fn_voxels", "false negative voxels", _L, "voxels", _VOXEL),
    ("ref_volume_mm3", "reference volume (the same for every model)", _N, "mm3", _VOXEL),
    ("pred_volume_mm3", "predicted volume (its error is abs_volume_diff_mm3)", _N, "mm3", _VOXEL),
    ("abs_volume_diff_mm3", "absolute difference of predicted and reference volume", _L, "mm3", _VOXEL),
    # cluster level under --match
    ("cluster_tpr", "cluster true positive rate TP / (TP + FN) under --match", _H, "fraction", _CLUSTER),
    ("cluster_ppv", "cluster positive predictive value TP / (TP + FP) under --match", _H, "fraction", _CLUSTER),
    ("cluster_dice", "harmonic mean of cluster_tpr and cluster_ppv", _H, "fraction", _CLUSTER),
    ("ref_detection_rate", "fraction of reference clusters matched by a predicted cluster", _H, "fraction",
     _CLUSTER),
    ("n_ref_clusters", "reference clusters (in the case, or in the size group)", _N, "clusters", _CLUSTER),
    ("n_pred_clusters", "predicted clusters (its error is valdo_abs_count_diff)", _N, "clusters", _CLUSTER),
    ("cluster_tp", "true positive predicted clusters (a PVS split into pieces counts each piece)", _N,
     "clusters", _CLUSTER),
    ("cluster_fp", "false positive predicted clusters", _L, "clusters", _CLUSTER),
    ("cluster_fn", "reference clusters matched by no predicted cluster", _L, "clusters", _CLUSTER),
    ("ref_clusters_detected", "reference clusters matched by a predicted cluster", _H, "clusters", _CLUSTER),
    # surfaces
    ("hd95_mm", "95th percentile symmetric surface distance", _L, "mm", _SURFACE),
    ("hausdorff_mm", "maximum symmetric surface distance (Hausdorff)", _L, "mm", _SURFACE),
    ("surface_dice", "area-weighted surface Dice at --nsd-tolerance (Nikolov et al. 2021)", _H, "fraction",
     _EV + "surface_dice:surface_dice_elements"),
    ("surface_dice_voxels", "voxel-count surface Dice at --nsd-tolerance (MONAI's variant)", _H, "fraction",
     _SURFACE),
    ("cluster_hd95_mm", "95th percentile over detected reference clusters of their Hausdorff distance "
     "(Boutinaud et al. 2021)", _L, "mm", _EV + "surface_distance:cluster_hd95"),
    # one-to-one lesion metrics (panoptica)
    ("rq", "recognition quality TP / (TP + FP/2 + FN/2) of the one-to-one matching", _H, "fraction", _PANOPTIC),
    ("sq", "segmentation quality: mean IoU of the one-to-one pairs", _H, "fraction", _PANOPTIC),
    ("pq", "panoptic quality SQ x RQ", _H, "fraction", _PANOPTIC),
    ("lesion_dice", "mean Dice of the one-to-one pairs (in the case, or in the size group)", _H, "fraction",
     _PANOPTIC),
    # --protocol valdo
    ("valdo_tp", "VALDO 2021 true positive clusters", _H, "clusters", _VALDO),
    ("valdo_fp", "VALDO 2021 false positive clusters", _L, "clusters", _VALDO),
    ("valdo_fn", "VALDO 2021 false negative clusters", _L, "clusters", _VALDO),
    ("valdo_f1", "VALDO 2021 cluster F1 2TP / (2TP + FP + FN)", _H, "fraction", _VALDO),
    ("valdo_abs_count_diff", "VALDO 2021 |reference clusters - predicted clusters|", _L, "clusters", _VALDO),
    ("valdo_mean_tp_dice", "VALDO 2021 mean Dice over true positive reference clusters", _H, "fraction", _VALDO),
    ("valdo_abs_volume_diff_mm3", "VALDO 2021 |predicted volume - reference volume|", _L, "mm3", _VALDO),
    # --protocol epvs
    ("epvs_dice", "EPVS 2024 voxel Dice", _H, "fraction", _EPVS),
    ("epvs_recall", "EPVS 2024 reference clusters hit / reference clusters", _H, "fraction", _EPVS),
    ("epvs_precision", "EPVS 2024 reference clusters hit / predicted clusters (can exceed 1)", _H, "ratio", _EPVS),
    ("epvs_nvd", "EPVS 2024 |V_pred - V_ref| / V_ref, capped at 1", _L, "fraction", _EPVS),
    # --protocol shivai
    ("shivai_sensitivity", "SHiVAi cluster sensitivity", _H, "fraction", _SHIVAI),
    ("shivai_precision", "SHiVAi cluster precision", _H, "fraction", _SHIVAI),
    ("shivai_f1", "SHiVAi cluster F1", _H, "fraction", _SHIVAI),
    ("shivai_tp", "SHiVAi reference clusters hit", _H, "clusters", _SHIVAI),
    ("shivai_fp", "SHiVAi predicted clusters hitting no reference", _L, "clusters", _SHIVAI),
    ("shivai_fn", "SHiVAi reference clusters missed", _L, "clusters", _SHIVAI),
    ("shivai_voxel_sensitivity", "SHiVAi voxel sensitivity", _H, "fraction", _SHIVAI),
    ("shivai_voxel_precision", "SHiVAi voxel precision", _H, "fraction", _SHIVAI),
    ("shivai_voxel_f1", "SHiVAi voxel F1 (Dice)", _H, "fraction", _SHIVAI),
    # cluster_sizes.csv (--min-cluster-sizes): the counts behind the filtered TPR-CL / PPV-CL
    ("tpr_tp", "TP predicted clusters counted for the filtered cluster_tpr (pieces count)", _N, "clusters",
     _FILTER),
    ("tpr_fn", "missed kept reference clusters, for the filtered cluster_tpr", _L, "clusters", _FILTER),
    ("tpr_n_pred", "predicted clusters beside the filtered reference (pooling count)", _N, "clusters", _FILTER),
    ("n_ref_clusters_kept", "reference clusters larger than the size filter", _N, "clusters", _FILTER),
    ("ppv_tp", "TP kept predicted clusters, for the filtered cluster_ppv (pieces count)", _N, "clusters", _FILTER),
    ("ppv_fp", "false positive kept predicted clusters, for the filtered cluster_ppv", _L, "clusters", _FILTER),
    ("ppv_n_ref", "reference clusters beside the filtered prediction (pooling count)", _N, "clusters", _FILTER),
    ("n_pred_clusters_kept", "predicted clusters larger than the size filter", _N, "clusters", _FILTER),
    # size_groups.csv (--size-groups); per-case columns <metric>_<group> in compare
    ("ref_detected", "reference clusters of the size group that were detected", _H, "clusters", _GROUP),
    ("detection_rate", "detected / reference clusters of the size group", _H, "fraction", _GROUP),
    ("false_positives", "false positive predicted clusters of the size group", _L, "clusters", _GROUP),
    ("n_lesion_pairs", "one-to-one pairs of the size group (denominator of its lesion_dice)", _N, "pairs", _GROUP),
    ("lesion_dice_sum", "sum of the size group's pair Dice (numerator of its lesion_dice, for pooling)", _N,
     "fraction (summed)", _GROUP),
    # pooled tables
    ("n_cases", "cases pooled", _N, "cases", None),
]
METRICS: dict[str, Metric] = {e[0]: Metric(*e) for e in _ENTRIES}

# size-group columns: <metric>_<slug>, slugs as lesion_metrics.SizeGroups.slugs writes them
_NUM = r"[0-9]+(?:p[0-9]+)?(?:e[+-]?[0-9]+)?"
_GROUP_COLUMN = re.compile(rf"(detection_rate|lesion_dice|false_positives)_"
                           rf"(le{_NUM}|{_NUM}to{_NUM}|gt{_NUM})(mm3)?")
_TRUTH_PREFIXES = {"truth_": "against the noise-free truth: ",
                   "rater_truth_": "the reference labels against the noise-free truth: "}


def lookup(name: str) -> Metric | None:
    """The registry entry of a column name, parametric names included; None if unknown."""
    if name in METRICS:
        return METRICS[name]
    for prefix, what in _TRUTH_PREFIXES.items():
        if name.startswith(prefix):
            base = lookup(name[len(prefix):])
            return None if base is None else replace(base, name=name, description=what + base.description)
    m = _GROUP_COLUMN.fullmatch(name)
    if m:
        base = METRICS[m.group(1)]
        unit = "mm3" if m.group(3) else "voxels"
        return replace(base, name=name, description=f"{base.description} ({m.group(2)} {unit})", function=_GROUP)
    return None


def get(name: str) -> Metric:
    """The registry entry of ``name``; an unknown name is a UserError naming it."""
    found = lookup(name)
    if found is None:
        raise UnknownMetric(f"metric {name!r} is not in the metric registry (nnunet_pvs/metric_registry.py), "
                            "so whether higher or lower is better is unknown")
    return found


def direction(name: str) -> Direction:
    """Which way is better for ``name`` (UnknownMetric if the registry does not know it)."""
    return get(name).direction
