"""``nnunet-pvs demo``: the whole project on the bundled synthetic PVS data, through the real commands.

Stages (each prints the command it runs and logs its output under ``WORK/logs``):

1. ``nnunet-pvs phantom``: a T2w-like dataset (0.69 x 0.69 x 2 mm, for MfNS_De) with held-out test
   subjects (with ``--with-3d``, also a T1w-like one, 1 mm, with unlabelled scans for the autoencoder);
2. ``nnUNetv2_plan_and_preprocess`` for the configurations the models need, and on a CPU a copy of
   the plans with stock nnU-Net 2d at batch 2 (``nnunet_pvs.plans_variant``);
3. ``nnunet-pvs splits``: 5 folds, age-balanced for T2w (Cai et al.), PVS-load-balanced for T1w
   (Boutinaud et al.);
4. (``--with-3d``) ``nnunet-pvs pretrain-autoencoder`` on the unlabelled T1w scans;
5. ``nnUNetv2_train`` of every model on the same fold with the same number of iterations: MfNS_De (2d,
   batch 4 as the paper) and stock nnU-Net 2d on T2w; with ``--with-3d`` also stock 3d_fullres on T2w,
   and the autoencoder U-Net (pretrained encoder) and stock 3d_fullres on T1w;
6. ``nnunet-pvs compare`` of the cross-validation predictions, one report per dataset, with the
   classical suite (the best of Frangi, Sato and top-hat, with filter, scales and threshold tuned on
   each fold's training subjects) as the classical row;
7. ``nnUNetv2_predict`` of the T2w test subjects with MfNS_De and ``nnunet-pvs census`` of them:
   what a user does with new scans.

Why the default is 2D only on a CPU: the demo should teach, so its time goes where models learn. On 2
CPU cores the 3D models (stock 3d_fullres, the AE U-Net) predict background only after the few hundred
iterations 20 minutes allow (earlier demo runs: Dice 0.000 and 0.021), and stock nnU-Net 2d at its
planned batch did too; at batch 2 it learns the phantom within minutes
(benchmarks/results/phantom_learnability.md). ``--with-3d`` adds the 3D half and says what it costs.

Device: CUDA when PyTorch sees a GPU (``--device`` overrides), with a budget sized for about 20 minutes
on one current GPU, assuming nnU-Net's reported A100 speed (about 40-51 s per 250 iterations, 2d and
3d_fullres): the small phantom, both halves, 20 epochs x 100 iterations per model.

The nnU-Net folders live inside the work folder, never the user's own. Re-running resumes:
finished stages are skipped (a stage is finished when its marker or nnU-Net's
``checkpoint_final.pth`` exists). ``--full`` runs the papers' protocol (1000 epochs x 250 iterations,
five folds, whole-brain phantom, MfNS_De scored at epoch 50 and the AE U-Net at its lowest validation
loss) and wants a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nnunet_pvs.errors import UserError

T2W_ID, T1W_ID = 901, 902
T2W_NAME, T1W_NAME = "PVSPhantomT2w", "PVSPhantomT1w"
DATASET_NAMES = {T2W_ID: T2W_NAME, T1W_ID: T1W_NAME}


def default_device() -> str:
    """``cuda`` when PyTorch sees a GPU, else ``cpu`` (the demo's default device)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class DemoSettings:
    """Everything that determines the demo's results; stored in the work folder to make resuming safe."""

    # default: at most 20 minutes on 2 CPU cores. nnU-Net's per-run start-up and validation cost
    # the same whatever the budget, so one fold trained longer says more than five folds that
    # learn nothing.
    size: str = "tiny"
    subjects: int = 20
    test: int = 3
    unlabeled: int = 8
    folds: list[int] = field(default_factory=lambda: [0])
    epochs: int | None = 16
    iterations: int | None = 25
    val_iterations: int | None = 4
    ae_epochs: int = 3
    ae_iterations: int = 20
    device: str = "cpu"
    seed: int = 0
    full: bool = False
    with_3d: bool = False             # the 3D half: stock 3d_fullres on T2w, the T1w dataset and its models
    stock_2d_batch: int | None = 2    # stock nnU-Net 2d batch size (None: the plan's)

    @property
    def stock_2d_plans(self) -> str:
        return f"nnUNetPlans_bs{self.stock_2d_batch}" if self.stock_2d_batch else "nnUNetPlans"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DemoSettings":
        device = args.device or default_device()
        s = cls()
        if device == "cuda":  # about 20 minutes on one current GPU (module docstring)
            s = cls(size="small", epochs=20, iterations=100, val_iterations=10, ae_epochs=10, ae_iterations=100,
                    device="cuda", with_3d=True, stock_2d_batch=None)
        if args.tiny:
            s = cls(size="tiny", subjects=6, test=1, unlabeled=3, folds=[0], epochs=2, iterations=2, val_iterations=1,
                    ae_epochs=1, ae_iterations=2, device=device)
        if args.full:
            s = cls(size="full", subjects=20, test=5, unlabeled=20, folds=[0, 1, 2, 3, 4], epochs=None,
                    iterations=None, val_iterations=None, ae_epochs=100, ae_iterations=250, device="cuda", full=True,
                    with_3d=True, stock_2d_batch=None)
        if args.with_3d:
            s.with_3d = True
        if args.stock_batch is not None:
            s.stock_2d_batch = args.stock_batch or None
        for key in ("size", "subjects", "test", "unlabeled", "folds", "epochs", "iterations", "device", "seed"):
            if getattr(args, key, None) is not None:
                setattr(s, key, getattr(args, key))
        if args.epochs is not None:
            s.ae_epochs = args.epochs
        if args.iterations is not None:
            s.ae_iterations = args.iterations
        if len(s.folds) < 1 or any(f not in range(5) for f in s.folds):
            raise UserError(f"--folds {s.folds}: folds are 0..4")
        return s

    def trainer(self, name: str) -> str:
        """Paper-budget trainer name with --full, else its ``_budget`` variant (budget from NNUNET_PVS_*)."""
        return name if self.full else f"{name}_budget"

    def checkpoint(self, base_trainer: str) -> str:
        """Checkpoint each model is scored at: the papers' choices with --full, else the last epoch."""
        if not self.full:
            return ""
        return {"nnUNetTrainerMfNSDe": "@checkpoint_epoch50.pth",
                "nnUNetTrainerAEUNet": "@checkpoint_best_loss.pth"}.get(base_trainer, "")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work-dir", type=Path, default=Path("nnunet_pvs_demo"),
                   help="folder for data, nnU-Net folders, logs and reports (default ./nnunet_pvs_demo)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true",
                      help="CI scale: tiny crops, 6 subjects per dataset (+1 test, 3 unlabelled), fold 0 only, "
                           "2 epochs x 2 iterations (1 validation iteration) per model, autoencoder 1 x 2")
    mode.add_argument("--full", action="store_true",
                      help="the papers' budgets (1000 epochs, 5 folds, whole-brain phantom) on a GPU")
    p.add_argument("--folds", type=int, nargs="+", help="folds to train (default 0; --full: 0 1 2 3 4)")
    p.add_argument("--epochs", type=int,
                   help="epochs per model, autoencoder included (default 10, the fewest the convergence rule "
                        "judges; autoencoder 3)")
    p.add_argument("--iterations", type=int, help="iterations per epoch (default 20; autoencoder 20)")
    p.add_argument("--subjects", type=int, help="labelled subjects per dataset (default 20)")
    p.add_argument("--test", type=int, help="held-out test subjects per dataset, for the census (default 3)")
    p.add_argument("--unlabeled", type=int, help="unlabelled T1w scans for the autoencoder (default 8)")
    p.add_argument("--size", choices=("tiny", "small", "full"), help="phantom size (default tiny: crops of the basal ganglia and corona radiata)")
    p.add_argument("--device", choices=("cpu", "cuda", "mps"),
                   help="training device (default: cuda when PyTorch sees a GPU, else cpu; --full: cuda)")
    p.add_argument("--with-3d", action="store_true",
                   help="also the 3D half: stock 3d_fullres on T2w, and on a T1w-like dataset the autoencoder "
                        "pretraining, the AE U-Net and stock 3d_fullres (default on a GPU; on 2 CPU cores it "
                        "adds about 10 minutes and at the CPU budget the 3D models do not learn yet)")
    p.add_argument("--stock-batch", type=int, metavar="B",
                   help="batch size of stock nnU-Net 2d (default 2 on a CPU, at which it learns the phantom within "
                        "the budget; 0 = the plan's; the GPU and --full default)")
    p.add_argument("--seed", type=int, help="phantom seed (default 0)")
    p.add_argument("--restart", action="store_true",
                   help="delete the work folder first (only a demo's own: any other folder is refused)")


