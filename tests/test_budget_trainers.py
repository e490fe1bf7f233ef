"""Budget-from-environment trainers: every one reads NNUNET_PVS_*, records the budget with the run,
and ``nnUNetv2_train --c`` continues with the recorded budget (real nnU-Net runs, marked e2e)."""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import nnunet_folders, run_cli
from synthetic import write_tiny_dataset
from test_ae_unet_network import TINY_DATASET_JSON, TINY_PLANS

from nnunet_pvs import trainers
from nnunet_pvs.trainers.budget import BUDGET_VARIABLES, apply_env_budget

BIN = Path(sys.executable).parent
BUDGET_TRAINERS = ["nnUNetTrainer_budget", "nnUNetTrainerMfNSDe_budget", "nnUNetTrainerMfNSDe_lite_budget",
                   "nnUNetTrainerMfNSDe_planDepth_budget", "nnUNetTrainerAEUNet_budget"]
PARENTS = {"nnUNetTrainer_budget": "nnUNetTrainer", "nnUNetTrainerMfNSDe_budget": "nnUNetTrainerMfNSDe",
           "nnUNetTrainerMfNSDe_lite_budget": "nnUNetTrainerMfNSDe_lite",
           "nnUNetTrainerMfNSDe_planDepth_budget": "nnUNetTrainerMfNSDe_planDepth",
           "nnUNetTrainerAEUNet_budget": "nnUNetTrainerAEUNet"}


class _Fake:
    num_epochs, num_iterations_per_epoch, num_val_iterations_per_epoch = 1000, 250, 50


def _clear_budget(monkeypatch):
    for var in (*BUDGET_VARIABLES, "NNUNET_PVS_RESUME_BUDGET"):
        monkeypatch.delenv(var, raising=False)


def test_budget_read_from_environment(monkeypatch):
    _clear_budget(monkeypatch)
    monkeypatch.setenv("NNUNET_PVS_EPOCHS", "3")
    monkeypatch.setenv("NNUNET_PVS_ITERATIONS", "7")
    t = _Fake()
    assert apply_env_budget(t) == {"NNUNET_PVS_EPOCHS": 3, "NNUNET_PVS_ITERATIONS": 7}
    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch) == (3, 7, 50)


@pytest.mark.parametrize("bad", ["0", "-2", "ten", "1.5"])
def test_bad_budget_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv("NNUNET_PVS_ITERATIONS", bad)
    with pytest.raises(ValueError, match="NNUNET_PVS_ITERATIONS"):
        apply_env_budget(_Fake())


def test_the_list_of_budget_trainers_is_complete():
    assert sorted(n for n in trainers.__all__ if n.endswith("_budget")) == sorted(BUDGET_TRAINERS)


def _trainer(name, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))  # nnU-Net reads these lazily
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    plans = {**copy.deepcopy(TINY_PLANS), "continue_training": False}  # run_training adds this key
    return getattr(trainers, name)(plans, "3d_fullres", 0, TINY_DATASET_JSON, torch.device("cpu"))


@pytest.mark.parametrize("name", BUDGET_TRAINERS)
def test_every_budget_trainer_takes_and_records_the_environment_budget(name, tmp_path, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    _clear_budget(monkeypatch)
    parent = getattr(trainers, PARENTS[name], None) or nnUNetTrainer
    assert issubclass(getattr(trainers, name), parent)
    default = _trainer(name, tmp_path, monkeypatch)  # no variable: the parent's budget
    assert (default.num_epochs, default.num_iterations_per_epoch) == (1000, 250)
    monkeypatch.setenv("NNUNET_PVS_EPOCHS", "4")
    monkeypatch.setenv("NNUNET_PVS_VAL_ITERATIONS", "3")
    t = _trainer(name, tmp_path, monkeypatch)
    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch) == (4, 250, 3)
    # recorded where nnU-Net saves it into every checkpoint (init_args) and in debug.json's attributes
    rec = t.my_init_kwargs["nnunet_pvs"]
    assert rec["budget"] == {"num_epochs": 4, "num_iterations_per_epoch": 250, "num_val_iterations_per_epoch": 3}
    assert rec["plugin"]["trainer"] == name and rec["plugin"]["package"] == "nnunet-pvs"
    assert t.nnunet_pvs_plugin == rec["plugin"]


def test_bad_budget_stops_the_trainer_with_one_line(tmp_path, monkeypatch, capsys):
    _clear_budget(monkeypatch)
    monkeypatch.setenv("NNUNET_PVS_EPOCHS", "ten")
    with pytest.raises(SystemExit) as stop:
        _trainer("nnUNetTrainer_budget", tmp_path, monkeypatch)
    assert stop.value.code == 2
    assert "NNUNET_PVS_EPOCHS='ten': must be a positive integer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# through the real nnUNetv2_train

