"""``nnunet-pvs compare``: model specs, baseline choice, budgets, convergence, deleted checkpoints,
the Frangi baseline and bad options, on fabricated nnU-Net results folders (see test_compare.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from test_compare import (BASE, CASES, CLI, DATASET, FOLD_OF, MFNS, REF_RUN, RUNS, SHAPE, hand_metrics, make_dataset,
                          model_folder)

from nnunet_pvs.compare.training_progress import (CONVERGED, NOT_CONVERGED, NOT_LEARNING, UNDETERMINED,
                                                  FoldProgress, model_verdict, ema_series,
                                                  fold_progress, verdict)

BUDGET = "nnUNetTrainer_budget:3d_fullres"


def _cmd(out: Path, *extra, models=(MFNS, BASE)):
    return [CLI, "compare", "-d", "42", "--models", *models, "-o", out, "--n-boot", "200", "--no-plots", *extra]


def write_log(fold_dir: Path, dice: list[float], iterations: int = 20, seconds: float = 1.0):
    """A training log as nnU-Net 2.8.1 writes it (numpy 2 reprs in the Pseudo dice line) and debug.json."""
    for old in fold_dir.glob("training_log_*.txt"):
        old.unlink()
    lines = []
    for ep, d in enumerate(dice):
        t = f"2026-01-01 10:{ep // 60:02d}:{ep % 60:02d}"
        lines += [f"{t}.000001: Epoch {ep} ", f"{t}.000002: Current learning rate: 0.01 ",
                  f"{t}.000003: train_loss -0.5 ", f"{t}.000004: val_loss -0.4 ",
                  f"{t}.000005: Pseudo dice [np.float32({d})] ", f"{t}.000006: Epoch time: {seconds} s "]
    (fold_dir / "training_log_2026_1_1_10_00_00.txt").write_text("\n".join(lines) + "\n")
    (fold_dir / "debug.json").write_text(json.dumps({"num_iterations_per_epoch": str(iterations),
                                                     "num_epochs": str(len(dice))}))


def test_convergence_rule_by_hand(tmp_path):
    assert ema_series([0.2, 0.4, 0.6]) == pytest.approx([0.2, 0.22, 0.258])
    # 10 epochs, last fifth = 2 epochs: compare ema[9] with ema[7]
    flat = [0.5] * 10
    assert verdict(ema_series(flat))[0] == CONVERGED
    rising = [0.1 * i for i in range(10)]
    ema = ema_series(rising)
    assert ema[9] - ema[7] > 0.01 and verdict(ema)[0] == NOT_CONVERGED
    assert verdict(ema_series([0.1, 0.9] * 4))[0] == UNDETERMINED     # 8 epochs: too few
    # background only: flat at 0 is not learning, not converged, whatever the number of epochs
    assert verdict(ema_series([0.0] * 12))[0] == NOT_LEARNING
    assert verdict(ema_series([0.0] * 3))[0] == NOT_LEARNING
    assert verdict(ema_series([0.0] * 11 + [0.2]))[0] == NOT_CONVERGED   # EMA 0.02: it started
    assert model_verdict([FoldProgress(0, verdict=NOT_LEARNING), FoldProgress(1, verdict=NOT_CONVERGED),
                          FoldProgress(2, verdict=CONVERGED)]) == (
        "not learning at this budget (fold 0); not converged at this budget (fold 1)")
    # rise of exactly 0.005 over the last fifth: converged
    almost = ema_series([0.5] * 10)
    almost[-1] = almost[-3] + 0.005
    assert verdict(almost)[0] == CONVERGED
    fd = tmp_path / "fold_0"
    fd.mkdir()
    write_log(fd, rising, iterations=7)
    p = fold_progress(fd, 0)
    assert p.epochs == 10 and p.iterations == 7 and p.source == "training log"
    assert p.ema == pytest.approx(ema, abs=1e-9) and p.verdict == NOT_CONVERGED


def test_budget_checkpoint_and_convergence_in_every_row_and_budget_warning(nnunet_env, tmp_path):
    make_dataset(nnunet_env, models=(BASE, MFNS))
    res = nnunet_env["nnUNet_results"]
    # stock nnU-Net under its budget name: 10 flat epochs x 20 iterations; MfNS_De 12 rising epochs x 5
    os.rename(model_folder(res, BASE), model_folder(res, BUDGET))
    for f in range(5):
        write_log(model_folder(res, BUDGET) / f"fold_{f}", [0.6] * 10, iterations=20)
        write_log(model_folder(res, MFNS) / f"fold_{f}", [0.05 * i for i in range(12)], iterations=5)
    out = tmp_path / "rep"
    proc = run_cli(_cmd(out, models=(MFNS, BUDGET)), env=nnunet_env["env"])
    assert "WARNING: models were trained with different budgets" in proc.stderr
    md = (out / "report.md").read_text()
    assert f"- Baseline: **{BUDGET}**" in md            # the stock budget variant is the default baseline
    assert "**Warning:** models were trained with different budgets" in md
    models = pd.read_csv(out / "models.csv").set_index("model")
    assert models.loc[BUDGET, "budget"] == "10 epochs x 20 iterations"
    assert models.loc[MFNS, "budget"] == "12 epochs x 5 iterations"
    assert models.loc[BUDGET, "convergence"] == CONVERGED
    assert models.loc[MFNS, "convergence"] == f"{NOT_CONVERGED} (folds 0, 1, 2, 3, 4)"
    assert models.loc[MFNS, "checkpoint"] == "checkpoint_final.pth (nnU-Net validation outputs)"
    for m in (MFNS, BUDGET):
        row = next(line for line in md.splitlines() if line.startswith(f"| {m} |"))
        assert models.loc[m, "budget"] in row and models.loc[m, "checkpoint"] in row
        assert models.loc[m, "convergence"] in row


def test_deleted_checkpoint_is_reported_and_still_compared_at_final(nnunet_env, tmp_path):
    make_dataset(nnunet_env, models=(BASE, MFNS))
    fold2 = model_folder(nnunet_env["nnUNet_results"], MFNS) / "fold_2"
    (fold2 / "checkpoint_final.pth").unlink()       # validation finished, checkpoint deleted to save space
    out = tmp_path / "rep"
    run_cli(_cmd(out), env=nnunet_env["env"])
    folds = pd.read_csv(out / "folds.csv")
    row = folds[(folds.model == MFNS) & (folds.fold == 2)]
    assert row["status"].item() == "checkpoint deleted"
    assert "still training" not in set(folds["status"])
    t2 = pd.read_csv(out / "table2_voxel.csv", index_col="case")
    assert FOLD_OF[CASES[2]] == 2     # its prediction comes from the fold whose checkpoint is gone
    assert t2.loc[CASES[2], f"{MFNS}|dice"] == pytest.approx(hand_metrics(RUNS[MFNS][2])["dice"])
    models = pd.read_csv(out / "models.csv").set_index("model")
    assert models.loc[MFNS, "checkpoint"].endswith("deleted in fold 2")
    # a checkpoint that is not there: the error names the file
    proc = run_cli(_cmd(tmp_path / "rep2", models=(BASE, f"{MFNS}@checkpoint_best_loss.pth")),
                   env=nnunet_env["env"], check=False)
    assert proc.returncode == 2
    assert f"{model_folder(nnunet_env['nnUNet_results'], MFNS) / 'fold_0' / 'checkpoint_best_loss.pth'} not found" \
        in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "rep2").exists()
    # cross-validation at @final without the checkpoint works; the Cai protocol needs the checkpoint
    proc = run_cli(_cmd(tmp_path / "rep3", "--protocol", "cai"), env=nnunet_env["env"], check=False)
    assert proc.returncode == 2 and "fold 2 checkpoint deleted" in proc.stderr


BAD_OPTIONS = [
    ({"alpha": 7}, "--alpha 7: must be strictly between 0 and 1"),
    ({"alpha": 0.0}, "--alpha 0.0: must be strictly between 0 and 1"),
    ({"n_boot": 0}, "--n-boot 0: must be a positive integer"),
    ({"n_boot": -3}, "--n-boot -3: must be a positive integer"),
    ({"num_processes": 0}, "--num-processes 0: must be a positive integer"),
    ({"seed": -1}, "--seed -1: must be a non-negative integer"),
    ({"geometry_tol": -1.0}, "--geometry-tol -1.0: must be a finite number"),
    ({"folds": [0, 0]}, "--folds 0 0: folds must be distinct"),
    ({"protocol": "cai", "test_set": "imagesTs"}, "cannot be combined with --test-set"),
    ({"frangi_ridges": "up"}, "--frangi-ridges 'up': choose auto, bright or dark"),
]


@pytest.mark.parametrize("kwargs, message", BAD_OPTIONS)
def test_bad_numbers_are_clear_errors(tmp_path, kwargs, message):
    from nnunet_pvs.compare import compare
    from nnunet_pvs.errors import UserError

    with pytest.raises(UserError) as e:   # checked before any folder is read
        compare("Dataset404_Nowhere", [BASE, MFNS], tmp_path / "rep", **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "rep").exists()


def test_bad_number_through_the_cli(nnunet_env, tmp_path):
    make_dataset(nnunet_env, models=(BASE, MFNS))
    out = tmp_path / "rep"
    proc = run_cli(_cmd(out, "--alpha", "7"), env=nnunet_env["env"], check=False)
    assert proc.returncode == 2 and "--alpha 7.0: must be strictly between 0 and 1" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_output_path_problems_are_reported_before_any_computation(nnunet_env, tmp_path):
    make_dataset(nnunet_env, models=(BASE, MFNS))
    env = nnunet_env["env"]
    a_file = tmp_path / "report.txt"
    a_file.write_text("mine")
    proc = run_cli(_cmd(a_file), env=env, check=False)
    assert proc.returncode == 2 and f"{a_file}: the report folder is a file, a folder is needed" in proc.stderr
    assert "compare: evaluate" not in proc.stderr and a_file.read_text() == "mine"
    proc = run_cli(_cmd(a_file / "sub"), env=env, check=False)
    assert proc.returncode == 2 and "is a file" in proc.stderr and "compare: evaluate" not in proc.stderr
    # a previous report is replaced as a whole: no file of the old run survives
    from nnunet_pvs.compare import compare

    out = tmp_path / "rep"
    compare(DATASET, [MFNS, BASE], out, n_boot=50, plots=False)
    (out / "stale.csv").write_text("old")
    compare(DATASET, [MFNS, BASE], out, n_boot=50, plots=False)
    assert not (out / "stale.csv").exists() and (out / "report.md").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rep")]
    if os.geteuid() != 0:  # root may write into read-only folders, so only a normal user can see this
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        proc = run_cli(_cmd(ro / "rep"), env=env, check=False)
        ro.chmod(0o755)
        assert proc.returncode == 2 and "no write permission" in proc.stderr


# ------------------------------------------------------------------ frangi on fabricated data

def write_images(env: dict, splits: bool = True):
    """imagesTr: a bright line where each reference run lies (x in [2, 12) at y = z = 3) on a noisy
    background, and nnU-Net's splits_final.json matching FOLD_OF."""
    ds = env["nnUNet_raw"] / DATASET
    for i, c in enumerate(CASES):
        rng = np.random.default_rng(i)
        img = 100 + rng.normal(0, 2, SHAPE)
        img[REF_RUN[0]:REF_RUN[1], 3, 3] += 60
        (ds / "imagesTr").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(img.astype(np.float32), np.eye(4)), str(ds / "imagesTr" / f"{c}_0000.nii.gz"))
    if splits:
        pre = env["nnUNet_preprocessed"] / DATASET
        pre.mkdir(parents=True, exist_ok=True)
        folds = [{"train": [c for c in CASES if FOLD_OF[c] != k], "val": [c for c in CASES if FOLD_OF[c] == k]}
                 for k in range(5)]
        (pre / "splits_final.json").write_text(json.dumps(folds))


