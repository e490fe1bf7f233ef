"""The input check carried into the census: each subject's verdict (ok / warn / refuse) and reasons from
``nnunet-pvs check-inputs`` (nnunet_pvs.input_check), as ``qc_verdict`` / ``qc_reasons`` columns of
``subjects.csv`` and flags in ``report.html``.

Two sources: ``--qc OUT/inputs_qc.csv`` (a check already run), read when the cohort tables are
assembled; or ``--check-model MODEL``, the check run by each run (or part) over the subjects it is about
to census, in one call (the model's training reference is read once), each verdict kept with the
subject's result, so a resumed run does not check again. Why: a burden measured on a scan unlike the training data (other resolution,
contrast, a skull-stripped scan for a model trained without) is not to be trusted silently.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from nnunet_pvs.errors import UserError
from nnunet_pvs.resume import file_stamp

COLUMNS = ("qc_verdict", "qc_reasons")
MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")


def _reasons_text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (list, tuple)):
        return "; ".join(str(v) for v in value)
    return str(value)


def model_stamp(model: Path) -> list:
    """What identifies the model a check compares with (its three json files, by size and time), so a
    retrained or replaced model means every subject is checked again."""
    model = Path(model)
    if not model.is_dir():
        raise UserError(f"{model}: --check-model is not a folder; give an nnU-Net trained-model folder "
                        "(nnUNet_results/Dataset<ID>_<Name>/TRAINER__PLANS__CONFIG)")
    return [file_stamp(model / f) for f in MODEL_FILES]


def check_cases(images: Path, model: Path, cases: list[str]) -> dict[str, dict]:
    """case -> ``{"verdict", "reasons"}`` from nnunet_pvs.input_check.check_scans, for the subjects a run
    is about to census: one call, so the model and its training reference are read once, not per subject."""
    from nnunet_pvs.input_check import check_scans

    if not cases:
        return {}
    df = check_scans(Path(images), Path(model), cases=list(cases), progress=True)
    out = {str(c): {"verdict": str(v), "reasons": _reasons_text(r)}
           for c, v, r in zip(df["case"], df["verdict"], df["reasons"])}
    lacking = [c for c in cases if c not in out]
    if lacking:
        raise UserError(f"the input check against {model} returned no verdict for {', '.join(lacking[:5])}"
                        f"{' ...' if len(lacking) > 5 else ''} (scans in {images})")
    return out


def read_file(path: Path) -> dict[str, dict]:
    """case -> ``{"verdict", "reasons"}`` of an ``inputs_qc.csv`` written by ``nnunet-pvs check-inputs``."""
    from nnunet_pvs.input_check import read_qc

    df = read_qc(Path(path))
    return {str(c): {"verdict": str(v), "reasons": _reasons_text(r)}
            for c, v, r in zip(df["case"], df["verdict"], df["reasons"])}


def add_columns(subjects: pd.DataFrame, verdicts: dict[str, dict], missing_reason: str) -> pd.DataFrame:
    """``subjects`` with ``qc_verdict`` and ``qc_reasons`` on every row of each case; a case the check
    does not cover gets an empty verdict and ``missing_reason``."""
    out = subjects.copy()
    known = out["case"].astype(str).map(lambda c: verdicts.get(c))
    out["qc_verdict"] = [v["verdict"] if v else "" for v in known]
    out["qc_reasons"] = [v["reasons"] if v else missing_reason for v in known]
    return out


def counts(verdicts: dict[str, dict], cases) -> dict[str, int]:
    """How many of ``cases`` got each verdict (and ``unchecked``)."""
    out: dict[str, int] = {}
    for c in cases:
        v = verdicts.get(c, {}).get("verdict") or "unchecked"
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: ["ok", "warn", "refuse", "unchecked"].index(kv[0])
                       if kv[0] in ("ok", "warn", "refuse", "unchecked") else 9))
