"""``nnunet-pvs census --emit-slurm SCRIPT_DIR``: prediction and census of a cohort as one SLURM job array.

Writes three files into SCRIPT_DIR (and ``logs/`` for the jobs' output):

* ``census_array.sbatch``: an array of ``--num-parts`` N tasks; task K runs stock
  ``nnUNetv2_predict -num_parts N -part_id K --continue_prediction --save_probabilities`` for the model
  folder given with ``--model``, then ``nnunet-pvs census ... --num-parts N --part-id K`` on what it
  predicted. nnU-Net and the census split the sorted case ids the same way (``K::N``), so each task
  censuses exactly the scans it predicted, without waiting for the other tasks. A census exit status
  of 1 (some subjects failed; each is recorded in OUT) does not fail the task, so one corrupt scan does
  not hold back the merge; anything else (a prediction that crashed, bad options) fails it.
* ``census_merge.sbatch``: ``nnunet-pvs census --merge OUT``, which assembles the cohort tables,
  summary and report from the finished subjects.
* ``submit.sh``: ``sbatch`` of the array, then of the merge with ``--dependency=afterok:`` on the array.

Re-submitting is safe: nnU-Net continues its predictions and the census skips subjects already done
with the same inputs and options. The sbatch options (partition, account, time, CPUs, GPUs, memory,
setup lines, the virtualenv activated in every job) are built as ``compare --emit-slurm`` builds them
(nnunet_pvs.compare.slurm), and every job exports the nnU-Net folders in use when the script was made.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from nnunet_pvs.compare.slurm import shell_quote, sbatch_options, environment_setup_lines
from nnunet_pvs.errors import UserError
from nnunet_pvs.staging import write_text_atomic

ARRAY, MERGE, SUBMIT = "census_array.sbatch", "census_merge.sbatch", "submit.sh"


def model_parts(model: Path) -> dict:
    """Dataset, trainer, plans and configuration of an nnU-Net trained-model folder
    (``nnUNet_results/Dataset<ID>_<Name>/TRAINER__PLANS__CONFIG``) and its ``nnUNet_results``."""
    model = Path(model).expanduser().resolve()
    if not model.is_dir():
        raise UserError(f"{model}: --model folder does not exist (an nnU-Net trained-model folder, "
                        "nnUNet_results/Dataset<ID>_<Name>/TRAINER__PLANS__CONFIG)")
    parts = model.name.split("__")
    if len(parts) != 3 or not all(parts) or not re.fullmatch(r"Dataset\d{3}_.+", model.parent.name):
        raise UserError(f"{model}: not an nnU-Net trained-model folder; expected "
                        "nnUNet_results/Dataset<ID>_<Name>/TRAINER__PLANS__CONFIG")
    folds = sorted((p.name[len("fold_"):] for p in model.glob("fold_*") if p.is_dir()),
                   key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))
    return {"dataset": model.parent.name, "trainer": parts[0], "plans": parts[1], "config": parts[2],
            "results": model.parent.parent, "folds": folds, "folder": model}


def census_argv(args, out: Path) -> list[str]:
    """The census command of the arguments given, paths absolute, without the SLURM options."""
    def ab(p):
        return str(Path(p).expanduser().resolve())

    argv = ["nnunet-pvs", "census", "-i", ab(args.input), "-o", ab(out), "--images", ab(args.images)]
    if args.regions is not None:
        argv += ["--regions", ab(args.regions)]
    if args.threshold is not None:
        argv += ["--threshold", repr(float(args.threshold))]
    if args.threshold_from is not None:
        argv += ["--threshold-from", ab(args.threshold_from)]
    if args.min_size_mm3 is not None:
        argv += ["--min-size-mm3", repr(float(args.min_size_mm3))]
    argv += ["--size-classes", args.size_classes, "--connectivity", str(args.connectivity),
             "--mosaic-slices", str(args.mosaic_slices), "--geometry-tol", repr(float(args.geometry_tol)),
             "-np", str(args.num_processes)]
    for flag, on in (("--binary", args.binary), ("--allow-missing", args.allow_missing),
                     ("--no-plots", args.no_plots), ("--label-maps", args.label_maps)):
        if on:
            argv.append(flag)
    if args.qc is not None:
        argv += ["--qc", ab(args.qc)]
    if args.check_model is not None:
        argv += ["--check-model", ab(args.check_model)]
    return argv


def predict_argv(m: dict, images: Path, pred: Path, parts: int, folds: list[str], extra: list[str]) -> list[str]:
    return ["nnUNetv2_predict", "-i", str(images), "-o", str(pred), "-d", m["dataset"], "-c", m["config"],
            "-tr", m["trainer"], "-p", m["plans"], "-f", *folds, "--save_probabilities", "--continue_prediction",
            "-num_parts", str(parts), *extra]


def write_scripts(args) -> Path:
    """The three files of SCRIPT_DIR (see the module docstring); returns the submission script."""
    if args.model is None:
        raise UserError("--emit-slurm needs --model MODEL, the nnU-Net trained-model folder nnUNetv2_predict "
                        "uses (nnUNet_results/Dataset<ID>_<Name>/TRAINER__PLANS__CONFIG)")
    if args.images is None:
        raise UserError("--emit-slurm needs --images: the scans nnUNetv2_predict reads (CASE_0000.nii.gz, ...)")
    if args.part_id != 0:
        raise UserError("--part-id is chosen by each array task; give --num-parts N (the number of tasks) only")
    if args.slurm_gpus < 0 or args.slurm_cpus < 1:
        raise UserError("--slurm-gpus must be >= 0 and --slurm-cpus >= 1")
    m = model_parts(args.model)
    folds = [str(f) for f in args.folds] if args.folds else m["folds"]
    if not folds:
        raise UserError(f"{m['folder']}: no fold_* folder; give the folds to predict with --folds")
    images = Path(args.images).expanduser().resolve()
    pred = Path(args.input).expanduser().resolve()
    out = Path(args.output).expanduser().resolve()
    script_dir = Path(args.emit_slurm).expanduser().resolve()
    if script_dir.exists() and not script_dir.is_dir():
        raise UserError(f"{script_dir}: --emit-slurm is a file; give a folder for the scripts")
    log_dir = script_dir / "logs"
    n = args.num_parts
    try:
        extra = shlex.split(args.predict_args or "")
    except ValueError as e:
        raise UserError(f"--predict-args {args.predict_args!r}: {e}") from None
    reserved = {"-i", "-o", "-d", "-c", "-tr", "-p", "-f", "-num_parts", "-part_id"} & set(extra)
    if reserved:
        raise UserError(f"--predict-args: {', '.join(sorted(reserved))} are set by the census from --images, -i, "
                        "--model, --folds and --num-parts")

    exports = {"nnUNet_results": str(m["results"])}
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        if os.environ.get(var):
            exports[var] = str(Path(os.environ[var]).resolve())
    env_lines = [*environment_setup_lines(args), 'eval "$(nnunet-pvs env)"', *(f"export {k}={shell_quote(v)}" for k, v in exports.items())]

    def job(name: str, tasks: int | None, gpus: int, body: list[str]) -> list[str]:
        # sbatch reads #SBATCH lines only before the first command, so they come right after the shebang
        opts = sbatch_options(args, name, tasks, gpus, log_dir, args.slurm_time)
        return ["#!/usr/bin/env bash", *(f"#SBATCH {o}" for o in opts), "set -euo pipefail", *body]

    census = shlex.join(census_argv(args, out))
    task = [
        'K="$SLURM_ARRAY_TASK_ID"',
        shlex.join(predict_argv(m, images, pred, n, folds, extra)) + ' -part_id "$K"',
        "status=0",
        f'{census} --num-parts {n} --part-id "$K" || status=$?',
        "# 1: some subjects failed; each is recorded in the output folder and listed by the merge",
        'if [ "$status" -ne 0 ] && [ "$status" -ne 1 ]; then exit "$status"; fi',
    ]
    array = job("pvs_census", n, args.slurm_gpus, [
        f"# Generated by nnunet-pvs census --emit-slurm: task K of {n} predicts and censuses every {n}-th scan.",
        *env_lines, *task])
    merge = job("pvs_census_merge", None, 0, [
        "# Generated by nnunet-pvs census --emit-slurm: the cohort tables from the finished subjects.",
        *env_lines, shlex.join(["nnunet-pvs", "census", "--merge", str(out)])])
    submit = [
        "#!/usr/bin/env bash",
        f"# Generated by nnunet-pvs census --emit-slurm for the scans in {images}.",
        f"# {n} array task(s) of nnUNetv2_predict + census, then the merge. Submit from a login node:",
        f"#   bash {shell_quote(script_dir / SUBMIT)}",
        "# Re-submitting is safe: predictions are continued, finished subjects are skipped.",
        "set -euo pipefail",
        f"mkdir -p {shell_quote(log_dir)}",
        f"ARRAY_ID=$(sbatch --parsable {shell_quote(script_dir / ARRAY)})",
        'ARRAY_ID="${ARRAY_ID%%;*}"  # --parsable may append ";cluster"',
        f'MERGE_ID=$(sbatch --parsable --dependency=afterok:"$ARRAY_ID" {shell_quote(script_dir / MERGE)})',
        'MERGE_ID="${MERGE_ID%%;*}"',
        'echo "submitted the census array $ARRAY_ID and the merge $MERGE_ID"',
        f'echo "report when done: {out}/report.html"',
    ]
    script_dir.mkdir(parents=True, exist_ok=True)
    for name, lines, mode in ((ARRAY, array, 0o644), (MERGE, merge, 0o644), (SUBMIT, submit, 0o755)):
        write_text_atomic(script_dir / name, "\n".join(lines) + "\n", mode=mode)
    print(f"wrote {script_dir}: {n} array task(s) (nnUNetv2_predict + census part), 1 merge job; "
          f"submit with: bash {script_dir / SUBMIT}")
    return script_dir / SUBMIT
