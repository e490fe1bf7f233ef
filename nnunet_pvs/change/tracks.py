"""Cluster tracks between two visits and their change status: pure array functions, no files.

Both visits' clusters are label images on the *same* grid (the follow-up's labels carried into
baseline space by :mod:`nnunet_pvs.change.register`). A baseline cluster and a follow-up cluster are
linked when they overlap after allowing ``tolerance`` voxels of misregistration (one voxel: a voxel
of one touches a voxel of the other or one of its 26 neighbours). The connected components of that
bipartite graph are the *tracks*, as LongiSeg keeps one lesion id across visits and lists merges:

* one baseline, one follow-up cluster: ``one-to-one``;
* one baseline, several follow-up: ``split``; several baseline, one follow-up: ``merge``;
  several on both sides: ``merge-split``;
* a baseline cluster alone: ``baseline-only`` (candidate *vanished*); a follow-up cluster alone:
  ``follow-up-only`` (candidate *new*).

Each track gets one status (:func:`classify`), by rules in the spirit of SAMSEG's longitudinal
lesion statistics (S. Cerri, Martinos Center: new / enlarging / shrinking / disappearing lesions, a
minimum size and a dilated-overlap test; its 15 mm^3 minimum is about one mean PVS, so it is not
taken over) with thresholds of PVS size, set above the scan-rescan noise floor:

* matched tracks: ``dV = V_follow_up - V_baseline`` (all clusters of the track summed);
  *enlarged* when ``V_follow_up > (1 + k) V_baseline`` **and** ``dV > m`` baseline voxels,
  *shrunk* when ``V_baseline > (1 + k) V_follow_up`` **and** ``-dV > m`` voxels, otherwise
  *stable*. The change is relative to the smaller of the two volumes, so the rule is symmetric:
  two noisy measurements of one PVS are as likely to differ by a factor 1.5 up as down, and
  growing from 10 to 15 voxels is the same change as shrinking from 15 to 10;
* ``baseline-only`` / ``follow-up-only`` tracks: *vanished* / *new* when the cluster has at least
  ``s`` (baseline) voxels and, for probability maps, the other visit's highest probability within
  the tolerance stays below ``absence_prob`` (a PVS just under the threshold at the other visit did
  not appear or disappear); otherwise *uncertain*: too small or too close to the threshold to call;
* a track not wholly inside both visits' fields of view cannot be measured to have changed: a PVS
  the follow-up cut off at the edge of its slab did not shrink. Its change becomes *uncertain*
  (it stays *stable* when no change was seen).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

STATUSES = ("stable", "enlarged", "shrunk", "new", "vanished", "uncertain")
CHANGES = ("enlarged", "shrunk", "new", "vanished")
RELATIONS = ("one-to-one", "split", "merge", "merge-split", "baseline-only", "follow-up-only")


@dataclass(frozen=True)
class ChangeRules:
    """Thresholds of the classification (see the module docstring); volumes in baseline voxels."""

    min_relative_change: float = 0.5   # k: |dV| / min(V_baseline, V_follow_up) above this for enlarged / shrunk
    min_change_voxels: float = 4.0     # m: |dV| above this many baseline voxels as well
    min_size_voxels: float = 4.0       # s: new / vanished clusters have at least this many voxels
    absence_prob: float | None = None  # probability maps: the other visit stays below this for new / vanished


def cube_offsets(tolerance: int) -> np.ndarray:
    """Voxel offsets within ``tolerance`` along every axis (the 27 of the 26-neighbourhood for 1)."""
    r = np.arange(-tolerance, tolerance + 1)
    return np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)


def overlap_pairs(base_labels: np.ndarray, follow_labels: np.ndarray, tolerance: int = 1
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(baseline label, follow-up label) of every pair of clusters that touch within ``tolerance``.

    A follow-up voxel looks at the baseline labels in its ``(2 t + 1)^3`` neighbourhood, which is the
    same as dilating either side by a cube of radius ``t``; only foreground voxels are visited.
    """
    if base_labels.shape != follow_labels.shape:
        raise ValueError(f"label images differ in shape: {base_labels.shape} vs {follow_labels.shape}")
    shape = np.array(base_labels.shape)
    idx = np.flatnonzero(follow_labels)
    f_lab = follow_labels.ravel()[idx].astype(np.int64)
    ijk = np.stack(np.unravel_index(idx, base_labels.shape), -1)
    keys = []
    n_f = int(follow_labels.max()) + 1 if idx.size else 1
    flat_base = base_labels.ravel()
    for off in cube_offsets(tolerance):
        nb = ijk + off
        inside = ((nb >= 0) & (nb < shape)).all(1)
        b = np.zeros(len(idx), np.int64)
        b[inside] = flat_base[np.ravel_multi_index(tuple(nb[inside].T), base_labels.shape)]
        hit = b > 0
        keys.append(b[hit] * n_f + f_lab[hit])
    uniq = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    return uniq // n_f, uniq % n_f


