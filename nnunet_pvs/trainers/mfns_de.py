"""``nnUNetTrainerMfNSDe``: MfNS_De (Cai et al. 2024) inside nnU-Net's planning, augmentation and CV.

What differs from ``nnUNetTrainer`` and why:

* **network**: :class:`~nnunet_pvs.networks.mfns_de.MfNSDe` built from the configuration's plan
  (the paper's setting is the ``2d`` configuration: axial slices of 0.69 x 0.69 x 2 mm T2w).
* **HF deep supervision**: targets for the coarse heads are max-pooled
  (:class:`~nnunet_pvs.transforms.foreground_downsampling.DownsampleSegForDSTransformHF`) instead of
  nearest-exact sampled, in training *and* validation transforms, so thin PVS stay foreground.
* **loss**: soft Dice per scale (the paper), computed by nnU-Net's own Dice with the CE weight set
  to 0 (keeps nnU-Net's ignore-label and region handling). Scales are combined with nnU-Net's
  halving weights 1, 1/2, 1/4, ... normalised to sum 1, *without* zeroing the coarsest head as
  stock nnU-Net does: stock drops it because nearest-exact targets at that scale have lost thin
  structures; HF targets keep them, and the paper supervises every intermediate output.
* **optimiser**: Adagrad, lr 0.05, no weight decay (the paper names only optimiser and lr). The
  schedule is constant (nnU-Net's poly schedule with exponent 0): Adagrad already shrinks each
  parameter's step by its accumulated squared gradients, and the paper reports no decay.
* **batch size** 4 (the paper) instead of the plan's.
* **epoch-50 checkpoint**: the paper tested the model after 50 of its 1000 epochs, so
  ``checkpoint_epoch50.pth`` is kept beside nnU-Net's checkpoints; predict with
  ``nnUNetv2_predict ... -chk checkpoint_epoch50.pth``. One nnU-Net epoch is 250 iterations of 4
  slices (1000 slices); one paper epoch is one pass over the training slices (12 training subjects
  x ~70 slices of 2 mm, roughly 840 slices), so nnU-Net epochs are about 1.2 paper epochs and
  epoch 50 here is close to the paper's epoch 50 in samples seen.
"""

from __future__ import annotations

from os.path import join

import numpy as np
import torch
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_pvs.networks.mfns_de import default_features, mfns_de_from_plans
from nnunet_pvs.transforms.foreground_downsampling import DownsampleSegForDSTransformHF

__all__ = [
    "nnUNetTrainerMfNSDe", "nnUNetTrainerMfNSDe_DiceCE", "nnUNetTrainerMfNSDe_wide",
    "nnUNetTrainerMfNSDe_1epoch", "nnUNetTrainerMfNSDe_5epochs", "nnUNetTrainerMfNSDe_50epochs",
    "nnUNetTrainerMfNSDe_smoke",
]


def use_hf_downsampling(transforms: ComposeTransforms, foreground_labels, regions, ignore_label) -> ComposeTransforms:
    """Swap nnU-Net's nearest-exact deep-supervision downsampling for HF max-pooling, in place."""
    for k, t in enumerate(transforms.transforms):
        if isinstance(t, DownsampleSegForDSTransform):
            transforms.transforms[k] = DownsampleSegForDSTransformHF(
                t.ds_scales, foreground_labels=foreground_labels, ignore_label=ignore_label,
                regions=regions is not None, ignore_channel=regions is not None and ignore_label is not None)
    return transforms


