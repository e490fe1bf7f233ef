"""HF (max-pooling) deep-supervision targets vs nnU-Net's nearest-exact downsampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

from nnunet_pvs.trainers.mfns_de import nnUNetTrainerMfNSDe
from nnunet_pvs.transforms.foreground_downsampling import DownsampleSegForDSTransformHF

SCALES_2D = [[1, 1], [0.5, 0.5], [0.25, 0.25], [0.125, 0.125], [0.0625, 0.0625]]


def line_seg(shape=(64, 64), row=20, col=None):
    """One-pixel-wide horizontal line (and optionally a vertical one)."""
    seg = torch.zeros((1, *shape), dtype=torch.int16)
    seg[0, row, :] = 1
    if col is not None:
        seg[0, :, col] = 1
    return seg


def test_one_pixel_line_survives_every_scale_but_not_nearest_exact():
    kept_by_nearest = 0
    for row in range(64):
        seg = line_seg(row=row)
        hf = DownsampleSegForDSTransformHF(SCALES_2D, foreground_labels=[1])(segmentation=seg)["segmentation"]
        nearest = DownsampleSegForDSTransform(SCALES_2D)(segmentation=seg.clone())["segmentation"]
        for s, h, n in zip(SCALES_2D, hf, nearest):
            assert tuple(h.shape) == tuple(n.shape) == (1, round(64 * s[0]), round(64 * s[1]))
            assert h.dtype == seg.dtype
            # still there, exactly one row wide, on the coarse row that contains it
            rows = torch.nonzero(h[0].any(dim=1)).flatten().tolist()
            assert rows == [int(row * s[0])]
            assert bool(h[0, rows[0]].all())
        kept_by_nearest += all(int(n.sum()) > 0 for n in nearest)
    # the contrast: nearest-exact samples rows 2i+1 at 1/2 and 4i+2 at 1/4, so wherever the line
    # lies, it is lost at one of the scales
    assert kept_by_nearest == 0


def test_3d_anisotropic_scales_and_tubes():
    seg = torch.zeros((1, 8, 32, 32), dtype=torch.uint8)
    seg[0, :, 5, 7] = 1  # a one-voxel tube along the slice axis
    scales = [[1, 1, 1], [1, 0.5, 0.5], [0.5, 0.25, 0.25]]
    out = DownsampleSegForDSTransformHF(scales, foreground_labels=[1])(segmentation=seg)["segmentation"]
    assert [tuple(o.shape) for o in out] == [(1, 8, 32, 32), (1, 8, 16, 16), (1, 4, 8, 8)]
    assert int(out[1].sum()) == 8 and bool(out[1][0, :, 2, 3].all())
    assert int(out[2].sum()) == 4 and bool(out[2][0, :, 1, 1].all())


def test_multiclass_priority_higher_label_wins():
    seg = torch.zeros((1, 8, 8), dtype=torch.int16)
    seg[0, 0, 0] = 1          # cell (0,0): labels 1 and 2 meet
    seg[0, 1, 1] = 2
    seg[0, 4, 4] = 1          # cell (2,2): label 1 alone
    out = DownsampleSegForDSTransformHF([[0.5, 0.5]], foreground_labels=[1, 2])(segmentation=seg)["segmentation"][0]
    assert out[0, 0, 0] == 2 and out[0, 2, 2] == 1
    assert int((out > 0).sum()) == 2


def test_ignore_label_does_not_spread():
    ignore = 3
    seg = torch.zeros((1, 8, 8), dtype=torch.int16)
    seg[0, 0:2, 0:2] = ignore   # a whole cell of ignore: stays ignore
    seg[0, 2, 2] = ignore       # one ignore voxel in an annotated background cell: becomes background
    seg[0, 4, 4] = ignore       # ignore + foreground: foreground wins
    seg[0, 5, 5] = 1
    out = DownsampleSegForDSTransformHF([[0.5, 0.5]], foreground_labels=[1], ignore_label=ignore)(
        segmentation=seg)["segmentation"][0]
    assert out[0, 0, 0] == ignore
    assert out[0, 1, 1] == 0
    assert out[0, 2, 2] == 1
    assert int((out == ignore).sum()) == 1


def test_regions_pooled_per_channel_and_ignore_channel_min_pooled():
    seg = torch.zeros((3, 4, 4), dtype=torch.bool)
    seg[0, 0, 0] = True            # region A in cell (0,0)
    seg[1, 3, 3] = True            # region B in cell (1,1)
    seg[2, 0:2, 2:4] = True        # ignore channel: cell (0,1) entirely ignored
    seg[2, 2, 0] = True            # cell (1,0) only partly ignored
    out = DownsampleSegForDSTransformHF([[0.5, 0.5]], regions=True, ignore_channel=True)(
        segmentation=seg)["segmentation"][0]
    assert out.dtype == torch.bool and tuple(out.shape) == (3, 2, 2)
    assert out[0].tolist() == [[True, False], [False, False]]
    assert out[1].tolist() == [[False, False], [False, True]]
    assert out[2].tolist() == [[False, True], [False, False]]


@pytest.mark.parametrize("kind", ["training", "validation"])
def test_trainer_pipelines_use_hf_downsampling(kind):
    """Both of the trainer's pipelines end in HF downsampling and keep a thin line at every scale."""
    if kind == "training":
        pipeline = nnUNetTrainerMfNSDe.get_training_transforms(
            (64, 64), (0, 0), SCALES_2D, (), False, use_mask_for_norm=[False], foreground_labels=[1])
    else:
        pipeline = nnUNetTrainerMfNSDe.get_validation_transforms(SCALES_2D, foreground_labels=[1])
    assert isinstance(pipeline.transforms[-1], DownsampleSegForDSTransformHF)
    assert not any(type(t) is DownsampleSegForDSTransform for t in pipeline.transforms)
    if kind == "validation":
        out = pipeline(image=torch.zeros((1, 64, 64)), segmentation=line_seg(col=40))["segmentation"]
        assert all(int((o > 0).sum()) > 0 for o in out)
        assert [int((o > 0).sum()) for o in out] == [127, 63, 31, 15, 7]


def test_no_deep_supervision_means_no_downsampling():
    pipeline = nnUNetTrainerMfNSDe.get_validation_transforms(None, foreground_labels=[1])
    assert not any(isinstance(t, (DownsampleSegForDSTransform, DownsampleSegForDSTransformHF))
                   for t in pipeline.transforms)


def test_random_masks_hf_equals_numpy_block_max():
    """Independent check: HF target == block-wise max over the fine grid (numpy reshape)."""
    rng = np.random.default_rng(0)
    seg = (rng.random((1, 32, 48)) > 0.97).astype(np.int16)
    out = DownsampleSegForDSTransformHF([[0.25, 0.25]], foreground_labels=[1])(
        segmentation=torch.from_numpy(seg))["segmentation"][0].numpy()
    expected = seg[0].reshape(8, 4, 12, 4).max(axis=(1, 3))
    np.testing.assert_array_equal(out[0], expected)
