"""Finding each model's results in ``nnUNet_results``: folds complete, missing or still training.

nnU-Net v2 writes one folder per model, ``nnUNet_results/Dataset<ID>_Name/<Trainer>__<Plans>__<config>``,
with ``fold_N/checkpoint_final.pth`` once training finished and ``fold_N/validation/`` holding the
fold's cross-validation predictions plus ``summary.json`` once validation finished.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_pvs.classical.bank import FAMILIES
from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation import io

DEFAULT_PLANS = "nnUNetPlans"
NNUNET_DIRS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


FINAL = "final"
FINAL_CHECKPOINT = "checkpoint_final.pth"
#: classical baselines accepted as a model name in ``--models`` (also ``classical:FAMILY[,FAMILY]``)
CLASSICAL_MODELS = ("classical", "frangi")


def classical_label(text: str) -> str:
    """Canonical name of a classical spec: ``classical`` (every filter family), ``frangi`` (Frangi
    only, the name it had before the suite), else ``classical:`` and the families in suite order."""
    name, colon, rest = text.strip().lower().partition(":")
    if name == "frangi" and not colon:
        return "frangi"
    asked = [f.strip() for f in rest.split(",")] if colon else list(FAMILIES)
    unknown = [f for f in asked if f not in FAMILIES]
    if name != "classical" or unknown:
        raise UserError(f"model '{text}': unknown filter family '{unknown[0] if unknown else rest}'; "
                        f"classical:FAMILY[,FAMILY] takes {', '.join(FAMILIES)}")
    families = [f for f in FAMILIES if f in asked]
    if families == list(FAMILIES):
        return "classical"
    return "frangi" if families == ["frangi"] else "classical:" + ",".join(families)


def _is_classical_text(text: str) -> bool:
    low = text.strip().lower()
    return low in CLASSICAL_MODELS or low.startswith("classical:")


@dataclass(frozen=True)
class ModelSpec:
    """One model: ``Trainer:config[:Plans][@checkpoint]``, or a classical baseline (``classical``,
    ``classical:sato,tophat``, ``frangi``; see :func:`classical_label`).

    ``@final`` (the default) means nnU-Net's own validation outputs of ``checkpoint_final.pth``;
    any other checkpoint file of the fold folder is re-predicted (``compare.repredict``)."""

    trainer: str
    config: str = ""
    plans: str = DEFAULT_PLANS
    checkpoint: str = FINAL

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        text = str(text).strip()
        if _is_classical_text(text):
            return cls(classical_label(text), "", "", FINAL)
        body, _, chk = text.partition("@")
        parts = body.split(":")
        if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
            raise UserError(f"model '{text}': expected Trainer:config[:Plans][@checkpoint] "
                            f"(e.g. nnUNetTrainer:3d_fullres), classical[:FAMILY,...] or frangi")
        chk = chk.strip()
        if "@" in text and not chk:
            raise UserError(f"model '{text}': empty checkpoint after '@' (e.g. @checkpoint_best.pth or @final)")
        if chk in ("", FINAL, FINAL_CHECKPOINT):
            chk = FINAL
        elif not chk.endswith(".pth") or "/" in chk or "\\" in chk:
            raise UserError(f"model '{text}': checkpoint '{chk}' must be @final or the file name of a checkpoint "
                            "in the fold folder (e.g. @checkpoint_epoch50.pth, @checkpoint_best.pth)")
        trainer, config, *plans = (p.strip() for p in parts)
        return cls(trainer, config, plans[0] if plans else DEFAULT_PLANS, chk)

    @property
    def is_classical(self) -> bool:
        return self.trainer in CLASSICAL_MODELS or self.trainer.startswith("classical:")

    @property
    def classical_families(self) -> tuple[str, ...]:
        """The filter families of a classical spec (empty for a network)."""
        if not self.is_classical:
            return ()
        if self.trainer == "frangi":
            return ("frangi",)
        _, _, rest = self.trainer.partition(":")
        return tuple(rest.split(",")) if rest else FAMILIES

    @property
    def network(self) -> "ModelSpec":
        """The trained network this spec reads (same trainer, config and plans, at @final)."""
        return ModelSpec(self.trainer, self.config, self.plans)

    @property
    def checkpoint_file(self) -> str:
        return FINAL_CHECKPOINT if self.checkpoint == FINAL else self.checkpoint

    @property
    def label(self) -> str:
        if self.is_classical:
            return self.trainer
        base = f"{self.trainer}:{self.config}"
        base = base if self.plans == DEFAULT_PLANS else f"{base}:{self.plans}"
        return base if self.checkpoint == FINAL else f"{base}@{self.checkpoint}"

    @property
    def folder_name(self) -> str:
        if self.is_classical:
            return self.trainer.replace(":", "_").replace(",", "+")
        return f"{self.trainer}__{self.plans}__{self.config}"

    @property
    def is_stock(self) -> bool:
        """nnU-Net's own trainer or one of its budget variants (``nnUNetTrainer_budget``, ``_250epochs``)."""
        return self.trainer == "nnUNetTrainer" or self.trainer.startswith("nnUNetTrainer_")


