"""MfNS_De network: outputs per nnU-Net plan, deep-supervision switch, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_pvs.networks.mfns_de import MfNSDe, default_features, mfns_de_from_plans

torch.set_num_threads(2)


def plan_kwargs(dim: int, strides, kernel_sizes=None) -> dict:
    """``network_arch_init_kwargs`` as nnU-Net's planner writes them (ops as import strings)."""
    kernel_sizes = kernel_sizes or [[3] * dim] * len(strides)
    return {
        "n_stages": len(strides), "features_per_stage": [32 * 2 ** i for i in range(len(strides))],
        "conv_op": f"torch.nn.modules.conv.Conv{dim}d", "kernel_sizes": kernel_sizes, "strides": strides,
        "n_conv_per_stage": [2] * len(strides), "n_conv_per_stage_decoder": [2] * (len(strides) - 1),
        "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }


REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]

PLANS = {
    # 2D PVS-like: 5 stages on a 64 x 48 patch
    "2d": (plan_kwargs(2, [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]]), (64, 48)),
    # 3D anisotropic (thick slices first axis): nnU-Net keeps stride 1 along it at first
    "3d_aniso": (plan_kwargs(3, [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [[1, 3, 3], [3, 3, 3], [3, 3, 3]]), (8, 32, 32)),
}


def expected_scales(strides) -> list[np.ndarray]:
    """nnU-Net's deep-supervision scales (nnUNetTrainer._get_deep_supervision_scales)."""
    return list(1 / np.cumprod(np.vstack(strides), axis=0))[:-1]


@pytest.mark.parametrize("name", sorted(PLANS))
def test_outputs_match_nnunet_deep_supervision_scales(name):
    kwargs, patch = PLANS[name]
    net = mfns_de_from_plans(kwargs, REQ_IMPORT, 2, 3, deep_supervision=True)
    x = torch.randn(2, 2, *patch)
    out = net(x)
    scales = expected_scales(kwargs["strides"])
    assert isinstance(out, list) and len(out) == len(scales) == net.num_outputs
    for o, s in zip(out, scales):
        assert tuple(o.shape) == (2, 3, *[round(p * f) for p, f in zip(patch, s)])
    net.decoder.deep_supervision = False
    single = net(x)
    assert isinstance(single, torch.Tensor) and tuple(single.shape) == (2, 3, *patch)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_state_dict_identical_with_and_without_deep_supervision(name):
    kwargs, patch = PLANS[name]
    torch.manual_seed(0)
    with_ds = mfns_de_from_plans(kwargs, REQ_IMPORT, 1, 2, deep_supervision=True)
    without = mfns_de_from_plans(kwargs, REQ_IMPORT, 1, 2, deep_supervision=False)
    a, b = with_ds.state_dict(), without.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    without.load_state_dict(a, strict=True)  # what nnUNetv2_predict does
    with_ds.eval(), without.eval()
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        torch.testing.assert_close(with_ds(x)[0], without(x))


def test_gradients_reach_every_parameter():
    kwargs, patch = PLANS["2d"]
    net = mfns_de_from_plans(kwargs, REQ_IMPORT, 1, 2, deep_supervision=True)
    out = net(torch.randn(2, 1, *patch))
    sum(o.square().mean() for o in out).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient for {missing[:5]}"


def test_dense_nested_wiring_and_widths():
    """Node (i, j) sees j same-level skips, the deeper node and (below level 0) the shallower one."""
    strides = [[1, 1], [2, 2], [2, 2], [2, 2]]
    net = MfNSDe(1, 2, strides, [[3, 3]] * 4, nn.Conv2d, nn.InstanceNorm2d, {"affine": True},
                 nn.LeakyReLU, None)
    f = default_features(4)
    assert f == [16, 32, 64, 128]
    nodes = net.decoder.nodes
    assert sorted(nodes) == sorted(f"{i}_{j}" for j in range(1, 4) for i in range(4 - j))
    assert nodes["0_1"][0].conv1.in_channels == 1 * 16 + 32
    assert nodes["1_2"][0].conv1.in_channels == 2 * 32 + 64 + 16
    assert nodes["0_3"][0].conv1.in_channels == 3 * 16 + 32
    # pyramid fusion of the last column: one projection per deeper level plus the top node
    assert net.decoder.fuse[0].conv1.in_channels == 4 * 16
    assert default_features(7) == [16, 32, 64, 128, 256, 256, 256]


def test_widths_are_configurable():
    kwargs, patch = PLANS["2d"]
    net = mfns_de_from_plans(kwargs, REQ_IMPORT, 1, 2, False, features_per_stage=[8, 8, 16, 16, 32])
    assert net.features_per_stage == [8, 8, 16, 16, 32]
    assert net(torch.randn(1, 1, *patch)).shape == (1, 2, *patch)
    with pytest.raises(ValueError, match="feature widths"):
        mfns_de_from_plans(kwargs, REQ_IMPORT, 1, 2, False, features_per_stage=[8, 8])


