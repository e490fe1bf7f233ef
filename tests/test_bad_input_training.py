"""Bad input to ``pretrain-autoencoder`` and to our trainers under ``nnUNetv2_train``, through the
command lines: exit code 2, one line naming the file or value, inputs untouched, nothing partial
left behind (interrupted runs clean up, or the next run does)."""

from __future__ import annotations

import copy
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import nnunet_folders, run_cli
from synthetic import write_tiny_dataset
from test_ae_unet_network import TINY_PLANS
from test_ae_unet_pretrain_cli import _img, _planned_dataset, _pretrain

BIN = Path(sys.executable).parent


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _unlabeled(tmp_path: Path, n=3, values=None) -> Path:
    u = tmp_path / "unlabeled"
    u.mkdir()
    for i in range(n):
        if values is None:
            _img(u / f"s{i}.nii.gz", seed=i)
        else:
            nib.save(nib.Nifti1Image(np.full((20, 20, 20), values, np.float32), np.eye(4)), u / f"s{i}.nii.gz")
    return u


def _symlink_to_input(tmp_path, u):
    link = tmp_path / "out" / "ae.pth"
    link.symlink_to(u / "s1.nii.gz")
    return link, f"-o {link} (= {u / 's1.nii.gz'}): inside the --unlabeled folder"


PRETRAIN_CASES = {
    "output_is_an_input_image": lambda tmp_path, u, pre: (u / "s0.nii.gz", "inside the --unlabeled folder"),
    "output_inside_unlabeled": lambda tmp_path, u, pre: (u / "sub" / "ae.pth", "inside the --unlabeled folder"),
    "output_links_to_an_input": lambda tmp_path, u, pre: _symlink_to_input(tmp_path, u),
    "output_is_the_plans_file": lambda tmp_path, u, pre: (pre / "nnUNetPlans.json", "is an input"),
}


@pytest.mark.parametrize("case", sorted(PRETRAIN_CASES))
def test_pretrain_output_never_overwrites_an_input(nnunet_env, tmp_path, case):
    pre = _planned_dataset(nnunet_env["nnUNet_preprocessed"])
    u = _unlabeled(tmp_path)
    (tmp_path / "out").mkdir()
    if case == "output_inside_unlabeled":
        (u / "sub").mkdir()
    out, expected = PRETRAIN_CASES[case](tmp_path, u, pre)
    before = _tree(tmp_path)
    # one case as a real process, the others in-process (conftest.run_cli)
    proc = _pretrain(nnunet_env["env"], u, out, in_process=case != "output_is_an_input_image")
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and str(out.name) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert _tree(tmp_path) == before, "inputs untouched, nothing written"
    assert not [p for p in tmp_path.rglob(".*")], "no hidden cache or temporary file"


# nnU-Net's SimpleITK reader turns NaN voxels of a NIfTI into 0: an all-NaN file is refused as constant
@pytest.mark.parametrize("value,expected", [(0.0, "every voxel is 0 (a constant image"),
                                            (np.nan, "every voxel is 0 (a constant image; SimpleITK also reads an "
                                                     "all-NaN NIfTI as 0)"),
                                            (7.5, "every voxel is 7.5 (a constant image)")])
def test_pretrain_refuses_all_zero_or_all_nan_images(nnunet_env, tmp_path, value, expected):
    _planned_dataset(nnunet_env["nnUNet_preprocessed"])
    u = _unlabeled(tmp_path, values=value)
    out = tmp_path / "out" / "ae.pth"
    out.parent.mkdir()
    before = _tree(tmp_path)
    proc = _pretrain(nnunet_env["env"], u, out)
    assert proc.returncode == 2 and f"{u / 's0.nii.gz'}: {expected}" in proc.stderr, proc.stderr
    assert _tree(tmp_path) == before and list(out.parent.iterdir()) == []


def test_non_finite_voxels_are_refused_where_a_reader_keeps_them():
    from nnunet_pvs.errors import UserError
    from nnunet_pvs.pretrain_autoencoder import check_image_values

    data = np.ones((1, 4, 4, 4), np.float32)
    data[0, 1, 2, 3] = np.inf
    with pytest.raises(UserError, match=r"^x.nii.gz: 1 of 64 voxels are NaN or infinite; "):
        check_image_values(Path("x.nii.gz"), data)
    with pytest.raises(UserError, match=r"64 of 64 voxels are NaN or infinite \(the whole image\)"):
        check_image_values(Path("x.nii.gz"), np.full((1, 4, 4, 4), np.nan, np.float32))
    check_image_values(Path("x.nii.gz"), np.arange(64, dtype=np.float32).reshape(1, 4, 4, 4))


