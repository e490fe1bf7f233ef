"""No command replaces a folder another command (or the user) wrote; outputs on a mount point; Ctrl-C.

Each pair runs the refusing command through the CLI as a user types it, over a folder the other
command really wrote (or the user made), and checks the one-line refusal, the exit status, and that
every file of that folder is byte-for-byte as before. Mount points and Ctrl-C are simulated with
monkeypatch: ``os.path.ismount`` saying yes, a rename of the target failing with EBUSY as it does on
a real mount point, a step of the work raising KeyboardInterrupt.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from synthetic import save_nifti
from nnunet_pvs import staging
from nnunet_pvs.cli import main

CLI = Path(sys.executable).parent / "nnunet-pvs"
SHAPE = (12, 12, 6)
IDS = ("c1", "c2", "c3")


# --------------------------------------------------------------------------------------------- helpers

_save = save_nifti


def _aseg() -> np.ndarray:
    lab = np.zeros(SHAPE, np.int16)
    lab[1:11, 1:11, :] = 2
    lab[6:11, 1:11, :] = 41
    lab[3:5, 3:5, :] = 12
    lab[7:9, 3:5, :] = 51
    return lab


@pytest.fixture
def world(tmp_path):
    """Reference and predicted masks (two small clusters each, one shifted) and aseg maps for three cases."""
    for k, cid in enumerate(IDS):
        ref = np.zeros(SHAPE, np.uint8)
        ref[2:4, 2:4, 1:3] = 1
        ref[7:9, 6:8, 2:4] = 1
        pred = np.roll(ref, k % 2, axis=0)
        _save(ref, tmp_path / "in" / "ref" / f"{cid}.nii.gz")
        _save(pred, tmp_path / "in" / "pred" / f"{cid}.nii.gz")
        _save(_aseg(), tmp_path / "in" / "aseg" / f"{cid}.nii.gz")
    return tmp_path


def _evaluate(w: Path, out: Path, *extra):
    return run_cli([CLI, "evaluate", "--ref", w / "in" / "ref", "--pred", w / "in" / "pred", "-o", out,
                    "--no-plots", "--thresholds", "0.5", "--min-cluster-sizes", "0", *extra], check=False)


def _census(w: Path, out: Path):
    return run_cli([CLI, "census", "-i", w / "in" / "pred", "-o", out, "--no-plots"], check=False)


def _regions(w: Path, out: Path):
    return run_cli([CLI, "regions", "-i", w / "in" / "aseg", "-o", out], check=False)


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder``, hidden ones included, with its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden(folder: Path) -> list[str]:
    """Staging leftovers: hidden names other than the ownership marker."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != staging.MARKER)


def _refused(proc, command: str, folder: Path, by: str | None) -> None:
    """Exit 2 and exactly the one line of the refusal."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    why = (f"was written by 'nnunet-pvs {by}'" if by else f"is not empty and was not written by 'nnunet-pvs {command}'")
    option = "-d" if command in ("convert", "phantom") else "-o"
    expected = f"nnunet-pvs {command}: error: {folder} {why}; choose another {option} (nothing was changed)"
    assert proc.stderr.strip().splitlines()[-1] == expected, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _written_by(w: Path, command: str) -> Path:
    """A folder ``command`` really wrote."""
    out = w / f"by_{command}"
    proc = {"evaluate": _evaluate, "census": _census, "regions": _regions}[command](w, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / staging.MARKER).read_text())["command"] == command
    return out


# ---------------------------------------------------------------------------- one command over another

def test_compare_over_an_evaluation_is_refused_before_any_work(world, monkeypatch):
    """The data-loss bug: `evaluate` writes report.md, and compare took any folder holding one for its
    own earlier report. The check comes before the dataset is even looked up (none exists here)."""
    evaluation = _written_by(world, "evaluate")
    before = _snapshot(evaluation)
    monkeypatch.delenv("nnUNet_results", raising=False)
    proc = run_cli([CLI, "compare", "-d", "42", "--models", "nnUNetTrainer:3d_fullres", "nnUNetTrainerMfNSDe:2d",
                    "-o", evaluation, "--no-plots"], check=False)
    _refused(proc, "compare", evaluation, "evaluate")
    assert _snapshot(evaluation) == before


def test_compare_over_an_evaluation_of_an_earlier_version_is_refused(world):
    """Before the marker an evaluation held report.md and no marker of ours: still not compare's."""
    evaluation = _written_by(world, "evaluate")
    (evaluation / staging.MARKER).unlink()
    before = _snapshot(evaluation)
    assert (evaluation / "report.md").is_file()
    proc = run_cli([CLI, "compare", "-d", "42", "--models", "nnUNetTrainer:3d_fullres", "nnUNetTrainerMfNSDe:2d",
                    "-o", evaluation], check=False)
    _refused(proc, "compare", evaluation, None)
    assert _snapshot(evaluation) == before


