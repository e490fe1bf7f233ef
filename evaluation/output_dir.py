"""Output folders replaced as a whole: checked before any work, written in a hidden staging folder
beside the target, then swapped in with renames, so a failed or interrupted run leaves neither
partial files nor a mix of old and new results.

Only a folder this package wrote (it holds the marker file) or an empty one is ever replaced, so
``-o ~`` cannot delete a home folder. Staging folders of runs that were killed are removed by the
next run for the same target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from nnunet_pvs.dataset_conversion.staging import process_alive
from nnunet_pvs.errors import UserError

MARKER = ".nnunet-pvs-output"
_STAGING = ".{name}.staging-"
_OLD = ".{name}.old-"


def _writable_ancestor(path: Path) -> Path:
    p = path.absolute().parent
    while not p.exists():
        p = p.parent
    return p


def check_output_dir(path: Path, command: str, legacy_files: tuple[str, ...] = ()) -> None:
    """Fail early (before any computation) if ``path`` cannot become ``command``'s output folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: output path exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        ours = (path / MARKER).is_file() or any((path / f).is_file() for f in legacy_files)
        if not ours:
            raise UserError(f"{path}: output folder exists, is not empty and was not written by "
                            f"`nnunet-pvs {command}`; give a new or empty folder")
    anc = _writable_ancestor(path)
    if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot write the output folder ({anc} is not writable)")


def _remove_stale(path: Path) -> None:
    parent = path.absolute().parent
    if not parent.is_dir():
        return
    for prefix in (_STAGING.format(name=path.name), _OLD.format(name=path.name)):
        for p in parent.glob(prefix + "*"):
            pid = p.name[len(prefix):].split("-")[0]
            if pid.isdigit() and process_alive(int(pid)):
                continue  # another run (or this one) is still writing there
            shutil.rmtree(p, ignore_errors=True)



@contextmanager
def staged_output(path: Path, command: str):
    """Yield a staging folder; on success it replaces ``path`` as a whole, on failure it is removed."""
    path = Path(path)
    _remove_stale(path)
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=_STAGING.format(name=path.name) + f"{os.getpid()}-",
                                  dir=path.absolute().parent))
    try:
        yield stage
        (stage / MARKER).write_text(f"written by nnunet-pvs {command}\n")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_OLD.format(name=path.name) + f"{os.getpid()}-",
                                        dir=path.absolute().parent))
            os.rename(path, old / "previous")
            try:
                os.rename(stage, path)
            except OSError:
                os.rename(old / "previous", path)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
