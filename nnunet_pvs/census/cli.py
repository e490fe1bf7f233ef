"""``nnunet-pvs census``: PVS burden per subject and region, shape of every cluster, and a visual QC
report, from nnU-Net predictions of new scans (no reference labels needed).

Every subject is read, checked and measured before OUT appears: the outputs are written to a
staging folder that becomes OUT at the end (an earlier census in OUT is replaced as a whole,
another command's folder is refused; see ``nnunet_pvs.staging``), so a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from multiprocessing import get_context
from pathlib import Path

import pandas as pd

from nnunet_pvs.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", required=True, type=Path, metavar="PRED",
                   help="folder of nnU-Net predictions: binary NIfTIs CASE.nii.gz and/or probability files "
                        "CASE.npz + CASE.pkl (nnUNetv2_predict --save_probabilities, nnUNetv2_ensemble "
                        "--save_npz), or an nnU-Net results folder (fold_*/validation gathered)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                   help="output folder (created; an earlier census there is replaced)")
    p.add_argument("--images", type=Path, help="folder of the images, CASE_0000.nii.gz (nnU-Net) or CASE.nii.gz: "
                   "background of the overlays, geometry checked")
    p.add_argument("--regions", type=Path, help="folder of region maps: CASE.nii.gz (aseg numbering: bg, wm and "
                   "the visual-rating slices; or a 0/1 mask) and/or CASE_<name>.nii.gz masks, as for `evaluate`")
    thr = p.add_mutually_exclusive_group()
    thr.add_argument("--threshold", type=float, help="probability threshold, p >= T is PVS (default 0.5)")
    thr.add_argument("--threshold-from", type=Path, metavar="EVAL_DIR",
                     help="take the threshold with the highest mean Dice (region whole) from the thresholds.csv "
                          "sweep of `nnunet-pvs evaluate` (e.g. on the cross-validation)")
    p.add_argument("--min-size-mm3", type=float, metavar="V",
                   help="drop clusters smaller than V mm^3 (default 0: keep all; with --threshold-from, the "
                        "cluster-size filter of that evaluation's sweep in mm^3: s voxels -> (s + 1) voxel volumes)")
    p.add_argument("--size-classes", default="5,10,50", metavar="E1,E2,...",
                   help="edges in mm^3 of the size classes counted in subjects.csv (default 5,10,50)")
    p.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=26,
                   help="cluster connectivity (default 26)")
    p.add_argument("--binary", action="store_true", help="use the NIfTI masks even where probability files exist")
    p.add_argument("--allow-missing", action="store_true",
                   help="skip predictions without an image or region map instead of stopping")
    p.add_argument("--no-plots", action="store_true", help="no PNGs (overlays, distributions); tables only")
    p.add_argument("--mosaic-slices", type=int, default=12, help="axial slices per overlay (default 12)")
    p.add_argument("--label-maps", action="store_true",
                   help="also write labels/CASE.nii.gz, each voxel holding its cluster number of clusters.csv")
    p.add_argument("--geometry-tol", type=float, default=1e-3, help="spacing/affine tolerance in mm (default 1e-3)")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="subjects in parallel (default 1)")


def _size_classes(text: str) -> tuple[float, ...]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--size-classes {text!r}: comma-separated numbers expected") from None
    if any(not v > 0 for v in vals) or vals != sorted(set(vals)):
        raise UserError(f"--size-classes {text!r}: edges must be positive and increasing")
    return tuple(vals)


def run(args) -> int:
    from tqdm import tqdm

    from nnunet_pvs import __version__
    from nnunet_pvs.census import inputs
    from nnunet_pvs.census.case import Options, run_case
    from nnunet_pvs.census.report import COMMAND, check_output, staged, write_outputs

    if args.threshold_from is not None:
        thr = inputs.threshold_from_sweep(args.threshold_from)
    elif args.threshold is not None:
        inputs.check_number("--threshold", args.threshold, 0.0, 1.0, low_open=True)
        thr = {"value": float(args.threshold), "source": "option"}
    else:
        thr = {"value": 0.5, "source": "default"}
    if args.min_size_mm3 is not None:
        inputs.check_number("--min-size-mm3", args.min_size_mm3, 0.0)
        min_size = {"value": float(args.min_size_mm3), "source": "option"}
    elif args.threshold_from is not None:
        min_size = inputs.min_size_from_sweep(args.threshold_from, thr["value"])
    else:
        min_size = {"value": 0.0, "source": "default"}
    if args.num_processes < 1 or args.mosaic_slices < 1:
        raise UserError("-np and --mosaic-slices must be at least 1")
    opts = Options(threshold=thr["value"], min_size_mm3=min_size["value"], connectivity=args.connectivity,
                   size_classes=_size_classes(args.size_classes), binary=args.binary,
                   geometry_tol=args.geometry_tol,
                   plots=not args.no_plots, mosaic_slices=args.mosaic_slices, label_maps=args.label_maps)
    out = args.output
    check_output(out)
    cases, left_out, unused = inputs.gather_cases(args.input, args.images, args.regions, args.allow_missing)
    with staged(out) as stage:
        jobs = [(c, args.regions, opts, stage) for c in cases]
        results = []
        with tqdm(total=len(jobs), desc="census", unit="subject", file=sys.stderr) as bar:  # closed on error too
            if args.num_processes > 1 and len(jobs) > 1:
                with get_context("fork").Pool(min(args.num_processes, len(jobs))) as pool:
                    for r in pool.imap(run_case, jobs):
                        results.append(r)
                        bar.update()
            else:
                for job in jobs:
                    results.append(run_case(job))
                    bar.update()
        clusters = pd.concat([r["clusters"] for r in results], ignore_index=True)
        subjects = pd.concat([r["subjects"] for r in results], ignore_index=True)
        infos = [r["info"] for r in results]
        summary = {
            "command": COMMAND, "version": __version__,
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                        if not k.startswith("_") and k != "command"},
            "inputs": {"predictions": str(args.input.resolve()),
                       "images": str(args.images.resolve()) if args.images else None,
                       "regions": str(args.regions.resolve()) if args.regions else None},
            "threshold": thr, "binarisation": "p >= threshold (probability inputs; binary masks used as is)",
            "min_size_mm3": opts.min_size_mm3, "min_size": min_size, "connectivity": opts.connectivity,
            "size_classes_mm3": list(opts.size_classes),
            "region_rule": "a cluster goes to the region holding most of its voxels (voxels outside every "
                           "region do not vote; no voxel in any region: outside); on a tie, the region listed "
                           "first (aseg map: bg before wm; then CASE_<name> masks by file name)",
            "n_cases": len(infos), "n_clusters": int(len(clusters)),
            "kinds": sorted({i["kind"] for i in infos}),
            "left_out": left_out, "unused": unused, "cases": infos,
        }
        write_outputs(stage, clusters, subjects, summary, plots=opts.plots)
    if thr["source"] != "default" and summary["kinds"] == ["binary"]:
        print("note: every prediction is a binary mask, so the threshold did not apply", file=sys.stderr)
    for what, items in left_out.items():
        print(f"left out (--allow-missing): {what} {', '.join(items)}", file=sys.stderr)
    for what, items in unused.items():
        print(f"note: {len(items)} {what} not used (listed in summary.json)", file=sys.stderr)
    if min_size["source"] == "sweep":
        print(f"minimum cluster size from {min_size['sweep']}: {min_size['min_cluster_size_voxels']} voxel(s) "
              f"(best pooled cluster Dice {min_size['pooled_cluster_dice']:.3f} at p >= {thr['value']:g}; "
              f"{min_size['rule']}) -> --min-size-mm3 {min_size['value']:g}")
    print(f"census of {len(infos)} subject(s), {len(clusters)} cluster(s) at p >= {thr['value']:g}"
          f" ({thr['source']})" + (f", clusters of at least {opts.min_size_mm3:g} mm3 ({min_size['source']})"
                                   if opts.min_size_mm3 > 0 else "") + f"; results in {out}")
    return 0