class nnUNetTrainerMfNSDe(nnUNetTrainer):
    """MfNS_De with HF deep supervision, soft Dice and Adagrad (Cai et al. 2024); see module doc."""

    paper_batch_size = 4
    keep_checkpoint_at_epoch = 50

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 0.05
        self.weight_decay = 0.0
        # the trainer's own (deep-copied) configuration: batch size 4 wherever nnU-Net reads it,
        # for a single device and for the DDP split alike; the plans file is not touched
        self.configuration_manager.configuration["batch_size"] = self.paper_batch_size

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return mfns_de_from_plans(configuration_manager.network_arch_init_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import,
                                  num_input_channels, num_output_channels, enable_deep_supervision)

    def _deep_supervision_weights(self) -> np.ndarray:
        weights = np.array([1 / 2 ** i for i in range(len(self._get_deep_supervision_scales()))])
        return weights / weights.sum()

    def _single_scale_loss(self) -> nn.Module:
        """Soft Dice only: nnU-Net's compound losses with the cross-entropy weight at 0."""
        dice_kwargs = {"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5, "ddp": self.is_ddp}
        if self.label_manager.has_regions:
            return DC_and_BCE_loss({}, {**dice_kwargs, "do_bg": True}, weight_ce=0, weight_dice=1,
                                   use_ignore_label=self.label_manager.ignore_label is not None,
                                   dice_class=MemoryEfficientSoftDiceLoss)
        return DC_and_CE_loss({**dice_kwargs, "do_bg": False}, {}, weight_ce=0, weight_dice=1,
                              ignore_label=self.label_manager.ignore_label, dice_class=MemoryEfficientSoftDiceLoss)

    def _build_loss(self):
        loss = self._single_scale_loss()
        if self.enable_deep_supervision:
            loss = DeepSupervisionWrapper(loss, self._deep_supervision_weights())
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adagrad(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, exponent=0.0)

    @staticmethod
    def get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):
        transforms = nnUNetTrainer.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm, is_cascaded, foreground_labels, regions, ignore_label)
        return use_hf_downsampling(transforms, foreground_labels, regions, ignore_label)

    @staticmethod
    def get_validation_transforms(deep_supervision_scales, is_cascaded=False, foreground_labels=None,
                                  regions=None, ignore_label=None):
        transforms = nnUNetTrainer.get_validation_transforms(
            deep_supervision_scales, is_cascaded, foreground_labels, regions, ignore_label)
        return use_hf_downsampling(transforms, foreground_labels, regions, ignore_label)

    def on_epoch_end(self):
        super().on_epoch_end()  # advances current_epoch
        if self.current_epoch == self.keep_checkpoint_at_epoch:
            # save as of the end of that epoch, exactly as checkpoint_latest would have been
            self.current_epoch -= 1
            self.save_checkpoint(join(self.output_folder, f"checkpoint_epoch{self.keep_checkpoint_at_epoch}.pth"))
            self.current_epoch += 1


class nnUNetTrainerMfNSDe_DiceCE(nnUNetTrainerMfNSDe):
    """MfNS_De with nnU-Net's default soft Dice + cross-entropy at every scale instead of Dice alone."""

    def _single_scale_loss(self) -> nn.Module:
        loss = nnUNetTrainer._build_loss(self)
        return loss.loss if isinstance(loss, DeepSupervisionWrapper) else loss


class nnUNetTrainerMfNSDe_wide(nnUNetTrainerMfNSDe):
    """MfNS_De with nnU-Net-like widths (32, 64, ... capped at 512) instead of DNANet's 16..256."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision=True):
        n_stages = len(configuration_manager.network_arch_init_kwargs["strides"])
        return mfns_de_from_plans(configuration_manager.network_arch_init_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import,
                                  num_input_channels, num_output_channels, enable_deep_supervision,
                                  features_per_stage=default_features(n_stages, base=32, maximum=512))


class nnUNetTrainerMfNSDe_1epoch(nnUNetTrainerMfNSDe):
    """One nnU-Net epoch (250 iterations): checks a plan end to end."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1


class nnUNetTrainerMfNSDe_5epochs(nnUNetTrainerMfNSDe):
    """Five nnU-Net epochs: a quick look at a dataset."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class nnUNetTrainerMfNSDe_50epochs(nnUNetTrainerMfNSDe):
    """Stops where the paper took its test model (epoch 50), so checkpoint_final is that model."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 50


class nnUNetTrainerMfNSDe_smoke(nnUNetTrainerMfNSDe):
    """Smoke-test budget for CPUs and CI: 2 epochs of 2 iterations, 1 validation iteration; keeps
    ``checkpoint_epoch1.pth`` so the kept-epoch checkpoint path is exercised too. Not for results."""

    keep_checkpoint_at_epoch = 1

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
