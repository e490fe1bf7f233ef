"""`nnunet-pvs census` at cohort scale (issue 27): per-subject results, resume, a failed subject listed
while the others complete, parts that share one folder plus --merge, the SLURM array against stand-in
sbatch / nnUNetv2_predict, the input check carried into the tables, and probability files of every
nnU-Net reader (SimpleITKIO, NibabelIO, NibabelIOWithReorient)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from nnunet_pvs.evaluation import io
from nnunet_pvs.evaluation.regions import owner, region_files
from test_census import AFFINE, CLI, save, write_nnunet_probabilities

from nnunet_pvs import resume
from nnunet_pvs.census.inputs import gather_cases, index_region_files, region_owner

SHAPE = (14, 12, 8)
IDS = ("s01", "s02", "s03", "s04", "s05")
TABLES = ("clusters.csv", "subjects.csv", "failures.csv")


def _subject(k: int):
    """Two tubes and a single voxel, placed by k; a probability map; an image; an aseg map."""
    rng = np.random.default_rng(k)
    m = np.zeros(SHAPE, bool)
    m[2 + k % 3, 1:8, 3] = True
    m[8, 4 + k % 4, 1:6] = True
    m[11, 10, 2 + k % 5] = True
    prob = np.where(m, 0.6 + 0.4 * rng.random(SHAPE), 0.3 * rng.random(SHAPE)).astype(np.float32)
    image = (100 + 10 * rng.standard_normal(SHAPE) + 100 * m).astype(np.float32)
    aseg = np.full(SHAPE, 2, np.int16)
    aseg[:, 6:, :] = 41
    aseg[6:10, :, :] = 12
    return m, prob, image, aseg


@pytest.fixture
def cohort(tmp_path):
    for k, cid in enumerate(IDS):
        m, prob, image, aseg = _subject(k)
        seg = save(m.astype(np.uint8), tmp_path / "bin" / f"{cid}.nii.gz", AFFINE)
        save(image, tmp_path / "images" / f"{cid}_0000.nii.gz", AFFINE)
        save(aseg, tmp_path / "regions" / f"{cid}.nii.gz", AFFINE)
        (tmp_path / "prob").mkdir(exist_ok=True)
        write_nnunet_probabilities(prob, seg, tmp_path / "prob" / cid)
    return tmp_path


def census(*args, check=False):
    return run_cli([CLI, "census", *map(str, args)], check=check)


def corrupt(path: Path) -> None:
    """A truncated gzip: what an interrupted copy leaves."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ resume, failures

