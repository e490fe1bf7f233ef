"""Partial-volume rendering: shapes are tested on a sub-voxel grid (at least 3 points per axis and
voxel, 5 across 2 mm slices) and averaged down, so a tube thinner than a voxel covers a fraction of
it and appears faint, as on real scans. Only voxels near a shape are supersampled.
"""

from __future__ import annotations

import numpy as np


def subsample_offsets(spacing) -> np.ndarray:
    """(K, 3) offsets in mm of the sub-voxel points of a voxel: 3 per axis up to 1 mm, 5 above."""
    n = [3 if s <= 1.0 else 5 for s in spacing]
    axes = [((np.arange(k) + 0.5) / k - 0.5) * s for k, s in zip(n, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def polyline_closest(p: np.ndarray, poly: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of points p (N, 3) to a polyline (M, 3) and the arc-length fraction (0..1) of the closest point."""
    a, b = poly[:-1], poly[1:]
    ab = b - a
    seg_len = np.sqrt((ab * ab).sum(1))
    cum = np.concatenate([[0.0], np.cumsum(seg_len)])
    total = max(cum[-1], 1e-9)
    denom = np.maximum(seg_len ** 2, 1e-12)
    ap = p[:, None, :] - a[None]
    t = np.clip((ap * ab[None]).sum(2) / denom, 0, 1)
    d2 = ((ap - t[..., None] * ab[None]) ** 2).sum(2)
    k = np.argmin(d2, 1)
    rows = np.arange(len(p))
    frac = (cum[k] + t[rows, k] * seg_len[k]) / total
    return np.sqrt(d2[rows, k]), frac


def voxel_box(lo, hi, shape, origin, spacing):
    """Voxel index ranges [i0, i1) covering the world box [lo, hi]; None when outside the grid."""
    i0 = np.maximum(np.floor((np.asarray(lo) - origin) / spacing).astype(int), 0)
    i1 = np.minimum(np.ceil((np.asarray(hi) - origin) / spacing).astype(int) + 1, np.array(shape))
    return None if np.any(i1 <= i0) else (i0, i1)


def _closest_among(p: np.ndarray, a: np.ndarray, ab: np.ndarray, seg: np.ndarray, cum: np.ndarray,
                   seg_len: np.ndarray, total: float) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`polyline_closest`, each point (n, K, 3) tested only against its candidate segments (n, C)."""
    sa, sab = a[seg], ab[seg]                                   # (n, C, 3)
    denom = np.maximum((sab * sab).sum(-1), 1e-12)              # (n, C)
    ap = p[:, :, None, :] - sa[:, None]                         # (n, K, C, 3)
    t = np.clip((ap * sab[:, None]).sum(-1) / denom[:, None], 0, 1)
    d2 = ((ap - t[..., None] * sab[:, None]) ** 2).sum(-1)      # (n, K, C)
    k = np.argmin(d2, -1)
    d = np.sqrt(np.take_along_axis(d2, k[..., None], -1)[..., 0])
    tk = np.take_along_axis(t, k[..., None], -1)[..., 0]
    sk = np.take_along_axis(np.broadcast_to(seg[:, None, :], d2.shape), k[..., None], -1)[..., 0]
    return d, (cum[sk] + tk * seg_len[sk]) / total


def render_tube(poly: np.ndarray, radius_at, signal_at, shape, origin, spacing, offsets, candidates: int = 4):
    """Voxels touched by a tube of varying radius around ``poly``.

    ``radius_at(f)`` / ``signal_at(f)`` give radius (mm) and relative signal (0..1) at arc-length
    fraction f. Sub-voxel points are tested against the ``candidates`` segments nearest to their
    voxel's centre (the nearest segment of a point half a voxel away is among them). Returns
    (voxel indices (n, 3), coverage fraction, signal-weighted coverage, centre-inside flag) or None.
    """
    r_max = float(radius_at(np.linspace(0, 1, 33)).max())
    half_diag = 0.5 * float(np.linalg.norm(spacing))
    box = voxel_box(poly.min(0) - r_max - half_diag, poly.max(0) + r_max + half_diag, shape, origin, spacing)
    if box is None:
        return None
    i0, i1 = box
    idx = np.indices(i1 - i0).reshape(3, -1).T + i0
    centers = origin + idx * spacing
    d, f = polyline_closest(centers, poly)
    near = d <= radius_at(f) + half_diag
    if not near.any():
        return None
    idx, centers, d, f = idx[near], centers[near], d[near], f[near]
    a, b = poly[:-1], poly[1:]
    ab = b - a
    seg_len = np.sqrt((ab * ab).sum(1))
    cum = np.concatenate([[0.0], np.cumsum(seg_len)])
    m = len(a)
    if m > candidates:
        ap = centers[:, None, :] - a[None]
        t = np.clip((ap * ab[None]).sum(2) / np.maximum(seg_len ** 2, 1e-12), 0, 1)
        d2 = ((ap - t[..., None] * ab[None]) ** 2).sum(2)
        seg = np.argpartition(d2, candidates - 1, axis=1)[:, :candidates]
    else:
        seg = np.broadcast_to(np.arange(m), (len(centers), m))
    sub = centers[:, None, :] + offsets[None]
    ds, fs = _closest_among(sub, a, ab, seg, cum, seg_len, max(cum[-1], 1e-9))
    inside = ds <= radius_at(fs)
    cover = inside.mean(1)
    weighted = (inside * signal_at(fs)).mean(1)
    return idx, cover.astype(np.float32), weighted.astype(np.float32), d <= radius_at(f)


def render_ellipsoid(center, semi_axes, shape, origin, spacing, offsets, rotation=None):
    """Coverage of an (optionally rotated) ellipsoid: (voxel indices, coverage) or None."""
    center, semi_axes = np.asarray(center, float), np.asarray(semi_axes, float)
    rot = np.eye(3) if rotation is None else np.asarray(rotation, float)
    reach = semi_axes.max() + 0.5 * float(np.linalg.norm(spacing))
    box = voxel_box(center - reach, center + reach, shape, origin, spacing)
    if box is None:
        return None
    i0, i1 = box
    idx = np.indices(i1 - i0).reshape(3, -1).T + i0
    centers = origin + idx * spacing
    sub = (centers[:, None, :] + offsets[None]).reshape(-1, 3)
    q = ((sub - center) @ rot) / semi_axes
    cover = ((q * q).sum(1) <= 1.0).reshape(len(centers), -1).mean(1)
    keep = cover > 0
    return (idx[keep], cover[keep].astype(np.float32)) if keep.any() else None
