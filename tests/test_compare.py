"""``nnunet-pvs compare`` on fabricated nnU-Net results folders with known overlaps.

Each case's reference is a straight run of 10 voxels along x; each model's prediction of it is the
run x in [start, stop), so TP/FP/FN, and hence Dice, SEN and PPV, are known by hand.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sst

from conftest import run_cli

CLI = Path(sys.executable).parent / "nnunet-pvs"
DATASET = "Dataset042_CmpTest"
SHAPE = (16, 6, 6)
REF_RUN = (2, 12)   # reference voxels x in [2, 12) at y = z = 3
N_CASES = 10
CASES = [f"case_{i:03d}" for i in range(N_CASES)]
FOLD_OF = {c: i % 5 for i, c in enumerate(CASES)}
BASE = "nnUNetTrainer:3d_fullres"
MFNS = "nnUNetTrainerMfNSDe:2d"
TWO_D = "nnUNetTrainer:2d"

# model -> per-case (start, stop) of the predicted run
RUNS = {
    BASE: [(2, 10), (3, 12), (2, 12), (4, 12), (1, 11), (2, 9), (0, 12), (5, 12), (2, 11), (3, 13)],
    MFNS: [(2, 12), (2, 12), (2, 13), (3, 12), (2, 12), (2, 11), (1, 12), (3, 12), (2, 12), (2, 12)],
    TWO_D: [(2, 9), (3, 11), (2, 12), (5, 12), (1, 10), (2, 9), (0, 13), (6, 12), (2, 10), (4, 13)],
}
EPOCHS = {BASE: (6, 2.5), MFNS: (4, 1.0), TWO_D: (3, 0.5)}  # epochs per fold, seconds per epoch


def hand_metrics(run):
    a, b = REF_RUN
    s, e = run
    tp = max(0, min(b, e) - max(a, s))
    fp = (e - s) - tp
    fn = (b - a) - tp
    return {"dice": 2 * tp / (2 * tp + fp + fn), "sensitivity": tp / (tp + fn), "ppv": tp / (tp + fp)}


def _write(path: Path, run=None, ref=False):
    arr = np.zeros(SHAPE, np.uint8)
    s, e = REF_RUN if ref else run
    arr[s:e, 3, 3] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([1.0, 1.0, 1.0, 1.0])), str(path))


def model_folder(results: Path, spec: str) -> Path:
    parts = spec.split(":")
    plans = parts[2] if len(parts) == 3 else "nnUNetPlans"
    return results / DATASET / f"{parts[0]}__{plans}__{parts[1]}"


def make_dataset(env: dict, models=(BASE, MFNS, TWO_D)):
    raw, results = env["nnUNet_raw"], env["nnUNet_results"]
    ds = raw / DATASET
    for c in CASES:
        _write(ds / "labelsTr" / f"{c}.nii.gz", ref=True)
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2"}, "labels": {"background": 0, "PVS": 1},
                                                 "numTraining": N_CASES, "file_ending": ".nii.gz"}))
    for m in models:
        folder = model_folder(results, m)
        n_ep, sec = EPOCHS[m]
        for fold in range(5):
            fd = folder / f"fold_{fold}"
            (fd / "validation").mkdir(parents=True)
            torch.save({}, fd / "checkpoint_final.pth")  # a safe file without nnU-Net's keys: progress from the logs
            (fd / "validation" / "summary.json").write_text("{}")
            log = []
            for ep in range(n_ep):
                log += [f"2026-01-01 10:00:{ep:02d}.000000: ", f"2026-01-01 10:00:{ep:02d}.000001: Epoch {ep} ",
                        f"2026-01-01 10:00:{ep:02d}.000002: Current learning rate: 0.01 ",
                        f"2026-01-01 10:00:{ep:02d}.000003: Epoch time: {sec + 0.1 * fold} s "]
            (fd / "training_log_2026_1_1_10_00_00.txt").write_text("\n".join(log) + "\n")
        for c, run in zip(CASES, RUNS[m]):
            _write(folder / f"fold_{FOLD_OF[c]}" / "validation" / f"{c}.nii.gz", run)


def compare_cmd(out: Path, *extra, models=(MFNS, BASE, TWO_D)):
    return [CLI, "compare", "-d", "42", "--models", *models, "--baseline", BASE, "-o", out,
            "--n-boot", "2000", "--no-plots", *extra]


def test_table_stats_and_cost_match_hand_computation(nnunet_env, tmp_path):
    make_dataset(nnunet_env)
    out = tmp_path / "report"
    proc = run_cli([*compare_cmd(out)[:-1]], env=nnunet_env["env"])  # with plots
    assert "report:" in proc.stdout
    assert {"report.md", "per_case_metrics.csv", "table2_voxel.csv", "table_cluster.csv", "stats.csv",
            "training_cost.csv", "folds.csv", "boxplots.png", "differences.png"} <= {p.name for p in out.iterdir()}

    expected = {m: pd.DataFrame([hand_metrics(r) for r in RUNS[m]], index=CASES) for m in RUNS}
    t2 = pd.read_csv(out / "table2_voxel.csv", index_col="case")
    for m, exp in expected.items():
        for metric in ("dice", "sensitivity", "ppv"):
            got = t2.loc[CASES, f"{m}|{metric}"].to_numpy(float)
            np.testing.assert_allclose(got, exp[metric].to_numpy(), rtol=0, atol=1e-12)
            assert t2.loc["mean", f"{m}|{metric}"] == pytest.approx(exp[metric].mean(), abs=1e-12)
            assert t2.loc["std", f"{m}|{metric}"] == pytest.approx(exp[metric].std(ddof=1), abs=1e-12)
    # single-cluster cases: a detected cluster iff the runs overlap
    tc = pd.read_csv(out / "table_cluster.csv", index_col="case")
    assert (tc.loc[CASES, f"{MFNS}|cluster_tpr"] == 1.0).all()

    st = pd.read_csv(out / "stats.csv")
    st = st[st["region"] == "whole"]
    assert set(st["model"]) == {MFNS, TWO_D}
    for metric in ("dice", "sensitivity", "ppv"):
        fam = st[st["metric"] == metric].set_index("model")
        ps = {}
        for m in (MFNS, TWO_D):
            x, y = expected[m][metric].to_numpy(), expected[BASE][metric].to_numpy()
            ref = sst.wilcoxon(x, y)
            assert fam.loc[m, "wilcoxon_W"] == pytest.approx(float(ref.statistic), abs=1e-9)
            assert fam.loc[m, "p"] == pytest.approx(float(ref.pvalue), rel=1e-9)
            assert fam.loc[m, "n_pairs"] == N_CASES
            assert fam.loc[m, "median_diff"] == pytest.approx(float(np.median(x - y)), abs=1e-12)
            assert fam.loc[m, "ci95_low"] <= fam.loc[m, "median_diff"] <= fam.loc[m, "ci95_high"]
            ps[m] = float(ref.pvalue)
        # Holm by hand over the two models tested on this metric
        (m1, p1), (m2, p2) = sorted(ps.items(), key=lambda kv: kv[1])
        h1 = min(1.0, 2 * p1)
        h2 = max(h1, min(1.0, p2))
        assert fam.loc[m1, "p_holm"] == pytest.approx(h1, rel=1e-9)
        assert fam.loc[m2, "p_holm"] == pytest.approx(h2, rel=1e-9)

    cost = pd.read_csv(out / "training_cost.csv").set_index("model")
    for m, (n_ep, sec) in EPOCHS.items():
        assert cost.loc[m, "epochs_total"] == 5 * n_ep
        assert str(cost.loc[m, "epochs_per_fold"]) == str(n_ep)
        assert cost.loc[m, "s_per_epoch_mean"] == pytest.approx(sec + 0.2, abs=1e-9)  # folds add 0.0..0.4

    md = (out / "report.md").read_text()
    assert "All requested models are complete" in md
    # the mean row bolds the best mean Dice (MfNS_De's here)
    mean_row = next(line for line in md.splitlines() if line.startswith("| **mean**"))
    best = f"**{expected[MFNS]['dice'].mean():.3f}**"
    assert best in mean_row
    assert f"{expected[BASE]['dice'].mean():.3f}" in mean_row and f"**{expected[BASE]['dice'].mean():.3f}**" not in mean_row
    assert "![per-metric box plots](boxplots.png)" in md


def test_refuses_mismatched_case_sets(nnunet_env, tmp_path):
    make_dataset(nnunet_env)
    (model_folder(nnunet_env["nnUNet_results"], TWO_D) / "fold_3" / "validation" / "case_003.nii.gz").unlink()
    out = tmp_path / "report"
    proc = run_cli(compare_cmd(out), env=nnunet_env["env"], check=False)
    assert proc.returncode == 2, proc.stderr
    assert "different case sets" in proc.stderr
    assert f"{TWO_D} lacks 1 case(s): case_003" in proc.stderr
    assert not out.exists()


def test_missing_and_training_folds_are_listed_and_excluded(nnunet_env, tmp_path):
    make_dataset(nnunet_env)
    res = nnunet_env["nnUNet_results"]
    shutil.rmtree(model_folder(res, TWO_D) / "fold_4")
    mfns2 = model_folder(res, MFNS) / "fold_2"
    (mfns2 / "checkpoint_final.pth").unlink()   # still training: no final checkpoint, not validated
    (mfns2 / "validation" / "summary.json").unlink()
    out = tmp_path / "report"
    proc = run_cli(compare_cmd(out, models=(BASE, MFNS, TWO_D, "nnUNetTrainerAEUNet:3d_fullres")),
                   env=nnunet_env["env"], check=False)
    # only the baseline is complete: nothing to compare, and the error lists why
    assert proc.returncode == 2
    assert "fold 2 still training (no checkpoint_final.pth)" in proc.stderr and "fold 4 missing" in proc.stderr
    assert "nnUNetTrainerAEUNet:3d_fullres: not trained" in proc.stderr

    # restore MfNS_De: it and the baseline are compared; the 2d model and the AE U-Net are excluded
    torch.save({}, mfns2 / "checkpoint_final.pth")
    (mfns2 / "validation" / "summary.json").write_text("{}")
    proc = run_cli(compare_cmd(out, models=(BASE, MFNS, TWO_D, "nnUNetTrainerAEUNet:3d_fullres")),
                   env=nnunet_env["env"])
    md = (out / "report.md").read_text()
    head = md.split("## Voxel-level")[0]
    assert "Models excluded" in head
    assert re.search(rf"\*\*{re.escape(TWO_D)}\*\*: fold 4 missing", head)
    assert "**nnUNetTrainerAEUNet:3d_fullres**: not trained (no results folder" in head
    t2 = pd.read_csv(out / "table2_voxel.csv", index_col="case")
    assert {c.split("|")[0] for c in t2.columns} == {BASE, MFNS}
    folds = pd.read_csv(out / "folds.csv")
    assert folds[(folds.model == TWO_D) & (folds.fold == 4)]["status"].item() == "missing"

    # the Python entry point: same options, returns the report path; a still-training fold is listed
    (mfns2 / "checkpoint_final.pth").unlink()
    (mfns2 / "validation" / "summary.json").unlink()
    from nnunet_pvs.compare import compare
    out2 = tmp_path / "report_py"
    from nnunet_pvs.errors import UserError

    with pytest.raises(UserError, match="no complete model besides the baseline"):
        compare(DATASET, [BASE, MFNS], out2, n_boot=100, plots=False)
    torch.save({}, mfns2 / "checkpoint_final.pth")
    (mfns2 / "validation" / "summary.json").write_text("{}")
    path = compare(DATASET, [BASE, MFNS, TWO_D], out2, baseline=BASE, n_boot=100, plots=False)
    assert path == out2.resolve() / "report.md" and path.is_file()
    assert f"**{TWO_D}**: fold 4 missing" in path.read_text().split("## Voxel-level")[0]


def test_validation_not_finished_counts_as_incomplete(nnunet_env, tmp_path):
    make_dataset(nnunet_env)
    (model_folder(nnunet_env["nnUNet_results"], TWO_D) / "fold_1" / "validation" / "summary.json").unlink()
    out = tmp_path / "r"
    run_cli(compare_cmd(out), env=nnunet_env["env"])
    head = (out / "report.md").read_text().split("## Voxel-level")[0]
    assert f"**{TWO_D}**: fold 1 validation missing (no validation/summary.json)" in head


def test_bad_input_errors(nnunet_env, tmp_path):
    make_dataset(nnunet_env)
    env = nnunet_env["env"]
    p = run_cli([CLI, "compare", "-d", "777", "--models", BASE, MFNS, "-o", tmp_path / "x"], env=env, check=False)
    assert p.returncode == 2 and "dataset id 777: no Dataset777_* folder" in p.stderr
    p = run_cli([CLI, "compare", "-d", "42", "--models", "nnUNetTrainer", MFNS, "-o", tmp_path / "x"], env=env,
                check=False)
    assert p.returncode == 2 and "expected Trainer:config" in p.stderr
    # a prediction whose geometry differs from its reference: the error names model and case
    bad = model_folder(nnunet_env["nnUNet_results"], MFNS) / "fold_0" / "validation" / "case_005.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 6, 6), np.uint8), np.eye(4)), str(bad))
    p = run_cli(compare_cmd(tmp_path / "y"), env=env, check=False)
    assert p.returncode == 2 and f"model {MFNS}: case_005" in p.stderr
    # a non-report folder is never overwritten
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    _write(bad, RUNS[MFNS][5])
    p = run_cli(compare_cmd(keep), env=env, check=False)
    assert p.returncode == 2 and (keep / "precious.txt").exists()


def test_test_set_mode_predicts_with_nnunetv2_predict(nnunet_env, tmp_path):
    """--test-set runs nnUNetv2_predict per model (a stand-in on PATH records its arguments and writes
    predictions), evaluates against --labels, and reuses complete predictions on a re-run."""
    make_dataset(nnunet_env)
    ds = nnunet_env["nnUNet_raw"] / DATASET
    for c in CASES[:4]:
        _write(ds / "imagesTs" / f"{c}_0000.nii.gz", ref=True)
        _write(ds / "labelsTs" / f"{c}.nii.gz", ref=True)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "calls.txt"
    fake = fake_bin / "nnUNetv2_predict"
    fake.write_text(f"""#!{sys.executable}
