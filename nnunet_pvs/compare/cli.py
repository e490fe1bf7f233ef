"""``nnunet-pvs compare``: head-to-head comparison of nnU-Net models on identical cases."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_pvs import metric_registry
from nnunet_pvs.compare.evaluate import add_evaluation_arguments, evaluation_options
from nnunet_pvs.compare.run import DEFAULT_FOLDS, CompareOptions, run_compare
from nnunet_pvs.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (e.g. 1 or Dataset001_PVS)")
    p.add_argument("--models", nargs="+", required=True, metavar="TRAINER:CONFIG[:PLANS][@CHECKPOINT]",
                   help="models to compare, e.g. nnUNetTrainerMfNSDe:2d@checkpoint_epoch50.pth nnUNetTrainer:3d_fullres "
                        "classical (plans default nnUNetPlans; @final, the default, uses nnU-Net's validation outputs, "
                        "another checkpoint of the fold folder is re-predicted). classical: the best of Frangi, Sato "
                        "and top-hat filters, with filter, scales and threshold tuned on each fold's training "
                        "subjects only; classical:sato (or classical:sato,tophat) restricts the suite; frangi = "
                        "classical:frangi")
    p.add_argument("--baseline", metavar="TRAINER:CONFIG[:PLANS][@CHECKPOINT]",
                   help="model the others are tested against (added to --models if absent; default: the first "
                        "stock nnU-Net model (nnUNetTrainer or a variant such as nnUNetTrainer_budget), else the "
                        "first network)")
    p.add_argument("--cv-protocol", "--protocol", dest="protocol", choices=("nnunet", "cai"), default="nnunet",
                   help="which cases each fold model scores: nnunet: its validation cases (default); cai: its test "
                        "group from `nnunet-pvs splits --protocol cai`, predicted by the model trained without it. "
                        "(--protocol is the older name; the challenges' counting rules are --eval-protocol)")
    p.add_argument("-o", "--output", required=True, type=Path, help="report folder (report.md, CSVs, PNGs)")
    p.add_argument("--folds", nargs="+", type=int, default=list(DEFAULT_FOLDS),
                   help="folds that must be complete (default 0 1 2 3 4)")
    p.add_argument("--test-set", metavar="IMAGES",
                   help="predict this images folder (absolute, or relative to nnUNet_raw/<dataset>, e.g. imagesTs) "
                        "with nnUNetv2_predict (ensemble of --folds) instead of using the cross-validation")
    p.add_argument("--labels", metavar="LABELS",
                   help="reference labels of --test-set (absolute or relative to nnUNet_raw/<dataset>; default labelsTs)")
    p.add_argument("--predictions-dir", type=Path,
                   help="where test-set predictions go, one subfolder per model, reused when complete "
                        "(default: <output>_predictions)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu", "mps"),
                   help="device for predictions (--test-set, @checkpoint models, --cv-protocol cai) (default cuda)")
    p.add_argument("--classical-ridges", "--frangi-ridges", dest="frangi_ridges", choices=("auto", "bright", "dark"),
                   default="auto", help="classical/frangi: look for bright (T2w: white top-hat) or dark (T1w: black "
                                        "top-hat) ridges; auto reads channel 0's name in dataset.json")
    p.add_argument("--classical-no-mask", "--frangi-no-mask", dest="frangi_no_mask", action="store_true",
                   help="classical/frangi: filter and threshold the whole image instead of a brain mask derived "
                        "from it")
    p.add_argument("--regions", type=Path,
                   help="per-case region maps (as for nnunet-pvs evaluate): adds region-wise tables and tests")
    p.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=26, help="cluster connectivity (default 26)")
    p.add_argument("--match", default="overlap",
                   help="cluster matching rule: overlap (default), iou:T (many-to-many, not VALDO), "
                        "one-to-one[:iou:T] (maximum matching on IoU)")
    p.add_argument("--eval-protocol", default="", metavar="NAMES",
                   help="also compute a PVS challenge's own rules as metric columns: valdo, epvs, shivai "
                        "(comma-separated; as `nnunet-pvs evaluate --protocol`)")
    p.add_argument("--metrics", default="", metavar="COLS",
                   help="extra per-case metric columns to tabulate and test against the baseline (comma-separated), "
                        "e.g. surface_dice,pq,lesion_dice,valdo_f1,detection_rate_le10; see docs/evaluation.md")
    add_evaluation_arguments(p)
    p.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples for the CIs (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--holm-family", choices=("metric", "all"), default="metric",
                   help="Holm correction over the models tested on one metric (default) or over all tests")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level after Holm (default 0.05)")
    p.add_argument("--geometry-tol", type=float, default=1e-3, help="spacing/affine tolerance in mm (default 1e-3)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="worker processes for evaluation (default 1)")
    s = p.add_argument_group("SLURM scale-out (write a submission script instead of comparing)")
    s.add_argument("--emit-slurm", type=Path, metavar="FILE",
                   help="write a script that submits one array task per (model, fold) running nnUNetv2_train, "
                        "an optional test-set prediction array, and a dependent job running this comparison")
    s.add_argument("--slurm-gpus", type=int, default=1,
                   help="GPUs per training task; >1 uses nnU-Net's DDP (nnUNetv2_train -num_gpus) (default 1)")
    s.add_argument("--slurm-partition", help="SLURM partition")
    s.add_argument("--slurm-account", help="SLURM account")
    s.add_argument("--slurm-time", default="72:00:00", help="time limit per training task (default 72:00:00)")
    s.add_argument("--slurm-cpus", type=int, default=8, help="CPUs per task (default 8)")
    s.add_argument("--slurm-mem", help="memory per task, e.g. 64G")
    s.add_argument("--slurm-pred-parts", type=int, default=1,
                   help="with --test-set: split each model's prediction into N array tasks "
                        "(nnUNetv2_predict -num_parts N -part_id K) (default 1)")
    s.add_argument("--slurm-setup", action="append", default=[], metavar="CMD",
                   help="shell line run first in every job, e.g. 'module load cuda' (repeatable; default: "
                        "activate the current virtualenv)")
    s.add_argument("--pretrained-weights", action="append", default=[], metavar="TRAINER:CONFIG=PATH",
                   help="nnUNetv2_train -pretrained_weights for one model (e.g. the autoencoder encoder)")


def metrics_with_direction(text: str) -> list[str]:
    """``--metrics`` as a list; a column whose direction the metric registry does not know is refused
    here, before any work, rather than guessed (a descriptive one is accepted: tabulated, not ranked)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if metric_registry.lookup(m) is None]
    if unknown:
        raise UserError(f"--metrics {','.join(unknown)}: not a known metric, so whether higher or lower is "
                        "better is unknown (the columns and their directions: docs/evaluation.md, "
                        "nnunet_pvs/metric_registry.py)")
    return names