def test_a_corrupt_file_is_listed_the_others_complete_and_a_rerun_skips_what_is_done(cohort):
    bad = cohort / "bin" / "s03.nii.gz"
    original = bad.read_bytes()
    corrupt(bad)
    out = cohort / "out"
    proc = census("-i", cohort / "bin", "-o", out, "--regions", cohort / "regions", "--no-plots")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last_line(proc.stderr) == (f"nnunet-pvs census: 1 of 5 subject(s) failed; listed with the reason in "
                                      f"{out / 'failures.csv'}")
    assert "census of 4 subject(s)" in proc.stdout
    failures = pd.read_csv(out / "failures.csv", dtype=str)
    assert list(failures.columns) == ["case", "reason"] and list(failures["case"]) == ["s03"]
    assert str(bad) in failures["reason"].iloc[0] and "cannot read prediction" in failures["reason"].iloc[0]
    sub = pd.read_csv(out / "subjects.csv", dtype={"case": str})
    assert sorted(set(sub["case"])) == ["s01", "s02", "s04", "s05"]
    # nothing of the failed subject but the record of its failure; no staging folder left anywhere
    assert sorted(p.name for p in (out / "cases" / "s03").iterdir()) == ["record.json"]
    assert json.loads((out / "cases" / "s03" / "record.json").read_text())["status"] == "failed"
    assert sorted(p.name for p in (out / "cases").iterdir()) == list(IDS)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"] == [{"case": "s03", "reason": failures["reason"].iloc[0]}]
    html = (out / "report.html").read_text()
    assert "Failed subjects" in html and "s03" in html
    stamps = {c: (out / "cases" / c / "record.json").stat().st_mtime_ns for c in IDS if c != "s03"}

    # the same run again: the four done subjects are skipped (their files untouched), the failed one retried
    proc = census("-i", cohort / "bin", "-o", out, "--regions", cohort / "regions", "--no-plots")
    assert proc.returncode == 1 and "resumed: 4 of 5 subject(s) already done with the same inputs and options" \
        in proc.stderr
    assert stamps == {c: (out / "cases" / c / "record.json").stat().st_mtime_ns for c in stamps}
    # the file repaired: only that subject is censused, and the tables are complete
    bad.write_bytes(original)
    proc = census("-i", cohort / "bin", "-o", out, "--regions", cohort / "regions", "--no-plots")
    assert proc.returncode == 0, proc.stderr
    assert "resumed: 4 of 5" in proc.stderr and "census of 5 subject(s)" in proc.stdout
    assert stamps == {c: (out / "cases" / c / "record.json").stat().st_mtime_ns for c in stamps}
    assert len(pd.read_csv(out / "failures.csv")) == 0
    full = cohort / "full"
    census("-i", cohort / "bin", "-o", full, "--regions", cohort / "regions", "--no-plots", check=True)
    for name in TABLES:
        assert (out / name).read_text() == (full / name).read_text(), name


def test_changed_options_or_inputs_redo_the_subjects(cohort):
    out = cohort / "out"
    census("-i", cohort / "prob", "-o", out, "--no-plots", check=True)
    proc = census("-i", cohort / "prob", "-o", out, "--no-plots", "-np", "2", check=True)  # -np is no result option
    assert "resumed: 5 of 5" in proc.stderr
    proc = census("-i", cohort / "prob", "-o", out, "--no-plots", "--threshold", "0.7", check=True)
    assert "resumed" not in proc.stderr
    first = pd.read_csv(out / "clusters.csv")
    assert (first["max_prob"] >= 0.7).all()
    # a prediction rewritten (same name): that subject only
    npz = cohort / "prob" / "s02.npz"
    with np.load(npz) as z:
        p = z["probabilities"].copy()
    p[1, 0, 0, 0], p[0, 0, 0, 0] = 0.99, 0.01
    np.savez_compressed(npz, probabilities=p)
    proc = census("-i", cohort / "prob", "-o", out, "--no-plots", "--threshold", "0.7", check=True)
    assert "resumed: 4 of 5" in proc.stderr
    again = pd.read_csv(out / "clusters.csv")
    assert len(again) == len(first) + 1 and (again["case"] == "s02").sum() == (first["case"] == "s02").sum() + 1


def test_ctrl_c_keeps_the_finished_subjects_and_nothing_of_the_interrupted_one(cohort, monkeypatch):
    from nnunet_pvs.census import case

    real, calls = case.run_case, []

    def interrupted(job):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(case, "run_case", interrupted)
    out = cohort / "out"
    proc = census("-i", cohort / "bin", "-o", out)
    assert proc.returncode == 130 and last_line(proc.stderr) == "nnunet-pvs census: interrupted"
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["s01", "s02"]   # no hidden staging folder
    assert not (out / "subjects.csv").exists() and not (out / "report.html").exists()
    monkeypatch.setattr(case, "run_case", real)
    proc = census("-i", cohort / "bin", "-o", out)
    assert proc.returncode == 0 and "resumed: 2 of 5" in proc.stderr
    assert (out / "cases" / "s05" / "overlay.png").is_file() and 'href="cases/s05/overlay.png"' in (
        out / "report.html").read_text()


# --------------------------------------------------------------------------------------------- parts, merge

