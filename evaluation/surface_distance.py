"""Surface distances in mm: HD95, Hausdorff, surface Dice at a tolerance, and Boutinaud's
per-cluster Hausdorff HD95.

A surface voxel is a mask voxel with at least one neighbour outside the mask (outside the image
counts as outside). ``connectivity`` 6 (default) takes face neighbours, as medpy ``hd95``, MONAI
and the Medical Segmentation Decathlon do; 26 takes every neighbour (as pvs-seg-nnunet does),
which marks more voxels of thin structures as surface and can change HD95 by a fraction of a
voxel. HD95 is the 95th percentile of the pooled distances from each surface voxel of one mask to
the nearest surface voxel of the other, both directions; the Hausdorff distance is their maximum.

Surface Dice at tolerance tau, voxel-count variant (``surface_dice_voxels``): the surface voxels of
both masks that lie within tau of the other mask's surface, over all surface voxels of both
masks, as MONAI's ``compute_surface_dice`` (``use_subvoxels=False``) counts them. The
area-weighted surface Dice of Nikolov et al. 2021 is in ``surface_dice.py``; at a tolerance near
one voxel the two differ markedly (voxel-centre distances are 0, 1, 1.41... voxels, corner-lattice
ones come in half voxels).

PVS masks are sparse, so instead of a distance transform over the whole volume we query a k-d
tree built on the surface voxels' physical coordinates: the same exact Euclidean nearest-voxel
distance that ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)`` gives, in time
proportional to the number of surface voxels rather than to the volume.

Empty convention (same as the ratios): both masks empty -> distances 0.0 mm, surface Dice 1;
one empty -> distances NaN, surface Dice 0.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist


def _neighbour_offsets(connectivity: int) -> list[tuple[int, int, int]]:
    if connectivity == 6:
        return [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    if connectivity == 26:  # half of the 26 neighbours; each offset is used in both directions
        offs = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)]
        return [o for o in offs if o > (0, 0, 0)]
    raise ValueError(f"surface connectivity must be 6 or 26, got {connectivity}")


def surface_of(mask: np.ndarray, index: np.ndarray, connectivity: int = 6) -> np.ndarray:
    """For the mask voxels at flat ``index`` (C order), whether each is a surface voxel: on the
    image border or with a neighbour (6- or 26-neighbourhood) outside the mask. Work is
    proportional to the mask size."""
    flat = np.ascontiguousarray(mask).ravel()
    coords = np.unravel_index(index, mask.shape)
    strides = np.cumprod((1, *mask.shape[::-1]))[:-1][::-1]
    edge = np.zeros(len(index), bool)
    for ax in range(mask.ndim):
        edge |= (coords[ax] == 0) | (coords[ax] == mask.shape[ax] - 1)
    surf = edge.copy()
    inner = index[~edge]
    inside = np.ones(len(inner), bool)
    for off in _neighbour_offsets(connectivity):
        step = int(np.dot(off, strides))
        inside &= flat[inner - step] & flat[inner + step]
    surf[~edge] = ~inside
    return surf


def surface(mask: np.ndarray, connectivity: int = 6) -> np.ndarray:
    """Boolean surface of a 3D mask: voxels with a neighbour outside the mask or the image."""
    m = np.asarray(mask, bool)
    index = np.flatnonzero(m)
    out = np.zeros(m.size, bool)
    out[index[surface_of(m, index, connectivity)]] = True
    return out.reshape(m.shape)


def surface_points(mask: np.ndarray, spacing, connectivity: int = 6) -> tuple[np.ndarray, tuple]:
    """Physical coordinates (N, 3) of the surface voxels, and their voxel indices."""
    idx = np.nonzero(surface(mask, connectivity))
    return np.stack(idx, axis=1) * np.asarray(spacing, float), idx


def _directed(a: np.ndarray, b: np.ndarray, tree_b: cKDTree | None = None) -> np.ndarray:
    """Distance from each point of ``a`` to the nearest point of ``b`` (``tree_b``: its k-d tree)."""
    if tree_b is None and len(a) * len(b) <= 200_000:
        return cdist(a, b).min(axis=1)
    return (cKDTree(b) if tree_b is None else tree_b).query(a, k=1)[0]


def hd95_points(a: np.ndarray, b: np.ndarray, percentile: float = 95.0) -> float:
    """Symmetric percentile surface distance between two point sets (empty convention above)."""
    if len(a) == 0 and len(b) == 0:
        return 0.0
    if len(a) == 0 or len(b) == 0:
        return math.nan
    return float(np.percentile(np.concatenate([_directed(a, b), _directed(b, a)]), percentile))


def hd95(ref: np.ndarray, pred: np.ndarray, spacing, percentile: float = 95.0, connectivity: int = 6) -> float:
    """95th-percentile symmetric surface distance in mm between two boolean masks."""
    return hd95_points(surface_points(ref, spacing, connectivity)[0],
                       surface_points(pred, spacing, connectivity)[0], percentile)


def surface_metrics(a: np.ndarray, b: np.ndarray, tolerance_mm: float, tree_a: cKDTree | None = None) -> dict:
    """HD95, Hausdorff (max) and voxel-count surface Dice at ``tolerance_mm`` of two surface point
    sets, from one nearest-neighbour query per direction (empty convention in the module docstring)."""
    if len(a) == 0 and len(b) == 0:
        return {"hd95_mm": 0.0, "hausdorff_mm": 0.0, "surface_dice_voxels": 1.0}
    if len(a) == 0 or len(b) == 0:
        return {"hd95_mm": math.nan, "hausdorff_mm": math.nan, "surface_dice_voxels": 0.0}
    dab, dba = _directed(a, b), _directed(b, a, tree_a)
    both = np.concatenate([dab, dba])
    within = np.count_nonzero(both <= tolerance_mm + 1e-9)
    return {"hd95_mm": float(np.percentile(both, 95.0)), "hausdorff_mm": float(both.max()),
            "surface_dice_voxels": within / len(both)}


def hausdorff_points(a: np.ndarray, b: np.ndarray) -> float:
    """Classic (maximum) symmetric Hausdorff distance between two non-empty point sets."""
    if len(a) * len(b) <= 200_000:
        d = cdist(a, b)
        return float(max(d.min(axis=1).max(), d.min(axis=0).max()))
    return float(max(_directed(a, b).max(), _directed(b, a).max()))


def group_points(points: np.ndarray, labels: np.ndarray, n: int) -> list[np.ndarray]:
    """Split points by their cluster label (1..n); entry 0 is empty."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(n + 2))
    pts = points[order]
    return [pts[bounds[i]:bounds[i + 1]] for i in range(n + 1)]


