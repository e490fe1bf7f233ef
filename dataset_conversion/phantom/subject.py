"""One phantom subject: anatomy, PVS, mimics, image, and the labels a rater would draw.

Labels, from the rendered PVS:

* **truth** (noise-free): voxels at least 35 % covered by a PVS (or whose centre lies inside one)
  whose signal-weighted coverage reaches 0.35 (visible contrast), of tubes that reach 0.5 somewhere
  (a rater marks a PVS only if it stands out somewhere); PVS in fluid (ventricles, lacunes) are not
  PVS voxels;
* **rater** (the training label): the truth with annotation noise as raters make it: about 15 % of
  the faintest PVS missed, and borders off by one voxel here and there (in-plane).

All randomness comes from ``numpy.random.default_rng([seed, contrast, index])``. With
``keep_scene`` the subject also carries its :class:`Scene` (every rendered tube and the image layers
around them), from which :mod:`~nnunet_pvs.dataset_conversion.phantom.visits` renders later visits;
keeping it draws nothing, so the subject is the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cc3d
import numpy as np
from scipy import ndimage

from nnunet_pvs.dataset_conversion.phantom import imaging, mimics
from nnunet_pvs.dataset_conversion.phantom.anatomy import (AGE_RANGE, BG_LABELS, CSF_LABELS, LENTICULAR_LABELS,
                                                           SIZES, SPACING, WM_LABELS, anatomy, grid, random_warp)
from nnunet_pvs.dataset_conversion.phantom.pvs import DENSITY, make_tube, subject_load
from nnunet_pvs.dataset_conversion.phantom.rendering import render_tube, subsample_offsets
from nnunet_pvs.errors import UserError

VOXEL_COVER = 0.35       # coverage for a voxel to be a PVS voxel
VOXEL_VISIBLE = 0.35     # signal-weighted coverage for a PVS voxel to be visible
TUBE_VISIBLE = 0.5       # a tube is marked only if it is this visible somewhere
MISS_FAINT = 0.15        # fraction of labelled PVS a rater misses, taken from the faintest
BORDER_NOISE = 0.10      # fraction of the in-plane border ring flipped by the rater


@dataclass
class PhantomSubject:
    """One generated subject on its acquisition grid (nibabel x, y, z order)."""

    image: np.ndarray          # float32 (stored x1000 as int16)
    mask: np.ndarray           # uint8 rater label (training label)
    truth: np.ndarray          # uint8 noise-free label
    labels: np.ndarray         # int16 region map, aseg numbering
    affine: np.ndarray
    pvs_fraction: np.ndarray   # float32 signal-weighted PVS coverage per voxel (partial volume)
    lacunes: np.ndarray        # bool lacune cores and rims
    mimics: dict = field(default_factory=dict)       # name -> float32 coverage (WMH, sulci, vessels)
    covariates: dict = field(default_factory=dict)
    scene: Scene | None = None  # only with generate_subject(..., keep_scene=True)


@dataclass
class Scene:
    """What a later visit of the same subject re-renders: the tubes (in drawing order, with their truth
    id, 0 for tubes too faint to be labelled) and the image layers below and above the PVS layer."""

    contrast: str
    seed: int
    index: int
    an: dict                   # anatomy (labels, inward normals, grid)
    warp: object               # subject mm -> MNI mm
    offsets: np.ndarray        # sub-voxel points of the partial-volume rendering
    seeds: dict                # "wm"/"bg" -> voxel indices where PVS of that family start
    lacunes: list              # [(centre, semi-axes)]: PVS keep out of them
    tubes: list                # [(Tube, truth id or 0)]
    truth_ids: np.ndarray      # int32, the truth id of each voxel (0 none)
    tissue_ok: np.ndarray      # bool, where a PVS may show (not fluid, lacune, sulcus, vessel)
    below_pvs: np.ndarray      # float32 noise-free image before the PVS layer (tissue, WMH, sulci)
    above_pvs: list            # [(coverage, intensity)] mixed after the PVS layer (vessels, lacunes)
    intensities: dict          # compartment intensities of this subject
    sigma: float               # noise level of the baseline scan


def near_any(p, ellipsoids, margin: float = 1.5) -> bool:
    """Whether point p lies within ``margin`` mm of one of the (centre, semi-axes) ellipsoids (lacunes)."""
    return any(np.sqrt((((p - c) / (a + margin)) ** 2).sum()) < 1.0 for c, a in ellipsoids)


def _cluster_counts(mask: np.ndarray, labels: np.ndarray) -> dict:
    from nnunet_pvs.cluster_regions import majority_regions

    lab, n = cc3d.connected_components(np.ascontiguousarray(mask, np.uint8), connectivity=26, return_N=True)
    regions = majority_regions(lab, int(n), {"bg": np.isin(labels, BG_LABELS), "wm": np.isin(labels, WM_LABELS)})
    return {"pvs_count": int(n), "pvs_count_bg": int((regions[1:] == "bg").sum()),
            "pvs_count_wm": int((regions[1:] == "wm").sum())}


def annotate(rng, truth_ids: np.ndarray, visibility: dict, allowed: np.ndarray) -> np.ndarray:
    """Rater label from the per-tube truth: drop ~15 % of PVS (the faintest), jitter borders in-plane."""
    ids = sorted(visibility, key=lambda k: visibility[k])
    n_miss = int(round(MISS_FAINT * len(ids)))
    faint = ids[: max(n_miss * 2, 0)]
    missed = set(rng.choice(faint, size=min(n_miss, len(faint)), replace=False).tolist()) if n_miss else set()
    mask = (truth_ids > 0) & ~np.isin(truth_ids, list(missed))
    if not mask.any():
        return mask
    cross = ndimage.generate_binary_structure(2, 1)[:, :, None]
    ring = ndimage.binary_dilation(mask, cross) & ~mask & allowed
    edge = mask & ~ndimage.binary_erosion(mask, cross)
    add = ring & (rng.random(mask.shape) < BORDER_NOISE)
    # remove a border voxel only where it keeps its cluster non-empty: never the voxel of a 1-voxel PVS
    neighbours = ndimage.convolve(mask.astype(np.uint8), np.ones((3, 3, 3), np.uint8), mode="constant") - 1
    drop = edge & (neighbours >= 2) & (rng.random(mask.shape) < BORDER_NOISE)
    return (mask | add) & ~drop


def generate_subject(contrast: str = "T2w", size: str = "tiny", seed: int = 0, index: int = 0,
                     labelled: bool = True, keep_scene: bool = False) -> PhantomSubject:
    """Generate one subject deterministically from (seed, contrast, index); ``keep_scene`` also returns
    its :class:`Scene` (for follow-up visits)."""
    if contrast not in SPACING:
        raise UserError(f"contrast {contrast!r}: choose one of {', '.join(SPACING)}")
    if size not in SIZES:
        raise UserError(f"size {size!r}: choose one of {', '.join(SIZES)}")
    sz = SIZES[size]
    rng = np.random.default_rng([int(seed), 0 if contrast == "T2w" else 1, int(index)])
    shape = sz.t2w_shape if contrast == "T2w" else sz.t1w_shape
    origin, spacing, affine = grid(shape, SPACING[contrast], sz.center)
    warp = random_warp(rng, sz.center, np.asarray(shape) * spacing)
    an = anatomy(warp, shape, origin, spacing)
    labels = an["labels"]
    offsets = subsample_offsets(spacing)
    voxel_cm3 = float(np.prod(spacing)) / 1000.0

    youngest, oldest = AGE_RANGE[contrast]
    age = int(rng.integers(youngest, oldest + 1))
    sex = "F" if rng.random() < 0.5 else "M"
    load = subject_load(rng, age, youngest)

    # mimics first: PVS keep out of lacunes
    lac_core, lac_rim, lac_list = mimics.lacunes(rng, contrast, age, youngest, an, origin, spacing, offsets)
    wmh_cm3 = mimics.wmh_volume_cm3(rng, contrast, age)
    wmh = mimics.wmh_fraction(rng, wmh_cm3, an, spacing)

    def near_lacune(p):
        return near_any(p, lac_list)

    sulci = mimics.sulcal_fingers(rng, an, origin, spacing, offsets)
    vessel = mimics.vessels(rng, an, origin, spacing, offsets, near_lacune)

    # PVS
    tissue_ok = ((an["brain"] >= 0.5) & ~np.isin(labels, CSF_LABELS) & (lac_core + lac_rim == 0)
                 & (sulci < 0.5) & (vessel < 0.5))
    pvs_w = np.zeros(shape, np.float32)
    truth_ids = np.zeros(shape, np.int32)
    visibility: dict[int, float] = {}
    tubes: list = []
    lower_bg = np.isin(labels, LENTICULAR_LABELS) & (an["mni_z"] < np.median(an["mni_z"][np.isin(labels, LENTICULAR_LABELS)])
                                                     if np.isin(labels, LENTICULAR_LABELS).any() else False)
    seeds = {"wm": np.argwhere(np.isin(labels, WM_LABELS) & (an["wm"] > 0.7)), "bg": np.argwhere(lower_bg)}
    n_target = {k: int(rng.poisson(load * DENSITY[contrast][k] * len(v) * voxel_cm3)) for k, v in seeds.items()}
    rendered = {"wm": 0, "bg": 0}
    for kind in ("bg", "wm"):
        tries = 0
        while (rendered[kind] < n_target[kind] or (labelled and not visibility and kind == "wm")) \
                and len(seeds[kind]) and tries < 10 * n_target[kind] + 30:
            tries += 1
            p0 = origin + seeds[kind][rng.integers(len(seeds[kind]))] * spacing + rng.uniform(-0.5, 0.5, 3) * spacing
            if near_lacune(p0):
                continue
            tube = make_tube(rng, kind, p0, an, origin, spacing, warp, near_lacune)
            if tube is None:
                continue
            res = render_tube(tube.poly, tube.radius_at, tube.signal_at, shape, origin, spacing, offsets)
            if res is None:
                continue
            idx, cover, weighted, centre_in = res
            sl = tuple(idx.T)
            pvs_w[sl] = np.maximum(pvs_w[sl], weighted * tissue_ok[sl])
            rendered[kind] += 1
            voxel = ((cover >= VOXEL_COVER) | centre_in) & (weighted >= VOXEL_VISIBLE) & tissue_ok[sl]
            tid = 0
            if voxel.any() and weighted.max() >= TUBE_VISIBLE:
                tid = len(visibility) + 1
                truth_ids[sl] = np.where(voxel & (truth_ids[sl] == 0), tid, truth_ids[sl])
                visibility[tid] = float(weighted[voxel].mean())
            tubes.append((tube, tid))

    truth = truth_ids > 0
    mask = annotate(rng, truth_ids, visibility, tissue_ok & (an["brain"] >= 0.5)) if visibility else truth

    # image
    img, c = imaging.tissue_image(rng, contrast, an, spacing)
    brain = an["brain"]
    img = imaging.mix(img, wmh, c["wmh"], brain)
    img = imaging.mix(img, sulci * (1 - lac_core), c["csf"], brain)
    below_pvs = img
    img = imaging.mix(img, pvs_w, c["pvs"], brain)
    img = imaging.mix(img, vessel, c["void"], brain)
    img = imaging.mix(img, lac_rim, c["rim"], brain)
    img = imaging.mix(img, lac_core, c["csf"], brain)
    cnr = float(rng.uniform(*imaging.CNR_RANGE[contrast]))
    w_median = float(np.median(pvs_w[truth])) if truth.any() else 0.6
    sigma = abs(c["pvs"] - c["wm"]) * w_median / cnr
    image, bias_amp = imaging.bias_and_noise(rng, img, sigma, spacing)

    covariates = {"age": age, "sex": sex, "pvs_load_factor": round(load, 4), **_cluster_counts(mask, labels),
                  "pvs_rendered": int(sum(rendered.values())), "lacune_count": len(lac_list),
                  "wmh_cm3": round(float((wmh * (brain >= 0.5)).sum() * voxel_cm3), 3),
                  "cnr_target": round(cnr, 3), "noise_sigma": round(sigma, 5), "bias_amplitude": round(bias_amp, 3),
                  "site": f"phantom-{contrast}"}
    scene = None
    if keep_scene:
        scene = Scene(contrast=contrast, seed=int(seed), index=int(index), an=an, warp=warp, offsets=offsets,
                      seeds=seeds, lacunes=lac_list, tubes=tubes, truth_ids=truth_ids, tissue_ok=tissue_ok,
                      below_pvs=below_pvs.astype(np.float32, copy=False),
                      above_pvs=[(vessel, c["void"]), (lac_rim, c["rim"]), (lac_core, c["csf"])],
                      intensities=c, sigma=sigma)
    return PhantomSubject(image=image, mask=mask.astype(np.uint8), truth=truth.astype(np.uint8), labels=labels,
                          affine=affine, pvs_fraction=pvs_w, lacunes=(lac_core + lac_rim) >= 0.5,
                          mimics={"wmh": wmh, "sulci": sulci, "vessels": vessel}, covariates=covariates,
                          scene=scene)
