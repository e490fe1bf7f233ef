"""The change of one subject: read both visits, register, carry the follow-up clusters into baseline
space, match them into tracks, classify, count per region (run in a worker process).

Clusters are found in each visit's own grid exactly as ``nnunet-pvs census`` finds them (``p >= T``,
same connectivity, no size filter), so cluster numbers and volumes match a census of each visit.
The follow-up's *label image* is carried into baseline space (nearest neighbour, clusters lost
between grid points put back, see :func:`~nnunet_pvs.change.register.push_missing_labels`), which
keeps every cluster's identity; volumes stay those of the native grids, with no interpolation.
A follow-up probability map is resampled linearly, for the absence test of vanished clusters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from nnunet_pvs.census import case as census_case
from nnunet_pvs.census.shape import voxel_volume
from nnunet_pvs.change import register as reg_mod
from nnunet_pvs.change import tracks as trk
from nnunet_pvs.change.pairs import VisitPair
from nnunet_pvs.cluster_regions import OUTSIDE, majority_regions
from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation.clusters import label, sizes

WHOLE = census_case.WHOLE

CHANGE_COLUMNS = [
    "case", "track", "cluster_baseline", "cluster_follow_up", "status", "relation",
    "volume_baseline_mm3", "volume_follow_up_mm3", "volume_change_mm3", "volume_ratio",
    "region", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "other_visit_max_prob", "in_view",
]
SUBJECT_COLUMNS = [
    "case", "region", "n_tracks", *(f"n_{s}" for s in trk.STATUSES), "n_clusters_baseline",
    "n_clusters_follow_up", "count_change", "volume_baseline_mm3", "volume_follow_up_mm3", "volume_change_mm3",
]
REGISTRATION_COLUMNS = [
    "case", "ncc", "ncc_identity", "mi", "mi_identity", "mi_gain", "overlap", "rotation_deg", "rotation_x_deg",
    "rotation_y_deg", "rotation_z_deg", "translation_mm", "translation_x_mm", "translation_y_mm",
    "translation_z_mm", "iterations", "levels", "seconds", "stop",
]


@dataclass(frozen=True)
class Options:
    """Everything that decides one subject's result (its digest decides whether a re-run redoes it)."""

    threshold: float = 0.5
    connectivity: int = 26
    tolerance: int = 1
    rules: trk.ChangeRules = field(default_factory=trk.ChangeRules)
    min_ncc: float = 0.5
    registration: reg_mod.RegistrationSettings = field(default_factory=reg_mod.RegistrationSettings)
    binary: bool = False
    geometry_tol: float = 1e-3
    plots: bool = True
    mosaic_slices: int = 12
    label_maps: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Visit:
    """One visit, read and checked, with its clusters on its own grid."""

    loaded: census_case.Loaded
    labels: np.ndarray
    n: int
    volumes: np.ndarray = field(default_factory=lambda: np.zeros(1))  # mm^3 per cluster, index 0 unused

    @property
    def probabilities(self) -> np.ndarray | None:
        return self.loaded.pred if self.loaded.kind == "probabilities" else None


def read_visit(c, region_dir: Path | None, opts: Options) -> Visit:
    """A visit's prediction, image (and baseline region maps), geometry checked as the census does."""
    census_opts = census_case.Options(threshold=opts.threshold, connectivity=opts.connectivity,
                                      binary=opts.binary, geometry_tol=opts.geometry_tol, plots=False)
    ld = census_case.load_case(c, region_dir, census_opts)
    mask = ld.pred >= opts.threshold if ld.kind == "probabilities" else ld.pred
    labels, n = label(mask, opts.connectivity)
    return Visit(ld, labels, n, sizes(labels, n) * voxel_volume(ld.affine))


def registered(pair: VisitPair, base: Visit, follow: Visit, opts: Options, threads: int = 0) -> reg_mod.Registration:
    """The rigid registration of the follow-up image to the baseline image, refused when it failed."""
    b_img, f_img = pair.baseline.image, pair.follow_up.image
    brain = base.loaded.brain if base.loaded.brain is not None and base.loaded.brain.any() else None
    try:
        r = reg_mod.register_rigid(base.loaded.image, base.loaded.affine, follow.loaded.image, follow.loaded.affine,
                                   brain, opts.registration, threads)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{pair.case}: the follow-up image {f_img} cannot be registered to the baseline image "
                        f"{b_img}: {' '.join(str(e).split())[:300]}") from None
    if not r.ncc >= opts.min_ncc:  # NaN fails too
        raise UserError(f"{pair.case}: the follow-up image {f_img} does not register to the baseline image {b_img}: "
                        f"correlation in the brain after rigid registration NCC {r.ncc:.3f} (before {r.ncc_identity:.3f}; "
                        f"Mattes MI {r.mi_final:.3f}, before {r.mi_identity:.3f}) is below --min-ncc {opts.min_ncc:g}; "
                        "check that both scans are of this subject, of one contrast, and whole")
    return r


