"""The README's main command at CI scale: every stage connects, and a re-run resumes."""

from __future__ import annotations

import json

from conftest import BIN, run_cli


def test_tiny_demo_runs_every_stage_and_resumes(tmp_path, nnunet_env):
    work = tmp_path / "demo"
    env = nnunet_env["env"]
    first = run_cli([BIN / "nnunet-pvs", "demo", "--tiny", "--work-dir", work], env=env, timeout=2400)
    out = first.stdout
    for stage in ("1/6", "2/6", "3/6", "4/6", "5/6", "6/6"):
        assert stage in out, f"stage {stage} missing from the demo output"
    assert "SMOKE-SCALE" in out
    # the user's own nnU-Net folders (here the fixture's) are untouched: everything went to the work dir
    assert not any(nnunet_env["nnUNet_results"].iterdir())
    for tag in ("T2w", "T1w"):
        report = work / f"report_{tag}" / "report.md"
        assert report.exists() and report.stat().st_size > 0
        assert f"report ({tag}): {report}" in out
    assert (work / "ae_init.pth").exists() and (work / "preview_T2w.png").exists()
    settings = json.loads((work / "demo_settings.json").read_text())
    assert settings["folds"] == [0, 1] and settings["epochs"] == 1

    again = run_cli([BIN / "nnunet-pvs", "demo", "--tiny", "--work-dir", work], env=env, timeout=1200)
    assert "already trained, skipped" in again.stdout and "already done, skipped" in again.stdout
    assert "$ " not in again.stdout.split("5/6 training")[1].split("6/6")[0]  # no training command re-run

    changed = run_cli([BIN / "nnunet-pvs", "demo", "--tiny", "--epochs", "2", "--work-dir", work], env=env,
                      check=False)
    assert changed.returncode == 2 and "other settings" in changed.stderr and "epochs" in changed.stderr
