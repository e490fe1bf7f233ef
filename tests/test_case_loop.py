"""The one case loop (nnunet_pvs.case_loop): order, workers, and failures kept per case or raised."""

from __future__ import annotations

import pytest

from nnunet_pvs.case_loop import CaseFailure, iter_cases, map_cases, reason_of
from nnunet_pvs.errors import UserError


def _square_or_fail(job):
    case, x = job
    if x == 3:
        raise UserError(f"{case}.nii.gz: not a binary mask (values 0, 1, 2)")
    if x == 5:
        raise OSError(f"[Errno 5] Input/output error: '{case}.nii.gz'")
    if x == 7:
        return {}["missing"]
    return x * x


JOBS = [(f"case{i:02d}", i) for i in range(9)]


@pytest.mark.parametrize("processes", [1, 2])
def test_results_in_job_order(processes):
    ok = [j for j in JOBS if j[1] not in (3, 5, 7)]
    assert map_cases(_square_or_fail, ok, processes=processes) == [x * x for _, x in ok]


@pytest.mark.parametrize("processes", [1, 2])
def test_keep_going_records_each_failure_and_finishes_the_rest(processes):
    out = dict(iter_cases(_square_or_fail, JOBS, processes=processes, keep_going=True))
    failures = {job[0]: r for job, r in out.items() if isinstance(r, CaseFailure)}
    assert sorted(failures) == ["case03", "case05", "case07"]
    assert failures["case03"].reason == "case03.nii.gz: not a binary mask (values 0, 1, 2)"
    assert failures["case05"].reason.startswith("OSError: [Errno 5]")
    assert failures["case07"].reason.startswith("KeyError: 'missing'")
    assert all(f.case == c for c, f in failures.items())
    assert {job[0]: r for job, r in out.items() if job[0] not in failures} == {
        f"case{i:02d}": i * i for i in (0, 1, 2, 4, 6, 8)}


@pytest.mark.parametrize("processes", [1, 2])
def test_without_keep_going_the_first_failure_ends_the_loop(processes):
    with pytest.raises(UserError, match="case03.nii.gz: not a binary mask"):
        map_cases(_square_or_fail, JOBS, processes=processes)


def test_unexpected_errors_name_the_line():
    try:
        1 / 0
    except ZeroDivisionError as e:
        reason = reason_of(e)
    assert reason.startswith("ZeroDivisionError: division by zero (at test_case_loop.py:")
