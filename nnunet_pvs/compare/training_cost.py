"""Training cost of a model from nnU-Net's ``fold_N/training_log_*.txt``.

nnU-Net v2 logs ``<timestamp>: Epoch N`` at the start and ``<timestamp>: Epoch time: X s`` at the
end of every epoch. A resumed training (``--c``) starts a new log file and repeats the epochs
after the last checkpoint, so epochs are counted as distinct epoch numbers over all logs of a fold,
and the wall time per epoch is the mean over every logged epoch time.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

_EPOCH = re.compile(r":\s+Epoch (\d+)\s*$")
_EPOCH_TIME = re.compile(r":\s+Epoch time: ([0-9.eE+-]+) s\s*$")


def parse_log(path: Path) -> tuple[set[int], list[float]]:
    epochs, times = set(), []
    with open(path, errors="replace") as f:
        for line in f:
            m = _EPOCH.search(line)
            if m:
                epochs.add(int(m.group(1)))
                continue
            m = _EPOCH_TIME.search(line)
            if m:
                try:
                    times.append(float(m.group(1)))
                except ValueError:
                    pass
    return epochs, times


def fold_cost(fold_dir: Path) -> dict:
    epochs: set[int] = set()
    times: list[float] = []
    logs = sorted(Path(fold_dir).glob("training_log_*.txt")) if Path(fold_dir).is_dir() else []
    for log in logs:
        e, t = parse_log(log)
        epochs |= e
        times += t
    return {"logs": len(logs), "epochs": len(epochs), "epoch_times": times}


def model_cost(model_label: str, model_folder: Path, folds: list[int], status: str) -> dict:
    per_fold = {f: fold_cost(model_folder / f"fold_{f}") for f in folds}
    logged = {f: c for f, c in per_fold.items() if c["logs"]}
    times = [t for c in logged.values() for t in c["epoch_times"]]
    epochs = [c["epochs"] for c in logged.values()]
    return {
        "model": model_label, "status": status,
        "folds_with_logs": len(logged),
        "epochs_per_fold": ("-" if not epochs else str(epochs[0]) if min(epochs) == max(epochs)
                            else f"{min(epochs)}-{max(epochs)}"),
        "epochs_total": int(sum(epochs)),
        "s_per_epoch_mean": (sum(times) / len(times)) if times else math.nan,
        "s_per_epoch_median": float(pd.Series(times).median()) if times else math.nan,
        "train_hours_total": sum(times) / 3600.0 if times else math.nan,
    }
