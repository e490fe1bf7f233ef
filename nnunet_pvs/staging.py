"""Outputs that appear whole or not at all, and folders that belong to the one command that wrote them.

The ground floor every writing command builds on (``evaluate``, ``evaluate-cohort``, ``compare``,
``census``, ``regions``, ``convert``, ``phantom``, ``demo``); it imports nothing of the package but
:class:`~nnunet_pvs.errors.UserError`.

* **Ownership.** Every output folder holds a small hidden marker, ``.nnunet-pvs.json``
  (``{"command": "compare", "version": ...}``). A folder is replaced only by the command its marker
  names (or, for folders of earlier versions, one whose own layout the command recognises); a
  non-empty folder of another command or of the user is refused before any work, so ``compare -o``
  on an evaluation, or ``evaluate -o ~``, deletes nothing.
* **Staging.** A folder is written into a hidden sibling that records the writing process
  (``.<target>.tmp-<host>-<pid>``); at the end the old output is renamed aside
  (``.<target>.old-<host>-<pid>``), the new one renamed into place, and only then the old one
  deleted. A mount point (the usual ``-o`` of a Docker or Apptainer volume) cannot be renamed, so
  there the stage is made inside the target and its entries are moved into place instead.
* **Leftovers.** A run killed by SIGKILL leaves those hidden names behind; the next run finds the
  ones whose process is gone (same host, PID no longer running), puts an aside-renamed output back
  if its place is empty, and deletes the rest. SIGTERM and Ctrl-C become exceptions while staging,
  so the writer's own clean-up runs and nothing half-written is left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from nnunet_pvs.errors import UserError

MARKER = ".nnunet-pvs.json"
# the marker of versions before MARKER, written by evaluate, evaluate-cohort and census: "written by nnunet-pvs CMD"
LEGACY_MARKER = ".nnunet-pvs-output"

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)(?:\..*)?$")
# what earlier versions' evaluation output folders left (tempfile.mkdtemp: PID, then random characters,
# not all digits, so a name of the current form, whose last part is a PID, is never read as one of these)
_LEGACY_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<kind>staging|old)-(?P<pid>\d+)-(?=[a-z0-9_]*[a-z_])[a-z0-9_]+$")


# --- names, processes -----------------------------------------------------------------------------

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


def _is_leftover_name(name: str) -> bool:
    return bool(_LEFTOVER.match(name) or _LEGACY_LEFTOVER.match(name))


def clean_leftovers(folder: Path, target_prefix: str = "", log=None, may_restore=None) -> list[Path]:
    """Remove hidden staging leftovers of dead processes in ``folder``; return what was removed.

    Only names starting with ``.<target_prefix>`` are considered. An old output renamed aside by a
    run killed before its replacement moved in is restored when its original place is empty (and
    ``may_restore(original)`` agrees, if given). Leftovers of other hosts are never touched (their
    PIDs mean nothing here); neither are those of runs still going.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        m, legacy = _LEGACY_LEFTOVER.match(p.name), True
        if not m:
            m, legacy = _LEFTOVER.match(p.name), False
        if not m or not m["target"].startswith(target_prefix):
            continue
        if (not legacy and m["host"] != _HOST) or process_alive(int(m["pid"])):
            continue
        original = folder / m["target"]
        # earlier versions kept the old output one level down, in <aside>/previous
        old = p / "previous" if legacy and m["kind"] == "old" else p
        if m["kind"] == "old" and old.exists() and not original.exists() and (
                may_restore is None or may_restore(original)):
            os.replace(old, original)
            if old != p:
                _remove(p)
            if log:
                log(f"{original}: restored from {p.name}, left by an interrupted run (PID {m['pid']})")
            continue
        _remove(p)
        removed.append(p)
        if log:
            log(f"{p}: removed, left by an interrupted run (PID {m['pid']})")
    return removed


# --- checks before any work -----------------------------------------------------------------------

