"""``compare(...)``: the whole comparison, callable from Python with the CLI's options."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from nnunet_pvs.errors import UserError
from nnunet_pvs.compare import classical, repredict
from nnunet_pvs.compare import gather as g
from nnunet_pvs.compare.evaluate import evaluate_models, metric_columns
from nnunet_pvs.compare.report import STATS_METRICS, ReportData, check_output_path, write_report
from nnunet_pvs.compare.stats import paired_tests
from nnunet_pvs.compare.training_cost import model_cost
from nnunet_pvs.compare.training_progress import model_progress
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
    protocol: str = "nnunet"               # nnunet: 5-fold validation; cai: test groups of splits --protocol cai
    frangi_ridges: str = "auto"            # auto (from dataset.json) | bright | dark
    frangi_mask: bool = True               # restrict the classical filters to a brain mask from the image
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
    # metric options of the evaluation module (None: Boutinaud defaults from connectivity and match)
    evaluation: Options | None = None
    extra_metrics: list[str] = field(default_factory=list)

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
        if self.protocol != defaults["protocol"]:
            a += ["--cv-protocol", self.protocol]
        for name in ("device", "connectivity", "match", "n_boot", "seed", "holm_family", "alpha",
                     "num_processes", "geometry_tol", "frangi_ridges"):
            if getattr(self, name) != defaults[name]:
                a += ["--" + name.replace("_", "-"), str(getattr(self, name))]
        ev = self.evaluation
        if ev is not None:
            if ev.protocols:
                a += ["--eval-protocol", ",".join(ev.protocols)]
            if ev.nsd_tolerance != 1.0:
                a += ["--nsd-tolerance", f"{ev.nsd_tolerance:g}"]
            if ev.surface_connectivity != 6:
                a += ["--surface-connectivity", str(ev.surface_connectivity)]
            if ev.region_mode != "majority":
                a += ["--region-mode", ev.region_mode]
            if ev.size_groups is not None:
                a += ["--size-groups", str(ev.size_groups)]
        if self.extra_metrics:
            a += ["--metrics", ",".join(self.extra_metrics)]
        if not self.plots:
            a.append("--no-plots")
        if not self.frangi_mask:
            a.append("--frangi-no-mask")
        a += ["-o", str(self.output)]
        return a


def compare(dataset, models, output, **kwargs) -> Path:
    """Compare nnU-Net models on identical cases; returns the path of ``report.md``
    (of the SLURM script when ``emit_slurm`` is given). Keyword arguments: the fields of
    :class:`CompareOptions` (the CLI's options with ``-`` as ``_``). Bad input raises ``UserError``."""
    return run_compare(CompareOptions(dataset=dataset, models=models, output=output, **kwargs))


def validate_options(opts: CompareOptions) -> None:
    """Every numeric or named option checked before anything is read or computed."""
    def bad(msg):
        raise UserError(msg)

    if not (isinstance(opts.n_boot, int) and opts.n_boot >= 1):
        bad(f"--n-boot {opts.n_boot}: must be a positive integer (bootstrap resamples, e.g. 10000)")
    if not (0.0 < float(opts.alpha) < 1.0):
        bad(f"--alpha {opts.alpha}: must be strictly between 0 and 1 (e.g. 0.05)")
    if not (isinstance(opts.seed, int) and opts.seed >= 0):
        bad(f"--seed {opts.seed}: must be a non-negative integer")
    if not (isinstance(opts.num_processes, int) and opts.num_processes >= 1):
        bad(f"--num-processes {opts.num_processes}: must be a positive integer")
    if not (float(opts.geometry_tol) >= 0.0 and np.isfinite(opts.geometry_tol)):
        bad(f"--geometry-tol {opts.geometry_tol}: must be a finite number >= 0 (mm)")
    if opts.connectivity not in (6, 18, 26):
        bad(f"--connectivity {opts.connectivity}: choose 6, 18 or 26")
    if not opts.folds:
        bad("no fold given (--folds)")
    if any(f < 0 for f in opts.folds) or len(set(opts.folds)) != len(opts.folds):
        bad(f"--folds {' '.join(map(str, opts.folds))}: folds must be distinct non-negative integers")
    if opts.holm_family not in ("metric", "all"):
        bad(f"--holm-family must be 'metric' or 'all', got {opts.holm_family!r}")
    if opts.protocol not in ("nnunet", "cai"):
        bad(f"--cv-protocol {opts.protocol!r}: choose nnunet (5-fold validation) or cai (test groups)")
    if opts.protocol == "cai" and opts.test_set is not None:
        bad("--cv-protocol cai scores the training cases' test groups; it cannot be combined with --test-set")
    if opts.frangi_ridges not in classical.RIDGES:
        bad(f"--frangi-ridges {opts.frangi_ridges!r}: choose auto, bright or dark")
    try:
        MatchRule.parse(opts.match)
    except ValueError as e:
        bad(str(e))


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
        # nnU-Net's own trainer (or its budget variants): the others must beat stock nnU-Net
        stock = [s for s in specs if s.is_stock]
        base = stock[0] if stock else next((s for s in specs if not s.is_classical), specs[0])
    if len(specs) < 2:
        raise UserError(f"need at least two models to compare (got {specs[0].label})")
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
        if spec.checkpoint != g.FINAL:
            cmd += ["-chk", spec.checkpoint]
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


def _splits(name: str) -> list[dict]:
    path = g.env_dir("nnUNet_preprocessed") / name / "splits_final.json"
    try:
        splits = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found: classical filters, @checkpoint models and --cv-protocol cai need the folds "
                        "(nnunet-pvs splits, or the file nnU-Net writes when it first trains)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if not isinstance(splits, list) or not all(isinstance(f, dict) and "train" in f and "val" in f for f in splits):
        raise UserError(f"{path}: not nnU-Net's format (a list of {{'train': [...], 'val': [...]}})")
    return splits


def _cai_test_groups(name: str, splits: list[dict], folds: list[int]) -> dict[int, list[str]]:
    """Fold -> test cases from ``test_groups.json`` (``nnunet-pvs splits --protocol cai``), checked to
    be disjoint from the fold's training and validation cases and from each other."""
    path = g.env_dir("nnUNet_preprocessed") / name / "test_groups.json"
    try:
        data = json.loads(path.read_text())
        groups = {int(f["fold"]): list(f["test"]) for f in data["folds"]}
    except FileNotFoundError:
        raise UserError(f"{path} not found: --cv-protocol cai needs the test groups written by "
                        f"`nnunet-pvs splits -d {name} --protocol cai` before training") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: unreadable or not written by nnunet-pvs splits ({e})") from None
    seen: dict[str, int] = {}
    for f in folds:
        if f not in groups or f >= len(splits):
            raise UserError(f"{path}: no test group for fold {f}")
        overlap = set(groups[f]) & (set(splits[f]["train"]) | set(splits[f]["val"]))
        if overlap:
            raise UserError(f"fold {f}: test case(s) {', '.join(sorted(overlap)[:10])} are also in its training or "
                            "validation set (splits_final.json no longer matches test_groups.json)")
        for c in groups[f]:
            if c in seen:
                raise UserError(f"{path}: case {c} is in the test groups of folds {seen[c]} and {f}")
            seen[c] = f
    return {f: groups[f] for f in folds}


def _fold_cases(splits: list[dict], fold: int, key: str, name: str) -> list[str]:
    if fold >= len(splits):
        raise UserError(f"{name}: splits_final.json has {len(splits)} fold(s); fold {fold} requested")
    return list(splits[fold][key])


@dataclass
class ComparePlan:
    """What is compared, where it comes from and on which protocol (step 1 of :func:`run_compare`)."""

    name: str
    specs: list                # every model, the baseline included
    base: g.ModelSpec
    usable: list               # the models that are compared (complete ones)
    networks: list             # the trained models among specs
    results: dict              # network spec -> gathered nnU-Net results
    excluded: dict[str, str]   # label -> why it is left out
    folds: list[int]
    raw_dir: Path
    pred_root: Path
    test_mode: bool
    cai: bool
    need_repredict: bool
    splits: list[dict] | None

    @property
    def kind(self) -> str:
        return "test" if self.test_mode else "cai" if self.cai else "cv"


@dataclass
class Predictions:
    """Every compared model's predictions of the same cases (step 2)."""

    preds: dict[str, dict[str, io.PredFiles]]
    refs: dict[str, Path]
    ref_dir: Path
    cases: list[str]
    mode: str
    case_fold: dict[str, int]
    notes: list[str]
    classical_rows: list[dict]
    classical_choice: dict[str, str]


def run_compare(opts: CompareOptions) -> Path:
    """Compare the models: plan -> predict -> evaluate -> report (or write the SLURM script)."""
    validate_options(opts)
    specs, base = parse_models(opts)
    # before anything is read, trained or predicted (and before a SLURM script promises a report there):
    # a folder another command or the user wrote is refused, not replaced at the end
    check_output_path(opts.output)
    if opts.emit_slurm is not None:
        from nnunet_pvs.compare.slurm import write_slurm_script

        trainable = list(dict.fromkeys(s.network for s in specs if not s.is_classical))
        return write_slurm_script(opts, trainable, base.network)
    plan = plan_comparison(opts, specs, base)
    predicted = predict_models(opts, plan)
    per_case, stats, ev_opts = evaluate_comparison(opts, plan, predicted)
    report = write_comparison_report(opts, plan, predicted, per_case, stats, ev_opts)
    print(f"compared {len(plan.usable)} model(s) on {len(predicted.cases)} case(s); report: {report}")
    return report


def plan_comparison(opts: CompareOptions, specs: list, base: g.ModelSpec) -> ComparePlan:
    """Find every model's results, leave out incomplete ones (not the baseline), decide what must be predicted."""
    name = g.resolve_dataset(opts.dataset)
    results_dir = g.env_dir("nnUNet_results") / name
    if not results_dir.is_dir():
        raise UserError(f"{name}: no results folder {results_dir} (nothing trained yet?)")
    test_mode = opts.test_set is not None
    cai = opts.protocol == "cai"
    if opts.labels is not None and not test_mode:
        raise UserError("--labels is for --test-set; cross-validation uses labelsTr")
    if opts.regions is not None and not opts.regions.is_dir():
        raise UserError(f"--regions {opts.regions}: folder not found")
    folds = list(opts.folds)
    pred_root = opts.predictions_dir or opts.output.parent / f"{opts.output.name}_predictions"
    networks = [s for s in specs if not s.is_classical]
    need_repredict = cai or any(s.checkpoint != g.FINAL for s in networks if not test_mode)
    if need_repredict or test_mode or any(s.is_classical for s in specs):
        check_output_path(pred_root, what="predictions folder", report=False)
    results = {s: g.gather_model(results_dir, s, folds, need_validation=not (test_mode or cai)) for s in networks}
    _refuse_unsafe_models(results, folds, predicts=need_repredict or test_mode)
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
    needs_folds = need_repredict or (not test_mode and any(s.is_classical for s in usable))
    return ComparePlan(name=name, specs=specs, base=base, usable=usable, networks=networks, results=results,
                       excluded=excluded, folds=folds, raw_dir=g.env_dir("nnUNet_raw") / name, pred_root=pred_root,
                       test_mode=test_mode, cai=cai, need_repredict=need_repredict,
                       splits=_splits(name) if needs_folds else None)


def predict_models(opts: CompareOptions, plan: ComparePlan) -> Predictions:
    """Every model's predictions of the same cases: nnU-Net's validation outputs, re-predicted checkpoints,
    test-set predictions, and the classical suite tuned on each fold's training subjects."""
    name, usable, folds, splits, raw_dir = plan.name, plan.usable, plan.folds, plan.splits, plan.raw_dir
    images_tr = raw_dir / "imagesTr"
    ending = g.dataset_file_ending(raw_dir) or ".nii.gz"
    notes: list[str] = []
    preds: dict[str, dict[str, io.PredFiles]] = {}
    frangi_jobs: list[classical.FoldJob] = []
    target_images = images_tr
    if plan.test_mode:
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
        for s in tqdm([s for s in usable if not s.is_classical], desc="compare: predict", unit="model",
                      file=sys.stderr):
            chk = "" if s.checkpoint == g.FINAL else f"@{Path(s.checkpoint).stem}"
            preds[s.label] = _predict_test_set(s, name, images, plan.pred_root / f"{s.folder_name}{chk}", folds,
                                               opts.device, expected)
        if any(s.is_classical for s in usable):
            train_all = sorted(io.list_niftis(raw_dir / "labelsTr")) if (raw_dir / "labelsTr").is_dir() else []
            frangi_jobs = [classical.FoldJob("all", tuple(train_all), tuple(expected))]
            target_images = images
        mode = f"test set `{images}` (ensemble of folds {', '.join(map(str, folds))})"
        case_fold = {}
    else:
        ref_dir = g.cv_reference_folder(name)
        if plan.cai:
            targets = _cai_test_groups(name, splits, folds)
            mode = (f"Cai et al. protocol (folds {', '.join(map(str, folds))}): each subject scored once, as a test "
                    "subject of the fold model trained without its group")
        else:
            targets = ({f: _fold_cases(splits, f, "val", name) for f in folds} if splits is not None else None)
            mode = (f"{len(folds)}-fold cross-validation (folds {', '.join(map(str, folds))}, nnU-Net validation "
                    "predictions, or re-predicted from the named checkpoint)")
        role = "test" if plan.cai else "val"
        for s in tqdm(usable, desc="compare: gather", unit="model", file=sys.stderr):
            if s.is_classical:
                continue
            if s.checkpoint == g.FINAL and not plan.cai:
                preds[s.label] = g.validation_predictions(plan.results[s])
            else:
                preds[s.label] = {}
                for f in folds:
                    out_dir = plan.pred_root / s.folder_name / Path(s.checkpoint_file).stem / f"fold_{f}_{role}"
                    got = repredict.predict_fold(plan.results[s].folder, f, s.checkpoint_file, targets[f],
                                                 images_tr, out_dir, opts.device, s.label)
                    preds[s.label].update({c: io.PredFiles(seg=p) for c, p in got.items()})
        if any(s.is_classical for s in usable):
            frangi_jobs = [classical.FoldJob(f"fold_{f}", tuple(_fold_cases(splits, f, "train", name)),
                                             tuple(targets[f])) for f in folds]
        case_fold = {c: f for f in folds for c in (targets[f] if targets else [])}

    refs = io.list_niftis(ref_dir)
    classical_rows, classical_choice = [], {}
    if frangi_jobs:
        labels_tr = io.list_niftis(raw_dir / "labelsTr") if (raw_dir / "labelsTr").is_dir() else {}
        bright = classical.ridge_polarity(raw_dir, opts.frangi_ridges)
        for spec in (s for s in usable if s.is_classical):
            settings = classical.ClassicalSettings(bright, spec.classical_families, brain_mask=opts.frangi_mask)
            preds[spec.label], rows = classical.run_classical(
                frangi_jobs, images_tr, labels_tr, target_images, refs, plan.pred_root / spec.folder_name, settings,
                ending, label=spec.label)
            classical_rows += [{"model": spec.label, **r} for r in rows]
            classical_choice[spec.label] = classical.describe_choices(rows)
        notes.append(f"classical: {classical.describe_suite(bright, opts.frangi_mask)}; per model the filter, scales "
                     f"and threshold tuned on each fold's training subjects only (mean Dice), applied unchanged to "
                     f"its {'test' if plan.test_mode or plan.cai else 'validation'} subjects (`classical_tuning.csv`)")

    sets = {lab: set(p) for lab, p in preds.items()}
    if len({frozenset(s) for s in sets.values()}) > 1:
        raise UserError("models were evaluated on different case sets; refusing to compare them:\n"
                        + g.case_set_difference(sets))
    cases = sorted(next(iter(sets.values())))
    no_ref = sorted(set(cases) - set(refs))
    if no_ref:
        raise UserError(f"{len(no_ref)} predicted case(s) have no reference label in {ref_dir}: "
                        f"{', '.join(no_ref[:20])}")
    unpredicted = sorted(set(refs) - set(cases))
    if unpredicted:
        notes.append(f"{len(unpredicted)} reference case(s) in `{ref_dir}` were predicted by no model and are "
                     f"not evaluated: {', '.join(unpredicted[:20])}{' ...' if len(unpredicted) > 20 else ''}")
    return Predictions(preds={s.label: preds[s.label] for s in usable}, refs=refs, ref_dir=ref_dir, cases=cases,
                       mode=mode, case_fold=case_fold, notes=notes, classical_rows=classical_rows,
                       classical_choice=classical_choice)


def evaluate_comparison(opts: CompareOptions, plan: ComparePlan,
                        predicted: Predictions) -> tuple[pd.DataFrame, pd.DataFrame, Options]:
    """Per-case metrics of every model, then paired tests of each against the baseline."""
    ev_opts = opts.evaluation or Options(threshold=0.5, thresholds=(), min_cluster_sizes=(0,),
                                         connectivity=opts.connectivity, rule=MatchRule.parse(opts.match))
    available = metric_columns(ev_opts)
    unknown = [m for m in opts.extra_metrics if m not in available]
    if unknown:
        raise UserError(f"--metrics {','.join(unknown)}: not computed with these options; available: "
                        f"{', '.join(available)}")
    stats_metrics = STATS_METRICS + [m for m in opts.extra_metrics if m not in STATS_METRICS]
    per_case = evaluate_models(predicted.cases, predicted.refs, predicted.preds, ev_opts, opts.regions,
                               opts.geometry_tol, opts.num_processes)
    if predicted.case_fold:
        per_case.insert(2, "fold", per_case["case"].map(predicted.case_fold))
    stats = paired_tests(per_case, plan.base.label, list(predicted.preds), stats_metrics, n_boot=opts.n_boot,
                         seed=opts.seed, family=opts.holm_family, alpha=opts.alpha)
    return per_case, stats, ev_opts


def write_comparison_report(opts: CompareOptions, plan: ComparePlan, predicted: Predictions,
                            per_case: pd.DataFrame, stats: pd.DataFrame, ev_opts: Options) -> Path:
    """The report folder: models with budgets and convergence, training cost, per-case metrics, tests, plots."""
    models_table, warnings = describe_models(plan.specs, plan.results, plan.excluded, plan.folds, plan.kind,
                                             predicted.classical_choice)
    for w in warnings:
        print(f"compare: WARNING: {w}", file=sys.stderr)
    cost = pd.DataFrame([model_cost(s.label, plan.results[s].folder, plan.folds,
                                    "compared" if s.label not in plan.excluded else "excluded")
                         for s in plan.networks])
    fold_rows = pd.DataFrame([{"model": s.label, "fold": f.fold, "status": f.status, "reason": f.reason}
                              for s in plan.networks for f in plan.results[s].folds])
    data = ReportData(
        title=f"nnU-Net model comparison on {plan.name}", command=shlex.join(opts.compare_argv()), mode=predicted.mode,
        dataset=plan.name, reference=predicted.ref_dir, baseline=plan.base.label, models=list(predicted.preds),
        excluded=plan.excluded, folds=fold_rows, per_case=per_case, stats=stats, cost=cost, notes=predicted.notes,
        warnings=warnings, models_table=models_table, classical=pd.DataFrame(predicted.classical_rows),
        settings={"match": str(ev_opts.rule), "connectivity": ev_opts.connectivity, "holm_family": opts.holm_family,
                  "alpha": opts.alpha, "n_boot": opts.n_boot, "seed": opts.seed, "cv_protocol": opts.protocol,
                  "eval_protocols": ",".join(ev_opts.protocols) or "none", "nsd_tolerance_mm": ev_opts.nsd_tolerance,
                  "surface_connectivity": ev_opts.surface_connectivity, "region_mode": ev_opts.region_mode,
                  "size_groups": str(ev_opts.size_groups) if ev_opts.size_groups else "none",
                  "extra_metrics": ",".join(opts.extra_metrics) or "none"})
    return write_report(opts.output, data, plots=opts.plots)


def _refuse_unsafe_models(results: dict, folds: list[int], predicts: bool) -> None:
    """Stop before anything is predicted when a model's checkpoints would need code to load: nnU-Net's
    predictor opens them with ``weights_only=False`` and would run it (:mod:`nnunet_pvs.safe_files`)."""
    from nnunet_pvs.safe_files import unsafe_checkpoints

    if not predicts:
        return
    problems = [line for spec, r in results.items() for f in folds
                for line in unsafe_checkpoints(r.folder / f"fold_{f}")]
    if problems:
        raise UserError("refusing to predict with a model whose checkpoints would run code when nnU-Net loads "
                        "them:\n" + "\n".join(f"  {p}" for p in problems))


def _checkpoint_epoch(folder: Path, folds: list[int], checkpoint: str) -> str:
    """Epochs completed when ``checkpoint`` was saved (nnU-Net stores ``current_epoch`` + 1), over the folds."""
    from nnunet_pvs.safe_files import UnsafeFileError, load_checkpoint

    epochs = set()
    for f in folds:
        path = folder / f"fold_{f}" / checkpoint
        try:
            epochs.add(int(load_checkpoint(path)["current_epoch"]))
        except UnsafeFileError:  # a crafted file is refused, not reported as an unknown epoch
            raise
        except Exception:  # unreadable or absent: say so rather than guess
            epochs.add(None)
    known = sorted(e for e in epochs if e is not None)
    if not known:
        return "?"
    return str(known[0]) if len(known) == 1 else f"{known[0]}-{known[-1]}"


def describe_models(specs, results, excluded, folds, kind: str,
                    classical_choice: dict | None = None) -> tuple[pd.DataFrame, list[str]]:
    """One row per model (checkpoint, budget run, convergence; for a classical model the filters
    chosen per fold in place of the checkpoint) and the warnings a reader must see."""
    rows, budgets, batches = [], {}, {}
    for s in specs:
        if s.is_classical:
            chosen = (classical_choice or {}).get(s.label, "-")
            rows.append({"model": s.label, "status": "compared", "checkpoint": chosen,
                         "budget": "tuned on all training cases" if kind == "test" else "tuned on training folds",
                         "batch_size": "-", "device": "-", "convergence": "-", "ema_pseudo_dice_last": math.nan})
            continue
        prog = model_progress(results[s].folder, folds)
        if s.checkpoint == g.FINAL:
            deleted = [str(f.fold) for f in results[s].folds if f.status == "checkpoint deleted"]
            chk = g.FINAL_CHECKPOINT + {"cv": " (nnU-Net validation outputs)", "cai": "",
                                        "test": " (ensemble of folds)"}[kind]
            if deleted:
                chk += f"; deleted in fold{'s' if len(deleted) > 1 else ''} {', '.join(deleted)}"
        else:
            chk = f"{s.checkpoint} (after {_checkpoint_epoch(results[s].folder, folds, s.checkpoint)} epochs)"
        last = [f.ema[-1] for f in prog["folds"] if f.ema]
        rows.append({"model": s.label, "status": "excluded" if s.label in excluded else "compared",
                     "checkpoint": chk, "budget": prog["budget"], "batch_size": prog["batch_size"],
                     "device": prog["device"], "convergence": prog["convergence"],
                     "ema_pseudo_dice_last": float(np.mean(last)) if last else math.nan})
        if s.label not in excluded:
            budgets.setdefault(prog["budget"], []).append(s.label)
            batches.setdefault(prog["batch_size"], []).append(s.label)
    warnings = []
    if len(batches) > 1:
        warnings.append("models were trained with different batch sizes ("
                        + "; ".join(f"{', '.join(m)}: {b}" for b, m in batches.items())
                        + "), so at equal iterations they saw different numbers of patches.")
    if len(budgets) > 1:
        warnings.append("models were trained with different budgets (epochs x iterations per epoch): "
                        + "; ".join(f"{', '.join(m)}: {b}" for b, m in budgets.items())
                        + ". Differences between them may reflect the budget, not the method.")
    return pd.DataFrame(rows), warnings