@dataclass
class FoldStatus:
    fold: int
    status: str          # complete | missing | still training | validation missing | checkpoint deleted
    reason: str = ""
    usable: bool = False


@dataclass
class ModelResults:
    spec: ModelSpec
    folder: Path
    folds: list[FoldStatus] = field(default_factory=list)

    @property
    def incomplete(self) -> list[FoldStatus]:
        return [f for f in self.folds if not f.usable]

    @property
    def complete(self) -> bool:
        return not self.incomplete

    def describe_incomplete(self) -> str:
        """One line such as ``fold 4 missing; fold 2 still training (no checkpoint_final.pth)``."""
        if not self.spec.is_classical and not self.folder.is_dir():
            return f"not trained (no results folder {self.folder})"
        hints = {"missing": "", "still training": " (no checkpoint_final.pth)",
                 "validation missing": " (no validation/summary.json)",
                 "checkpoint deleted": " (validation/summary.json exists but checkpoint_final.pth was deleted; "
                                       "only @final in cross-validation can use it)"}
        parts = []
        for status in dict.fromkeys(f.status for f in self.incomplete):
            fs = [str(f.fold) for f in self.incomplete if f.status == status]
            parts.append(f"fold{'s' if len(fs) > 1 else ''} {', '.join(fs)} {status}{hints.get(status, '')}")
        return "; ".join(parts)


def env_dir(name: str) -> Path:
    """One of nnU-Net's folders from the environment, read at call time."""
    value = os.environ.get(name)
    if not value:
        raise UserError(f"${name} is not set; export nnUNet_raw, nnUNet_preprocessed and nnUNet_results "
                        "(see nnU-Net's setting_up_paths.md)")
    return Path(value)


def resolve_dataset(dataset: str) -> str:
    """``Dataset<ID>_Name`` from an id (``1``, ``001``) or a name. The search is nnU-Net's own
    (``find_candidate_datasets``: raw, preprocessed and results, read from the environment at call
    time); only the errors are ours, so they name the folders searched."""
    from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets

    text = str(dataset).strip()
    if text.startswith("Dataset"):
        return text
    try:
        did = int(text)
    except ValueError:
        raise UserError(f"dataset '{dataset}': expected an integer id or a Dataset<ID>_Name") from None
    prefix = f"Dataset{did:03d}_"
    found = sorted(str(name) for name in find_candidate_datasets(did) if str(name).startswith(prefix))
    if not found:
        searched = [f"{var}={os.environ[var]}" for var in NNUNET_DIRS
                    if os.environ.get(var) and Path(os.environ[var]).is_dir()]
        where = ", ".join(searched) or "no nnU-Net folder is set"
        raise UserError(f"dataset id {did}: no {prefix}* folder found ({where})")
    if len(found) > 1:
        raise UserError(f"dataset id {did}: several matching folders {found}; pass the full name")
    return found[0]


def fold_status(fold_dir: Path, fold: int, need_validation: bool = True,
                checkpoint: str = FINAL) -> FoldStatus:
    """State of one fold for one use: nnU-Net's validation outputs (``need_validation`` at
    ``@final``), or a checkpoint to predict from. A fold whose validation finished but whose
    checkpoint was deleted (to save space) is "checkpoint deleted", never "still training"."""
    if not fold_dir.is_dir():
        return FoldStatus(fold, "missing", f"no folder {fold_dir}")
    final = (fold_dir / FINAL_CHECKPOINT).is_file()
    validated = (fold_dir / "validation" / "summary.json").is_file()
    if need_validation and checkpoint == FINAL:
        if validated:
            return (FoldStatus(fold, "complete", usable=True) if final else
                    FoldStatus(fold, "checkpoint deleted", f"no {FINAL_CHECKPOINT} in {fold_dir}; validation "
                               "outputs used", usable=True))
        if final:
            return FoldStatus(fold, "validation missing", f"no validation/summary.json in {fold_dir}")
        return FoldStatus(fold, "still training", f"no {FINAL_CHECKPOINT} in {fold_dir}")
    wanted = FINAL_CHECKPOINT if checkpoint == FINAL else checkpoint
    if (fold_dir / wanted).is_file():
        return FoldStatus(fold, "complete", usable=True)
    if not (final or validated):
        return FoldStatus(fold, "still training", f"no {FINAL_CHECKPOINT} in {fold_dir}")
    if checkpoint == FINAL:
        return FoldStatus(fold, "checkpoint deleted", f"no {FINAL_CHECKPOINT} in {fold_dir}")
    raise UserError(f"fold {fold}: checkpoint {fold_dir / wanted} not found (training finished without it, "
                    f"or it was deleted); checkpoints there: "
                    f"{', '.join(sorted(p.name for p in fold_dir.glob('*.pth'))) or 'none'}")


