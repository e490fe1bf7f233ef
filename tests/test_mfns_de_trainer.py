"""nnUNetTrainerMfNSDe through stock nnU-Net: plugin lookup, training, prediction, label handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import BIN, nnunet_folders, run_cli
from synthetic import write_tiny_dataset

DATASET_ID = 991
SHAPE = (48, 48, 6)  # x, y, slices at 0.69 x 0.69 x 2 mm: the 2d configuration sees 48 x 48 slices


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A tiny T2w-like dataset, planned and preprocessed for 2d with the stock command, once."""
    root = tmp_path_factory.mktemp("mfns")
    env, _ = nnunet_folders(root)
    write_tiny_dataset(root / "nnUNet_raw", DATASET_ID, n_cases=6, shape=SHAPE, n_test=2)
    run_cli([BIN / "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "2d", "--verify_dataset_integrity"],
            env=env)
    return root, env


def _nnunet_paths(root: Path):
    pre = root / "nnUNet_preprocessed" / f"Dataset{DATASET_ID:03d}_TinyPVS"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    return pre, plans, dataset_json


def test_env_command_prints_export_keeping_other_folders(tmp_path):
    from nnunet_pvs.plugin_env import shim_folder

    env = {**os.environ, "nnUNet_extTrainer": str(tmp_path)}
    out = run_cli(["bash", "-c", f'eval "$({BIN / "nnunet-pvs"} env)"; echo "$nnUNet_extTrainer"'], env=env)
    assert out.stdout.strip() == f"{shim_folder()}{os.pathsep}{tmp_path}"
    # idempotent: evaluating twice does not duplicate our folder
    out2 = run_cli(["bash", "-c", f'eval "$({BIN / "nnunet-pvs"} env)"; eval "$({BIN / "nnunet-pvs"} env)"; '
                    'echo "$nnUNet_extTrainer"'], env=env)
    assert out2.stdout.strip() == out.stdout.strip()
    helptext = run_cli([BIN / "nnunet-pvs", "--help"]).stdout
    assert "env" in helptext


def test_shim_folder_holds_only_shims():
    from nnunet_pvs.plugin_env import shim_folder

    modules = sorted(p.name for p in shim_folder().glob("*.py"))
    assert modules == ["__init__.py", "nnunet_pvs_trainers.py"]


@pytest.mark.e2e
def test_stock_lookup_without_plugin_variable_names_it(planned):
    root, env = planned
    env = {k: v for k, v in env.items() if k != "nnUNet_extTrainer"}
    proc = run_cli([BIN / "nnUNetv2_train", DATASET_ID, "2d", 0, "-tr", "nnUNetTrainerMfNSDe_smoke",
                    "-device", "cpu"], env=env, check=False)
    assert proc.returncode != 0
    assert "nnUNet_extTrainer" in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_train_two_folds_and_predict_ensemble_through_stock_cli(planned, tmp_path):
    root, env = planned
    for fold in (0, 1):
        run_cli([BIN / "nnUNetv2_train", DATASET_ID, "2d", fold, "-tr", "nnUNetTrainerMfNSDe_smoke",
                 "-device", "cpu"], env=env)
    results = root / "nnUNet_results" / f"Dataset{DATASET_ID:03d}_TinyPVS" / "nnUNetTrainerMfNSDe_smoke__nnUNetPlans__2d"
    for fold in (0, 1):
        files = {p.name for p in (results / f"fold_{fold}").iterdir()}
        assert {"checkpoint_final.pth", "checkpoint_epoch1.pth", "progress.png"} <= files
        ck = torch.load(results / f"fold_{fold}" / "checkpoint_epoch1.pth", map_location="cpu", weights_only=False)
        assert ck["current_epoch"] == 1 and ck["trainer_name"] == "nnUNetTrainerMfNSDe_smoke"
        group = ck["optimizer_state"]["param_groups"][0]
        assert "lr_decay" in group and group["lr"] == pytest.approx(0.05)  # Adagrad's state
    log = next((results / "fold_0").glob("training_log_*.txt")).read_text()
    assert "Current learning rate: 0.05" in log

    images = root / "nnUNet_raw" / f"Dataset{DATASET_ID:03d}_TinyPVS" / "imagesTs"
    for chk, out in (("checkpoint_final.pth", tmp_path / "pred"), ("checkpoint_epoch1.pth", tmp_path / "pred50")):
        run_cli([BIN / "nnUNetv2_predict", "-i", images, "-o", out, "-d", DATASET_ID, "-c", "2d",
                 "-tr", "nnUNetTrainerMfNSDe_smoke", "-f", 0, 1, "--save_probabilities", "-device", "cpu",
                 "-chk", chk], env=env)
        for img_path in sorted(images.glob("*_0000.nii.gz")):
            case = img_path.name.replace("_0000.nii.gz", "")
            img, pred = nib.load(img_path), nib.load(out / f"{case}.nii.gz")
            assert pred.shape == img.shape
            np.testing.assert_allclose(pred.affine, img.affine, atol=1e-4)
            np.testing.assert_allclose(pred.header.get_zooms(), img.header.get_zooms(), atol=1e-5)
            assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}
            probs = np.load(out / f"{case}.npz")["probabilities"]
            assert probs.shape == (2, *img.shape[::-1])  # nnU-Net writes (c, z, y, x)
            np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-3)
            assert (out / f"{case}.pkl").exists()


