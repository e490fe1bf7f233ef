"""Sharing a plugin model: the record in checkpoint and debug.json, export -> install into a fresh
nnUNet_results -> predict, and the recipient's error path (nnU-Net's message, ``env --check``)."""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import run_cli
from synthetic import write_tiny_dataset

from nnunet_pvs import __version__

BIN = Path(sys.executable).parent
TR = "nnUNetTrainerAEUNet_smoke"
MODEL = f"Dataset982_TinyShare/{TR}__nnUNetPlans__3d_fullres"


def test_env_check_without_model_names_the_fix(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    proc = run_cli([BIN / "nnunet-pvs", "env", "--check"], env=env, check=False)
    assert proc.returncode == 1
    assert "nnUNet_extTrainer does not hold" in proc.stdout and 'eval "$(nnunet-pvs env)"' in proc.stdout
    from nnunet_pvs.plugin_env import ext_trainer_value

    proc = run_cli([BIN / "nnunet-pvs", "env", "--check"], env={**env, "nnUNet_extTrainer": ext_trainer_value("")})
    assert proc.returncode == 0 and "all set" in proc.stdout
    proc = run_cli([BIN / "nnunet-pvs", "env", "--check", tmp_path / "nope.zip"], env=env, check=False)
    assert proc.returncode == 2 and f"{tmp_path / 'nope.zip'}: not found" in proc.stderr


@pytest.mark.e2e
def test_export_install_predict_in_a_fresh_results_folder(nnunet_env, tmp_path):
    env = nnunet_env["env"]
    root = write_tiny_dataset(nnunet_env["nnUNet_raw"], 982, "TinyShare", n_cases=5, shape=(32, 32, 32),
                              spacing=(1.0, 1.0, 1.0), seed=7, n_test=1, channel="T1w")
    run_cli([BIN / "nnUNetv2_plan_and_preprocess", "-d", "982", "-c", "3d_fullres", "-np", "1"], env=env)
    run_cli([BIN / "nnUNetv2_train", "982", "3d_fullres", "0", "-tr", TR, "-device", "cpu"], env=env)
    fold = nnunet_env["nnUNet_results"] / MODEL / "fold_0"
    ck = torch.load(fold / "checkpoint_best_loss.pth", map_location="cpu", weights_only=False)
    assert ck["init_args"]["nnunet_pvs"]["plugin"]["version"] == __version__
    assert ck["init_args"]["nnunet_pvs"]["plugin"]["trainer"] == TR

    model_zip = tmp_path / "model.zip"
    run_cli([BIN / "nnUNetv2_export_model_to_zip", "-d", "982", "-c", "3d_fullres", "-tr", TR, "-f", "0",
             "-chk", "checkpoint_final.pth", "checkpoint_best_loss.pth", "-o", model_zip], env=env)
    with zipfile.ZipFile(model_zip) as zf:
        names = zf.namelist()
        debug = json.loads(zf.read(f"{MODEL}/fold_0/debug.json"))
    assert f"{MODEL}/fold_0/checkpoint_best_loss.pth" in names and f"{MODEL}/fold_0/checkpoint_final.pth" in names
    assert f"'version': '{__version__}'" in debug["nnunet_pvs_plugin"] and TR in debug["nnunet_pvs_plugin"]

    # the recipient: a fresh results folder, nnunet-pvs installed but not on nnUNet_extTrainer
    fresh = tmp_path / "recipient_results"
    fresh.mkdir()
    bare = {k: v for k, v in env.items() if k != "nnUNet_extTrainer"}
    bare["nnUNet_results"] = str(fresh)
    run_cli([BIN / "nnUNetv2_install_pretrained_model_from_zip", model_zip], env=bare)
    assert (fresh / MODEL / "fold_0" / "checkpoint_best_loss.pth").is_file()
    out_fail = tmp_path / "pred_fail"
    predict = ["-i", root / "imagesTs", "-d", "982", "-c", "3d_fullres", "-tr", TR, "-f", "0",
               "-chk", "checkpoint_best_loss.pth", "-device", "cpu", "-npp", "1", "-nps", "1"]
    proc = run_cli([BIN / "nnUNetv2_predict", "-o", out_fail, *predict], env=bare, check=False)
    assert proc.returncode != 0
    assert f"Could not find requested nnunet trainer {TR}" in proc.stderr  # as docs/sharing.md quotes it
    assert "nnUNet_extTrainer=" in proc.stderr
    for target in (model_zip, fresh / MODEL):
        proc = run_cli([BIN / "nnunet-pvs", "env", "--check", target], env=bare, check=False)
        assert proc.returncode == 1, proc.stdout
        assert f"trainer {TR} from nnunet-pvs {__version__}" in proc.stdout
        assert 'Fix: eval "$(nnunet-pvs env)"' in proc.stdout

    # after the documented fix: all set, and the installed copy predicts what the original predicts
    fixed = {**bare, "nnUNet_extTrainer": env["nnUNet_extTrainer"]}
    proc = run_cli([BIN / "nnunet-pvs", "env", "--check", fresh / MODEL], env=fixed)
    assert "all set" in proc.stdout
    run_cli([BIN / "nnUNetv2_predict", "-o", tmp_path / "pred_installed", *predict], env=fixed)
    run_cli([BIN / "nnUNetv2_predict", "-o", tmp_path / "pred_original", *predict], env=env)
    a = np.asarray(nib.load(tmp_path / "pred_installed" / "case005.nii.gz").dataobj)
    b = np.asarray(nib.load(tmp_path / "pred_original" / "case005.nii.gz").dataobj)
    assert a.shape == (32, 32, 32) and np.array_equal(a, b)
