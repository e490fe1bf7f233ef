"""Shared test fixtures: isolated nnU-Net folders and a runner for the real command-line tools."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

# Whether the running test is marked e2e: ``run_cli`` refuses nnU-Net's own commands in tests that are
# not, so ``make test-fast`` (``-m "not e2e"``) can never quietly plan or train.
_RUNNING = {"e2e": True}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _RUNNING["e2e"] = item.get_closest_marker("e2e") is not None


def nnunet_folders(root: Path, **overrides: str) -> tuple[dict, dict]:
    """nnU-Net's three folders created under ``root`` and the environment to run in them: our trainers
    on ``nnUNet_extTrainer``, one worker process, no compilation, no ``NNUNET_PVS_*`` budget inherited
    from the caller's shell; ``overrides`` are added last. Returns ``(env, {variable: folder})``."""
    from nnunet_pvs.plugin_env import ext_trainer_value

    dirs = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for d in dirs.values():
        d.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNUNET_PVS_")}
    env.update({k: str(d) for k, d in dirs.items()})
    env.update(nnUNet_extTrainer=ext_trainer_value(""),
               nnUNet_n_proc_DA="1",  # 0 breaks nnU-Net 2.8.1 planning (set_num_threads(0))
               nnUNet_def_n_proc="1", nnUNet_compile="f", OMP_NUM_THREADS="2",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(overrides)
    return env, dirs


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """``nnunet_folders`` inside tmp_path, also applied to os.environ for the test.

    Returns the environment dict to hand to subprocesses and the three folders.
    """
    env, dirs = nnunet_folders(tmp_path)
    for k in [k for k in os.environ if k not in env]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    env = {**env, "_dirs": ""}  # marker so callers can tell this env came from the fixture
    return {"env": env, **dirs}


def run_cli(args: list[str], env: dict | None = None, check: bool = True, timeout: int = 1200,
            cwd: str | Path | None = None, in_process: bool | None = None) -> subprocess.CompletedProcess:
    """Run a command as a user would type it; on unexpected failure show its output.

    nnU-Net's commands (``nnUNetv2_*``) may only run in tests marked ``e2e``. ``nnunet-pvs`` runs
    in-process (the ``main`` its console script calls, with ``env`` as the environment) in tests not
    marked ``e2e``, and as a real process in e2e tests; ``in_process`` overrides that choice.
    """
    name = Path(str(args[0])).name
    if name.startswith("nnUNetv2_") and not _RUNNING["e2e"]:
        pytest.fail(f"{name} runs a real nnU-Net command: mark this test "
                    "(or every test using the fixture that runs it) @pytest.mark.e2e", pytrace=False)
    if in_process is None:
        in_process = name == "nnunet-pvs" and not _RUNNING["e2e"]
    if in_process:
        proc = run_main_in_process([str(a) for a in args], env=env, cwd=cwd)
    else:
        proc = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {proc.returncode}\n--- stdout ---\n"
            f"{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def run_main_in_process(args: list[str], env: dict | None = None,
                        cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """``nnunet-pvs ARGS`` through ``nnunet_pvs.cli.main`` in this process, as the console script runs it:
    environment and working folder swapped in for the call, stdout/stderr captured, the exit status
    Python would give (SystemExit's code; 1 with the traceback on stderr for an uncaught exception)."""
    import contextlib
    import io
    import traceback

    from nnunet_pvs.cli import main

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update({k: str(v) for k, v in env.items()})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(args[1:]))
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc()
                rc = 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(args, int(rc or 0), out.getvalue(), err.getvalue())
