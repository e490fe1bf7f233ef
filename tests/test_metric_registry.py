"""The metric registry: every column ``evaluate`` writes and ``compare`` can test is in it, with a direction.

A new metric column without a registry entry fails ``test_every_column_evaluate_writes_is_in_the_registry``
(run through the CLI with every metric option) or ``test_every_column_compare_can_test_is_in_the_registry``.
"""

from __future__ import annotations

from functools import partial

import inspect
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from synthetic import save_nifti

from nnunet_pvs import metric_registry as reg
from nnunet_pvs.errors import UserError

CLI = Path(sys.executable).parent / "nnunet-pvs"
SHAPE = (14, 12, 10)
# nnU-Net's .pkl geometry for these NIfTIs: SimpleITK (LPS) origin 0, identity direction, 1 mm,
# which is the RAS affine diag(-1, -1, 1)
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])
# key columns of the per-case tables; every other column is a metric
KEYS = {"case", "region", "threshold", "min_cluster_size", "size_group"}


_save = partial(save_nifti, affine=AFFINE, dtype=np.uint8)


def _write_case(root: Path, case: str, rng) -> None:
    """Truth: blobs of several sizes; reference: the truth less some voxels (a rater); prediction: an
    nnU-Net probability file (npz + pkl) close to the reference, with a few false blobs."""
    truth = np.zeros(SHAPE, bool)
    for x, y, z, r in ((3, 3, 3, 1), (9, 4, 6, 2), (5, 9, 7, 0), (10, 9, 2, 1), (2, 8, 8, 0)):
        truth[max(0, x - r):x + r + 1, max(0, y - r):y + r + 1, max(0, z - r):z + r + 1] = True
    ref = truth & (rng.random(SHAPE) > 0.15)
    prob = np.clip(ref * rng.uniform(0.4, 1.0, SHAPE) + (rng.random(SHAPE) > 0.97) * 0.6, 0, 1)
    _save(truth, root / "truth" / f"{case}.nii.gz")
    _save(ref, root / "ref" / f"{case}.nii.gz")
    left = np.zeros(SHAPE, bool)
    left[: SHAPE[0] // 2] = True
    _save(left, root / "regions" / f"{case}_left.nii.gz")
    pred = root / "pred"
    pred.mkdir(exist_ok=True)
    fg = prob.transpose(2, 1, 0).astype(np.float32)           # nnU-Net's (z, y, x)
    np.savez_compressed(pred / f"{case}.npz", probabilities=np.stack([1 - fg, fg]))
    with open(pred / f"{case}.pkl", "wb") as f:
        pickle.dump({"sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                                    "direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)}}, f)


def test_every_column_evaluate_writes_is_in_the_registry(tmp_path):
    """``evaluate`` with every metric option on probability maps: each metric column of each
    per-case table (and each metric named in the long tables) resolves in the registry."""
    rng = np.random.default_rng(3)
    for case in ("c1", "c2"):
        _write_case(tmp_path, case, rng)
    out = tmp_path / "out"
    run_cli([CLI, "evaluate", "--ref", tmp_path / "ref", "--pred", tmp_path / "pred", "-o", out,
             "--protocol", "valdo,epvs,shivai", "--match", "one-to-one", "--size-groups", "2",
             "--truth", tmp_path / "truth", "--regions", tmp_path / "regions", "--thresholds", "0.3,0.5",
             "--min-cluster-sizes", "0:2", "--no-plots"])
    columns: dict[str, set] = {}
    for table in ("per_case", "cluster_sizes", "cluster_sizes_pooled", "size_groups", "size_groups_pooled"):
        df = pd.read_csv(out / f"{table}.csv")
        assert len(df), table
        columns[table] = set(df.columns) - KEYS
    columns["thresholds (metric)"] = set(pd.read_csv(out / "thresholds.csv")["metric"])
    columns["summary (metric)"] = set(pd.read_csv(out / "summary.csv")["metric"])
    # the run did produce the optional columns this test is about
    assert {"valdo_abs_count_diff", "epvs_nvd", "shivai_f1", "truth_dice", "rater_truth_surface_dice",
            "hausdorff_mm", "pq"} <= columns["per_case"]
    assert set(pd.read_csv(out / "per_case.csv")["region"]) == {"whole", "left"}
    missing = {t: sorted(c for c in cols if reg.lookup(c) is None) for t, cols in columns.items()}
    assert not any(missing.values()), f"columns without a registry entry (add them to metric_registry): {missing}"