def _copy_predictions(src: Path, dst: Path, ids) -> None:
    dst.mkdir(exist_ok=True)
    for c in ids:
        for f in src.glob(f"{c}.*"):
            shutil.copy(f, dst / f.name)


def test_two_parts_beside_their_predictions_then_merge_equal_one_run(cohort):
    """The SLURM flow: part K runs as soon as nnUNetv2_predict part K has written its predictions (split by
    the scans, as nnU-Net splits), the two parts run at the same time into one folder, --merge refuses
    while a part is missing, then gives byte-identical tables to one run."""
    corrupt(cohort / "prob" / "s04.npz")
    common = ["--images", cohort / "images", "--regions", cohort / "regions", "--threshold", "0.55",
              "--label-maps", "--no-plots"]
    pred, out = cohort / "pred", cohort / "parts"
    part0 = resume.shard(IDS, 2, 0)
    assert part0 == ["s01", "s03", "s05"]                    # sorted ids, every 2nd from 0: nnU-Net's split
    _copy_predictions(cohort / "prob", pred, part0)          # only part 0 has predicted so far
    argv = [CLI, "census", "-i", pred, "-o", out, *common, "--num-parts", "2", "--part-id", "0"]
    p0 = run_cli(argv, check=False)
    assert p0.returncode == 0, p0.stderr
    assert "census part 0 of 2: 3 subject(s), 3 censused, 0 skipped (already done), 0 failed" in p0.stdout
    assert not (out / "subjects.csv").exists()               # a part never writes the cohort tables
    merge = census("--merge", out)
    assert merge.returncode == 2 and last_line(merge.stderr) == (
        f"nnunet-pvs census: error: {out}: 2 of 5 subject(s) not censused yet with these options: s02, s04; "
        "run the parts that hold them (or the same census again), then merge")
    _copy_predictions(cohort / "prob", pred, ["s02", "s04"])
    # both parts at once, as two array tasks (part 0 again: everything of it skipped)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([str(a) for a in argv[:-1]] + [str(k)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    assert results[0][0] == 0 and "3 skipped (already done)" in results[0][1], results[0]
    assert results[1][0] == 1 and "1 of 2 subject(s) of part 1 failed: s04" in results[1][2], results[1]
    merge = census("--merge", out)
    assert merge.returncode == 1 and "1 of 5 subject(s) failed" in last_line(merge.stderr)
    one = cohort / "one"        # one run over the same predictions (failures.csv names their files)
    assert census("-i", pred, "-o", one, *common).returncode == 1
    assert list(pd.read_csv(one / "failures.csv")["case"]) == ["s04"]
    for name in TABLES:
        assert (out / name).read_text() == (one / name).read_text(), name
    assert json.loads((out / "summary.json").read_text())["n_cases"] == 4
    assert sorted(p.name for p in (out / "cases").iterdir()) == list(IDS)
    lab = nib.load(out / "cases" / "s02" / "labels.nii.gz")
    assert np.array_equal(np.asarray(lab.dataobj), np.asarray(nib.load(one / "cases" / "s02" / "labels.nii.gz").dataobj))


def test_parts_and_merge_bad_use(cohort):
    out = cohort / "o"
    for args, message in (
            (["--num-parts", "0"], "--num-parts must be at least 1, got 0"),
            (["--num-parts", "3", "--part-id", "3"], "--part-id must be in 0..2 (--num-parts 3), got 3")):
        proc = census("-i", cohort / "bin", "-o", out, *args)
        assert proc.returncode == 2 and message in last_line(proc.stderr) and not out.exists()
    proc = census("--merge", cohort / "nothing")
    assert proc.returncode == 2 and "--merge folder does not exist" in proc.stderr
    (cohort / "empty").mkdir()
    proc = census("--merge", cohort / "empty")
    assert proc.returncode == 2 and "no cohort.json" in proc.stderr
    proc = census("--merge", cohort / "empty", "-o", out)
    assert proc.returncode == 2 and "give no -i, -o or --emit-slurm" in proc.stderr
    proc = census("-o", out)
    assert proc.returncode == 2 and "-i PRED and -o OUT are required" in proc.stderr


