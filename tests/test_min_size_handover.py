"""Help and hand-overs that must say what the code does (issue 28 item 7).

* ``census --threshold-from EVAL`` without ``--min-size-mm3`` takes the cluster-size filter of that
  evaluation too: ``evaluate`` removes clusters of ``<= s`` voxels, census clusters of ``< V`` mm3,
  so ``V = (s + 1) x`` the evaluated voxel volume. Checked on a hand-computed case, through both
  real commands, where the other readings (``V = s v``, or no hand-over) keep a 2-voxel cluster.
* ``demo --tiny``'s help states the folds and budget ``DemoSettings`` really uses.
"""

from __future__ import annotations

from functools import partial

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from synthetic import save_nifti
from nnunet_pvs.census.inputs import min_size_from_sweep
from nnunet_pvs.errors import UserError

CLI = Path(sys.executable).parent / "nnunet-pvs"
SPACING = (0.5, 0.5, 2.0)  # voxel volume 0.5 mm3
AFFINE = np.diag([*SPACING, 1.0])
SHAPE = (20, 20, 6)


_nifti = partial(save_nifti, affine=AFFINE, dtype=np.uint8)


def _probabilities(fg: np.ndarray, stem: Path) -> None:
    """nnU-Net's CASE.npz (C, z, y, x) and CASE.pkl for the RAS grid AFFINE (LPS direction diag(-1, -1, 1))."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    p = fg.astype(np.float32).transpose(2, 1, 0)
    np.savez_compressed(f"{stem}.npz", probabilities=np.stack([1 - p, p]))
    with open(f"{stem}.pkl", "wb") as f:
        pickle.dump({"sitk_stuff": {"spacing": SPACING, "origin": (0.0, 0.0, 0.0),
                                    "direction": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)}}, f)


def _line(arr: np.ndarray, x0: int, n: int, y: int, z: int = 2) -> None:
    arr[x0:x0 + n, y, z] = 1


def _pooled(tmp: Path, rows: list[tuple], spacings=("0.5x0.5x2", "0.5x0.5x2")) -> Path:
    ev = tmp / "eval"
    ev.mkdir(parents=True)
    pd.DataFrame(rows, columns=["region", "threshold", "min_cluster_size", "cluster_dice"]).to_csv(
        ev / "cluster_sizes_pooled.csv", index=False)
    pd.DataFrame({"case": [f"c{i}" for i in range(len(spacings))], "spacing": list(spacings)}).to_csv(
        ev / "inputs.csv", index=False)
    return ev


def test_min_size_from_sweep_hand_computed(tmp_path):
    # at p >= 0.5, region whole: s = 2 and s = 3 tie at 0.8 -> the smaller, 2; the other threshold's
    # and region's higher values are not candidates
    ev = _pooled(tmp_path, [("whole", 0.5, 0, 0.6), ("whole", 0.5, 1, 0.7), ("whole", 0.5, 2, 0.8),
                            ("whole", 0.5, 3, 0.8), ("whole", 0.3, 4, 0.95), ("wm", 0.5, 5, 0.99)])
    got = min_size_from_sweep(ev, 0.5)
    # clusters of <= 2 voxels removed = volume below 3 voxels x 0.5 mm3
    assert got["min_cluster_size_voxels"] == 2 and got["voxel_volume_mm3"] == 0.5 and got["value"] == 1.5
    assert got["source"] == "sweep" and got["pooled_cluster_dice"] == 0.8
    assert min_size_from_sweep(ev / "thresholds.csv", 0.3)["value"] == pytest.approx(5 * 0.5)
    # no filter best: V = 0
    assert min_size_from_sweep(_pooled(tmp_path / "a", [("whole", 0.5, 0, 0.9), ("whole", 0.5, 3, 0.8)]),
                               0.5)["value"] == 0.0


@pytest.mark.parametrize("rows,spacings,message", [
    ([("whole", 0.5, 2, 0.8)], ("0.5x0.5x2", "1x1x1"), "2 different voxel volumes"),
    ([("whole", 0.4, 2, 0.8)], ("0.5x0.5x2",), "no defined cluster Dice in region 'whole' at threshold 0.5"),
])
def test_min_size_from_sweep_refuses_what_has_no_single_answer(tmp_path, rows, spacings, message):
    with pytest.raises(UserError, match=message) as e:
        min_size_from_sweep(_pooled(tmp_path, rows, spacings), 0.5)
    assert "--min-size-mm3" in str(e.value)


def test_census_takes_the_min_size_of_the_evaluation_it_takes_the_threshold_from(tmp_path):
    # evaluation: three 4-voxel PVS found, plus false positives of 1, 1 and 2 voxels. Pooled cluster
    # Dice at p >= 0.5: s = 0 -> PPV 3/6, Dice 0.667; s = 1 -> PPV 3/4, 0.857; s = 2 and s = 3 -> 1.0,
    # so s = 2 (the smaller of the tie), and V = (2 + 1) x 0.5 mm3 = 1.5 mm3
    ref, prob = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.float32)
    for y in (2, 8, 14):
        _line(ref, 2, 4, y)
    prob[ref > 0] = 0.9
    prob[12, 2, 2] = prob[12, 8, 2] = 0.9
    prob[12:14, 14, 2] = 0.9
    _nifti(ref, tmp_path / "ref" / "cv01.nii.gz")
    _probabilities(prob, tmp_path / "cv" / "cv01")
    ev = tmp_path / "eval"
    run_cli([CLI, "evaluate", "--ref", tmp_path / "ref", "--pred", tmp_path / "cv", "-o", ev, "--no-plots",
             "--thresholds", "0.5", "--min-cluster-sizes", "0:3"])
    # new scans: clusters of 1, 2, 3 and 4 voxels (0.5, 1.0, 1.5, 2.0 mm3)
    new = np.zeros(SHAPE, np.uint8)
    for n, y in zip((1, 2, 3, 4), (2, 8, 14, 18)):
        _line(new, 2 if n < 4 else 10, n, y if n < 4 else 2)
    _nifti(new, tmp_path / "new" / "s01.nii.gz")

    out = tmp_path / "census"
    p = run_cli([CLI, "census", "-i", tmp_path / "new", "-o", out, "--threshold-from", ev, "--no-plots"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"]["value"] == 0.5
    ms = summary["min_size"]
    assert (ms["source"], ms["min_cluster_size_voxels"], ms["voxel_volume_mm3"]) == ("sweep", 2, 0.5)
    assert summary["min_size_mm3"] == 1.5 and ms["pooled_cluster_dice"] == pytest.approx(1.0)
    kept = pd.read_csv(out / "clusters.csv").sort_values("n_voxels")
    assert kept["n_voxels"].tolist() == [3, 4] and kept["volume_mm3"].tolist() == [1.5, 2.0]
    assert "minimum cluster size from" in p.stdout and "2 voxel(s)" in p.stdout and "1.5" in p.stdout

    # an explicit --min-size-mm3 wins, and says so
    run_cli([CLI, "census", "-i", tmp_path / "new", "-o", tmp_path / "c2", "--threshold-from", ev, "--no-plots",
             "--min-size-mm3", "0"])
    s2 = json.loads((tmp_path / "c2" / "summary.json").read_text())
    assert s2["min_size"] == {"value": 0.0, "source": "option"}
    assert len(pd.read_csv(tmp_path / "c2" / "clusters.csv")) == 4


def test_demo_tiny_help_states_the_folds_and_budget_it_uses():
    from nnunet_pvs.demo import DemoSettings, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    s = DemoSettings.from_args(parser.parse_args(["--tiny"]))
    help_text = " ".join(run_cli([CLI, "demo", "--help"]).stdout.split())
    start = help_text.rindex("--tiny")  # the option's own entry, after the usage line
    tiny = help_text[start:help_text.index("--full", start)]
    assert s.folds == [0] and "fold 0 only" in tiny
    assert f"{s.epochs} epochs x {s.iterations} iterations ({s.val_iterations} validation iteration)" in tiny
    assert f"autoencoder {s.ae_epochs} x {s.ae_iterations}" in tiny
    assert f"{s.subjects} subjects per dataset (+{s.test} test, {s.unlabeled} unlabelled)" in tiny
