"""``compare(...)``: the whole comparison, callable from Python with the CLI's options."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from nnunet_pvs.errors import UserError
from nnunet_pvs.compare import gather as g
from nnunet_pvs.compare.evaluate import evaluate_models
from nnunet_pvs.compare.report import STATS_METRICS, ReportData, write_report
from nnunet_pvs.compare.stats import paired_tests
from nnunet_pvs.compare.training_cost import model_cost
from nnunet_pvs.evaluation import io
from nnunet_pvs.evaluation.case import Options
from nnunet_pvs.evaluation.clusters import MatchRule

DEFAULT_FOLDS = (0, 1, 2, 3, 4)


@dataclass
class CompareOptions:
    """Every option of ``nnunet-pvs compare``; field names are the Python keyword arguments."""

    dataset: str
    models: list[str]
    output: Path
    baseline: str | None = None
    folds: tuple[int, ...] = DEFAULT_FOLDS
    test_set: str | None = None
    labels: str | None = None
    regions: Path | None = None
    predictions_dir: Path | None = None
    device: str = "cuda"
    connectivity: int = 26
    match: str = "overlap"
    n_boot: int = 10000
    seed: int = 0
    holm_family: str = "metric"
    alpha: float = 0.05
    num_processes: int = 1
    plots: bool = True
    geometry_tol: float = 1e-3
    # SLURM scale-out (only with emit_slurm)
    emit_slurm: Path | None = None
    slurm_gpus: int = 1
    slurm_partition: str | None = None
    slurm_account: str | None = None
    slurm_time: str = "72:00:00"
    slurm_cpus: int = 8
    slurm_mem: str | None = None
    slurm_pred_parts: int = 1
    slurm_setup: list[str] = field(default_factory=list)
    pretrained_weights: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.output = Path(self.output)
        self.models = list(self.models)
        self.folds = tuple(int(f) for f in self.folds)
        self.regions = Path(self.regions) if self.regions is not None else None
        self.predictions_dir = Path(self.predictions_dir) if self.predictions_dir is not None else None
        self.emit_slurm = Path(self.emit_slurm) if self.emit_slurm is not None else None
        self.slurm_setup = list(self.slurm_setup or [])
        self.pretrained_weights = list(self.pretrained_weights or [])

    def compare_argv(self) -> list[str]:
        """The ``nnunet-pvs compare`` command line of these options (without the SLURM ones)."""
        a = ["nnunet-pvs", "compare", "-d", str(self.dataset), "--models", *self.models]
        if self.baseline:
            a += ["--baseline", self.baseline]
        if tuple(self.folds) != DEFAULT_FOLDS:
            a += ["--folds", *map(str, self.folds)]
        for opt, val in (("--test-set", self.test_set), ("--labels", self.labels), ("--regions", self.regions),
                         ("--predictions-dir", self.predictions_dir)):
            if val is not None:
                a += [opt, str(val)]
        defaults = {f.name: f.default for f in fields(self)}
        for name in ("device", "connectivity", "match", "n_boot", "seed", "holm_family", "alpha",
                     "num_processes", "geometry_tol"):
            if getattr(self, name) != defaults[name]:
                a += ["--" + name.replace("_", "-"), str(getattr(self, name))]
        if not self.plots:
            a.append("--no-plots")
        a += ["-o", str(self.output)]
        return a


def compare(dataset, models, output, **kwargs) -> Path:
    """Compare nnU-Net models on identical cases; returns the path of ``report.md``
    (of the SLURM script when ``emit_slurm`` is given). Keyword arguments: the fields of
    :class:`CompareOptions` (the CLI's options with ``-`` as ``_``). Bad input raises ``UserError``."""
    return run_compare(CompareOptions(dataset=dataset, models=models, output=output, **kwargs))


def parse_models(opts: CompareOptions) -> tuple[list[g.ModelSpec], g.ModelSpec]:
    if not opts.models:
        raise UserError("no model given (--models Trainer:config ...)")
    specs = [g.ModelSpec.parse(m) for m in opts.models]
    dup = sorted({s.label for s in specs if specs.count(s) > 1})
    if dup:
        raise UserError(f"model(s) given twice: {', '.join(dup)}")
    if opts.baseline:
        base = g.ModelSpec.parse(opts.baseline)
        if base not in specs:
            specs.insert(0, base)
    else:
        stock = [s for s in specs if s.trainer == "nnUNetTrainer"]
        base = stock[0] if stock else specs[0]
    if len(specs) < 2:
        raise UserError(f"need at least two models to compare (got {specs[0].label})")
    if not opts.folds:
        raise UserError("no fold given (--folds)")
    return specs, base


def _predict_test_set(spec: g.ModelSpec, dataset: str, images: Path, out_dir: Path, folds, device: str,
                      expected: list[str]) -> dict[str, io.PredFiles]:
    """Test-set predictions of one model with stock ``nnUNetv2_predict``; reused when complete."""
    def present():
        return io.list_niftis(out_dir) if out_dir.is_dir() else {}

    if set(expected) - set(present()):
        exe = shutil.which("nnUNetv2_predict") or str(Path(sys.executable).parent / "nnUNetv2_predict")
        cmd = [exe, "-i", str(images), "-o", str(out_dir), "-d", dataset, "-c", spec.config, "-tr", spec.trainer,
               "-p", spec.plans, "-f", *map(str, folds), "-device", device, "--continue_prediction"]
        from nnunet_pvs.plugin_env import ENV_VAR, ext_trainer_value

        env = {**os.environ, ENV_VAR: ext_trainer_value()}
        print(f"compare: predicting the test set with {spec.label}: {shlex.join(cmd)}", file=sys.stderr)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"model {spec.label}: nnUNetv2_predict failed (exit {proc.returncode}):\n"
                            f"{(proc.stderr or proc.stdout)[-3000:]}")
    found = present()
    missing = sorted(set(expected) - set(found))
    if missing:
        raise UserError(f"model {spec.label}: no prediction for {len(missing)} test case(s) in {out_dir}: "
                        f"{', '.join(missing[:20])}")
    return {c: io.PredFiles(seg=found[c]) for c in expected}