def test_frangi_is_tuned_per_fold_on_training_cases_and_scored_like_a_network(nnunet_env, tmp_path, capsys):
    from nnunet_pvs.classical import bank, tuning, vesselness
    from nnunet_pvs.compare import compare
    from nnunet_pvs.evaluation import io

    make_dataset(nnunet_env, models=(BASE, MFNS))
    env = nnunet_env["env"]
    out = tmp_path / "rep"
    proc = run_cli(_cmd(out, models=(BASE, MFNS, "frangi")), env=env, check=False)
    assert proc.returncode == 2 and "splits_final.json not found" in proc.stderr
    write_images(nnunet_env)
    proc = run_cli(_cmd(out, models=(BASE, MFNS, "frangi")), env=env)
    assert "frangi: tune" in proc.stderr
    md = (out / "report.md").read_text()
    assert "tuned on training folds" in md and "classical: filter, scales and threshold tuned on training folds" in md
    st = pd.read_csv(out / "stats.csv")
    assert set(st["model"]) == {MFNS, "frangi"}              # paired tests against the baseline
    tun = pd.read_csv(out / "classical_tuning.csv")
    assert list(tun["fold"]) == [f"fold_{k}" for k in range(5)] and (tun["n_train"] == 8).all()
    assert set(tun["model"]) == {"frangi"} and set(tun["filter"]) == {"frangi"}    # the suite restricted to Frangi
    # fold 0 independently: grid on its eight training cases, chosen parameters, Dice of its validation cases
    raw = nnunet_env["nnUNet_raw"] / DATASET
    train0 = [c for c in CASES if FOLD_OF[c] != 0]
    grids = []
    for c in train0:
        img = io.read_nifti(raw / "imagesTr" / f"{c}_0000.nii.gz", c, "image")
        mask = vesselness.brain_mask(img.data, img.spacing)
        norm = vesselness.normalise(img.data, mask)
        label = io.read_nifti(raw / "labelsTr" / f"{c}.nii.gz", c, "label").data != 0
        filters = bank.suite(("frangi",))
        thresholds = [bank.DEFAULT_THRESHOLDS["frangi"]] * len(filters)
        grids.append(tuning.case_dice_grid([vesselness.frangi_response(norm, img.spacing, f.scales_mm, True)
                                            for f in filters], label, mask, thresholds))
    params = tuning.select(grids, filters, thresholds)
    assert tun.loc[0, "threshold"] == pytest.approx(params.threshold)
    assert tun.loc[0, "train_dice"] == pytest.approx(params.train_dice)
    t2 = pd.read_csv(out / "table2_voxel.csv", index_col="case")
    pred_dir = tmp_path / "rep_predictions" / "frangi" / "fold_0"
    for c in (c for c in CASES if FOLD_OF[c] == 0):
        pred = nib.load(str(pred_dir / f"{c}.nii.gz"))
        ref = nib.load(str(raw / "labelsTr" / f"{c}.nii.gz"))
        assert np.allclose(pred.affine, ref.affine) and pred.shape == ref.shape
        p, r = np.asarray(pred.dataobj) > 0, np.asarray(ref.dataobj) > 0
        assert t2.loc[c, "frangi|dice"] == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()))
    assert t2.loc["mean", "frangi|dice"] > 0.5                 # the line is found
    # cache: a re-run reuses every fold; changing one training image re-tunes the folds it trains
    stamp = {k: (tmp_path / "rep_predictions" / "frangi" / f"fold_{k}" / "tuning.json").stat().st_mtime_ns
             for k in range(5)}
    capsys.readouterr()
    compare(DATASET, [BASE, MFNS, "frangi"], out, n_boot=200, plots=False)
    assert "frangi: tune" not in capsys.readouterr().err
    img_path = raw / "imagesTr" / f"{CASES[1]}_0000.nii.gz"      # case 1 is validation of fold 1
    data = np.asarray(nib.load(str(img_path)).dataobj) + 1.0
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(img_path))
    compare(DATASET, [BASE, MFNS, "frangi"], out, n_boot=200, plots=False)
    new = {k: (tmp_path / "rep_predictions" / "frangi" / f"fold_{k}" / "tuning.json").stat().st_mtime_ns
           for k in range(5)}
    assert all(new[k] != stamp[k] for k in range(5))            # folds 0, 2-4 train on it, fold 1 scores it


