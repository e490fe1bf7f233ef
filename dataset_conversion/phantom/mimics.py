"""Look-alikes that are never labelled PVS: what a filter confuses with PVS and a network can learn to reject.

* white-matter hyperintensities (WMH): 0-30 cm3 rising with age (whole-brain equivalent), irregular
  (a thresholded smooth random field), periventricular caps and bands plus deep patches; bright on
  T2w, mildly dark on T1w (Wardlaw et al. 2013, STRIVE);
* sulcal CSF at the cortex: 1-2 mm wide, 5-15 mm long fluid fingers entering from the cortical
  surface along the inward normal, reaching the grey-white junction (Cai et al. 2024 Fig. 4: sulci
  are the main false positives); the region map is not changed, as an automatic aseg misses them;
* vessels with flow voids: 1.2-2.4 mm wide, 10-30 mm long, running tangentially (not along the
  medullary or lenticulostriate course), darker than CSF on both contrasts;
* lacunes: 3-15 mm fluid cavities with a 1 mm gliotic rim, 0-1 in young subjects and more with age
  (STRIVE: 3-15 mm, often with a hyperintense rim).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from nnunet_pvs.dataset_conversion.phantom.anatomy import CSF_LABELS, LENTICULAR_LABELS, WM_LABELS, inward
from nnunet_pvs.dataset_conversion.phantom.pvs import Tube, grow
from nnunet_pvs.dataset_conversion.phantom.rendering import render_ellipsoid, render_tube

WHOLE_BRAIN_WM_CM3 = 450.0  # MNI152 cerebral WM, to scale whole-brain WMH volumes to a field of view
SULCI_PER_CM3_CORTEX = 0.5
VESSELS_PER_CM3_WM = 0.06


def wmh_volume_cm3(rng, contrast: str, age: int) -> float:
    """Whole-brain WMH volume: median about 1 cm3 at 45 rising to 10 at 79 (T2w cohort); small when young."""
    if contrast == "T2w":
        median = 0.8 * np.exp(0.07 * (age - 42))
        return float(np.clip(rng.lognormal(np.log(median), 0.8), 0.0, 30.0))
    return float(np.clip(rng.lognormal(np.log(0.15), 1.0), 0.0, 3.0))


def wmh_fraction(rng, volume_cm3: float, an: dict, spacing) -> np.ndarray:
    """Soft WMH map (0..1): the top-scoring WM voxels of a smooth random field plus a periventricular bias."""
    labels = an["labels"]
    wm = np.isin(labels, WM_LABELS) & (an["csf"] < 0.3)
    out = np.zeros(labels.shape, np.float32)
    voxel_mm3 = float(np.prod(spacing))
    n_vox = int(volume_cm3 * 1000.0 / voxel_mm3 * wm.sum() * voxel_mm3 / 1000.0 / WHOLE_BRAIN_WM_CM3)
    if n_vox < 3 or not wm.any():
        return out
    sig = 2.0 / np.asarray(spacing)
    field = ndimage.gaussian_filter(rng.normal(0, 1, labels.shape).astype(np.float32), sig)
    field /= max(float(field.std()), 1e-6)
    vent = np.isin(labels, CSF_LABELS[:2])
    score = field
    if vent.any():
        dist = ndimage.distance_transform_edt(~vent, sampling=spacing)
        score = field + 2.5 * np.exp(-dist / 5.0)
    vals = score[wm]
    thr = np.partition(vals, len(vals) - min(n_vox, len(vals)))[len(vals) - min(n_vox, len(vals))]
    soft = np.clip((score - thr) / 0.4 + 0.5, 0, 1) * wm
    return ndimage.gaussian_filter(soft.astype(np.float32), 0.5 / np.asarray(spacing)) * wm


def sulcal_fingers(rng, an, origin, spacing, offsets) -> np.ndarray:
    """Coverage map of thin CSF fingers entering from the cortical surface."""
    labels = an["labels"]
    shape = labels.shape
    cortex = np.isin(labels, (3, 42))
    outer = cortex & ndimage.binary_dilation(~(labels > 0) | (labels == CSF_LABELS[2]))
    seeds = np.argwhere(outer)
    out = np.zeros(shape, np.float32)
    n = int(rng.poisson(SULCI_PER_CM3_CORTEX * cortex.sum() * np.prod(spacing) / 1000.0))
    allowed = (3, 42) + WM_LABELS
    for _ in range(n if len(seeds) else 0):
        p0 = origin + seeds[rng.integers(len(seeds))] * spacing

        def ok(p):
            i = np.round((p - origin) / spacing).astype(int)
            return bool(np.all(i >= 0) and np.all(i < shape) and labels[tuple(i)] in allowed)
        d0 = inward(an, p0)
        poly = grow(rng, p0, d0, rng.uniform(5, 15), lambda p: ok(p),
                    lambda p, d: 0.1 * inward(an, p), one_way=True, jitter=0.05)
        if poly is None:
            continue
        r = rng.uniform(0.5, 1.0)
        tube = Tube(poly, np.linspace(r, r * 0.6, 4), np.ones(4), "sulcus")
        res = render_tube(tube.poly, tube.radius_at, tube.signal_at, shape, origin, spacing, offsets)
        if res is not None:
            idx, cover, _, _ = res
            sl = tuple(idx.T)
            out[sl] = np.maximum(out[sl], cover)
    return out


def vessels(rng, an, origin, spacing, offsets, forbid) -> np.ndarray:
    """Coverage map of flow-void vessels running tangentially through WM and the basal ganglia."""
    labels = an["labels"]
    shape = labels.shape
    tissue = np.isin(labels, WM_LABELS + LENTICULAR_LABELS)
    seeds = np.argwhere(tissue & (an["csf"] < 0.2))
    out = np.zeros(shape, np.float32)
    n = int(rng.poisson(VESSELS_PER_CM3_WM * tissue.sum() * np.prod(spacing) / 1000.0))
    allowed = WM_LABELS + LENTICULAR_LABELS + (3, 42)
    for _ in range(n if len(seeds) else 0):
        p0 = origin + seeds[rng.integers(len(seeds))] * spacing
        if forbid(p0):
            continue
        g = inward(an, p0)
        d0 = np.cross(g, rng.normal(0, 1, 3))
        if np.linalg.norm(d0) < 1e-6:
            continue

        def ok(p):
            i = np.round((p - origin) / spacing).astype(int)
            return bool(np.all(i >= 0) and np.all(i < shape) and labels[tuple(i)] in allowed)
        poly = grow(rng, p0, d0 / np.linalg.norm(d0), rng.uniform(10, 30), ok,
                    lambda p, d: -0.3 * np.dot(inward(an, p), d) * inward(an, p), jitter=0.04)
        if poly is None:
            continue
        r = rng.uniform(0.6, 1.2)
        res = render_tube(poly, lambda f, r=r: np.full_like(np.asarray(f, float), r),
                          lambda f: np.ones_like(np.asarray(f, float)), shape, origin, spacing, offsets)
        if res is not None:
            idx, cover, _, _ = res
            sl = tuple(idx.T)
            out[sl] = np.maximum(out[sl], cover)
    return out


def lacunes(rng, contrast, age, youngest, an, origin, spacing, offsets):
    """(core coverage, rim coverage, [(centre, semi-axes)]) of lacunes in deep WM and the lenticular nucleus."""
    labels = an["labels"]
    shape = labels.shape
    deep = np.argwhere(np.isin(labels, WM_LABELS + LENTICULAR_LABELS) & (an["csf"] < 0.2))
    rate = 0.2 + 0.05 * (age - youngest) if contrast == "T2w" else 0.25
    n = int(rng.poisson(rate))
    core = np.zeros(shape, np.float32)
    rim = np.zeros(shape, np.float32)
    found = []
    for _ in range(n if len(deep) else 0):
        c = origin + deep[rng.integers(len(deep))] * spacing
        diameter = float(np.clip(rng.lognormal(np.log(5.0), 0.45), 3.0, 15.0))
        a = diameter / 2 * rng.uniform(0.7, 1.0, 3)
        q, _ = np.linalg.qr(rng.normal(0, 1, (3, 3)))
        inner = render_ellipsoid(c, a, shape, origin, spacing, offsets, q)
        outer = render_ellipsoid(c, a + 1.0, shape, origin, spacing, offsets, q)
        if inner is None or outer is None:
            continue
        (ii, ci), (io, co) = inner, outer
        rim[tuple(io.T)] = np.maximum(rim[tuple(io.T)], co)
        core[tuple(ii.T)] = np.maximum(core[tuple(ii.T)], ci)
        found.append((c, a + 1.0))
    rim = np.clip(rim - core, 0, 1)
    return core, rim, found