@pytest.mark.parametrize("groups", ["10", "2,5", "2.5,10mm3"])
def test_every_column_compare_can_test_is_in_the_registry(groups):
    from nnunet_pvs.compare.evaluate import metric_columns
    from nnunet_pvs.evaluation.case import CASE_METRICS, TRUTH_METRICS, Options
    from nnunet_pvs.evaluation.lesion_metrics import SizeGroups
    from nnunet_pvs.evaluation.protocols import PROTOCOL_METRICS

    opts = Options(protocols=tuple(PROTOCOL_METRICS), size_groups=SizeGroups.parse(groups))
    cols = metric_columns(opts) + CASE_METRICS + [f"{p}{m}" for p in ("truth_", "rater_truth_") for m in TRUTH_METRICS]
    assert any(c.startswith("detection_rate_") for c in cols)
    assert [c for c in cols if reg.lookup(c) is None] == []


def test_directions_by_hand():
    """Each direction by the rule of the module docstring (reference fixed, is larger always better?)."""
    expected = {
        "hausdorff_mm": "lower", "hd95_mm": "lower", "cluster_hd95_mm": "lower", "valdo_abs_count_diff": "lower",
        "epvs_nvd": "lower", "abs_volume_diff_mm3": "lower", "valdo_abs_volume_diff_mm3": "lower",
        "cluster_fp": "lower", "fn_voxels": "lower", "shivai_fn": "lower", "valdo_fp": "lower",
        "dice": "higher", "surface_dice": "higher", "pq": "higher", "valdo_f1": "higher",
        "epvs_precision": "higher", "ref_clusters_detected": "higher", "tp_voxels": "higher",
        "n_ref_clusters": "neither", "n_pred_clusters": "neither", "pred_volume_mm3": "neither",
        "ref_volume_mm3": "neither", "cluster_tp": "neither", "tpr_tp": "neither",
        # parametric names
        "truth_dice": "higher", "rater_truth_cluster_ppv": "higher", "truth_hd95_mm": "lower",
        "detection_rate_le10": "higher", "lesion_dice_10to20": "higher", "false_positives_gt20": "lower",
        "false_positives_le2p5mm3": "lower", "detection_rate_2p5to10mm3": "higher",
    }
    assert {k: reg.direction(k).value for k in expected} == expected
    assert reg.get("hausdorff_mm").higher_is_better is False and reg.get("dice").higher_is_better is True
    assert reg.get("n_ref_clusters").higher_is_better is None
    assert reg.get("truth_dice").description.startswith("against the noise-free truth")
    assert reg.get("detection_rate_le10").unit == "fraction"
    for bad in ("bogus", "dice_le10", "truth_bogus", "detection_rate_", "detection_rate_le", "Dice"):
        assert reg.lookup(bad) is None, bad
    with pytest.raises(UserError, match="'bogus'.*metric registry"):
        reg.get("bogus")


def test_best_follows_the_direction():
    assert reg.get("dice").best([0.5, float("nan"), 0.7, None]) == 0.7
    assert reg.get("hausdorff_mm").best([3.0, 1.5, float("inf"), 2.0]) == 1.5
    assert reg.get("n_pred_clusters").best([3, 1]) is None
    assert reg.get("dice").best([float("nan")]) is None


def test_every_function_resolves_and_names_its_column():
    """The named function exists and writes the column (its source holds the name quoted); functions
    that return one bare value are named in ``evaluate_pair``, which puts it under its column."""
    from nnunet_pvs.evaluation.case import evaluate_pair

    pair_src = inspect.getsource(evaluate_pair)
    for m in reg.METRICS.values():
        if m.function is None:
            continue
        fn = m.computed_by()
        assert callable(fn), m.name
        assert f'"{m.name}"' in inspect.getsource(fn) or f'"{m.name}"' in pair_src, m.name
    assert reg.get("detection_rate_gt10").computed_by().__name__ == "size_group_rows"