def gather_model(results_dataset_dir: Path, spec: ModelSpec, folds: list[int],
                 need_validation: bool = True) -> ModelResults:
    folder = results_dataset_dir / spec.folder_name
    res = ModelResults(spec, folder)
    for f in folds:
        try:
            res.folds.append(fold_status(folder / f"fold_{f}", f, need_validation, spec.checkpoint))
        except UserError as e:
            raise UserError(f"model {spec.label}: {e}") from None
    return res


def validation_predictions(model: ModelResults) -> dict[str, io.PredFiles]:
    """case -> binary NIfTI prediction, gathered over the model's folds' ``validation/`` folders."""
    out: dict[str, io.PredFiles] = {}
    seen: dict[str, int] = {}
    for fs in model.folds:
        vdir = model.folder / f"fold_{fs.fold}" / "validation"
        found = io.list_niftis(vdir)
        if not found:
            raise UserError(f"{model.spec.label}: fold {fs.fold} has summary.json but no NIfTI "
                            f"predictions in {vdir}")
        for case, path in found.items():
            if case in out:
                raise UserError(f"{model.spec.label}: case {case} predicted in both fold {seen[case]} and "
                                f"fold {fs.fold} ({path}); the folds' validation sets overlap")
            out[case], seen[case] = io.PredFiles(seg=path), fs.fold
    return out


def dataset_file_ending(raw_dataset_dir: Path) -> str | None:
    dj = raw_dataset_dir / "dataset.json"
    if dj.is_file():
        try:
            return json.loads(dj.read_text()).get("file_ending")
        except (OSError, ValueError):
            return None
    return None


def cv_reference_folder(dataset_name: str) -> Path:
    """``nnUNet_raw/<ds>/labelsTr``, else ``nnUNet_preprocessed/<ds>/gt_segmentations``."""
    candidates = []
    for var, sub in (("nnUNet_raw", "labelsTr"), ("nnUNet_preprocessed", "gt_segmentations")):
        value = os.environ.get(var)
        if value:
            candidates.append(Path(value) / dataset_name / sub)
    for c in candidates:
        if c.is_dir() and io.list_niftis(c):
            return c
    raise UserError(f"{dataset_name}: no reference labels found (looked in "
                    f"{', '.join(map(str, candidates)) or 'nothing: nnUNet_raw/nnUNet_preprocessed unset'})")


def dataset_relative(path: str | Path, dataset_name: str) -> Path:
    """A folder given as a path, or relative to ``nnUNet_raw/<dataset>`` (e.g. ``imagesTs``)."""
    p = Path(path)
    if p.is_dir() or p.is_absolute():
        return p
    raw = os.environ.get("nnUNet_raw")
    if raw and (Path(raw) / dataset_name / p).is_dir():
        return Path(raw) / dataset_name / p
    return p


_CHANNEL = re.compile(r"^(.*)_\d{4}$")


def image_case_ids(images_dir: Path) -> list[str]:
    """Case ids of an nnU-Net images folder (``CASE_0000.nii.gz`` -> ``CASE``)."""
    ids = set()
    for cid in io.list_niftis(images_dir):
        m = _CHANNEL.match(cid)
        ids.add(m.group(1) if m else cid)
    return sorted(ids)


def case_set_difference(sets: dict[str, set[str]]) -> str:
    """Readable listing of how model case sets differ from their union."""
    union = set().union(*sets.values())
    lines = []
    for label, s in sets.items():
        missing = sorted(union - s)
        if missing:
            lines.append(f"  {label} lacks {len(missing)} case(s): {', '.join(missing[:20])}"
                         + (" ..." if len(missing) > 20 else ""))
    return "\n".join(lines)