def check_writable_target(target: Path, what: str, want_dir: bool) -> None:
    """Before any computation: ``target`` must be creatable/replaceable by us.

    A folder output given as an existing file (or the reverse), or a location that is not
    writable, is a :class:`UserError` naming the path. An existing folder only needs to be writable
    itself: a mount point, or a folder inside a read-only one, is staged inside (:func:`staged_folder`).
    """
    target = Path(target)
    if target.exists():
        if want_dir and not target.is_dir():
            raise UserError(f"{target}: the {what} is a file, a folder is needed")
        if not want_dir and target.is_dir():
            raise UserError(f"{target}: the {what} is a folder, a file path is needed")
    if target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
        raise UserError(f"{target}: no write permission for the {what}")
    if want_dir and target.is_dir():
        return
    parent = target.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{parent}: is a file; cannot create the {what} {target} under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{parent}: no write permission; cannot write the {what} {target}")


def owner(folder: Path) -> str | None:
    """The command the folder's marker names (``compare``, ``evaluate``, ...), or None."""
    folder = Path(folder)
    try:
        command = json.loads((folder / MARKER).read_text()).get("command")
        return command if isinstance(command, str) and command else None
    except (OSError, ValueError, AttributeError):
        pass
    try:
        m = re.fullmatch(r"written by nnunet-pvs (\S+)\s*", (folder / LEGACY_MARKER).read_text(errors="replace"))
    except OSError:
        return None
    return m[1] if m else None


def write_marker(folder: Path, command: str) -> None:
    """Mark ``folder`` as the output of ``nnunet-pvs <command>``."""
    from nnunet_pvs import __version__

    (Path(folder) / MARKER).write_text(json.dumps({"command": command, "version": __version__}) + "\n")


def earlier_layout(name: str, first_line: str) -> Callable[[Path], bool]:
    """Recogniser of a command's output folder from before the marker: ``name`` in it starts with
    ``first_line`` (the title of a report, the header of a table only that command writes)."""
    def recognise(folder: Path) -> bool:
        try:
            with open(Path(folder) / name, encoding="utf-8") as f:
                return f.readline().startswith(first_line)
        except (OSError, UnicodeDecodeError):
            return False

    return recognise


def check_owner(folder: Path, command: str, legacy: Callable[[Path], bool] | None = None,
                option: str = "-o") -> None:
    """``folder`` may be replaced by ``nnunet-pvs <command>``: absent, empty, marked as this
    command's, or (no marker) a layout ``legacy(folder)`` recognises as this command's from an
    earlier version. Anything else is refused with one line naming who wrote it."""
    folder = Path(folder)
    if not folder.is_dir() or all(_is_leftover_name(p.name) for p in folder.iterdir()):
        return  # absent, or empty but for what an interrupted run left (cleaned when staging)
    by = owner(folder)
    if by == command or (by is None and legacy is not None and legacy(folder)):
        return
    if by is not None:
        raise UserError(f"{folder} was written by 'nnunet-pvs {by}'; choose another {option} (nothing was changed)")
    raise UserError(f"{folder} is not empty and was not written by 'nnunet-pvs {command}'; choose another "
                    f"{option} (nothing was changed)")


def check_output_folder(target: Path, command: str, legacy: Callable[[Path], bool] | None = None,
                        what: str = "output folder", option: str = "-o") -> None:
    """Everything :func:`staged_folder` will need, checked before any work: a folder we may write
    and that no other command (or the user) owns."""
    check_writable_target(target, what, want_dir=True)
    check_owner(target, command, legacy, option)


# --- staging a folder -----------------------------------------------------------------------------

def replace_folder(staged: Path, target: Path, others=()) -> None:
    """Move the complete folder ``staged`` to ``target``; an existing ``target`` (and ``others``,
    e.g. a dataset of the same id under another name) is renamed aside first and deleted only
    after the new one is in place; if that fails, everything renamed aside is put back."""
    staged, target = Path(staged), Path(target)
    moved: list[tuple[Path, Path]] = []
    try:
        for p in [target, *(Path(o) for o in others if Path(o) != target)]:
            if p.exists():
                aside = staging_name(p, "old")
                if aside.exists():
                    _remove(aside)
                os.replace(p, aside)
                moved.append((p, aside))
        os.replace(staged, target)
    except BaseException:
        for p, aside in reversed(moved):
            if not p.exists():
                os.replace(aside, p)
        raise
    for _, aside in moved:
        _remove(aside)


def _inner(target: Path, kind: str = "tmp") -> Path:
    """Hidden name inside ``target`` itself (for a mount point), same pattern as :func:`staging_name`."""
    return staging_name(Path(target) / Path(target).name, kind)


