"""``nnunet-pvs compare --emit-slurm``: the generated submission script, parsed by bash and run
against stand-in ``sbatch`` / ``nnUNetv2_train`` / ``nnUNetv2_predict`` commands."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from conftest import run_cli
from test_compare import BASE, CLI, DATASET, MFNS, TWO_D, make_dataset

AE = "nnUNetTrainerAEUNet:3d_fullres"


def _fake_tools(tmp_path: Path) -> Path:
    """sbatch saves each job script (stdin) and its options and prints a job id; the nnU-Net tools
    record their arguments and the nnU-Net environment they see."""
    b = tmp_path / "fakebin"
    b.mkdir()
    (b / "sbatch").write_text(f"""#!/usr/bin/env bash
n=$(ls {tmp_path}/jobs 2>/dev/null | grep -c '\\.sh$' || true)
mkdir -p {tmp_path}/jobs
cat > {tmp_path}/jobs/job_$n.sh
printf '%s\\n' "$@" > {tmp_path}/jobs/job_$n.opts
echo "$((1000 + n));cluster1"
""")
    for tool in ("nnUNetv2_train", "nnUNetv2_predict"):
        (b / tool).write_text(f"""#!/usr/bin/env bash
echo "{tool} $* | ext=${{nnUNet_extTrainer:-unset}} | results=${{nnUNet_results:-unset}}" >> {tmp_path}/calls.txt
""")
    for p in b.iterdir():
        p.chmod(0o755)
    return b


def _opts(path: Path) -> list[str]:
    return path.read_text().split("\n")


def test_emit_slurm_training_array_and_dependent_compare(nnunet_env, tmp_path):
    make_dataset(nnunet_env)
    fake = _fake_tools(tmp_path)
    script = tmp_path / "cluster" / "submit.sh"
    report = tmp_path / "report"
    env = nnunet_env["env"]
    proc = run_cli([CLI, "compare", "-d", "42", "--models", MFNS, BASE, TWO_D, AE, "--baseline", BASE,
                    "--n-boot", "300", "--no-plots", "-o", report, "--emit-slurm", script, "--slurm-gpus", "2",
                    "--slurm-partition", "gpu", "--slurm-time", "24:00:00",
                    "--slurm-setup", f'export PATH={fake}:"$PATH"',
                    "--pretrained-weights", f"{AE}=/weights/ae_encoder.pth"], env=env)
    assert "20 training task(s)" in proc.stdout and not report.exists()
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert text.count("--array=0-19") == 1
    assert text.count('eval "$(nnunet-pvs env)"') == 2  # training array and comparison job
    assert f"export nnUNet_results={nnunet_env['nnUNet_results']}" in text

    # submit with the stand-in sbatch
    sub = subprocess.run(["bash", str(script)], env={**env, "PATH": f"{fake}{os.pathsep}{env['PATH']}"},
                         capture_output=True, text=True)
    assert sub.returncode == 0, sub.stderr
    jobs = tmp_path / "jobs"
    assert sorted(p.name for p in jobs.glob("*.sh")) == ["job_0.sh", "job_1.sh"]
    train_opts, cmp_opts = _opts(jobs / "job_0.opts"), _opts(jobs / "job_1.opts")
    assert "--array=0-19" in train_opts and "--gres=gpu:2" in train_opts and "--partition=gpu" in train_opts
    assert "--time=24:00:00" in train_opts and "--nodes=1" in train_opts
    assert "--dependency=afterok:1000" in cmp_opts and not any(o.startswith("--array") for o in cmp_opts)

    # every array task runs its (model, fold) with stock nnUNetv2_train and our trainers visible
    jenv = {**env, "PATH": env["PATH"]}
    for task in range(20):
        r = subprocess.run(["bash", str(jobs / "job_0.sh")], env={**jenv, "SLURM_ARRAY_TASK_ID": str(task)},
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(calls) == 20
    specs = [MFNS, BASE, TWO_D, AE]
    for task, line in enumerate(calls):
        tr, cfg = specs[task // 5].split(":")
        fold = task % 5
        expect = f"nnUNetv2_train {DATASET} {cfg} {fold} -tr {tr} -p nnUNetPlans -num_gpus 2 "
        expect += "-pretrained_weights /weights/ae_encoder.pth" if tr == "nnUNetTrainerAEUNet" else "--c"
        assert line.startswith(expect + " |"), (task, line)
        assert "nnunet_ext" in line and f"results={nnunet_env['nnUNet_results']}" in line
    bad = subprocess.run(["bash", str(jobs / "job_0.sh")], env={**jenv, "SLURM_ARRAY_TASK_ID": "20"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no task 20" in bad.stderr

    # the dependent job runs the same comparison (the AE U-Net has no results here: excluded, listed)
    r = subprocess.run(["bash", str(jobs / "job_1.sh")], env=jenv, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    md = (report / "report.md").read_text()
    assert f"**{AE}**: not trained" in md.split("## Voxel-level")[0]
    assert "--n-boot 300" in md and "--emit-slurm" not in md


def test_emit_slurm_prediction_array_with_num_parts(nnunet_env, tmp_path):
    make_dataset(nnunet_env)
    (nnunet_env["nnUNet_raw"] / DATASET / "imagesTs").mkdir()
    fake = _fake_tools(tmp_path)
    script = tmp_path / "submit_ts.sh"
    env = nnunet_env["env"]
    run_cli([CLI, "compare", "-d", DATASET, "--models", MFNS, BASE, "--folds", "0", "1", "2",
             "--test-set", "imagesTs", "--labels", "labelsTs", "-o", tmp_path / "rep", "--emit-slurm", script,
             "--slurm-pred-parts", "3", "--slurm-setup", f'export PATH={fake}:"$PATH"'], env=env)
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "--array=0-5" in text  # training: 2 models x 3 folds
    sub = subprocess.run(["bash", str(script)], env={**env, "PATH": f"{fake}{os.pathsep}{env['PATH']}"},
                         capture_output=True, text=True)
    assert sub.returncode == 0, sub.stderr
    jobs = tmp_path / "jobs"
    pred_opts, cmp_opts = _opts(jobs / "job_1.opts"), _opts(jobs / "job_2.opts")
    assert "--array=0-5" in pred_opts and "--dependency=afterok:1000" in pred_opts  # 2 models x 3 parts
    assert "--dependency=afterok:1001" in cmp_opts
    for task in range(6):
        r = subprocess.run(["bash", str(jobs / "job_1.sh")], env={**env, "SLURM_ARRAY_TASK_ID": str(task)},
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    images = nnunet_env["nnUNet_raw"] / DATASET / "imagesTs"
    pred_root = (tmp_path / "rep_predictions").resolve()
    for task, line in enumerate(calls):
        spec = [MFNS, BASE][task // 3]
        tr, cfg = spec.split(":")
        assert line.startswith(
            f"nnUNetv2_predict -i {images.resolve()} -o {pred_root}/{tr}__nnUNetPlans__{cfg} -d {DATASET} -c {cfg} "
            f"-tr {tr} -p nnUNetPlans -f 0 1 2 -num_parts 3 -part_id {task % 3} --continue_prediction |"), line
    cmp_job = (jobs / "job_2.sh").read_text()
    m = re.search(r"^nnunet-pvs compare .*$", cmp_job, re.M)
    assert m and "--test-set imagesTs --labels labelsTs" in m.group(0)
    assert f"--predictions-dir {pred_root}" in m.group(0) and "--folds 0 1 2" in m.group(0)


def test_emit_slurm_rejects_unknown_pretrained_model(nnunet_env, tmp_path):
    make_dataset(nnunet_env)
    p = run_cli([CLI, "compare", "-d", "42", "--models", MFNS, BASE, "-o", tmp_path / "r",
                 "--emit-slurm", tmp_path / "s.sh", "--pretrained-weights", f"{AE}=/x.pth"],
                env=nnunet_env["env"], check=False)
    assert p.returncode == 2 and f"--pretrained-weights {AE}: not one of the models" in p.stderr
    assert not (tmp_path / "s.sh").exists()


def test_emit_slurm_exports_the_budget_it_was_made_with(nnunet_env, tmp_path):
    """Every training task (and its --c requeue) gets the NNUNET_PVS_* budget set when the script was made."""
    make_dataset(nnunet_env)
    fake = _fake_tools(tmp_path)
    (fake / "nnUNetv2_train").write_text(f"""#!/usr/bin/env bash