@dataclass
class Tracks:
    """Clusters grouped into tracks: ``track_of_baseline[c]`` is the track of baseline cluster ``c``
    (index 0 unused), likewise ``track_of_follow_up``; tracks are numbered 1..n in the order of their
    smallest baseline cluster, then (follow-up-only tracks) of their smallest follow-up cluster."""

    n: int
    track_of_baseline: np.ndarray
    track_of_follow_up: np.ndarray

    def members(self, track: int) -> tuple[np.ndarray, np.ndarray]:
        """Baseline and follow-up cluster labels of ``track`` (sorted)."""
        return (np.flatnonzero(self.track_of_baseline == track),
                np.flatnonzero(self.track_of_follow_up == track))

    def relations(self) -> np.ndarray:
        """Relation of each track (row ``t - 1`` for track ``t``), one of :data:`RELATIONS`."""
        nb = np.bincount(self.track_of_baseline[1:], minlength=self.n + 1)[1:]
        nf = np.bincount(self.track_of_follow_up[1:], minlength=self.n + 1)[1:]
        out = np.empty(self.n, dtype=object)
        out[(nb == 1) & (nf == 1)] = "one-to-one"
        out[(nb == 1) & (nf > 1)] = "split"
        out[(nb > 1) & (nf == 1)] = "merge"
        out[(nb > 1) & (nf > 1)] = "merge-split"
        out[nf == 0] = "baseline-only"
        out[nb == 0] = "follow-up-only"
        return out