# --------------------------------------------------------------------------------------------------- SLURM

def _fake_slurm(tmp: Path, truth: Path) -> Path:
    """sbatch records its arguments and prints a job id; nnUNetv2_predict writes, for its part, the
    predictions of the scans nnU-Net would give that part (copied from ``truth``)."""
    b = tmp / "fakebin"
    b.mkdir()
    (b / "sbatch").write_text(f"""#!/usr/bin/env bash
n=$(ls {tmp}/jobs 2>/dev/null | wc -l)
mkdir -p {tmp}/jobs
printf '%s\\n' "$@" > {tmp}/jobs/$n.args
echo "$((500 + n));cluster"
""")
    (b / "nnUNetv2_predict").write_text(f"""#!{sys.executable}
import shutil, sys
from pathlib import Path
a = sys.argv[1:]
opt = lambda k: a[a.index(k) + 1]
ids = sorted({{p.name[:-len(".nii.gz")][:-5] for p in Path(opt("-i")).glob("*.nii.gz")}})
out = Path(opt("-o"))
out.mkdir(parents=True, exist_ok=True)
for c in ids[int(opt("-part_id"))::int(opt("-num_parts"))]:
    for f in Path({str(truth)!r}).glob(c + ".*"):
        shutil.copy(f, out / f.name)
with open({str(tmp / "calls.txt")!r}, "a") as f:
    f.write(" ".join(a) + "\\n")
""")
    for p in b.iterdir():
        p.chmod(0o755)
    return b


