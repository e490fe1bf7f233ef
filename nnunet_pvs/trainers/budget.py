"""Trainers whose training budget comes from the environment, for equal-budget comparisons.

``nnUNetv2_train`` has no epochs option, and a head-to-head comparison must give every model the
same budget. The ``*_budget`` trainers read it from ``NNUNET_PVS_EPOCHS``,
``NNUNET_PVS_ITERATIONS`` (per epoch) and ``NNUNET_PVS_VAL_ITERATIONS``; unset variables keep
nnU-Net's defaults (1000 epochs x 250 iterations, 50 validation iterations). The demo and
``nnunet-pvs slurm`` scripts set them; the name states that the budget is not the paper's.
"""

from __future__ import annotations

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_pvs.trainers.ae_unet import nnUNetTrainerAEUNet
from nnunet_pvs.trainers.mfns_de import nnUNetTrainerMfNSDe

__all__ = ["nnUNetTrainer_budget", "nnUNetTrainerMfNSDe_budget", "nnUNetTrainerAEUNet_budget"]

BUDGET_VARIABLES = {
    "NNUNET_PVS_EPOCHS": "num_epochs",
    "NNUNET_PVS_ITERATIONS": "num_iterations_per_epoch",
    "NNUNET_PVS_VAL_ITERATIONS": "num_val_iterations_per_epoch",
}


def apply_env_budget(trainer: nnUNetTrainer) -> None:
    """Set epochs/iterations of ``trainer`` from the ``NNUNET_PVS_*`` variables that are set."""
    for var, attr in BUDGET_VARIABLES.items():
        raw = os.environ.get(var)
        if raw is None or raw == "":
            continue
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{var}={raw!r}: must be a positive integer")
        setattr(trainer, attr, value)


class nnUNetTrainer_budget(nnUNetTrainer):
    """Stock nnU-Net with the budget from ``NNUNET_PVS_*`` (the baseline of budget-matched runs)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_env_budget(self)


class nnUNetTrainerMfNSDe_budget(nnUNetTrainerMfNSDe):
    """MfNS_De with the budget from ``NNUNET_PVS_*``."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_env_budget(self)


class nnUNetTrainerAEUNet_budget(nnUNetTrainerAEUNet):
    """Autoencoder-pretrained U-Net with the budget from ``NNUNET_PVS_*``."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_env_budget(self)
