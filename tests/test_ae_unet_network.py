"""Boutinaud et al. (2021) 8.7.2 U-Net / autoencoder: shapes, stage capping, parameter count, weight transfer."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from nnunet_pvs.networks.ae_unet import (PAPER_INPUT_SHAPE, AEUNet, encoder_keys, pad_or_crop_to,
                                         stage_strides_for_patch)
from nnunet_pvs.trainers.ae_unet import nnUNetTrainerAEUNet

TINY_PLANS = json.loads("""{"dataset_name": "Dataset993_PlansOnly", "plans_name": "nnUNetPlans",
 "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "original_median_shape_after_transp": [32, 32, 32],
 "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
 "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
  "batch_size": 2, "patch_size": [32, 32, 32], "median_image_size_in_voxels": [32.0, 32.0, 32.0], "spacing": [1.0, 1.0, 1.0],
  "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [false],
  "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
  "resampling_fn_data_kwargs": {"is_seg": false, "order": 3, "order_z": 0, "force_separate_z": null},
  "resampling_fn_seg_kwargs": {"is_seg": true, "order": 1, "order_z": 0, "force_separate_z": null},
  "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
  "resampling_fn_probabilities_kwargs": {"is_seg": false, "order": 1, "order_z": 0, "force_separate_z": null},
  "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
   "arch_kwargs": {"n_stages": 4, "features_per_stage": [32, 64, 128, 256], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2], "conv_bias": true,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": true},
    "dropout_op": null, "dropout_op_kwargs": null, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": true}},
   "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}, "batch_dice": false}},
 "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
 "foreground_intensity_properties_per_channel": {"0": {"max": 278.0, "mean": 250.0, "median": 250.0, "min": 216.0,
  "percentile_00_5": 224.0, "percentile_99_5": 275.0, "std": 10.0}}}""")
TINY_DATASET_JSON = {"channel_names": {"0": "T1w"}, "labels": {"background": 0, "PVS": 1},
                     "numTraining": 6, "file_ending": ".nii.gz"}


def tiny_managers(plans: dict = TINY_PLANS):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(copy.deepcopy(plans))
    return pm, pm.get_configuration("3d_fullres")


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def expected_params(features, n_in=1, n_convs=2, k=27, skips=True, n_out=1) -> int:
    """Closed form from the paper's text: conv (weights + bias) + batch norm (gamma, beta) per block."""
    def block(cin, c):
        return k * cin * c + c + 2 * c

    total, prev = 0, n_in
    for c in features:  # encoder
        total += block(prev, c) + sum(block(c, c) for _ in range(n_convs - 1))
        prev = c
    for s in range(len(features) - 2, -1, -1):  # decoder
        cin = features[s + 1] + (features[s] if skips else 0)
        total += block(cin, features[s]) + sum(block(features[s], features[s]) for _ in range(n_convs - 1))
    return total + features[0] * n_out + n_out  # 1x1x1 output convolution


@pytest.mark.parametrize("n_stages", [2, 3, 4, 5, 6, 7])
def test_shapes_for_2_to_7_stages(n_stages):
    # odd sizes along the way exercise the paper's pad/crop layer
    patch = (70, 66, 76) if n_stages >= 6 else (38, 34, 42)
    strides, kernels = stage_strides_for_patch(patch, [[1, 1, 1]], [[3, 3, 3]], n_stages)
    assert len(strides) == n_stages
    torch.manual_seed(0)
    net = AEUNet(1, strides, kernels)
    assert net.features == [8 * 2 ** s for s in range(n_stages)]
    x = torch.randn(2, 1, *patch)
    y = net(x)
    assert y.shape == (2, 2, *patch)
    # the two logits are [-z/2, z/2]: nnU-Net's softmax equals the paper's sigmoid output
    z = y[:, 1] - y[:, 0]
    assert torch.allclose(y[:, 0], -y[:, 1])
    assert torch.allclose(torch.softmax(y, 1)[:, 1], torch.sigmoid(z), atol=1e-6)
    ae = AEUNet(1, strides, kernels, skips=False)
    assert ae(x).shape == x.shape
    assert set(encoder_keys(ae.state_dict())) == set(encoder_keys(net.state_dict()))