DATASET = "981"
RESULTS_NAME = "Dataset981_TinyBudget"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A tiny 3D dataset planned once (2d and 3d_fullres) for every e2e test of this module."""
    root = tmp_path_factory.mktemp("budget")
    env, dirs = nnunet_folders(root)
    write_tiny_dataset(dirs["nnUNet_raw"], int(DATASET), "TinyBudget", n_cases=5, shape=(32, 32, 32),
                       spacing=(1.0, 1.0, 1.0), seed=5, n_test=0, channel="T1w")
    run_cli([BIN / "nnUNetv2_plan_and_preprocess", "-d", DATASET, "-c", "2d", "3d_fullres", "-np", "1"], env=env)
    return env, dirs


def _train(env, trainer, config, extra=(), budget=None, check=True):
    e = {**env, **(budget or {})}
    return run_cli([BIN / "nnUNetv2_train", DATASET, config, "0", "-tr", trainer, "-device", "cpu", *extra],
                   env=e, check=check)


def _fold(dirs, trainer, config) -> Path:
    return dirs["nnUNet_results"] / RESULTS_NAME / f"{trainer}__nnUNetPlans__{config}" / "fold_0"


def _newest_log(fold: Path) -> str:
    return sorted(fold.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)[-1].read_text()


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


SMALL = {"NNUNET_PVS_EPOCHS": "2", "NNUNET_PVS_ITERATIONS": "2", "NNUNET_PVS_VAL_ITERATIONS": "1"}


@pytest.mark.e2e
def test_budget_is_recorded_and_kept_on_resume(planned):
    env, dirs = planned
    tr = "nnUNetTrainerAEUNet_budget"
    fold = _fold(dirs, tr, "3d_fullres")
    _train(env, tr, "3d_fullres", budget=SMALL)
    log = _newest_log(fold)
    assert "nnunet-pvs budget: 2 epochs x 2 iterations, 1 validation iterations per epoch" in log
    assert "NNUNET_PVS_EPOCHS=2" in log
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2
    assert final["init_args"]["nnunet_pvs"]["budget"] == {
        "num_epochs": 2, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1}
    assert "nnunet-pvs" in json.loads((fold / "debug.json").read_text())["nnunet_pvs_plugin"]

    # --c without the variables: the recorded budget, the finished fold stays finished
    _train(env, tr, "3d_fullres", ["--c"])
    log = _newest_log(fold)
    assert "continuing with 2 epochs x 2 iterations, 1 validation iterations per epoch: the recorded budget" in log
    assert "Epoch 2" not in log  # no epoch beyond the recorded two was trained
    assert torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["current_epoch"] == 2

    # --c with a different budget in the environment: one clear line, exit 2, nothing touched
    before = _sha(fold / "checkpoint_final.pth")
    proc = _train(env, tr, "3d_fullres", ["--c"], budget={"NNUNET_PVS_EPOCHS": "5"}, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "NNUNET_PVS_EPOCHS=5 but the run was recorded with 2" in proc.stderr
    assert "NNUNET_PVS_RESUME_BUDGET=environment" in proc.stderr and "Traceback" not in proc.stderr
    assert _sha(fold / "checkpoint_final.pth") == before

    # an interrupted run (no checkpoint_final): --c resumes from nnU-Net's fallback checkpoint and
    # ends at the recorded 2 epochs, not at nnU-Net's default 1000
    (fold / "checkpoint_final.pth").unlink()
    _train(env, tr, "3d_fullres", ["--c"])
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2 and final["init_args"]["nnunet_pvs"]["budget"]["num_epochs"] == 2

    # asked for explicitly: the budget changes on resume, and the log says so
    _train(env, tr, "3d_fullres", ["--c"], budget={"NNUNET_PVS_EPOCHS": "3", "NNUNET_PVS_RESUME_BUDGET": "environment"})
    log = _newest_log(fold)
    assert ("continuing with 3 epochs x 2 iterations, 1 validation iterations per epoch: changed on resume from "
            "2 epochs x 2 iterations") in log
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3 and final["init_args"]["nnunet_pvs"]["budget"]["num_epochs"] == 3


@pytest.mark.e2e
@pytest.mark.parametrize("trainer,config", [("nnUNetTrainer_budget", "3d_fullres"),
                                            ("nnUNetTrainerMfNSDe_budget", "2d")])
def test_budget_shows_in_the_training_log(planned, trainer, config):
    env, dirs = planned
    _train(env, trainer, config, budget={"NNUNET_PVS_EPOCHS": "1", "NNUNET_PVS_ITERATIONS": "2",
                                         "NNUNET_PVS_VAL_ITERATIONS": "1"})
    fold = _fold(dirs, trainer, config)
    log = _newest_log(fold)
    assert "nnunet-pvs budget: 1 epochs x 2 iterations, 1 validation iterations per epoch" in log
    assert "Epoch 0" in log and "Epoch 1" not in log
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 1 and final["init_args"]["nnunet_pvs"]["plugin"]["trainer"] == trainer
