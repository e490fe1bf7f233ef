"""The whole chain a user runs, through the command lines only, on the smallest phantom:
phantom -> splits -> plan -> train (budget trainers via their variables, MfNS_De and stock) ->
predict with probabilities -> evaluate (on .npz and on NIfTI) -> compare -> census.

Each step asserts what a user relies on: the fold's validation cases are those of the
``splits_final.json`` that ``splits`` wrote; the training log shows the budget that was asked
for; evaluate's Dice equals one computed here from the files; the compare report names every
model with its budget and checkpoint; the census counts the clusters in the predictions.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import run_cli

BIN = Path(sys.executable).parent
CLI = BIN / "nnunet-pvs"
DATASET = 61
NAME = "Dataset061_PVSPhantomT2w"
MODELS = ("nnUNetTrainerMfNSDe_budget", "nnUNetTrainer_budget")


def _load(p: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(p)).dataobj)


@pytest.mark.e2e
def test_user_chain_through_the_command_lines(nnunet_env, tmp_path):
    env = dict(nnunet_env["env"], NNUNET_PVS_EPOCHS="2", NNUNET_PVS_ITERATIONS="3", NNUNET_PVS_VAL_ITERATIONS="1")
    raw = nnunet_env["nnUNet_raw"] / NAME
    results = nnunet_env["nnUNet_results"] / NAME

    run_cli([CLI, "phantom", "--size", "tiny", "-d", DATASET, "--subjects", 6, "--test", 2], env=env)
    run_cli([BIN / "nnUNetv2_plan_and_preprocess", "-d", DATASET, "-c", "2d", "-np", 1, "-npfp", 1], env=env)
    run_cli([CLI, "splits", "-d", DATASET, "--by", "age"], env=env)
    splits = json.loads((nnunet_env["nnUNet_preprocessed"] / NAME / "splits_final.json").read_text())
    assert len(splits) == 5

    for trainer in MODELS:
        run_cli([BIN / "nnUNetv2_train", DATASET, "2d", 0, "-tr", trainer, "-device", "cpu"], env=env, timeout=1800)
        fold = results / f"{trainer}__nnUNetPlans__2d" / "fold_0"
        validated = sorted(p.name[: -len(".nii.gz")] for p in (fold / "validation").glob("*.nii.gz"))
        assert validated == sorted(splits[0]["val"]), "nnUNetv2_train did not use the splits written by splits"
        log = next(fold.glob("training_log_*.txt")).read_text()
        assert "Epoch 1" in log and "Epoch 2" not in log  # 2 epochs (0 and 1), as NNUNET_PVS_EPOCHS asked
        assert re.search(r"nnunet-pvs budget: 2 epochs x 3 iterations", log), log[-2000:]

    pred = tmp_path / "pred"
    run_cli([BIN / "nnUNetv2_predict", "-i", raw / "imagesTs", "-o", pred, "-d", DATASET, "-c", "2d",
             "-tr", MODELS[0], "-f", 0, "--save_probabilities", "-device", "cpu", "-npp", 1, "-nps", 1], env=env)
    cases = sorted(p.name[: -len(".nii.gz")] for p in pred.glob("*.nii.gz"))
    assert cases == ["pvs006", "pvs007"] and all((pred / f"{c}.npz").exists() for c in cases)

    # evaluate: from the probability files and from the NIfTI masks; Dice checked against the files
    for kind, src in (("npz", pred), ("nifti", tmp_path / "pred_nifti")):
        if kind == "nifti":
            src.mkdir()
            for c in cases:
                (src / f"{c}.nii.gz").write_bytes((pred / f"{c}.nii.gz").read_bytes())
        out = tmp_path / f"eval_{kind}"
        run_cli([CLI, "evaluate", "--ref", raw / "labelsTs", "--pred", src, "-o", out], env=env)
        per_case = pd.read_csv(out / "per_case.csv")
        row = per_case[(per_case.case == cases[0]) & (per_case.region == "whole")].iloc[0]
        ref = _load(raw / "labelsTs" / f"{cases[0]}.nii.gz") > 0
        if kind == "npz":
            prob = np.load(pred / f"{cases[0]}.npz")["probabilities"][1]  # (z, y, x)
            mask = np.transpose(prob, (2, 1, 0)) >= 0.5
        else:
            mask = _load(src / f"{cases[0]}.nii.gz") > 0
        expected = 2 * (ref & mask).sum() / max(ref.sum() + mask.sum(), 1) if (ref.any() or mask.any()) else np.nan
        assert row["dice"] == pytest.approx(expected, abs=1e-6, nan_ok=True)

    # compare: both networks and the classical baseline on fold 0
    report_dir = tmp_path / "report"
    run_cli([CLI, "compare", "-d", DATASET, "--models", *(f"{m}:2d" for m in MODELS), "frangi",
             "--baseline", f"{MODELS[1]}:2d", "--folds", 0, "--n-boot", 200, "--no-plots", "-o", report_dir],
            env=env, timeout=1800)
    report = (report_dir / "report.md").read_text()
    for m in MODELS:
        assert m in report
    assert "frangi" in report.lower()
    models = pd.read_csv(report_dir / "models.csv")
    nets = models[models.model.str.contains("nnUNetTrainer")]
    assert len(nets) == 2
    assert all("2" in str(b) and "3" in str(b) for b in nets["budget"])  # 2 epochs x 3 iterations
    assert all("checkpoint_final" in str(c) for c in nets["checkpoint"])

    # census of the predicted test subjects: one row per 26-connected cluster of each prediction
    census = tmp_path / "census"
    run_cli([CLI, "census", "-i", pred, "-o", census, "--regions", raw / "regions", "--images", raw / "imagesTs"],
            env=env)
    clusters = pd.read_csv(census / "clusters.csv")
    for c in cases:
        prob = np.load(pred / f"{c}.npz")["probabilities"][1]
        mask = np.transpose(prob, (2, 1, 0)) >= 0.5
        n = cc3d.connected_components(mask.astype(np.uint8), connectivity=26, return_N=True)[1]
        assert (clusters["case"] == c).sum() == n
    assert (census / "report.html").exists() and (census / "subjects.csv").exists()
