"""``nnunet-pvs splits``: stratified folds (nnU-Net and Cai protocols) in splits_final.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from nnunet_pvs.errors import UserError
from nnunet_pvs.dataset_conversion.splits import make_folds, stratified_groups
from synthetic import write_tiny_dataset

BIN = Path(sys.executable).parent
CLI = BIN / "nnunet-pvs"


def _ages(n=23, seed=0):
    rng = np.random.default_rng(seed)
    return {f"c{i:02d}": float(v) for i, v in enumerate(rng.uniform(42, 79, n))}


def test_groups_partition_and_balance():
    values = _ages(23)
    groups = stratified_groups(values, 5, seed=1)
    flat = [c for g in groups for c in g]
    assert sorted(flat) == sorted(values) and len(flat) == len(set(flat))
    assert sorted(len(g) for g in groups) == [4, 4, 5, 5, 5]
    # Tolerance: each group takes one case from each sorted block of 5, so its mean over the full
    # blocks is within (max - min) / n_blocks of the overall mean of those blocks.
    order = sorted(values, key=values.get)
    full = order[: 20]
    v = np.array([values[c] for c in full])
    tol = (v.max() - v.min()) / 4
    for g in groups:
        gm = np.mean([values[c] for c in g if c in full])
        assert abs(gm - v.mean()) <= tol + 1e-9
    # and far better than the bound in practice: spread of group means < 1/3 of the sd of ages
    means = [np.mean([values[c] for c in g]) for g in groups]
    assert np.std(means) < np.std(list(values.values())) / 3


def test_deterministic_and_seed_dependent():
    values = _ages(20)
    assert stratified_groups(values, 5, 3) == stratified_groups(values, 5, 3)
    assert stratified_groups(values, 5, 3) != stratified_groups(values, 5, 4)


def test_nnunet_protocol_each_case_validated_once():
    groups = stratified_groups(_ages(20), 5, 0)
    splits, tests = make_folds(groups, "nnunet", 0)
    assert len(splits) == 5 and all(t == [] for t in tests)
    seen = [c for s in splits for c in s["val"]]
    assert sorted(seen) == sorted(_ages(20)) and len(seen) == len(set(seen))
    for s in splits:
        assert not set(s["train"]) & set(s["val"]) and len(s["train"]) + len(s["val"]) == 20


def test_cai_protocol_one_test_one_val_three_train():
    groups = stratified_groups(_ages(20), 5, 0)
    splits, tests = make_folds(groups, "cai", 0)
    assert sorted(c for t in tests for c in t) == sorted(_ages(20))  # each case tested exactly once
    for k, (s, t) in enumerate(zip(splits, tests)):
        assert t == groups[k]
        assert s["val"] in groups and s["val"] != t
        assert not (set(s["train"]) & set(s["val"])) and not (set(s["train"]) & set(t))
        assert len(s["train"]) == 12 and len(s["val"]) == 4


def test_too_few_cases():
    with pytest.raises(UserError):
        stratified_groups({"a": 1.0, "b": 2.0}, 5, 0)


def test_cli_by_age_cai_and_pvs_load(nnunet_env):
    env = nnunet_env["env"]
    root = write_tiny_dataset(nnunet_env["nnUNet_raw"], 12, n_cases=10, n_test=0)
    rng = np.random.default_rng(0)
    ages = rng.uniform(40, 80, 10).round(1)
    pd.DataFrame({"case_id": [f"case{i:03d}" for i in range(10)], "age": ages}).to_csv(root / "covariates.csv",
                                                                                     index=False)
    p = run_cli([CLI, "splits", "-d", 12, "--by", "age", "--protocol", "cai", "--seed", 1], env=env)
    assert "val_mean" in p.stdout and "test_mean" in p.stdout and p.stdout.count("\n") >= 7
    out = nnunet_env["nnUNet_preprocessed"] / "Dataset012_TinyPVS"
    splits = json.loads((out / "splits_final.json").read_text())
    assert len(splits) == 5 and all(set(s) == {"train", "val"} for s in splits)
    tests = json.loads((out / "test_groups.json").read_text())["folds"]
    for k, f in enumerate(tests):
        assert (out / f"test_fold{k}.txt").read_text().split() == f["test"]
        assert not set(f["test"]) & set(splits[k]["train"] + splits[k]["val"])
    # same call again: fine; other seed: refused without --force
    run_cli([CLI, "splits", "-d", 12, "--by", "age", "--protocol", "cai", "--seed", 1], env=env)
    p = run_cli([CLI, "splits", "-d", 12, "--by", "age", "--seed", 2], env=env, check=False)
    assert p.returncode == 2 and "splits_final.json" in p.stderr and "--force" in p.stderr
    # PVS load from the masks (covariates.csv has no pvs_voxels), nnU-Net protocol
    run_cli([CLI, "splits", "-d", 12, "--force"], env=env)
    splits = json.loads((out / "splits_final.json").read_text())
    assert sorted(c for s in splits for c in s["val"]) == [f"case{i:03d}" for i in range(10)]
    assert not (out / "test_groups.json").exists() and not list(out.glob("test_fold*.txt"))
    p = run_cli([CLI, "splits", "-d", 12, "--by", "site", "--force"], env=env, check=False)
    assert p.returncode == 2 and "covariates.csv" in p.stderr and "site" in p.stderr
    p = run_cli([CLI, "splits", "-d", 99], env=env, check=False)
    assert p.returncode == 2 and "Dataset099" in p.stderr


def _spread_of_fold_means(folds: list[list[str]], values: dict[str, float]) -> float:
    return float(np.std([np.mean([values[c] for c in f]) for f in folds]))


def _random_split_spreads(values: dict[str, float], n: int = 2000) -> np.ndarray:
    """Spread of the 5 fold means for ``n`` random 5-fold partitions of the same cases."""
    rng = np.random.default_rng(123)
    ids = sorted(values)
    out = []
    for _ in range(n):
        perm = rng.permutation(ids)
        out.append(_spread_of_fold_means([list(perm[k::5]) for k in range(5)], values))
    return np.array(out)


@pytest.mark.parametrize("source", ["mask_voxels", "covariates_column"])
def test_cli_by_pvs_load_spreads_the_load_across_folds(nnunet_env, source):
    """The default ``--by pvs_load`` balances a heavy-tailed PVS load: every validation fold spans
    the range and the spread of fold means is far below what random folds give (it would be a
    random split's if the load were ignored). With ``pvs_voxels`` in covariates.csv that column is
    the load, not the masks."""
    import nibabel as nib

    raw = nnunet_env["nnUNet_raw"]
    root = raw / "Dataset014_Load"
    (root / "labelsTr").mkdir(parents=True)
    rng = np.random.default_rng(7)
    ids = [f"case{i:03d}" for i in range(25)]
    mask_load = dict(zip(ids, np.unique(rng.lognormal(4.5, 0.9, 200).astype(int))[::-1][:25].tolist()))
    rng.shuffle(ids)  # load uncorrelated with id order
    mask_load = dict(zip(ids, mask_load.values()))
    for cid, n in mask_load.items():
        m = np.zeros(1000, np.uint8)
        m[:n] = 1
        nib.save(nib.Nifti1Image(m.reshape(10, 10, 10), np.eye(4)), str(root / "labelsTr" / f"{cid}.nii.gz"))
    load = {c: float(v) for c, v in mask_load.items()}
    if source == "covariates_column":  # a different load per case than the masks hold
        load = dict(zip(sorted(load), rng.permutation(list(load.values())).tolist()))
        pd.DataFrame({"case_id": list(load), "pvs_voxels": [int(v) for v in load.values()]}).to_csv(
            root / "covariates.csv", index=False)
    p = run_cli([CLI, "splits", "-d", 14], env=nnunet_env["env"])
    assert "stratified by pvs_load" in p.stdout
    splits = json.loads((nnunet_env["nnUNet_preprocessed"] / root.name / "splits_final.json").read_text())
    folds = [s["val"] for s in splits]
    assert sorted(c for f in folds for c in f) == sorted(load)
    # balance of the load's ranks: far below what random folds give (1st percentile of 2000)
    order = sorted(load, key=lambda c: (load[c], c))
    rank = {c: float(r) for r, c in enumerate(order)}
    ours = _spread_of_fold_means(folds, rank)
    random_spreads = _random_split_spreads(rank)
    assert ours < np.percentile(random_spreads, 1), (ours, np.percentile(random_spreads, [1, 50]))
    # the documented bound on the load itself: a fold's mean is within (max - min) / n_blocks of
    # the overall mean (5 full blocks here)
    v = np.array(list(load.values()))
    for f in folds:
        assert abs(np.mean([load[c] for c in f]) - v.mean()) <= (v.max() - v.min()) / 5 + 1e-9
    # each fold takes one case of every block of 5 sorted loads, the lowest and the highest included
    for f in folds:
        assert len(set(f) & set(order[:5])) == 1 and len(set(f) & set(order[-5:])) == 1


def test_text_covariate_is_categorical_and_said_so(nnunet_env):
    root = write_tiny_dataset(nnunet_env["nnUNet_raw"], 16, n_cases=10, n_test=0, shape=(8, 8, 4))
    sites = ["A", "B"] * 5
    pd.DataFrame({"case_id": [f"case{i:03d}" for i in range(10)], "site": sites}).to_csv(
        root / "covariates.csv", index=False)
    p = run_cli([CLI, "splits", "-d", 16, "--by", "site"], env=nnunet_env["env"])
    assert "'site' is categorical (2 categories: A, B)" in p.stdout and "val_counts" in p.stdout
    splits = json.loads((nnunet_env["nnUNet_preprocessed"] / root.name / "splits_final.json").read_text())
    site = dict(zip([f"case{i:03d}" for i in range(10)], sites))
    assert all(sorted(site[c] for c in s["val"]) == ["A", "B"] for s in splits)
