"""Stopping rules of the ``_budget`` trainers: the time cap with a schedule planned to fit it, and the plateau.

The rules are pure functions of the epoch history (tested against hand-computed cases); the mixin is
tested on a minimal stand-in for nnU-Net's trainer loop, which checks that training leaves the loop
early, ends through ``on_train_end`` and plans the poly schedule to the cap.
"""

from __future__ import annotations

import pytest

from nnunet_pvs.trainers import stopping
from nnunet_pvs.trainers.stopping import plateau_gain, planned_epochs, stop_reason


def test_plateau_gain_is_the_trend_over_the_last_fifth():
    assert plateau_gain([0.1] * 9) is None
    # 10 epochs, rising 0.01 per epoch: the trend over the last 5 epochs gains 0.02 over the last 2
    assert plateau_gain([0.01 * k for k in range(10)]) == pytest.approx(0.02)
    # 20 epochs: trend over the last 8, projected over the last 4; a flat tail with symmetric noise around 0.5
    assert plateau_gain([0.3] * 12 + [0.5, 0.52, 0.48, 0.5, 0.5, 0.48, 0.52, 0.5]) == pytest.approx(0.0, abs=1e-12)
    # an EMA-like lagging curve of a rising Dice is still seen rising by the raw values it lags behind
    raw = [0.47, 0.52, 0.50, 0.54, 0.53, 0.52, 0.51, 0.55, 0.53, 0.54, 0.56, 0.58]
    assert plateau_gain(raw) > 0.01


def test_stop_reason_plateau_cap_and_not_learning():
    rising = [0.05 * k for k in range(12)]
    flat = [0.3] * 8 + [0.301, 0.302, 0.303, 0.303]
    assert stop_reason(rising, rising, [10] * 12, None, 0.01) is None
    assert stop_reason(flat, flat, [10] * 12, None, 0.01).startswith("plateau")
    # a flat zero is not a plateau: the model has not learned yet
    assert stop_reason([0.0] * 20, [0.0] * 20, [10] * 20, None, 0.01) is None
    # cap: 12 epochs x 10 s = 2 minutes
    assert stop_reason(rising, rising, [10] * 12, 2.0, 0.01).startswith("time cap reached")
    assert stop_reason(rising, rising, [10] * 12, 2.1, 0.01) is None


def test_planned_epochs_leave_out_the_warm_up_and_fit_the_cap():
    # first epoch 100 s (warm-up), then 20 s per epoch; cap 10 min = 600 s; 140 s spent in 3 epochs
    # -> (600 - 140) // 20 = 23 more epochs -> 26
    assert planned_epochs([100, 20, 20], 10, 3, 1000) == 26
    assert planned_epochs([100, 20, 20], 10, 3, 12) == 12  # never more than planned
    assert planned_epochs([100, 500, 500], 10, 3, 1000) == 4  # at least one more epoch


class _Logger:
    def __init__(self):
        self.values = {"epoch_start_timestamps": [], "epoch_end_timestamps": [], "ema_fg_dice": [], "mean_fg_dice": []}

    def get_value(self, key, step):
        return self.values[key] if step is None else self.values[key][step]


class _Scheduler:
    max_steps = 1000


class _FakeTrainer:
    """What the mixin uses of nnU-Net's trainer: the epoch loop, the logger, the scheduler, the record."""

    def __init__(self, dice_per_epoch, seconds_per_epoch):
        self.num_epochs, self.current_epoch, self.save_every = 1000, 0, 50
        self.logger, self.lr_scheduler, self.my_init_kwargs = _Logger(), _Scheduler(), {}
        self.dice, self.seconds, self.ended, self.lines = dice_per_epoch, seconds_per_epoch, False, []
        self.budget = {"num_epochs": 1000}

    def record_with_model(self, key, value):
        self.my_init_kwargs.setdefault("nnunet_pvs", {})[key] = value

    def recorded(self, key, default=None):
        return self.my_init_kwargs.get("nnunet_pvs", {}).get(key, default)

    def print_to_log_file(self, *args, **kwargs):
        self.lines.append(" ".join(map(str, args)))

    def on_epoch_end(self):
        e = self.current_epoch
        self.logger.values["epoch_start_timestamps"].append(float(sum(self.seconds[:e])))
        self.logger.values["epoch_end_timestamps"].append(float(sum(self.seconds[:e + 1])))
        self.logger.values["ema_fg_dice"].append(self.dice[e])
        self.logger.values["mean_fg_dice"].append(self.dice[e])
        self.current_epoch += 1

    def run_training(self):
        for _ in range(self.current_epoch, self.num_epochs):
            self.on_epoch_end()
        self.on_train_end()

    def on_train_end(self):
        self.ended = True


class _Stopping(stopping.StoppingRulesMixin, _FakeTrainer):
    pass


def test_mixin_stops_at_the_plateau_and_ends_like_a_finished_run(monkeypatch):
    monkeypatch.setenv(stopping.PLATEAU_VARIABLE, "0.01")
    monkeypatch.delenv(stopping.MAX_MINUTES_VARIABLE, raising=False)
    dice = [0.1 * k for k in range(6)] + [0.5] * 100
    t = _Stopping(dice, [1.0] * 106)
    t.run_training()
    # epochs 0..5 rise by 0.1 to 0.5, then flat; the trend window (last max(5, ceil(2n/5)) epochs) is
    # flat once it starts at epoch 5 or later: at n = 10 it covers epochs 5..9 -> stop after 10 epochs
    assert t.current_epoch == 10 and t.ended
    assert t.recorded("stopping")["stopped"].startswith("plateau")


def test_mixin_plans_the_schedule_to_the_cap(monkeypatch):
    monkeypatch.setenv(stopping.MAX_MINUTES_VARIABLE, "1")  # 60 s
    monkeypatch.delenv(stopping.PLATEAU_VARIABLE, raising=False)
    t = _Stopping([0.1 * k for k in range(100)], [10.0, 5.0, 5.0] + [5.0] * 97)
    t.run_training()
    # after 3 epochs (20 s): 5 s per epoch -> 40 s left -> 8 more -> 11 epochs, schedule over 11
    assert t.num_epochs == 11 and t.lr_scheduler.max_steps == 11
    assert t.current_epoch == 11 and t.ended
    assert t.recorded("stopping")["planned_epochs"] == 11


def test_bad_values_stop_with_one_line(monkeypatch, capsys):
    monkeypatch.setenv(stopping.MAX_MINUTES_VARIABLE, "soon")
    with pytest.raises(SystemExit) as e:
        _Stopping([], [])
    assert e.value.code == 2
    assert "NNUNET_PVS_MAX_MINUTES='soon': must be a positive number" in capsys.readouterr().err
