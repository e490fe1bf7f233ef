"""``nnunet-pvs compare`` on real training results: a tiny phantom, two models trained through
``nnUNetv2_train`` with the ``_budget`` trainers, compared with frangi, a re-predicted checkpoint
and Cai's protocol. The fixture trains once per module; every test reads its reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import BIN, nnunet_folders, run_cli

pytestmark = pytest.mark.e2e

CLI = Path(sys.executable).parent / "nnunet-pvs"
DID = "951"
STOCK = "nnUNetTrainer_budget:2d"
MFNS = "nnUNetTrainerMfNSDe_budget:2d"
BEST = f"{STOCK}@checkpoint_best.pth"
BUDGETS = {STOCK: {"NNUNET_PVS_EPOCHS": "10", "NNUNET_PVS_ITERATIONS": "2"},
           MFNS: {"NNUNET_PVS_EPOCHS": "10", "NNUNET_PVS_ITERATIONS": "1"}}
FOLDS = ("0", "1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_e2e")
    env, dirs = nnunet_folders(root, OMP_NUM_THREADS="1", NNUNET_PVS_VAL_ITERATIONS="1")
    run_cli([CLI, "phantom", "--size", "tiny", "--subjects", "5", "-d", DID], env=env)
    run_cli([BIN / "nnUNetv2_plan_and_preprocess", "-d", DID, "-c", "2d", "-np", "1"], env=env)
    # Cai's groups: fold k tests on group k, validates on another, trains on three
    run_cli([CLI, "splits", "-d", DID, "--protocol", "cai"], env=env)
    name = next(p.name for p in dirs["nnUNet_raw"].iterdir() if p.name.startswith(f"Dataset{DID}_"))
    splits = json.loads((dirs["nnUNet_preprocessed"] / name / "splits_final.json").read_text())
    assert len({splits[int(f)]["val"][0] for f in FOLDS}) == len(FOLDS)  # distinct validation cases
    for spec, budget in BUDGETS.items():
        trainer, config = spec.split(":")
        for f in FOLDS:
            run_cli([BIN / "nnUNetv2_train", DID, config, f, "-tr", trainer, "-device", "cpu"], env={**env, **budget})
    reports = {}
    cv = root / "report_cv"
    reports["cv"] = run_cli([CLI, "compare", "-d", DID, "--models", MFNS, STOCK, BEST, "frangi", "--folds", *FOLDS,
                             "--device", "cpu", "--n-boot", "200", "--no-plots", "-o", cv], env=env)
    cai = root / "report_cai"
    reports["cai"] = run_cli([CLI, "compare", "-d", DID, "--models", MFNS, STOCK, "frangi", "--folds", *FOLDS,
                              "--cv-protocol", "cai", "--device", "cpu", "--n-boot", "200", "--no-plots", "-o", cai],
                             env=env)
    results = dirs["nnUNet_results"] / name
    return {"env": env, "root": root, "name": name, "splits": splits, "results": results, "reports": reports,
            "dirs": dirs,
            "tests": json.loads((dirs["nnUNet_preprocessed"] / name / "test_groups.json").read_text())["folds"]}


def _folder(spec: str) -> str:
    trainer, config = spec.split("@")[0].split(":")
    return f"{trainer}__nnUNetPlans__{config}"


def _nnunet_ema(results: Path, spec: str, fold: str) -> list[float]:
    ckpt = torch.load(results / _folder(spec) / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)
    return [float(v) for v in ckpt["logging"]["ema_fg_dice"]]


def test_report_names_every_model_budget_checkpoint_and_convergence(trained):
    from nnunet_pvs.compare.training_progress import CONVERGED, NOT_CONVERGED, NOT_LEARNING, verdict

    out = trained["root"] / "report_cv"
    md = (out / "report.md").read_text()
    models = pd.read_csv(out / "models.csv").set_index("model")
    assert list(models.index) == [MFNS, STOCK, BEST, "frangi"]
    assert models.loc[STOCK, "budget"] == "10 epochs x 2 iterations"
    assert models.loc[MFNS, "budget"] == "10 epochs x 1 iteration"
    assert models.loc[STOCK, "checkpoint"] == "checkpoint_final.pth (nnU-Net validation outputs)"
    assert models.loc["frangi", "budget"] == "tuned on training folds"
    # the checkpoint's own epoch, as nnU-Net stored it
    best_epoch = {int(torch.load(trained["results"] / _folder(STOCK) / f"fold_{f}" / "checkpoint_best.pth",
                                 map_location="cpu", weights_only=False)["current_epoch"]) for f in FOLDS}
    assert models.loc[BEST, "checkpoint"].startswith("checkpoint_best.pth (after ")
    assert all(str(e) in models.loc[BEST, "checkpoint"] for e in best_epoch)
    # convergence: our verdict from the logs equals the rule applied to nnU-Net's own EMA series
    for spec in (STOCK, MFNS):
        verdicts = {f: verdict(_nnunet_ema(trained["results"], spec, f))[0] for f in FOLDS}
        folds_with = lambda v: [str(f) for f, x in verdicts.items() if x == v]  # noqa: E731
        flat, bad = folds_with(NOT_LEARNING), folds_with(NOT_CONVERGED)
        flag = models.loc[spec, "convergence"]
        parts = [f"{name} (fold{'s' if len(fs) > 1 else ''} {', '.join(fs)})"
                 for name, fs in ((NOT_LEARNING, flat), (NOT_CONVERGED, bad)) if fs]
        if parts:
            assert flag == "; ".join(parts)
        else:
            assert set(verdicts.values()) == {CONVERGED} and flag == CONVERGED
    for m in models.index:  # every model's row in report.md carries its checkpoint, budget and flag
        row = next(line for line in md.splitlines() if line.startswith(f"| {m} |"))
        for col in ("checkpoint", "budget", "convergence"):
            assert str(models.loc[m, col]) in row
    assert "**Warning:** models were trained with different budgets" in md
    assert "WARNING: models were trained with different budgets" in trained["reports"]["cv"].stderr
    assert f"- Baseline: **{STOCK}**" in md


def test_cross_validation_cases_and_reprediction(trained):
    out = trained["root"] / "report_cv"
    t2 = pd.read_csv(out / "table2_voxel.csv", index_col="case")
    val = sorted(trained["splits"][int(f)]["val"][0] for f in FOLDS)
    assert sorted(t2.index[:-2]) == val
    st = pd.read_csv(out / "stats.csv")
    assert set(st["model"]) == {MFNS, BEST, "frangi"}
    # the re-predicted checkpoint: cached NIfTIs whose Dice is the table's, computed here from the files
    pred_root = trained["root"] / "report_cv_predictions" / _folder(STOCK) / "checkpoint_best"
    raw = trained["dirs"]["nnUNet_raw"] / trained["name"]
    for f in FOLDS:
        case = trained["splits"][int(f)]["val"][0]
        pred = np.asarray(nib.load(str(pred_root / f"fold_{f}_val" / f"{case}.nii.gz")).dataobj) > 0
        ref = np.asarray(nib.load(str(raw / "labelsTr" / f"{case}.nii.gz")).dataobj) > 0
        denom = pred.sum() + ref.sum()
        assert t2.loc[case, f"{BEST}|dice"] == pytest.approx(2 * (pred & ref).sum() / denom if denom else 1.0)
    tun = pd.read_csv(out / "classical_tuning.csv")
    assert list(tun["fold"]) == [f"fold_{f}" for f in FOLDS] and (tun["n_train"] == 3).all()
    # a re-run reuses the cached predictions: nothing is predicted again
    again = run_cli([CLI, "compare", "-d", DID, "--models", MFNS, STOCK, BEST, "frangi", "--folds", *FOLDS,
                     "--device", "cpu", "--n-boot", "200", "--no-plots", "-o", out], env=trained["env"])
    assert "predicting" not in again.stderr and "frangi: tune" not in again.stderr


def test_cai_protocol_scores_each_test_subject_once(trained):
    out = trained["root"] / "report_cai"
    per_case = pd.read_csv(out / "per_case_metrics.csv")
    whole = per_case[per_case.region == "whole"]
    tests = {c: g["fold"] for g in trained["tests"] if str(g["fold"]) in FOLDS for c in g["test"]}
    assert sorted(whole["case"].unique()) == sorted(tests)
    for case, fold in tests.items():       # scored by the fold model that never trained on it
        assert set(whole.loc[whole.case == case, "fold"]) == {fold}
        assert case not in trained["splits"][fold]["train"] and case not in trained["splits"][fold]["val"]
    assert whole.groupby(["model", "case"]).size().max() == 1
    md = (out / "report.md").read_text()
    assert "Cai et al. protocol" in md and "checkpoint_final.pth" in md
    assert set(pd.read_csv(out / "stats.csv")["model"]) == {MFNS, "frangi"}
    tun = pd.read_csv(out / "classical_tuning.csv")
    assert (tun["n_train"] == 3).all() and (tun["n_targets"] == 1).all()