echo "$* | epochs=${{NNUNET_PVS_EPOCHS:-unset}} it=${{NNUNET_PVS_ITERATIONS:-unset}} val=${{NNUNET_PVS_VAL_ITERATIONS:-unset}}" >> {tmp_path}/calls.txt
""")
    script = tmp_path / "submit.sh"
    env = {**nnunet_env["env"], "NNUNET_PVS_EPOCHS": "3", "NNUNET_PVS_ITERATIONS": "20"}
    env.pop("NNUNET_PVS_VAL_ITERATIONS", None)
    budget_models = ["nnUNetTrainerMfNSDe_budget:2d", "nnUNetTrainer_budget:3d_fullres"]
    run_cli([CLI, "compare", "-d", DATASET, "--models", *budget_models, "--folds", "0", "-o", tmp_path / "rep",
             "--emit-slurm", script, "--slurm-setup", f'export PATH={fake}:"$PATH"'], env=env)
    text = script.read_text()
    assert "# Budget of the _budget trainers: NNUNET_PVS_EPOCHS=3, NNUNET_PVS_ITERATIONS=20" in text
    clean = {k: v for k, v in env.items() if not k.startswith("NNUNET_PVS_")}  # the cluster's own environment
    sub = subprocess.run(["bash", str(script)], env={**clean, "PATH": f"{fake}{os.pathsep}{clean['PATH']}"},
                         capture_output=True, text=True)
    assert sub.returncode == 0, sub.stderr
    for task in range(2):
        r = subprocess.run(["bash", str(tmp_path / "jobs" / "job_0.sh")],
                           env={**clean, "SLURM_ARRAY_TASK_ID": str(task)}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(calls) == 2 and all(c.endswith("--c | epochs=3 it=20 val=unset") for c in calls), calls

    bad = run_cli([CLI, "compare", "-d", DATASET, "--models", *budget_models, "-o", tmp_path / "rep2",
                   "--emit-slurm", tmp_path / "bad.sh"], env={**env, "NNUNET_PVS_EPOCHS": "ten"}, check=False)
    assert bad.returncode == 2 and "NNUNET_PVS_EPOCHS='ten': must be a positive integer" in bad.stderr
    assert not (tmp_path / "bad.sh").exists()
