"""``nnunet-pvs census``: PVS burden per subject and region, shape of every cluster, and a visual QC
report, from nnU-Net predictions of new scans (no reference labels needed).

Cohort scale (nnunet_pvs.census.cohort): each subject's result is written to OUT/cases/CASE as soon
as it is done, a re-run skips the subjects already done with the same inputs and options, a subject
that cannot be read or fails a check is listed in OUT/failures.csv while the others complete (exit
status 1), ``--num-parts N --part-id K`` lets N jobs share OUT and ``--merge OUT`` assembles their
tables; ``--emit-slurm`` writes the SLURM array that does it all (nnunet_pvs.census.slurm).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnunet_pvs.errors import UserError


def add_subject_output_arguments(p: argparse.ArgumentParser, plots: str, label_maps: str) -> None:
    """The per-subject output options shared by ``census`` and ``change`` (plots, overlays, label maps,
    geometry tolerance, workers); ``plots`` and ``label_maps`` say what those write for the command."""
    p.add_argument("--no-plots", action="store_true", help=f"no PNGs ({plots}); tables only")
    p.add_argument("--mosaic-slices", type=int, default=12, help="axial slices per overlay (default 12)")
    p.add_argument("--label-maps", action="store_true", help=f"also write {label_maps}")
    p.add_argument("--geometry-tol", type=float, default=1e-3, help="spacing/affine tolerance in mm (default 1e-3)")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="subjects in parallel (default 1)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", type=Path, metavar="PRED",
                   help="folder of nnU-Net predictions: binary NIfTIs CASE.nii.gz and/or probability files "
                        "CASE.npz + CASE.pkl (nnUNetv2_predict --save_probabilities, nnUNetv2_ensemble "
                        "--save_npz), or an nnU-Net results folder (fold_*/validation gathered)")
    p.add_argument("-o", "--output", type=Path, metavar="OUT",
                   help="output folder (created; the census fills it subject by subject, and a re-run with the "
                        "same inputs and options skips the subjects already done)")
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
    add_subject_output_arguments(p, plots="overlays, distributions",
                                 label_maps="labels/CASE.nii.gz, each voxel holding its cluster number of clusters.csv")
    check = p.add_mutually_exclusive_group()
    check.add_argument("--qc", type=Path, metavar="INPUTS_QC_CSV",
                       help="verdicts of `nnunet-pvs check-inputs` (its OUT/inputs_qc.csv): qc_verdict and "
                            "qc_reasons in subjects.csv, flagged subjects in report.html")
    check.add_argument("--check-model", type=Path, metavar="MODEL",
                       help="run the input check of `nnunet-pvs check-inputs` against this nnU-Net trained-model "
                            "folder for every subject (needs --images), with the same outputs as --qc")
    c = p.add_argument_group("cohort scale")
    c.add_argument("--num-parts", type=int, default=1, metavar="N",
                   help="split the subjects into N parts, as nnUNetv2_predict -num_parts (sorted case ids, every "
                        "N-th); N jobs can share one OUT; assemble with --merge (default 1: one job, assembled)")
    c.add_argument("--part-id", type=int, default=0, metavar="K", help="the part this job censuses, 0..N-1 (default 0)")
    c.add_argument("--merge", type=Path, metavar="OUT",
                   help="assemble the cohort tables, summary.json and report.html of OUT from its finished "
                        "subjects (after every part); refused, naming them, while subjects are missing")
    s = p.add_argument_group("SLURM (write the scripts of a prediction + census job array instead of running)")
    s.add_argument("--emit-slurm", type=Path, metavar="SCRIPT_DIR",
                   help="write SCRIPT_DIR/census_array.sbatch (task K: nnUNetv2_predict -num_parts N -part_id K, "
                        "then census part K), census_merge.sbatch (--merge, after the array) and submit.sh; "
                        "-i is where the predictions go, --num-parts the number of tasks")
    s.add_argument("--model", type=Path, metavar="MODEL",
                   help="the nnU-Net trained-model folder nnUNetv2_predict uses "
                        "(nnUNet_results/Dataset<ID>_<Name>/TRAINER__PLANS__CONFIG)")
    s.add_argument("--folds", nargs="+", metavar="F", help="folds to predict with (default: the model's fold_* folders)")
    s.add_argument("--predict-args", metavar="ARGS", help="more nnUNetv2_predict options, one string "
                   "(e.g. '-device cpu -npp 2 -nps 2')")
    s.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per array task (default 1; 0 for CPU nodes)")
    s.add_argument("--slurm-partition", help="SLURM partition")
    s.add_argument("--slurm-account", help="SLURM account")
    s.add_argument("--slurm-time", default="24:00:00", help="time limit per job (default 24:00:00)")
    s.add_argument("--slurm-cpus", type=int, default=8, help="CPUs per task (default 8)")
    s.add_argument("--slurm-mem", help="memory per task, e.g. 32G")
    s.add_argument("--slurm-setup", action="append", default=[], metavar="CMD",
                   help="shell line run first in every job, e.g. 'module load cuda' (repeatable; default: "
                        "activate the current virtualenv)")


def _size_classes(text: str) -> tuple[float, ...]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--size-classes {text!r}: comma-separated numbers expected") from None
    if any(not v > 0 for v in vals) or vals != sorted(set(vals)):
        raise UserError(f"--size-classes {text!r}: edges must be positive and increasing")
    return tuple(vals)


# options of how and where a run goes, not of what it computes: left out of summary.json's "options", which
# must be the same for one run and for parts + merge (the --slurm-* ones too)
NOT_RESULT_OPTIONS = ("part_id", "num_parts", "num_processes", "merge", "emit_slurm", "model", "folds",
                      "predict_args", "command")


def _merge(out: Path) -> int:
    from nnunet_pvs.census import cohort

    manifest = cohort.read_manifest(out)
    summary = cohort.assemble(out, manifest)
    return _finish(out, summary, manifest)


def _finish(out: Path, summary: dict, manifest: dict) -> int:
    """The census line on stdout; with failures, one line on stderr and exit status 1."""
    thr, min_size = manifest["threshold"], manifest["min_size"]
    if thr["source"] != "default" and summary["kinds"] == ["binary"]:
        print("note: every prediction is a binary mask, so the threshold did not apply", file=sys.stderr)
    for what, items in (summary.get("left_out") or {}).items():
        print(f"left out (--allow-missing): {what} {', '.join(items)}", file=sys.stderr)
    for what, items in (summary.get("unused") or {}).items():
        print(f"note: {len(items)} {what} not used (listed in summary.json)", file=sys.stderr)
    if summary.get("other_subject_folders"):
        print(f"note: {len(summary['other_subject_folders'])} subject folder(s) in {out}/cases are not in this "
              "cohort (kept, not in the tables; listed in summary.json)", file=sys.stderr)
    qc = summary.get("qc")
    if qc:
        flagged = len(qc["flagged"])
        print(f"input check: {', '.join(f'{n} {v}' for v, n in qc['counts'].items())}"
              + (f"; {flagged} flagged subject(s) in report.html" if flagged else ""), file=sys.stderr)
    mins = manifest["result_options"]["min_size_mm3"]
    print(f"census of {summary['n_cases']} subject(s), {summary['n_clusters']} cluster(s) at p >= {thr['value']:g}"
          f" ({thr['source']})" + (f", clusters of at least {mins:g} mm3 ({min_size['source']})" if mins > 0 else "")
          + f"; results in {out}")
    failures = summary.get("failures") or []
    if failures:
        total = summary["n_cases"] + len(failures)
        print(f"nnunet-pvs census: {len(failures)} of {total} subject(s) failed; listed with the reason in "
              f"{Path(out) / 'failures.csv'}", file=sys.stderr)
        return 1
    return 0


def run(args) -> int:
    from nnunet_pvs import __version__, resume
    from nnunet_pvs.census import cohort, inputs, qc, report
    from nnunet_pvs.census.case import Options

    if args.merge is not None:
        if args.input is not None or args.output is not None or args.emit_slurm is not None:
            raise UserError("--merge OUT assembles a census folder on its own; give no -i, -o or --emit-slurm")
        return _merge(args.merge)
    if args.input is None or args.output is None:
        raise UserError("-i PRED and -o OUT are required (or --merge OUT)")
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
    resume.check_parts(args.num_parts, args.part_id)
    opts = Options(threshold=thr["value"], min_size_mm3=min_size["value"], connectivity=args.connectivity,
                   size_classes=_size_classes(args.size_classes), binary=args.binary,
                   geometry_tol=args.geometry_tol,
                   plots=not args.no_plots, mosaic_slices=args.mosaic_slices, label_maps=args.label_maps)
    if args.check_model is not None and args.images is None:
        raise UserError("--check-model needs --images: the check reads the scans (all channels the model expects)")
    if args.emit_slurm is not None:
        from nnunet_pvs.census import slurm

        report.check_output(args.output)
        slurm.write_scripts(args)
        return 0
    out = args.output
    report.check_output(out)
    if args.qc is not None:
        qc.read_file(args.qc)        # a broken QC file stops the run now, not after the last subject
    parts = args.num_parts > 1
    cases, left_out, unused = inputs.gather_cases(args.input, args.images, args.regions, args.allow_missing,
                                                  cohort_from_images=parts and args.images is not None)
    result_options = cohort.options_for_digest(opts, args.check_model)
    manifest = {
        "command": report.COMMAND, "version": __version__,
        "options_digest": resume.digest(result_options), "result_options": result_options,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    if not k.startswith(("_", "slurm_")) and k not in NOT_RESULT_OPTIONS},
        "inputs": {"predictions": str(args.input.resolve()),
                   "images": str(args.images.resolve()) if args.images else None,
                   "regions": str(args.regions.resolve()) if args.regions else None},
        "threshold": thr, "min_size": min_size,
        "cohort_from": "images" if parts and args.images is not None else "predictions",
        "cases": [c.case for c in cases], "left_out": left_out, "unused": unused,
        "qc": ({"file": str(args.qc.resolve())} if args.qc is not None else
               {"model": str(args.check_model.resolve())} if args.check_model is not None else None),
    }
    store = cohort.prepare_output(out, manifest)
    mine = set(resume.shard([c.case for c in cases], args.num_parts, args.part_id))
    share = [c for c in cases if c.case in mine]
    check = (args.images.resolve(), args.check_model.resolve()) if args.check_model is not None else None
    done, skipped, failed = cohort.run_subjects(share, args.regions, opts, store, check, args.num_processes)
    if skipped:
        print(f"resumed: {skipped} of {len(share)} subject(s) already done with the same inputs and options, "
              "skipped", file=sys.stderr)
    if min_size["source"] == "sweep":
        print(f"minimum cluster size from {min_size['sweep']}: {min_size['min_cluster_size_voxels']} voxel(s) "
              f"(best pooled cluster Dice {min_size['pooled_cluster_dice']:.3f} at p >= {thr['value']:g}; "
              f"{min_size['rule']}) -> --min-size-mm3 {min_size['value']:g}")
    if parts:
        print(f"census part {args.part_id} of {args.num_parts}: {len(share)} subject(s), {done} censused, "
              f"{skipped} skipped (already done), {len(failed)} failed; when every part has finished: "
              f"nnunet-pvs census --merge {out}")
        if failed:
            print(f"nnunet-pvs census: {len(failed)} of {len(share)} subject(s) of part {args.part_id} failed: "
                  f"{', '.join(list(failed)[:10])}{' ...' if len(failed) > 10 else ''} (reasons in the merge's "
                  "failures.csv)", file=sys.stderr)
            return 1
        return 0
    summary = cohort.assemble(out, manifest)
    return _finish(out, summary, manifest)
