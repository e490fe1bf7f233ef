"""One region per cluster, by majority of its voxels (SHiVAi and Boutinaud et al. 2021 count each
cluster once, in one region, so per-region counts add up to the whole-brain count).

Tie rule (deterministic, unlike SHiVAi's random choice): among regions holding the same largest
number of a cluster's voxels, the one listed first in ``region_names`` wins. A cluster with no
voxel in any region gets ``OUTSIDE``.
"""

from __future__ import annotations

import numpy as np

OUTSIDE = "outside"


def region_index_map(shape, region_masks: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """Integer map: 0 outside every region, k for the k-th region (an earlier region wins an overlap)."""
    names = list(region_masks)
    index = np.zeros(shape, np.int32)
    for k in range(len(names), 0, -1):  # fill in reverse so the first-listed region wins overlaps
        index[np.asarray(region_masks[names[k - 1]], bool)] = k
    return index, names


def region_voxel_counts(cluster_labels: np.ndarray, n_clusters: int, region_index: np.ndarray,
                        n_regions: int) -> np.ndarray:
    """(n_clusters + 1, n_regions + 1) voxel counts; row 0 = background, column 0 = outside all regions."""
    fg = cluster_labels > 0
    flat = cluster_labels[fg].astype(np.int64) * (n_regions + 1) + region_index[fg]
    counts = np.bincount(flat, minlength=(n_clusters + 1) * (n_regions + 1))
    return counts.reshape(n_clusters + 1, n_regions + 1)


def majority_regions(cluster_labels: np.ndarray, n_clusters: int,
                     region_masks: dict[str, np.ndarray]) -> np.ndarray:
    """Region name of clusters 1..n (array of length n + 1; entry 0 is unused and set to ``OUTSIDE``)."""
    index, names = region_index_map(cluster_labels.shape, region_masks)
    counts = region_voxel_counts(cluster_labels, n_clusters, index, len(names))[:, 1:]
    out = np.full(n_clusters + 1, OUTSIDE, dtype=object)
    if names:
        best = np.argmax(counts, axis=1)  # first maximum: the earliest-listed region wins a tie
        has = counts.max(axis=1) > 0
        out[has] = np.asarray(names, dtype=object)[best[has]]
    out[0] = OUTSIDE
    return out
