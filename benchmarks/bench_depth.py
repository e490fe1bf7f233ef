"""Does depth matter? MfNS_De's default (DNANet, 5 levels) vs ``_lite`` vs ``_planDepth`` through ``compare``.

Everything runs through the commands a user types: ``nnunet-pvs phantom`` (T2w-like, ``--size
small``), ``nnUNetv2_plan_and_preprocess -c 2d``, ``nnUNetv2_train`` of the three ``*_budget``
variants on the same fold(s) with the same budget (``NNUNET_PVS_EPOCHS`` / ``_ITERATIONS``), and
``nnunet-pvs compare`` with the default trainer as the baseline (paired tests, convergence verdict
per model, training cost). The compare report is copied to ``benchmarks/results/depth_study/``.

    python benchmarks/bench_depth.py [--subjects 20] [--epochs 10] [--iterations 20] [--folds 0]

A CPU budget of a few minutes per training says which variant learns fastest, not which one is
best at nnU-Net's 1000 epochs; the report's convergence column says how far each one got.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATASET_ID = 963
TRAINERS = ["nnUNetTrainerMfNSDe_budget", "nnUNetTrainerMfNSDe_lite_budget", "nnUNetTrainerMfNSDe_planDepth_budget"]


def main() -> int:
    from common import BIN, run_logged, small_t2w_study  # same folder

    from nnunet_pvs.staging import replace_folder, staging_name

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=20, help="training iterations per epoch")
    ap.add_argument("--folds", type=int, nargs="+", default=[0])
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/nnunet_pvs_bench_depth"),
                    help="phantom, plans and trainings; kept, re-runs skip finished steps")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "depth_study")
    args = ap.parse_args()

    work = args.work_dir.resolve()
    env, logs, dataset = small_t2w_study(work, DATASET_ID, args.subjects, args.epochs, args.iterations,
                                         max(1, args.iterations // 10))
    seconds = {}
    for trainer in TRAINERS:
        for fold in args.folds:
            done = work / "nnUNet_results" / dataset.name / f"{trainer}__nnUNetPlans__2d" / f"fold_{fold}" / \
                "validation" / "summary.json"
            if done.exists():
                continue
            seconds[trainer, fold] = run_logged([BIN / "nnUNetv2_train", DATASET_ID, "2d", fold, "-tr", trainer,
                                           "-device", "cpu"], env, logs / f"train_{trainer}_{fold}.log")["wall_s"]
            print(f"{trainer} fold {fold}: {seconds[trainer, fold]:.0f} s", flush=True)
    report = work / "report"
    if report.exists():
        shutil.rmtree(report)
    run_logged([BIN / "nnunet-pvs", "compare", "-d", DATASET_ID, "--models", *(f"{t}:2d" for t in TRAINERS),
          "--baseline", f"{TRAINERS[0]}:2d", "--folds", *args.folds, "--regions", dataset / "regions",
          "--device", "cpu", "-o", report], env, logs / "compare.log")
    staged = staging_name(args.out)
    if staged.exists():
        shutil.rmtree(staged)
    shutil.copytree(report, staged)
    (staged / "RUN.md").write_text(
        f"`python benchmarks/bench_depth.py --subjects {args.subjects} --epochs {args.epochs} --iterations "
        f"{args.iterations} --folds {' '.join(map(str, args.folds))}`, CPU, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Wall seconds of each training (including "
        "nnU-Net's final validation), where this run trained it: "
        + (", ".join(f"{t} fold {f} {s:.0f}" for (t, f), s in seconds.items()) or "all reused") + ".\n")
    replace_folder(staged, args.out)
    print(f"report: {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
