"""Outputs that appear whole or not at all, and leftovers of killed runs that the next run removes.

Every writer stages its output beside the target under a hidden name that records the writing
process (``.<target>.tmp-<host>-<pid>``), then swaps it in: the old output is renamed aside
(``.<target>.old-<host>-<pid>``), the new one renamed into place, and only then is the old one
deleted. A run killed by SIGKILL leaves those hidden names behind; the next run of any writer in
that folder finds the ones whose process is gone (same host, PID no longer running), puts an
aside-renamed output back if its place is empty, and deletes the rest. SIGTERM is turned into an
exception while staging, so the writer's own clean-up runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import threading
from pathlib import Path

from nnunet_pvs.errors import UserError

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)(?:\..*)?$")


def staging_name(target: Path, kind: str = "tmp", suffix: str = "", pid: int | None = None) -> Path:
    """Hidden sibling of ``target`` owned by this process, or by ``pid`` (``kind`` tmp or old)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{kind}-{_HOST}-{os.getpid() if pid is None else pid}{suffix}")


def process_alive(pid: int) -> bool:
    """Whether a process with this PID runs here (this one included); owned by someone else counts."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def clean_leftovers(folder: Path, target_prefix: str = "", log=None, may_restore=None) -> list[Path]:
    """Remove hidden staging leftovers of dead processes in ``folder``; return what was removed.

    Only names starting with ``.<target_prefix>`` are considered. An old output renamed aside by a
    run killed before its replacement moved in is restored when its original place is empty (and
    ``may_restore(original)`` agrees, if given). Leftovers of other hosts are never touched (their
    PIDs mean nothing here).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        m = _LEFTOVER.match(p.name)
        if not m or not m["target"].startswith(target_prefix):
            continue
        if m["host"] != _HOST or process_alive(int(m["pid"])):
            continue
        original = folder / m["target"]
        if m["kind"] == "old" and not original.exists() and (may_restore is None or may_restore(original)):
            os.replace(p, original)
            if log:
                log(f"{original}: restored from {p.name}, left by an interrupted run (PID {m['pid']})")
            continue
        _remove(p)
        removed.append(p)
        if log:
            log(f"{p}: removed, left by an interrupted run (PID {m['pid']})")
    return removed


def check_writable_target(target: Path, what: str, want_dir: bool) -> None:
    """Before any computation: ``target`` must be creatable/replaceable by us.

    A folder output given as an existing file (or the reverse), or a parent folder that is not
    writable, is a :class:`UserError` naming the path.
    """
    target = Path(target)
    if target.exists():
        if want_dir and not target.is_dir():
            raise UserError(f"{target}: {what} is a file, a folder is needed")
        if not want_dir and target.is_dir():
            raise UserError(f"{target}: {what} is a folder, a file path is needed")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{parent}: is a file; cannot create {what} {target} under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{parent}: not writable; cannot write {what} {target}")
    if target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
        raise UserError(f"{target}: {what} is not writable")


def replace_folder(staged: Path, target: Path) -> None:
    """Move the complete folder ``staged`` to ``target``; an existing ``target`` is renamed aside
    first and deleted only after the new one is in place."""
    staged, target = Path(staged), Path(target)
    aside = None
    if target.exists():
        aside = staging_name(target, "old")
        if aside.exists():
            _remove(aside)
        os.replace(target, aside)
    try:
        os.replace(staged, target)
    except BaseException:
        if aside is not None and not target.exists():
            os.replace(aside, target)
        raise
    if aside is not None:
        _remove(aside)


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds either its old content or all of ``text``, never a part."""
    path = Path(path)
    tmp = staging_name(path, "tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def sigterm_raises():
    """While staging, SIGTERM raises SystemExit(143) so ``except``/``finally`` clean-up runs
    (Python's default for SIGTERM ends the process without unwinding)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
