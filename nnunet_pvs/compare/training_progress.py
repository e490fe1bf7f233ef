"""Budget actually run and convergence of a trained model, read from its fold folders.

* **Budget**: epochs run (distinct ``Epoch N`` numbers in ``training_log_*.txt``, else the
  checkpoint's ``current_epoch``) x iterations per epoch (``num_iterations_per_epoch`` in the
  ``debug.json`` nnU-Net writes at the start of training).
* **EMA pseudo Dice per epoch**: nnU-Net's own series, ``logging["ema_fg_dice"]`` of the newest
  checkpoint (final, latest, best); without a checkpoint it is rebuilt from the logged
  ``Pseudo dice`` lines exactly as nnU-Net's logger does (mean over classes,
  ``ema = 0.9 * ema + 0.1 * dice``; the log rounds to 4 decimals).
* **Convergence rule**: with ``N`` epochs (``N >= MIN_EPOCHS``) and ``k = ceil(N / 5)`` (the last
  fifth), the fold is "not converged at this budget" when the EMA pseudo Dice rose by more than
  ``RISE_TOL`` over those ``k`` epochs (``ema[N-1] - ema[N-1-k]``), else "converged"; fewer
  epochs are "undetermined". Whatever the number of epochs, a fold whose EMA pseudo Dice never
  exceeded ``LEARN_FLOOR`` is "not learning at this budget": a network that still predicts
  background only is flat, not converged. A model is not converged if any fold is.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_pvs.compare.training_cost import _EPOCH

MIN_EPOCHS = 10
RISE_TOL = 0.01
LEARN_FLOOR = 0.01
NOT_CONVERGED = "not converged at this budget"
NOT_LEARNING = "not learning at this budget"
CONVERGED = "converged"
UNDETERMINED = "undetermined"

_PSEUDO = re.compile(r":\s+Pseudo dice\s+\[(.*)\]\s*$")
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan)")
_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


@dataclass
class FoldProgress:
    fold: int
    epochs: int | None = None                 # epochs run
    iterations: int | None = None             # training iterations per epoch
    planned_epochs: int | None = None
    batch_size: int | None = None             # patches per iteration (debug.json)
    device: str = ""                          # training device, e.g. cpu or cuda:0 (and the GPU's name)
    ema: list[float] = field(default_factory=list)
    source: str = ""                          # where the EMA series came from
    verdict: str = UNDETERMINED
    detail: str = ""


def ema_series(dice_per_epoch: list[float]) -> list[float]:
    """nnU-Net's EMA of the pseudo Dice: the first value, then 0.9 * previous + 0.1 * new."""
    out: list[float] = []
    for d in dice_per_epoch:
        out.append(d if not out else 0.9 * out[-1] + 0.1 * d)
    return out


def pseudo_dice_from_logs(fold_dir: Path) -> tuple[set[int], list[float]]:
    """(epochs seen, mean pseudo Dice per epoch in epoch order) from every training log; a resumed
    training repeats epochs, and the later log's value wins."""
    epochs: set[int] = set()
    dice: dict[int, float] = {}
    for log in sorted(Path(fold_dir).glob("training_log_*.txt")):
        current = None
        with open(log, errors="replace") as f:
            for line in f:
                m = _EPOCH.search(line)
                if m:
                    current = int(m.group(1))
                    epochs.add(current)
                    continue
                m = _PSEUDO.search(line)
                if m and current is not None:
                    text = re.sub(r"np\.float\d*\(", "(", m.group(1))
                    vals = [float(v) for v in _NUMBER.findall(text)]
                    if vals:
                        dice[current] = float(np.nanmean(vals)) if not all(map(math.isnan, vals)) else math.nan
    return epochs, [dice[e] for e in sorted(dice)]


def _debug_int(debug: dict, key: str) -> int | None:
    try:
        return int(str(debug[key]))
    except (KeyError, ValueError):
        return None


def _checkpoint_logging(fold_dir: Path) -> tuple[str, dict] | None:
    for name in _CHECKPOINTS:
        path = fold_dir / name
        if path.is_file():
            from nnunet_pvs.safe_files import UnsafeFileError, load_checkpoint

            try:
                ckpt = load_checkpoint(path)
                return name, {"ema": list(map(float, ckpt["logging"]["ema_fg_dice"])),
                              "epoch": int(ckpt["current_epoch"])}
            except UnsafeFileError:  # a crafted file is refused, not skipped
                raise
            except Exception:  # a truncated or foreign file: try the next one, then the logs
                continue
    return None


