"""Train until the held-out Dice stops improving, or until a time cap: stopping rules for nnU-Net trainers.

nnU-Net trains a fixed number of epochs, and its poly learning rate is planned over that number. A
study that asks "where does each model plateau?" under a CPU budget needs two more rules, read from
the environment when a run starts (unset: stock behaviour):

* ``NNUNET_PVS_MAX_MINUTES``: a cap on training time, the sum of nnU-Net's own epoch durations
  (``epoch_end - epoch_start`` in its logger: training and online validation, not start-up or the final
  validation), so it adds up correctly across ``nnUNetv2_train --c``. After the first
  ``CALIBRATION_EPOCHS`` epochs the trainer measures its epoch time (the first epoch, which warms up
  caches and workers, is left out) and lowers ``num_epochs`` to the number that fits the cap, also in
  the learning-rate schedule (``PolyLRScheduler.max_steps``), so stock nnU-Net's poly decay ends
  inside the cap instead of being cut off half-way. The epochs so planned are recorded with the run
  and kept on ``--c``. Training also stops if the cap is reached before the planned epochs end.
* ``NNUNET_PVS_STOP_AT_PLATEAU``: a minimal gain (e.g. ``0.01``). After at least ``MIN_PLATEAU_EPOCHS``
  epochs, training stops when the held-out validation Dice gained less than that over the last fifth of
  the epochs. The Dice is nnU-Net's online pseudo Dice, computed every epoch on patches of the fold's
  validation (held-out) subjects. It is noisy from epoch to epoch, so the gain is the least-squares
  trend of the per-epoch values over the last two fifths of the epochs (at least ``TREND_EPOCHS``),
  projected over the last fifth. nnU-Net's EMA of the same Dice is not used: with its weight of 0.9 it
  moves a tenth of the way to a new level per epoch, so over the last 2 of 10 epochs it shows less than
  a fifth of a real gain and declares a plateau that is not there (a first MfNS_De run stopped so after
  500 iterations). A model that has not yet learned (best EMA Dice below ``LEARNING_FLOOR``) is never
  called converged: a flat zero is not a plateau.

Why a run stopped (plateau, cap, planned epochs) is written to the training log and recorded with the
model (``init_args["nnunet_pvs"]["stopping"]``). A stopped run ends as a finished one does:
``checkpoint_final.pth`` and nnU-Net's final validation.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np

MAX_MINUTES_VARIABLE = "NNUNET_PVS_MAX_MINUTES"
PLATEAU_VARIABLE = "NNUNET_PVS_STOP_AT_PLATEAU"
SAVE_EVERY_VARIABLE = "NNUNET_PVS_SAVE_EVERY"
CALIBRATION_EPOCHS = 3
MIN_PLATEAU_EPOCHS = 10
TREND_EPOCHS = 5
LEARNING_FLOOR = 0.05


class _StopTraining(Exception):
    """Raised at the end of an epoch to leave nnU-Net's epoch loop early."""


def _positive_float(name: str) -> float | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={raw!r}: must be a positive number")
    return value