# --- DNANet's configuration, variants and the lean path -------------------------------------------

PLAN_320 = plan_kwargs(2, [[1, 1]] + [[2, 2]] * 6)  # nnU-Net's 2d plan of 320 x 320 slices: 7 stages


def configuration(kwargs: dict, patch) -> "ConfigurationManager":
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    return ConfigurationManager({
        "patch_size": list(patch), "batch_size": 2, "spacing": [1.0] * len(patch),
        "pool_op_kernel_sizes": kwargs["strides"], "conv_kernel_sizes": kwargs["kernel_sizes"],
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": kwargs, "_kw_requires_import": REQ_IMPORT}})


def dnanet_parameters(blocks_below_top: int, hidden, shortcut_bias: bool, head_widths, classes: int,
                      cin: int = 1) -> int:
    """Parameters of DNANet's structure counted by hand (conv weights + biases, 2 per norm channel;
    norm running statistics are buffers, not parameters)."""
    f = [16, 32, 64, 128, 256]

    def block(i, o):
        n = (9 * i * o + o) + 2 * o + (9 * o * o + o) + 2 * o   # conv1, norm1, conv2, norm2
        n += 2 * o * hidden(o) + 2 * 49                          # CBAM MLP (no bias), 7x7 spatial conv (no bias)
        if i != o:
            n += i * o + (o if shortcut_bias else 0) + 2 * o     # 1x1 shortcut + norm
        return n

    def node(i, o, b):
        return block(i, o) + (b - 1) * block(o, o)

    blocks = [1] + [blocks_below_top] * 4
    n = sum(node(cin if i == 0 else f[i - 1], f[i], blocks[i]) for i in range(5))
    n += sum(node(j * f[i] + f[i + 1] + (f[i - 1] if i else 0), f[i], blocks[i])
             for j in range(1, 5) for i in range(5 - j))
    n += sum(f[i] * 16 + 16 for i in range(1, 5))                # pyramid 1x1 projections (with bias)
    n += node(5 * 16, 16, 1)                                     # fusion node
    n += sum(w * classes + classes for w in head_widths)         # 1x1 heads (with bias)
    return n


def test_default_network_parameters_explained_against_official_dnanet():
    """Official DNANet (1 input channel, one class, heads on X0_1..X0_3 + fused) has 4,696,568
    parameters; the default MfNS_De differs by exactly three choices, counted term by term:
    two-class heads at their own scales (levels 0..3) instead of four 16 -> 1 heads; no bias in the
    1x1 shortcuts (a norm follows); CBAM hidden width max(c/16, 4) instead of c/16. The norm layers
    (the plan's InstanceNorm, affine) have as many parameters as DNANet's BatchNorm."""
    from nnunet_pvs.trainers.mfns_de import nnUNetTrainerMfNSDe, nnUNetTrainerMfNSDe_lite

    official = dnanet_parameters(2, lambda c: c // 16, True, [16] * 4, 1)
    assert official == 4_696_568                       # the published structure, counted independently
    assert dnanet_parameters(1, lambda c: c // 16, True, [16] * 4, 1) == 2_611_876  # resnet_10
    cm = configuration(PLAN_320, (320, 320))
    net = nnUNetTrainerMfNSDe.build_network_architecture(None, cm, 1, 2, True)
    ours = sum(p.numel() for p in net.parameters())
    # blocks per width: level 0 has 5 nodes + the fusion node of 1 block; level i >= 1 has 5 - i nodes
    # of 2 blocks. Every node's first block changes the width (projected shortcut), no other does.
    width_blocks = {16: 6, 32: 4 * 2, 64: 3 * 2, 128: 2 * 2, 256: 1 * 2}
    projected = {16: 6, 32: 4, 64: 3, 128: 2, 256: 1}
    delta_heads = (16 * 2 + 2 + 32 * 2 + 2 + 64 * 2 + 2 + 128 * 2 + 2) - 4 * (16 + 1)
    delta_shortcut_bias = -sum(c * n for c, n in projected.items())
    delta_cbam = sum(2 * c * (max(c // 16, 4) - c // 16) * n for c, n in width_blocks.items())
    # by hand: heads 34 + 66 + 130 + 258 - 68 = 420; shortcut biases -(16*6 + 32*4 + 64*3 + 128*2 + 256)
    # = -928; CBAM 6 blocks * 2*16*(4-1) + 8 blocks * 2*32*(4-2) = 576 + 1024 = 1600
    assert (delta_heads, delta_shortcut_bias, delta_cbam) == (420, -928, 1600)
    assert ours == official + delta_heads + delta_shortcut_bias + delta_cbam == 4_697_660
    assert ours == dnanet_parameters(2, lambda c: max(c // 16, 4), False, [16, 32, 64, 128], 2)
    lite = nnUNetTrainerMfNSDe_lite.build_network_architecture(None, cm, 1, 2, True)
    assert sum(p.numel() for p in lite.parameters()) == dnanet_parameters(
        1, lambda c: max(c // 16, 4), False, [16, 32, 64, 128], 2)


@pytest.mark.parametrize("trainer,levels,blocks", [
    ("nnUNetTrainerMfNSDe", 5, [1, 2, 2, 2, 2]),
    ("nnUNetTrainerMfNSDe_lite", 5, [1, 1, 1, 1, 1]),
    ("nnUNetTrainerMfNSDe_planDepth", 7, [1] * 7),
    ("nnUNetTrainerMfNSDe_wide", 5, [1, 2, 2, 2, 2]),
])
def test_variants_depth_heads_and_deep_supervision_scales(trainer, levels, blocks):
    """Heads follow the chosen depth, and the trainer's scales (nnU-Net's, cut to the depth) match
    the outputs' shapes; the state dict is the same with deep supervision on and off."""
    from nnunet_pvs.trainers import mfns_de

    cls = getattr(mfns_de, trainer)
    patch = (128, 128)
    cm = configuration(PLAN_320, patch)
    net = cls.build_network_architecture(None, cm, 1, 2, True)
    assert len(net.encoder.stages) == levels and net.blocks_per_level == blocks
    assert [len(n) for n in net.encoder.stages] == blocks and len(net.decoder.fuse) == 1
    tr = cls.__new__(cls)
    tr.configuration_manager, tr.enable_deep_supervision = cm, True
    scales = tr._get_deep_supervision_scales()
    assert len(scales) == levels - 1 == net.num_outputs
    with torch.no_grad():
        out = net(torch.randn(1, 1, *patch))
    assert [tuple(o.shape[2:]) for o in out] == [tuple(round(p * f) for p, f in zip(patch, s)) for s in scales]
    without = cls.build_network_architecture(None, cm, 1, 2, False)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in without.state_dict().items()}
    without.load_state_dict(net.state_dict(), strict=True)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_lean_path_equals_plain_reference(name):
    """Concatenation-free convolutions, low-resolution shortcuts, fused gating and channels_last
    give the plain computation's outputs and gradients (same parameters). Batch norm here: the
    rewrite does not touch the norms, and torch's CPU instance-norm backward gives bias gradients
    that disagree with finite differences in *both* paths when a CBAM gate follows it."""
    from nnunet_pvs.networks.mfns_de import mfns_de_from_plans

    kwargs, patch = PLANS[name]
    dim = len(patch)
    kwargs = {**kwargs, "norm_op": f"torch.nn.BatchNorm{dim}d", "norm_op_kwargs": {}}
    torch.manual_seed(0)
    net = mfns_de_from_plans(kwargs, REQ_IMPORT, 1, 2, True, blocks_per_level=[1] + [2] * (len(kwargs["strides"]) - 1))
    x = torch.randn(2, 1, *patch, dtype=torch.float64)
    net = net.double()
    results = []
    for lean in (False, True):
        net.lean = lean
        net.zero_grad(set_to_none=True)
        out = net(x)
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in out).backward()
        results.append(([o.detach() for o in out], {n: p.grad.clone() for n, p in net.named_parameters()}))
    (ref_out, ref_grad), (lean_out, lean_grad) = results
    for a, b in zip(ref_out, lean_out):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
    for n in ref_grad:
        torch.testing.assert_close(lean_grad[n], ref_grad[n], rtol=1e-8, atol=1e-9, msg=n)


def test_lean_2d_path_runs_its_convolutions_channels_last():
    """The layout the lean path exists for: with instance norm (which returns channels-first maps),
    every 3x3 and 7x7 kernel of a 2D network still sees a channels-last input, and the plain
    path is left in torch's default layout."""
    from nnunet_pvs.networks.attention import ResCBAMBlock

    kwargs, patch = PLANS["2d"]
    net = mfns_de_from_plans(kwargs, REQ_IMPORT, 1, 2, True)
    seen: dict[bool, list[bool]] = {True: [], False: []}

    def record(module, inputs):
        x = inputs[0]
        seen[net.lean].append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())

    blocks = [m for m in net.modules() if isinstance(m, ResCBAMBlock)]
    for block in blocks:
        block.conv2.register_forward_pre_hook(record)
        block.spatial_attention.conv.register_forward_pre_hook(record)
    for lean in (True, False):
        net.lean = lean
        net(torch.randn(2, 1, *patch))
    assert len(seen[True]) == 2 * len(blocks) and all(seen[True])
    assert not any(seen[False])