def cluster_hd95(ref_groups: list[np.ndarray], pred_groups: list[np.ndarray],
                 pair_ref: np.ndarray, pair_pred: np.ndarray, any_ref: bool, any_pred: bool,
                 percentile: float = 95.0) -> float:
    """Boutinaud et al. 2021: Hausdorff distance between each detected reference cluster and its
    predicted counterpart (the union of the predicted clusters matched to it), then the 95th
    percentile over the reference clusters of the case.

    ``pair_ref``/``pair_pred`` are the matched pairs. No detected cluster: 0.0 if both masks are
    empty, NaN otherwise.
    """
    if len(pair_ref) == 0:
        return 0.0 if not (any_ref or any_pred) else math.nan
    order = np.argsort(pair_ref, kind="stable")
    pr, pp = pair_ref[order], pair_pred[order]
    starts = np.flatnonzero(np.r_[True, pr[1:] != pr[:-1]])
    ends = np.r_[starts[1:], len(pr)]
    hds = np.empty(len(starts))
    for i, (s, e) in enumerate(zip(starts, ends)):
        counterpart = pred_groups[pp[s]] if e - s == 1 else np.concatenate(
            [pred_groups[p] for p in pp[s:e]])
        hds[i] = hausdorff_points(ref_groups[pr[s]], counterpart)
    return float(np.percentile(hds, percentile))