class Demo:
    def __init__(self, work: Path, settings: DemoSettings):
        self.work, self.s = work.resolve(), settings
        self.raw, self.pre, self.res = self.work / "nnUNet_raw", self.work / "nnUNet_preprocessed", self.work / "nnUNet_results"
        self.logs, self.state = self.work / "logs", self.work / ".stages"
        self.bin = Path(sys.executable).parent
        self.t0 = time.time()

    # ---------------------------------------------------------------- plumbing
    def env(self) -> dict:
        from nnunet_pvs.plugin_env import ext_trainer_value
        from nnunet_pvs.trainers.budget import BUDGET_VARIABLES

        env = dict(os.environ)
        env.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.pre), nnUNet_results=str(self.res),
                   nnUNet_extTrainer=ext_trainer_value(os.environ.get("nnUNet_extTrainer", "")),
                   PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}")
        env.setdefault("nnUNet_n_proc_DA", "1" if self.s.device == "cpu" else "8")
        env.setdefault("nnUNet_def_n_proc", "1" if self.s.device == "cpu" else "4")
        if self.s.device == "cpu":
            env.setdefault("nnUNet_compile", "f")
        for var in BUDGET_VARIABLES:
            env.pop(var, None)
        if not self.s.full:
            env.update(NNUNET_PVS_EPOCHS=str(self.s.epochs), NNUNET_PVS_ITERATIONS=str(self.s.iterations),
                       NNUNET_PVS_VAL_ITERATIONS=str(self.s.val_iterations))
        return env

    def log(self, msg: str) -> None:
        line = f"[demo {time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        with open(self.work / "demo.log", "a") as f:
            f.write(line + "\n")

    def run(self, name: str, cmd: list, log_name: str) -> None:
        cmd = [str(c) for c in cmd]
        self.log(f"{name}: $ {shlex.join(cmd)}")
        log_file = self.logs / f"{log_name}.log"
        t = time.time()
        with open(log_file, "w") as f:
            proc = subprocess.run(cmd, env=self.env(), stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = log_file.read_text(errors="replace").splitlines()[-25:]
            raise UserError(f"stage '{name}' failed (exit {proc.returncode}); last lines of {log_file}:\n"
                            + "\n".join(tail))
        self.log(f"{name}: done in {time.time() - t:.1f} s (log: {log_file})")

    def stage(self, key: str, title: str, commands: list[tuple[list, str]]) -> None:
        marker = self.state / f"{key}.done"
        if marker.exists():
            self.log(f"{title}: already done, skipped")
            return
        for cmd, log_name in commands:
            self.run(title, cmd, log_name)
        marker.write_text(time.strftime("%Y-%m-%d %H:%M:%S"))

    @staticmethod
    def dataset_folder(dataset_id: int) -> str:
        return f"Dataset{dataset_id:03d}_{DATASET_NAMES[dataset_id]}"

    def dataset_dir(self, dataset_id: int) -> Path:
        return self.raw / self.dataset_folder(dataset_id)

    # ---------------------------------------------------------------- models
    def models(self) -> list[dict]:
        t, c = self.s.trainer, self.s.checkpoint
        plans = "nnUNetPlans"
        models = [
            {"dataset": T2W_ID, "trainer": t("nnUNetTrainerMfNSDe"), "config": "2d", "plans": plans,
             "at": c("nnUNetTrainerMfNSDe")},
            {"dataset": T2W_ID, "trainer": t("nnUNetTrainer"), "config": "2d", "plans": self.s.stock_2d_plans, "at": ""},
        ]
        if self.s.with_3d:
            models += [
                {"dataset": T2W_ID, "trainer": t("nnUNetTrainer"), "config": "3d_fullres", "plans": plans, "at": ""},
                {"dataset": T1W_ID, "trainer": t("nnUNetTrainerAEUNet"), "config": "3d_fullres", "plans": plans,
                 "pretrained": self.work / "ae_init.pth", "at": c("nnUNetTrainerAEUNet")},
                {"dataset": T1W_ID, "trainer": t("nnUNetTrainer"), "config": "3d_fullres", "plans": plans, "at": ""},
            ]
        return models

    @staticmethod
    def spec(m: dict) -> str:
        """The model as ``nnunet-pvs compare --models`` names it."""
        plans = f":{m['plans']}" if m["plans"] != "nnUNetPlans" else ""
        return f"{m['trainer']}:{m['config']}{plans}{m['at']}"

    def fold_done(self, m: dict, fold: int) -> bool:
        folder = self.res / self.dataset_folder(m["dataset"]) / f"{m['trainer']}__{m['plans']}__{m['config']}"
        return (folder / f"fold_{fold}" / "checkpoint_final.pth").exists()

    # ---------------------------------------------------------------- main
    def __call__(self) -> int:
        from tqdm import tqdm

        s, nnunet_pvs = self.s, self.bin / "nnunet-pvs"
        budget = ("the papers' budgets (1000 epochs x 250 iterations; autoencoder 100 x 250); MfNS_De scored at "
                  "epoch 50, the AE U-Net at its lowest validation loss" if s.full else
                  f"{s.epochs} epochs x {s.iterations} iterations per model"
                  + (f", autoencoder {s.ae_epochs} x {s.ae_iterations}" if s.with_3d else "")
                  + f", fold(s) {s.folds}; MfNS_De at batch 4 (the paper's), stock nnU-Net 2d at "
                  + (f"batch {s.stock_2d_batch} (plans {s.stock_2d_plans})" if s.stock_2d_batch else "its plan's batch")
                  + f": a {s.device.upper()} budget, far below the papers' 1000 x 250; the report says per model "
                  "whether training had converged")
        self.log(f"work folder {self.work}; phantom size {s.size}, {s.subjects} subjects per dataset, "
                 f"folds {s.folds}, device {s.device}")
        self.log(f"budget: {budget}")

        common = ["--size", s.size, "--subjects", s.subjects, "--test", s.test, "--seed", s.seed, "-o", self.raw]
        t1w = s.with_3d
        self.stage("1_phantom", "1/7 synthetic PVS data", [
            ([nnunet_pvs, "phantom", "-d", T2W_ID, "-n", T2W_NAME, "--contrast", "T2w", *common, "--preview",
              self.work / "preview_T2w.png"], "phantom_T2w"),
        ] + ([
            ([nnunet_pvs, "phantom", "-d", T1W_ID, "-n", T1W_NAME, "--contrast", "T1w", *common,
              "--unlabeled", s.unlabeled, "--preview", self.work / "preview_T1w.png"], "phantom_T1w"),
        ] if t1w else []))
        t2w_configs = ["2d", "3d_fullres"] if s.with_3d else ["2d"]
        self.stage("2_plan", "2/7 plan and preprocess", [
            ([self.bin / "nnUNetv2_plan_and_preprocess", "-d", T2W_ID, "-c", *t2w_configs, "-np",
              *[1] * len(t2w_configs), "-npfp", 2, "--verify_dataset_integrity"], "plan_T2w"),
        ] + ([
            ([self.bin / "nnUNetv2_plan_and_preprocess", "-d", T1W_ID, "-c", "3d_fullres", "-np", 1, "-npfp", 2,
              "--verify_dataset_integrity"], "plan_T1w"),
        ] if t1w else []))
        if s.stock_2d_batch:
            from nnunet_pvs.plans_variant import write_plans_variant

            write_plans_variant(self.pre / self.dataset_folder(T2W_ID), s.stock_2d_plans, {"2d": s.stock_2d_batch})
        self.stage("3_splits", "3/7 stratified folds", [
            ([nnunet_pvs, "splits", "-d", T2W_ID, "--by", "age", "--seed", s.seed], "splits_T2w"),
        ] + ([
            ([nnunet_pvs, "splits", "-d", T1W_ID, "--by", "pvs_load", "--seed", s.seed], "splits_T1w"),
        ] if t1w else []))
        if t1w:
            self.stage("4_pretrain", "4/7 autoencoder pretraining", [
                ([nnunet_pvs, "pretrain-autoencoder", "-d", T1W_ID, "-c", "3d_fullres",
                  "--unlabeled", self.dataset_dir(T1W_ID) / "imagesUnlabeled", "-o", self.work / "ae_init.pth",
                  "--epochs", s.ae_epochs, "--iterations", s.ae_iterations, "--val-iterations",
                  max(1, s.ae_iterations // 4), "--device", s.device, "--seed", s.seed], "pretrain_autoencoder"),
            ])
        else:
            self.log("4/7 autoencoder pretraining: part of the 3D half (--with-3d), skipped")

        runs = [(m, f) for m in self.models() for f in s.folds]
        self.log(f"5/7 training: {len(runs)} runs ({len(self.models())} models x {len(s.folds)} folds)")
        for m, fold in tqdm(runs, desc="training runs", unit="run", file=sys.stdout):
            label = f"{m['trainer']} {m['config']} {m['plans']} fold {fold} (Dataset{m['dataset']})"
            if self.fold_done(m, fold):
                self.log(f"5/7 {label}: already trained, skipped")
                continue
            cmd = [self.bin / "nnUNetv2_train", m["dataset"], m["config"], fold, "-tr", m["trainer"],
                   "-p", m["plans"], "-device", s.device]
            if "pretrained" in m:
                cmd += ["-pretrained_weights", m["pretrained"]]
            self.run(f"5/7 {label}", cmd,
                     f"train_{m['dataset']}_{m['trainer']}_{m['config']}_{m['plans']}_fold{fold}")

        reports = {}
        for dataset_id, tag in ((T2W_ID, "T2w"), (T1W_ID, "T1w")):
            mine = [m for m in self.models() if m["dataset"] == dataset_id]
            if not mine:
                continue
            # the baseline: stock nnU-Net, 2d on T2w (the comparison MfNS_De's paper makes), 3d_fullres on T1w
            stock = [m for m in mine if m["trainer"] == s.trainer("nnUNetTrainer")]
            out = self.work / f"report_{tag}"
            cmd = [nnunet_pvs, "compare", "-d", dataset_id, "--models", *map(self.spec, mine), "classical",
                   "--baseline", self.spec(stock[0]), "--folds", *s.folds,
                   "--regions", self.dataset_dir(dataset_id) / "regions", "--device", s.device, "-o", out]
            self.run(f"6/7 compare ({tag})", cmd, f"compare_{tag}")
            reports[tag] = out / "report.md"
        for tag, path in reports.items():
            self.log(f"report ({tag}): {path}")

        # what a user does with new scans: predict them, then take the census of their PVS
        mfns = self.models()[0]
        chk = mfns["at"].lstrip("@") or "checkpoint_final.pth"
        pred = self.work / "predictions_T2w_test"
        census = self.work / "census_T2w_test"
        self.stage("7_census", "7/7 predict test subjects and census", [
            ([self.bin / "nnUNetv2_predict", "-i", self.dataset_dir(T2W_ID) / "imagesTs", "-o", pred,
              "-d", T2W_ID, "-c", mfns["config"], "-tr", mfns["trainer"], "-f", *s.folds, "-chk", chk,
              "--save_probabilities", "-device", s.device, "-npp", 1, "-nps", 1], "predict_T2w_test"),
            ([nnunet_pvs, "census", "-i", pred, "-o", census, "--images", self.dataset_dir(T2W_ID) / "imagesTs",
              "--regions", self.dataset_dir(T2W_ID) / "regions"], "census_T2w_test"),
        ])
        self.log(f"census of the test subjects: {census / 'report.html'}")
        self.log(f"demo finished in {time.time() - self.t0:.0f} s")
        return 0


def _earlier_work_folder(work: Path) -> bool:
    """A demo work folder of a version before the ownership marker (nnunet_pvs.staging.MARKER)."""
    return (work / "demo_settings.json").is_file() and (work / ".stages").is_dir()


def run(args: argparse.Namespace) -> int:
    from nnunet_pvs.staging import check_output_folder, write_marker, write_text_atomic

    settings = DemoSettings.from_args(args)
    work = args.work_dir.resolve()
    # resumable, so not staged; but only a demo's own folder is resumed, or deleted by --restart
    check_output_folder(work, "demo", legacy=_earlier_work_folder, what="work folder", option="--work-dir")
    if args.restart and work.exists():
        shutil.rmtree(work)
    for sub in ("logs", ".stages"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    write_marker(work, "demo")
    recorded = work / "demo_settings.json"
    if recorded.exists():
        before = json.loads(recorded.read_text())
        if before != asdict(settings):
            changed = sorted(k for k in asdict(settings) if before.get(k) != asdict(settings)[k])
            raise UserError(f"{work} holds a demo made with other settings ({', '.join(changed)}); "
                            "use another --work-dir or --restart")
    else:
        write_text_atomic(recorded, json.dumps(asdict(settings), indent=2))
    return Demo(work, settings)()
