"""Per-case metrics of every model on identical cases, through the evaluation module.

Each case's reference (and region maps) is read once and every model's prediction of that case is
evaluated against it with :func:`nnunet_pvs.evaluation.case.evaluate_case`.

``add_evaluation_arguments`` / ``evaluation_options`` give ``compare`` the metric options of
``evaluate`` (matching rule, protocols, surface Dice tolerance and neighbourhood, region mode);
``NEW_METRIC_COLUMNS`` names the per-case columns they add.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from nnunet_pvs.case_loop import map_cases
from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation import io
from nnunet_pvs.evaluation.case import Options, evaluate_case
from nnunet_pvs.evaluation.cli_evaluate import add_metric_arguments, metric_options, new_metric_columns
from nnunet_pvs.evaluation.lesion_metrics import GROUP_COLUMN_METRICS, size_group_columns
from nnunet_pvs.evaluation.regions import load_regions

# per-case columns beyond the papers' metrics: IoU, Hausdorff, surface Dice, panoptic quality,
# per-lesion Dice, and every protocol's columns (present only when that protocol is chosen); with
# --size-groups also detection_rate_<g>, lesion_dice_<g>, false_positives_<g> per group
# (metric_columns(opts) lists them for given options)
NEW_METRIC_COLUMNS = new_metric_columns()


def metric_columns(opts: Options) -> list[str]:
    """Every per-case metric column ``evaluate_models`` writes for these options."""
    return opts.metrics + size_group_columns(opts.size_groups)


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """Add evaluate's metric options (--match, --connectivity, --protocol, --nsd-tolerance,
    --surface-connectivity, --region-mode, --size-groups) that ``parser`` does not have yet."""
    add_metric_arguments(parser)


def evaluation_options(args) -> Options:
    """Per-case evaluation options for compare: binary predictions at 0.5, no sweep, no size filter."""
    return metric_options(args, threshold=0.5, thresholds=(), min_cluster_sizes=(0,))


def _one_case(job) -> list[dict]:
    case, ref_path, preds, region_dir, opts, tol, case_ids = job
    ref = io.read_mask(ref_path, case, "reference")
    regions = {}
    if region_dir is not None:
        for name, mask, vol, path in load_regions(region_dir, case, case_ids):
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
        groups = {}
        if opts.size_groups is not None:
            slug = dict(zip(opts.size_groups.labels(), opts.size_groups.slugs()))
            for g in out["size_groups"]:
                groups.setdefault(g["region"], {}).update(
                    {f"{m}_{slug[g['size_group']]}": g[m] for m in GROUP_COLUMN_METRICS})
        for r in out["per_case"]:
            rows.append({"model": model, "case": r["case"], "region": r["region"],
                         **{k: r[k] for k in opts.metrics}, **groups.get(r["region"], {}),
                         "prediction": str(pred_path)})
    return rows


def evaluate_models(cases: list[str], refs: dict[str, Path], preds: dict[str, dict[str, io.PredFiles]],
                    opts: Options, region_dir: Path | None = None, tol: float = 1e-3,
                    num_processes: int = 1) -> pd.DataFrame:
    """Long table (model, case, region, metrics...) for every model on every case.

    ``preds``: model label -> case -> prediction files; every model must hold every case.
    """
    models = list(preds)
    ids = set(refs)
    jobs = [(c, refs[c], {m: preds[m][c] for m in models}, region_dir, opts, tol, ids) for c in cases]
    rows = [row for r in map_cases(_one_case, jobs, processes=num_processes, desc="compare: evaluate",
                                   unit="prediction", weight=len(models)) for row in r]
    df = pd.DataFrame(rows)
    df["model"] = pd.Categorical(df["model"], categories=models, ordered=True)
    return df.sort_values(["region", "case", "model"], kind="stable").reset_index(drop=True).assign(
        model=lambda d: d["model"].astype(str))