def test_frangi_polarity_from_dataset_json_or_option(nnunet_env, tmp_path):
    make_dataset(nnunet_env, models=(BASE, MFNS))
    write_images(nnunet_env)
    dj = nnunet_env["nnUNet_raw"] / DATASET / "dataset.json"
    meta = json.loads(dj.read_text())
    meta["channel_names"] = {"0": "CT"}
    dj.write_text(json.dumps(meta))
    out = tmp_path / "rep"
    proc = run_cli(_cmd(out, models=(BASE, "frangi")), env=nnunet_env["env"], check=False)
    assert proc.returncode == 2 and "channel 0 is 'CT'" in proc.stderr and "--frangi-ridges" in proc.stderr
    # dark ridges on a bright line find nothing: Dice 0 on every case
    from nnunet_pvs.compare import compare

    compare(DATASET, [BASE, "frangi"], out, n_boot=50, plots=False, frangi_ridges="dark")
    t2 = pd.read_csv(out / "table2_voxel.csv", index_col="case")
    assert (t2.loc[CASES, "frangi|dice"] < 0.2).all()
    assert "dark ridges" in (out / "report.md").read_text()


def test_frangi_on_a_test_set_is_tuned_on_all_training_cases(nnunet_env, tmp_path, monkeypatch):
    """--test-set: networks predict with nnUNetv2_predict (a stand-in on PATH that predicts the reference
    run exactly), frangi is tuned on every labelsTr case and applied to imagesTs."""
    import sys

    from nnunet_pvs.compare import compare

    make_dataset(nnunet_env, models=(BASE, MFNS))
    write_images(nnunet_env, splits=False)
    ds = nnunet_env["nnUNet_raw"] / DATASET
    for c in CASES[:3]:
        (ds / "imagesTs").mkdir(exist_ok=True)
        (ds / "labelsTs").mkdir(exist_ok=True)
        os.link(ds / "imagesTr" / f"{c}_0000.nii.gz", ds / "imagesTs" / f"{c}_0000.nii.gz")
        os.link(ds / "labelsTr" / f"{c}.nii.gz", ds / "labelsTs" / f"{c}.nii.gz")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "nnUNetv2_predict"
    fake.write_text(f"""#!{sys.executable}
import sys, pathlib, shutil
a = sys.argv[1:]
out = pathlib.Path(a[a.index("-o") + 1]); out.mkdir(parents=True, exist_ok=True)
labels = pathlib.Path({str(ds / "labelsTs")!r})
for p in labels.glob("*.nii.gz"):
    shutil.copy(p, out / p.name)
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "rep"
    compare(DATASET, [BASE, "frangi"], out, test_set="imagesTs", labels="labelsTs", n_boot=50, plots=False)
    tun = pd.read_csv(out / "classical_tuning.csv")
    assert tun["fold"].tolist() == ["all"] and tun.loc[0, "n_train"] == len(CASES) and tun.loc[0, "n_targets"] == 3
    models = pd.read_csv(out / "models.csv").set_index("model")
    assert models.loc["frangi", "budget"] == "tuned on all training cases"
    assert models.loc[BASE, "checkpoint"] == "checkpoint_final.pth (ensemble of folds)"
    t2 = pd.read_csv(out / "table2_voxel.csv", index_col="case")
    assert list(t2.index[:-2]) == CASES[:3] and (t2.loc[CASES[:3], f"{BASE}|dice"] == 1.0).all()