def _trainer(cls, planned, dataset_json_override=None):
    root, env = planned
    pre, plans, dataset_json = _nnunet_paths(root)
    if dataset_json_override:
        dataset_json = {**dataset_json, **dataset_json_override}
    plans["continue_training"] = False  # set by nnU-Net's run_training before it builds a trainer
    return cls(plans, "2d", 0, dataset_json, device=torch.device("cpu"))


@pytest.fixture
def in_process(planned, monkeypatch):
    """nnU-Net's folders (read from the environment on use) for in-process trainer construction."""
    root, env = planned
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    return planned


@pytest.mark.e2e
def test_trainer_states_only_the_paper_differences(in_process):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    from nnunet_pvs.trainers.mfns_de import nnUNetTrainerMfNSDe, nnUNetTrainerMfNSDe_DiceCE

    tr = _trainer(nnUNetTrainerMfNSDe, in_process)
    tr.initialize()
    assert isinstance(tr.optimizer, torch.optim.Adagrad)
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert tr.batch_size == 4
    assert isinstance(tr.loss, DeepSupervisionWrapper) and isinstance(tr.loss.loss, DC_and_CE_loss)
    assert tr.loss.loss.weight_ce == 0 and tr.loss.loss.weight_dice == 1
    w = np.array(tr.loss.weight_factors)
    n_scales = len(tr._get_deep_supervision_scales())
    assert len(w) == n_scales == tr.network.num_outputs
    np.testing.assert_allclose(w, (0.5 ** np.arange(n_scales)) / (0.5 ** np.arange(n_scales)).sum())
    # the schedule is constant
    tr.lr_scheduler.step(500)
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)

    ce = _trainer(nnUNetTrainerMfNSDe_DiceCE, in_process)
    ce.initialize()
    assert ce.loss.loss.weight_ce == 1 and ce.loss.loss.weight_dice == 1
    assert ce.loss.weight_factors == tr.loss.weight_factors


def _batch_through_validation_transforms(tr, n=4, shape=(48, 48)):
    """A batch built by the trainer's own validation pipeline from label maps that contain every label
    (the tiny preprocessed data only hold 0/1; an ignore label must be present for its code path)."""
    rng = np.random.default_rng(0)
    lm = tr.label_manager
    pipeline = tr.get_validation_transforms(
        tr._get_deep_supervision_scales(), foreground_labels=lm.foreground_labels,
        regions=lm.foreground_regions if lm.has_regions else None, ignore_label=lm.ignore_label)
    images, targets = [], []
    for _ in range(n):
        seg = np.zeros((1, *shape), dtype=np.int16)
        for label in lm.all_labels[1:]:
            r = rng.integers(0, shape[0])
            seg[0, r, :] = label          # one-pixel-wide line of each label
        if lm.ignore_label is not None:
            seg[0, :8, :8] = lm.ignore_label
        out = pipeline(image=torch.from_numpy(rng.normal(size=(1, *shape)).astype(np.float32)),
                       segmentation=torch.from_numpy(seg))
        images.append(out["image"])
        targets.append(out["segmentation"])
    return {"data": torch.stack(images), "target": [torch.stack(t) for t in zip(*targets)], "keys": list(range(n))}


