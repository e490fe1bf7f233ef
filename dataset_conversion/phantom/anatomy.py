"""Anatomy of the phantom: nilearn's bundled MNI152 template, warped per subject, on the acquisition grid.

The 1 mm MNI152 GM/WM/brain maps are warped by a random smooth deformation (small rotation and
scaling, a few mm of smooth displacement) and sampled on the acquisition grid, averaging sub-slices
across thick slices (partial volume). Deep grey nuclei, absent from the tissue maps, are ellipsoids
at their MNI positions. The region label map uses FreeSurfer aseg numbering, as ``regions`` and
``evaluate`` expect.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nnunet_pvs import aseg

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

AGE_RANGE = {"T2w": (42, 79), "T1w": (18, 35)}  # Cai: PD patients 42-79 y; Boutinaud: MRi-Share 18-35 y

# aseg numbering (left, right), from the project's one vocabulary
ASEG = {"wm": aseg.CEREBRAL_WHITE_MATTER, "lat_vent": aseg.LATERAL_VENTRICLES,
        **{k: aseg.STRUCTURES[k] for k in ("cortex", "thalamus", "caudate", "putamen", "pallidum", "accumbens")}}
ASEG_CSF = aseg.CSF
CSF_LABELS = aseg.CSF_ALL
WM_LABELS = aseg.CEREBRAL_WHITE_MATTER
LENTICULAR_LABELS = aseg.LENTICULAR
BG_LABELS = aseg.BASAL_GANGLIA
# Deep grey nuclei as ellipsoids: centre (|x|, y, z) and semi-axes in MNI mm; later ones win.
NUCLEI = [("thalamus", (11, -18, 6), (7, 12, 8)), ("caudate", (13, 11, 10), (4.5, 11, 9)),
          ("putamen", (25, 3, 1), (5.5, 14, 9)), ("pallidum", (19, -3, -1), (3.5, 7, 5)),
          ("accumbens", (9, 11, -8), (4, 4, 4))]


@functools.lru_cache(maxsize=1)
def templates():
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


def sample(vol, vox, order=1):
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


def random_warp(rng, center, extent, amplitude=2.0, step=4.0) -> Warp:
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


def grid(shape, spacing, center):
    spacing = np.asarray(spacing, float)
    origin = np.asarray(center, float) - (np.asarray(shape) - 1) / 2 * spacing
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return origin, spacing, affine


def anatomy(warp, shape, origin, spacing):
    """Tissue fractions (sub-slice averaged), label map and MNI coordinates of voxel centres."""
    t = templates()
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
        gm = gm + sample(t["gm"], vox) / n_sub
        wm = wm + sample(t["wm"], vox) / n_sub
        brain = brain + sample(t["brain"], vox) / n_sub
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
    # inward normal field (unit vectors into the brain, subject space), for PVS, sulci and vessel courses
    v = (mni_c @ t["inv_affine"][:3, :3].T + t["inv_affine"][:3, 3]).T / 2.0
    g = np.stack([ndimage.map_coordinates(t["grad"][i], v, order=1, mode="nearest") for i in range(3)], 1)
    g = g @ np.linalg.inv(warp.matrix).T
    g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-9)
    return {"gm": gm, "wm": wm, "csf": csf, "brain": brain, "labels": labels, "nuclei": nuclei_weight,
            "mni_z": mz.astype(np.float32), "inward": g.reshape(*shape, 3).astype(np.float32),
            "origin": np.asarray(origin, float), "spacing": np.asarray(spacing, float)}


def inward(an: dict, p) -> np.ndarray:
    """Unit vector into the brain at subject point p (perpendicular to the cortex at large scale)."""
    shape = np.array(an["labels"].shape)
    i = np.clip(np.round((np.asarray(p, float) - an["origin"]) / an["spacing"]).astype(int), 0, shape - 1)
    g = an["inward"][tuple(i)].astype(float)
    return g if np.linalg.norm(g) > 0.5 else np.array([0.0, 0.0, 1.0])
