"""Per-lesion metrics on a one-to-one matching: panoptic quality, per-lesion Dice, size groups.

Panoptic quality as panoptica defines it (Kofler et al., panoptica, 2023; Kirillov et al. 2019):
RQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of the matched pairs, PQ = SQ x RQ, and the
per-lesion Dice = mean Dice of the matched pairs (panoptica's ``sq_dsc``). Empty conventions are
panoptica's: no cluster on either side -> undefined (NaN); clusters on one side only, or no match
-> 0.

Size groups (small PVS are where methods differ): clusters are put into groups by size
(``(lo, hi]`` voxels or mm3); per group, the reference clusters and how many were detected (under
the case's matching rule), the predicted clusters and how many are false positives, and the
per-lesion Dice of the one-to-one pairs whose reference cluster is in the group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nnunet_pvs.evaluation.clusters import ClusterMatch

PANOPTIC_METRICS = ["rq", "sq", "pq", "lesion_dice"]


def panoptic(m: ClusterMatch, matched: np.ndarray) -> dict:
    """RQ, SQ, PQ and per-lesion Dice of the one-to-one pairs ``matched`` (bool per pair of ``m``)."""
    tp = int(matched.sum())
    fp, fn = m.n_pred - tp, m.n_ref - tp
    if tp == 0:
        v = 0.0 if m.n_ref + m.n_pred > 0 else math.nan
        return {"rq": v, "sq": v, "pq": v, "lesion_dice": v}
    rq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(m.pair_iou[matched].mean())
    return {"rq": rq, "sq": sq, "pq": sq * rq, "lesion_dice": float(m.pair_dice[matched].mean())}


@dataclass(frozen=True)
class SizeGroups:
    """Group edges in voxels or mm3: edges (a, b) give the groups (0, a], (a, b], (b, inf)."""

    edges: tuple[float, ...]
    unit: str = "voxels"  # or "mm3"

    @classmethod
    def parse(cls, text: str) -> "SizeGroups":
        raw, t = text, text.strip().lower().replace(" ", "")
        unit = "voxels"
        for suffix, u in (("mm3", "mm3"), ("voxels", "voxels"), ("vox", "voxels")):
            if t.endswith(suffix):
                t, unit = t[: -len(suffix)], u
                break
        try:
            edges = tuple(float(v) for v in t.split(",") if v)
        except ValueError:
            raise ValueError(f"--size-groups {raw!r}: give increasing sizes, e.g. 10 or 5,20 or 5,20mm3") from None
        if not edges or any(e <= 0 or not math.isfinite(e) for e in edges) or any(
                b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"--size-groups {raw!r}: edges must be positive and strictly increasing")
        return cls(edges, unit)

    def labels(self) -> list[str]:
        u = " mm3" if self.unit == "mm3" else ""
        bounds = [0.0, *self.edges]
        out = [f"({a:g}, {b:g}]{u}" for a, b in zip(bounds, bounds[1:])]
        return out + [f"> {self.edges[-1]:g}{u}"]

    def slugs(self) -> list[str]:
        """Column-name forms of the groups: le10, 10to20, gt20 (with an mm3 suffix in mm3)."""
        u = "mm3" if self.unit == "mm3" else ""
        e = [f"{v:g}".replace(".", "p") for v in self.edges]
        return [f"le{e[0]}{u}"] + [f"{a}to{b}{u}" for a, b in zip(e, e[1:])] + [f"gt{e[-1]}{u}"]

    def __str__(self) -> str:
        return ",".join(f"{e:g}" for e in self.edges) + ("mm3" if self.unit == "mm3" else "")


GROUP_COLUMN_METRICS = ("detection_rate", "lesion_dice", "false_positives")


def size_group_columns(groups: SizeGroups | None) -> list[str]:
    """Per-case columns that carry the size-group results (e.g. detection_rate_le10)."""
    if groups is None:
        return []
    return [f"{m}_{slug}" for slug in groups.slugs() for m in GROUP_COLUMN_METRICS]


def size_group_rows(m: ClusterMatch, one_to_one: np.ndarray, groups: SizeGroups, voxel_mm3: float) -> list[dict]:
    """One row per size group: reference/predicted counts, detections, false positives, lesion Dice."""
    scale = voxel_mm3 if groups.unit == "mm3" else 1.0
    edges = np.asarray(groups.edges)
    # group index 0..len(edges): size <= e0 -> 0, (e0, e1] -> 1, ...
    ref_g = np.searchsorted(edges, m.ref_sizes[1:] * scale - 1e-9, side="left")
    pred_g = np.searchsorted(edges, m.pred_sizes[1:] * scale - 1e-9, side="left")
    ng = len(edges) + 1
    ref_hit = np.zeros(m.n_ref + 1, bool)
    ref_hit[m.pair_ref[m.matched]] = True
    pred_hit = np.zeros(m.n_pred + 1, bool)
    pred_hit[m.pair_pred[m.matched]] = True
    n_ref = np.bincount(ref_g, minlength=ng)
    det = np.bincount(ref_g, weights=ref_hit[1:], minlength=ng)
    n_pred = np.bincount(pred_g, minlength=ng)
    fp = np.bincount(pred_g, weights=~pred_hit[1:], minlength=ng)
    pair_g = ref_g[m.pair_ref[one_to_one] - 1]
    dice_sum = np.bincount(pair_g, weights=m.pair_dice[one_to_one], minlength=ng)
    n_pairs = np.bincount(pair_g, minlength=ng)
    rows = []
    for k, name in enumerate(groups.labels()):
        rows.append({"size_group": name, "n_ref_clusters": int(n_ref[k]), "ref_detected": int(det[k]),
                     "detection_rate": det[k] / n_ref[k] if n_ref[k] else math.nan,
                     "n_pred_clusters": int(n_pred[k]), "false_positives": int(fp[k]),
                     "n_lesion_pairs": int(n_pairs[k]), "lesion_dice_sum": float(dice_sum[k]),
                     "lesion_dice": dice_sum[k] / n_pairs[k] if n_pairs[k] else math.nan})
    return rows
