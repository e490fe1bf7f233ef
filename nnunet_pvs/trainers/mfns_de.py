"""``nnUNetTrainerMfNSDe``: MfNS_De (Cai et al. 2024) inside nnU-Net's planning, augmentation and CV.

What differs from ``nnUNetTrainer`` and why:

* **network**: :class:`~nnunet_pvs.networks.mfns_de.MfNSDe` in DNANet's configuration (Li et al.,
  IEEE TIP 2023, whose network MfNS_De extends): 5 levels, widths 16..256, one ResCBAM block per node
  on level 0 and in the pyramid fusion, two on levels 1-4 (DNANet's default ``resnet_18``). From the
  plan it takes the first five stages' strides and kernels and the plan's conv, norm and nonlin ops
  (as nnU-Net builds every network; DNANet itself uses batch norm and ReLU); the plan's network
  class is not used, and the training log says so. Variants: ``_lite`` (one block per node,
  DNANet's ``resnet_10``) and ``_planDepth`` (every stage of the plan, one block per node). The
  paper's setting is the ``2d`` configuration (axial slices of 0.69 x 0.69 x 2 mm T2w); a 3D
  configuration gets a warning.
* **deep supervision** follows the depth: one head per level 0 .. L-2, and
  ``_get_deep_supervision_scales`` keeps nnU-Net's first L-1 scales, so the HF targets match.
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

import warnings
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

from nnunet_pvs.networks.mfns_de import MfNSDe, default_features, mfns_de_from_plans
from nnunet_pvs.trainers.provenance import PluginProvenanceMixin
from nnunet_pvs.transforms.foreground_downsampling import DownsampleSegForDSTransformHF

__all__ = [
    "nnUNetTrainerMfNSDe", "nnUNetTrainerMfNSDe_lite", "nnUNetTrainerMfNSDe_planDepth", "nnUNetTrainerMfNSDe_DiceCE", "nnUNetTrainerMfNSDe_wide",
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


def _name(op) -> str:
    """Short name of a plan op given as an import string or a class."""
    if op is None:
        return "none"
    return op.rsplit(".", 1)[-1] if isinstance(op, str) else op.__name__


class nnUNetTrainerMfNSDe(PluginProvenanceMixin, nnUNetTrainer):
    """MfNS_De with HF deep supervision, soft Dice and Adagrad (Cai et al. 2024); see module doc."""

    paper_batch_size = 4
    #: resolution levels of the node grid (DNANet: 5); None = every stage of the plan
    network_levels: int | None = 5
    #: ResCBAM blocks per node on levels 1 .. L-1 (DNANet's default ``resnet_18``: 2); level 0 and
    #: the pyramid-fusion node always have one, as in DNANet
    blocks_below_top: int = 2
    #: widths: ``feature_base`` doubled per level, capped (DNANet: 16 .. 256)
    feature_base: int = 16
    feature_cap: int = 256
    keep_checkpoint_at_epoch = 50

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 0.05
        self.weight_decay = 0.0
        # the trainer's own (deep-copied) configuration: batch size 4 wherever nnU-Net reads it,
        # for a single device and for the DDP split alike; the plans file is not touched
        self.configuration_manager.configuration["batch_size"] = self.paper_batch_size

    @classmethod
    def network_depth(cls, configuration_manager: ConfigurationManager) -> int:
        """Levels of the node grid: ``network_levels``, or fewer if the plan has fewer stages."""
        n_plan = len(configuration_manager.network_arch_init_kwargs["strides"])
        return n_plan if cls.network_levels is None else min(cls.network_levels, n_plan)

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> MfNSDe:
        """A classmethod (nnU-Net calls it on the class at prediction), so variants set only attributes."""
        levels = cls.network_depth(configuration_manager)
        return mfns_de_from_plans(configuration_manager.network_arch_init_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import,
                                  num_input_channels, num_output_channels, enable_deep_supervision,
                                  features_per_stage=default_features(levels, cls.feature_base, cls.feature_cap),
                                  n_levels=levels, blocks_per_level=[1] + [cls.blocks_below_top] * (levels - 1),
                                  fusion_blocks=1)

    def initialize(self):
        first_time = not self.was_initialized
        super().initialize()
        if first_time:
            for line in self.network_origin():
                self.print_to_log_file(line)
            if len(self.configuration_manager.patch_size) == 3:
                msg = (f"MfNS_De is a 2D method (Cai et al. 2024 segment axial slices); configuration "
                       f"'{self.configuration_name}' is 3D, so this runs a 3D variant the paper never tested. "
                       f"Use the '2d' configuration for the published method.")
                warnings.warn(msg, stacklevel=2)
                self.print_to_log_file("WARNING: " + msg, also_print_to_console=True)

    def network_origin(self) -> list[str]:
        """What was built from which plan parts, for the training log: nnU-Net names the output folder
        after the plan (e.g. ``..._nnUNetResEncUNetMPlans__2d``) and logs the plan's network class,
        neither of which is the network trained here."""
        arch = self.configuration_manager.network_arch_init_kwargs
        levels = self.network_depth(self.configuration_manager)
        net = self.network.module if self.is_ddp else self.network
        net = getattr(net, "_orig_mod", net)  # under torch.compile
        plan_class = self.configuration_manager.network_arch_class_name
        return [
            f"Network: MfNS_De ({type(net).__module__}.{type(net).__name__}), built by {type(self).__name__}; "
            f"the plan's network class {plan_class} is NOT used (nor its features_per_stage or blocks per stage).",
            f"From plans '{self.plans_manager.plans_name}', configuration '{self.configuration_name}': the first "
            f"{levels} of {len(arch['strides'])} stages, strides {list(map(list, arch['strides'][:levels]))}, "
            f"kernels {list(map(list, arch['kernel_sizes'][:levels]))}, conv {_name(arch['conv_op'])}, "
            f"norm {_name(arch.get('norm_op'))} {arch.get('norm_op_kwargs')}, "
            f"nonlin {_name(arch.get('nonlin'))} {arch.get('nonlin_kwargs')}.",
            f"MfNS_De's own: widths {net.features_per_stage}, ResCBAM blocks per node by level {net.blocks_per_level} "
            f"(pyramid fusion: 1), {net.num_outputs} outputs (deep-supervision scales "
            f"{[list(map(float, s)) for s in self._get_deep_supervision_scales() or []]}), "
            f"{sum(p.numel() for p in net.parameters()):,} parameters.",
        ]

    def _get_deep_supervision_scales(self):
        """nnU-Net's scales (cumulative plan strides), one per head: the first ``depth - 1``."""
        scales = super()._get_deep_supervision_scales()
        return None if scales is None else scales[:self.network_depth(self.configuration_manager) - 1]

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


class nnUNetTrainerMfNSDe_lite(nnUNetTrainerMfNSDe):
    """MfNS_De with one ResCBAM block per node everywhere: DNANet's ``resnet_10`` setting."""

    blocks_below_top = 1


class nnUNetTrainerMfNSDe_planDepth(nnUNetTrainerMfNSDe):
    """MfNS_De with as many levels as the plan has stages (7 for 320 x 320 slices), one block per node."""

    network_levels = None
    blocks_below_top = 1


class nnUNetTrainerMfNSDe_DiceCE(nnUNetTrainerMfNSDe):
    """MfNS_De with nnU-Net's default soft Dice + cross-entropy at every scale instead of Dice alone."""

    def _single_scale_loss(self) -> nn.Module:
        loss = nnUNetTrainer._build_loss(self)
        return loss.loss if isinstance(loss, DeepSupervisionWrapper) else loss


class nnUNetTrainerMfNSDe_wide(nnUNetTrainerMfNSDe):
    """MfNS_De with nnU-Net-like widths (32, 64, ... capped at 512) instead of DNANet's 16..256."""

    feature_base = 32
    feature_cap = 512


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