def verdict(ema: list[float], min_epochs: int = MIN_EPOCHS, tol: float = RISE_TOL) -> tuple[str, str]:
    """The convergence rule of this module on one EMA series: (verdict, explanation)."""
    n = len(ema)
    finite = [e for e in ema if math.isfinite(e)]
    if finite and max(finite) <= LEARN_FLOOR:
        return NOT_LEARNING, (f"EMA pseudo Dice never above {LEARN_FLOOR} in {n} epoch(s): the network still "
                              "predicts background only")
    if n < min_epochs:
        return UNDETERMINED, f"{n} epoch(s) of EMA pseudo Dice, the rule needs {min_epochs}"
    k = math.ceil(n / 5)
    rise = ema[-1] - ema[-1 - k]
    if not math.isfinite(rise):
        return UNDETERMINED, "EMA pseudo Dice is not finite"
    detail = f"EMA pseudo Dice {ema[-1 - k]:.3f} -> {ema[-1]:.3f} over the last {k} of {n} epochs"
    return (NOT_CONVERGED if rise > tol else CONVERGED), detail


def fold_progress(fold_dir: Path, fold: int) -> FoldProgress:
    fold_dir = Path(fold_dir)
    p = FoldProgress(fold)
    if not fold_dir.is_dir():
        p.detail = "no fold folder"
        return p
    debug = {}
    if (fold_dir / "debug.json").is_file():
        try:
            debug = json.loads((fold_dir / "debug.json").read_text())
        except (OSError, ValueError):
            debug = {}
    p.iterations = _debug_int(debug, "num_iterations_per_epoch")
    p.planned_epochs = _debug_int(debug, "num_epochs")
    p.batch_size = _debug_int(debug, "batch_size")
    p.device = str(debug.get("device", ""))
    if debug.get("gpu_name"):
        p.device += f" ({debug['gpu_name']})"
    epochs, dice = pseudo_dice_from_logs(fold_dir)
    if epochs:
        p.epochs = len(epochs)
    if dice:
        p.ema, p.source = ema_series(dice), "training log"
    else:
        ck = _checkpoint_logging(fold_dir)
        if ck is not None:
            p.ema, p.source = ck[1]["ema"], ck[0]
            p.epochs = p.epochs or ck[1]["epoch"]
    p.verdict, p.detail = verdict(p.ema)
    return p


def budget_text(folds: list[FoldProgress]) -> str:
    """``3 epochs x 20 iterations`` (ranges when folds differ, ``?`` when unknown)."""
    def span(vals):
        known = sorted({v for v in vals if v is not None})
        if not known:
            return "?"
        return str(known[0]) if len(known) == 1 else f"{known[0]}-{known[-1]}"
    e, i = span([f.epochs for f in folds]), span([f.iterations for f in folds])
    return f"{e} epoch{'' if e == '1' else 's'} x {i} iteration{'' if i == '1' else 's'}"


def model_verdict(folds: list[FoldProgress]) -> str:
    def which(folds_):
        return f"fold{'s' if len(folds_) > 1 else ''} {', '.join(map(str, folds_))}"

    flat = [f.fold for f in folds if f.verdict == NOT_LEARNING]
    bad = [f.fold for f in folds if f.verdict == NOT_CONVERGED]
    if flat and bad:
        return f"{NOT_LEARNING} ({which(flat)}); {NOT_CONVERGED} ({which(bad)})"
    if flat:
        return f"{NOT_LEARNING} ({which(flat)})"
    if bad:
        return f"{NOT_CONVERGED} ({which(bad)})"
    ok = [f.fold for f in folds if f.verdict == CONVERGED]
    if ok and len(ok) == len(folds):
        return CONVERGED
    if ok:
        return f"{CONVERGED} (folds {', '.join(map(str, ok))}; others {UNDETERMINED})"
    return f"{UNDETERMINED} (fewer than {MIN_EPOCHS} epochs)"


def model_progress(model_folder: Path, folds: list[int]) -> dict:
    """Budget, convergence and per-fold detail of one trained model."""
    per = [fold_progress(Path(model_folder) / f"fold_{f}", f) for f in folds]
    batches = sorted({f.batch_size for f in per if f.batch_size is not None})
    devices = sorted({f.device for f in per if f.device})
    return {"budget": budget_text(per), "budget_key": tuple((f.epochs, f.iterations) for f in per),
            "batch_size": ", ".join(map(str, batches)) or "?", "device": ", ".join(devices) or "?",
            "convergence": model_verdict(per), "folds": per}
