"""Trainers whose training budget comes from the environment, for equal-budget comparisons.

``nnUNetv2_train`` has no epochs option, and a head-to-head comparison must give every model the
same budget. The ``*_budget`` trainers read it from ``NNUNET_PVS_EPOCHS``,
``NNUNET_PVS_ITERATIONS`` (per epoch) and ``NNUNET_PVS_VAL_ITERATIONS`` when a run starts; unset
variables keep the parent trainer's budget (nnU-Net's 1000 epochs x 250 iterations, 50
validation iterations). The name states that the budget is not the paper's.

The budget is stored with the run (``init_args["nnunet_pvs"]["budget"]`` of every checkpoint), so
``nnUNetv2_train ... --c`` continues with the recorded budget whether or not the variables are
set, and a finished fold stays finished. A variable set on ``--c`` to a value other than the
recorded one stops the run with a message, unless ``NNUNET_PVS_RESUME_BUDGET=environment`` asks to
change the budget (logged). ``nnunet-pvs demo`` and the scripts of ``nnunet-pvs compare
--emit-slurm`` set the variables. The same trainers stop at a time cap or a plateau when
``NNUNET_PVS_MAX_MINUTES`` / ``NNUNET_PVS_STOP_AT_PLATEAU`` are set (:mod:`nnunet_pvs.trainers.stopping`).
"""

from __future__ import annotations

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_pvs.trainers.ae_unet import nnUNetTrainerAEUNet
from nnunet_pvs.trainers.mfns_de import (nnUNetTrainerMfNSDe, nnUNetTrainerMfNSDe_lite,
                                         nnUNetTrainerMfNSDe_planDepth)
from nnunet_pvs.trainers.provenance import PluginProvenanceMixin, peek_checkpoint_record, stop_training
from nnunet_pvs.trainers.stopping import StoppingRulesMixin

__all__ = ["nnUNetTrainer_budget", "nnUNetTrainerMfNSDe_budget", "nnUNetTrainerMfNSDe_lite_budget",
           "nnUNetTrainerMfNSDe_planDepth_budget", "nnUNetTrainerAEUNet_budget"]

BUDGET_VARIABLES = {
    "NNUNET_PVS_EPOCHS": "num_epochs",
    "NNUNET_PVS_ITERATIONS": "num_iterations_per_epoch",
    "NNUNET_PVS_VAL_ITERATIONS": "num_val_iterations_per_epoch",
}
RESUME_VARIABLE = "NNUNET_PVS_RESUME_BUDGET"


def env_budget() -> dict[str, int]:
    """The ``NNUNET_PVS_*`` variables that are set, as ``{variable: positive int}``."""
    out = {}
    for var in BUDGET_VARIABLES:
        raw = os.environ.get(var)
        if raw is None or raw == "":
            continue
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{var}={raw!r}: must be a positive integer")
        out[var] = value
    return out


def apply_env_budget(trainer) -> dict[str, int]:
    """Set epochs/iterations of ``trainer`` from the ``NNUNET_PVS_*`` variables that are set; return them."""
    budget = env_budget()
    for var, value in budget.items():
        setattr(trainer, BUDGET_VARIABLES[var], value)
    return budget


def budget_of(trainer) -> dict[str, int]:
    return {attr: int(getattr(trainer, attr)) for attr in BUDGET_VARIABLES.values()}


def describe(budget: dict[str, int]) -> str:
    return (f"{budget['num_epochs']} epochs x {budget['num_iterations_per_epoch']} iterations, "
            f"{budget['num_val_iterations_per_epoch']} validation iterations per epoch")


