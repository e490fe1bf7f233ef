"""End to end through the real CLIs: plan, pretrain the autoencoder, train one fold with and one
without ``-pretrained_weights``, predict from ``checkpoint_best_loss.pth`` and with the two folds
ensembled. Tiny synthetic 3D data on CPU."""

from __future__ import annotations

import csv
import json
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


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


@pytest.mark.e2e
def test_plan_pretrain_train_predict(nnunet_env, tmp_path):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_pvs.trainers.ae_unet import nnUNetTrainerAEUNet

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
             "-o", init, "--epochs", "3", "--iterations", "2", "--val-iterations", "1", "--device", "cpu"], env=env)
    with open(tmp_path / "ae_init_losses.csv") as fh:
        val = [float(r["val_mse"]) for r in csv.DictReader(fh)]
    assert (tmp_path / "ae_init_losses.png").is_file()
    ck = torch.load(init, weights_only=False)
    assert ck["pretraining"]["best_epoch"] == int(np.argmin(val)) + 1  # epochs count from 1
    assert ck["pretraining"]["dataset"] == "Dataset992_TinyT1PVS" and ck["pretraining"]["patch_size"] == [32, 32, 32]

    proc = run_cli([BIN / "nnUNetv2_train", "992", "3d_fullres", "0", "-tr", TR, "-device", "cpu",
                    "-pretrained_weights", init], env=env)
    assert "Loading pretrained weights" in proc.stdout
    run_cli([BIN / "nnUNetv2_train", "992", "3d_fullres", "1", "-tr", TR, "-device", "cpu"], env=env)  # no AE

    res = nnunet_env["nnUNet_results"] / "Dataset992_TinyT1PVS" / f"{TR}__nnUNetPlans__3d_fullres"
    log = next((res / "fold_0").glob("training_log_*.txt")).read_text()
    assert "5 of 7 stages for patch 32 x 32 x 32, 5 poolings to a 1 x 1 x 1 x 128 bottleneck" in log
    assert "reaches 1 voxel along every axis after 5 poolings" in log
    final = {f: torch.load(res / f"fold_{f}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
             for f in (0, 1)}
    assert set(final[0]["network_weights"]) == set(ck["network_weights"])
    assert final[0]["trainer_name"] == TR

    # -pretrained_weights changed the encoder: after 4 Adam steps (lr 1e-3) fold 0's encoder is still
    # the autoencoder's (correlation ~1), fold 1's fresh Glorot init is unrelated to it (~0)
    enc = [k for k, v in ck["network_weights"].items() if k.startswith("encoder.") and v.ndim == 5]
    dec = [k for k, v in ck["network_weights"].items() if k.startswith("decoder.stages.") and v.ndim == 5]
    assert len(enc) == 10 and len(dec) == 10  # 5 stages x 2 convolutions
    for k in enc:
        assert _corr(final[0]["network_weights"][k], ck["autoencoder_weights"][k]) > 0.9, k
        assert abs(_corr(final[1]["network_weights"][k], ck["autoencoder_weights"][k])) < 0.3, k
    for k in dec:  # the decoder came from the file's fresh init, not from the autoencoder
        assert _corr(final[0]["network_weights"][k], ck["network_weights"][k]) > 0.9, k

    # checkpoint_best_loss.pth: the epoch with the lowest validation loss
    val_losses = final[0]["logging"]["val_losses"]
    best = torch.load(res / "fold_0" / "checkpoint_best_loss.pth", map_location="cpu", weights_only=False)
    assert best["current_epoch"] == int(np.argmin(val_losses)) + 1
    assert best["logging"]["val_losses"][-1] == min(val_losses)

    # predict fold 0 from checkpoint_best_loss.pth, one window, no mirroring: the saved foreground
    # probability is the sigmoid of that network's own foreground logit (its decoder head)
    out_best = tmp_path / "pred_best"
    run_cli([BIN / "nnUNetv2_predict", "-i", root / "imagesTs", "-o", out_best, "-d", "992", "-c", "3d_fullres",
             "-tr", TR, "-f", "0", "-chk", "checkpoint_best_loss.pth", "--disable_tta", "--save_probabilities",
             "-device", "cpu", "-npp", "1", "-nps", "1"], env=env)
    pm = PlansManager(json.loads((res / "plans.json").read_text()))
    cm = pm.get_configuration("3d_fullres")
    assert list(pm.transpose_forward) == [0, 1, 2] and list(cm.patch_size) == [32, 32, 32]
    dataset_json = json.loads((res / "dataset.json").read_text())
    data, _, props = cm.preprocessor_class(verbose=False).run_case(
        [str(root / "imagesTs" / "case005_0000.nii.gz")], None, pm, cm, dataset_json)
    assert data.shape[1:] == (32, 32, 32), "uncropped: the patch is one window"
    net = nnUNetTrainerAEUNet.build_network_architecture(pm, cm, 1, 2, False)
    net.load_state_dict(best["network_weights"])
    net.eval()
    with torch.no_grad():
        z = net.decoder(*net.encoder(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None]))[0, 0]
    probs = np.load(out_best / "case005.npz")["probabilities"]
    assert probs.shape == (2, 32, 32, 32)
    # nnU-Net accumulates the Gaussian-weighted window in float16 on CPU: near the window's border
    # the weights underflow (probability exactly 0.5 at the corners), so compare the inner 16^3
    inner = (slice(8, 24),) * 3
    z = z.numpy()[inner]
    assert np.allclose(probs[1][inner], 1 / (1 + np.exp(-z)), atol=2e-3)
    assert np.abs(z).max() > 0.05, "a non-trivial logit map"
    seg = np.asarray(nib.load(out_best / "case005.nii.gz").dataobj).transpose(2, 1, 0)[inner]  # SimpleITK z, y, x
    sure = np.abs(z) > 1e-2  # the mask is the paper's threshold 0.5 on sigmoid(z), i.e. z > 0
    assert sure.mean() > 0.5 and np.array_equal((seg == 1)[sure], (z > 0)[sure])

    # the two folds ensembled (stock -f 0 1): geometry of the input
    out = tmp_path / "pred"
    run_cli([BIN / "nnUNetv2_predict", "-i", root / "imagesTs", "-o", out, "-d", "992", "-c", "3d_fullres",
             "-tr", TR, "-f", "0", "1", "-device", "cpu", "-npp", "1", "-nps", "1"], env=env)
    src = nib.load(root / "imagesTs" / "case005_0000.nii.gz")
    pred = nib.load(out / "case005.nii.gz")
    assert pred.shape == src.shape
    assert np.allclose(pred.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}
