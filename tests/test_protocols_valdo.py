"""``--protocol valdo``, ``epvs`` and ``shivai`` against the values the challenges' own code gives.

The expected values below were computed on 2026-12-03 by running each evaluator's released code
(outside this project, unmodified) on exactly the cases built here:

- VALDO 2021: WhereIsValdo/valdo-eval-2021 at commit ee87c04e2e43f35fe607d81c9d89c3ee625fcd5a,
  ``evaluation_comparison/pairwise_measures.py``, class ``PairwiseMeasures`` with the settings of
  ``compare_segmentations.py -task epvs`` (``connectivity=3``, i.e. 26; ``threshold=0.5``;
  ``thresh_assign=0.1``; ``empty=True``; ``pixdim`` = the voxel size): ``numb_tp``, ``numb_fp``,
  ``f1_count_element``, ``absolute_difference``, ``mean_dsc_whenoverlap``,
  ``absolute_vol_difference`` and ``numb_fn``; FN is the count ``f1_count_element`` puts in its
  F1 (its ``nr_fn``: references absent from the assignment table ``assign_tp_fp`` builds), checked
  against 2TP / (2TP + FP + FN) = F1. The same cases were also run through
  ``compare_segmentations.run_compare`` on NIfTI files (same values to the CSV's 4 decimals), with
  numpy 2.4 / pandas 3.1 and again with numpy 1.23 / pandas 1.5 / scipy 1.10 / nibabel 4 (the
  challenge's era): identical values.
- EPVS 2024: hzlab/EPVS_challenge at commit 1a8b69d42340947c50b4162343c930b9da70432f,
  ``evaluate.py`` (``get_dice``, ``get_recall_and_precision``, ``get_avd``; the AVD capped at 1 as
  ``evaluate_participant_test.py`` does), on the prediction binarised at p >= 0.5.
- SHiVAi: pboutinaud/SHiVAi at commit 63b8503b2ac1f16d72a63224867cab5977fefece,
  ``src/shivai/utils/metrics.py`` ``image_metrics(..., threshold=0.5, cluster_filter=0)``. Not on
  the probability case: SHiVAi binarises with p > T where this package uses p >= T.

VALDO's F1 counts as FN only the reference clusters that no predicted cluster chose; a reference
chosen at IoU <= 0.1 is neither TP nor FN, and two equally good pieces of a split are two TP, so
FN is not n_ref - TP (the rule ``--protocol valdo`` got wrong before; see evaluation/protocols.py).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from nnunet_pvs.evaluation.case import Options, evaluate_case

CLI = Path(sys.executable).parent / "nnunet-pvs"
NAN = math.nan
HAND_SPACING = (1.0, 1.0, 1.0)
SCENE_SPACING = (0.5, 0.6, 2.0)


# ---------------------------------------------------------------- the cases
def _vol(shape=(12, 12, 12)):
    return np.zeros(shape, bool)


def case_split():
    """Reference A split by three pieces (IoU 0.5, 0.2, exactly 0.1), B by two (0.5, 0.25),
    C by two single voxels (IoU 1/11 each: C is chosen, yet no piece passes 0.1)."""
    ref, pred = _vol(), _vol()
    ref[2, 2, 0:10] = True
    pred[2, 2, 0:5] = pred[2, 2, 6:8] = pred[2, 2, 9] = True
    ref[6, 6, 0:4] = True
    pred[6, 6, 0:2] = pred[6, 6, 3] = True
    ref[9, 2, 0:11] = True
    pred[9, 2, 0] = pred[9, 2, 5] = True
    return ref, pred


def case_merge():
    """One prediction over three references (it chooses the middle one, 3 shared voxels); one over
    two with a tie in overlap (the first in C order wins); one whose chosen reference has IoU 1/12
    (the other, one-voxel reference is chosen by nothing)."""
    ref, pred = _vol(), _vol()
    ref[2, 2, 0:2] = ref[2, 2, 3:6] = ref[2, 2, 7:9] = True
    pred[2, 2, 0:9] = True
    ref[6, 6, 0:2] = ref[6, 6, 3:5] = True
    pred[6, 6, 1:4] = True
    ref[9, 9, 0:10] = ref[9, 9, 11] = True
    pred[9, 9, 9:12] = True
    return ref, pred


def case_iou_edge():
    """IoU exactly 0.1 three ways (1/10, 1/(2 + 9 - 1), 5/50), just above (2/19, 5/49), just
    below (1/11)."""
    ref, pred = _vol((16, 12, 12)), _vol((16, 12, 12))
    ref[0, 0, 0:10] = True
    pred[0, 0, 4] = True
    ref[2, 0, 0:12] = ref[2, 1, 0:7] = True
    pred[2, 0, 3:5] = True
    ref[4, 0, 0:11] = True
    pred[4, 0, 5] = True
    ref[6, 0, 0:9] = True
    pred[6, 0, 8:10] = True
    ref[8, 0:5, 0] = True
    pred[8, 0:10, 0:5] = True
    ref[11, 0:5, 0] = True
    pred[11, 0:10, 0:5] = True
    pred[11, 9, 4] = False
    return ref, pred


def case_equal_best():
    """Pieces with equal best IoU on one reference are all TP (IoU 2/5 and 2/5; 2/8, 2/8 and a
    losing 1/8)."""
    ref, pred = _vol(), _vol()
    ref[2, 2, 0:5] = True
    pred[2, 2, 0:2] = pred[2, 2, 3:5] = True
    ref[6, 6, 0:8] = True
    pred[6, 6, 0:2] = pred[6, 6, 3:5] = pred[6, 6, 6] = True
    return ref, pred


def case_diagonal():
    """Clusters joined only through corners or edges (26- but not 6-connected), and a
    corner-joined prediction over two references."""
    ref, pred = _vol(), _vol()
    for i in (1, 2, 3):
        ref[i, i, i] = True
    pred[2, 2, 2] = pred[3, 3, 3] = True
    ref[1, 5, 1] = ref[2, 6, 1] = True
    pred[1, 5, 1] = True
    ref[8, 1, 1:3] = ref[8, 1, 5:7] = True
    pred[8, 1, 2] = pred[9, 2, 3] = pred[8, 1, 4] = pred[8, 1, 5] = True
    return ref, pred


def case_no_overlap_fp():
    """An exact match and a prediction that overlaps nothing."""
    ref, pred = _vol(), _vol()
    ref[2, 2, 0:3] = pred[2, 2, 0:3] = True
    pred[8, 8, 8] = True
    return ref, pred


def case_empty_pred():
    ref, pred = _vol(), _vol()
    ref[2, 2, 0:3] = ref[8, 8, 8] = True
    return ref, pred


def case_empty_ref():
    ref, pred = _vol(), _vol()
    pred[2, 2, 0:3] = pred[8, 8, 8] = True
    return ref, pred


def case_both_empty():
    return _vol(), _vol()


def case_soft():
    """A probability map, binarised at p >= 0.5 (0.5 itself kept); VALDO's volume is the sum of
    the kept probabilities. p = 0.3 splits the first reference; the second is below threshold."""
    ref = _vol()
    pred = np.zeros(ref.shape, np.float32)
    ref[2, 2, 0:6] = True
    pred[2, 2, 0:6] = [0.9, 0.6, 0.5, 0.3, 0.7, 0.8]
    ref[6, 6, 0:3] = True
    pred[6, 6, 0:3] = 0.4
    pred[9, 9, 9] = 0.55
    return ref, pred


_DIRS = [(0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 1, 0), (0, 1, 1), (1, 1, 1), (1, -1, 0)]


def scene(seed: int, shape=(40, 36, 20), n: int = 50):
    """About ``n`` short line segments (axis-aligned and diagonal), with a prediction that copies,
    splits, truncates, shifts, misses or extends each, plus false positives; crossing segments
    merge on either side. Legacy ``RandomState``, whose stream NumPy keeps frozen (NEP 19)."""
    rs = np.random.RandomState(seed)
    ref, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    hi = np.asarray(shape) - 1

    def seg(start, d, length):
        return tuple(np.clip(start + np.outer(np.arange(length), d), 0, hi).T)

    for _ in range(n):
        start = rs.randint(1, hi, size=3)
        d = np.asarray(_DIRS[rs.randint(len(_DIRS))])
        length = rs.randint(1, 10)
        ref[seg(start, d, length)] = True
        action = rs.randint(6)
        if action == 0:                                       # copy
            pred[seg(start, d, length)] = True
        elif action == 1:                                     # split: drop every third voxel
            keep = [t for t in range(length) if t % 3 != 1]
            pred[tuple(np.clip(start + np.outer(keep, d), 0, hi).T)] = True
        elif action == 2:                                     # truncate: IoU k / length
            pred[seg(start, d, rs.randint(1, length + 1))] = True
        elif action == 3:                                     # shift along the segment
            pred[seg(start + d * rs.randint(1, 3), d, length)] = True
        elif action == 5:                                     # extend beyond its end
            pred[seg(start, d, length + rs.randint(1, 6))] = True
        # action 4: missed
    for _ in range(n // 5):                                   # false positives
        start = rs.randint(1, hi, size=3)
        pred[seg(start, np.asarray(_DIRS[rs.randint(len(_DIRS))]), rs.randint(1, 5))] = True
    return ref, pred


def all_cases() -> dict[str, tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]:
    """name -> (reference, prediction, voxel size in mm)."""
    hand = {name[5:]: f for name, f in globals().items() if name.startswith("case_")}
    out = {name: (*f(), HAND_SPACING) for name, f in hand.items()}
    out.update({f"scene{s}": (*scene(s), SCENE_SPACING) for s in (1, 2, 3)})
    return out


# ---------------------------------------------------------------- what the evaluators' code gave
VALDO = {  # TP, FP, FN (f1_count_element's), F1, |count diff|, mean Dice over TP, |volume diff| mm3, numb_fn
    "split": (2, 5, 0, 0.4444444444444444, 4, 0.873015873015873, 12.0, 0),
    "merge": (2, 1, 4, 0.4444444444444444, 4, 0.45, 7.0, 4),
    "iou_edge": (2, 4, 0, 0.5, 0, 0.18783068783068782, 46.0, 0),
    "equal_best": (4, 1, 0, 0.8888888888888888, 3, 0.829059829059829, 4.0, 0),
    "diagonal": (3, 0, 1, 0.8571428571428571, 1, 0.6, 2.0, 1),
    "no_overlap_fp": (1, 1, 0, 0.6666666666666666, 1, 1.0, 1.0, -1),
    "empty_pred": (0, 0, 2, 0.0, 2, 0.0, 4.0, 2),
    "empty_ref": (0, 2, 0, NAN, 2, NAN, 4.0, -1),
    "both_empty": (0, 0, 0, NAN, 0, NAN, 0.0, 0),
    "soft": (1, 2, 1, 0.4, 1, 0.9090909090909091, 4.949999988079071, 0),
    "scene1": (30, 11, 8, 0.759493670886076, 3, 0.7825991992491276, 12.6, 7),
    "scene2": (40, 14, 7, 0.7920792079207921, 8, 0.7312223045933454, 1.7999999999999998, 6),
    "scene3": (36, 17, 11, 0.72, 8, 0.7156593832425036, 3.0, 10),
}
EPVS = {  # Dice, recall, precision, AVD capped at 1
    "split": (0.6842105263157895, 1.0, 0.42857142857142855, 0.48),
    "merge": (0.5945945945945946, 1.0, 2.3333333333333335, 0.3181818181818182),
    "iou_edge": (0.18292682926829268, 1.0, 1.0, 0.7796610169491526),
    "equal_best": (0.8181818181818182, 1.0, 0.4, 0.3076923076923077),
    "diagonal": (0.625, 1.0, 1.3333333333333333, 0.2222222222222222),
    "no_overlap_fp": (0.8571428571428571, 1.0, 0.5, 0.3333333333333333),
    "empty_pred": (0.0, 0.0, 0.0, 1.0),
    "empty_ref": (0.0, 0.0, 0.0, 1.0),
    "both_empty": (NAN, 0.0, 0.0, 1.0),
    "soft": (0.6666666666666666, 0.5, 0.3333333333333333, 0.3333333333333333),
    "scene1": (0.7170626349892009, 0.8157894736842105, 0.7560975609756098, 0.08677685950413223),
    "scene2": (0.6734279918864098, 0.8913043478260869, 0.7592592592592593, 0.012096774193548387),
    "scene3": (0.6416861826697893, 0.8222222222222222, 0.6981132075471698, 0.023148148148148147),
}
SHIVAI = {  # cluster TP, FP, FN, sensitivity, precision, F1; voxel sensitivity, precision, F1
    "split": (3, 0, 0, 1.0, 1.0, 1.0, 0.52, 1.0, 0.6842105263157895),
    "merge": (7, 0, 0, 1.0, 1.0, 1.0, 0.5, 0.7333333333333333, 0.5945945945945946),
    "iou_edge": (6, 0, 0, 1.0, 1.0, 1.0, 0.2542372881355932, 0.14285714285714285, 0.18292682926829268),
    "equal_best": (2, 0, 0, 1.0, 1.0, 1.0, 0.6923076923076923, 1.0, 0.8181818181818182),
    "diagonal": (4, 0, 0, 1.0, 1.0, 1.0, 0.5555555555555556, 0.7142857142857143, 0.625),
    "no_overlap_fp": (1, 1, 0, 1.0, 0.5, 0.6666666666666666, 1.0, 0.75, 0.8571428571428571),
    "empty_pred": (0, 0, 2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "empty_ref": (0, 2, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "both_empty": (0, 0, 0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    "scene1": (31, 6, 7, 0.8157894736842105, 0.8378378378378378, 0.8266666666666665,
               0.6859504132231405, 0.751131221719457, 0.7170626349892009),
    "scene2": (41, 7, 5, 0.8913043478260869, 0.8541666666666666, 0.8723404255319149,
               0.6693548387096774, 0.6775510204081633, 0.6734279918864098),
    "scene3": (37, 8, 8, 0.8222222222222222, 0.8222222222222222, 0.8222222222222222,
               0.6342592592592593, 0.6492890995260664, 0.6416861826697893),
}
VALDO_COLS = ["valdo_tp", "valdo_fp", "valdo_fn", "valdo_f1", "valdo_abs_count_diff", "valdo_mean_tp_dice",
              "valdo_abs_volume_diff_mm3"]
EPVS_COLS = ["epvs_dice", "epvs_recall", "epvs_precision", "epvs_nvd"]
SHIVAI_COLS = ["shivai_tp", "shivai_fp", "shivai_fn", "shivai_sensitivity", "shivai_precision", "shivai_f1",
               "shivai_voxel_sensitivity", "shivai_voxel_precision", "shivai_voxel_f1"]
CASES = all_cases()


def _row(name: str, protocols: tuple[str, ...]) -> dict:
    ref, pred, spacing = CASES[name]
    rows = [r for r in evaluate_case(name, ref, pred, spacing, Options(protocols=protocols))["per_case"]
            if r["region"] == "whole"]
    assert len(rows) == 1
    return rows[0]


def _check(got: dict, cols: list[str], expected: tuple, case: str) -> None:
    for col, want in zip(cols, expected):
        # rel 1e-6: VALDO sums a float32 probability map in float32 too, we in another order
        assert got[col] == pytest.approx(want, rel=1e-6, nan_ok=True), (case, col, got[col], want)


def test_cases_are_what_the_evaluators_ran():
    """Guards the pinned values: the scenes are the ones VALDO's code counted (cluster counts as
    its ``count_ref`` / ``count_seg`` gave them)."""
    counts = {"scene1": (38, 41), "scene2": (46, 54), "scene3": (45, 53)}
    for name, (n_ref, n_pred) in counts.items():
        row = _row(name, ())
        assert (row["n_ref_clusters"], row["n_pred_clusters"]) == (n_ref, n_pred), name


@pytest.mark.parametrize("case", list(VALDO))
def test_valdo_matches_valdos_code(case):
    _check(_row(case, ("valdo",)), VALDO_COLS, VALDO[case][:7], case)


@pytest.mark.parametrize("case", list(VALDO))
def test_valdo_fn_against_valdos_numb_fn(case):
    """VALDO's ``numb_fn`` (its demographic tasks only) subtracts the distinct ``ref`` entries of
    its table, the background label of predictions that overlap nothing included (and -1 on an
    empty reference), so it is one below the FN its F1 uses exactly when some predicted cluster
    overlaps no reference (SHiVAi's FP count)."""
    row = _row(case, ("valdo", "shivai"))
    assert row["valdo_fn"] == VALDO[case][7] + (row["shivai_fp"] > 0)


@pytest.mark.parametrize("case", list(EPVS))
def test_epvs_matches_epvs_code(case):
    _check(_row(case, ("epvs",)), EPVS_COLS, EPVS[case], case)


@pytest.mark.parametrize("case", list(SHIVAI))
def test_shivai_matches_shivai_code(case):
    _check(_row(case, ("shivai",)), SHIVAI_COLS, SHIVAI[case], case)


def test_cli_protocol_columns_match_the_evaluators(tmp_path):
    """``nnunet-pvs evaluate --protocol valdo,epvs,shivai`` on NIfTI masks: per_case.csv holds the
    evaluators' own values (binary cases; the probability case is checked above)."""
    names = [n for n in CASES if n != "soft"]
    for name in names:
        ref, pred, spacing = CASES[name]
        affine = np.diag([*spacing, 1.0])
        for folder, arr in (("ref", ref), ("pred", pred)):
            (tmp_path / folder).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(arr.astype(np.uint8), affine), tmp_path / folder / f"{name}.nii.gz")
    out = tmp_path / "out"
    run_cli([CLI, "evaluate", "--ref", tmp_path / "ref", "--pred", tmp_path / "pred", "-o", out,
             "--protocol", "valdo,epvs,shivai", "--no-plots"])
    pc = pd.read_csv(out / "per_case.csv").set_index("case")
    assert sorted(pc.index) == sorted(names)
    for name in names:
        got = pc.loc[name].to_dict()
        _check(got, VALDO_COLS, VALDO[name][:7], name)
        _check(got, EPVS_COLS, EPVS[name], name)
        _check(got, SHIVAI_COLS, SHIVAI[name], name)
