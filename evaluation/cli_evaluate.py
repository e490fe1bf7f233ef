"""``nnunet-pvs evaluate``: PVS metrics of a prediction folder against reference labels.

The output folder is checked before any work; everything is computed before anything is
written, into a staging folder that then replaces the output folder as a whole, so a failure
leaves no partial or stale file behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from nnunet_pvs.case_loop import map_cases
from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation import io
from nnunet_pvs.evaluation.case import REGION_MODES, Options, evaluate_case
from nnunet_pvs.evaluation.clusters import MatchRule
from nnunet_pvs.evaluation.lesion_metrics import SizeGroups
from nnunet_pvs.evaluation.protocols import PROTOCOL_METRICS, parse_protocols
from nnunet_pvs.evaluation.regions import load_regions
from nnunet_pvs.evaluation.report import COMMAND, EARLIER_OUTPUT, write_outputs
from nnunet_pvs.evaluation.sweeps import parse_range
from nnunet_pvs.staging import check_output_folder


def _add(p: argparse.ArgumentParser, flag: str, **kw) -> None:
    """Add an option unless the parser already has it (compare defines some of them itself)."""
    if flag not in p._option_string_actions:
        p.add_argument(flag, **kw)


def add_metric_arguments(p: argparse.ArgumentParser) -> None:
    """Options that choose how metrics are computed, shared by ``evaluate`` and ``compare``."""
    _add(p, "--connectivity", type=int, choices=(6, 18, 26), default=26,
         help="cluster connectivity (default 26, Boutinaud et al.)")
    _add(p, "--match", default="overlap",
         help="cluster matching rule: 'overlap' (any shared voxel, default, Boutinaud), 'iou:T' "
              "(many-to-many, IoU >= T; not VALDO's rule, see --protocol valdo), 'one-to-one' or "
              "'one-to-one:iou:T' (maximum matching on IoU, panoptica-style)")
    _add(p, "--protocol", default="",
         help="also compute a challenge's own rules as extra columns: valdo, epvs, shivai "
              "(comma-separated); needs --connectivity 26")
    _add(p, "--nsd-tolerance", type=float, default=1.0, metavar="MM",
         help="surface Dice tolerance in mm (default 1)")
    _add(p, "--surface-connectivity", type=int, choices=(6, 26), default=6,
         help="neighbourhood defining surface voxels for HD95, Hausdorff and the voxel-count surface Dice "
              "(default 6, as medpy and MONAI; pvs-seg-nnunet uses 26)")
    _add(p, "--region-mode", choices=REGION_MODES, default="majority",
         help="majority: each cluster counted once, in the region holding most of its voxels "
              "(default, SHiVAi); cut: clusters cut voxel-wise at region borders")
    _add(p, "--size-groups", default="", metavar="EDGES",
         help="lesion-size groups, e.g. 10 (<= 10 voxels and larger) or 5,20 or 2,10mm3: per group "
              "detection rate, false positives and per-lesion Dice, per case and pooled")


def metric_options(args, **fixed) -> Options:
    """Options from the parsed arguments of :func:`add_metric_arguments`; bad values -> UserError."""
    try:
        rule = MatchRule.parse(args.match)
        protocols = parse_protocols(args.protocol)
        groups = SizeGroups.parse(args.size_groups) if args.size_groups else None
    except ValueError as e:
        raise UserError(str(e)) from None
    if not args.nsd_tolerance > 0:
        raise UserError(f"--nsd-tolerance must be > 0 mm, got {args.nsd_tolerance:g}")
    if protocols and args.connectivity != 26:
        raise UserError(f"--protocol {','.join(protocols)} uses 26-connected clusters as the challenges do; "
                        f"drop --connectivity {args.connectivity}")
    return Options(connectivity=args.connectivity, rule=rule, surface_connectivity=args.surface_connectivity,
                   nsd_tolerance=args.nsd_tolerance, region_mode=args.region_mode, size_groups=groups,
                   protocols=protocols, **fixed)


def new_metric_columns(protocols=tuple(PROTOCOL_METRICS)) -> list[str]:
    """Per-case columns added by surface Dice, Hausdorff, IoU, one-to-one matching and protocols."""
    from nnunet_pvs.evaluation.case import CASE_METRICS

    base = CASE_METRICS[CASE_METRICS.index("iou"):]
    return base + [c for p in protocols for c in PROTOCOL_METRICS[p]]


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
    add_metric_arguments(p)
    p.add_argument("--truth", nargs="?", const="auto", default=None, metavar="DIR",
                   help="also score against the noise-free truth (phantom datasets): the folder named by "
                        "dataset.json's nnunet_pvs.truth_labels beside --ref, or DIR")
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
    except ValueError as e:
        raise UserError(str(e)) from None
    if not all(0.0 <= t <= 1.0 for t in (*thresholds, args.threshold)):
        raise UserError(f"thresholds must be within [0, 1], got {args.thresholds} / {args.threshold}")
    return metric_options(args, threshold=args.threshold, thresholds=thresholds, min_cluster_sizes=sizes)


def truth_folder(ref_dir: Path, value: str) -> Path:
    """The noise-free truth folder: ``value`` itself, or (``auto``) the one dataset.json declares."""
    if value != "auto":
        folder = Path(value)
        if not folder.is_dir():
            raise UserError(f"--truth {folder}: is a file, not a folder" if folder.exists()
                            else f"--truth {folder}: folder does not exist")
        return folder
    ds = Path(ref_dir).absolute().parent / "dataset.json"
    try:
        meta = json.loads(ds.read_text())
    except FileNotFoundError:
        raise UserError(f"--truth: no {ds} beside {ref_dir}; give the truth folder as --truth DIR") from None
    except (OSError, ValueError) as e:
        raise UserError(f"--truth: cannot read {ds}: {e}") from None
    name = (meta.get("nnunet_pvs") or {}).get("truth_labels") if isinstance(meta, dict) else None
    if not name:
        raise UserError(f"--truth: {ds} declares no noise-free truth (no \"truth_labels\" in its "
                        "\"nnunet_pvs\" block); only phantom datasets have one, or give --truth DIR")
    folder = ds.parent / name
    if not folder.is_dir():
        raise UserError(f"--truth: {ds} names truth folder {name!r}, but {folder} does not exist")
    return folder


def _one_case(job) -> dict:
    """Load, check and evaluate one case (runs in a worker process)."""
    case, ref_path, pred_files, region_dir, opts, binary, tol, truth_path, case_ids = job[:9]
    ref = io.read_mask(ref_path, case, "reference")
    pred, pred_path = io.load_prediction(pred_files, case, prefer_probabilities=not binary)
    io.check_geometry(case, ref, ref_path, pred, pred_path, tol)
    regions = {}
    if region_dir is not None:
        for name, mask, vol, path in load_regions(region_dir, case, case_ids):
            io.check_geometry(case, ref, ref_path, vol, path, tol)
            regions[name] = mask
    truth = None
    if truth_path is not None:
        tv = io.read_mask(truth_path, case, "truth")
        io.check_geometry(case, ref, ref_path, tv, truth_path, tol)
        truth = tv.data
    out = evaluate_case(case, ref.data, pred.data, ref.spacing, opts, regions, truth)
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
    check_output_folder(args.output, COMMAND, legacy=EARLIER_OUTPUT)
    io.require_folder(args.ref, "--ref", "the reference labels")
    refs = io.list_niftis(args.ref)
    if not refs:
        raise UserError(f"{args.ref}: no reference NIfTI files (.nii.gz or .nii) found")
    preds = io.gather_predictions(args.pred)
    if args.regions is not None:
        io.require_folder(args.regions, "--regions", "the region maps")
        io.refuse_twins([p for p in sorted(args.regions.iterdir()) if p.is_file()])
    if args.cases is not None:
        wanted = read_case_list(args.cases)
        absent = sorted(wanted - set(refs))
        if absent:
            raise UserError(f"{args.cases}: case id(s) not in {args.ref}: {', '.join(absent)}")
        refs = {c: v for c, v in refs.items() if c in wanted}
        preds = {c: v for c, v in preds.items() if c in wanted}
    case_ids = set(refs) | set(preds)
    both = sorted(set(refs) & set(preds))
    missing = {"reference only": sorted(set(refs) - set(preds)),
               "prediction only": sorted(set(preds) - set(refs))}
    if not both:
        raise UserError(f"no case id in common between {args.ref} and {args.pred}")
    truths = {}
    if args.truth is not None:
        tdir = truth_folder(args.ref, args.truth)
        truths = io.list_niftis(tdir)
        lacking = [c for c in both if c not in truths]
        if lacking:
            raise UserError(f"--truth {tdir}: no truth label for {', '.join(lacking[:10])}")
    jobs = [(c, refs[c], preds[c], args.regions, opts, args.binary, args.geometry_tol, truths.get(c), case_ids)
            for c in both]
    results = map_cases(_one_case, jobs, processes=args.num_processes, desc="evaluate")
    frames = {k: pd.DataFrame([row for r in results for row in r[k]])
              for k in ("per_case", "thresholds", "cluster_sizes", "size_pairs", "size_groups")}
    frames["inputs"] = pd.DataFrame([r["input"] for r in results])
    write_outputs(args.output, frames, opts, missing, plots=not args.no_plots)
    n_missing = sum(len(v) for v in missing.values())
    for side, ids in missing.items():
        if ids:
            print(f"{len(ids)} case(s) with {side}: {', '.join(ids)}", file=sys.stderr)
    print(f"evaluated {len(both)} case(s); results in {args.output}")
    return 1 if n_missing and not args.allow_missing else 0

