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
    assert nodes["0_1"].conv1.in_channels == 1 * 16 + 32
    assert nodes["1_2"].conv1.in_channels == 2 * 32 + 64 + 16
    assert nodes["0_3"].conv1.in_channels == 3 * 16 + 32
    # pyramid fusion of the last column: one projection per deeper level plus the top node
    assert net.decoder.fuse.conv1.in_channels == 4 * 16
    assert default_features(7) == [16, 32, 64, 128, 256, 256, 256]


def test_widths_are_configurable():
    kwargs, patch = PLANS["2d"]
    net = mfns_de_from_plans(kwargs, REQ_IMPORT, 1, 2, False, features_per_stage=[8, 8, 16, 16, 32])
    assert net.features_per_stage == [8, 8, 16, 16, 32]
    assert net(torch.randn(1, 1, *patch)).shape == (1, 2, *patch)
    with pytest.raises(ValueError, match="feature widths"):
        mfns_de_from_plans(kwargs, REQ_IMPORT, 1, 2, False, features_per_stage=[8, 8])
