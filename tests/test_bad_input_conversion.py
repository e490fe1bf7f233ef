"""Bad-input battery for ``convert``, ``splits`` and ``regions``, driven through the ``nnunet-pvs`` CLI.

One case per class of mistake a user makes (malformed tables, non-numeric covariates, empty labels,
output path problems, re-used output folders, not-an-aseg label maps, grids that differ). Every
case asserts: exit code 2, one error line naming the file or value, no traceback, inputs
byte-identical afterwards, and the output locations exactly as before (nothing partial, nothing
hidden). Interrupted runs (a killed run's hidden staging folder, left by a dead PID) and id-prefix
collisions are checked separately: the next run must clean up, and each case must get its own data.
"""

from __future__ import annotations


import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import run_cli
from nnunet_pvs.staging import staging_name
from synthetic import save_nifti, write_tiny_dataset

CLI = Path(sys.executable).parent / "nnunet-pvs"
SHAPE = (12, 12, 4)
AFFINE = np.diag([0.69, 0.69, 2.0, 1.0])


def _save(data, path: Path, affine=AFFINE) -> Path:
    return save_nifti(data, path, affine)


def _aseg(shift: int = 0) -> np.ndarray:
    lab = np.zeros(SHAPE, np.int16)
    lab[1:11, 1:11, :] = 2
    lab[6:11, 1:11, :] = 41
    lab[3:5, 3:5, :] = 12
    lab[7:9, 3:5, :] = 51
    return np.where(lab > 0, lab + shift, 0).astype(np.int16)


def _subjects(folder: Path, ids=("s0", "s1", "s2"), mask_value: int = 1) -> list[dict]:
    """T2w image, 0/``mask_value`` mask and aseg map per subject; manifest rows (absolute paths)."""
    rng = np.random.default_rng(0)
    rows = []
    for sid in ids:
        m = np.zeros(SHAPE, np.uint8)
        m[2:5, 6, :] = mask_value
        rows.append({"id": sid,
                     "T2w": str(_save(rng.normal(100, 10, SHAPE).astype(np.float32), folder / f"{sid}_T2w.nii.gz")),
                     "mask": str(_save(m, folder / f"{sid}_mask.nii.gz")),
                     "regions": str(_save(_aseg(), folder / f"{sid}_aseg.nii.gz")),
                     "age": "60"})
    return rows


def _csv(rows: list[dict], sep=",") -> str:
    cols = list(rows[0])
    return "\n".join([sep.join(cols)] + [sep.join(str(r[c]) for c in cols) for r in rows]) + "\n"