import sys, os, pathlib, nibabel as nib, numpy as np
a = sys.argv[1:]
open({str(calls)!r}, "a").write(" ".join(a) + "\\n")
out = pathlib.Path(a[a.index("-o") + 1]); out.mkdir(parents=True, exist_ok=True)
inp = pathlib.Path(a[a.index("-i") + 1])
stop = 12 if "MfNSDe" in a[a.index("-tr") + 1] else 9
for p in inp.glob("*_0000.nii.gz"):
    arr = np.zeros({SHAPE}, np.uint8); arr[2:stop, 3, 3] = 1
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(out / p.name.replace("_0000", "")))
""")
    fake.chmod(0o755)
    env = {**nnunet_env["env"], "PATH": f"{fake_bin}{os.pathsep}{nnunet_env['env']['PATH']}"}
    out = tmp_path / "rep"
    cmd = [CLI, "compare", "-d", "42", "--models", BASE, MFNS, "--test-set", "imagesTs", "--labels", "labelsTs",
           "--device", "cpu", "--n-boot", "200", "--no-plots", "-o", out]
    run_cli(cmd, env=env)
    lines = calls.read_text().splitlines()
    assert len(lines) == 2
    assert any("-tr nnUNetTrainerMfNSDe -p nnUNetPlans -f 0 1 2 3 4 -device cpu" in x and "-c 2d" in x for x in lines)
    t2 = pd.read_csv(out / "table2_voxel.csv", index_col="case")
    assert list(t2.index[:-2]) == CASES[:4]
    assert (t2.loc[CASES[:4], f"{MFNS}|dice"] == 1.0).all()
    assert t2.loc[CASES[0], f"{BASE}|dice"] == pytest.approx(hand_metrics((2, 9))["dice"])
    assert "test set" in (out / "report.md").read_text()
    run_cli(cmd, env=env)  # predictions complete: not predicted again
    assert len(calls.read_text().splitlines()) == 2


def test_evaluation_options_reach_tables_and_tests(nnunet_env, tmp_path):
    """compare takes evaluate's metric options: a challenge protocol and extra metrics enter
    per_case_metrics.csv and the paired tests, with values equal to a hand computation."""
    make_dataset(nnunet_env)
    out = tmp_path / "report"
    run_cli(compare_cmd(out, "--eval-protocol", "valdo", "--metrics", "iou,valdo_f1"), env=nnunet_env["env"])
    per_case = pd.read_csv(out / "per_case_metrics.csv")
    whole = per_case[per_case.region == "whole"]
    for m, runs in RUNS.items():
        rows = whole[whole.model == m].set_index("case").loc[CASES]
        a, b = REF_RUN
        iou = [max(0, min(b, e) - max(a, s)) / (max(b, e) - min(a, s)) for s, e in runs]
        np.testing.assert_allclose(rows["iou"].to_numpy(float), iou, atol=1e-12)
        # one reference and one predicted cluster per case: VALDO F1 is 1 iff IoU > 0.1 (strictly)
        np.testing.assert_allclose(rows["valdo_f1"].to_numpy(float), [1.0 if v > 0.1 else 0.0 for v in iou])
    st = pd.read_csv(out / "stats.csv")
    assert {"iou", "valdo_f1", "dice"} <= set(st["metric"])
    bad = run_cli(compare_cmd(tmp_path / "r2", "--metrics", "not_a_metric"), env=nnunet_env["env"], check=False)
    assert bad.returncode == 2 and "not_a_metric" in bad.stderr and not (tmp_path / "r2").exists()
