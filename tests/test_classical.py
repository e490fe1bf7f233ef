"""Frangi baseline (``nnunet_pvs.classical``) on synthetic tube volumes with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from nnunet_pvs.classical import tuning, vesselness

SHAPE = (40, 40, 12)


def tube_volume(center=(20, 20), radius_vox=1.5, bright=True, noise=0.02, seed=0, axis_len=SHAPE[2]):
    """A straight tube along z through ``center`` in a flat background, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    r = np.hypot(x - center[0], y - center[1])
    profile = np.exp(-0.5 * (r / radius_vox) ** 2)
    img = np.repeat(profile[:, :, None], SHAPE[2], axis=2)
    img = 1.0 + (img if bright else -img) * 0.8 + rng.normal(0, noise, SHAPE)
    label = np.repeat((r <= radius_vox)[:, :, None], SHAPE[2], axis=2)
    return img.astype(np.float32), label


def test_polarity_slice_axis_and_voxel_sigmas():
    assert vesselness.ridge_polarity("T2") == "bright" and vesselness.ridge_polarity("T2w_axial") == "bright"
    assert vesselness.ridge_polarity("T1w") == "dark" and vesselness.ridge_polarity("FLAIR") == "dark"
    assert vesselness.ridge_polarity("CT") is None
    assert vesselness.slice_axis((0.69, 0.69, 2.0)) == 2          # Cai's data: 2D per axial slice
    assert vesselness.slice_axis((2.0, 0.7, 0.7)) == 0
    assert vesselness.slice_axis((1.0, 1.0, 1.2)) is None           # near-isotropic: 3D
    # mm -> voxels: in-plane mean spacing in 2D, mean spacing in 3D
    assert vesselness.voxel_sigmas((0.69, 1.38), (0.69, 0.69, 2.0), 2) == pytest.approx([1.0, 2.0])
    assert vesselness.voxel_sigmas((1.0,), (1.0, 1.0, 1.3), None) == pytest.approx([1.0 / 1.1])


@pytest.mark.parametrize("spacing", [(0.69, 0.69, 2.0), (1.0, 1.0, 1.0)])
def test_bright_tube_gets_the_high_response(spacing):
    img, label = tube_volume(bright=True)
    resp = vesselness.frangi_response(img, spacing, (0.7, 1.4), bright=True)
    assert resp.shape == img.shape and resp.min() >= 0 and resp.max() <= 1
    inner = label[:, :, 2:-2]
    on, off = resp[:, :, 2:-2][inner], resp[:, :, 2:-2][~inner]
    assert np.median(on) > 10 * max(np.percentile(off, 99), 1e-6)
    # the same tube looked for as a dark ridge responds hardly at all
    dark = vesselness.frangi_response(img, spacing, (0.7, 1.4), bright=False)
    assert np.median(dark[:, :, 2:-2][inner]) < 0.1 * np.median(on)


def test_dark_tube_on_t1_like_image():
    img, label = tube_volume(bright=False)
    resp = vesselness.frangi_response(img, (1.0, 1.0, 1.0), (0.7, 1.4), bright=False)
    assert np.median(resp[label]) > 10 * max(np.percentile(resp[~label], 99), 1e-6)


def test_brain_mask_fills_and_erodes_but_keeps_the_array_border():
    img = np.zeros((20, 20, 6), np.float32)
    img[4:16, 4:16, :] = 1.0
    img[9, 9, 3] = 0.0     # a hole inside the brain is filled
    m = vesselness.brain_mask(img, (1.0, 1.0, 2.0), erode_mm=2.0)
    # 2 mm erosion = 2 voxels in-plane, 1 voxel through the 2 mm slices (but not at the array border)
    assert m[6:14, 6:14, :].all() and not m[5, 9, 3] and not m[:6].any()
    assert m.sum() == 8 * 8 * 6


def test_dice_at_thresholds_by_hand():
    resp = np.array([0.9, 0.8, 0.5, 0.3, 0.1, 0.0]).reshape(6, 1, 1)
    label = np.array([1, 1, 0, 1, 0, 0], bool).reshape(6, 1, 1)
    mask = np.array([1, 1, 1, 1, 1, 0], bool).reshape(6, 1, 1)
    got = tuning.dice_at_thresholds(resp, label, mask, [0.85, 0.4, 0.2, 0.05])
    # t=0.85: pred {0} TP 1 -> 2/(1+3); t=0.4: pred {0,1,2} TP 2 -> 4/6; t=0.2: {0..3} TP 3 -> 6/7; t=0.05: {0..4} -> 6/8
    np.testing.assert_allclose(got, [2 / 4, 4 / 6, 6 / 7, 6 / 8])
    # empty label and empty prediction: 1
    assert tuning.dice_at_thresholds(resp, np.zeros_like(label), None, [0.95])[0] == 1.0


def test_threshold_tuned_on_training_is_applied_unchanged_to_validation():
    train = [tube_volume(center=(12 + 4 * i, 20), seed=i) for i in range(3)]
    val_img, val_label = tube_volume(center=(26, 14), seed=9)
    sets = ((0.5,), (1.0, 2.0))
    thresholds = (0.01, 0.05, 0.1, 0.2, 0.4, 0.8)
    spacing = (1.0, 1.0, 1.0)
    grids = [tuning.case_dice_grid([vesselness.frangi_response(img, spacing, s, True) for s in sets], lab, None,
                                   thresholds) for img, lab in train]
    params = tuning.select(grids, sets, thresholds)
    mean = np.mean(grids, axis=0)
    i, j = np.unravel_index(np.argmax(mean), mean.shape)
    assert params.sigmas_mm == sets[i] and params.threshold == thresholds[j] and params.n_train == 3
    assert params.train_dice == pytest.approx(mean.max()) and params.train_dice > 0.5
    # validation: the training threshold, unchanged, gives the Dice computed from the response directly
    resp = vesselness.frangi_response(val_img, spacing, params.sigmas_mm, True)
    seg = tuning.segment(resp, params.threshold)
    tp = (seg & val_label).sum()
    assert 2 * tp / (seg.sum() + val_label.sum()) == pytest.approx(
        tuning.dice_at_thresholds(resp, val_label, None, [params.threshold])[0])
    assert 2 * tp / (seg.sum() + val_label.sum()) > 0.5
    # ties go to the earlier grid point
    flat = [np.ones((2, 3))]
    tie = tuning.select(flat, ((1.0,), (2.0,)), (0.1, 0.2, 0.3))
    assert tie.sigmas_mm == (1.0,) and tie.threshold == 0.1
    with pytest.raises(ValueError):
        tuning.select([], sets, thresholds)
