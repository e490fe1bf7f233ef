"""evaluate's metric options as `compare` receives them (nnunet_pvs.compare.evaluate)."""

from __future__ import annotations

import argparse

import nibabel as nib
import numpy as np
import pytest
from test_evaluation_metrics import challenge_case

from nnunet_pvs.compare import evaluate as ce
from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation.io import PredFiles


def compare_like_parser():
    p = argparse.ArgumentParser()
    p.add_argument("--match", default="overlap")                       # compare's own options
    p.add_argument("--connectivity", type=int, default=26)
    ce.add_evaluation_arguments(p)                                     # must not clash with them
    return p


def test_arguments_and_options():
    p = compare_like_parser()
    args = p.parse_args(["--match", "one-to-one:iou:0.5", "--protocol", "valdo,epvs", "--nsd-tolerance", "2",
                         "--surface-connectivity", "26", "--size-groups", "10", "--region-mode", "cut"])
    o = ce.evaluation_options(args)
    assert (str(o.rule), o.protocols, o.nsd_tolerance, o.surface_connectivity, o.region_mode) == (
        "one-to-one:iou:0.5", ("valdo", "epvs"), 2.0, 26, "cut")
    assert o.thresholds == () and o.min_cluster_sizes == (0,) and o.threshold == 0.5
    assert ce.metric_columns(o)[-6:] == ["detection_rate_le10", "lesion_dice_le10", "false_positives_le10",
                                         "detection_rate_gt10", "lesion_dice_gt10", "false_positives_gt10"]
    assert {"surface_dice", "pq", "lesion_dice", "valdo_f1", "epvs_nvd", "shivai_f1"} <= set(ce.NEW_METRIC_COLUMNS)
    defaults = ce.evaluation_options(p.parse_args([]))
    assert (str(defaults.rule), defaults.protocols, defaults.region_mode) == ("overlap", (), "majority")
    for bad in (["--protocol", "x"], ["--nsd-tolerance", "0"], ["--size-groups", "3,1"],
                ["--protocol", "valdo", "--connectivity", "6"]):
        with pytest.raises(UserError):
            ce.evaluation_options(p.parse_args(bad))


def test_evaluate_models_carries_the_new_columns(tmp_path):
    ref, pred = challenge_case()
    for name, arr in (("ref", ref), ("pred", pred)):
        (tmp_path / name).mkdir()
        nib.save(nib.Nifti1Image(arr.astype(np.uint8), np.eye(4)), tmp_path / name / "hand.nii.gz")
    args = compare_like_parser().parse_args(["--match", "one-to-one:iou:0.5", "--protocol", "valdo",
                                             "--size-groups", "2,5"])
    opts = ce.evaluation_options(args)
    df = ce.evaluate_models(["hand"], {"hand": tmp_path / "ref" / "hand.nii.gz"},
                            {"m": {"hand": PredFiles(seg=tmp_path / "pred" / "hand.nii.gz")}}, opts)
    row = df.iloc[0]
    assert set(ce.metric_columns(opts)) <= set(df.columns)
    assert (row["cluster_tp"], row["cluster_fp"], row["cluster_fn"]) == (2, 3, 3)   # hand-counted
    assert row["valdo_f1"] == pytest.approx(4 / 9) and row["pq"] == pytest.approx(0.2)
    assert row["detection_rate_le2"] == 0 and row["detection_rate_2to5"] == 1 and row["detection_rate_gt5"] == 0.5
    assert row["false_positives_le2"] == 3 and row["lesion_dice_gt5"] == pytest.approx(10 / 15)