def test_stages_capped_by_patch_and_plan_strides_kept():
    # the tiny plan has 4 stages for a 32^3 patch; 2 more fit (4 -> 2 -> 1 voxel), a 7th does not
    strides, _ = stage_strides_for_patch((32, 32, 32), [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 4, 7)
    assert strides == [[1, 1, 1]] + [[2, 2, 2]] * 5
    # anisotropic plan: in-plane-only pooling and 1x3x3 kernels are followed, extra stages skip short axes
    plan_strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    plan_kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
    strides, kernels = stage_strides_for_patch((8, 64, 64), plan_strides, plan_kernels, 7)
    assert strides[:3] == plan_strides and kernels[:3] == plan_kernels
    assert strides[3:] == [[2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]  # 4x16x16 -> 2x8x8 -> 1x4x4 -> 1x2x2 -> 1x1x1
    net = AEUNet(1, strides, kernels).eval()
    assert net(torch.randn(1, 1, 8, 64, 64)).shape == (1, 2, 8, 64, 64)
    # fewer stages than the plan: the plan's first ones
    assert stage_strides_for_patch((8, 64, 64), plan_strides, plan_kernels, 2)[0] == plan_strides[:2]


def test_pad_or_crop():
    x = torch.ones(1, 1, 3, 5, 4)
    y = pad_or_crop_to(x, (4, 4, 4))
    assert y.shape == (1, 1, 4, 4, 4) and y[0, 0, 3].sum() == 0 and y[0, 0, :3].sum() == 3 * 4 * 4


def test_parameter_count_8_7_2_at_paper_input_size(capsys):
    strides, kernels = stage_strides_for_patch(PAPER_INPUT_SHAPE, [[1, 1, 1]], [[3, 3, 3]], 7)
    assert len(strides) == 7, "the paper's 160 x 214 x 176 volume allows all 7 stages"
    unet = AEUNet(1, strides, kernels)
    ae = AEUNet(1, strides, kernels, skips=False)
    assert unet.features[-1] == 512  # the paper's 512-dimensional latent space
    assert n_params(unet) == expected_params(unet.features)
    assert n_params(ae) == expected_params(ae.features, skips=False)
    with capsys.disabled():
        print(f"\n8.7.2 at {PAPER_INPUT_SHAPE}: U-Net {n_params(unet):,} parameters, autoencoder "
              f"{n_params(ae):,}, together {n_params(unet) + n_params(ae):,} (paper: about 44 M)")
    # the U-Net described in the text has 23.6 M; the paper's ~44 M matches U-Net + autoencoder (44.8 M)
    assert n_params(unet) == 23_598_273


def test_state_dict_identical_with_and_without_deep_supervision():
    pm, cm = tiny_managers()
    a = nnUNetTrainerAEUNet.build_network_architecture(pm, cm, 1, 2, True).state_dict()
    b = nnUNetTrainerAEUNet.build_network_architecture(pm, cm, 1, 2, False).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_pretrained_weights_load_encoder_not_decoder(tmp_path):
    """Stock nnU-Net's -pretrained_weights loader: encoder from the autoencoder, decoder fresh."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from nnunet_pvs.pretrain_autoencoder import build_pretrained_checkpoint

    pm, cm = tiny_managers()
    torch.manual_seed(1)
    ae = nnUNetTrainerAEUNet.build_autoencoder(cm, 1)
    with torch.no_grad():  # stands in for training: make the encoder distinguishable from a fresh init
        for p in ae.parameters():
            p.add_(torch.randn_like(p))
    ae_sd = ae.state_dict()
    weights = build_pretrained_checkpoint(nnUNetTrainerAEUNet, pm, cm, TINY_DATASET_JSON, ae_sd)
    torch.save({"network_weights": weights}, tmp_path / "init.pth")

    torch.manual_seed(2)
    unet = nnUNetTrainerAEUNet.build_network_architecture(pm, cm, 1, 2, False)
    fresh = {k: v.clone() for k, v in unet.state_dict().items()}
    assert set(weights) == set(fresh)
    assert all(v.device.type == "cpu" for v in weights.values())
    load_pretrained_weights(unet, str(tmp_path / "init.pth"))
    loaded = unet.state_dict()
    enc = encoder_keys(loaded)
    assert enc and all(torch.equal(loaded[k], ae_sd[k]) for k in enc)
    conv_w = [k for k in loaded if k.startswith("decoder.stages.") and k.endswith(".weight") and loaded[k].ndim == 5]
    assert conv_w
    # stock skips the output head (".seg_layers."): it keeps the target network's own init
    assert torch.equal(loaded["decoder.seg_layers.0.weight"], fresh["decoder.seg_layers.0.weight"])
    for k in conv_w:
        assert torch.equal(loaded[k], weights[k]) and not torch.equal(loaded[k], fresh[k])  # from the file
        # ... and not the autoencoder's decoder (first convs differ in shape: no skip channels)
        assert ae_sd[k].shape != loaded[k].shape or not torch.equal(loaded[k], ae_sd[k])


def test_binary_task_check():
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    nnUNetTrainerAEUNet.check_binary_task(LabelManager({"background": 0, "PVS": 1}, None))
    for labels, regions, msg in [
        ({"background": 0, "a": 1, "b": 2}, None, "2 foreground labels"),
        ({"background": 0, "PVS": 1, "ignore": 2}, None, "ignore label"),
        ({"background": 0, "a": [1, 2], "b": [2]}, [1, 2], "region-based"),
    ]:
        with pytest.raises(RuntimeError, match=msg):
            nnUNetTrainerAEUNet.check_binary_task(LabelManager(labels, regions))


def test_trainer_initialize_refuses_multiclass(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))  # nnU-Net reads these lazily
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    dj = {**TINY_DATASET_JSON, "labels": {"background": 0, "PVS": 1, "lacune": 2}}
    plans = {**copy.deepcopy(TINY_PLANS), "continue_training": False}  # run_training adds this key
    trainer = nnUNetTrainerAEUNet(plans, "3d_fullres", 0, dj, torch.device("cpu"))
    assert trainer.configuration_manager.batch_size == 2 and not trainer.enable_deep_supervision
    with pytest.raises(RuntimeError, match="one foreground class"):
        trainer.initialize()
