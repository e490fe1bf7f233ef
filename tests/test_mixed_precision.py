"""The GPU code paths, exercised on the CPU: mixed precision, torch.compile and channels-last inputs.

nnU-Net trains with ``torch.autocast`` (float16 on CUDA) and ``torch.compile`` by default on a GPU;
our networks were written and tuned on the CPU. Each network (MfNS_De default, ``_lite`` and
``_planDepth``; the AE U-Net) runs forward and backward in float32 and again under autocast / compile /
channels-last, and the outputs and parameter gradients must agree.

Tolerances (relative L2 error of the outputs, cosine similarity of the flattened gradients): float16
keeps 11 significant bits (unit round-off 2^-11 = 4.9e-4), bfloat16 8 bits (2^-8 = 3.9e-3). Autocast
runs convolutions in the low type and keeps reductions (norms, softmax, losses) in float32, so each
layer adds an error of the order of the round-off and a few tens of layers add up to a few times
that: we allow 20x the round-off on the outputs (1e-2 for float16, 8e-2 for bfloat16) and require the
gradients to point the same way (cosine >= 0.97 for float16, 0.90 for bfloat16; measured 0.986-0.99x and
0.94-0.99 on these networks). What these tolerances
catch: an operation computed in the wrong type (a norm or sigmoid gate left in half precision
overflows or underflows and gives errors of order 1), a layout bug (wrong values, not small ones), a
gradient lost through a custom path. torch.compile and channels-last change the arithmetic order only,
so outputs are held to float32 accuracy (1e-4); compiled gradients to 1e-2 (tied maxima, see the test).

``torch.compile`` uses the ``aot_eager`` backend: it traces the networks with dynamo and AOTAutograd
(where graph breaks, unsupported ops and wrong backward graphs show up) without inductor's C++ code
generation, which takes minutes on a CPU (291 s for the full-size MfNS_De in bench_mfns_de.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from nnunet_pvs.networks.mfns_de import default_features, mfns_de_from_plans

from test_ae_unet_network import tiny_managers
from test_mfns_de_network import REQ_IMPORT, plan_kwargs

torch.set_num_threads(2)

PLAN_2D = plan_kwargs(2, [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 2]])
PATCH_2D = (64, 64)


def _mfns(levels: int | None, blocks_below_top: int):
    n = len(PLAN_2D["strides"]) if levels is None else levels
    torch.manual_seed(0)
    return mfns_de_from_plans(PLAN_2D, REQ_IMPORT, 1, 2, True, features_per_stage=default_features(n, 16, 256),
                              n_levels=n, blocks_per_level=[1] + [blocks_below_top] * (n - 1), fusion_blocks=1)


def _ae_unet():
    from nnunet_pvs.trainers.ae_unet import nnUNetTrainerAEUNet

    pm, cm = tiny_managers()
    torch.manual_seed(0)
    net = nnUNetTrainerAEUNet.build_network_architecture(pm, cm, 1, 2, False)
    net.eval()  # dropout off: the two passes must see the same network
    return net


NETWORKS = {
    "mfns_de": (lambda: _mfns(5, 2), (2, 1, *PATCH_2D)),
    "mfns_de_lite": (lambda: _mfns(5, 1), (2, 1, *PATCH_2D)),
    "mfns_de_planDepth": (lambda: _mfns(None, 1), (2, 1, *PATCH_2D)),
    "ae_unet": (_ae_unet, (1, 1, 32, 32, 32)),
}


def _run(net, x, weights=None, dtype=None, compiled=False):
    """Outputs (float32, flattened, concatenated over deep-supervision heads) and parameter gradients."""
    net.zero_grad(set_to_none=True)
    model = torch.compile(net, backend="aot_eager") if compiled else net
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(x)
    outs = out if isinstance(out, (list, tuple)) else [out]
    flat = torch.cat([o.float().reshape(-1) for o in outs])
    if weights is None:
        weights = torch.randn(flat.shape, generator=torch.Generator().manual_seed(1))
    (flat * weights).sum().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None])
    return flat.detach(), grads.detach(), weights


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _cos(a, b) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.fixture(scope="module", params=sorted(NETWORKS))
def reference(request):
    build, shape = NETWORKS[request.param]
    net = build()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    out, grads, weights = _run(net, x)
    return request.param, net, x, out, grads, weights


@pytest.mark.parametrize("dtype, out_tol, grad_cos", [(torch.float16, 1e-2, 0.97), (torch.bfloat16, 8e-2, 0.90)],
                         ids=["float16", "bfloat16"])
def test_autocast_agrees_with_float32(reference, dtype, out_tol, grad_cos):
    name, net, x, out, grads, weights = reference
    if name == "ae_unet" and dtype == torch.bfloat16:
        pytest.xfail("known defect, found by this test: the AE U-Net's parameter gradients under bfloat16 autocast "
                     "are uncorrelated with float32 (cosine ~0) while its outputs agree; float16, nnU-Net's CUDA "
                     "type, agrees. Not yet explained; do not train the AE U-Net under bfloat16.")
    out_lp, grads_lp, _ = _run(net, x, weights, dtype=dtype)
    assert torch.isfinite(out_lp).all() and torch.isfinite(grads_lp).all(), name
    assert _rel(out_lp, out) < out_tol, (name, _rel(out_lp, out))
    assert _cos(grads_lp, grads) > grad_cos, (name, _cos(grads_lp, grads))


def test_channels_last_input_gives_the_same_result(reference):
    name, net, x, out, grads, weights = reference
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    out_cl, grads_cl, _ = _run(net, x.contiguous(memory_format=fmt), weights)
    assert _rel(out_cl, out) < 1e-4 and _rel(grads_cl, grads) < 1e-4, name


def test_torch_compile_gives_the_same_result(reference):
    name, net, x, out, grads, weights = reference
    torch._dynamo.reset()
    out_c, grads_c, _ = _run(copy.deepcopy(net), x, weights, compiled=True)
    # gradients within 1e-2: CBAM's max pooling routes the gradient of tied maxima (many zeros after
    # ReLU) to one of them, and AOTAutograd's decomposition may pick another; measured 3e-3 to 4e-3
    assert _rel(out_c, out) < 1e-4 and _rel(grads_c, grads) < 1e-2, name
