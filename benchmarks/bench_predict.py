"""Prediction time per whole-brain subject through ``nnUNetv2_predict``: MfNS_De and the AE U-Net vs stock.

What a user waits for when segmenting a new scan: the stock ``nnUNetv2_predict`` command end to end
(process start, trainer lookup, preprocessing, sliding-window inference, resampling, export), on
whole-brain phantoms (``nnunet-pvs phantom --size full``), CPU, one fold, the same settings for
every model (``-device cpu -npp 1 -nps 1``, test-time mirroring off unless ``--tta``):

* T2w-like (0.69 x 0.69 x 2 mm): ``nnUNetTrainerMfNSDe_budget`` 2d vs ``nnUNetTrainer_budget`` 2d
  and 3d_fullres;
* T1w-like (1 mm): ``nnUNetTrainerAEUNet_budget`` 3d_fullres vs ``nnUNetTrainer_budget`` 3d_fullres.

Each model is trained for a token budget (1 epoch x 1 iteration) only to have a checkpoint:
prediction time does not depend on the weights. That training runs nnU-Net's own trainer
(``get_trainer_from_args`` + ``run_training``, what ``nnUNetv2_train`` calls) but stops before
``nnUNetv2_train``'s final validation, a whole-brain prediction with mirroring that costs more than
everything timed here. Models are predicted in alternating rounds
(A B C A B C ...) and each model's fastest round is kept, so load from other processes on a shared
machine does not favour one model. Writes ``benchmarks/results/predict_cpu.md``.

    python benchmarks/bench_predict.py [--subjects 1] [--rounds 1] [--work-dir DIR] [--tta]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BIN, HERE, nnunet_environment, run_logged, write_result  # noqa: E402


T2_ID, T1_ID = 961, 962
#: (dataset id, configuration, trainer, baseline key) per row; the baseline is the row it is divided by
MODELS = [
    (T2_ID, "2d", "nnUNetTrainerMfNSDe_budget"),
    (T2_ID, "2d", "nnUNetTrainer_budget"),
    (T2_ID, "3d_fullres", "nnUNetTrainer_budget"),
    (T1_ID, "3d_fullres", "nnUNetTrainerAEUNet_budget"),
    (T1_ID, "3d_fullres", "nnUNetTrainer_budget"),
]
RATIOS = [  # (model, baseline)
    ((T2_ID, "2d", "nnUNetTrainerMfNSDe_budget"), (T2_ID, "2d", "nnUNetTrainer_budget")),
    ((T2_ID, "2d", "nnUNetTrainerMfNSDe_budget"), (T2_ID, "3d_fullres", "nnUNetTrainer_budget")),
    ((T2_ID, "3d_fullres", "nnUNetTrainer_budget"), (T2_ID, "2d", "nnUNetTrainer_budget")),
    ((T1_ID, "3d_fullres", "nnUNetTrainerAEUNet_budget"), (T1_ID, "3d_fullres", "nnUNetTrainer_budget")),
]


#: nnUNetv2_train's steps up to checkpoint_final.pth, without its final validation (a fresh process:
#: nnU-Net reads its folders from the environment at import)
_TRAIN_WITHOUT_FINAL_VALIDATION = """
import sys, torch
from nnunetv2.run.run_training import get_trainer_from_args
trainer = get_trainer_from_args(sys.argv[1], sys.argv[2], 0, sys.argv[3], device=torch.device("cpu"))
trainer.run_training()
"""


def _dataset_folder(root: Path, dataset_id: int) -> Path:
    return next(root.glob(f"Dataset{dataset_id:03d}_*"))


def prepare(work: Path, env: dict, subjects: int, logs: Path) -> None:
    """Phantoms (CLI), plans and preprocessing (stock CLI), a one-train-one-validation split, checkpoints."""
    raw, pre = Path(env["nnUNet_raw"]), Path(env["nnUNet_preprocessed"])
    for dataset_id, contrast, configs in ((T2_ID, "T2w", ["2d", "3d_fullres"]), (T1_ID, "T1w", ["3d_fullres"])):
        if not list(raw.glob(f"Dataset{dataset_id:03d}_*")):
            run_logged([BIN / "nnunet-pvs", "phantom", "-d", dataset_id, "--contrast", contrast, "--size", "full",
                  "--subjects", 2, "--test", subjects, "-o", raw], env, logs / f"phantom_{dataset_id}.log")
        plans_file = pre / _dataset_folder(raw, dataset_id).name / "nnUNetPlans.json"
        if not plans_file.exists():
            run_logged([BIN / "nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", *configs, "-np", 1],
                 env, logs / f"plan_{dataset_id}.log")
        ds_pre = pre / _dataset_folder(raw, dataset_id).name
        cases = sorted(p.name[:-len(".nii.gz")] for p in (_dataset_folder(raw, dataset_id) / "labelsTr").glob("*.nii.gz"))
        (ds_pre / "splits_final.json").write_text(json.dumps([{"train": cases[:1], "val": cases[1:2]}]))
    results = Path(env["nnUNet_results"])
    for dataset_id, config, trainer in MODELS:
        fold = results / _dataset_folder(raw, dataset_id).name / f"{trainer}__nnUNetPlans__{config}" / "fold_0"
        if not (fold / "checkpoint_final.pth").exists():
            run_logged([sys.executable, "-c", _TRAIN_WITHOUT_FINAL_VALIDATION, dataset_id, config, trainer],
                 env, logs / f"train_{dataset_id}_{config}_{trainer}.log")


def predict_seconds(env: dict, model: tuple, out: Path, tta: bool, log: Path) -> float:
    dataset_id, config, trainer = model
    images = _dataset_folder(Path(env["nnUNet_raw"]), dataset_id) / "imagesTs"
    if out.exists():
        shutil.rmtree(out)
    return run_logged([BIN / "nnUNetv2_predict", "-i", images, "-o", out, "-d", dataset_id, "-c", config, "-tr", trainer,
                 "-f", 0, "-device", "cpu", "-npp", 1, "-nps", 1, *([] if tta else ["--disable_tta"])], env, log)["wall_s"]


def main() -> int:

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=1, help="test subjects predicted per call (default 1)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds per model; the fastest is kept")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/nnunet_pvs_bench_predict"),
                    help="phantoms, plans and checkpoints; kept between runs (re-runs skip finished steps)")
    ap.add_argument("--tta", action="store_true", help="keep nnU-Net's test-time mirroring (off by default)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()

    work = args.work_dir.resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = nnunet_environment(work)
    prepare(work, env, args.subjects, logs)
    best: dict[tuple, float] = {}
    for r in range(args.rounds):
        for model in MODELS:
            tag = "_".join(map(str, model))
            s = predict_seconds(env, model, work / "pred" / tag, args.tta, logs / f"predict_{tag}_r{r}.log")
            print(f"round {r}: {tag}: {s:.1f} s for {args.subjects} subject(s)", flush=True)
            best[model] = min(best.get(model, s), s)
    per_subject = {m: s / args.subjects for m, s in best.items()}
    raw = Path(env["nnUNet_raw"])
    shapes = {}
    for dataset_id in (T2_ID, T1_ID):
        import nibabel as nib

        first = sorted((_dataset_folder(raw, dataset_id) / "imagesTs").glob("*.nii.gz"))[0]
        img = nib.load(first)
        shapes[dataset_id] = (img.shape, tuple(round(float(z), 2) for z in img.header.get_zooms()))
    plans = {d: json.loads((Path(env["nnUNet_preprocessed"]) / _dataset_folder(raw, d).name / "nnUNetPlans.json")
                           .read_text()) for d in (T2_ID, T1_ID)}
    import torch

    lines = [
        "# Prediction time per whole-brain subject, `nnUNetv2_predict` on CPU", "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC with `benchmarks/bench_predict.py` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), "
        f"torch {torch.__version__}. Phantoms from `nnunet-pvs phantom --size full`: T2w-like "
        f"{shapes[T2_ID][0]} voxels at {shapes[T2_ID][1]} mm, T1w-like {shapes[T1_ID][0]} at {shapes[T1_ID][1]} mm. "
        f"One fold, `-device cpu -npp 1 -nps 1`, test-time mirroring {'on' if args.tta else 'off (`--disable_tta`)'}, "
        f"{args.subjects} subject(s) per call, fastest of {args.rounds} alternating round(s); the time is the whole "
        "command (start-up, preprocessing, sliding window, export), divided by the number of subjects.", "",
        "| dataset | configuration | trainer | patch | seconds / subject |", "|---|---|---|---|---|",
    ]
    for model in MODELS:
        dataset_id, config, trainer = model
        patch = plans[dataset_id]["configurations"][config]["patch_size"]
        lines.append(f"| {'T2w' if dataset_id == T2_ID else 'T1w'}-like | {config} | `{trainer}` | "
                     f"{' x '.join(map(str, patch))} | {per_subject[model]:.1f} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    for model, base in RATIOS:
        lines.append(f"| {model[2]} {model[1]} / {base[2]} {base[1]} ({'T2w' if model[0] == T2_ID else 'T1w'}) | "
                     f"{per_subject[model] / per_subject[base]:.2f}x |")
    lines.append("")
    write_result(args.out / "predict_cpu.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
