"""One loop over cases for every command: progress bar, ``-np`` worker processes, and, for cohort-scale
runs, a failed case recorded instead of ending the run.

``evaluate``, ``evaluate-cohort``, ``compare``, ``census`` and ``change`` all do the same thing: apply a
per-case function to a list of jobs, in order, in one process or in forked workers, with a tqdm bar on
stderr that is closed before an error is printed. Here it is written once.

With ``keep_going=True`` a case whose function raises comes back as a :class:`CaseFailure` (its id and a
one-line reason) and the other cases go on, which is what a census of thousands of scans needs: one
corrupt file must not cost the night's run. Without it, the first failure ends the loop as before
(a :class:`~nnunet_pvs.errors.UserError` keeps its one-line message).
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Callable, Iterable, Iterator, Sequence

from nnunet_pvs.errors import UserError


@dataclass(frozen=True)
class CaseFailure:
    """A case that could not be processed: its id and the reason in one line."""

    case: str
    reason: str


def reason_of(exc: BaseException) -> str:
    """One line for a failed case: a UserError's own message; otherwise the exception type and message
    (unexpected errors also name the line they came from, for a bug report)."""
    if isinstance(exc, UserError):
        return str(exc)
    msg = " ".join(str(exc).split()) or "no message"
    if isinstance(exc, (OSError, ValueError, EOFError, KeyError, MemoryError)):
        return f"{type(exc).__name__}: {msg}"
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {msg}{where}"


class _Guarded:
    """``fn`` wrapped so that an exception becomes a CaseFailure (picklable for the worker pool)."""

    def __init__(self, fn: Callable[[Any], Any], case_of: Callable[[Any], str]):
        self.fn, self.case_of = fn, case_of

    def __call__(self, job):
        try:
            return self.fn(job)
        except Exception as e:  # noqa: BLE001 - every failure of one case is that case's, recorded by the caller
            return CaseFailure(self.case_of(job), reason_of(e))


def _first(job) -> str:
    return str(job[0]) if isinstance(job, (tuple, list)) else str(job)


def iter_cases(fn: Callable[[Any], Any], jobs: Sequence, *, processes: int = 1, desc: str = "",
               unit: str = "case", weight: int = 1, keep_going: bool = False,
               case_of: Callable[[Any], str] = _first) -> Iterator[tuple[Any, Any]]:
    """Yield ``(job, fn(job))`` in job order, with a progress bar (``weight`` steps per job).

    ``processes > 1`` forks a pool (the jobs and results must be picklable). ``keep_going``: a job
    that raises yields ``(job, CaseFailure)`` instead of ending the loop. ``case_of(job)`` names the
    case on the bar and in failures (default: the job's first element).
    """
    from tqdm import tqdm

    jobs = list(jobs)
    call = _Guarded(fn, case_of) if keep_going else fn
    # the bar is closed (context manager) before an error propagates, so the error line starts on its own line
    with tqdm(total=len(jobs) * weight, desc=desc, unit=unit, file=sys.stderr) as bar:
        if processes > 1 and len(jobs) > 1:
            with get_context("fork").Pool(min(processes, len(jobs))) as pool:
                for job, result in zip(jobs, pool.imap(call, jobs)):
                    bar.update(weight)
                    yield job, result
        else:
            for job in jobs:
                bar.set_postfix_str(case_of(job), refresh=False)
                result = call(job)
                bar.update(weight)
                yield job, result


def map_cases(fn: Callable[[Any], Any], jobs: Iterable, **kwargs) -> list:
    """The results of :func:`iter_cases` as a list, in job order."""
    return [r for _, r in iter_cases(fn, list(jobs), **kwargs)]