@pytest.mark.parametrize("labels,extra", [
    ({"background": 0, "PVS": 1, "lacune": 2}, {}),
    ({"background": 0, "PVS": 1, "ignore": 2}, {}),
    ({"background": 0, "PVS": [1], "lacune": [2], "ignore": 3}, {"regions_class_order": [1, 2]}),
], ids=["multiclass", "ignore_label", "regions_with_ignore"])
@pytest.mark.e2e
def test_label_variants_train_and_validate(in_process, labels, extra):
    from nnunet_pvs.trainers.mfns_de import nnUNetTrainerMfNSDe

    tr = _trainer(nnUNetTrainerMfNSDe, in_process, {"labels": labels, **extra})
    tr.initialize()
    batch = _batch_through_validation_transforms(tr)
    assert len(batch["target"]) == tr.network.num_outputs
    coarsest = batch["target"][-1]
    if tr.label_manager.has_regions:
        assert coarsest.shape[1] == len(tr.label_manager.foreground_regions) + 1  # + ignore channel
        assert bool(coarsest[:, 0].any()) and bool(coarsest[:, 1].any())
    else:
        for label in tr.label_manager.foreground_labels:
            assert bool((coarsest == label).any()), f"label {label} lost at the coarsest scale"
    if tr.label_manager.ignore_label is not None and not tr.label_manager.has_regions:
        # the 8 x 8 ignore block covers exactly (8 / f) x (8 / f) coarse pixels at every scale f
        for t in batch["target"]:
            f = 48 // t.shape[-1]
            assert int((t[0] == tr.label_manager.ignore_label).sum()) == (8 // f) ** 2
    out = tr.train_step(batch)
    assert np.isfinite(out["loss"])
    assert np.isfinite(tr.validation_step(batch)["loss"])


@pytest.mark.e2e
def test_multiclass_dataloader_batch_trains(in_process):
    """The real nnU-Net data loader + training pipeline with the trainer (nnUNet_n_proc_DA=0)."""
    from nnunet_pvs.trainers.mfns_de import nnUNetTrainerMfNSDe

    tr = _trainer(nnUNetTrainerMfNSDe, in_process, {"labels": {"background": 0, "PVS": 1, "lacune": 2}})
    tr.initialize()
    dl_train, _ = tr.get_dataloaders()
    batch = next(dl_train)
    assert batch["data"].shape[0] == 4 and len(batch["target"]) == tr.network.num_outputs
    assert bool((batch["target"][-1] == 1).any())
    assert np.isfinite(tr.train_step(batch)["loss"])


@pytest.mark.e2e
def test_log_names_the_network_and_the_plan_parts_it_uses(in_process):
    """The folder and nnU-Net's log name the plan's network class; our log says what is built instead."""
    from nnunet_pvs.trainers.mfns_de import nnUNetTrainerMfNSDe_planDepth

    tr = _trainer(nnUNetTrainerMfNSDe_planDepth, in_process)
    tr.initialize()
    log = Path(tr.log_file).read_text()
    arch = tr.configuration_manager.network_arch_init_kwargs
    n = len(arch["strides"])
    assert "Network: MfNS_De (nnunet_pvs.networks.mfns_de.MfNSDe)" in log
    assert f"the plan's network class {tr.configuration_manager.network_arch_class_name} is NOT used" in log
    assert f"the first {n} of {n} stages, strides {arch['strides']}" in log
    assert "norm InstanceNorm2d" in log and "nonlin LeakyReLU" in log
    assert f"blocks per node by level {[1] * n}" in log
    assert "2D method" not in log
    assert tr.nnunet_pvs_plugin["trainer"] == "nnUNetTrainerMfNSDe_planDepth"  # provenance for debug.json


@pytest.mark.e2e
def test_three_d_configuration_warns_that_the_method_is_2d(in_process):
    from nnunet_pvs.trainers.mfns_de import nnUNetTrainerMfNSDe

    root, env = in_process
    pre, plans, dataset_json = _nnunet_paths(root)
    plans["continue_training"] = False
    two_d = plans["configurations"]["2d"]
    arch = dict(two_d["architecture"]["arch_kwargs"])
    n = len(arch["strides"])
    arch.update(conv_op="torch.nn.modules.conv.Conv3d", norm_op="torch.nn.modules.instancenorm.InstanceNorm3d",
                strides=[[1, 1, 1]] + [[1, 2, 2]] * (n - 1), kernel_sizes=[[1, 3, 3]] * n)
    plans["configurations"]["3d_test"] = {
        **two_d, "patch_size": [4, *two_d["patch_size"]], "spacing": [2.0, *two_d["spacing"]],
        "architecture": {**two_d["architecture"], "arch_kwargs": arch}}
    tr = nnUNetTrainerMfNSDe(plans, "3d_test", 0, dataset_json, device=torch.device("cpu"))
    with pytest.warns(UserWarning, match="MfNS_De is a 2D method"):
        tr.initialize()
    assert "WARNING: MfNS_De is a 2D method" in Path(tr.log_file).read_text()
