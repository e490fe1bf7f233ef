"""Is the phantom learnable? Stock nnU-Net 2d at a CPU budget vs the classical filters, on held-out subjects.

Runs what a user types: ``nnunet-pvs phantom`` (T2w-like ``--size small``), ``nnUNetv2_plan_and_preprocess
-c 2d``, then ``nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainer_budget -p PLANS`` (stock nnU-Net; only
the number of epochs and iterations differs, from ``NNUNET_PVS_EPOCHS`` / ``_ITERATIONS``), and
scores the fold's validation predictions against every filter of ``bench_phantom_difficulty.py``
inside white matter + basal ganglia (oracle threshold on the held-out subjects, and a threshold
chosen on the fold's training subjects).

The stock plan's 2d batch (nnU-Net caps it at 5 % of the dataset's voxels) allows only a few
hundred iterations in 20 CPU minutes; ``--batch-size`` writes a copy of the plan with only
``batch_size`` changed (``nnUNetPlans_bs<N>``, as nnU-Net's plans documentation allows), which
reuses the stock preprocessed data. At a fixed CPU budget nnU-Net's smallest batch, 2, learns
fastest here (1,920 iterations and a first foreground prediction after 3 minutes; batch 6 allows 800
and needs 5-7 minutes for its first).

    python benchmarks/bench_phantom_learnability.py [--epochs 16] [--iterations 120] [--batch-size 2]

Writes ``benchmarks/results/phantom_learnability.md``, ``.csv`` and ``_errors.csv`` (the error breakdown).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
DATASET_ID = 964


def _first_number(text: str) -> float:
    """0.4259 from nnU-Net's log text ``[np.float32(0.4259)]`` (or ``[0.4259]``)."""
    return float(re.findall(r"\d+(?:\.\d+)?", text.replace("float32", ""))[0])


def _plans_copy(pre: Path, batch_size: int) -> str:
    """A copy of the stock plans with only the 2d batch size changed; returns its identifier."""
    from nnunet_pvs.plans_variant import write_plans_variant

    name = f"nnUNetPlans_bs{batch_size}"
    write_plans_variant(pre, name, {"2d": batch_size})
    return name


def main() -> int:
    from bench_phantom_difficulty import error_breakdown, network_vs_classical  # same folder
    from common import BIN, run_logged, small_t2w_study

    from nnunet_pvs.dataset_conversion.phantom import GENERATOR_VERSION  # small_t2w_study refuses any other
    from nnunet_pvs.staging import write_text_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=120, help="training iterations per epoch")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/nnunet_pvs_bench_learnability"),
                    help="phantom, plans and training; kept, re-runs skip finished steps")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "phantom_learnability")
    args = ap.parse_args()

    work = args.work_dir.resolve()
    env, logs, dataset = small_t2w_study(work, DATASET_ID, args.subjects, args.epochs, args.iterations,
                                         max(1, args.iterations // 25))
    pre = work / "nnUNet_preprocessed" / dataset.name
    plans = _plans_copy(pre, args.batch_size)
    trainer = "nnUNetTrainer_budget"
    fold_dir = work / "nnUNet_results" / dataset.name / f"{trainer}__{plans}__2d" / f"fold_{args.fold}"
    timing = logs / f"train_fold{args.fold}.seconds"
    if not (fold_dir / "validation" / "summary.json").exists():
        seconds = run_logged([BIN / "nnUNetv2_train", DATASET_ID, "2d", args.fold, "-tr", trainer, "-p", plans,
                        "-device", "cpu"], env, logs / "train.log")["wall_s"]
        write_text_atomic(timing, f"{seconds:.1f}\n")
        print(f"training + nnU-Net's final validation: {seconds:.0f} s", flush=True)
    seconds = float(timing.read_text()) if timing.exists() else None
    table = network_vs_classical(dataset, fold_dir / "validation")
    net = float(table.loc[table["method"] == "nnU-Net (validation)", "dice_wm_bg"].iloc[0])
    filters = table[~table["method"].str.startswith(("nnU-Net", "rater"))]
    user = filters[filters["method"].str.contains("training cases")]
    best_user = user.loc[user["dice_wm_bg"].idxmax()] if len(user) else filters.loc[filters["dice_wm_bg"].idxmax()]
    oracle = filters[filters["method"].str.contains("oracle")]
    best_oracle = oracle.loc[oracle["dice_wm_bg"].idxmax()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out.with_suffix(".csv"), table.to_csv(index=False, float_format="%.10g"))
    log = sorted(fold_dir.glob("training_log_*.txt"))
    pseudo = [f"{_first_number(line.split('Pseudo dice')[1]):.2f}"
              for line in log[-1].read_text().splitlines() if "Pseudo dice" in line] if log else []
    lines = [
        "# Is the phantom learnable? Stock nnU-Net 2d vs classical filters on held-out subjects", "",
        f"`python benchmarks/bench_phantom_learnability.py --subjects {args.subjects} --epochs {args.epochs} "
        f"--iterations {args.iterations} --batch-size {args.batch_size} --fold {args.fold}`, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPU cores, generator version "
        f"{GENERATOR_VERSION}, seed 0.", "",
        f"T2w-like `--size small`, {args.subjects} subjects, nnU-Net's default 5-fold split, fold {args.fold}. "
        f"`{trainer}` (stock nnU-Net): {args.epochs} epochs x {args.iterations} iterations, batch "
        f"{args.batch_size} (plans `{plans}`), `-device cpu`, `nnUNet_compile=f`, one augmentation worker. "
        + (f"Wall time of `nnUNetv2_train` including nnU-Net's final validation: {seconds / 60:.1f} min."
           if seconds else "Training time not recorded (trained by an older version of this script)."), "",
        "Pseudo Dice per epoch (nnU-Net's log): " + (", ".join(pseudo) if pseudo else "not found"), "",
        "| method (Dice inside WM + BG, mean over the fold's validation subjects) | Dice |", "|---|---|"]
    lines += [f"| {r.method} | {r.dice_wm_bg:.3f} |" for r in table.itertuples()]
    lines += ["", f"Margin of the network over the best filter a user can run ({best_user.method}): "
              f"**{net - best_user.dice_wm_bg:+.3f}**; over the best oracle filter ({best_oracle.method}): "
              f"{net - best_oracle.dice_wm_bg:+.3f}. Target: at least +0.10.", ""]
    if pd.notna(best_user.get("threshold")):
        errors = error_breakdown(dataset, fold_dir / "validation", best_user["filter"], float(best_user["threshold"]))
        write_text_atomic(args.out.with_name(args.out.name + "_errors.csv"),
                          errors.to_csv(index=False, float_format="%.10g"))
        cols = [c for c in errors.columns if c not in ("measure", "kind")]
        lines += ["## Where the network wins", "",
                  f"Unlabelled voxels each method marks, by what the phantom put there (first match in this "
                  f"order), and recall of labelled voxels by their signal-weighted PVS coverage; "
                  f"{best_user['filter']} at the threshold from the training cases.", "",
                  "| measure | kind | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        lines += [f"| {r[0]} | {r[1]} | " + " | ".join(f"{v:.0f}" if r[0].startswith("false") else f"{v:.2f}"
                                                   for v in r[2:]) + " |" for r in errors.itertuples(index=False)]
        lines.append("")
    write_text_atomic(args.out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