def test_emit_slurm_array_of_predict_and_census_parts_then_merge(cohort):
    corrupt(cohort / "prob" / "s05.npz")
    model = cohort / "results" / "Dataset950_PVS" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    for f in (0, 1):
        (model / f"fold_{f}").mkdir(parents=True)
    fake = _fake_slurm(cohort, cohort / "prob")
    scripts, pred, out = cohort / "slurm", cohort / "pred", cohort / "census"
    proc = census("-i", pred, "-o", out, "--images", cohort / "images", "--regions", cohort / "regions",
                  "--no-plots", "--emit-slurm", scripts, "--model", model, "--num-parts", "2",
                  "--slurm-partition", "gpu", "--slurm-time", "02:00:00", "--slurm-cpus", "4",
                  "--predict-args", "-npp 1 -nps 1", "--slurm-setup", f'export PATH={fake}:"$PATH"')
    assert proc.returncode == 0, proc.stderr
    assert "2 array task(s)" in proc.stdout and not out.exists() and not pred.exists()
    assert sorted(p.name for p in scripts.iterdir()) == ["census_array.sbatch", "census_merge.sbatch", "submit.sh"]
    for name in ("census_array.sbatch", "census_merge.sbatch", "submit.sh"):
        assert subprocess.run(["bash", "-n", str(scripts / name)]).returncode == 0, name
    array = (scripts / "census_array.sbatch").read_text()
    # sbatch reads the #SBATCH lines before the first command only
    first_command = next(i for i, ln in enumerate(array.splitlines()) if ln and not ln.startswith("#"))
    assert all(i < first_command for i, ln in enumerate(array.splitlines()) if ln.startswith("#SBATCH"))
    for line in ("#SBATCH --array=0-1", "#SBATCH --partition=gpu", "#SBATCH --time=02:00:00",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --gres=gpu:1",
                 f"export nnUNet_results={cohort / 'results'}"):
        assert line in array.splitlines(), line

    # the cluster's own environment: nnunet-pvs and sbatch on the PATH, no nnU-Net folders set
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(PATH=os.pathsep.join([str(fake), str(Path(sys.executable).parent), os.environ["PATH"]]),
               OMP_NUM_THREADS="1")
    sub = subprocess.run(["bash", str(scripts / "submit.sh")], env=env, capture_output=True, text=True)
    assert sub.returncode == 0, sub.stderr
    assert "submitted the census array 500 and the merge 501" in sub.stdout
    jobs = cohort / "jobs"
    assert (jobs / "0.args").read_text().split() == ["--parsable", str(scripts / "census_array.sbatch")]
    assert (jobs / "1.args").read_text().split() == ["--parsable", "--dependency=afterok:500",
                                                     str(scripts / "census_merge.sbatch")]
    # the array's tasks (in the order a cluster may run them), then the merge job
    for k in (1, 0):
        r = subprocess.run(["bash", str(scripts / "census_array.sbatch")], env={**env, "SLURM_ARRAY_TASK_ID": str(k)},
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr              # part 0 holds the corrupt s05: listed, not a failed task
    calls = (cohort / "calls.txt").read_text().splitlines()
    assert calls == [f"-i {cohort / 'images'} -o {pred} -d Dataset950_PVS -c 3d_fullres -tr nnUNetTrainer -p "
                     f"nnUNetPlans -f 0 1 --save_probabilities --continue_prediction -num_parts 2 -npp 1 -nps 1 "
                     f"-part_id {k}" for k in (1, 0)]
    r = subprocess.run(["bash", str(scripts / "census_merge.sbatch")], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "1 of 5 subject(s) failed" in r.stderr
    one = cohort / "one"
    census("-i", pred, "-o", one, "--images", cohort / "images", "--regions", cohort / "regions", "--no-plots")
    for name in TABLES:
        assert (out / name).read_text() == (one / name).read_text(), name


def test_emit_slurm_bad_use(cohort):
    base = ["-i", cohort / "pred", "-o", cohort / "o", "--images", cohort / "images", "--emit-slurm", cohort / "s"]
    not_model = cohort / "plain"
    not_model.mkdir()
    for extra, message in (([], "--emit-slurm needs --model MODEL"),
                           (["--model", not_model], "not an nnU-Net trained-model folder"),
                           (["--model", cohort / "missing"], "--model folder does not exist")):
        proc = census(*base, *extra)
        assert proc.returncode == 2 and message in proc.stderr and not (cohort / "s").exists()
    model = cohort / "r" / "Dataset001_X" / "T__P__2d"
    model.mkdir(parents=True)
    proc = census(*base, "--model", model)
    assert proc.returncode == 2 and "no fold_* folder; give the folds to predict with --folds" in proc.stderr
    proc = census(*base, "--model", model, "--folds", "0", "--predict-args", "-f 1")
    assert proc.returncode == 2 and "--predict-args: -f are set by the census" in proc.stderr


# ------------------------------------------------------------------------------------------- input check

def test_qc_file_adds_verdicts_to_subjects_and_flags_the_report(cohort):
    qc_csv = cohort / "qc" / "inputs_qc.csv"
    qc_csv.parent.mkdir()
    pd.DataFrame({"case": ["s01", "s02", "s03", "s04"], "verdict": ["ok", "warn", "refuse", "ok"],
                  "reasons": ["", "spacing 0.69 x 0.69 x 2 mm differs from training", "4D image", ""]}
                 ).to_csv(qc_csv, index=False)
    out = cohort / "out"
    proc = census("-i", cohort / "bin", "-o", out, "--qc", qc_csv, "--regions", cohort / "regions")
    assert proc.returncode == 0, proc.stderr
    assert "input check: 2 ok, 1 warn, 1 refuse, 1 unchecked; 2 flagged subject(s) in report.html" in proc.stderr
    sub = pd.read_csv(out / "subjects.csv", dtype=str, keep_default_na=False)
    assert list(sub.columns[-2:]) == ["qc_verdict", "qc_reasons"]
    per_case = sub.drop_duplicates("case").set_index("case")
    assert per_case.loc["s02", "qc_verdict"] == "warn" and "spacing" in per_case.loc["s02", "qc_reasons"]
    assert per_case.loc["s03", "qc_verdict"] == "refuse" and per_case.loc["s01", "qc_verdict"] == "ok"
    assert per_case.loc["s05", "qc_verdict"] == "" and per_case.loc["s05", "qc_reasons"] == "not in inputs_qc.csv"
    assert (sub.groupby("case")["qc_verdict"].nunique() == 1).all()     # every region row of a case
    html = (out / "report.html").read_text()
    assert '<tr class="qc-refuse"><td class="l">s03<span class="badge refuse" title="4D image">refuse</span>' in html
    assert 'class="qc-warn"' in html and "Input check" in html and "s01<span" not in html
    # the verdicts come in when the tables are assembled: a new QC file needs no subject to be redone
    pd.DataFrame({"case": list(IDS), "verdict": "ok", "reasons": ""}).to_csv(qc_csv, index=False)
    proc = census("-i", cohort / "bin", "-o", out, "--qc", qc_csv, "--regions", cohort / "regions")
    assert "resumed: 5 of 5" in proc.stderr and 'class="qc-refuse"' not in (out / "report.html").read_text()
    bad = cohort / "qc" / "bad.csv"
    bad.write_text("case,verdict\ns01,ok\n")
    proc = census("-i", cohort / "bin", "-o", cohort / "o2", "--qc", bad)
    assert proc.returncode == 2 and str(bad) in last_line(proc.stderr) and not (cohort / "o2").exists()


def test_check_model_runs_the_input_check_once_and_keeps_the_verdicts(tmp_path):
    """--check-model: nnunet-pvs check-inputs' verdicts for the scans censused (a T1w scan given to a T2w
    model is flagged, in-domain scans pass), kept with each subject, so a resumed run does not check again."""
    from test_check_inputs import affine_of as head_affine
    from test_check_inputs import head_case, write_model

    rng = np.random.default_rng(11)
    aff = head_affine()
    raw, results = tmp_path / "raw", tmp_path / "results"
    model = write_model(raw, results, "Dataset953_Heads", {f"tr{i}": (*head_case(rng), aff) for i in range(4)})
    for cid, contrast in (("in0", "T2w"), ("in1", "T2w"), ("t1w", "T1w")):
        img, seg = head_case(rng, contrast)
        save(img, tmp_path / "scans" / f"{cid}_0000.nii.gz", aff)
        save(seg, tmp_path / "pred" / f"{cid}.nii.gz", aff)
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_results": str(results)}
    out = tmp_path / "out"
    argv = [CLI, "census", "-i", tmp_path / "pred", "-o", out, "--images", tmp_path / "scans", "--check-model", model]
    proc = run_cli(argv, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    sub = pd.read_csv(out / "subjects.csv", dtype=str, keep_default_na=False).drop_duplicates("case").set_index("case")
    assert sub.loc["in0", "qc_verdict"] == "ok" and sub.loc["in1", "qc_verdict"] == "ok"
    assert sub.loc["t1w", "qc_verdict"] in ("warn", "refuse") and sub.loc["t1w", "qc_reasons"]
    record = json.loads((out / "cases" / "t1w" / "record.json").read_text())
    assert record["qc"]["verdict"] == sub.loc["t1w", "qc_verdict"]
    assert f'class="qc-{sub.loc["t1w", "qc_verdict"]}"' in (out / "report.html").read_text()
    proc = run_cli(argv, env=env, check=False)
    assert proc.returncode == 0 and "resumed: 3 of 3" in proc.stderr and "check-inputs" not in proc.stderr
    assert pd.read_csv(out / "subjects.csv", dtype=str, keep_default_na=False).drop_duplicates("case").set_index(
        "case")["qc_verdict"].to_dict() == sub["qc_verdict"].to_dict()


def test_check_model_needs_images(cohort):
    proc = census("-i", cohort / "bin", "-o", cohort / "o", "--check-model", cohort)
    assert proc.returncode == 2 and "--check-model needs --images" in proc.stderr


# --------------------------------------------------------------------- probability files of every reader

READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient")
# voxel axes -> world: -z (2 mm), x (0.7 mm), -y (0.9 mm): far from RAS, so NibabelIOWithReorient reorients
OBLIQUE = np.array([[0, 0.7, 0, 12.0], [0, 0, -0.9, 30.0], [-2.0, 0, 0, -4.0], [0, 0, 0, 1]])


def _reader(name: str):
    from nnunetv2.imageio import nibabel_reader_writer, simpleitk_reader_writer

    return getattr(nibabel_reader_writer, name, None) or getattr(simpleitk_reader_writer, name)


def write_as_nnunet(reader: str, prob: np.ndarray, scan: Path, stem: Path) -> None:
    """CASE.npz + CASE.pkl as nnU-Net's export writes them for a dataset read with ``reader``: the array
    of the reader's read_images (C, z, y, x) and its properties, and CASE.nii.gz by its write_seg."""
    cls = _reader(reader)
    arr, props = cls().read_images([str(scan)])
    probmap = Path(f"{stem}_prob_in.nii.gz")
    nib.save(nib.Nifti1Image(prob, nib.load(scan).affine), probmap)
    fg = cls().read_images([str(probmap)])[0][0]
    probmap.unlink()
    assert fg.shape == arr.shape[1:]
    np.savez_compressed(f"{stem}.npz", probabilities=np.stack([1 - fg, fg]).astype(np.float32))
    with open(f"{stem}.pkl", "wb") as f:
        pickle.dump(props, f)
    cls().write_seg((fg >= 0.5).astype(np.uint8), f"{stem}.nii.gz", props)


@pytest.mark.parametrize("reader", READERS)
def test_probabilities_of_every_nnunet_reader_are_read_on_the_scan_grid(tmp_path, reader):
    shape = (9, 7, 5)
    rng = np.random.default_rng(3)
    ref = np.zeros(shape, np.uint8)
    ref[2, 1:6, 2] = 1
    ref[6, 3, 0:4] = 1
    prob = np.where(ref == 1, 0.8, 0.1 * rng.random(shape)).astype(np.float32)
    save(ref, tmp_path / "ref" / "c1.nii.gz", OBLIQUE)
    scan = save(rng.random(shape).astype(np.float32), tmp_path / "img" / "c1_0000.nii.gz", OBLIQUE)
    (tmp_path / "pred").mkdir()
    write_as_nnunet(reader, prob, scan, tmp_path / "pred" / "c1")
    with open(tmp_path / "pred" / "c1.pkl", "rb") as f:   # our own file, written above
        props = pickle.load(f)
    assert ("nibabel_stuff" in props) == (reader != "SimpleITKIO")
    assert ("reoriented_affine" in props.get("nibabel_stuff", {})) == (reader == "NibabelIOWithReorient")
    v = io.read_probabilities(tmp_path / "pred" / "c1.npz", "c1")
    np.testing.assert_allclose(v.data, prob, atol=1e-6)
    np.testing.assert_allclose(v.affine, OBLIQUE, atol=1e-5)
    np.testing.assert_allclose(v.spacing, (2.0, 0.7, 0.9), atol=1e-5)
    # census: the probabilities and nnU-Net's own NIfTI give the same clusters on the scan's grid
    a, b = tmp_path / "a", tmp_path / "b"
    census("-i", tmp_path / "pred", "-o", a, "--images", tmp_path / "img", "--no-plots", check=True)
    census("-i", tmp_path / "pred", "-o", b, "--images", tmp_path / "img", "--no-plots", "--binary", check=True)
    ca, cb = pd.read_csv(a / "clusters.csv"), pd.read_csv(b / "clusters.csv")
    geo = [k for k in ca.columns if k not in ("max_prob", "mean_prob")]
    assert len(ca) == 2
    pd.testing.assert_frame_equal(ca[geo], cb[geo])
    # evaluate: against the reference, a perfect prediction
    ev = tmp_path / "ev"
    run_cli([CLI, "evaluate", "--ref", tmp_path / "ref", "--pred", tmp_path / "pred", "-o", ev, "--no-plots",
             "--thresholds", "0.5", "--min-cluster-sizes", "0"])
    pc = pd.read_csv(ev / "per_case.csv", dtype={"case": str})
    whole = pc[pc["region"] == "whole"] if "region" in pc.columns else pc
    assert whole["dice"].tolist() == [1.0]


def test_properties_without_geometry_are_one_line(tmp_path):
    np.savez(tmp_path / "c.npz", probabilities=np.zeros((2, 3, 3, 3), np.float32))
    with open(tmp_path / "c.pkl", "wb") as f:
        pickle.dump({"spacing": [1.0, 1.0, 1.0], "other": 1}, f)
    with pytest.raises(Exception) as e:
        io.read_probabilities(tmp_path / "c.npz", "c")
    assert str(e.value) == (f"c: nnU-Net properties {tmp_path / 'c.pkl'} hold neither 'sitk_stuff' (SimpleITKIO) "
                            "nor 'nibabel_stuff' (NibabelIO) geometry (found ['other', 'spacing'])")


# ------------------------------------------------------------------------------------- pure functions

def test_shard_is_nnunet_split_of_sorted_ids():
    ids = ["c", "a", "e", "b", "d"]
    assert resume.shard(ids, 2, 0) == ["a", "c", "e"] and resume.shard(ids, 2, 1) == ["b", "d"]
    assert resume.shard(ids, 7, 6) == []
    assert sorted(c for k in range(3) for c in resume.shard(ids, 3, k)) == sorted(ids)


def test_region_owner_and_index_agree_with_evaluate(tmp_path):
    ids = {"pvs001", "pvs001_rescan", "a_b", "a"}
    for stem, expect in (("pvs001", "pvs001"), ("pvs001_bg", "pvs001"), ("pvs001_rescan_bg", "pvs001_rescan"),
                         ("pvs001_rescan", "pvs001_rescan"), ("a_b_c", "a_b"), ("a_c", "a"), ("pvs002", None),
                         ("pvs0011", None)):
        assert region_owner(stem, ids) == owner(stem, ids) == expect, stem
    for name in ("pvs001.nii.gz", "pvs001_bgslice.nii.gz", "pvs001_rescan.nii.gz", "pvs001_rescan_x.nii",
                 "a_b.nii.gz", "a_c.nii.gz", "zz.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    index, orphans = index_region_files(tmp_path, ids)
    for c in ids:
        assert index.get(c, []) == region_files(tmp_path, c, ids), c
    assert orphans == [tmp_path / "zz.nii.gz"]


def test_inputs_digest_follows_size_and_time_not_reading(tmp_path):
    f = tmp_path / "x.nii.gz"
    f.write_bytes(b"abc")
    d = resume.inputs_digest([f])
    assert resume.inputs_digest([f]) == d
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert resume.inputs_digest([f]) != d
    assert resume.inputs_digest([f, tmp_path / "missing"]) != resume.inputs_digest([f])


def test_gather_from_images_lists_scans_not_yet_predicted(cohort):
    pred = cohort / "pred"
    _copy_predictions(cohort / "bin", pred, ["s02"])
    cases, missing, unused = gather_cases(pred, cohort / "images", cohort / "regions", False, cohort_from_images=True)
    assert [c.case for c in cases] == list(IDS) and not missing and not unused
    assert [c.pred for c in cases if c.case != "s02"] == [io.PredFiles()] * 4
    assert [p.name for c in cases if c.case == "s02" for p in c.input_files] == [
        "s02.nii.gz", "s02_0000.nii.gz", "s02.nii.gz"]
    cases, _, unused = gather_cases(pred, cohort / "images", None, False)
    assert [c.case for c in cases] == ["s02"] and len(next(iter(unused.values()))) == 4
