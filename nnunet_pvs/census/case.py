"""The census of one subject: read and check its files, find the clusters, measure them, count them
per region and on the visual-rating slices, and draw its overlay (in a worker process)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from nnunet_pvs.census.inputs import Case
from nnunet_pvs.census.shape import cluster_stats, voxel_volume
from nnunet_pvs.dataset_conversion.regions import region_masks as aseg_region_masks
from nnunet_pvs.dataset_conversion.regions import superior_axis
from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation import io
from nnunet_pvs.cluster_regions import OUTSIDE, majority_regions
from nnunet_pvs.evaluation.clusters import label, sizes
from nnunet_pvs.evaluation.regions import load_regions, masks_from_label_map

WHOLE = "whole"
SLICE_REGIONS = ("bgslice", "csoslice")

CLUSTER_COLUMNS = [
    "case", "cluster", "region", "n_voxels", "volume_mm3", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
    "centroid_i", "centroid_j", "centroid_k", "length_mm", "path_length_mm", "width_mm",
    "orientation_x", "orientation_y", "orientation_z", "elevation_deg", "max_prob", "mean_prob",
]


@dataclass(frozen=True)
class Options:
    """How every subject is censused."""

    threshold: float = 0.5                                 # probability maps: p >= threshold
    min_size_mm3: float = 0.0                              # clusters below this volume are dropped
    connectivity: int = 26
    size_classes: tuple[float, ...] = (5.0, 10.0, 50.0)    # mm^3 edges of the size classes
    binary: bool = False                                   # use NIfTI masks even where .npz exist
    geometry_tol: float = 1e-3
    plots: bool = True
    mosaic_slices: int = 12
    label_maps: bool = False


@dataclass
class SliceMask:
    name: str
    mask: np.ndarray
    index: int | None  # voxel index along the superior axis, when the mask is one slice
    axis: int | None


@dataclass
class Loaded:
    """A subject's checked inputs, all on the prediction's grid."""

    pred: np.ndarray               # bool mask or float32 probabilities, (x, y, z)
    pred_path: Path
    affine: np.ndarray
    spacing: tuple
    image: np.ndarray | None
    regions: dict[str, np.ndarray] = field(default_factory=dict)  # in assignment (tie-break) order
    brain: np.ndarray | None = None
    slices: list[SliceMask] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    region_paths: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "binary" if self.pred.dtype == bool else "probabilities"


def size_class_columns(edges) -> list[str]:
    """Column names of the size classes: [0, e1), [e1, e2), ..., [ek, inf) in mm^3."""
    e = [f"{v:g}" for v in edges]
    if not e:
        return ["n_all_sizes"]
    return [f"n_lt_{e[0]}mm3"] + [f"n_{a}_{b}mm3" for a, b in zip(e, e[1:])] + [f"n_ge_{e[-1]}mm3"]


def subject_columns(edges) -> list[str]:
    return ["case", "region", "n_clusters", "volume_mm3", "volume_in_region_mm3", "region_volume_mm3",
            "volume_fraction", *size_class_columns(edges), "mean_length_mm", "median_length_mm",
            "mean_width_mm", "median_width_mm", "slice_index", *RELIABILITY_COLUMNS]


# per-subject reliability of a probability map (nnunet_pvs.reliability, docs/reliability_signal.md): the same
# value on every row of a subject; NaN for binary masks or where nothing is predicted
RELIABILITY_COLUMNS = ["mean_core_probability", "uncertain_share"]


def _read_prediction(c: Case, opts: Options) -> tuple[io.Volume, Path]:
    files = c.pred
    if files.npz is None and files.seg is None:  # a scan whose prediction part has not written it
        raise UserError(f"{c.case}: no prediction ({c.case}.nii.gz or {c.case}.npz + .pkl) was written for "
                        f"the scan {c.image}")
    if files.npz is not None and (not opts.binary or files.seg is None):
        return io.read_probabilities(files.npz, c.case), files.npz   # geometry from its .pkl
    vol = io.read_nifti(files.seg, c.case, "prediction")
    try:
        vol.data = io.as_binary(vol.data, c.case, "prediction", files.seg)
    except UserError as e:
        raise UserError(f"{e}; and there is no probability file {c.case}.npz (+ .pkl) beside it "
                        "(nnUNetv2_predict --save_probabilities writes them)") from None
    return vol, files.seg


def _slice_index(mask: np.ndarray, affine: np.ndarray) -> tuple[int | None, int | None]:
    try:
        axis, _ = superior_axis(affine)
    except ValueError:
        return None, None
    present = np.flatnonzero(mask.any(axis=tuple(i for i in range(3) if i != axis)))
    return (int(present[0]) if len(present) == 1 else None), axis


def _regions_of(c: Case, region_dir: Path) -> list[tuple[str, np.ndarray, io.Volume, Path]]:
    """``load_regions`` for the region files gather_cases already found (one listing for the cohort)."""
    out = []
    for name, path in c.region_files:
        vol = io.read_nifti(path, c.case, "region map")
        if name is None:
            out += [(rname, m, vol, path) for rname, m in masks_from_label_map(vol.data).items()]
        else:
            out.append((name, io.as_binary(vol.data, c.case, "region mask", path), vol, path))
    names = [n for n, *_ in out]
    if len(set(names)) != len(names) or WHOLE in names:
        raise UserError(f"{c.case}: region names {names} in {region_dir} repeat or use the reserved name 'whole'")
    return out


def load_case(c: Case, region_dir: Path | None, opts: Options) -> Loaded:
    """Read the prediction, image and region maps of one subject and check their geometry."""
    pred, pred_path = _read_prediction(c, opts)
    tol = opts.geometry_tol
    out = Loaded(pred.data, pred_path, np.asarray(pred.affine, float), pred.spacing, None)
    if c.image is not None:
        img = io.read_nifti(c.image, c.case, "image")
        io.check_geometry(c.case, pred, pred_path, img, c.image, tol)
        out.image = np.asarray(img.data, np.float32)
    if region_dir is None:
        return out
    loaded = (_regions_of(c, region_dir) if c.region_files
              else load_regions(region_dir, c.case, c.all_ids or None))
    brain = np.zeros(pred.data.shape, bool)
    seen: set[str] = set()
    label_map = None
    for name, mask, vol, path in loaded:
        if str(path) not in seen:
            io.check_geometry(c.case, pred, pred_path, vol, path, tol)
            seen.add(str(path))
            out.region_paths.append(str(path))
            brain |= vol.data != 0
        if io.case_id(path) == c.case and name in ("bg", "wm"):
            label_map = vol
        if name in SLICE_REGIONS:
            index, axis = _slice_index(mask, vol.affine)
            out.slices.append(SliceMask(name, mask, index, axis))
        else:
            out.regions[name] = mask
    if label_map is not None and not out.slices:
        res = aseg_region_masks(label_map.data, label_map.affine, slices=True)
        for name, index in (("bgslice", res.bg_slice), ("csoslice", res.cso_slice)):
            if name in res.masks:
                out.slices.append(SliceMask(name, res.masks[name], index, res.axis))
        out.notes += res.notes
    out.brain = brain
    return out


def _stats_of(sel: np.ndarray, st: dict, edges) -> dict:
    vol = st["volume_mm3"][sel]
    length, width = st["length_mm"][sel], st["width_mm"][sel]
    bins = np.concatenate(([-np.inf], np.asarray(edges, float), [np.inf]))
    classes = np.histogram(vol, bins=bins)[0] if len(edges) else [len(vol)]
    row = {"n_clusters": int(sel.sum()), "volume_mm3": float(vol.sum())}
    row.update({k: int(v) for k, v in zip(size_class_columns(edges), classes)})
    empty = not len(vol)
    row.update({"mean_length_mm": math.nan if empty else float(length.mean()),
                "median_length_mm": math.nan if empty else float(np.median(length)),
                "mean_width_mm": math.nan if empty else float(width.mean()),
                "median_width_mm": math.nan if empty else float(np.median(width))})
    return row


def census_arrays(case: str, ld: Loaded, opts: Options) -> dict:
    """Clusters, their statistics and the per-region rows of one loaded subject."""
    pred = ld.pred
    is_prob = pred.dtype != bool
    mask = pred >= opts.threshold if is_prob else pred
    labels, n0 = label(mask, opts.connectivity)
    vv = voxel_volume(ld.affine)
    keep = sizes(labels, n0) * vv >= opts.min_size_mm3 * (1 - 1e-9)
    keep[0] = False
    n = int(keep.sum())
    if n < n0:
        lut = np.zeros(n0 + 1, labels.dtype)
        lut[keep] = np.arange(1, n + 1, dtype=labels.dtype)
        labels = lut[labels]
    idx = np.flatnonzero(labels)
    lab = labels.ravel()[idx]
    st = cluster_stats(idx, lab, n, pred.shape, ld.affine, pred.ravel()[idx] if is_prob else None)
    if ld.regions:
        creg = majority_regions(labels, n, ld.regions)[1:]
    else:
        creg = np.full(n, WHOLE, dtype=object)
    cen, cvox, ax = st["centroid"], st["centroid_vox"], st["axis"]
    clusters = pd.DataFrame({
        "case": case, "cluster": np.arange(1, n + 1), "region": creg.astype(str) if n else np.array([], str),
        "n_voxels": st["n_voxels"], "volume_mm3": st["volume_mm3"],
        "centroid_x_mm": cen[:, 0], "centroid_y_mm": cen[:, 1], "centroid_z_mm": cen[:, 2],
        "centroid_i": cvox[:, 0], "centroid_j": cvox[:, 1], "centroid_k": cvox[:, 2],
        "length_mm": st["length_mm"], "path_length_mm": st["path_length_mm"], "width_mm": st["width_mm"],
        "orientation_x": ax[:, 0], "orientation_y": ax[:, 1], "orientation_z": ax[:, 2],
        "elevation_deg": st["elevation_deg"], "max_prob": st["max_prob"], "mean_prob": st["mean_prob"],
    }, columns=CLUSTER_COLUMNS)

    edges = opts.size_classes
    rows = []

    def add(region, sel, rmask, slice_index=None):
        in_region = (np.count_nonzero(rmask.ravel()[idx]) * vv) if rmask is not None else float(len(idx) * vv)
        rvol = float(np.count_nonzero(rmask) * vv) if rmask is not None else math.nan
        rows.append({"case": case, "region": region, **_stats_of(sel, st, edges),
                     "volume_in_region_mm3": float(in_region), "region_volume_mm3": rvol,
                     "volume_fraction": in_region / rvol if rvol > 0 else math.nan,
                     "slice_index": math.nan if slice_index is None else slice_index})

    add(WHOLE, np.ones(n, bool), ld.brain)
    if ld.regions:
        union = np.zeros(pred.shape, bool)
        for name, rmask in ld.regions.items():
            add(name, creg == name, rmask)
            union |= rmask
        add(OUTSIDE, creg == OUTSIDE, ld.brain & ~union if ld.brain is not None else ~union)
    for s in ld.slices:
        touched = np.zeros(n + 1, bool)
        touched[labels[s.mask]] = True
        add(s.name, touched[1:], s.mask, s.index)
    rel = dict.fromkeys(RELIABILITY_COLUMNS, math.nan)
    if ld.kind == "probabilities":
        from nnunet_pvs.reliability import reliability

        got = reliability(ld.pred, opts.threshold)
        rel = {k: float(got[k]) for k in RELIABILITY_COLUMNS}
    for row in rows:
        row.update(rel)
    subjects = pd.DataFrame(rows, columns=subject_columns(edges))
    return {"clusters": clusters, "subjects": subjects, "labels": labels, "regions": creg, "n": n}


OVERLAY, LABELS = "overlay.png", "labels.nii.gz"


def run_case(job) -> dict:
    """Census of one subject; its overlay PNG and label map go into ``folder`` (the subject's own
    staging folder, see nnunet_pvs.census.cohort), named there in ``info["files"]``."""
    c, region_dir, opts, folder = job
    ld = load_case(c, region_dir, opts)
    res = census_arrays(c.case, ld, opts)
    files = {}
    if opts.plots:
        from nnunet_pvs.census.figures import mosaic

        mosaic(ld, res, c.case, Path(folder) / OVERLAY, opts.mosaic_slices)
        files["overlay"] = OVERLAY
    if opts.label_maps:
        dtype = np.uint16 if res["n"] < 65535 else np.uint32
        nib.save(nib.Nifti1Image(res["labels"].astype(dtype), ld.affine), str(Path(folder) / LABELS))
        files["labels"] = LABELS
    info = {"case": c.case, "prediction": str(ld.pred_path), "kind": ld.kind,
            "image": str(c.image) if c.image else None, "regions": ld.region_paths,
            "shape": list(ld.pred.shape), "spacing_mm": [round(float(s), 6) for s in ld.spacing],
            "n_clusters": res["n"], "slices": {s.name: s.index for s in ld.slices},
            "notes": ld.notes, "files": files}
    return {"clusters": res["clusters"], "subjects": res["subjects"], "info": info}