def build_tracks(n_base: int, n_follow: int, pair_base: np.ndarray, pair_follow: np.ndarray) -> Tracks:
    """Connected components of the bipartite overlap graph (nodes: clusters of both visits)."""
    n = n_base + n_follow
    graph = coo_matrix((np.ones(len(pair_base)), (np.asarray(pair_base) - 1, n_base + np.asarray(pair_follow) - 1)),
                       shape=(n, n))
    _, comp = connected_components(graph, directed=False) if n else (0, np.zeros(0, np.int64))
    # renumber the components in order of first appearance: baseline clusters first, then follow-up
    _, first = np.unique(comp, return_index=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    track = rank[comp] if n else np.zeros(0, np.int64)
    tb = np.zeros(n_base + 1, np.int64)
    tf = np.zeros(n_follow + 1, np.int64)
    tb[1:], tf[1:] = track[:n_base], track[n_base:]
    return Tracks(len(order), tb, tf)


def match(base_labels: np.ndarray, n_base: int, follow_labels: np.ndarray, n_follow: int,
          tolerance: int = 1) -> Tracks:
    """Tracks of two label images on one grid (:func:`overlap_pairs` then :func:`build_tracks`)."""
    pb, pf = overlap_pairs(base_labels, follow_labels, tolerance)
    return build_tracks(n_base, n_follow, pb, pf)


def member_lists(track_of: np.ndarray, n_tracks: int) -> list[list[int]]:
    """Cluster labels of each track (list ``t - 1`` for track ``t``), ascending; one sort, no loop over tracks."""
    labels = np.arange(1, len(track_of))
    order = np.lexsort((labels, track_of[1:]))
    cuts = np.searchsorted(track_of[1:][order], np.arange(1, n_tracks + 2))
    return [labels[order[a:b]].tolist() for a, b in pairwise(cuts)]


def per_track_sum(track_of: np.ndarray, values: np.ndarray, n_tracks: int) -> np.ndarray:
    """Sum of ``values[c]`` (per cluster, index 0 unused) over the clusters of each track."""
    return np.bincount(track_of[1:], weights=np.asarray(values, float)[1:], minlength=n_tracks + 1)[1:]


def neighbourhood_max(labels: np.ndarray, n: int, values: np.ndarray, tolerance: int = 1) -> np.ndarray:
    """Highest value of ``values`` within ``tolerance`` voxels of each cluster (row ``c - 1``): the
    other visit's probability around a cluster with no partner (0 for a cluster with no voxel)."""
    grown = ndimage.maximum_filter(np.asarray(values, np.float32), size=2 * tolerance + 1, mode="constant", cval=0.0) \
        if tolerance > 0 else np.asarray(values, np.float32)
    out = np.zeros(n + 1, np.float64)
    fg = labels > 0
    np.maximum.at(out, labels[fg], grown[fg])
    return out[1:]


def classify(relation: np.ndarray, volume_baseline: np.ndarray, volume_follow_up: np.ndarray,
             voxel_volume: float, rules: ChangeRules, other_max_prob: np.ndarray | None = None,
             in_view: np.ndarray | None = None) -> np.ndarray:
    """Status of each track from its relation, volumes (mm^3, each visit's clusters summed) and, for
    probability maps, the other visit's highest probability around an unmatched cluster (NaN where
    the other visit is a binary mask: no absence test).

    ``voxel_volume`` (mm^3 of one baseline voxel) turns the voxel thresholds of ``rules`` into mm^3;
    ``in_view`` (default all True): the track lies wholly inside both visits' fields of view.
    """
    relation = np.asarray(relation, dtype=object)
    v0, v1 = np.asarray(volume_baseline, float), np.asarray(volume_follow_up, float)
    dv = v1 - v0
    big = np.abs(dv) > rules.min_change_voxels * voxel_volume
    status = np.full(len(relation), "stable", dtype=object)
    matched = ~np.isin(relation, ("baseline-only", "follow-up-only"))
    k = 1.0 + rules.min_relative_change
    status[matched & (v1 > k * v0) & big & (dv > 0)] = "enlarged"
    status[matched & (v0 > k * v1) & big & (dv < 0)] = "shrunk"
    absent = np.ones(len(relation), bool)
    if rules.absence_prob is not None and other_max_prob is not None:
        # NaN: the other visit is a binary mask, which has no "just under the threshold"
        absent = ~(np.asarray(other_max_prob, float) >= rules.absence_prob)
    min_mm3 = rules.min_size_voxels * voxel_volume * (1 - 1e-9)
    gone = relation == "baseline-only"
    came = relation == "follow-up-only"
    status[gone] = np.where((v0[gone] >= min_mm3) & absent[gone], "vanished", "uncertain")
    status[came] = np.where((v1[came] >= min_mm3) & absent[came], "new", "uncertain")
    if in_view is not None:
        status[~np.asarray(in_view, bool) & np.isin(status, CHANGES)] = "uncertain"
    return status


def in_view(track_img: np.ndarray, n: int, imaged: np.ndarray, margin: int = 0) -> np.ndarray:
    """Whether each track (row ``t - 1``) lies inside both fields of view: every voxel of it, and every
    voxel within ``margin`` of it, was imaged by the follow-up (``imaged``, on the baseline grid) and
    is off the outermost ``max(margin, 1)`` layers of the baseline grid (a PVS the baseline's own slab
    cuts off is not whole either). A track with no voxel on the baseline grid (a follow-up cluster
    outside it) is not in view."""
    view = np.asarray(imaged, bool).copy()
    edge = max(margin, 1)
    for axis in range(view.ndim):
        for side in (slice(0, edge), slice(-edge, None)):
            index = [slice(None)] * view.ndim
            index[axis] = side
            view[tuple(index)] = False
    touches = neighbourhood_max(track_img, n, (~view).astype(np.float32), margin) > 0
    present = np.bincount(track_img[track_img > 0], minlength=n + 1)[1:] > 0
    return present & ~touches
