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
