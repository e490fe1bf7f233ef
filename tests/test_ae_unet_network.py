"""Boutinaud et al. (2021) 8.7.2 U-Net / autoencoder: shapes, stage capping, parameter count, weight transfer."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from nnunet_pvs.networks.ae_unet import (PAPER_INPUT_SHAPE, PAPER_N_PARAMETERS, AEUNet, depth_summary,
                                         encoder_keys, pad_or_crop_to, stage_strides_for_patch)
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
    """Closed form of the paper's text: per stage an encoding and a decoding level of ``n_convs``
    blocks, each block conv (weights + bias) + batch norm (gamma, beta); the deepest decoding level
    takes the pooled latent (``features[-1]`` channels) plus, in the U-Net, the deepest skip."""
    def block(cin, c):
        return k * cin * c + c + 2 * c

    def level(cin, c):
        return block(cin, c) + (n_convs - 1) * block(c, c)

    total, prev = 0, n_in
    for c in features:  # encoder
        total += level(prev, c)
        prev = c
    below = features[-1]  # the latent
    for c in reversed(features):  # decoder, deepest first
        total += level(below + (c if skips else 0), c)
        below = c
    return total + features[0] * n_out + n_out  # 1x1x1 output convolution


@pytest.mark.parametrize("n_stages", [1, 2, 3, 4, 5, 6, 7])
def test_shapes_for_1_to_7_stages(n_stages):
    # odd sizes along the way exercise the paper's pad/crop layer
    patch = (70, 66, 76) if n_stages >= 6 else (38, 34, 42)
    strides, kernels = stage_strides_for_patch(patch, [[1, 1, 1]], [[3, 3, 3]], n_stages)
    assert len(strides) == min(n_stages, 6)  # 70 x 66 x 76 reaches 1 x 1 x 1 after 6 poolings
    torch.manual_seed(0)
    net = AEUNet(1, strides, kernels).eval()  # eval: dropout off, the two passes below agree
    assert net.features == [8 * 2 ** s for s in range(len(strides))]
    x = torch.randn(2, 1, *patch)
    y = net(x)
    assert y.shape == (2, 2, *patch)
    # the network's own foreground logit, straight from its decoder head: nnU-Net's two channels
    # are [-z/2, z/2] of it, so nnU-Net's softmax foreground channel is the paper's sigmoid(z)
    with torch.no_grad():
        z = net.decoder(*net.encoder(x))
    assert z.shape == (2, 1, *patch) and z.std() > 0
    assert torch.allclose(y[:, 1:2], z / 2, atol=1e-6) and torch.allclose(y[:, 0:1], -z / 2, atol=1e-6)
    assert torch.allclose(net.foreground_probability(x), torch.sigmoid(z), atol=1e-6)
    ae = AEUNet(1, strides, kernels, skips=False)
    assert ae(x).shape == x.shape
    assert set(encoder_keys(ae.state_dict())) == set(encoder_keys(net.state_dict()))
    expected_latent = [p for p in patch]
    for st in strides:
        expected_latent = [s // t for s, t in zip(expected_latent, st)]  # floor, as Keras "valid" pooling
    assert tuple(net.latent(x).shape) == (2, net.features[-1], *expected_latent)


def test_stages_capped_by_patch_and_plan_strides_kept():
    # the tiny plan pools 3 times (32 -> 4); 2 more fit (4 -> 2 -> 1 voxel), a 6th and 7th do not
    strides, _ = stage_strides_for_patch((32, 32, 32), [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 4, 7)
    assert strides == [[2, 2, 2]] * 5
    line = depth_summary((32, 32, 32), strides)
    assert "5 of 7 stages" in line and "1 x 1 x 1 x 128 bottleneck" in line and "reaches 1 voxel" in line
    # anisotropic plan: in-plane-only pooling and 1x3x3 kernels are followed, extra stages skip short axes
    plan_strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    plan_kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
    strides, kernels = stage_strides_for_patch((8, 64, 64), plan_strides, plan_kernels, 7)
    assert strides[:2] == plan_strides[1:] and kernels == plan_kernels + [[3, 3, 3]] * 3
    # 8x64x64 -> 8x32x32 -> 4x16x16 (plan), -> 2x8x8 -> 1x4x4 -> 1x2x2 -> 1x1x1: 6 stages, no 7th
    assert strides[2:] == [[2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]
    net = AEUNet(1, strides, kernels).eval()
    x = torch.randn(1, 1, 8, 64, 64)
    assert net(x).shape == (1, 2, 8, 64, 64) and net.latent(x).shape == (1, 256, 1, 1, 1)
    # fewer stages than the plan: the plan's first poolings
    assert stage_strides_for_patch((8, 64, 64), plan_strides, plan_kernels, 1)[0] == plan_strides[1:2]


def test_pad_or_crop():
    x = torch.ones(1, 1, 3, 5, 4)
    y = pad_or_crop_to(x, (4, 4, 4))
    assert y.shape == (1, 1, 4, 4, 4) and y[0, 0, 3].sum() == 0 and y[0, 0, :3].sum() == 3 * 4 * 4


def test_paper_configuration_7_poolings_to_1x1x1x512_and_44_8_million_parameters(capsys):
    strides, kernels = stage_strides_for_patch(PAPER_INPUT_SHAPE, [[1, 1, 1]], [[3, 3, 3]], 7)
    assert strides == [[2, 2, 2]] * 7, "the paper's 160 x 214 x 176 volume allows all 7 poolings"
    unet = AEUNet(1, strides, kernels)
    ae = AEUNet(1, strides, kernels, skips=False)
    assert unet.features == [8, 16, 32, 64, 128, 256, 512]  # 512: the paper's latent space
    assert n_params(unet) == expected_params(unet.features)
    assert n_params(ae) == expected_params(ae.features, skips=False)
    # encoder 14,160,360 + decoder 30,674,649 (its deepest level: 512 latent + 512 skip -> 512)
    assert n_params(unet) == PAPER_N_PARAMETERS == 44_835_009  # the paper: "44 million"
    assert n_params(unet.encoder) == 14_160_360 and n_params(ae) == 35_398_401
    # the bottleneck at the paper's input: shapes only (meta tensors), no 160 x 214 x 176 compute
    with torch.device("meta"):
        net = AEUNet(1, strides, kernels).eval()
        x = torch.empty(1, 1, *PAPER_INPUT_SHAPE)
        assert tuple(net.latent(x).shape) == (1, 512, 1, 1, 1)
        assert tuple(net(x).shape) == (1, 2, *PAPER_INPUT_SHAPE)
    assert "7 of 7 stages" in depth_summary(PAPER_INPUT_SHAPE, strides)
    with capsys.disabled():
        print(f"\n8.7.2 at {PAPER_INPUT_SHAPE}: U-Net {n_params(unet):,} parameters, autoencoder {n_params(ae):,}")


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


def test_trainer_initialize_refuses_multiclass(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))  # nnU-Net reads these lazily
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    dj = {**TINY_DATASET_JSON, "labels": {"background": 0, "PVS": 1, "lacune": 2}}
    plans = {**copy.deepcopy(TINY_PLANS), "continue_training": False}  # run_training adds this key
    trainer = nnUNetTrainerAEUNet(plans, "3d_fullres", 0, dj, torch.device("cpu"))
    assert trainer.configuration_manager.batch_size == 2 and not trainer.enable_deep_supervision
    with pytest.raises(SystemExit) as stop:  # one line on stderr, exit code 2, no traceback
        trainer.initialize()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "one foreground class" in err and "Dataset993_PlansOnly" in err and len(err.strip().splitlines()) == 1


def test_pretrained_weights_check_says_what_differs(tmp_path):
    from nnunet_pvs.networks.ae_unet import architecture_record
    from nnunet_pvs.trainers.ae_unet import pretrained_weights_problem

    pm, cm = tiny_managers()
    unet = nnUNetTrainerAEUNet.build_network_architecture(pm, cm, 1, 2, False)
    run = {"dataset": "Dataset993_PlansOnly", "configuration": "3d_fullres", "plans": "nnUNetPlans",
           "patch_size": [32, 32, 32], "architecture": architecture_record(unet)}
    made = {**run, "dataset": "Dataset990_Elsewhere"}
    fits = tmp_path / "fits.pth"
    torch.save({"network_weights": unet.state_dict(), "pretraining": made}, fits)
    error, note = pretrained_weights_problem(str(fits), unet, run)
    assert error is None and "dataset Dataset990_Elsewhere in the file, Dataset993_PlansOnly here" in note
    assert pretrained_weights_problem(str(fits), unet, {**run, "dataset": "Dataset990_Elsewhere"}) == (None, None)

    # two input channels: every tensor but the first fits; no record in the file (not from pretrain-autoencoder)
    two = nnUNetTrainerAEUNet.build_network_architecture(pm, cm, 2, 2, False)
    bad = tmp_path / "two_channels.pth"
    torch.save({"network_weights": two.state_dict()}, bad)
    error, note = pretrained_weights_problem(str(bad), unet, run)
    assert note is None
    assert "encoder.stages.0.convs.0.0.weight is 8 x 2 x 3 x 3 x 3 in the file, 8 x 1 x 3 x 3 x 3 here" in error
    assert error.startswith(f"-pretrained_weights {bad} does not fit this run (Dataset993_PlansOnly 3d_fullres")
