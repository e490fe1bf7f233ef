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
    # --with-3d: every stage, both datasets (the CPU default is the 2D half, checked below without training)
    first = run_cli([BIN / "nnunet-pvs", "demo", "--tiny", "--with-3d", "--work-dir", work], env=env, timeout=2400)
    out = first.stdout
    for stage in ("1/7", "2/7", "3/7", "4/7", "5/7", "6/7", "7/7"):
        assert stage in out, f"stage {stage} missing from the demo output"
    assert "far below the papers' 1000 x 250" in out
    # the user's own nnU-Net folders (here the fixture's) are untouched: everything went to the work dir
    assert not any(nnunet_env["nnUNet_results"].iterdir())
    settings = json.loads((work / "demo_settings.json").read_text())
    assert settings["folds"] == [0] and settings["epochs"] == 2 and settings["iterations"] == 2
    # stock nnU-Net 2d through the batch-2 plans copy, which reuses the 2d preprocessed data
    assert json.loads((work / "nnUNet_preprocessed" / "Dataset901_PVSPhantomT2w" / "nnUNetPlans_bs2.json").read_text())[
        "configurations"]["2d"]["batch_size"] == 2
    expected = {"T2w": ["nnUNetTrainerMfNSDe_budget:2d", "nnUNetTrainer_budget:2d:nnUNetPlans_bs2",
                        "nnUNetTrainer_budget:3d_fullres"],
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
        assert set(net_rows["device"]) == {"cpu"}, net_rows  # the report names the training device
        if tag == "T2w":
            batches = dict(zip(net_rows["model"].str.split(":").str[:2].str.join(":"), net_rows["batch_size"]))
            assert batches["nnUNetTrainerMfNSDe_budget:2d"] == "4", batches  # the paper's batch
            assert "different batch sizes" in text
        assert net_rows["convergence"].notna().all()
        per_case = pd.read_csv(work / f"report_{tag}" / "per_case_metrics.csv")
        assert {"whole", "bg", "wm"} <= set(per_case["region"])  # region rows from the phantom's aseg maps
        assert "classical: filter, scales and threshold tuned on training folds" in text
    census = work / "census_T2w_test"
    assert (census / "report.html").exists() and (census / "clusters.csv").exists()
    assert set(pd.read_csv(census / "subjects.csv")["case"]) == {"pvs006"}  # the held-out test subject
    assert (work / "ae_init.pth").exists() and (work / "preview_T2w.png").exists()

    again = run_cli([BIN / "nnunet-pvs", "demo", "--tiny", "--with-3d", "--work-dir", work], env=env, timeout=1200)
    assert "already trained, skipped" in again.stdout and "already done, skipped" in again.stdout
    assert "$ " not in again.stdout.split("5/7 training")[1].split("6/7")[0]  # no training command re-run

    changed = run_cli([BIN / "nnunet-pvs", "demo", "--tiny", "--with-3d", "--epochs", "3", "--work-dir", work], env=env,
                      check=False)
    assert changed.returncode == 2 and "other settings" in changed.stderr and "epochs" in changed.stderr


def _settings(argv, monkeypatch, cuda: bool):
    import torch

    from nnunet_pvs import demo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    p = __import__("argparse").ArgumentParser()
    demo.add_arguments(p)
    return demo.DemoSettings.from_args(p.parse_args(argv))


def test_default_demo_on_a_cpu_is_the_2d_half_with_stock_at_batch_2(monkeypatch, tmp_path):
    from nnunet_pvs.demo import Demo

    s = _settings([], monkeypatch, cuda=False)
    assert (s.device, s.with_3d, s.stock_2d_batch, s.size) == ("cpu", False, 2, "tiny")
    specs = [Demo.spec(m) for m in Demo(tmp_path, s).models()]
    assert specs == ["nnUNetTrainerMfNSDe_budget:2d", "nnUNetTrainer_budget:2d:nnUNetPlans_bs2"]
    with_3d = [Demo.spec(m) for m in Demo(tmp_path, _settings(["--with-3d"], monkeypatch, cuda=False)).models()]
    assert len(with_3d) == 5 and "nnUNetTrainerAEUNet_budget:3d_fullres" in with_3d


def test_demo_picks_cuda_by_itself_and_device_overrides(monkeypatch, tmp_path):
    s = _settings([], monkeypatch, cuda=True)
    assert (s.device, s.with_3d, s.stock_2d_batch, s.size) == ("cuda", True, None, "small")
    assert s.epochs * s.iterations == 2000  # 20 epochs x 100 iterations per model, sized for about 20 GPU minutes
    assert _settings(["--device", "cpu"], monkeypatch, cuda=True).device == "cpu"
    assert _settings(["--tiny"], monkeypatch, cuda=True).device == "cuda"
    assert _settings(["--stock-batch", "0"], monkeypatch, cuda=False).stock_2d_batch is None


def test_plans_variant_reuses_the_preprocessed_data(tmp_path):
    from nnunet_pvs.errors import UserError
    from nnunet_pvs.plans_variant import write_plans_variant

    plans = {"plans_name": "nnUNetPlans", "configurations": {
        "2d": {"data_identifier": "nnUNetPlans_2d", "batch_size": 40, "patch_size": [64, 64]},
        "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2}}}
    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(plans))
    out = json.loads(write_plans_variant(tmp_path, "nnUNetPlans_bs2", {"2d": 2}).read_text())
    assert out["plans_name"] == "nnUNetPlans_bs2"
    assert out["configurations"]["2d"] == {"data_identifier": "nnUNetPlans_2d", "batch_size": 2, "patch_size": [64, 64]}
    assert out["configurations"]["3d_fullres"]["batch_size"] == 2
    with pytest.raises(UserError, match="no configuration '3d_lowres'"):
        write_plans_variant(tmp_path, "x", {"3d_lowres": 2})