def test_evaluate_over_a_census_is_refused(world):
    census = _written_by(world, "census")
    before = _snapshot(census)
    _refused(_evaluate(world, census), "evaluate", census, "census")
    assert _snapshot(census) == before


def test_census_over_a_compare_report_is_refused(nnunet_env, tmp_path):
    from test_compare import BASE, MFNS, make_dataset

    make_dataset(nnunet_env, models=(BASE, MFNS))
    report = tmp_path / "report"
    run_cli([CLI, "compare", "-d", "42", "--models", MFNS, BASE, "-o", report, "--n-boot", "50", "--no-plots"],
            env=nnunet_env["env"])
    assert json.loads((report / staging.MARKER).read_text())["command"] == "compare"
    before = _snapshot(report)
    preds = nnunet_env["nnUNet_raw"] / "Dataset042_CmpTest" / "labelsTr"
    proc = run_cli([CLI, "census", "-i", preds, "-o", report, "--no-plots"], env=nnunet_env["env"], check=False)
    _refused(proc, "census", report, "compare")
    assert _snapshot(report) == before
    # compare itself replaces its own report as a whole
    (report / "stale.csv").write_text("from the earlier run")
    run_cli([CLI, "compare", "-d", "42", "--models", MFNS, BASE, "-o", report, "--n-boot", "50", "--no-plots"],
            env=nnunet_env["env"])
    assert not (report / "stale.csv").exists() and (report / "report.md").is_file()


def test_regions_over_an_evaluation_is_refused(world):
    evaluation = _written_by(world, "evaluate")
    before = _snapshot(evaluation)
    _refused(_regions(world, evaluation), "regions", evaluation, "evaluate")
    assert _snapshot(evaluation) == before


def test_cohort_and_demo_over_an_evaluation_are_refused(world):
    evaluation = _written_by(world, "evaluate")
    before = _snapshot(evaluation)
    proc = run_cli([CLI, "evaluate-cohort", "--pred", world / "in" / "pred", "--compare", world / "in" / "pred",
                    "-o", evaluation, "--no-plots"], check=False)
    _refused(proc, "evaluate-cohort", evaluation, "evaluate")
    # --restart deleted the work folder first, whatever it was
    proc = run_cli([CLI, "demo", "--tiny", "--restart", "--work-dir", evaluation], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"nnunet-pvs demo: error: {evaluation} was written by 'nnunet-pvs evaluate'; choose another --work-dir "
        "(nothing was changed)")
    assert _snapshot(evaluation) == before


def test_evaluate_over_a_users_folder_is_refused(world):
    mine = world / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("do not delete")
    (mine / "report.md").write_text("# my notes\n")       # a report.md of the user's is not an evaluation
    before = _snapshot(mine)
    _refused(_evaluate(world, mine), "evaluate", mine, None)
    _refused(_census(world, mine), "census", mine, None)
    assert _snapshot(mine) == before


