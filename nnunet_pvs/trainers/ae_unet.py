"""``nnUNetTrainerAEUNet``: the autoencoder-pretrained 3D U-Net of Boutinaud et al. (2021) in nnU-Net.

Boutinaud P, Tsuchida A, Laurent A, et al. "3D Segmentation of Perivascular Spaces on T1-Weighted
3 Tesla MR Images With a Convolutional Autoencoder and a U-Shaped Neural Network".
Front. Neuroinform. 15:641600, 2021. doi:10.3389/fninf.2021.641600

What differs from ``nnUNetTrainer`` and why:

* **network**: the 8.7.2 U-Net (:mod:`nnunet_pvs.networks.ae_unet`): 8 initial kernels, 7 stages
  each pooling once (to a 1 x 1 x 1 x 512 bottleneck at the paper's 160 x 214 x 176), 2 conv blocks
  per level, max pooling, dropout 0.1, nearest-neighbour upsampling, sigmoid output, Glorot-uniform
  init. Strides follow the plan; stages beyond the plan's are added while the patch allows, and the
  training log says how many were built and why. Encoder weights come from ``nnunet-pvs
  pretrain-autoencoder`` through stock ``-pretrained_weights``, checked against this run (dataset,
  configuration, plans, patch, architecture) before nnU-Net loads them; without it, this trainer is
  the paper's "no autoencoder" ablation.
* **model selection**: besides nnU-Net's ``checkpoint_best.pth`` (best EMA pseudo Dice) the trainer
  keeps ``checkpoint_best_loss.pth``, the epoch with the lowest validation loss (the paper's choice;
  ``nnUNetv2_predict -chk checkpoint_best_loss.pth``).
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

import os
import sys

import numpy as np
import torch
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import softmax_helper_dim1
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_pvs.networks.ae_unet import (PAPER_DROPOUT, PAPER_N_CONVS, PAPER_N_KERNELS_INIT, PAPER_N_STAGES,
                                         ae_unet_from_plans, architecture_record, depth_summary)
from nnunet_pvs.trainers.provenance import PluginProvenanceMixin, stop_training

__all__ = [
    "nnUNetTrainerAEUNet", "nnUNetTrainerAEUNet_1epoch", "nnUNetTrainerAEUNet_5epochs",
    "nnUNetTrainerAEUNet_200epochs", "nnUNetTrainerAEUNet_smoke",
]


BEST_LOSS_CHECKPOINT = "checkpoint_best_loss.pth"


def pretrained_weights_argument(argv: list[str] | None = None) -> str | None:
    """The ``-pretrained_weights`` file of the running ``nnUNetv2_train`` command, if any.

    nnU-Net loads it right after ``initialize()``, by direct import, and a mismatch ends in an
    assertion that dumps whole tensors; the command line is the only place the trainer can learn
    the file from beforehand.
    """
    argv = sys.argv if argv is None else argv
    if not argv or not os.path.basename(argv[0]).startswith("nnUNetv2_train"):
        return None
    for i, a in enumerate(argv[1:], 1):
        if a == "-pretrained_weights" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("-pretrained_weights="):
            return a.split("=", 1)[1]
    return None


def pretrained_weights_problem(path: str, network: nn.Module, run: dict) -> tuple[str | None, str | None]:
    """``(error, note)`` for loading ``path`` into ``network``: an error when nnU-Net's loader would
    fail (one line saying what differs), a note when it fits but was made for another run."""
    x = lambda v: " x ".join(map(str, v))  # noqa: E731
    if not os.path.isfile(path):
        return f"-pretrained_weights {path}: file not found", None
    from nnunet_pvs.safe_files import UnsafeFileError, load_checkpoint

    try:
        ck = load_checkpoint(path)
    except UnsafeFileError as e:  # nnU-Net's own loader would run its code: stop before it does
        return f"-pretrained_weights {e}", None
    except Exception as e:  # not a torch file: pickle, zip and torch raise many types
        return f"-pretrained_weights {path}: cannot be read as a checkpoint ({type(e).__name__}: {e})", None
    weights = ck.get("network_weights") if isinstance(ck, dict) else None
    if not isinstance(weights, dict):
        return f"-pretrained_weights {path}: has no 'network_weights' (not an nnU-Net / pretrain-autoencoder file)", None
    made = ck.get("pretraining") or {}
    differs = []
    for key, label in (("dataset", "dataset"), ("configuration", "configuration"), ("plans", "plans"),
                       ("patch_size", "patch")):
        if key not in made:
            continue
        file_value, run_value = made[key], run[key]
        if key == "patch_size":
            file_value, run_value = x(file_value), x(run_value)
        if file_value != run_value:
            differs.append(f"{label} {file_value} in the file, {run_value} here")
    arch_file, arch_here = made.get("architecture"), run.get("architecture")
    if arch_file and arch_here and arch_file["n_stages"] != arch_here["n_stages"]:
        differs.append(f"{arch_file['n_stages']} stages in the file, {arch_here['n_stages']} here")
    own = network.state_dict()
    missing = [k for k in own if ".seg_layers." not in k and k not in weights]
    shape = [k for k in own if ".seg_layers." not in k and k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    made_for = (f" (made by pretrain-autoencoder for {made.get('dataset')} {made.get('configuration')} "
                f"{made.get('plans')})") if made else ""
    if missing or shape:
        k = (shape or missing)[0]
        tensor = (f"{k} is {x(weights[k].shape)} in the file, {x(own[k].shape)} here" if shape
                  else f"{len(missing)} tensor(s) of this network are not in the file, e.g. {k}")
        what = "; ".join(differs) if differs else tensor
        return (f"-pretrained_weights {path}{made_for} does not fit this run ({run['dataset']} "
                f"{run['configuration']} {run['plans']}): {what}" + (f"; {tensor}" if differs else "")
                + f". Pretrain for this run: nnunet-pvs pretrain-autoencoder -d {run['dataset']} -c "
                f"{run['configuration']} -p {run['plans']} --unlabeled DIR -o FILE"), None
    if differs:
        return None, (f"-pretrained_weights {path}{made_for}: " + "; ".join(differs)
                      + "; its tensors fit this network and are loaded")
    return None, None


class nnUNetTrainerAEUNet(PluginProvenanceMixin, nnUNetTrainer):
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
        try:
            self.check_binary_task(self.label_manager, self.plans_manager.dataset_name)
        except RuntimeError as e:
            stop_training(self, str(e))
        if len(self.configuration_manager.patch_size) != 3:
            stop_training(self, f"configuration '{self.configuration_name}' is "
                          f"{len(self.configuration_manager.patch_size)}D; the Boutinaud U-Net is 3D (use 3d_fullres)")
        first = not self.was_initialized
        super().initialize()
        if first:
            # before anything is logged: a file that does not fit stops the run without leftovers
            path = None if self.plans_manager.plans.get("continue_training") else pretrained_weights_argument()
            note = self.check_pretrained_weights(path) if path is not None else None
            self.print_to_log_file(depth_summary(self.configuration_manager.patch_size, self.network_module().pool_strides,
                                                 self.n_kernels_init, self.n_stages))
            if note:
                self.print_to_log_file(f"nnunet-pvs: note: {note}")

    def network_module(self) -> nn.Module:
        """The plain network (without DDP / torch.compile wrappers)."""
        mod = self.network.module if self.is_ddp else self.network
        return getattr(mod, "_orig_mod", mod)

    def this_run(self) -> dict:
        """What a ``-pretrained_weights`` file is compared with."""
        return {"dataset": self.plans_manager.dataset_name, "configuration": self.configuration_name,
                "plans": self.plans_manager.plans_name, "patch_size": list(self.configuration_manager.patch_size),
                "architecture": architecture_record(self.network_module())}

    def check_pretrained_weights(self, path: str) -> str | None:
        """Stop with one line saying what differs when ``path`` does not fit; return a note when it
        fits but was made for another run."""
        error, note = pretrained_weights_problem(path, self.network_module(), self.this_run())
        if error:
            stop_training(self, error)
        return note

    def on_epoch_end(self):
        # before super(): it increments current_epoch
        losses = list(self.logger.get_value("val_losses", step=None))
        if losses and np.isfinite(losses[-1]) and (len(losses) == 1 or losses[-1] < np.nanmin(losses[:-1])):
            self.print_to_log_file(f"nnunet-pvs: lowest validation loss so far: {np.round(losses[-1], decimals=4)} "
                                   f"(epoch {self.current_epoch}) -> {BEST_LOSS_CHECKPOINT}")
            self.save_checkpoint(os.path.join(self.output_folder, BEST_LOSS_CHECKPOINT))
        super().on_epoch_end()

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
