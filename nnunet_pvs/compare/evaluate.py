"""Per-case metrics of every model on identical cases, through the evaluation module.

Each case's reference (and region maps) is read once and every model's prediction of that case is
evaluated against it with :func:`nnunet_pvs.evaluation.case.evaluate_case`.
"""

from __future__ import annotations

import sys
from multiprocessing import get_context
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation import io
from nnunet_pvs.evaluation.case import CASE_METRICS, Options, evaluate_case
from nnunet_pvs.evaluation.regions import load_regions


def _one_case(job) -> list[dict]:
    case, ref_path, preds, region_dir, opts, tol = job
    ref = io.read_mask(ref_path, case, "reference")
    regions = {}
    if region_dir is not None:
        for name, mask, vol, path in load_regions(region_dir, case):
            io.check_geometry(case, ref, ref_path, vol, path, tol)
            regions[name] = mask
    rows = []
    for model, files in preds.items():
        try:
            pred, pred_path = io.load_prediction(files, case, prefer_probabilities=False)
            io.check_geometry(case, ref, ref_path, pred, pred_path, tol)
        except UserError as e:  # name the model: io's messages name the case and file only
            raise UserError(f"model {model}: {e}") from None
        out = evaluate_case(case, ref.data, pred.data, ref.spacing, opts, regions)
        for r in out["per_case"]:
            rows.append({"model": model, "case": r["case"], "region": r["region"],
                         **{k: r[k] for k in CASE_METRICS}, "prediction": str(pred_path)})
    return rows


def evaluate_models(cases: list[str], refs: dict[str, Path], preds: dict[str, dict[str, io.PredFiles]],
                    opts: Options, region_dir: Path | None = None, tol: float = 1e-3,
                    num_processes: int = 1) -> pd.DataFrame:
    """Long table (model, case, region, metrics...) for every model on every case.

    ``preds``: model label -> case -> prediction files; every model must hold every case.
    """
    models = list(preds)
    jobs = [(c, refs[c], {m: preds[m][c] for m in models}, region_dir, opts, tol) for c in cases]
    rows: list[dict] = []
    bar = tqdm(total=len(jobs) * len(models), desc="compare: evaluate", unit="prediction", file=sys.stderr)
    if num_processes > 1 and len(jobs) > 1:
        with get_context("fork").Pool(min(num_processes, len(jobs))) as pool:
            for r in pool.imap(_one_case, jobs):
                rows += r
                bar.update(len(models))
    else:
        for job in jobs:
            bar.set_postfix_str(job[0])
            rows += _one_case(job)
            bar.update(len(models))
    bar.close()
    df = pd.DataFrame(rows)
    df["model"] = pd.Categorical(df["model"], categories=models, ordered=True)
    return df.sort_values(["region", "case", "model"], kind="stable").reset_index(drop=True).assign(
        model=lambda d: d["model"].astype(str))