def run_compare(opts: CompareOptions) -> Path:
    specs, base = parse_models(opts)
    if opts.holm_family not in ("metric", "all"):
        raise UserError(f"--holm-family must be 'metric' or 'all', got {opts.holm_family!r}")
    try:
        MatchRule.parse(opts.match)
    except ValueError as e:
        raise UserError(str(e)) from None
    if opts.emit_slurm is not None:
        from nnunet_pvs.compare.slurm import write_slurm_script

        return write_slurm_script(opts, specs, base)
    name = g.resolve_dataset(opts.dataset)
    results_dir = g.env_dir("nnUNet_results") / name
    if not results_dir.is_dir():
        raise UserError(f"{name}: no results folder {results_dir} (nothing trained yet?)")
    test_mode = opts.test_set is not None
    if opts.labels is not None and not test_mode:
        raise UserError("--labels is for --test-set; cross-validation uses labelsTr")
    folds = list(opts.folds)
    results = {s: g.gather_model(results_dir, s, folds, need_validation=not test_mode) for s in specs}
    excluded = {s.label: r.describe_incomplete() for s, r in results.items() if not r.complete}
    if base.label in excluded:
        listing = "\n".join(f"  {lab}: {why}" for lab, why in excluded.items())
        raise UserError(f"baseline {base.label} is incomplete; cannot compare against it:\n{listing}")
    usable = [s for s in specs if s.label not in excluded]
    if len(usable) < 2:
        listing = "\n".join(f"  {lab}: {why}" for lab, why in excluded.items())
        raise UserError(f"no complete model besides the baseline {base.label}:\n{listing}")
    for lab, why in excluded.items():
        print(f"compare: excluding {lab}: {why}", file=sys.stderr)

    notes = []
    if test_mode:
        images = g.dataset_relative(opts.test_set, name)
        if not images.is_dir():
            raise UserError(f"--test-set {opts.test_set}: folder not found (absolute, or relative to "
                            f"nnUNet_raw/{name})")
        ref_dir = g.dataset_relative(opts.labels or "labelsTs", name)
        if not ref_dir.is_dir():
            raise UserError(f"--labels {opts.labels or 'labelsTs'}: folder not found (absolute, or relative to "
                            f"nnUNet_raw/{name})")
        expected = g.image_case_ids(images)
        if not expected:
            raise UserError(f"{images}: no NIfTI images")
        pred_root = opts.predictions_dir or opts.output.parent / f"{opts.output.name}_predictions"
        preds = {}
        for s in tqdm(usable, desc="compare: predict", unit="model", file=sys.stderr):
            preds[s.label] = _predict_test_set(s, name, images, pred_root / s.folder_name, folds,
                                               opts.device, expected)
        mode = f"test set `{images}` (ensemble of folds {', '.join(map(str, folds))})"
    else:
        ref_dir = g.cv_reference_folder(name)
        preds = {s.label: g.validation_predictions(results[s]) for s in
                 tqdm(usable, desc="compare: gather", unit="model", file=sys.stderr)}
        mode = f"{len(folds)}-fold cross-validation (folds {', '.join(map(str, folds))}, nnU-Net validation predictions)"

    sets = {lab: set(p) for lab, p in preds.items()}
    if len({frozenset(s) for s in sets.values()}) > 1:
        raise UserError("models were evaluated on different case sets; refusing to compare them:\n"
                        + g.case_set_difference(sets))
    cases = sorted(next(iter(sets.values())))
    refs = io.list_niftis(ref_dir)
    no_ref = sorted(set(cases) - set(refs))
    if no_ref:
        raise UserError(f"{len(no_ref)} predicted case(s) have no reference label in {ref_dir}: "
                        f"{', '.join(no_ref[:20])}")
    unpredicted = sorted(set(refs) - set(cases))
    if unpredicted:
        notes.append(f"{len(unpredicted)} reference case(s) in `{ref_dir}` were predicted by no model and are "
                     f"not evaluated: {', '.join(unpredicted[:20])}{' ...' if len(unpredicted) > 20 else ''}")
    if opts.regions is not None and not opts.regions.is_dir():
        raise UserError(f"--regions {opts.regions}: folder not found")

    ev_opts = Options(threshold=0.5, thresholds=(), min_cluster_sizes=(0,), connectivity=opts.connectivity,
                      rule=MatchRule.parse(opts.match))
    labels = [s.label for s in usable]
    per_case = evaluate_models(cases, refs, preds, ev_opts, opts.regions, opts.geometry_tol, opts.num_processes)
    stats = paired_tests(per_case, base.label, labels, STATS_METRICS, n_boot=opts.n_boot, seed=opts.seed,
                         family=opts.holm_family, alpha=opts.alpha)
    cost = pd.DataFrame([model_cost(s.label, results[s].folder, folds,
                                    "compared" if s.label not in excluded else "excluded")
                         for s in specs])
    fold_rows = pd.DataFrame([{"model": s.label, "fold": f.fold, "status": f.status, "reason": f.reason}
                              for s in specs for f in results[s].folds])
    data = ReportData(
        title=f"nnU-Net model comparison on {name}", command=shlex.join(opts.compare_argv()), mode=mode,
        dataset=name, reference=ref_dir, baseline=base.label, models=labels, excluded=excluded,
        folds=fold_rows, per_case=per_case, stats=stats, cost=cost, notes=notes,
        settings={"match": str(ev_opts.rule), "connectivity": opts.connectivity, "holm_family": opts.holm_family,
                  "alpha": opts.alpha, "n_boot": opts.n_boot, "seed": opts.seed})
    report = write_report(opts.output, data, plots=opts.plots)
    print(f"compared {len(labels)} model(s) on {len(cases)} case(s); report: {report}")
    return report