def _tree(*roots: Path) -> dict[str, str]:
    """Every file and folder (hidden ones included) under ``roots``, with file content hashes."""
    out = {}
    for root in roots:
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for p in sorted(root.rglob("*")) if root.is_dir() else []:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _dead_pid() -> int:
    """The PID of a process that has finished (what a SIGKILLed run leaves in its staging name)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@dataclass
class Case:
    args: list
    expect: list[str]                     # substrings of the error line
    inputs: list[Path]                    # must stay byte-identical
    outputs: list[Path] = field(default_factory=list)  # must stay exactly as they were


def _convert_case(tmp: Path, env, kind: str) -> Case:
    raw = env["nnUNet_raw"]
    d = tmp / "in"
    rows = _subjects(d)
    manifest = d / "manifest.csv"
    base = ["convert", "--manifest", manifest, "-c", "T2w", "-d", 50, "-n", "Bad"]
    text = _csv(rows)
    expect = [str(manifest)]
    if kind == "empty_file":
        text, expect = "", [str(manifest), "empty"]
    elif kind == "bad_encoding":
        text = text.replace("60", "6\xe90", 1).encode("latin-1")
        expect = [str(manifest), "UTF-8", "line 2"]
    elif kind == "missing_column":
        text = _csv([{k: v for k, v in r.items() if k != "T2w"} for r in rows])
        expect = [str(manifest), "T2w"]
    elif kind == "ragged_row":
        lines = text.splitlines()
        lines[2] += ",extra"
        text = "\n".join(lines) + "\n"
        expect = [str(manifest), "line 3", "6 cell(s)"]
    elif kind == "duplicate_column":
        text = text.replace("age", "mask", 1)
        expect = [str(manifest), "mask", "more than once"]
    elif kind == "duplicate_id":
        rows[2]["id"] = "s0"
        text = _csv(rows)
        expect = ["s0: duplicate subject id"]
    elif kind == "empty_labels":
        base += ["--label-value", "2"]
        expect = ["all 3 training mask(s) are empty", "--label-value 2", "mask values found: 0, 1", "s0_mask.nii.gz",
                  "--allow-empty-labels"]
    elif kind == "output_is_file":
        out = tmp / "raw_file"
        out.write_text("not a folder")
        rows[0]["T2w"] = str(d / "missing.nii.gz")  # checked only after the output: the output is named
        text = _csv(rows)
        base += ["-o", out]
        expect = [str(out), "is a file"]
        raw = out
    elif kind == "output_under_file":
        out = tmp / "raw_file"
        out.write_text("not a folder")
        base += ["-o", out / "nnUNet_raw"]
        expect = [str(out), "is a file"]
        raw = out
    elif kind == "reused_output":  # a dataset of this id made by hand: refused, kept as it was (even --force
        _save(np.zeros(SHAPE, np.float32), raw / "Dataset050_Old" / "imagesTr" / "x_0000.nii.gz")  # would not)
        expect = ["Dataset050_Old", "not written by 'nnunet-pvs convert'", "choose another -d"]
    manifest.parent.mkdir(parents=True, exist_ok=True)
    (manifest.write_bytes if isinstance(text, bytes) else manifest.write_text)(text)
    return Case(base, expect, [d], [raw])


def _splits_case(tmp: Path, env, kind: str) -> Case:
    raw, pre = env["nnUNet_raw"], env["nnUNet_preprocessed"]
    ds = write_tiny_dataset(raw, 60, n_cases=6, n_test=0, shape=(8, 8, 4))
    cov = ds / "covariates.csv"
    ids = [f"case{i:03d}" for i in range(6)]
    ages = ["61.5", "70.2", "55.0", "48.1", "66.4", "73.9"]
    base = ["splits", "-d", 60, "--by", "age"]
    expect = [str(cov)]
    table = lambda vals, col="age": "case_id," + col + "\n" + "".join(  # noqa: E731
        f"{i},{v}\n" for i, v in zip(ids, vals))
    text = table(ages)
    if kind == "unknown_age":
        text = table(ages[:3] + ["unknown"] + ages[4:])
        expect += ["case003", "line 5", "'unknown'", "'age'"]
    elif kind == "decimal_comma":
        text = "case_id;age\n" + "".join(f"{i};{v.replace('.', ',')}\n" for i, v in zip(ids, ages))
        expect += ["'61,5'", "decimal"]
    elif kind == "unknown_pvs_load":
        text = table(["10", "20", "n.a.", "30", "40", "50"], "pvs_voxels")
        base = ["splits", "-d", 60]
        expect += ["case002", "'n.a.'"]
    elif kind == "missing_id_column":
        text = "subject,age\n" + "".join(f"{i},{v}\n" for i, v in zip(ids, ages))
        expect += ["case_id"]
    elif kind == "empty_file":
        text = ""
        expect += ["empty"]
    elif kind == "bad_encoding":
        text = (table(ages) + "case999,\xb5\n").encode("cp1252")
        expect += ["UTF-8", "line 8"]
    elif kind == "ragged_row":
        text = table(ages).replace("case002,55", "case002,55,1")
        expect += ["line 4"]
    elif kind == "duplicate_id":
        text = table(ages).replace("case004", "case001")
        expect += ["'case001'", "lines 3, 6"]
    elif kind == "output_is_file":
        pre = tmp / "pre_file"
        pre.write_text("x")
        base += ["--preprocessed", pre]
        text = table(ages[:3] + ["unknown"] + ages[4:])  # the output is checked first
        expect = [str(pre), "is a file"]
    elif kind == "splits_file_is_folder":
        (pre / ds.name / "splits_final.json").mkdir(parents=True)
        expect = [str(pre / ds.name / "splits_final.json"), "is a folder"]
    elif kind == "reused_output":
        (pre / ds.name).mkdir(parents=True)
        (pre / ds.name / "splits_final.json").write_text(json.dumps([{"train": ids[:5], "val": ids[5:]}] * 5))
        expect = [str(pre / ds.name / "splits_final.json"), "--force"]
    (cov.write_bytes if isinstance(text, bytes) else cov.write_text)(text)
    return Case(base, expect, [ds], [pre])


def _regions_case(tmp: Path, env, kind: str) -> Case:
    src, images, out = tmp / "aseg", tmp / "images", tmp / "masks"
    for cid in ("a", "b"):
        _save(_aseg(), src / f"{cid}.nii.gz")
        _save(np.zeros(SHAPE, np.float32), images / f"{cid}_0000.nii.gz")
    base = ["regions", "-i", src, "-o", out, "--images", images]
    bad = src / "b.nii.gz"
    expect = ["b:", str(bad)]
    if kind == "binary_mask":
        _save((_aseg() > 0).astype(np.uint8), bad)
        expect += ["not look like an aseg", "labels found: 0, 1"]
    elif kind == "shifted_labels":
        _save(_aseg(shift=1), bad)
        expect += ["not look like an aseg", "no cerebral white matter label (2/41);", "3, 13, 42, 52"]
    elif kind == "other_spacing":
        _save(_aseg(), bad, np.diag([1.0, 1.0, 1.0, 1.0]))
        expect += ["spacing 1 x 1 x 1 mm vs 0.69 x 0.69 x 2 mm", "b_0000.nii.gz"]
    elif kind == "other_shape":
        _save(np.pad(_aseg(), ((0, 1), (0, 0), (0, 0))), bad)
        expect += ["shape (13, 12, 4)", "(12, 12, 4)"]
    elif kind == "shifted_affine":
        shifted = AFFINE.copy()
        shifted[0, 3] = 0.5
        _save(_aseg(), bad, shifted)
        expect += ["affine differs from b_0000.nii.gz by 0.5"]
    elif kind == "output_is_file":
        out.write_text("x")
        _save((_aseg() > 0).astype(np.uint8), bad)  # the output is checked before the label maps
        expect = [str(out), "is a file"]
    elif kind == "foreign_output":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        expect = [str(out), "not written by 'nnunet-pvs regions'"]
    return Case(base, expect, [src, images], [out, tmp])


BUILDERS = {"convert": _convert_case, "splits": _splits_case, "regions": _regions_case}
CASES = {
    "convert": ["empty_file", "bad_encoding", "missing_column", "ragged_row", "duplicate_column", "duplicate_id",
                "empty_labels", "output_is_file", "output_under_file", "reused_output"],
    "splits": ["unknown_age", "decimal_comma", "unknown_pvs_load", "missing_id_column", "empty_file",
               "bad_encoding", "ragged_row", "duplicate_id", "output_is_file", "splits_file_is_folder",
               "reused_output"],
    "regions": ["binary_mask", "shifted_labels", "other_spacing", "other_shape", "shifted_affine",
                "output_is_file", "foreign_output"],
}


@pytest.mark.parametrize("command,kind", [(c, k) for c, ks in CASES.items() for k in ks])
def test_bad_input_is_one_clear_error_and_changes_nothing(nnunet_env, tmp_path, command, kind):
    work = tmp_path / "work"
    work.mkdir()
    case = BUILDERS[command](work, nnunet_env, kind)
    inputs_before = _tree(*case.inputs)
    outputs_before = _tree(*case.outputs)
    # the first case of each command as a real process, the others in-process (conftest.run_cli)
    p = run_cli([CLI, *case.args], env=nnunet_env["env"], check=False, timeout=120,
                in_process=kind != CASES[command][0])
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr
    error = [ln for ln in p.stderr.splitlines() if ln.startswith(f"nnunet-pvs {command}: error:")]
    assert len(error) == 1, p.stderr
    detail = " ".join([error[0], *p.stderr.splitlines()[p.stderr.splitlines().index(error[0]) + 1:]])
    for s in case.expect:
        assert s in detail, f"{s!r} not in: {p.stderr}"
    assert _tree(*case.inputs) == inputs_before, "an input was modified"
    assert _tree(*case.outputs) == outputs_before, "output written, removed or left behind despite the error"


def test_convert_allow_empty_labels_is_the_explicit_opt_in(nnunet_env, tmp_path):
    rows = _subjects(tmp_path / "in")
    manifest = tmp_path / "in" / "manifest.csv"
    manifest.write_text(_csv(rows))
    args = [CLI, "convert", "--manifest", manifest, "-c", "T2w", "-d", 51, "-n", "Empty", "--label-value", "2"]
    assert run_cli(args + ["--check"], env=nnunet_env["env"], check=False).returncode == 2
    p = run_cli(args + ["--allow-empty-labels"], env=nnunet_env["env"])
    assert "3 of 3 mask(s) are empty" in p.stderr
    labels = nnunet_env["nnUNet_raw"] / "Dataset051_Empty" / "labelsTr"
    assert all(nib.load(str(f)).get_fdata().sum() == 0 for f in labels.iterdir())


def test_convert_cleans_a_killed_runs_staging_folder_and_rewrites_an_incomplete_dataset(nnunet_env, tmp_path):
    raw = nnunet_env["nnUNet_raw"]
    rows = _subjects(tmp_path / "in")
    manifest = tmp_path / "in" / "manifest.csv"
    manifest.write_text(_csv(rows))
    args = [CLI, "convert", "--manifest", manifest, "-c", "T2w", "-d", 52, "-n", "Killed"]
    final = raw / "Dataset052_Killed"
    # a run SIGKILLed while writing: a half-written hidden folder of a PID that no longer runs
    stale = staging_name(final, pid=_dead_pid())
    _save(np.zeros(SHAPE, np.float32), stale / "imagesTr" / "s0_0000.nii.gz")
    p = run_cli(args, env=nnunet_env["env"])
    assert not stale.exists() and "interrupted run" in p.stdout + p.stderr
    assert [x.name for x in raw.iterdir()] == [final.name]
    assert "up to date" in run_cli(args, env=nnunet_env["env"]).stdout
    # a file lost from the dataset: not "up to date", rewritten
    (final / "labelsTr" / "s1.nii.gz").unlink()
    p = run_cli(args, env=nnunet_env["env"])
    assert "up to date" not in p.stdout and (final / "labelsTr" / "s1.nii.gz").is_file()
    # killed between moving the old dataset aside and moving the new one in: the old one comes back
    aside = staging_name(final, "old", pid=_dead_pid())
    final.rename(aside)
    p = run_cli(args, env=nnunet_env["env"])
    assert "restored" in p.stdout + p.stderr and "up to date" in p.stdout
    assert [x.name for x in raw.iterdir()] == [final.name]


def test_splits_and_regions_clean_killed_runs_leftovers(nnunet_env, tmp_path):
    env = nnunet_env["env"]
    ds = write_tiny_dataset(nnunet_env["nnUNet_raw"], 61, n_cases=6, n_test=0, shape=(8, 8, 4))
    out_dir = nnunet_env["nnUNet_preprocessed"] / ds.name
    out_dir.mkdir()
    stale = staging_name(out_dir / "test_fold0.txt", pid=_dead_pid())
    stale.write_text("case000\n")
    run_cli([CLI, "splits", "-d", 61, "--protocol", "cai"], env=env)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["splits_final.json", "test_groups.json"] + [f"test_fold{k}.txt" for k in range(5)])

    work = tmp_path / "work"
    src, out = work / "aseg", work / "masks"
    _save(_aseg(), src / "a.nii.gz")
    run_cli([CLI, "regions", "-i", src, "-o", out], env=env)
    stale = staging_name(out, pid=_dead_pid())
    _save(np.zeros(SHAPE, np.uint8), stale / "a_bg.nii.gz")
    _save(_aseg(), src / "b.nii.gz")
    run_cli([CLI, "regions", "-i", src, "-o", out], env=env)
    assert sorted(p.name for p in work.iterdir()) == ["aseg", "masks"]
    assert sorted(p.name for p in out.iterdir()) == [".nnunet-pvs.json", "a_bg.nii.gz", "a_wm.nii.gz",
                                                     "b_bg.nii.gz", "b_wm.nii.gz", "slices.csv"]


def test_id_prefix_collision_each_case_keeps_its_own_data(nnunet_env, tmp_path):
    """``pvs001`` and ``pvs001_rescan``: every file of the converted dataset and of the region masks
    comes from that subject's own input, never from the id that shares its prefix."""
    env = nnunet_env["env"]
    ids = ("pvs001", "pvs001_rescan", "pvs002", "pvs003", "pvs004")
    rows = _subjects(tmp_path / "in", ids)
    lab = _aseg()
    lab[3:5, 3:5, :] = 2  # pvs001_rescan: no left putamen, so its BG mask differs
    _save(lab, Path(rows[1]["regions"]))
    m = np.zeros(SHAPE, np.uint8)
    m[1:9, 1, :] = 1
    _save(m, Path(rows[1]["mask"]))
    manifest = tmp_path / "in" / "manifest.csv"
    manifest.write_text(_csv(rows))
    run_cli([CLI, "convert", "--manifest", manifest, "-c", "T2w", "-d", 53, "-n", "Prefix"], env=env)
    root = nnunet_env["nnUNet_raw"] / "Dataset053_Prefix"
    for r in rows:
        np.testing.assert_array_equal(nib.load(str(root / "regions" / f"{r['id']}.nii.gz")).get_fdata(),
                                      nib.load(r["regions"]).get_fdata())
        np.testing.assert_array_equal(nib.load(str(root / "labelsTr" / f"{r['id']}.nii.gz")).get_fdata(),
                                      nib.load(r["mask"]).get_fdata())
    run_cli([CLI, "regions", "-d", 53], env=env)
    bg = {i: nib.load(str(root / "region_masks" / f"{i}_bg.nii.gz")).get_fdata().sum() for i in ids[:2]}
    assert bg == {"pvs001": 16 * 2, "pvs001_rescan": 16}
    p = run_cli([CLI, "splits", "-d", 53], env=env)
    folds = json.loads((nnunet_env["nnUNet_preprocessed"] / root.name / "splits_final.json").read_text())
    assert sorted(c for f in folds for c in f["val"]) == sorted(ids) and "pvs001_rescan" not in p.stderr
