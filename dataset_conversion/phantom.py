"""Synthetic PVS phantom built on nilearn's bundled MNI152 template: the default dataset (no download).

Per subject (all randomness from ``numpy.random.default_rng([seed, contrast, index])``):

* **anatomy**: the 1 mm MNI152 template's GM/WM/brain maps, warped by a random smooth deformation
  (small rotation and scaling, a few mm of smooth displacement) and sampled on the acquisition grid
  (averaging sub-slices across thick slices: partial volume). Deep grey nuclei, absent from the
  tissue maps, are ellipsoids at their MNI positions; the region label map uses aseg numbering.
* **PVS**: thin tubes (diameter 1-3 mm, length several mm to a few cm) grown step by step:
  in the white matter roughly perpendicular to the cortex (along the gradient of the smoothed
  brain mask), in putamen/pallidum along lenticulostriate directions (ascending, tilted laterally,
  bending as they rise). Their count follows a per-subject load (log-normal, rising with age),
  stored as covariates. Intensity is CSF-like, mixed by the fraction of each voxel the tube covers
  (sub-voxel sampling), so thin or oblique PVS are fainter, as on real 3T scans.
* **distractors, not in the mask**: lacune-like CSF blobs (3-8 mm) and the sulcal/ventricular CSF
  of the template, so a detector of "bright thin things" pays in precision (Cai et al. 2024 Fig. 4:
  sulci confused with PVS).
* **contrast**: T2w-like (CSF/PVS bright) on 0.69 x 0.69 x 2 mm axial slices (Cai et al. 2024),
  or T1w-like (CSF/PVS dark) at 1 mm isotropic (Boutinaud et al. 2021); multiplicative smooth bias
  field; Rician noise (magnitude of complex Gaussian noise).

The ground-truth mask is the set of voxels at least 35 % covered by a tube (or whose centre lies in
one); tubes that leave no mask voxel are discarded, so what is drawn is what is annotated.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from nnunet_pvs.errors import UserError

GENERATOR_VERSION = 1

# Grids: T2w-like axial 0.69 x 0.69 x 2 mm (Cai), T1w-like 1 mm isotropic (Boutinaud).
SPACING = {"T2w": (0.69, 0.69, 2.0), "T1w": (1.0, 1.0, 1.0)}


@dataclass(frozen=True)
class Size:
    """Field of view per contrast (voxels, x y z) and its centre in MNI mm."""

    t2w_shape: tuple[int, int, int]
    t1w_shape: tuple[int, int, int]
    center: tuple[float, float, float]
    n_subjects: int
    doc: str


SIZES = {
    "tiny": Size((64, 64, 8), (40, 40, 40), (24.0, 0.0, 14.0), 6,
                 "right putamen and corona radiata crop; for tests (seconds)"),
    "small": Size((160, 160, 24), (96, 112, 80), (0.0, -8.0, 16.0), 20,
                  "both basal ganglia and the lower centrum semiovale; for the CPU demo"),
    "full": Size((224, 272, 64), (144, 176, 128), (0.0, -18.0, 10.0), 20,
                 "whole brain; realistic runs (GPU)"),
}
SIZES["demo"] = SIZES["small"]

# Tissue intensities (arbitrary units, x1000 when stored).
CONTRAST = {
    "T2w": {"csf": 1.00, "gm": 0.52, "wm": 0.38, "dgm": 0.46, "pvs": 0.97, "lacune": 0.92},
    "T1w": {"csf": 0.18, "gm": 0.50, "wm": 0.80, "dgm": 0.62, "pvs": 0.20, "lacune": 0.16},
}
NOISE_SIGMA = 0.03  # Rician sigma, relative to the CSF-WM range
AGE_RANGE = {"T2w": (42, 79), "T1w": (18, 35)}  # Cai: PD patients 42-79 y; Boutinaud: MRi-Share 18-35 y

# aseg numbering (left, right)
ASEG = {"wm": (2, 41), "cortex": (3, 42), "lat_vent": (4, 43), "thalamus": (10, 49), "caudate": (11, 50),
        "putamen": (12, 51), "pallidum": (13, 52), "accumbens": (26, 58)}
ASEG_CSF = 24
CSF_LABELS = (4, 43, ASEG_CSF)
WM_LABELS = (2, 41)
LENTICULAR_LABELS = (12, 13, 51, 52)
BG_LABELS = (10, 11, 12, 13, 26, 49, 50, 51, 52, 58)
# Deep grey nuclei as ellipsoids: centre (|x|, y, z) and semi-axes in MNI mm; later ones win.
NUCLEI = [("thalamus", (11, -18, 6), (7, 12, 8)), ("caudate", (13, 11, 10), (4.5, 11, 9)),
          ("putamen", (25, 3, 1), (5.5, 14, 9)), ("pallidum", (19, -3, -1), (3.5, 7, 5)),
          ("accumbens", (9, 11, -8), (4, 4, 4))]


@functools.lru_cache(maxsize=1)
def _templates():
    """MNI152 1 mm GM, WM, brain maps and the 2 mm gradient of the smoothed brain (inward normal)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

        brain_img = datasets.load_mni152_brain_mask(resolution=1)
        gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
        wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    brain = brain_img.get_fdata(dtype=np.float32)
    smooth = ndimage.gaussian_filter(brain[::2, ::2, ::2], 4.0)
    grad = np.stack(np.gradient(smooth), 0).astype(np.float32)  # points into the brain
    return {"gm": gm, "wm": wm, "brain": brain, "grad": grad, "inv_affine": np.linalg.inv(brain_img.affine)}


