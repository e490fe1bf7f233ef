"""``nnunet-pvs compare --emit-slurm FILE``: a submission script for a SLURM cluster.

Running ``bash FILE`` on a login node submits, with ``sbatch``:

1. a job array with one task per (model, fold) running stock ``nnUNetv2_train DATASET CONFIG FOLD
   -tr TRAINER -p PLANS -num_gpus N --c`` (``-num_gpus`` > 1 is nnU-Net's own DDP; ``--c`` resumes
   a fold after a requeue or time-out);
2. with ``--test-set``, a prediction array depending on it, one task per (model, part) running
   ``nnUNetv2_predict ... -num_parts P -part_id K``;
3. a final job, ``--dependency=afterok:`` on the last array, running the same ``nnunet-pvs
   compare`` command (without ``--emit-slurm``), which then finds every fold complete.

Every job exports the nnU-Net folders and the ``NNUNET_PVS_*`` budget variables that were set when
the script was made, so the ``_budget`` trainers of every task (and of every ``--c`` requeue) get
the same budget; they also record it with each fold.

Each job script is fed to ``sbatch`` on stdin through a quoted here-document, so nothing in it is
expanded at submission time; ``$SLURM_ARRAY_TASK_ID`` selects the task's command at run time.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from nnunet_pvs.errors import UserError
from nnunet_pvs.compare import gather as g
from nnunet_pvs.staging import write_text_atomic


def shell_quote(x) -> str:
    return shlex.quote(str(x))


def sbatch_options(opts, job_name: str, n_tasks: int | None, gpus: int, log_dir: Path, time: str) -> list[str]:
    # nnU-Net's DDP (-num_gpus) runs on one node
    out = [f"--job-name={job_name}", "--nodes=1", f"--cpus-per-task={opts.slurm_cpus}", f"--time={time}"]
    if n_tasks is not None:
        out.append(f"--array=0-{n_tasks - 1}")
        out.append(f"--output={log_dir}/{job_name}_%A_%a.out")
    else:
        out.append(f"--output={log_dir}/{job_name}_%j.out")
    if gpus:
        out.append(f"--gres=gpu:{gpus}")
    for flag, val in (("--partition", opts.slurm_partition), ("--account", opts.slurm_account),
                      ("--mem", opts.slurm_mem)):
        if val:
            out.append(f"{flag}={val}")
    return out


def _pretrained(opts, specs) -> dict[g.ModelSpec, str]:
    out = {}
    for item in opts.pretrained_weights:
        if "=" not in item:
            raise UserError(f"--pretrained-weights {item!r}: expected TRAINER:CONFIG=PATH")
        spec_text, path = item.split("=", 1)
        spec = g.ModelSpec.parse(spec_text)
        if spec not in specs:
            raise UserError(f"--pretrained-weights {spec.label}: not one of the models "
                            f"({', '.join(s.label for s in specs)})")
        out[spec] = str(Path(path).expanduser().resolve())
    return out


def environment_setup_lines(opts) -> list[str]:
    if opts.slurm_setup:
        return list(opts.slurm_setup)
    if sys.prefix != sys.base_prefix and (Path(sys.prefix) / "bin" / "activate").is_file():
        return [f"source {shell_quote(Path(sys.prefix) / 'bin' / 'activate')}"]
    return [f"export PATH={shell_quote(Path(sys.executable).parent)}:\"$PATH\""]


def _job(header: list[str], body: list[str]) -> list[str]:
    return ["#!/usr/bin/env bash", "set -euo pipefail", *header, *body]


def _case_block(commands: list[list[str]]) -> list[str]:
    lines = ['case "$SLURM_ARRAY_TASK_ID" in']
    for i, cmd in enumerate(commands):
        lines.append(f"  {i}) {shlex.join(cmd)} ;;")
    lines.append('  *) echo "no task $SLURM_ARRAY_TASK_ID in this array" >&2; exit 1 ;;')
    lines.append("esac")
    return lines


def train_commands(dataset: str, specs, folds, gpus: int, pretrained: dict) -> list[list[str]]:
    cmds = []
    for s in specs:
        for f in folds:
            c = ["nnUNetv2_train", dataset, s.config, str(f), "-tr", s.trainer, "-p", s.plans, "-num_gpus", str(gpus)]
            # nnU-Net refuses --c together with -pretrained_weights
            c += ["-pretrained_weights", pretrained[s]] if s in pretrained else ["--c"]
            cmds.append(c)
    return cmds


def predict_commands(dataset: str, specs, folds, images: Path, pred_root: Path, parts: int) -> list[list[str]]:
    cmds = []
    for s in specs:
        for k in range(parts):
            cmds.append(["nnUNetv2_predict", "-i", str(images), "-o", str(pred_root / s.folder_name), "-d", dataset,
                         "-c", s.config, "-tr", s.trainer, "-p", s.plans, "-f", *map(str, folds),
                         "-num_parts", str(parts), "-part_id", str(k), "--continue_prediction"])
    return cmds


def budget_exports() -> dict[str, str]:
    """The ``NNUNET_PVS_*`` budget variables set now (validated), to export in every job."""
    from nnunet_pvs.trainers.budget import BUDGET_VARIABLES

    out = {}
    for var in BUDGET_VARIABLES:
        raw = os.environ.get(var, "")
        if raw == "":
            continue
        if not raw.isdigit() or int(raw) < 1:
            raise UserError(f"{var}={raw!r}: must be a positive integer (it is exported to every training task)")
        out[var] = str(int(raw))
    return out


def write_slurm_script(opts, specs: list[g.ModelSpec], base: g.ModelSpec) -> Path:
    if opts.slurm_gpus < 1:
        raise UserError(f"--slurm-gpus must be >= 1, got {opts.slurm_gpus}")
    if opts.slurm_pred_parts < 1:
        raise UserError(f"--slurm-pred-parts must be >= 1, got {opts.slurm_pred_parts}")
    folders = {v: g.env_dir(v).resolve() for v in g.NNUNET_DIRS}
    dataset = g.resolve_dataset(opts.dataset)
    pretrained = _pretrained(opts, specs)
    script = Path(opts.emit_slurm).expanduser().resolve()
    log_dir = script.parent / f"{script.stem}_logs"
    output = Path(opts.output).expanduser().resolve()
    folds = list(opts.folds)

    exports = [f"export {k}={shell_quote(v)}" for k, v in folders.items()]
    budget = budget_exports()
    exports += [f"export {k}={shell_quote(v)}" for k, v in budget.items()]
    env_lines = [*environment_setup_lines(opts), 'eval "$(nnunet-pvs env)"', *exports]

    train = train_commands(dataset, specs, folds, opts.slurm_gpus, pretrained)
    lines = ["#!/usr/bin/env bash",
             f"# Generated by nnunet-pvs compare --emit-slurm for {dataset}.",
             f"# {len(specs)} model(s) x {len(folds)} fold(s) = {len(train)} training task(s), then the comparison.",
             f"# Submit from a login node:  bash {shell_quote(script)}",
             "# Re-submitting is safe: training tasks resume their fold (--c), predictions are continued.",
             "# Budget of the _budget trainers: " + (", ".join(f"{k}={v}" for k, v in budget.items()) if budget
                                                      else "none set (their defaults, 1000 epochs x 250 iterations)"),
             "set -euo pipefail", "", *exports, f"LOG_DIR={shell_quote(log_dir)}", 'mkdir -p "$LOG_DIR"', ""]

    def submit(var: str, sb_opts: list[str], job_lines: list[str], after: str | None = None) -> None:
        dep = f' --dependency=afterok:"${after}"' if after else ""
        lines.append(f"{var}=$(sbatch --parsable {' '.join(map(shell_quote, sb_opts))}{dep} <<'NNUNET_PVS_JOB'")
        lines.extend(job_lines)
        lines.append("NNUNET_PVS_JOB")
        lines.append(")")
        lines.append(f'{var}="${{{var}%%;*}}"  # --parsable may append ";cluster"')
        lines.append(f'echo "submitted {var}=${var}"')
        lines.append("")

    submit("TRAIN_ID", sbatch_options(opts, "pvs_train", len(train), opts.slurm_gpus, log_dir, opts.slurm_time),
           _job(env_lines, _case_block(train)))
    last = "TRAIN_ID"
    compare_opts = opts
    if opts.test_set is not None:
        images = g.dataset_relative(opts.test_set, dataset)
        if not images.is_absolute():
            images = folders["nnUNet_raw"] / dataset / images
        pred_root = (opts.predictions_dir or output.parent / f"{output.name}_predictions")
        pred_root = Path(pred_root).expanduser().resolve()
        pred = predict_commands(dataset, specs, folds, images.resolve(), pred_root, opts.slurm_pred_parts)
        sb = sbatch_options(opts, "pvs_predict", len(pred), 1, log_dir, opts.slurm_time)
        submit("PRED_ID", sb, _job(env_lines, _case_block(pred)), after="TRAIN_ID")
        last = "PRED_ID"
        compare_opts = replace(opts, predictions_dir=pred_root)
    compare_opts = replace(compare_opts, output=output,
                           regions=Path(opts.regions).resolve() if opts.regions is not None else None)
    sb = sbatch_options(opts, "pvs_compare", None, 0, log_dir, "04:00:00")
    submit("COMPARE_ID", sb, _job(env_lines, [shlex.join(compare_opts.compare_argv())]), after=last)
    lines.append(f'echo "report when done: {output}/report.md"')
    text = "\n".join(lines) + "\n"

    script.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(script, text, mode=0o755)
    print(f"wrote {script}: {len(train)} training task(s)"
          + (f", {opts.slurm_pred_parts * len(specs)} prediction task(s)" if opts.test_set is not None else "")
          + f", 1 comparison job; submit with: bash {script}")
    return script