def plateau_gain(dice: list[float]) -> float | None:
    """Gain over the last fifth of the epochs of the least-squares trend of the per-epoch Dice over the
    last two fifths (at least ``TREND_EPOCHS`` epochs); ``None`` before ``MIN_PLATEAU_EPOCHS`` epochs."""
    n = len(dice)
    if n < MIN_PLATEAU_EPOCHS:
        return None
    window = max(TREND_EPOCHS, -(-2 * n // 5))
    values = np.nan_to_num(np.asarray(dice[-window:], dtype=float), nan=0.0)
    slope = np.polyfit(np.arange(window, dtype=float), values, 1)[0]
    return float(slope * n / 5)


def stop_reason(dice: list[float], ema_dice: list[float], epoch_seconds: list[float], max_minutes: float | None,
                min_gain: float | None) -> str | None:
    """Why training should stop after the epochs so far, or ``None`` (pure function of the history)."""
    if max_minutes is not None and sum(epoch_seconds) >= max_minutes * 60:
        return f"time cap reached ({sum(epoch_seconds) / 60:.1f} of {max_minutes:g} minutes of training)"
    if min_gain is not None:
        gain = plateau_gain(dice)
        if gain is not None and gain < min_gain and max(ema_dice) >= LEARNING_FLOOR:
            n = len(dice)
            return (f"plateau: the validation Dice's trend over the last {max(TREND_EPOCHS, -(-2 * n // 5))} of {n} "
                    f"epochs gains {gain:+.4f} over the last fifth (< {min_gain:g})")
    return None


def planned_epochs(epoch_seconds: list[float], max_minutes: float, done: int, current_plan: int) -> int:
    """Epochs that fit ``max_minutes`` at the measured pace (first epoch left out as warm-up), never
    fewer than one more than ``done`` nor more than ``current_plan``."""
    steady = epoch_seconds[1:] if len(epoch_seconds) > 1 else epoch_seconds
    pace = float(np.median(steady))
    remaining = max_minutes * 60 - sum(epoch_seconds)
    fit = done + int(remaining // pace) if pace > 0 else current_plan
    return int(min(current_plan, max(done + 1, fit)))


class StoppingRulesMixin:
    """Time cap with a schedule planned to fit it, and stop-at-plateau (module doc). Put before
    nnU-Net's trainer in the bases; needs ``record_with_model`` (:class:`PluginProvenanceMixin`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from nnunet_pvs.trainers.provenance import stop_training

        try:
            self.max_minutes = _positive_float(MAX_MINUTES_VARIABLE)
            self.plateau_min_gain = _positive_float(PLATEAU_VARIABLE)
            save_every = _positive_float(SAVE_EVERY_VARIABLE)
        except ValueError as e:
            stop_training(self, str(e))
        if save_every is not None:
            self.save_every = max(1, int(save_every))
        if self.max_minutes is not None or self.plateau_min_gain is not None:
            self.record_with_model("stopping", {"max_minutes": self.max_minutes,
                                                "plateau_min_gain": self.plateau_min_gain,
                                                "planned": False, "stopped": None})

    def _history(self) -> tuple[list[float], list[float], list[float]]:
        get = lambda key: [float(v) for v in self.logger.get_value(key, step=None)]  # noqa: E731
        seconds = [e - s for s, e in zip(get("epoch_start_timestamps"), get("epoch_end_timestamps"))]
        return get("mean_fg_dice"), get("ema_fg_dice"), seconds

    def _plan_to_cap(self, seconds: list[float]) -> None:
        record = dict(self.recorded("stopping") or {})
        if record.get("planned") or len(seconds) < CALIBRATION_EPOCHS:
            return
        before = self.num_epochs
        self.num_epochs = planned_epochs(seconds, self.max_minutes, len(seconds), self.num_epochs)
        if hasattr(self.lr_scheduler, "max_steps"):
            self.lr_scheduler.max_steps = self.num_epochs
        budget = self.recorded("budget")
        if budget is not None:
            self.record_with_model("budget", {**budget, "num_epochs": int(self.num_epochs)})
        pace = float(np.median(seconds[1:]))
        record.update(planned=True, planned_epochs=int(self.num_epochs), seconds_per_epoch=pace)
        self.record_with_model("stopping", record)
        self.print_to_log_file(f"nnunet-pvs stopping: {pace:.1f} s per epoch -> {self.num_epochs} epochs fit the cap "
                               f"of {self.max_minutes:g} minutes (was {before}); learning-rate schedule planned over "
                               f"{self.num_epochs} epochs")

    def on_epoch_start(self):
        self._epoch_cpu_start = time.process_time()
        super().on_epoch_start()

    def on_epoch_end(self):
        if self.max_minutes is not None or self.plateau_min_gain is not None:
            # CPU seconds of this process (all its threads) per epoch, recorded beside the wall time so
            # that an epoch slowed by other work on the machine can be recognised
            record = dict(self.recorded("stopping") or {})
            cpu = record.get("epoch_cpu_seconds", [])
            record.update(max_minutes=self.max_minutes, plateau_min_gain=self.plateau_min_gain)  # as set now (--c)
            record["epoch_cpu_seconds"] = cpu + [round(time.process_time() - getattr(self, "_epoch_cpu_start",
                                                                                       time.process_time()), 2)]
            self.record_with_model("stopping", record)
        super().on_epoch_end()  # advances current_epoch, writes checkpoints
        if self.max_minutes is None and self.plateau_min_gain is None:
            return
        dice, ema, seconds = self._history()
        if self.max_minutes is not None:
            self._plan_to_cap(seconds)
        reason = stop_reason(dice, ema, seconds, self.max_minutes, self.plateau_min_gain)
        if reason is None and self.current_epoch >= self.num_epochs:
            reason = f"planned epochs done ({self.num_epochs})"
        if reason is not None:
            record = dict(self.recorded("stopping") or {})
            record.update(stopped=reason, epochs=int(self.current_epoch), train_seconds=float(sum(seconds)))
            self.record_with_model("stopping", record)
            self.print_to_log_file(f"nnunet-pvs stopping: {reason}; {self.current_epoch} epochs, "
                                   f"{sum(seconds) / 60:.1f} minutes of training")
            # nnU-Net's loop runs to the epoch count it saw when it started; leave it here in every case
            raise _StopTraining(reason)

    def run_training(self):
        try:
            super().run_training()
        except _StopTraining:
            self.on_train_end()