def _sample(vol, vox, order=1):
    return ndimage.map_coordinates(vol, vox, order=order, mode="constant", cval=0.0, prefilter=False)


@dataclass
class Warp:
    """Subject space (mm) -> MNI mm: affine part plus a smooth displacement field."""

    center: np.ndarray
    matrix: np.ndarray
    shift: np.ndarray
    field_origin: np.ndarray
    field_step: float
    field: np.ndarray  # (3, a, b, c) displacement in mm

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        """pts: (N, 3) subject mm -> (N, 3) MNI mm."""
        fi = ((pts - self.field_origin) / self.field_step).T
        disp = np.stack([ndimage.map_coordinates(f, fi, order=1, mode="nearest") for f in self.field], 1)
        return (pts - self.center) @ self.matrix.T + self.center + self.shift + disp


def _random_warp(rng, center, extent, amplitude=2.0, step=4.0) -> Warp:
    ang = np.deg2rad(rng.normal(0, 3.0, 3))
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    rot = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
           @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))
    matrix = rot @ np.diag(1.0 + rng.normal(0, 0.04, 3))
    shift = rng.normal(0, 2.0, 3)
    n = np.ceil(np.asarray(extent) / step).astype(int) + 5
    coarse = rng.normal(0, 1, (3, *np.maximum(2, n // 5 + 2)))
    fieldv = np.stack([ndimage.zoom(c, np.array(n) / np.array(c.shape), order=3) for c in coarse])
    fieldv *= amplitude / max(fieldv.std(), 1e-6)
    origin = np.asarray(center) - np.asarray(extent) / 2 - 2 * step
    return Warp(np.asarray(center, float), matrix, shift, origin, step, fieldv.astype(np.float32))


@dataclass
class PhantomSubject:
    """One generated subject on its acquisition grid (nibabel x, y, z order)."""

    image: np.ndarray  # float32, stored x1000 as int16
    mask: np.ndarray  # uint8 ground truth
    labels: np.ndarray  # int16, aseg numbering
    affine: np.ndarray
    pvs_fraction: np.ndarray  # float32 tube coverage per voxel (partial volume)
    lacunes: np.ndarray  # bool, distractor blobs
    covariates: dict = field(default_factory=dict)


def _grid(shape, spacing, center):
    spacing = np.asarray(spacing, float)
    origin = np.asarray(center, float) - (np.asarray(shape) - 1) / 2 * spacing
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return origin, spacing, affine


def _anatomy(warp, shape, origin, spacing):
    """Tissue fractions (sub-slice averaged), label map and MNI coordinates of voxel centres."""
    t = _templates()
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1).T
    centers = origin + idx * spacing
    n_sub = max(1, int(round(spacing[2] / 1.0)))
    gm = wm = brain = 0.0
    mni_c = None
    for k in range(n_sub):
        off = ((k + 0.5) / n_sub - 0.5) * spacing[2]
        pts = centers + np.array([0.0, 0.0, off], np.float32)
        mni = warp(pts)
        vox = (mni @ t["inv_affine"][:3, :3].T + t["inv_affine"][:3, 3]).T
        gm = gm + _sample(t["gm"], vox) / n_sub
        wm = wm + _sample(t["wm"], vox) / n_sub
        brain = brain + _sample(t["brain"], vox) / n_sub
        if n_sub == 1:
            mni_c = mni
    if mni_c is None:
        mni_c = warp(centers)
    gm, wm, brain = (np.clip(a, 0, 1).reshape(shape).astype(np.float32) for a in (gm, wm, brain))
    tissue = np.clip(gm + wm, 1e-6, None)
    scale = np.where(tissue > brain, brain / tissue, 1.0)
    gm, wm = gm * scale, wm * scale
    csf = np.clip(brain - gm - wm, 0, 1)

    mx, my, mz = (mni_c[:, i].reshape(shape) for i in range(3))
    right = mx >= 0
    labels = np.zeros(shape, np.int16)
    inside = brain >= 0.5
    stack = np.stack([csf, gm, wm])
    kind = np.argmax(stack, 0)
    vent_box = (np.abs(mx) < 30) & (my > -45) & (my < 30) & (mz > -5) & (mz < 32)
    side = lambda pair: np.where(right, pair[1], pair[0]).astype(np.int16)  # noqa: E731
    labels[inside & (kind == 1)] = side(ASEG["cortex"])[inside & (kind == 1)]
    labels[inside & (kind == 2)] = side(ASEG["wm"])[inside & (kind == 2)]
    is_csf = inside & (kind == 0)
    labels[is_csf] = ASEG_CSF
    vent = is_csf & vent_box
    labels[vent] = side(ASEG["lat_vent"])[vent]
    nuclei_weight = np.zeros(shape, np.float32)
    for name, c, a in NUCLEI:
        r2 = ((np.abs(mx) - c[0]) / a[0]) ** 2 + ((my - c[1]) / a[1]) ** 2 + ((mz - c[2]) / a[2]) ** 2
        inn = (r2 < 1.0) & inside & ~vent
        labels[inn] = side(ASEG[name])[inn]
        nuclei_weight = np.maximum(nuclei_weight, np.clip((1.0 - r2) * 4.0, 0, 1) * (brain >= 0.5))
    return {"gm": gm, "wm": wm, "csf": csf, "brain": brain, "labels": labels, "nuclei": nuclei_weight}


def _seg_dist(p, a, b):
    """Distances (N, M) from points p (N,3) to segments a->b (M,3)."""
    ab = b - a
    denom = np.maximum((ab * ab).sum(1), 1e-9)
    ap = p[:, None, :] - a[None]
    t = np.clip((ap * ab[None]).sum(2) / denom, 0, 1)
    closest = a[None] + t[..., None] * ab[None]
    return np.sqrt(((p[:, None, :] - closest) ** 2).sum(2))


def _subsample_offsets(spacing):
    n = [3 if s <= 1.0 else 5 for s in spacing]
    axes = [((np.arange(k) + 0.5) / k - 0.5) * s for k, s in zip(n, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def _rasterize(dist_fn, lo, hi, reach, shape, origin, spacing, offsets):
    """Coverage fraction and centre-inside flag of the voxels in a world box, via ``dist_fn(points) <= 0``."""
    i0 = np.maximum(np.floor((lo - reach - origin) / spacing).astype(int), 0)
    i1 = np.minimum(np.ceil((hi + reach - origin) / spacing).astype(int) + 1, np.array(shape))
    if np.any(i1 <= i0):
        return None
    idx = np.indices(i1 - i0).reshape(3, -1).T + i0
    centers = origin + idx * spacing
    d = dist_fn(centers)
    half_diag = 0.5 * float(np.linalg.norm(spacing))
    near = d <= half_diag
    if not near.any():
        return None
    idx, centers, d = idx[near], centers[near], d[near]
    sub = (centers[:, None, :] + offsets[None]).reshape(-1, 3)
    frac = (dist_fn(sub) <= 0).reshape(len(centers), -1).mean(1)
    return idx, frac.astype(np.float32), d <= 0


def _grow_tube(rng, seed_pt, direction, length, allowed, labels, origin, spacing, bend, forbid):
    """Polyline from a seed, grown both ways in 1 mm steps while inside ``allowed`` labels."""
    shape = np.array(labels.shape)

    def ok(p):
        i = np.round((p - origin) / spacing).astype(int)
        if np.any(i < 0) or np.any(i >= shape):
            return False
        if forbid is not None and forbid(p):
            return False
        return labels[tuple(i)] in allowed

    if not ok(seed_pt):
        return None
    halves = []
    for sign in (1.0, -1.0):
        pts, p, d = [], seed_pt.copy(), sign * direction
        for _ in range(int(length / 2)):
            d = d + bend(p, d) + rng.normal(0, 0.08, 3)
            d /= np.linalg.norm(d)
            q = p + d
            if not ok(q):
                break
            pts.append(q)
            p = q
        halves.append(pts)
    poly = [*reversed(halves[1]), seed_pt, *halves[0]]
    return np.array(poly) if len(poly) >= 3 else None


def generate_subject(contrast: str = "T2w", size: str = "tiny", seed: int = 0, index: int = 0,
                     labelled: bool = True) -> PhantomSubject:
    """Generate one subject deterministically from (seed, contrast, index)."""
    if contrast not in SPACING:
        raise UserError(f"contrast {contrast!r}: choose one of {', '.join(SPACING)}")
    if size not in SIZES:
        raise UserError(f"size {size!r}: choose one of {', '.join(SIZES)}")
    sz = SIZES[size]
    rng = np.random.default_rng([int(seed), 0 if contrast == "T2w" else 1, int(index)])
    shape = sz.t2w_shape if contrast == "T2w" else sz.t1w_shape
    origin, spacing, affine = _grid(shape, SPACING[contrast], sz.center)
    extent = np.asarray(shape) * spacing
    warp = _random_warp(rng, sz.center, extent)
    an = _anatomy(warp, shape, origin, spacing)
    labels = an["labels"]
    t = _templates()

    lo_age, hi_age = AGE_RANGE[contrast]
    age = int(rng.integers(lo_age, hi_age + 1))
    sex = "F" if rng.random() < 0.5 else "M"
    # PVS load: log-normal per subject, rising with age (Boutinaud Fig. 10: wide spread of counts).
    load = float(np.exp(rng.normal(0.0, 0.45)) * (1.0 + 0.025 * (age - lo_age)))
    voxel_cm3 = float(np.prod(spacing)) / 1000.0
    offsets = _subsample_offsets(spacing)
    fraction = np.zeros(shape, np.float32)
    core = np.zeros(shape, bool)

    # lacune-like distractors first, so tubes can keep away from them
    lacune_frac = np.zeros(shape, np.float32)
    lacunes: list[tuple[np.ndarray, np.ndarray]] = []
    deep = np.argwhere(np.isin(labels, WM_LABELS + LENTICULAR_LABELS) & (an["csf"] < 0.2))
    n_lac = 1 + int(rng.poisson(0.5 + 0.02 * (age - lo_age)))
    for _ in range(n_lac if len(deep) else 0):
        c = origin + deep[rng.integers(len(deep))] * spacing + rng.uniform(-0.5, 0.5, 3) * spacing
        a = rng.uniform(1.5, 4.0, 3)
        fn = lambda p, c=c, a=a: np.sqrt((((p - c) / a) ** 2).sum(-1)) * a.min() - a.min()  # noqa: E731
        r = _rasterize(fn, c - a, c + a, 0.0, shape, origin, spacing, offsets)
        if r is None:
            continue
        idx, frac, _ = r
        sl = tuple(idx.T)
        lacune_frac[sl] = np.maximum(lacune_frac[sl], frac)
        lacunes.append((c, a))

    def near_lacune(p, margin=2.5):
        return any(np.sqrt((((p - c) / (a + margin)) ** 2).sum()) < 1.0 for c, a in lacunes)

    inward = lambda p: _inward(t, warp, p)  # noqa: E731
    wm_seeds = np.argwhere(np.isin(labels, WM_LABELS) & (an["wm"] > 0.8))
    bg_seeds = np.argwhere(np.isin(labels, LENTICULAR_LABELS))
    counts = {"wm": 0, "bg": 0}
    plans = [("wm", wm_seeds, int(rng.poisson(load * 0.6 * len(wm_seeds) * voxel_cm3))),
             ("bg", bg_seeds, int(rng.poisson(load * 2.0 * len(bg_seeds) * voxel_cm3)))]
    if labelled and sum(n for _, s, n in plans if len(s)) == 0:
        plans = [(k, s, max(n, 1) if len(s) else 0) for k, s, n in plans]
    points_so_far: list[np.ndarray] = []
    for kind, seeds, n in plans:
        tries = 0
        while counts[kind] < n and len(seeds) and tries < 20 * n + 20:
            tries += 1
            p0 = origin + seeds[rng.integers(len(seeds))] * spacing + rng.uniform(-0.5, 0.5, 3) * spacing
            if near_lacune(p0) or any(np.min(np.linalg.norm(q - p0, axis=1)) < 3.0 for q in points_so_far):
                continue
            radius = 0.5 + 1.0 * rng.beta(1.5, 3.0)
            if kind == "wm":
                d0 = inward(p0) + rng.normal(0, 0.25, 3)
                length = float(np.clip(rng.lognormal(np.log(12.0), 0.5), 5.0, 35.0))
                allowed = WM_LABELS
                bend = lambda p, d: 0.15 * _inward(t, warp, p) * np.sign(np.dot(_inward(t, warp, p), d))  # noqa: E731
            else:
                lateral = np.sign(warp(p0[None])[0, 0]) or 1.0
                theta = np.deg2rad(rng.uniform(5, 30))
                d0 = np.array([lateral * np.sin(theta), rng.normal(0, 0.1), np.cos(theta)])
                length = float(np.clip(rng.lognormal(np.log(8.0), 0.4), 4.0, 20.0))
                allowed = BG_LABELS + WM_LABELS
                # lenticulostriate arteries curve laterally as they ascend
                bend = lambda p, d, s=lateral: np.array([0.03 * s * np.sign(d[2] or 1.0), 0.0, 0.0])  # noqa: E731
            d0 = d0 / max(np.linalg.norm(d0), 1e-9)
            poly = _grow_tube(rng, p0, d0, length, allowed, labels, origin, spacing, bend,
                              lambda p: near_lacune(p, 1.5 + radius))
            if poly is None:
                continue
            a, b = poly[:-1], poly[1:]
            fn = lambda p, a=a, b=b, r=radius: _seg_dist(p, a, b).min(1) - r  # noqa: E731
            ras = _rasterize(fn, poly.min(0) - radius, poly.max(0) + radius, 0.0, shape, origin, spacing, offsets)
            if ras is None:
                continue
            idx, frac, inside = ras
            keep = (frac >= 0.35) | inside
            sl = tuple(idx.T)
            allowed_vox = (an["brain"][sl] >= 0.5) & ~np.isin(labels[sl], CSF_LABELS) & (lacune_frac[sl] == 0)
            if not (keep & allowed_vox).any():
                continue
            fraction[sl] = np.maximum(fraction[sl], frac)
            core[sl] |= keep & allowed_vox
            points_so_far.append(poly)
            counts[kind] += 1

    mask = core & (an["brain"] >= 0.5) & ~np.isin(labels, CSF_LABELS) & (lacune_frac == 0)
    image = _contrast(rng, contrast, an, fraction, lacune_frac, shape, spacing)
    return PhantomSubject(
        image=image, mask=mask.astype(np.uint8), labels=labels, affine=affine, pvs_fraction=fraction,
        lacunes=lacune_frac >= 0.5,
        covariates={"age": age, "sex": sex, "pvs_load_factor": round(load, 4), "pvs_count": sum(counts.values()),
                    "pvs_count_wm": counts["wm"], "pvs_count_bg": counts["bg"], "lacune_count": len(lacunes),
                    "site": f"phantom-{contrast}"})


def _inward(t, warp, p):
    """Unit vector into the brain at subject point p (perpendicular to the cortex at large scale)."""
    m = warp(np.asarray(p, float)[None])[0]
    v = (m @ t["inv_affine"][:3, :3].T + t["inv_affine"][:3, 3]) / 2.0
    g = np.array([ndimage.map_coordinates(t["grad"][i], v[:, None], order=1, mode="nearest")[0] for i in range(3)])
    g = np.linalg.solve(warp.matrix, g) if np.linalg.norm(g) > 0 else np.array([0.0, 0.0, 1.0])
    n = np.linalg.norm(g)
    return g / n if n > 1e-9 else np.array([0.0, 0.0, 1.0])


def _contrast(rng, contrast, an, pvs, lacune, shape, spacing):
    """Tissue mixture -> intensities, then bias field and Rician noise."""
    c = {k: v * (1.0 + rng.normal(0, 0.03)) for k, v in CONTRAST[contrast].items()}
    tissue = an["csf"] * c["csf"] + an["gm"] * c["gm"] + an["wm"] * c["wm"]
    deep = an["csf"] * c["csf"] + (an["brain"] - an["csf"]) * c["dgm"]
    img = (1 - an["nuclei"]) * tissue + an["nuclei"] * deep
    lac = np.clip(lacune, 0, 1)
    img = (1 - lac) * img + lac * c["lacune"] * an["brain"]
    pv = np.clip(pvs, 0, 1) * (lac == 0)
    img = (1 - pv) * img + pv * c["pvs"] * an["brain"]
    # bias field: smooth log-field of about +-10 %
    coarse = rng.normal(0, 1, (3, 3, 3))
    bias = ndimage.zoom(coarse, np.array(shape) / 3.0, order=3)[: shape[0], : shape[1], : shape[2]]
    bias = np.exp(0.1 * bias / max(bias.std(), 1e-6))
    img = img * bias
    sigma = NOISE_SIGMA * abs(CONTRAST[contrast]["csf"] - CONTRAST[contrast]["wm"]) / 0.62
    n1, n2 = rng.normal(0, sigma, (2, *shape))
    return np.sqrt((img + n1) ** 2 + n2 ** 2).astype(np.float32)


def _save(data, affine, path, dtype):
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def make_phantom_dataset(raw_dir, dataset_id: int = 900, name: str | None = None, contrast: str = "T2w",
                         n_subjects: int | None = None, size: str = "tiny", seed: int = 0, n_unlabeled: int = 0,
                         n_test: int = 0, force: bool = False, progress: bool = True, log=print) -> Path:
    """Generate the phantom and write it as ``raw_dir/Dataset<ID>_<name>`` through :func:`write_dataset`.

    Writes ``imagesTr``/``labelsTr`` (``n_subjects`` labelled cases ``pvs000``...), ``imagesTs`` +
    ``labelsTs`` (``n_test``), ``imagesUnlabeled/CASE_0000.nii.gz`` (``n_unlabeled``, for
    autoencoder pretraining), ``regions/CASE.nii.gz`` (aseg label maps, all cases) and
    ``covariates.csv`` (age, sex, PVS counts, ``pvs_voxels``). Returns the dataset folder.
    Re-running with the same parameters is a no-op; different parameters need ``force``.
    """
    from nnunet_pvs.dataset_conversion.convert import dataset_folder_name, existing_datasets, write_dataset
    from nnunet_pvs.dataset_conversion.validation import Subject

    if size not in SIZES:
        raise UserError(f"size {size!r}: choose one of {', '.join(SIZES)}")
    if contrast not in SPACING:
        raise UserError(f"contrast {contrast!r}: choose one of {', '.join(SPACING)}")
    n_subjects = SIZES[size].n_subjects if n_subjects is None else int(n_subjects)
    if n_subjects < 1 or n_unlabeled < 0 or n_test < 0:
        raise UserError(f"subjects {n_subjects}, test {n_test}, unlabeled {n_unlabeled}: need >= 1 labelled, >= 0 others")
    name = name or f"PVSPhantom{contrast}"
    raw = Path(raw_dir)
    folder = raw / dataset_folder_name(dataset_id, name)
    params = {"generator_version": GENERATOR_VERSION, "contrast": contrast, "size": size, "seed": int(seed),
              "n_subjects": n_subjects, "n_test": int(n_test), "n_unlabeled": int(n_unlabeled)}
    if existing_datasets(raw, dataset_id) == [folder] and (folder / "conversion.json").is_file():
        try:
            old = json.loads((folder / "dataset.json").read_text())["nnunet_pvs"].get("phantom")
        except (OSError, ValueError, KeyError):
            old = None
        if old == params:
            log(f"{folder}: up to date (same phantom parameters), nothing written")
            return folder
    if existing_datasets(raw, dataset_id) and not force:
        raise UserError(f"{existing_datasets(raw, dataset_id)[0]}: a different dataset with id "
                        f"{int(dataset_id):03d} exists; pass --force to replace it")
    raw.mkdir(parents=True, exist_ok=True)
    plan = ([("train", i) for i in range(n_subjects)] + [("test", n_subjects + i) for i in range(n_test)]
            + [("unlabeled", n_subjects + n_test + i) for i in range(n_unlabeled)])
    it = plan
    if progress:
        from tqdm import tqdm
        it = tqdm(plan, desc=f"phantom {contrast} {size}", unit="subject")
    with tempfile.TemporaryDirectory(prefix=".phantom-", dir=raw) as stage:
        stage = Path(stage)
        subjects = []
        for split, i in it:
            sid = f"pvs{i:03d}"
            s = generate_subject(contrast, size, seed, i, labelled=split != "unlabeled")
            _save(s.image * 1000.0, s.affine, stage / f"{sid}_{contrast}.nii.gz", np.int16)
            _save(s.labels, s.affine, stage / f"{sid}_regions.nii.gz", np.int16)
            mask = None
            if split != "unlabeled":
                mask = stage / f"{sid}_mask.nii.gz"
                _save(s.mask, s.affine, mask, np.uint8)
            subjects.append(Subject(id=sid, images={contrast: stage / f"{sid}_{contrast}.nii.gz"}, mask=mask,
                                    regions=stage / f"{sid}_regions.nii.gz", split=split, covariates=s.covariates))
        out, _ = write_dataset(subjects, raw, dataset_id, name, [contrast], force=True, progress=progress,
                               description=f"Synthetic PVS phantom ({contrast}-like, size {size}, seed {seed}) "
                                           "built on the MNI152 template; see docs/data.md",
                               extra_json={"phantom": params}, log=log)
    return out