def _centroids(track_img: np.ndarray, n: int, affine: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(track_img)
    lab = track_img.ravel()[idx]
    cnt = np.bincount(lab, minlength=n + 1)[1:].astype(float)
    ijk = np.stack(np.unravel_index(idx, track_img.shape), -1).astype(float)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    out = np.full((n, 3), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        for k in range(3):
            out[:, k] = np.bincount(lab, weights=world[:, k], minlength=n + 1)[1:] / cnt
    return out


def compare_visits(case: str, base: Visit, follow: Visit, reg: reg_mod.Registration, opts: Options) -> dict:
    """Tracks, statuses and per-region counts of one subject (pure computation on loaded visits)."""
    b, f = base.loaded, follow.loaded
    f_in_b = reg_mod.resample_to_baseline(follow.labels, f.affine, b.pred.shape, b.affine, reg, nearest=True)
    f_in_b = reg_mod.push_missing_labels(f_in_b, follow.labels, f.affine, b.affine, reg)
    tr = trk.match(base.labels, base.n, f_in_b, follow.n, opts.tolerance)
    relation = tr.relations()
    v0 = trk.per_track_sum(tr.track_of_baseline, base.volumes, tr.n)
    v1 = trk.per_track_sum(tr.track_of_follow_up, follow.volumes, tr.n)

    ids_b = trk.member_lists(tr.track_of_baseline, tr.n)
    ids_f = trk.member_lists(tr.track_of_follow_up, tr.n)
    other = np.full(tr.n, np.nan)
    if follow.probabilities is not None:  # vanished: the follow-up's probability around the baseline cluster
        p1 = reg_mod.resample_to_baseline(follow.probabilities, f.affine, b.pred.shape, b.affine, reg, nearest=False)
        per_cluster = trk.neighbourhood_max(base.labels, base.n, p1, opts.tolerance)
        for t in np.flatnonzero(relation == "baseline-only"):
            other[t] = per_cluster[ids_b[t][0] - 1]
    if base.probabilities is not None:    # new: the baseline's probability around the follow-up cluster
        per_cluster = trk.neighbourhood_max(f_in_b, follow.n, base.probabilities, opts.tolerance)
        for t in np.flatnonzero(relation == "follow-up-only"):
            other[t] = per_cluster[ids_f[t][0] - 1]
    track_img = np.zeros(b.pred.shape, np.int64)
    track_img[base.labels > 0] = tr.track_of_baseline[base.labels[base.labels > 0]]
    only_f = (track_img == 0) & (f_in_b > 0)
    track_img[only_f] = tr.track_of_follow_up[f_in_b[only_f]]
    imaged = reg_mod.resample_to_baseline(np.ones(f.pred.shape, np.uint8), f.affine, b.pred.shape, b.affine, reg,
                                          nearest=True) > 0
    seen = trk.in_view(track_img, tr.n, imaged)
    vv = voxel_volume(b.affine)
    status = trk.classify(relation, v0, v1, vv, opts.rules, other, seen)
    region = (majority_regions(track_img, tr.n, b.regions)[1:] if b.regions
              else np.full(tr.n, WHOLE, dtype=object))
    cen = _centroids(track_img, tr.n, b.affine)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(v0 > 0, v1 / np.where(v0 > 0, v0, 1.0), np.nan)
    changes = pd.DataFrame({
        "case": case, "track": np.arange(1, tr.n + 1),
        "cluster_baseline": ["+".join(map(str, m)) for m in ids_b],
        "cluster_follow_up": ["+".join(map(str, m)) for m in ids_f],
        "status": status.astype(str), "relation": relation.astype(str),
        "volume_baseline_mm3": v0, "volume_follow_up_mm3": v1, "volume_change_mm3": v1 - v0, "volume_ratio": ratio,
        "region": region.astype(str), "centroid_x_mm": cen[:, 0], "centroid_y_mm": cen[:, 1],
        "centroid_z_mm": cen[:, 2], "other_visit_max_prob": other, "in_view": seen,
    }, columns=CHANGE_COLUMNS)
    n_b = np.array([len(m) for m in ids_b], int)
    n_f = np.array([len(m) for m in ids_f], int)
    regions = [WHOLE] + ([*b.regions, OUTSIDE] if b.regions else [])
    rows = []
    for r in regions:
        sel = np.ones(tr.n, bool) if r == WHOLE else (region == r)
        row = {"case": case, "region": r, "n_tracks": int(sel.sum())}
        row.update({f"n_{s}": int((status[sel] == s).sum()) for s in trk.STATUSES})
        row.update({"n_clusters_baseline": int(n_b[sel].sum()), "n_clusters_follow_up": int(n_f[sel].sum()),
                    "count_change": int(n_f[sel].sum() - n_b[sel].sum()),
                    "volume_baseline_mm3": float(v0[sel].sum()), "volume_follow_up_mm3": float(v1[sel].sum()),
                    "volume_change_mm3": float(v1[sel].sum() - v0[sel].sum())})
        rows.append(row)
    return {"changes": changes, "subjects": pd.DataFrame(rows, columns=SUBJECT_COLUMNS), "track_img": track_img,
            "status": status, "n_tracks": tr.n}


def registration_row(case: str, r: reg_mod.Registration) -> dict:
    return {"case": case, "ncc": r.ncc, "ncc_identity": r.ncc_identity, "mi": r.mi_final, "mi_identity": r.mi_identity,
            "mi_gain": r.mi_final - r.mi_identity, "overlap": r.overlap, **r.motion(), "iterations": r.iterations,
            "levels": "x".join(map(str, r.levels)), "seconds": r.seconds, "stop": r.stop}


def input_files(pair: VisitPair, region_dir: Path | None) -> list[Path]:
    """Every file a subject's result depends on (their stamps make its inputs digest)."""
    from nnunet_pvs.evaluation.regions import region_files

    files = []
    for c in (pair.baseline, pair.follow_up):
        files += [c.pred.seg, c.pred.npz, c.pred.npz.with_suffix(".pkl") if c.pred.npz else None, c.image]
    if region_dir is not None:
        files += [p for _, p in region_files(region_dir, pair.baseline.case, pair.baseline.all_ids or None)]
    return [Path(p) for p in files if p is not None]


def run_pair(job) -> dict:
    """Worker: one subject from files to its per-subject result folder (written whole or not at all)."""
    pair, region_dir, opts, store, inputs, threads = job
    base = read_visit(pair.baseline, region_dir, opts)
    follow = read_visit(pair.follow_up, None, opts)
    r = registered(pair, base, follow, opts, threads)
    res = compare_visits(pair.case, base, follow, r, opts)
    from nnunet_pvs.tables import write_csv

    with store.writing(pair.case, inputs) as (folder, record):
        write_csv(res["changes"], folder / "changes.csv", digits=6)
        write_csv(res["subjects"], folder / "subjects.csv", digits=6)
        write_csv(pd.DataFrame([registration_row(pair.case, r)], columns=REGISTRATION_COLUMNS),
                  folder / "registration.csv", digits=6)
        files = {}
        if opts.plots:
            from nnunet_pvs.change.figures import status_mosaic

            status_mosaic(base.loaded.image, base.loaded.affine, res["track_img"], res["status"], pair.case,
                          folder / "overlay.png", opts.mosaic_slices)
            files["overlay"] = "overlay.png"
        if opts.label_maps:
            import nibabel as nib

            dtype = np.uint16 if res["n_tracks"] < 65535 else np.uint32
            nib.save(nib.Nifti1Image(res["track_img"].astype(dtype), base.loaded.affine), str(folder / "tracks.nii.gz"))
            files["tracks"] = "tracks.nii.gz"
        record.update({
            "baseline": {"id": pair.baseline.case, "prediction": str(base.loaded.pred_path), "kind": base.loaded.kind,
                         "image": str(pair.baseline.image), "regions": base.loaded.region_paths,
                         "shape": list(base.loaded.pred.shape),
                         "spacing_mm": [round(float(s), 6) for s in base.loaded.spacing], "n_clusters": base.n},
            "follow_up": {"id": pair.follow_up.case, "prediction": str(follow.loaded.pred_path),
                          "kind": follow.loaded.kind, "image": str(pair.follow_up.image),
                          "shape": list(follow.loaded.pred.shape),
                          "spacing_mm": [round(float(s), 6) for s in follow.loaded.spacing], "n_clusters": follow.n},
            "n_tracks": res["n_tracks"], "files": files,
            "registration": {**asdict(r), "matrix_ras": r.matrix_ras().tolist()},
            "notes": base.loaded.notes,
        })
    return {"case": pair.case, "n_tracks": res["n_tracks"]}
