"""Benchmark of `nnunet-pvs evaluate`'s per-case metrics against medpy and a per-lesion loop, in
the same run.

One 1 mm whole-brain grid (197 x 233 x 189) with about 1,000 PVS-like tubular clusters inside a
brain-shaped ellipsoid, a perturbed prediction (missed, shrunk, grown and shifted clusters plus
false positives) and a probability map. Timed:
  - ours, per case: voxel + cluster metrics (Boutinaud rule), HD95, cluster HD95, size pairs, and
    the columns every case gets (IoU, Hausdorff, both surface Dice variants, PQ, lesion Dice);
  - ours, all metrics on: one-to-one matching at IoU 0.1, the VALDO, EPVS and SHiVAi protocols,
    size groups, 26-neighbourhood surfaces, two regions (majority mode);
  - ours, 9-threshold sweep (0.1 .. 0.9) on the probability map, every metric at each threshold;
  - medpy baseline: dc, hd95, obj_tpr, obj_fpr on the same binary masks, and the same four at the
    9 thresholds;
  - per-lesion loop baseline, the way evaluators that loop over lesions compute lesion metrics
    (one full-volume mask per lesion): best-overlap reference and IoU of every predicted lesion,
    detection and per-lesion Dice of every reference lesion, plus medpy dc and hd95;
  - for information, the same per-case work including reading the files (gzip dominates).
Results are printed and written to benchmarks/results/evaluation.md. Run:
    .venv/bin/python benchmarks/bench_evaluation.py [--repeats 3] [--skip-baseline-sweep]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from nnunet_pvs.evaluation.case import Options, evaluate_case  # noqa: E402
from nnunet_pvs.evaluation.clusters import MatchRule  # noqa: E402
from nnunet_pvs.evaluation.lesion_metrics import SizeGroups  # noqa: E402
from nnunet_pvs.evaluation.surface_dice import surface_dice  # noqa: E402

SHAPE = (197, 233, 189)


def phantom(seed=0, n_clusters=1000):
    """Reference mask, perturbed binary prediction and probability map."""
    rng = np.random.default_rng(seed)
    c = np.array(SHAPE) / 2
    ref = np.zeros(SHAPE, bool)
    placed = 0
    while placed < n_clusters:
        p = rng.uniform([20, 20, 20], np.array(SHAPE) - 20)
        if (((p - c) / (np.array(SHAPE) * 0.42)) ** 2).sum() > 1:
            continue
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        length = rng.integers(2, 14)
        pts = np.round(p + np.outer(np.arange(length), d)).astype(int)
        ref[pts[:, 0], pts[:, 1], pts[:, 2]] = True
        if rng.random() < 0.4:                       # thicker PVS
            ref[pts[:, 0] + 1, pts[:, 1], pts[:, 2]] = True
        placed += 1
    lab, n = ndimage.label(ref, np.ones((3, 3, 3)))
    keep = rng.random(n + 1) > 0.1                   # 10 % of clusters missed
    keep[0] = False
    pred = keep[lab]
    grow = rng.random(n + 1) < 0.3
    grow[0] = False
    pred |= ndimage.binary_dilation(grow[lab]) & (rng.random(SHAPE) < 0.5)
    pred &= ~((rng.random(n + 1) < 0.2)[lab] & (rng.random(SHAPE) < 0.3))   # eroded voxels
    shift = (rng.random(n + 1) < 0.3)[lab] & pred           # 30 % of clusters shifted by a voxel
    pred = (pred & ~shift) | np.roll(shift, 1, axis=int(rng.integers(0, 3)))
    fp = np.zeros(SHAPE, bool)                       # ~150 false-positive specks
    idx = rng.integers([20, 20, 20], np.array(SHAPE) - 20, size=(150, 3))
    fp[idx[:, 0], idx[:, 1], idx[:, 2]] = True
    pred |= ndimage.binary_dilation(fp) & (rng.random(SHAPE) < 0.4)
    prob = ndimage.gaussian_filter(pred.astype(np.float32), 0.7) * 1.6
    prob += rng.random(SHAPE, dtype=np.float32) * 0.08
    np.clip(prob, 0, 1, out=prob)
    return ref, pred, prob


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def medpy_case(ref, pred, spacing):
    from medpy.metric import binary as mb

    return (mb.dc(pred, ref), mb.hd95(pred, ref, voxelspacing=spacing),
            mb.obj_tpr(pred, ref), mb.obj_fpr(pred, ref))


def per_lesion_loop(ref, pred, spacing):
    """Lesion metrics by a loop over lesions, one full-volume comparison each (the baseline)."""
    from medpy.metric import binary as mb

    st = np.ones((3, 3, 3))
    rl, nr = ndimage.label(ref, st)
    pl, npred = ndimage.label(pred, st)
    rs, ps = np.bincount(rl.ravel()), np.bincount(pl.ravel())
    ious = []
    for s in range(1, npred + 1):
        under = rl[pl == s]
        under = under[under > 0]
        if len(under):
            labs, cnt = np.unique(under, return_counts=True)
            r = labs[np.argmax(cnt)]
            ious.append(cnt.max() / (ps[s] + rs[r] - cnt.max()))
    dices, detected = [], 0
    for r in range(1, nr + 1):
        m = rl == r
        partners = np.unique(pl[m])
        partners = partners[partners > 0]
        if len(partners):
            detected += 1
            p = np.isin(pl, partners)
            dices.append(2 * np.count_nonzero(m & p) / (rs[r] + np.count_nonzero(p)))
    return mb.dc(pred, ref), mb.hd95(pred, ref, voxelspacing=spacing), detected, float(np.mean(dices))


def deepmind_surface_dice(ref, pred, spacing, tol):
    """DeepMind's surface-distance (Nikolov et al.'s reference code), for timing and agreement."""
    import warnings

    import surface_distance as dm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dm.compute_surface_dice_at_tolerance(dm.compute_surface_distances(ref, pred, spacing), tol)


def with_io(ref, pred, prob):
    """The CLI's per-case work including reading the files: a reference NIfTI, a binary NIfTI and
    an nnU-Net npz + pkl (probabilities, 9-threshold sweep)."""
    import pickle
    import tempfile

    import nibabel as nib

    from nnunet_pvs.evaluation.cli_evaluate import _one_case
    from nnunet_pvs.evaluation.io import PredFiles

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        nib.save(nib.Nifti1Image(ref.astype(np.uint8), np.eye(4)), d / "ref.nii.gz")
        nib.save(nib.Nifti1Image(pred.astype(np.uint8), np.eye(4)), d / "pred.nii.gz")
        fg = prob.transpose(2, 1, 0)
        np.savez_compressed(d / "prob.npz", probabilities=np.stack([1 - fg, fg]))
        with open(d / "prob.pkl", "wb") as f:
            pickle.dump({"sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                                        "direction": (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)}}, f)
        thresholds = tuple(round(0.1 * i, 1) for i in range(1, 10))
        out = {}
        for name, files, opts in [("binary", PredFiles(seg=d / "pred.nii.gz"), Options()),
                                  ("sweep", PredFiles(npz=d / "prob.npz"), Options(thresholds=thresholds))]:
            t = time.perf_counter()
            _one_case(("b", d / "ref.nii.gz", files, None, opts, False, 1e-3, None, {"b"}))
            out[name] = time.perf_counter() - t
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-baseline-sweep", action="store_true",
                    help="estimate medpy's sweep as 9 x its per-case time instead of running it")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "evaluation.md")
    args = ap.parse_args()
    spacing = (1.0, 1.0, 1.0)
    t0 = time.perf_counter()
    ref, pred, prob = phantom()
    print(f"phantom built in {time.perf_counter() - t0:.1f} s")
    thresholds = tuple(round(0.1 * i, 1) for i in range(1, 10))

    t_case, out = best_of(lambda: evaluate_case("b", ref, pred, spacing, Options()), args.repeats)
    row = out["per_case"][0]
    t_case16, _ = best_of(lambda: evaluate_case("b", ref, pred, spacing,
                                                Options(min_cluster_sizes=tuple(range(16)))), args.repeats)
    t_sweep, sw = best_of(lambda: evaluate_case("b", ref, prob, spacing,
                                                Options(thresholds=thresholds)), args.repeats)
    left = np.zeros(SHAPE, bool)
    left[: SHAPE[0] // 2] = True
    all_on = Options(rule=MatchRule.parse("one-to-one:iou:0.1"), protocols=("valdo", "epvs", "shivai"),
                     size_groups=SizeGroups.parse("10"), surface_connectivity=26)
    t_all, out_all = best_of(lambda: evaluate_case("b", ref, pred, spacing, all_on), args.repeats)
    t_all_reg, _ = best_of(lambda: evaluate_case("b", ref, pred, spacing, all_on,
                                                 regions={"left": left, "right": ~left}), args.repeats)
    t_loop, loop = best_of(lambda: per_lesion_loop(ref, pred, spacing), 1)
    t_nsd, nsd_ours = best_of(lambda: surface_dice(ref, pred, spacing, 1.0), args.repeats)
    t_dm, nsd_dm = best_of(lambda: deepmind_surface_dice(ref, pred, spacing, 1.0), 1)
    t_io, row_io = best_of(lambda: with_io(ref, pred, prob), 1)
    t_base, base = best_of(lambda: medpy_case(ref, pred, spacing), 1)
    if args.skip_baseline_sweep:
        t_base_sweep, sweep_note = 9 * t_base, "estimated as 9 x per case"
    else:
        t_base_sweep, _ = best_of(lambda: [medpy_case(ref, prob >= t, spacing) for t in thresholds], 1)
        sweep_note = "measured"
    lines = [
        "# Evaluation benchmark",
        "",
        f"Volume {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} at 1 mm, {row['n_ref_clusters']} reference clusters, "
        f"{row['n_pred_clusters']} predicted clusters (Dice {row['dice']:.3f}, Dice-CL "
        f"{row['cluster_dice']:.3f}, HD95 {row['hd95_mm']:.2f} mm). One process, OMP_NUM_THREADS="
        f"{os.environ['OMP_NUM_THREADS']}, best of {args.repeats}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical CPUs (shared; load average {os.getloadavg()[0]:.1f} at the end of the run).",
        "",
        f"Sanity: medpy dc {base[0]:.6f} vs ours {row['dice']:.6f}; medpy hd95 {base[1]:.4f} vs ours "
        f"{row['hd95_mm']:.4f} mm (medpy's obj_tpr {base[2]:.3f} / obj_fpr {base[3]:.3f} use 6-connectivity "
        "and their own correspondence rule, so they are timed, not compared).",
        "",
        "| task | ours (s) | medpy baseline (s) | speed-up | target |",
        "|---|---|---|---|---|",
        "| per case, default options: voxel, cluster, HD95, cluster HD95, IoU, Hausdorff, surface Dice, PQ | "
        f"{t_case:.3f} | {t_base:.2f} (medpy) | "
        f"{t_base / t_case:.0f}x | < 1 s, >= 20x |",
        f"| per case, all metrics on (one-to-one IoU 0.1, VALDO + EPVS + SHiVAi, size groups, 26-neighbourhood "
        f"surfaces, area-weighted and voxel surface Dice) | {t_all:.3f} | {t_loop:.2f} (per-lesion loop) | "
        f"{t_loop / t_all:.0f}x | >= 20x |",
        f"| the same with two regions (majority mode: whole + 2 regions) | {t_all_reg:.3f} | - | - | - |",
        f"| area-weighted surface Dice at 1 mm alone | {t_nsd:.3f} | {t_dm:.2f} (DeepMind surface-distance) | "
        f"{t_dm / t_nsd:.0f}x | - |",
        f"| per case with 16 cluster-size filters (0..15) | {t_case16:.3f} | - | - | - |",
        f"| 9-threshold sweep, every metric | {t_sweep:.3f} | {t_base_sweep:.2f} ({sweep_note}) | "
        f"{t_base_sweep / t_sweep:.0f}x | < 3 s |",
        f"| per case incl. reading ref + binary NIfTI (.nii.gz) | {row_io['binary']:.3f} | - | - | - |",
        f"| 9-threshold sweep incl. reading ref NIfTI + nnU-Net .npz/.pkl | {row_io['sweep']:.3f} | - | - | - |",
        "",
        f"Surface Dice at 1 mm: ours {nsd_ours:.6f}, DeepMind surface-distance {nsd_dm:.6f}.",
        "",
        f"All metrics on: PQ {out_all['per_case'][0]['pq']:.3f}, "
        f"lesion Dice {out_all['per_case'][0]['lesion_dice']:.3f}, "
        f"surface Dice {out_all['per_case'][0]['surface_dice']:.3f} (voxel variant "
        f"{out_all['per_case'][0]['surface_dice_voxels']:.3f}), VALDO F1 {out_all['per_case'][0]['valdo_f1']:.3f}. "
        f"Per-lesion loop: {loop[2]} reference lesions detected (ours {row['ref_clusters_detected']}), mean Dice of "
        "detected lesions with all their partners "
        f"{loop[3]:.3f}.",
        "",
        f"Sweep rows: {len(sw['thresholds'])} (case x threshold x metric).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
