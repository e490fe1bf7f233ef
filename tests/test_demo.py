"""The README's main command at CI scale: every stage connects, the reports say what was compared
(models, budgets, checkpoints, the classical row, convergence), and a re-run resumes."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import BIN, run_cli


@pytest.mark.e2e
def test_tiny_demo_runs_every_stage_and_resumes(tmp_path, nnunet_env):
    work = tmp_path / "demo"
    env = nnunet_env["env"]
    first = run_cli([BIN / "nnunet-pvs", "demo", "--tiny", "--work-dir", work], env=env, timeout=2400)
    out = first.stdout
    for stage in ("1/7", "2/7", "3/7", "4/7", "5/7", "6/7", "7/7"):
        assert stage in out, f"stage {stage} missing from the demo output"
    assert "far below the papers' 1000 x 250" in out
    # the user's own nnU-Net folders (here the fixture's) are untouched: everything went to the work dir
    assert not any(nnunet_env["nnUNet_results"].iterdir())
    settings = json.loads((work / "demo_settings.json").read_text())
    assert settings["folds"] == [0] and settings["epochs"] == 2 and settings["iterations"] == 2
    expected = {"T2w": ["nnUNetTrainerMfNSDe_budget:2d", "nnUNetTrainer_budget:2d", "nnUNetTrainer_budget:3d_fullres"],
                "T1w": ["nnUNetTrainerAEUNet_budget:3d_fullres", "nnUNetTrainer_budget:3d_fullres"]}
    for tag, nets in expected.items():
        report = work / f"report_{tag}" / "report.md"
        assert report.exists() and f"report ({tag}): {report}" in out
        text = report.read_text()
        models = pd.read_csv(work / f"report_{tag}" / "models.csv")
        labels = list(models["model"])
        for m in nets:
            assert any(str(x).startswith(m) for x in labels), (m, labels)
        assert "classical" in labels, labels  # the classical row: the filter suite
        net_rows = models[models["model"].str.contains("nnUNetTrainer")]
        # budget read from each run: 2 epochs x 2 iterations; scored at the last epoch's checkpoint
        assert all("2" in str(b) for b in net_rows["budget"]), net_rows
        assert all("checkpoint_final" in str(c) for c in net_rows["checkpoint"]), net_rows
        assert net_rows["convergence"].notna().all()
        per_case = pd.read_csv(work / f"report_{tag}" / "per_case_metrics.csv")
        assert {"whole", "bg", "wm"} <= set(per_case["region"])  # region rows from the phantom's aseg maps
        assert "classical: filter, scales and threshold tuned on training folds" in text
    census = work / "census_T2w_test"
    assert (census / "report.html").exists() and (census / "clusters.csv").exists()
    assert set(pd.read_csv(census / "subjects.csv")["case"]) == {"pvs006"}  # the held-out test subject
    assert (work / "ae_init.pth").exists() and (work / "preview_T2w.png").exists()

    again = run_cli([BIN / "nnunet-pvs", "demo", "--tiny", "--work-dir", work], env=env, timeout=1200)
    assert "already trained, skipped" in again.stdout and "already done, skipped" in again.stdout
    assert "$ " not in again.stdout.split("5/7 training")[1].split("6/7")[0]  # no training command re-run

    changed = run_cli([BIN / "nnunet-pvs", "demo", "--tiny", "--epochs", "3", "--work-dir", work], env=env,
                      check=False)
    assert changed.returncode == 2 and "other settings" in changed.stderr and "epochs" in changed.stderr