class BudgetFromEnvironmentMixin(StoppingRulesMixin, PluginProvenanceMixin):
    """Budget from ``NNUNET_PVS_*`` at the start of a run, the recorded budget on ``--c`` (module doc);
    with a time cap and stop-at-plateau when asked (:mod:`nnunet_pvs.trainers.stopping`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        try:
            self._env_budget = apply_env_budget(self)
        except ValueError as e:
            stop_training(self, str(e))
        self.record_with_model("budget", budget_of(self))

    def _budget_source(self) -> str:
        if not self._env_budget:
            return "the trainer's defaults (no NNUNET_PVS_* variable set)"
        return ", ".join(f"{k}={v}" for k, v in self._env_budget.items())

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        recorded = None
        if isinstance(filename_or_checkpoint, str):
            recorded = (peek_checkpoint_record(filename_or_checkpoint) or {}).get("budget")
        elif isinstance(filename_or_checkpoint, dict):
            recorded = ((filename_or_checkpoint.get("init_args") or {}).get("nnunet_pvs") or {}).get("budget")
        if recorded is not None:
            recorded = {k: int(v) for k, v in recorded.items()}
            differs = {var: (recorded[attr], self._env_budget[var]) for var, attr in BUDGET_VARIABLES.items()
                       if var in self._env_budget and self._env_budget[var] != recorded[attr]}
            if differs and os.environ.get(RESUME_VARIABLE) != "environment":
                what = ", ".join(f"{var}={new} but the run was recorded with {old}" for var, (old, new) in differs.items())
                stop_training(self, f"{filename_or_checkpoint}: {what}. Unset the variable(s) to continue with the "
                                    f"recorded budget ({describe(recorded)}), or set {RESUME_VARIABLE}=environment "
                                    f"to change it")
            # the recorded budget, except where a variable asks for a change (allowed just above)
            for var, attr in BUDGET_VARIABLES.items():
                setattr(self, attr, self._env_budget.get(var, recorded[attr]))
        # initialises (optimizer, lr schedule) with the budget chosen above, restores the record
        super().load_checkpoint(filename_or_checkpoint)
        now = budget_of(self)
        if recorded is None:
            self._resume_note = "the checkpoint has no recorded budget (older version); " + self._budget_source()
        elif now != recorded:
            self._resume_note = (f"changed on resume from {describe(recorded)} ({RESUME_VARIABLE}=environment, "
                                 f"{self._budget_source()})")
        else:
            self._resume_note = "the recorded budget"
        self.print_to_log_file(f"nnunet-pvs budget: continuing with {describe(now)}: {self._resume_note}")
        self.record_with_model("budget", now)

    def on_train_start(self):
        super().on_train_start()
        note = getattr(self, "_resume_note", None)
        source = (f"{note}; resuming at epoch {self.current_epoch}" if note is not None
                  else f"from {self._budget_source()}, recorded with the run")
        self.print_to_log_file(f"nnunet-pvs budget: {describe(budget_of(self))} ({source})")


class nnUNetTrainer_budget(BudgetFromEnvironmentMixin, nnUNetTrainer):
    """Stock nnU-Net with the budget from ``NNUNET_PVS_*`` (the baseline of budget-matched runs)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class nnUNetTrainerMfNSDe_budget(BudgetFromEnvironmentMixin, nnUNetTrainerMfNSDe):
    """MfNS_De with the budget from ``NNUNET_PVS_*``."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class nnUNetTrainerMfNSDe_lite_budget(BudgetFromEnvironmentMixin, nnUNetTrainerMfNSDe_lite):
    """``nnUNetTrainerMfNSDe_lite`` with the budget from ``NNUNET_PVS_*``."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class nnUNetTrainerMfNSDe_planDepth_budget(BudgetFromEnvironmentMixin, nnUNetTrainerMfNSDe_planDepth):
    """``nnUNetTrainerMfNSDe_planDepth`` with the budget from ``NNUNET_PVS_*``."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)


class nnUNetTrainerAEUNet_budget(BudgetFromEnvironmentMixin, nnUNetTrainerAEUNet):
    """Autoencoder-pretrained U-Net with the budget from ``NNUNET_PVS_*``."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
