"""End to end through the real CLIs: plan, pretrain the autoencoder, train two folds with
``-pretrained_weights``, predict with the two folds ensembled. Tiny synthetic 3D data on CPU."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import run_cli
from synthetic import write_tiny_dataset

BIN = Path(sys.executable).parent
TR = "nnUNetTrainerAEUNet_smoke"


@pytest.mark.e2e
def test_plan_pretrain_train_predict(nnunet_env, tmp_path):
    env = nnunet_env["env"]
    root = write_tiny_dataset(nnunet_env["nnUNet_raw"], 992, "TinyT1PVS", n_cases=5, shape=(32, 32, 32),
                              spacing=(1.0, 1.0, 1.0), seed=3, n_test=1, channel="T1w")
    unlabeled = tmp_path / "unlabeled"
    write_tiny_dataset(tmp_path / "unl_raw", 993, "Unl", n_cases=0, shape=(32, 32, 32),
                       spacing=(1.0, 1.0, 1.0), seed=4, n_test=3, channel="T1w")
    shutil.copytree(tmp_path / "unl_raw" / "Dataset993_Unl" / "imagesTs", unlabeled)

    run_cli([BIN / "nnUNetv2_plan_and_preprocess", "-d", "992", "-c", "3d_fullres", "-np", "1"], env=env)

    init = tmp_path / "ae_init.pth"
    run_cli([BIN / "nnunet-pvs", "pretrain-autoencoder", "-d", "992", "-c", "3d_fullres", "--unlabeled", unlabeled,
             "-o", init, "--epochs", "2", "--iterations", "2", "--val-iterations", "1", "--device", "cpu"], env=env)
    assert (tmp_path / "ae_init_losses.csv").is_file() and (tmp_path / "ae_init_losses.png").is_file()
    ck = torch.load(init, weights_only=False)

    for fold in ("0", "1"):  # 5 training cases: nnU-Net makes its own 5-fold split
        proc = run_cli([BIN / "nnUNetv2_train", "992", "3d_fullres", fold, "-tr", TR, "-device", "cpu",
                        "-pretrained_weights", init], env=env)
        assert "Loading pretrained weights" in proc.stdout

    res = nnunet_env["nnUNet_results"] / "Dataset992_TinyT1PVS" / f"{TR}__nnUNetPlans__3d_fullres"
    final = torch.load(res / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert set(final["network_weights"]) == set(ck["network_weights"])
    assert final["trainer_name"] == TR

    out = tmp_path / "pred"
    run_cli([BIN / "nnUNetv2_predict", "-i", root / "imagesTs", "-o", out, "-d", "992", "-c", "3d_fullres",
             "-tr", TR, "-f", "0", "1", "--save_probabilities", "-device", "cpu", "-npp", "1", "-nps", "1"], env=env)
    src = nib.load(root / "imagesTs" / "case005_0000.nii.gz")
    pred = nib.load(out / "case005.nii.gz")
    assert pred.shape == src.shape
    assert np.allclose(pred.affine, src.affine, atol=1e-4)
    seg = np.asarray(pred.dataobj)
    assert set(np.unique(seg)) <= {0, 1}
    probs = np.load(out / "case005.npz")["probabilities"]
    assert probs.shape[0] == 2 and np.allclose(probs.sum(0), 1, atol=1e-4)
    # the segmentation is the sigmoid foreground probability thresholded at 0.5 (axes: SimpleITK z, y, x)
    assert np.array_equal(seg.transpose(2, 1, 0) == 1, probs[1] > 0.5)