def swap_entries(staged: Path, target: Path) -> None:
    """Put the contents of ``staged`` into the folder ``target`` without renaming ``target`` (a mount
    point cannot be renamed): its own entries go aside into a hidden folder inside it, the new ones
    move in (the marker first, so a folder interrupted half-way still says whose it is), then the
    old ones are deleted; a failure puts the old entries back. ``staged`` is left empty."""
    staged, target = Path(staged), Path(target)
    aside = _inner(target, "old")
    if aside.exists():
        _remove(aside)
    aside.mkdir()
    moved_in: list[str] = []
    try:
        for e in sorted(target.iterdir()):
            if e != staged and e != aside and not _is_leftover_name(e.name):
                os.replace(e, aside / e.name)
        for name in sorted((p.name for p in staged.iterdir()), key=lambda n: n != MARKER):
            shutil.move(str(staged / name), str(target / name))  # a rename when on one file system
            moved_in.append(name)
    except BaseException:
        for name in moved_in:
            if (target / name).exists():
                _remove(target / name)
        for e in sorted(aside.iterdir()):
            os.replace(e, target / e.name)
        raise
    finally:
        if aside.exists():
            shutil.rmtree(aside, ignore_errors=True)


def _missing_parents(target: Path) -> list[Path]:
    """Folders above ``target`` that do not exist yet, innermost first."""
    out, p = [], Path(target).absolute().parent
    while not p.exists():
        out.append(p)
        p = p.parent
    return out


@contextlib.contextmanager
def staged_folder(target: Path, command: str, legacy: Callable[[Path], bool] | None = None,
                  what: str = "output folder", option: str = "-o", log=None):
    """Yield an empty hidden folder to write ``nnunet-pvs <command>``'s output into; when the block
    ends normally it becomes ``target`` (marker included) as a whole, on any exception (Ctrl-C and
    SIGTERM included) it is removed with every parent folder it created, and ``target`` is as before.

    ``target`` is checked again (:func:`check_output_folder`); call that before the work too.
    A mount point, or a folder whose parent is read-only, is staged inside (see :func:`swap_entries`);
    the same is done when renaming the target fails with "Device or resource busy" (a bind mount
    :func:`os.path.ismount` cannot see).
    """
    target = Path(target).absolute()
    check_output_folder(target, command, legacy, what, option)
    # a mount point cannot be renamed, nor can a folder in a read-only one (a container's /)
    inside = os.path.ismount(target) or (target.is_dir() and not os.access(target.parent, os.W_OK | os.X_OK))
    created = _missing_parents(target)
    if inside:
        clean_leftovers(target, target.name, log=log, may_restore=lambda _: False)
        with contextlib.suppress(OSError):  # what a failed rename of the mount point left beside it
            clean_leftovers(target.parent, target.name, log=log, may_restore=lambda _: False)
        stage = _inner(target)
    else:
        clean_leftovers(target.parent, target.name, log=log)
        stage = staging_name(target)
    with sigterm_raises():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if stage.exists():
                _remove(stage)
            stage.mkdir()
            yield stage
            write_marker(stage, command)
            if inside:
                swap_entries(stage, target)
            else:
                try:
                    replace_folder(stage, target)
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise
                    swap_entries(stage, target)
            if stage.exists():
                stage.rmdir()
        except BaseException:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
            for p in created:  # innermost first
                try:
                    p.rmdir()
                except OSError:
                    break
            raise


# --- single files ---------------------------------------------------------------------------------

def write_file_atomic(path: Path, write: Callable[[Path], None], mode: int | None = None) -> None:
    """``write(tmp)`` fills a hidden temporary file that then replaces ``path``, so ``path`` holds
    either its old content or all of the new, never a part. ``mode``: permission bits (default:
    the usual ones under the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_HOST}-{os.getpid()}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask  # mkstemp makes 0600
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """``path`` holds either its old content or all of ``text``, never a part."""
    write_file_atomic(path, lambda tmp: tmp.write_text(text), mode)


def write_texts_atomic(files: dict[Path, str]) -> None:
    """Text files that belong together (a splits file and its test lists): all are written in full
    beside their targets first, then renamed into place one after the other, so a failure while
    writing leaves every old file as it was."""
    staged = {Path(p): staging_name(Path(p)) for p in files}
    try:
        for p, text in files.items():
            staged[Path(p)].write_text(text)
        for p, tmp in staged.items():
            os.replace(tmp, p)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)


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