def test_convert_force_never_replaces_a_phantom_dataset(nnunet_env, tmp_path):
    """--force replaces a dataset of the same id only when the same command wrote it."""
    from synthetic import write_tiny_dataset

    phantom = write_tiny_dataset(nnunet_env["nnUNet_raw"], 55, name="PVSPhantomT2w", n_cases=3, shape=(8, 8, 4))
    staging.write_marker(phantom, "phantom")
    before = _snapshot(phantom)
    sub = tmp_path / "in" / "s0"
    _save(np.random.default_rng(0).normal(100, 10, (8, 8, 4)).astype(np.float32), sub / "T2w.nii.gz")
    m = np.zeros((8, 8, 4), np.uint8)
    m[2:4, 3, :] = 1
    _save(m, sub / "mask.nii.gz")
    proc = run_cli([CLI, "convert", "--folder", tmp_path / "in", "-c", "T2w", "-d", 55, "-n", "Mine", "--force"],
                   env=nnunet_env["env"], check=False)
    _refused(proc, "convert", phantom, "phantom")
    assert _snapshot(phantom) == before and not (nnunet_env["nnUNet_raw"] / "Dataset055_Mine").exists()


def test_same_command_rerun_replaces_its_own_output(world):
    out = _written_by(world, "evaluate")
    (out / "stale.csv").write_text("from the earlier run")
    assert _evaluate(world, out).returncode == 0
    assert not (out / "stale.csv").exists() and (out / "per_case.csv").is_file()
    assert json.loads((out / staging.MARKER).read_text())["command"] == "evaluate"
    assert _hidden(out) == [] and _hidden(world) == []


def test_same_command_replaces_its_pre_marker_layout(world):
    """Folders of earlier versions: their old marker file, or the layout only that command writes."""
    evaluation = _written_by(world, "evaluate")
    (evaluation / staging.MARKER).unlink()      # an evaluation as written before the marker
    (evaluation / "stale.csv").write_text("old")
    assert _evaluate(world, evaluation).returncode == 0 and not (evaluation / "stale.csv").exists()
    census = _written_by(world, "census")
    (census / staging.MARKER).unlink()
    (census / staging.LEGACY_MARKER).write_text("written by nnunet-pvs census\n")
    assert _census(world, census).returncode == 0
    regions = _written_by(world, "regions")
    (regions / staging.MARKER).unlink()         # slices.csv as regions wrote it
    assert _regions(world, regions).returncode == 0


# ------------------------------------------------------------------------------------------- unit level

def test_owner_reads_the_marker_and_the_earlier_one(tmp_path):
    staging.write_marker(tmp_path, "compare")
    assert staging.owner(tmp_path) == "compare"
    (tmp_path / staging.MARKER).write_text("not json")
    assert staging.owner(tmp_path) is None
    (tmp_path / staging.LEGACY_MARKER).write_text("written by nnunet-pvs evaluate-cohort\n")
    assert staging.owner(tmp_path) == "evaluate-cohort"


def test_check_owner_ignores_leftovers_of_interrupted_runs(tmp_path):
    """A folder holding only what a killed run left is empty for this purpose (cleaned when staging)."""
    target = tmp_path / "vol"
    target.mkdir()
    (target / ".vol.tmp-somehost-123").mkdir()
    staging.check_owner(target, "evaluate")
    (target / "notes.txt").write_text("x")
    with pytest.raises(staging.UserError, match="not written by 'nnunet-pvs evaluate'"):
        staging.check_owner(target, "evaluate")


def test_replace_folder_puts_back_everything_it_moved_aside(tmp_path, monkeypatch):
    """A dataset replaced together with another of its id: a failure of the last rename restores both."""
    new, target, other = tmp_path / ".new", tmp_path / "Dataset001_A", tmp_path / "Dataset001_B"
    for p in (new, target, other):
        p.mkdir()
        (p / "f.txt").write_text(p.name)
    real = os.replace

    def failing(src, dst):
        if Path(src) == new:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        staging.replace_folder(new, target, others=[other])
    assert (target / "f.txt").read_text() == "Dataset001_A" and (other / "f.txt").read_text() == "Dataset001_B"
    monkeypatch.setattr(os, "replace", real)
    staging.replace_folder(new, target, others=[other])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset001_A"] and (target / "f.txt").read_text() == ".new"


