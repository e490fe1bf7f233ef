"""``nnUNetTrainerAEUNet``: the autoencoder-pretrained 3D U-Net of Boutinaud et al. (2021) in nnU-Net.

Boutinaud P, Tsuchida A, Laurent A, et al. "3D Segmentation of Perivascular Spaces on T1-Weighted
3 Tesla MR Images With a Convolutional Autoencoder and a U-Shaped Neural Network".
Front. Neuroinform. 15:641600, 2021. doi:10.3389/fninf.2021.641600

What differs from ``nnUNetTrainer`` and why:

* **network**: the 8.7.2 U-Net (:mod:`nnunet_pvs.networks.ae_unet`): 8 initial kernels, 7 stages,
  2 conv blocks per stage, max pooling, dropout 0.1, nearest-neighbour upsampling, sigmoid output,
  Glorot-uniform init. Strides follow the plan; stages beyond the plan's are added while the patch
  allows (paper: 7). Encoder weights come from ``nnunet-pvs pretrain-autoencoder`` through stock
  ``-pretrained_weights``; without it, this trainer is the paper's "no autoencoder" ablation.
* **sigmoid on a binary task**: nnU-Net gives a binary task 2 output channels with softmax. The
  network returns ``[-z/2, z/2]`` for its one foreground logit ``z``, so nnU-Net's softmax
  foreground channel *is* ``sigmoid(z)`` and its argmax is the paper's threshold 0.5. Datasets with
  more than one foreground label, regions or an ignore label are refused at ``initialize()``.
* **loss**: soft Dice on the foreground probability only (the paper's Keras Dice loss): nnU-Net's
  ``MemoryEfficientSoftDiceLoss`` on the softmax (= sigmoid) foreground channel, background
  excluded, batch Dice (Keras flattens the whole batch), cross-entropy weight 0.
* **optimiser**: Adam, lr 1e-3, beta1 0.9, beta2 0.999, no decay (the paper: Keras defaults,
  decay 0), constant learning rate.
* **batch size** 2 (the paper) instead of the plan's; **deep supervision** off (the paper has none).

nnU-Net's patch sampling, augmentation, z-score intensity normalisation, sliding-window inference,
mirroring and fold ensembling are kept; the deviations are listed in ``docs/ae_unet.md``.
"""

from __future__ import annotations

import torch
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import softmax_helper_dim1
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_pvs.networks.ae_unet import (PAPER_DROPOUT, PAPER_N_CONVS, PAPER_N_KERNELS_INIT, PAPER_N_STAGES,
                                         ae_unet_from_plans)

__all__ = [
    "nnUNetTrainerAEUNet", "nnUNetTrainerAEUNet_1epoch", "nnUNetTrainerAEUNet_5epochs",
    "nnUNetTrainerAEUNet_200epochs", "nnUNetTrainerAEUNet_smoke",
]


class nnUNetTrainerAEUNet(nnUNetTrainer):
    """Boutinaud et al. (2021) 8.7.2 U-Net, Dice loss, Adam, batch 2, no deep supervision; see module doc."""

    n_kernels_init = PAPER_N_KERNELS_INIT
    n_stages = PAPER_N_STAGES
    n_convs = PAPER_N_CONVS
    dropout = PAPER_DROPOUT
    paper_batch_size = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3
        self.weight_decay = 0.0
        self.enable_deep_supervision = False
        # the trainer's own (deep-copied) configuration; the plans file is not touched
        self.configuration_manager.configuration["batch_size"] = self.paper_batch_size

    def initialize(self):
        self.check_binary_task(self.label_manager, self.plans_manager.dataset_name)
        if len(self.configuration_manager.patch_size) != 3:
            raise RuntimeError(f"{self.__class__.__name__}: configuration '{self.configuration_name}' is "
                               f"{len(self.configuration_manager.patch_size)}D; the Boutinaud U-Net is 3D "
                               f"(use 3d_fullres)")
        super().initialize()

    @staticmethod
    def check_binary_task(label_manager, dataset_name: str = "dataset") -> None:
        """Refuse anything but one foreground label without regions or ignore label."""
        problems = []
        if label_manager.has_regions:
            problems.append("region-based labels")
        if label_manager.ignore_label is not None:
            problems.append(f"an ignore label ({label_manager.ignore_label})")
        if len(label_manager.foreground_labels) != 1:
            problems.append(f"{len(label_manager.foreground_labels)} foreground labels "
                            f"{list(label_manager.foreground_labels)}")
        if problems:
            raise RuntimeError(
                f"nnUNetTrainerAEUNet segments one foreground class with a sigmoid output (Boutinaud et al. "
                f"2021), but {dataset_name}'s dataset.json has {', '.join(problems)}. Use a binary dataset "
                f"(labels background: 0 and one foreground label) without regions or ignore label.")

    @classmethod
    def _build(cls, configuration_manager: ConfigurationManager, num_input_channels: int,
               num_output_channels: int, skips: bool) -> nn.Module:
        return ae_unet_from_plans(configuration_manager, num_input_channels, num_output_channels,
                                  cls.n_kernels_init, cls.n_stages, cls.n_convs, cls.dropout, skips)

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        # the network has no deep-supervision heads; its state dict is the same either way
        return nnUNetTrainerAEUNet._build(configuration_manager, num_input_channels, num_output_channels, True)

    @classmethod
    def build_autoencoder(cls, configuration_manager: ConfigurationManager, num_input_channels: int) -> nn.Module:
        """The same network without skip connections, reconstructing its input (the paper's autoencoder)."""
        return cls._build(configuration_manager, num_input_channels, 2, False)

    def _build_loss(self):
        return MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=True, do_bg=False,
                                           smooth=1e-5, ddp=self.is_ddp)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr, betas=(0.9, 0.999),
                                     weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, exponent=0.0)

    def set_deep_supervision_enabled(self, enabled: bool):
        # stock calls this with True after its final validation; the network has one output only
        super().set_deep_supervision_enabled(False)


class nnUNetTrainerAEUNet_1epoch(nnUNetTrainerAEUNet):
    """One nnU-Net epoch (250 iterations of batch 2): checks a plan end to end."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1


class nnUNetTrainerAEUNet_5epochs(nnUNetTrainerAEUNet):
    """Five nnU-Net epochs (5 x 250 iterations): a quick look at a dataset."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class nnUNetTrainerAEUNet_200epochs(nnUNetTrainerAEUNet):
    """200 epochs: the paper's pretrained U-Nets usually converged in under 200 of its epochs."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 200


class nnUNetTrainerAEUNet_smoke(nnUNetTrainerAEUNet):
    """Smoke-test budget for CPUs and CI: 2 epochs of 2 iterations, 1 validation iteration. Not for results."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
