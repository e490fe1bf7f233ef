"""``nnunet-pvs change``: PVS change per subject between two visits, cluster by cluster, above the noise floor.

For every subject: register the follow-up image rigidly to the baseline, carry the follow-up's
clusters into baseline space, link clusters that touch (within a voxel of misregistration) into
tracks, and call each track stable, enlarged, shrunk, new, vanished (or uncertain). Each subject's
result is written to ``OUT/cases/CASE/`` as soon as it is done (whole or not at all, with the
census's resume mechanism, :mod:`nnunet_pvs.resume`); a re-run with the same inputs and options
skips it. The cohort tables and report are then assembled from them.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
from pathlib import Path

from nnunet_pvs.census.cli import add_subject_output_arguments
from nnunet_pvs.errors import UserError

# the defaults of the rules, measured on same-session rescans (docs/change.md, "Where the thresholds come from")
DEFAULT_MIN_RELATIVE_CHANGE = 0.5
DEFAULT_MIN_CHANGE_VOXELS = 4.0
DEFAULT_MIN_SIZE_VOXELS = 4.0
DEFAULT_MIN_NCC = 0.5


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--baseline", required=True, type=Path, metavar="PRED_T0",
                   help="predictions of the first visit: binary NIfTIs CASE.nii.gz and/or nnU-Net probability files "
                        "CASE.npz + CASE.pkl, as for `census -i`")
    p.add_argument("--follow-up", required=True, type=Path, metavar="PRED_T1", help="predictions of the second visit")
    p.add_argument("--images-baseline", required=True, type=Path, metavar="IMG_T0",
                   help="images of the first visit (CASE_0000.nii.gz or CASE.nii.gz): registration and overlays")
    p.add_argument("--images-follow-up", required=True, type=Path, metavar="IMG_T1",
                   help="images of the second visit, same contrast as the first")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                   help="output folder (created; an earlier `change` output there is refilled, subjects already "
                        "done with the same inputs and options are kept)")
    p.add_argument("--pairs", type=Path, metavar="CSV",
                   help="table with columns case, baseline, follow_up naming each subject's two prediction ids "
                        "(default: the same case id in both folders)")
    p.add_argument("--regions", type=Path, help="folder of baseline region maps, as for `census --regions` "
                   "(CASE.nii.gz in aseg numbering or a 0/1 mask, and/or CASE_<name>.nii.gz masks)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold, p >= T is PVS (default 0.5)")
    p.add_argument("--binary", action="store_true", help="use the NIfTI masks even where probability files exist")
    p.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=26, help="cluster connectivity (default 26)")
    p.add_argument("--tolerance", type=int, default=1, metavar="VOXELS",
                   help="clusters of the two visits closer than this many voxels (in every direction) are the same "
                        "track: allowance for misregistration (default 1)")
    g = p.add_argument_group("change rules (see docs/change.md for how the defaults were measured)")
    g.add_argument("--min-relative-change", type=float, default=DEFAULT_MIN_RELATIVE_CHANGE, metavar="K",
                   help="enlarged/shrunk: the larger volume exceeds the smaller by more than this fraction, "
                        f"|dV| / min(V_baseline, V_follow_up) > K (default {DEFAULT_MIN_RELATIVE_CHANGE:g}: x 1.5)")
    g.add_argument("--min-change-voxels", type=float, default=DEFAULT_MIN_CHANGE_VOXELS, metavar="M",
                   help=f"... and |dV| > M baseline voxels (default {DEFAULT_MIN_CHANGE_VOXELS:g})")
    g.add_argument("--min-size-voxels", type=float, default=DEFAULT_MIN_SIZE_VOXELS, metavar="S",
                   help="new/vanished clusters have at least S baseline voxels; smaller unmatched ones are "
                        f"'uncertain' (default {DEFAULT_MIN_SIZE_VOXELS:g})")
    g.add_argument("--absence-prob", type=float, metavar="P",
                   help="probability maps: a cluster is new/vanished only if the other visit's probability within "
                        "the tolerance stays below P (default: half the threshold)")
    g.add_argument("--min-ncc", type=float, default=DEFAULT_MIN_NCC,
                   help="refuse a subject whose registered images correlate less than this inside the brain "
                        f"(default {DEFAULT_MIN_NCC:g})")
    p.add_argument("--keep-going", action="store_true",
                   help="a subject that fails goes to OUT/failures.csv and the others go on (exit status 1); "
                        "default: the first failure stops the run (exit status 2)")
    add_subject_output_arguments(p, plots="overlays, volume scatter",
                                 label_maps="cases/CASE/tracks.nii.gz: each baseline-space voxel holds its track number")


def options_from(args):
    """The per-subject options, checked (the thresholds as stated in summary.json with their source)."""
    from nnunet_pvs.census.inputs import check_number
    from nnunet_pvs.change.case import Options
    from nnunet_pvs.change.tracks import ChangeRules

    check_number("--threshold", args.threshold, 0.0, 1.0, low_open=True)
    check_number("--min-relative-change", args.min_relative_change, 0.0)
    check_number("--min-change-voxels", args.min_change_voxels, 0.0)
    check_number("--min-size-voxels", args.min_size_voxels, 0.0)
    check_number("--min-ncc", args.min_ncc, -1.0, 1.0)
    if args.absence_prob is not None:
        check_number("--absence-prob", args.absence_prob, 0.0, args.threshold)
    if args.tolerance < 0 or args.tolerance > 5:
        raise UserError(f"--tolerance must be 0..5 voxels, got {args.tolerance}")
    if args.num_processes < 1 or args.mosaic_slices < 1:
        raise UserError("-np and --mosaic-slices must be at least 1")
    absence = args.absence_prob if args.absence_prob is not None else args.threshold / 2
    rules = ChangeRules(args.min_relative_change, args.min_change_voxels, args.min_size_voxels, absence)
    return Options(threshold=args.threshold, connectivity=args.connectivity, tolerance=args.tolerance, rules=rules,
                   min_ncc=args.min_ncc, binary=args.binary, geometry_tol=args.geometry_tol,
                   plots=not args.no_plots, mosaic_slices=args.mosaic_slices, label_maps=args.label_maps)


def _rules_summary(args, opts) -> dict:
    def entry(value, option, default, meaning):
        return {"value": value, "source": "default" if value == default else "option",
                "option": "--" + option.replace("_", "-"), "meaning": meaning}

    r = opts.rules
    return {
        "min_relative_change": entry(r.min_relative_change, "min_relative_change", DEFAULT_MIN_RELATIVE_CHANGE,
                                     "enlarged/shrunk: |V_follow_up - V_baseline| / min(V_baseline, V_follow_up) "
                                     "above this (a ratio above 1 + K, up or down)"),
        "min_change_voxels": entry(r.min_change_voxels, "min_change_voxels", DEFAULT_MIN_CHANGE_VOXELS,
                                   "enlarged/shrunk: |V_follow_up - V_baseline| above this many baseline voxels too"),
        "min_size_voxels": entry(r.min_size_voxels, "min_size_voxels", DEFAULT_MIN_SIZE_VOXELS,
                                 "new/vanished: an unmatched cluster of at least this many baseline voxels; "
                                 "smaller ones are 'uncertain'"),
        "field_of_view": {"value": True, "source": "fixed",
                          "meaning": "a change of a track not wholly inside both fields of view (a voxel not imaged "
                                     "by the follow-up, or on the baseline grid's outer layer) is 'uncertain'"},
        "absence_prob": {"value": r.absence_prob, "source": "option" if args.absence_prob is not None else
                         "default (half the threshold)", "option": "--absence-prob",
                         "meaning": "probability maps: new/vanished only if the other visit's highest probability "
                                    "within the tolerance is below this (binary masks: not applied)"},
    }


def _undo_empty_output(out: Path, existed: bool) -> None:
    """A run that failed before any subject finished leaves nothing behind: what it put into an empty
    OUT (the marker, an empty ``cases/``) is removed, and OUT itself if the run created it."""
    from nnunet_pvs.resume import RECORD
    from nnunet_pvs.staging import MARKER

    cases = out / "cases"
    if any((d / RECORD).is_file() for d in (cases.iterdir() if cases.is_dir() else [])):
        return
    if not all(p.name in (MARKER, "cases") for p in out.iterdir()):
        return
    if existed:
        shutil.rmtree(cases, ignore_errors=True)
        (out / MARKER).unlink(missing_ok=True)
    else:
        shutil.rmtree(out, ignore_errors=True)


def run(args) -> int:
    from nnunet_pvs import __version__
    from nnunet_pvs.case_loop import CaseFailure, iter_cases
    from nnunet_pvs.change.case import input_files, run_pair
    from nnunet_pvs.change.pairs import gather_pairs
    from nnunet_pvs.change.report import (
        COMMAND,
        assemble,
        check_output,
        status_totals,
        write_outputs,
    )
    from nnunet_pvs.resume import CaseStore, digest, inputs_digest
    from nnunet_pvs.staging import write_marker

    opts = options_from(args)
    out = args.output
    check_output(out)
    pairs, unused = gather_pairs(args.baseline, args.follow_up, args.images_baseline, args.images_follow_up,
                                 args.regions, args.pairs)
    store = CaseStore(out / "cases", digest({"command": "change", "version": __version__, "options": opts.as_dict()}))
    stamps = {p.case: inputs_digest(input_files(p, args.regions)) for p in pairs}
    todo = [p for p in pairs if not store.is_done(p.case, stamps[p.case])]
    skipped = len(pairs) - len(todo)
    existed = out.exists()
    was_empty = not existed or not any(out.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, COMMAND)
    store.clean_leftovers()
    threads = 1 if args.num_processes > 1 else 0
    jobs = [(p, args.regions, opts, store, stamps[p.case], threads) for p in todo]
    failures: dict[str, str] = {}
    try:
        for job, res in iter_cases(run_pair, jobs, processes=args.num_processes, desc="change", unit="subject",
                                   keep_going=args.keep_going, case_of=lambda j: j[0].case):
            if isinstance(res, CaseFailure):
                store.write_failure(res.case, job[4], res.reason)
                failures[res.case] = res.reason
    except BaseException:
        if was_empty:
            _undo_empty_output(out, existed)
        raise
    done = [p.case for p in pairs if p.case not in failures]
    changes, subjects, registration, records = assemble(store, done)
    summary = {
        "command": f"nnunet-pvs {COMMAND}", "version": __version__,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    if not k.startswith("_") and k != "command"},
        "inputs": {"baseline": str(args.baseline.resolve()), "follow_up": str(args.follow_up.resolve()),
                   "images_baseline": str(args.images_baseline.resolve()),
                   "images_follow_up": str(args.images_follow_up.resolve()),
                   "regions": str(args.regions.resolve()) if args.regions else None,
                   "pairs": str(args.pairs.resolve()) if args.pairs else None},
        "threshold": opts.threshold, "binarisation": "p >= threshold (probability inputs; binary masks used as is)",
        "connectivity": opts.connectivity, "tolerance_voxels": opts.tolerance,
        "matching": "a baseline and a follow-up cluster (follow-up carried into baseline space) are linked when a "
                    "voxel of one lies within the tolerance (a (2t+1)^3 cube) of a voxel of the other; tracks are "
                    "the connected components of these links",
        "rules": _rules_summary(args, opts),
        "volumes": "each visit's clusters on its own grid (voxel count x voxel volume); voxel thresholds in baseline "
                   "voxels",
        "region_rule": "a track goes to the baseline region holding most of its voxels (baseline clusters and the "
                       "registered follow-up clusters); none: outside",
        "registration": {"method": "rigid Euler3D, Mattes mutual information, regular-step gradient descent, "
                                   "multi-resolution (SimpleITK)",
                         "settings": opts.as_dict()["registration"], "min_ncc": opts.min_ncc,
                         "quality": "ncc: Pearson correlation of the baseline image and the registered follow-up "
                                    "inside the baseline brain (region maps, else Otsu foreground)"},
        "n_cases": len(done), "n_tracks": len(changes), "status_totals": status_totals(changes),
        "resumed": skipped, "failures": failures, "unused": unused,
        "other_cases_kept": store.others([p.case for p in pairs]),
        "cases": records,
    }
    write_outputs(out, changes, subjects, registration, failures, summary, opts.plots)
    if skipped:
        print(f"resumed: {skipped} subject(s) already done with the same inputs and options were kept", file=sys.stderr)
    for what, items in unused.items():
        print(f"note: {len(items)} {what} not used (listed in summary.json)", file=sys.stderr)
    totals = ", ".join(f"{n} {s}" for s, n in summary["status_totals"].items() if n)
    print(f"change of {len(done)} subject(s): {len(changes)} track(s)" + (f" ({totals})" if totals else "")
          + f"; results in {out}")
    if failures:
        print(f"nnunet-pvs change: {len(failures)} of {len(pairs)} subject(s) failed, listed in {out / 'failures.csv'}",
              file=sys.stderr)
        return 1
    return 0