# ------------------------------------------------------------------------------------------ mount points

def _as_mount_point(monkeypatch, target: Path):
    """``target`` behaves as a mount point: os.path.ismount says so and renaming it fails with EBUSY."""
    target = target.absolute()
    real_ismount, real_replace, real_rename = os.path.ismount, os.replace, os.rename
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p).absolute() == target or real_ismount(p))

    def busy(real):
        def move(src, dst, *a, **kw):
            if Path(src).absolute() == target:
                raise OSError(errno.EBUSY, "Device or resource busy", str(src))
            return real(src, dst, *a, **kw)
        return move

    monkeypatch.setattr(os, "replace", busy(real_replace))
    monkeypatch.setattr(os, "rename", busy(real_rename))


@pytest.mark.parametrize("command", ["evaluate", "regions"])
def test_output_on_a_mount_point_is_staged_inside(world, monkeypatch, command):
    vol = world / "vol"
    vol.mkdir()
    # what the old code left beside a mount point when renaming it aside failed (PID no longer running)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = world / f".vol.old-{int(dead.stdout)}-a1b2c3d4"
    leftover.mkdir()
    _as_mount_point(monkeypatch, vol)
    run = {"evaluate": _evaluate, "regions": _regions}[command]
    proc = run(world, vol)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((vol / staging.MARKER).read_text())["command"] == command
    first = _snapshot(vol)
    assert len(first) > 2 and _hidden(vol) == []
    assert not leftover.exists() and _hidden(world) == []
    # a second run replaces the first one's files inside the mount point
    (vol / "stale.txt").write_text("from the earlier run")
    assert run(world, vol).returncode == 0
    assert not (vol / "stale.txt").exists() and set(_snapshot(vol)) == set(first) and _hidden(vol) == []


def test_undetected_mount_point_falls_back_to_staging_inside(world, monkeypatch):
    """A bind mount os.path.ismount cannot see: the rename fails with EBUSY, the entries move instead."""
    vol = _written_by(world, "evaluate")
    (vol / "stale.txt").write_text("from the earlier run")
    _as_mount_point(monkeypatch, vol)
    monkeypatch.setattr(os.path, "ismount", lambda p: False)
    proc = _evaluate(world, vol)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (vol / "stale.txt").exists() and (vol / "per_case.csv").is_file()
    assert _hidden(vol) == [] and _hidden(world) == []


def test_folder_in_a_read_only_folder_is_staged_inside(world, monkeypatch):
    """A writable -o inside a folder we may not write (a container's read-only /): written in place."""
    out = _written_by(world, "regions")
    real_access, real_mkdir = os.access, os.mkdir
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p).absolute() != world and real_access(p, mode))

    def mkdir(p, *a, **kw):  # as the read-only folder would answer (we run as root here, who may write anyway)
        if Path(p).absolute().parent == world:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_mkdir(p, *a, **kw)

    monkeypatch.setattr(os, "mkdir", mkdir)
    (out / "stale.txt").write_text("from the earlier run")
    proc = _regions(world, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / "stale.txt").exists() and (out / "slices.csv").is_file() and _hidden(out) == []
    assert _hidden(world) == []
    proc = _regions(world, world / "new")    # a new folder there cannot be made: refused before any work
    assert proc.returncode == 2 and f"{world}: no write permission" in proc.stderr and not (world / "new").exists()


def test_failed_move_into_a_mount_point_puts_the_old_entries_back(tmp_path, monkeypatch):
    vol = tmp_path / "vol"
    vol.mkdir()
    staging.write_marker(vol, "evaluate")
    (vol / "per_case.csv").write_text("old")
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p).absolute() == vol)
    real_move = staging.shutil.move

    def failing(src, dst, *a, **kw):
        if Path(src).name == "per_case.csv":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_move(src, dst, *a, **kw)

    monkeypatch.setattr(staging.shutil, "move", failing)
    with pytest.raises(OSError):
        with staging.staged_folder(vol, "evaluate") as stage:
            (stage / "per_case.csv").write_text("new")
            (stage / "summary.csv").write_text("new")
    assert (vol / "per_case.csv").read_text() == "old" and sorted(p.name for p in vol.iterdir()) == [
        staging.MARKER, "per_case.csv"]


