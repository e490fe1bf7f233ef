"""``nnunet-pvs pretrain-autoencoder``: bad input gives a clear error naming the file, exit 2, no output."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import run_cli
from test_ae_unet_network import TINY_DATASET_JSON, TINY_PLANS

BIN = Path(sys.executable).parent


def _planned_dataset(preprocessed: Path, dataset_id: int = 993) -> Path:
    """A dataset that is planned (plans + dataset.json) without running the planner."""
    name = f"Dataset{dataset_id:03d}_PlansOnly"
    d = preprocessed / name
    d.mkdir(parents=True)
    plans = copy.deepcopy(TINY_PLANS)
    plans["dataset_name"] = name
    (d / "nnUNetPlans.json").write_text(json.dumps(plans))
    (d / "dataset.json").write_text(json.dumps(TINY_DATASET_JSON))
    return d


def _img(path: Path, shape=(20, 20, 20), seed=0):
    data = np.random.default_rng(seed).normal(100, 10, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _pretrain(env, unlabeled, out, dataset="993", config="3d_fullres", extra=(), in_process=None):
    return run_cli([BIN / "nnunet-pvs", "pretrain-autoencoder", "-d", dataset, "-c", config, "--unlabeled",
                    unlabeled, "-o", out, "--epochs", "1", "--iterations", "1", "--val-iterations", "1",
                    "--device", "cpu", *extra], env=env, check=False, timeout=300, in_process=in_process)


def _case_missing(folder: Path) -> tuple[Path, str]:
    return folder / "does_not_exist", "does not exist"


def _case_empty(folder: Path):
    (folder / "empty").mkdir()
    return folder / "empty", "no images"


def _case_extra_channel(folder: Path):
    u = folder / "u"
    u.mkdir()
    _img(u / "a_0000.nii.gz")
    _img(u / "b_0000.nii.gz")
    bad = _img(u / "b_0001.nii.gz")
    return u, f"{bad}: channel 0001"


def _case_4d(folder: Path):
    u = folder / "u"
    u.mkdir()
    _img(u / "a.nii.gz")
    bad = _img(u / "b.nii.gz", shape=(20, 20, 20, 2))
    return u, f"{bad}: holds 2 volumes"


def _case_corrupt(folder: Path):
    u = folder / "u"
    u.mkdir()
    _img(u / "a.nii.gz")
    bad = u / "b.nii.gz"
    bad.write_bytes(b"\x1f\x8b this is not a NIfTI")
    return u, f"{bad}: cannot be read"


@pytest.mark.parametrize("make_case", [_case_missing, _case_empty, _case_extra_channel, _case_4d, _case_corrupt])
def test_bad_unlabeled_input(nnunet_env, tmp_path, make_case):
    _planned_dataset(nnunet_env["nnUNet_preprocessed"])
    unlabeled, expected = make_case(tmp_path)
    out = tmp_path / "out" / "ae.pth"
    out.parent.mkdir()
    proc = _pretrain(nnunet_env["env"], unlabeled, out)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out.parent.iterdir()) == [], "no output (nor losses, nor cache) on bad input"


def test_dataset_is_looked_up_where_nnUNet_preprocessed_points_now(nnunet_env, tmp_path):
    """Two nnU-Net folders in one process (a notebook, this test session): -d is resolved in the
    folder the variable names at the call (nnU-Net 2.8.1's paths read the environment on use)."""
    u = tmp_path / "u"
    u.mkdir()
    _img(u / "a.nii.gz"), _img(u / "b.nii.gz")
    out = tmp_path / "out" / "ae.pth"
    out.parent.mkdir()
    for name in ("first", "second"):
        pre = tmp_path / name
        d = _planned_dataset(pre)
        env = {**nnunet_env["env"], "nnUNet_preprocessed": str(pre)}
        proc = _pretrain(env, u, out, config="3d_lowres", in_process=True)
        assert proc.returncode == 2 and str(d / "nnUNetPlans.json") in proc.stderr, proc.stderr
        proc = _pretrain(env, u, out, dataset="Dataset993_PlansOnly", config="3d_lowres", in_process=True)
        assert proc.returncode == 2 and str(d / "nnUNetPlans.json") in proc.stderr, proc.stderr


@pytest.mark.parametrize("dataset,config,expected", [
    ("993", "3d_lowres", "not planned for configuration '3d_lowres'"),
    ("994", "3d_fullres", "dataset 994 not found"),
])
def test_dataset_not_planned(nnunet_env, tmp_path, dataset, config, expected):
    d = _planned_dataset(nnunet_env["nnUNet_preprocessed"])
    u = tmp_path / "u"
    u.mkdir()
    _img(u / "a.nii.gz"), _img(u / "b.nii.gz")
    out = tmp_path / "out" / "ae.pth"
    out.parent.mkdir()
    proc = _pretrain(nnunet_env["env"], u, out, dataset=dataset, config=config)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    if dataset == "993":
        assert str(d / "nnUNetPlans.json") in proc.stderr
    assert list(out.parent.iterdir()) == []


def test_pretrain_writes_checkpoint_csv_png(nnunet_env, tmp_path):
    """Plain one-channel folder, real preprocessing with the plans, checkpoint that fits the U-Net."""
    _planned_dataset(nnunet_env["nnUNet_preprocessed"])
    u = tmp_path / "u"
    u.mkdir()
    for i in range(3):
        _img(u / f"subject{i}.nii.gz", shape=(24, 28, 20), seed=i)  # smaller than the patch: padded
    out = tmp_path / "out" / "ae.pth"
    out.parent.mkdir()
    proc = _pretrain(nnunet_env["env"], u, out, extra=["--epochs", "2", "--iterations", "2"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["ae.pth", "ae_losses.csv", "ae_losses.png"]
    rows = (out.parent / "ae_losses.csv").read_text().splitlines()
    assert rows[0] == "epoch,train_mse,val_mse,best,seconds" and len(rows) == 3
    ck = torch.load(out, weights_only=False)  # as stock: no map_location
    from nnunet_pvs.trainers.ae_unet import nnUNetTrainerAEUNet
    from test_ae_unet_network import tiny_managers

    pm, cm = tiny_managers()
    unet = nnUNetTrainerAEUNet.build_network_architecture(pm, cm, 1, 2, False)
    assert set(ck["network_weights"]) == set(unet.state_dict())
    unet.load_state_dict(ck["network_weights"])  # strict
    assert all(v.device.type == "cpu" for v in ck["network_weights"].values())
    best = ck["pretraining"]["best_epoch"]
    assert rows[best].split(",")[3] == "1"
    for k, v in ck["network_weights"].items():
        if k.startswith("encoder."):
            assert torch.equal(v, ck["autoencoder_weights"][k])


def test_non_binary_dataset_refused(nnunet_env, tmp_path):
    d = _planned_dataset(nnunet_env["nnUNet_preprocessed"])
    (d / "dataset.json").write_text(json.dumps({**TINY_DATASET_JSON,
                                                "labels": {"background": 0, "PVS": 1, "lacune": 2}}))
    u = tmp_path / "u"
    u.mkdir()
    _img(u / "a.nii.gz"), _img(u / "b.nii.gz")
    out = tmp_path / "out" / "ae.pth"
    out.parent.mkdir()
    proc = _pretrain(nnunet_env["env"], u, out)
    assert proc.returncode == 2 and f"{d / 'dataset.json'}: " in proc.stderr and "2 foreground labels" in proc.stderr
    assert list(out.parent.iterdir()) == []


def test_kept_autoencoder_is_the_lowest_validation_loss_epoch(tmp_path):
    """pretrain() returns the weights of the epoch whose validation MSE is lowest, not the last ones.

    After epoch 2 the callback scrambles the weights, so later epochs validate worse and a
    "keep the last epoch" bug cannot pass."""
    from nnunet_pvs.networks.ae_unet import AEUNet
    from nnunet_pvs.pretrain_autoencoder import pretrain

    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        f = tmp_path / f"c{i}.npy"
        np.save(f, rng.normal(0, 1, (1, 12, 12, 12)).astype(np.float32))
        files.append(f)
    torch.manual_seed(0)
    ae = AEUNet(1, [[2, 2, 2]] * 2, skips=False)
    snapshots = []

    def on_epoch(rows):
        snapshots.append({k: v.detach().clone() for k, v in ae.state_dict().items()})
        if len(rows) == 2:
            with torch.no_grad():
                for p in ae.parameters():
                    p.add_(torch.randn_like(p) * 3)

    best, rows = pretrain(files, ae, torch.device("cpu"), (8, 8, 8), epochs=4, iterations=2, val_iterations=2,
                          batch_size=2, lr=1e-3, val_fraction=0.34, seed=0, on_epoch=on_epoch, progress=False)
    val = [r["val_mse"] for r in rows]
    kept = int(np.argmin(val))
    assert kept < 2, f"the scrambled epochs 3-4 validate worse: {val}"
    assert [r["best"] for r in rows][kept] == 1
    assert all(torch.equal(best[k], snapshots[kept][k]) for k in best)
    assert not all(torch.equal(best[k], snapshots[-1][k]) for k in best)
