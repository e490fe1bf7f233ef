"""``nnunet-pvs evaluate``: PVS metrics of a prediction folder against reference labels.

Everything is computed before anything is written, and each output goes to a temporary name
then ``os.replace``, so a failure leaves no partial CSV behind.
"""

from __future__ import annotations

import argparse
import sys
from multiprocessing import get_context
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation import io
from nnunet_pvs.evaluation.case import Options, evaluate_case
from nnunet_pvs.evaluation.clusters import MatchRule
from nnunet_pvs.evaluation.regions import load_regions
from nnunet_pvs.evaluation.report import write_outputs
from nnunet_pvs.evaluation.sweeps import parse_range


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref", required=True, type=Path, help="folder of reference label NIfTIs (CASE.nii.gz, 0/1)")
    p.add_argument("--pred", required=True, type=Path,
                   help="folder of binary NIfTI predictions and/or nnU-Net probability files "
                        "(CASE.npz + CASE.pkl), or an nnU-Net results folder (fold_*/validation gathered)")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("--regions", type=Path, help="folder of per-case region maps: CASE.nii.gz (aseg "
                   "numbering or 0/1 mask) and/or CASE_<name>.nii.gz masks")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="probability threshold (p >= t) for per_case.csv (default 0.5)")
    p.add_argument("--thresholds", default="0.1:0.9:0.1",
                   help="threshold sweep for probability inputs, start:stop:step or a,b,c (default 0.1:0.9:0.1)")
    p.add_argument("--min-cluster-sizes", default="0:15",
                   help="cluster-size filters s: clusters of <= s voxels removed (default 0:15)")
    p.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=26,
                   help="cluster connectivity (default 26, Boutinaud et al.)")
    p.add_argument("--match", default="overlap",
                   help="cluster matching rule: 'overlap' (any shared voxel, default) or 'iou:T' (VALDO: iou:0.1)")
    p.add_argument("--binary", action="store_true",
                   help="use the NIfTI masks even where probability files exist")
    p.add_argument("--cases", type=Path, metavar="FILE",
                   help="evaluate only the case ids listed in FILE (one per line), e.g. a Cai-protocol test "
                        "group test_fold<k>.txt written by `nnunet-pvs splits --protocol cai`")
    p.add_argument("--allow-missing", action="store_true",
                   help="exit 0 even if some ids are present on one side only")
    p.add_argument("--geometry-tol", type=float, default=1e-3, help="spacing/affine tolerance in mm (default 1e-3)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="worker processes (default 1)")


def _options(args) -> Options:
    try:
        thresholds = parse_range(args.thresholds, float)
        sizes = parse_range(args.min_cluster_sizes, int)
        rule = MatchRule.parse(args.match)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not all(0.0 <= t <= 1.0 for t in (*thresholds, args.threshold)):
        raise UserError(f"thresholds must be within [0, 1], got {args.thresholds} / {args.threshold}")
    return Options(threshold=args.threshold, thresholds=thresholds, min_cluster_sizes=sizes,
                   connectivity=args.connectivity, rule=rule)


def _one_case(job) -> dict:
    """Load, check and evaluate one case (runs in a worker process)."""
    case, ref_path, pred_files, region_dir, opts, binary, tol = job
    ref = io.read_mask(ref_path, case, "reference")
    pred, pred_path = io.load_prediction(pred_files, case, prefer_probabilities=not binary)
    io.check_geometry(case, ref, ref_path, pred, pred_path, tol)
    regions = {}
    if region_dir is not None:
        for name, mask, vol, path in load_regions(region_dir, case):
            io.check_geometry(case, ref, ref_path, vol, path, tol)
            regions[name] = mask
    out = evaluate_case(case, ref.data, pred.data, ref.spacing, opts, regions)
    out["input"] = {"case": case, "reference": str(ref_path), "prediction": str(pred_path),
                    "kind": "probabilities" if pred.data.dtype != bool else "binary",
                    "spacing": "x".join(f"{s:g}" for s in ref.spacing)}
    return out


def read_case_list(path: Path) -> set[str]:
    """Case ids from a text file, one per line; blank lines and ``#`` comments are skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read the case list ({e.strerror})") from None
    ids = {line.split("#", 1)[0].strip() for line in lines} - {""}
    if not ids:
        raise UserError(f"{path}: the case list is empty")
    return ids


def run(args) -> int:
    opts = _options(args)
    if not args.ref.is_dir():
        raise UserError(f"{args.ref}: reference folder does not exist")
    refs = io.list_niftis(args.ref)
    if not refs:
        raise UserError(f"{args.ref}: no reference NIfTI files (.nii.gz or .nii) found")
    preds = io.gather_predictions(args.pred)
    if args.regions is not None and not args.regions.is_dir():
        raise UserError(f"{args.regions}: region folder does not exist")
    if args.cases is not None:
        wanted = read_case_list(args.cases)
        absent = sorted(wanted - set(refs))
        if absent:
            raise UserError(f"{args.cases}: case id(s) not in {args.ref}: {', '.join(absent)}")
        refs = {c: v for c, v in refs.items() if c in wanted}
        preds = {c: v for c, v in preds.items() if c in wanted}
    both = sorted(set(refs) & set(preds))
    missing = {"reference only": sorted(set(refs) - set(preds)),
               "prediction only": sorted(set(preds) - set(refs))}
    if not both:
        raise UserError(f"no case id in common between {args.ref} and {args.pred}")
    jobs = [(c, refs[c], preds[c], args.regions, opts, args.binary, args.geometry_tol) for c in both]
    results = []
    progress = tqdm(total=len(jobs), desc="evaluate", unit="case", file=sys.stderr)
    if args.num_processes > 1:
        with get_context("fork").Pool(min(args.num_processes, len(jobs))) as pool:
            for r in pool.imap(_one_case, jobs):
                results.append(r)
                progress.update()
    else:
        for job in jobs:
            results.append(_one_case(job))
            progress.update()
    progress.close()
    frames = {k: pd.DataFrame([row for r in results for row in r[k]])
              for k in ("per_case", "thresholds", "cluster_sizes", "size_pairs")}
    frames["inputs"] = pd.DataFrame([r["input"] for r in results])
    write_outputs(args.output, frames, opts, missing, plots=not args.no_plots)
    n_missing = sum(len(v) for v in missing.values())
    for side, ids in missing.items():
        if ids:
            print(f"{len(ids)} case(s) with {side}: {', '.join(ids)}", file=sys.stderr)
    print(f"evaluated {len(both)} case(s); results in {args.output}")
    return 1 if n_missing and not args.allow_missing else 0

