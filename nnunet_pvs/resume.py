"""Per-subject results that survive an interrupted or partial run: resume, shards and merge for
cohort-scale commands (``census``; reusable by ``change`` and any other per-subject command).

A cohort run of thousands of subjects must not lose the night's work to one corrupt file, a time
limit or Ctrl-C, and N cluster jobs must be able to fill one output folder side by side
(nnU-Net's ``nnUNetv2_predict -num_parts N -part_id K`` splits its cases the same way). So the
output folder is filled subject by subject::

    OUT/
      .nnunet-pvs.json     ownership marker (nnunet_pvs.staging): only the command that wrote it refills it
      cohort.json          the cohort (sorted case ids), the options and their digest, written by every run
      cases/CASE/          one folder per subject, written whole or not at all
          record.json      {"case", "status": "done" | "failed", "options_digest", "inputs_digest", ...}
          ...              the subject's own result files (done only)

**API.**

* ``store = CaseStore(OUT / "cases", options_digest)``; ``store.clean_leftovers()`` once at start.
* ``inputs_digest(paths)``: digest of the subject's input files by path, size and modification time
  (what ``make`` and ``rsync`` compare; no file is read, so checking 40,000 subjects costs only stats).
* ``digest(obj)``: digest of any JSON-able value (the options that change a subject's result, the
  program version).
* ``store.is_done(case, inputs_digest)``: a ``done`` record with both digests equal: skip it.
  A ``failed`` record is retried (the failure may have been transient: a network file system, memory).
* ``with store.writing(case, inputs_digest) as (folder, record):`` fill ``folder`` (a hidden staging
  folder beside ``cases/CASE``) and the dict ``record`` (extra fields for record.json); when the block
  ends normally the folder replaces ``cases/CASE`` in one rename (an older result is renamed aside
  first and deleted after); on any exception it is deleted, so nothing half-written is ever seen.
* ``store.write_failure(case, inputs_digest, reason)``: the subject's folder becomes a record of the
  failure only (any earlier result of other inputs is gone: it no longer describes them).
* ``store.status(cases)``: ``(done, failed, missing)``, records of another options digest counting
  as missing: what ``--merge`` needs to refuse, naming them, an incomplete cohort.
* ``shard(cases, num_parts, part_id)``: ``sorted(cases)[part_id::num_parts]``, as nnU-Net splits.
* ``write_json_atomic`` / ``read_json``: the manifest (``cohort.json``).

Concurrent writers are safe as long as each subject has one writer: all writes are per-subject
renames within ``cases/`` (and identical ``cohort.json`` contents from the parts of one run); the
cohort tables are assembled by one process only, after every part has finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nnunet_pvs.errors import UserError
from nnunet_pvs.staging import (
    clean_leftovers,
    replace_folder,
    staging_name,
    write_text_atomic,
)

RECORD = "record.json"
DONE, FAILED = "done", "failed"


def digest(obj) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (sorted keys; tuples as lists; paths as strings)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_stamp(path: Path) -> list:
    """``[absolute path, size, mtime_ns]`` of a file, or ``[path, None, None]`` when it is missing."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return [str(path.absolute()), None, None]
    return [str(path.absolute()), st.st_size, st.st_mtime_ns]


def inputs_digest(paths: Iterable[Path]) -> str:
    """Digest of a subject's input files: a file replaced, rewritten or added changes it."""
    return digest(sorted(file_stamp(p) for p in paths if p is not None))


def check_parts(num_parts: int, part_id: int) -> None:
    """``--num-parts N --part-id K`` as nnU-Net's: N >= 1 and 0 <= K < N."""
    if num_parts < 1:
        raise UserError(f"--num-parts must be at least 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise UserError(f"--part-id must be in 0..{num_parts - 1} (--num-parts {num_parts}), got {part_id}")


def shard(cases: Iterable[str], num_parts: int, part_id: int) -> list[str]:
    """Every ``num_parts``-th case id of the sorted ids, starting at ``part_id`` (nnUNetv2_predict's split)."""
    return sorted(cases)[part_id::num_parts]


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(Path(path), json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: Path):
    """The JSON in ``path``; None when it is missing or not readable JSON (a record being replaced is
    never half there: records are renamed into place)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class CaseStore:
    """The per-subject folders under ``root`` (``OUT/cases``) of a run whose options have ``options_digest``."""

    root: Path
    options_digest: str

    def folder(self, case: str) -> Path:
        return Path(self.root) / case

    def record(self, case: str) -> dict | None:
        rec = read_json(self.folder(case) / RECORD)
        return rec if isinstance(rec, dict) else None

    def is_done(self, case: str, inputs: str) -> bool:
        rec = self.record(case)
        return bool(rec) and rec.get("status") == DONE and rec.get("options_digest") == self.options_digest \
            and rec.get("inputs_digest") == inputs

    def clean_leftovers(self, log=None) -> list[Path]:
        """Hidden staging folders of writers that died (SIGKILL, a node lost); those of live ones stay."""
        Path(self.root).mkdir(parents=True, exist_ok=True)
        return clean_leftovers(Path(self.root), log=log, may_restore=lambda original: True)

    def _commit(self, stage: Path, case: str, record: dict) -> None:
        write_json_atomic(stage / RECORD, record)
        replace_folder(stage, self.folder(case))

    @contextlib.contextmanager
    def writing(self, case: str, inputs: str) -> Iterator[tuple[Path, dict]]:
        stage = staging_name(self.folder(case))
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        record: dict = {}
        try:
            yield stage, record
            self._commit(stage, case, {**record, "case": case, "status": DONE,
                                       "options_digest": self.options_digest, "inputs_digest": inputs})
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

    def write_failure(self, case: str, inputs: str, reason: str) -> None:
        stage = staging_name(self.folder(case))
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        try:
            self._commit(stage, case, {"case": case, "status": FAILED, "reason": reason,
                                       "options_digest": self.options_digest, "inputs_digest": inputs})
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

    def status(self, cases: Iterable[str]) -> tuple[list[str], dict[str, str], list[str]]:
        """``(done, {failed case: reason}, missing)`` for the run's options; a record of other
        options (an earlier run) is missing."""
        done, failed, missing = [], {}, []
        for c in cases:
            rec = self.record(c)
            if not rec or rec.get("options_digest") != self.options_digest:
                missing.append(c)
            elif rec.get("status") == DONE:
                done.append(c)
            else:
                failed[c] = str(rec.get("reason", "no reason recorded"))
        return done, failed, missing

    def others(self, cases: Iterable[str]) -> list[str]:
        """Subject folders under ``root`` that are not among ``cases`` (kept from another cohort)."""
        keep = set(cases)
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        return sorted(n for n in names if not n.startswith(".") and n not in keep)
