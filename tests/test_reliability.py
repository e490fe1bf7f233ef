"""The reliability signal (nnunet_pvs/reliability.py) against hand-computed values, and read from nnU-Net files."""

from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest
from scipy import ndimage

from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation.io import read_probabilities
from nnunet_pvs.reliability import (fold_disagreement, judged_region, mean_core_probability, reliability,
                                   uncertain_share)


def _line(values) -> np.ndarray:
    """A (1, 1, n) float32 volume: a row of voxels whose neighbourhoods are easy to count by hand."""
    return np.asarray(values, np.float32).reshape(1, 1, -1)


LINE = _line([0.0, 0.1, 0.4, 0.9, 0.6, 0.2, 0.0])


def test_line_by_hand():
    # core: 0.9, 0.6 (indices 3, 4); dilated by one voxel: indices 2..5 -> 0.4, 0.9, 0.6, 0.2 (mass 2.1)
    # hesitant in [0.3, 0.7]: 0.4 and 0.6 (mass 1.0, 2 of 4 voxels)
    assert uncertain_share(LINE) == pytest.approx(1.0 / 2.1, rel=1e-6)
    assert uncertain_share(LINE, by="voxels") == pytest.approx(2 / 4)
    r = reliability(LINE)
    assert r["predicted_voxels"] == 2
    assert r["uncertain_share"] == pytest.approx(1.0 / 2.1, rel=1e-6)
    assert r["uncertain_voxel_share"] == pytest.approx(0.5)
    assert r["mean_core_probability"] == pytest.approx((0.9 + 0.6) / 2, rel=1e-6)


def test_threshold_moves_the_judged_region():
    # threshold 0.35: core 0.4, 0.9, 0.6 (indices 2..4); region indices 1..5 -> mass 0.1+0.4+0.9+0.6+0.2 = 2.2
    assert uncertain_share(LINE, threshold=0.35) == pytest.approx(1.0 / 2.2, rel=1e-6)
    assert reliability(LINE, threshold=0.35)["predicted_voxels"] == 3
    assert mean_core_probability(LINE, threshold=0.35) == pytest.approx((0.4 + 0.9 + 0.6) / 3, rel=1e-6)
    # a narrower band [0.45, 0.65]: only 0.6 is hesitant -> 0.6 / 2.1
    assert uncertain_share(LINE, low=0.45, high=0.65) == pytest.approx(0.6 / 2.1, rel=1e-6)


def test_rim_is_the_26_neighbourhood_and_no_further():
    prob = np.zeros((5, 5, 5), np.float32)
    prob[2, 2, 2] = 0.8
    prob[1, 1, 1] = 0.4   # diagonal neighbour: judged
    prob[0, 2, 2] = 0.45  # two voxels away: not judged
    region = judged_region(prob)
    assert region.sum() == 27 and region[1, 1, 1] and not region[0, 2, 2]
    assert uncertain_share(prob) == pytest.approx(0.4 / 1.2, rel=1e-6)
    assert uncertain_share(prob, by="voxels") == pytest.approx(1 / 27)


def test_band_edges_are_inclusive_and_threshold_voxels_can_be_hesitant():
    prob = _line([0.3, 0.5, 0.7])  # all three: 0.5 is the core, 0.3 and 0.7 sit on the band's edges
    assert uncertain_share(prob) == pytest.approx(1.0)
    assert uncertain_share(_line([0.29, 0.5, 0.71])) == pytest.approx(0.5 / 1.5, rel=1e-6)


def test_certain_and_empty_predictions():
    certain = np.zeros((4, 4, 4), np.float32)
    certain[1:3, 1:3, 1:3] = 1.0
    assert uncertain_share(certain) == 0.0
    assert reliability(certain) == {"predicted_voxels": 8, "uncertain_share": 0.0, "uncertain_voxel_share": 0.0,
                                    "mean_core_probability": 1.0}
    nothing = np.full((4, 4, 4), 0.45, np.float32)  # hesitant everywhere, but nothing predicted
    r = reliability(nothing)
    assert r["predicted_voxels"] == 0
    assert all(math.isnan(r[k]) for k in ("uncertain_share", "uncertain_voxel_share", "mean_core_probability"))