def options_from_args(args) -> CompareOptions:
    extra_metrics = metrics_with_direction(args.metrics)
    evaluation = evaluation_options(argparse.Namespace(**{**vars(args), "protocol": args.eval_protocol}))
    return CompareOptions(
        evaluation=evaluation, extra_metrics=extra_metrics,
        dataset=args.dataset, models=args.models, output=args.output, baseline=args.baseline, folds=args.folds,
        test_set=args.test_set, labels=args.labels, regions=args.regions, predictions_dir=args.predictions_dir,
        device=args.device, connectivity=args.connectivity, match=args.match, n_boot=args.n_boot, seed=args.seed,
        holm_family=args.holm_family, alpha=args.alpha, num_processes=args.num_processes,
        plots=not args.no_plots, geometry_tol=args.geometry_tol, protocol=args.protocol,
        frangi_ridges=args.frangi_ridges, frangi_mask=not args.frangi_no_mask, emit_slurm=args.emit_slurm,
        slurm_gpus=args.slurm_gpus, slurm_partition=args.slurm_partition, slurm_account=args.slurm_account,
        slurm_time=args.slurm_time, slurm_cpus=args.slurm_cpus, slurm_mem=args.slurm_mem,
        slurm_pred_parts=args.slurm_pred_parts, slurm_setup=args.slurm_setup,
        pretrained_weights=args.pretrained_weights)


def run(args) -> int:
    run_compare(options_from_args(args))
    return 0