def test_pretrain_sigterm_removes_the_cache_and_a_killed_runs_cache_goes_next_time(nnunet_env, tmp_path):
    _planned_dataset(nnunet_env["nnUNet_preprocessed"])
    u = _unlabeled(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = _tree(u)
    cmd = [str(BIN / "nnunet-pvs"), "pretrain-autoencoder", "-d", "993", "-c", "3d_fullres", "--unlabeled", str(u),
           "-o", str(out_dir / "ae.pth"), "--epochs", "100000", "--iterations", "1", "--val-iterations", "1",
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=nnunet_env["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out_dir.glob(".ae_pretrain_cache_*/ae_losses.csv")):
        time.sleep(0.5)  # wait until it trains (the cache holds the volumes and the running losses)
    assert list(out_dir.glob(".ae_pretrain_cache_*")), "pretraining did not start"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(out_dir.iterdir()) == [], "cache and partial losses removed on SIGTERM"
    assert _tree(u) == before

    # SIGKILL cannot be caught: the next run in that folder removes what a dead run left
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = out_dir / f".ae_pretrain_cache_{dead.pid}-abc"
    stale.mkdir()
    (stale / "s0.npy").write_bytes(b"left over")
    (out_dir / f".ae.pth.tmp-{dead.pid}-xyz").write_bytes(b"half a checkpoint")
    done = _pretrain(nnunet_env["env"], u, out_dir / "ae.pth")
    assert done.returncode == 0, done.stderr
    assert f"removed {stale.name}, left by an interrupted earlier run" in done.stdout
    assert sorted(p.name for p in out_dir.iterdir()) == ["ae.pth", "ae_losses.csv", "ae_losses.png"]


# ------------------------------------------------------------------------------------------------
# the trainers under nnUNetv2_train

@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A tiny 3D dataset planned once for this module's nnUNetv2_train runs."""
    root = tmp_path_factory.mktemp("badtrain")
    env, dirs = nnunet_folders(root)
    write_tiny_dataset(dirs["nnUNet_raw"], 983, "TinyBad", n_cases=5, shape=(32, 32, 32), spacing=(1.0, 1.0, 1.0),
                       seed=9, n_test=0, channel="T1w")
    run_cli([BIN / "nnUNetv2_plan_and_preprocess", "-d", "983", "-c", "3d_fullres", "-np", "1"], env=env)
    # an autoencoder file made for another dataset whose plan has a 16^3 patch (4 stages, not 5)
    other = dirs["nnUNet_preprocessed"] / "Dataset984_OtherPlan"
    other.mkdir()
    plans = copy.deepcopy(TINY_PLANS)
    plans["dataset_name"] = other.name
    plans["configurations"]["3d_fullres"]["patch_size"] = [16, 16, 16]
    (other / "nnUNetPlans.json").write_text(json.dumps(plans))
    (other / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1w"}, "labels": {"background": 0, "PVS": 1},
                                                    "numTraining": 5, "file_ending": ".nii.gz"}))
    u = root / "unlabeled"
    u.mkdir()
    for i in range(2):
        _img(u / f"s{i}.nii.gz", seed=i)
    ae = root / "ae_other_plan.pth"
    proc = _pretrain(env, u, ae, dataset="984")
    assert proc.returncode == 0, proc.stderr
    return env, dirs, root


def _train(env, fold, extra, budget=None):
    return run_cli([BIN / "nnUNetv2_train", "983", "3d_fullres", str(fold), "-tr", "nnUNetTrainerAEUNet_budget",
                    "-device", "cpu", *extra], env={**env, **(budget or {})}, check=False)


def _not_a_checkpoint(root: Path) -> Path:
    p = root / "notes.pth"
    p.write_text("these are not weights")
    return p


TRAIN_CASES = {
    "pretrained_from_another_plan": (
        lambda root: root / "ae_other_plan.pth", None,
        ["does not fit this run (Dataset983_TinyBad 3d_fullres nnUNetPlans)",
         "dataset Dataset984_OtherPlan in the file, Dataset983_TinyBad here",
         "patch 16 x 16 x 16 in the file, 32 x 32 x 32 here", "4 stages in the file, 5 here",
         "nnunet-pvs pretrain-autoencoder -d Dataset983_TinyBad"]),
    "pretrained_file_missing": (lambda root: root / "missing.pth", None, ["missing.pth: file not found"]),
    "pretrained_not_a_checkpoint": (_not_a_checkpoint, None, ["notes.pth: cannot be read as a checkpoint"]),
    "budget_not_a_number": (None, {"NNUNET_PVS_EPOCHS": "ten"}, ["NNUNET_PVS_EPOCHS='ten': must be a positive integer"]),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_trainer_bad_input_is_one_line_and_leaves_nothing(planned, case):
    env, dirs, root = planned
    make_file, budget, expected = TRAIN_CASES[case]
    extra = ["-pretrained_weights", str(make_file(root))] if make_file else []
    inputs_before = _tree(root / "unlabeled"), _tree(dirs["nnUNet_preprocessed"])
    proc = _train(env, 0, extra, budget)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if "error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("nnUNetv2_train -tr nnUNetTrainerAEUNet_budget: error: ")
    for e in expected:
        assert e in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and "AssertionError" not in proc.stderr
    assert (_tree(root / "unlabeled"), _tree(dirs["nnUNet_preprocessed"])) == inputs_before
    results = dirs["nnUNet_results"]
    assert not [p for p in results.rglob("*") if p.is_file()], "no log, checkpoint or plans written"