def test_softer_maps_score_higher():
    """The behaviour the signal exists for: the same prediction, made less confident, reads less reliable."""
    logits = np.full((24, 24, 8), -8.0, np.float32)
    logits[6:8, 4:20, :] = 8.0   # two PVS-like tubes
    logits[15, 3:21, 2:6] = 8.0
    logits = ndimage.gaussian_filter(logits, 0.7)
    maps = [1 / (1 + np.exp(-logits / temperature)) for temperature in (0.5, 1, 2, 4, 8)]
    shares = [uncertain_share(p) for p in maps]
    assert all(a < b for a, b in itertools.pairwise(shares)), shares
    assert shares[0] < 0.05 and shares[-1] > 0.5
    core_means = [mean_core_probability(p) for p in maps]
    assert all(a > b for a, b in itertools.pairwise(core_means)), core_means


def test_fold_disagreement_by_hand():
    a = np.zeros((1, 1, 6), np.float32)
    a[0, 0, :4] = 0.9                     # 4 voxels
    b = np.zeros_like(a)
    b[0, 0, 2:4] = 0.8                    # 2 voxels, both inside a -> Dice(a, b) = 2*2 / (4+2) = 2/3
    assert fold_disagreement([a, b]) == pytest.approx(1 - 2 / 3)
    # pairs (a, b) 2/3, (a, a) 1, (b, a) 2/3 -> mean 7/9
    assert fold_disagreement([a, b, a.copy()]) == pytest.approx(1 - 7 / 9)
    assert fold_disagreement([a, a.copy()]) == 0.0
    empty = np.zeros_like(a)
    assert fold_disagreement([empty, empty.copy()]) == 0.0   # both empty: they agree
    assert fold_disagreement([a, empty]) == 1.0
    assert fold_disagreement([a, b], threshold=0.85) == 1.0  # b has nothing at 0.85


def test_read_from_nnunet_probability_files(tmp_path):
    """What the census will do: read nnU-Net's CASE.npz + CASE.pkl, then compute the signal."""
    rng = np.random.default_rng(3)
    fg = ndimage.gaussian_filter(rng.random((20, 18, 6)).astype(np.float32), 1.0)
    fg = (fg - fg.min()) / (fg.max() - fg.min())
    p = fg.transpose(2, 1, 0)  # nnU-Net's (z, y, x)
    np.savez_compressed(tmp_path / "c1.npz", probabilities=np.stack([1 - p, p]))
    with open(tmp_path / "c1.pkl", "wb") as f:
        pickle.dump({"sitk_stuff": {"spacing": (0.7, 0.7, 2.0), "origin": (0.0, 0.0, 0.0),
                                    "direction": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)}}, f)
    vol = read_probabilities(tmp_path / "c1.npz", "c1")
    got = reliability(vol.data)
    assert got["predicted_voxels"] == int((fg >= 0.5).sum()) > 0
    assert got["uncertain_share"] == pytest.approx(uncertain_share(fg), rel=1e-6)
    assert 0 < got["uncertain_share"] < 1


@pytest.mark.parametrize("prob, kwargs, words", [
    (np.ones((3, 3, 3), bool), {}, "binary mask"),
    (np.ones((3, 3, 3), np.uint8), {}, "binary mask"),
    (np.full((3, 3), 0.6, np.float32), {}, "2D"),
    (np.full((3, 3, 3), np.nan, np.float32), {}, "NaN"),
    (np.full((3, 3, 3), 1.5, np.float32), {}, "outside [0, 1]"),
    (np.full((3, 3, 3), 0.6, np.float32), {"low": 0.7, "high": 0.3}, "low < high"),
    (np.full((3, 3, 3), 0.6, np.float32), {"threshold": 0.0}, "threshold 0"),
])
def test_bad_input_is_one_clear_error(prob, kwargs, words):
    with pytest.raises(UserError) as err:
        reliability(prob, **kwargs)
    assert words in str(err.value)


def test_bad_fold_inputs():
    a = np.full((2, 2, 2), 0.9, np.float32)
    with pytest.raises(UserError, match="at least 2 folds"):
        fold_disagreement([a])
    with pytest.raises(UserError, match=r"fold entry 1 has shape \(2, 2, 3\)"):
        fold_disagreement([a, np.full((2, 2, 3), 0.9, np.float32)])
    with pytest.raises(UserError, match="by='count'"):
        uncertain_share(a, by="count")