# ------------------------------------------------------------------------------------------------ Ctrl-C

def _interrupt(monkeypatch, module, name, after: int = 0):
    """``module.name`` raises KeyboardInterrupt on its call number ``after`` + 1 (as Ctrl-C would)."""
    real, calls = getattr(module, name), []

    def step(*a, **kw):
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(module, name, step)


def _interrupted(run, command: str) -> None:
    """``run()`` (a command through the CLI) ends with exit 130 and the one line, not a traceback."""
    try:
        proc = run()
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped nnunet_pvs.cli.main")
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"nnunet-pvs {command}: interrupted"
    assert "Traceback" not in proc.stderr


def test_ctrl_c_in_evaluate_leaves_the_earlier_output_and_nothing_else(world, monkeypatch):
    from nnunet_pvs.evaluation import report

    out = _written_by(world, "evaluate")
    before = _snapshot(out)
    _interrupt(monkeypatch, report, "build_report")   # CSVs already written into the stage by then
    _interrupted(lambda: _evaluate(world, out), "evaluate")
    assert _snapshot(out) == before and _hidden(world) == []
    fresh = world / "new" / "deeper" / "out"              # parents it created go too
    _interrupted(lambda: _evaluate(world, fresh), "evaluate")
    assert not (world / "new").exists() and _hidden(world) == []


def test_ctrl_c_in_census_keeps_whole_subjects_and_regions_leaves_nothing(world, monkeypatch):
    from nnunet_pvs.census import case
    from nnunet_pvs.dataset_conversion import cli_regions

    # the census is resumable: a subject finished before Ctrl-C stays (whole), the interrupted one leaves
    # nothing, not even a hidden staging folder, and no cohort table is written
    _interrupt(monkeypatch, case, "run_case", after=1)
    _interrupted(lambda: _census(world, world / "census"), "census")
    cases = world / "census" / "cases"
    assert [p.name for p in cases.iterdir()] == ["c1"] and _hidden(world / "census") == []
    assert not (world / "census" / "subjects.csv").exists()
    _interrupt(monkeypatch, cli_regions, "region_masks", after=1)
    _interrupted(lambda: _regions(world, world / "masks"), "regions")
    assert sorted(p.name for p in world.iterdir()) == ["census", "in"]


def test_ctrl_c_in_convert_leaves_no_dataset(nnunet_env, tmp_path, monkeypatch):
    from nnunet_pvs.dataset_conversion import convert

    sub = tmp_path / "in" / "s0"
    _save(np.random.default_rng(0).normal(100, 10, (8, 8, 4)).astype(np.float32), sub / "T2w.nii.gz")
    m = np.zeros((8, 8, 4), np.uint8)
    m[2:4, 3, :] = 1
    _save(m, sub / "mask.nii.gz")
    _interrupt(monkeypatch, convert, "_write_mask")
    _interrupted(lambda: run_cli([CLI, "convert", "--folder", tmp_path / "in", "-c", "T2w", "-d", 56, "-n", "Stop"],
                                 env=nnunet_env["env"], check=False), "convert")
    assert list(nnunet_env["nnUNet_raw"].iterdir()) == []


def test_ctrl_c_while_a_command_is_loading(monkeypatch, capsys):
    """Caught once at the entry point, whatever the command was doing (here: importing its module)."""
    import importlib

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupted)
    try:
        rc = main(["evaluate", "--help"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped nnunet_pvs.cli.main")
    assert rc == 130
    assert capsys.readouterr().err.strip() == "nnunet-pvs evaluate: interrupted"
