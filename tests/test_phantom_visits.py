"""Phantom follow-up visits and rescans (``nnunet-pvs phantom --follow-up --rescan``): known PVS changes,
head motion that the recorded transform undoes, and baseline files untouched by the flags."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from conftest import run_cli
from nnunet_pvs.dataset_conversion.phantom import generate_subject
from nnunet_pvs.dataset_conversion.phantom import visits as V

CLI = Path(sys.executable).parent / "nnunet-pvs"
CASES = ["pvs000", "pvs001", "pvs002"]  # two training subjects and one test subject


def _load(path: Path) -> nib.Nifti1Image:
    return nib.load(str(path))


def _data(path: Path) -> np.ndarray:
    return np.asanyarray(_load(path).dataobj)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The same phantom twice, with and without visits."""
    raw = tmp_path_factory.mktemp("raw")
    common = ["--size", "tiny", "--subjects", 2, "--test", 1, "--seed", 4, "-o", raw]
    run_cli([CLI, "phantom", *common, "-d", 31, "--follow-up", "--rescan"])
    run_cli([CLI, "phantom", *common, "-d", 32])
    return raw / "Dataset031_PVSPhantomT2w", raw / "Dataset032_PVSPhantomT2w"


@pytest.fixture(scope="module")
def truth(datasets):
    return pd.read_csv(datasets[0] / "visits" / "changes_truth.csv")


@pytest.fixture(scope="module")
def motion(datasets):
    return pd.read_csv(datasets[0] / "visits" / "motion.csv")


def _baseline_image(folder: Path, case: str) -> Path:
    return next((folder / d / f"{case}_0000.nii.gz") for d in ("imagesTr", "imagesTs")
                if (folder / d / f"{case}_0000.nii.gz").exists())


def _baseline_truth(folder: Path, case: str) -> Path:
    return next((folder / d / f"{case}.nii.gz") for d in ("labelsTr_truth", "labelsTs_truth")
                if (folder / d / f"{case}.nii.gz").exists())


def test_rigid_matrix_hand_computed():
    """90 deg about z around c = (10, 0, 0), then the centre moves by (1, 2, 3): c + (1, 0, 0) ->
    c + (0, 1, 0) + (1, 2, 3) = (11, 3, 3); the centre itself goes to (11, 2, 3). 90 deg about x takes
    (0, 1, 0) to (0, 0, 1); rotations compose as Rz Ry Rx (x first)."""
    m = V.rigid_matrix((0, 0, 90), (1, 2, 3), (10, 0, 0))
    np.testing.assert_allclose(m @ [11, 0, 0, 1], [11, 3, 3, 1], atol=1e-12)
    np.testing.assert_allclose(m @ [10, 0, 0, 1], [11, 2, 3, 1], atol=1e-12)
    np.testing.assert_allclose(V.rigid_matrix((90, 0, 0), (0, 0, 0), (0, 0, 0)) @ [0, 1, 0, 1], [0, 0, 1, 1],
                               atol=1e-12)
    # x by 90 then z by 90: (0, 1, 0) -> (0, 0, 1) -> (0, 0, 1); (1, 0, 0) -> (1, 0, 0) -> (0, 1, 0)
    both = V.rigid_matrix((90, 0, 90), (0, 0, 0), (0, 0, 0))
    np.testing.assert_allclose(both @ [0, 1, 0, 1], [0, 0, 1, 1], atol=1e-12)
    np.testing.assert_allclose(both @ [1, 0, 0, 1], [0, 1, 0, 1], atol=1e-12)
    np.testing.assert_allclose(V.rigid_matrix((0, 0, 0), (0, 0, 0), (5, 5, 5)), np.eye(4))


def test_resample_moves_content_with_the_head():
    """A head shifted by one voxel along x (2 mm on a 2 mm grid): the visit shows at voxel i what the
    baseline had at voxel i - 1; at the edge the edge value continues."""
    an = {"origin": np.array([-3.0, 0.0, 0.0]), "spacing": np.array([2.0, 1.0, 1.0])}
    vol = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((5, 2, 2), np.float32)
    out = V.resample(vol, V.rigid_matrix((0, 0, 0), (2.0, 0, 0), (0, 0, 0)), an)
    np.testing.assert_allclose(out[:, 0, 0], [0, 0, 1, 2, 3])
    half = V.resample(vol, V.rigid_matrix((0, 0, 0), (1.0, 0, 0), (0, 0, 0)), an)
    np.testing.assert_allclose(half[1:, 1, 1], [0.5, 1.5, 2.5, 3.5])  # linear between voxels


def test_margin_rules_hand_values():
    assert V.meets_margin("enlarged", 4, 9)          # x2.25, +5
    assert not V.meets_margin("enlarged", 4, 8)      # x2 but only +4 voxels: within the rescan noise floor
    assert not V.meets_margin("enlarged", 12, 17)    # +5 but x1.42
    assert V.meets_margin("enlarged", 10, 15)
    assert V.meets_margin("shrunk", 10, 5) and V.meets_margin("shrunk", 7, 2)
    assert not V.meets_margin("shrunk", 12, 7)       # x0.58
    assert not V.meets_margin("shrunk", 6, 2)        # x0.33 but only -4 voxels
    assert not V.meets_margin("shrunk", 10, 1)       # would be all but gone: not a shrunk PVS


def test_touching_ids():
    ids = np.zeros((6, 6, 6), np.int32)
    ids[1, 1, 1] = 1
    ids[2, 2, 2] = 2          # diagonal neighbour of 1 (26-connectivity)
    ids[4, 4, 4] = ids[4, 4, 5] = 3
    ids[0, 5, 0] = 4
    assert V.touching_ids(ids) == {1, 2}
    assert V.touching_ids(ids, 2) == {1, 2, 3}         # 3 is 2 voxels from 2 along every axis ...
    ids[4, 4, 4] = 0
    assert V.touching_ids(ids, 2) == {1, 2}            # ... and 3 voxels once its nearer voxel is gone
    ids[3, 3, 4] = 5
    assert V.touching_ids(ids, 2) == {1, 2, 3, 5}


def test_scene_changes_nothing_and_reproduces_the_baseline():
    """Keeping the scene draws nothing; composing it without motion gives back the baseline's truth ids
    and PVS fractions exactly; a visit is deterministic and the rescan only moves the head."""
    plain = generate_subject("T2w", "tiny", seed=4, index=1)
    s = generate_subject("T2w", "tiny", seed=4, index=1, keep_scene=True)
    for a in ("image", "mask", "truth", "labels", "pvs_fraction"):
        np.testing.assert_array_equal(getattr(plain, a), getattr(s, a))
    _, pvs_w, ids, tissue_ok, _ = V.compose(s.scene, s.scene.tubes, np.eye(4))
    np.testing.assert_array_equal(ids, s.scene.truth_ids)
    np.testing.assert_array_equal(ids > 0, s.truth > 0)
    np.testing.assert_array_equal(pvs_w, s.pvs_fraction)
    a, b = V.make_visit(s.scene, "follow_up"), V.make_visit(s.scene, "follow_up")
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.pvs_ids, b.pvs_ids)
    r = V.make_visit(s.scene, "rescan")
    assert r.motion != a.motion and {row["status"] for row in r.rows} == {"stable"}
    assert max(abs(v) for v in a.motion.rotation_deg + r.motion.rotation_deg) <= V.MAX_ROTATION_DEG
    assert max(abs(v) for v in a.motion.translation_mm + r.motion.translation_mm) <= V.MAX_TRANSLATION_MM


def test_files_and_geometry(datasets):
    folder = datasets[0]
    visits = folder / "visits"
    for case in CASES:
        ref = _load(_baseline_image(folder, case))
        ids0 = _data(visits / "baseline" / "pvs_ids" / f"{case}.nii.gz")
        np.testing.assert_array_equal(ids0 > 0, _data(_baseline_truth(folder, case)) > 0)
        for visit in V.VISITS:
            paths = [visits / visit / "images" / f"{case}_0000.nii.gz"] + [
                visits / visit / d / f"{case}.nii.gz" for d in ("labels", "labels_truth", "pvs_ids")]
            for p in paths:
                img = _load(p)
                assert img.shape == ref.shape, p
                np.testing.assert_allclose(img.affine, ref.affine)
            image, labels, labels_truth, ids = (_data(p) for p in paths)
            assert set(np.unique(labels)) <= {0, 1} and labels.any()
            np.testing.assert_array_equal(labels_truth > 0, ids > 0)
            assert ids.dtype.kind == "i" and labels_truth.dtype == np.uint8
            assert not np.array_equal(image, _data(_baseline_image(folder, case)))  # new noise, moved head
    assert not (visits / "baseline" / "images").exists()
    assert not list((folder / "imagesTr").glob("*follow*"))
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["nnunet_pvs"]["phantom"]["visits"] == ["follow_up", "rescan"] and ds["nnunet_pvs"]["visits"] == "visits"


def test_baseline_unchanged_by_the_flags(datasets):
    """Every baseline image and label holds the same voxels and geometry with and without visits."""
    with_visits, without = datasets
    files = sorted(p.relative_to(without) for p in without.rglob("*.nii.gz"))
    assert len(files) >= 3 * 4 and not (without / "visits").exists()
    for rel in files:
        a, b = _load(with_visits / rel), _load(without / rel)
        assert a.get_data_dtype() == b.get_data_dtype(), rel
        np.testing.assert_array_equal(a.affine, b.affine)
        np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj), err_msg=str(rel))
    assert (with_visits / "covariates.csv").read_text() == (without / "covariates.csv").read_text()
    p1 = json.loads((with_visits / "dataset.json").read_text())["nnunet_pvs"]["phantom"]
    p2 = json.loads((without / "dataset.json").read_text())["nnunet_pvs"]["phantom"]
    assert "visits" not in p2 and {k: v for k, v in p1.items() if k != "visits"} == p2


def test_truth_table_matches_the_id_maps(datasets, truth):
    visits = datasets[0] / "visits"
    assert set(truth.status) <= set(V.STATUSES) and set(truth.visit) == set(V.VISITS)
    assert set(truth.case) == set(CASES)
    assert (truth[truth.visit == "rescan"].status == "stable").all()
    follow = truth[truth.visit == "follow_up"]
    assert set(follow.status) == set(V.STATUSES), follow.status.value_counts()  # every class made
    assert not truth.duplicated(["case", "visit", "pvs_id"]).any()
    for (case, visit), rows in truth.groupby(["case", "visit"]):
        img0 = _load(visits / "baseline" / "pvs_ids" / f"{case}.nii.gz")
        voxel = float(np.prod(img0.header.get_zooms()))
        ids0 = np.asanyarray(img0.dataobj)
        ids1 = _data(visits / visit / "pvs_ids" / f"{case}.nii.gz")
        n0 = np.bincount(ids0.ravel(), minlength=rows.pvs_id.max() + 1)
        n1 = np.bincount(ids1.ravel(), minlength=rows.pvs_id.max() + 1)
        # every labelled id of either map has its row, and each row's volumes are its map's
        assert set(np.unique(ids0[ids0 > 0])) | set(np.unique(ids1[ids1 > 0])) <= set(rows.pvs_id)
        np.testing.assert_allclose(rows.volume_baseline_mm3, n0[rows.pvs_id] * voxel, atol=2e-3)
        np.testing.assert_allclose(rows.volume_follow_up_mm3, n1[rows.pvs_id] * voxel, atol=2e-3)
        st = rows.set_index("pvs_id").status
        for tid, status in st.items():
            before, after = n0[tid], n1[tid]
            if status == "vanished":
                assert before >= V.MIN_SIZE and after == 0
            elif status == "new":
                assert before == 0 and after >= V.MIN_SIZE
            elif status in ("enlarged", "shrunk"):
                assert V.meets_margin(status, before, after), (case, tid, status, before, after)
        # centroids lie in the field of view and the region is the aseg region of most of the PVS
        origin = img0.affine[:3, 3]
        far = origin + (np.asarray(ids0.shape) - 1) * np.asarray(img0.header.get_zooms())
        c = rows[["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]].to_numpy()
        assert np.all((c >= origin - 1) & (c <= far + 1))
        assert set(rows.region) <= {"wm", "bg", "other"}


def _undo(ids_visit: np.ndarray, matrix: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The visit's map on the baseline grid: baseline voxel x takes the visit's value at M x (nearest)."""
    idx = np.indices(ids_visit.shape).reshape(3, -1)
    world = affine[:3, :3] @ idx + affine[:3, 3:4]
    moved = matrix[:3, :3] @ world + matrix[:3, 3:4]
    src = np.linalg.inv(affine[:3, :3]) @ (moved - affine[:3, 3:4])
    return ndimage.map_coordinates(ids_visit, src, order=0, mode="grid-constant", cval=0).reshape(ids_visit.shape)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.parametrize("visit", V.VISITS)
def test_recorded_motion_undoes_the_head_motion(datasets, truth, motion, visit):
    """Mapped back through motion.csv's transform, the stable PVS that stay in view lie on the baseline's
    (voxel overlap limited by partial volume: they are one or two voxels wide, so a sub-voxel shift
    re-draws them; nearly every baseline voxel is within one voxel of its mapped-back PVS, centroids
    agree to well under a voxel's diagonal); without the transform, or with its inverse, they do not.
    The image moved with the labels."""
    visits = datasets[0] / "visits"
    for case in CASES:
        row = motion[(motion.case == case) & (motion.visit == visit)].iloc[0]
        m = np.array([[row[f"m{i}{j}"] for j in range(4)] for i in range(4)])
        np.testing.assert_allclose(m, V.rigid_matrix([row[f"rotation_{a}_deg"] for a in "xyz"],
                                                     [row[f"translation_{a}_mm"] for a in "xyz"],
                                                     [row[f"center_{a}_mm"] for a in "xyz"]), atol=1e-6)
        img0 = _load(visits / "baseline" / "pvs_ids" / f"{case}.nii.gz")
        affine = img0.affine
        ids0 = np.asanyarray(img0.dataobj)
        ids1 = _data(visits / visit / "pvs_ids" / f"{case}.nii.gz")
        rows = truth[(truth.case == case) & (truth.visit == visit) & (truth.status == "stable")
                     & (truth.in_view_fraction == 1) & (truth.volume_follow_up_mm3 > 0)]
        assert len(rows) >= 3, (case, len(rows))
        base = np.isin(ids0, rows.pvs_id)
        back = np.isin(_undo(ids1, m, affine), rows.pvs_id)
        dice = _dice(base, back)
        assert dice >= 0.5, (case, dice)
        assert dice > 0.3 + max(_dice(base, np.isin(ids1, rows.pvs_id)),
                                _dice(base, np.isin(_undo(ids1, np.linalg.inv(m), affine), rows.pvs_id)))
        near = ndimage.binary_dilation(back, np.ones((3, 3, 3), bool))
        assert (near & base).sum() >= 0.9 * base.sum(), (case, (near & base).sum() / base.sum())
        err, still = [], []
        for r in rows.itertuples():
            c1 = (affine[:3, :3] @ np.argwhere(ids1 == r.pvs_id).T + affine[:3, 3:4]).mean(1)
            c0 = np.array([r.centroid_x_mm, r.centroid_y_mm, r.centroid_z_mm])
            err.append(np.linalg.norm((np.linalg.inv(m) @ np.r_[c1, 1.0])[:3] - c0))
            still.append(np.linalg.norm(c1 - c0))
        assert np.median(err) <= 1.0 and np.median(err) < 0.5 * np.median(still), (case, err, still)
        # the image moved with the labels: undoing the motion brings it closer to the baseline image
        im0 = _data(_baseline_image(datasets[0], case)).astype(np.float32)
        im1 = _data(visits / visit / "images" / f"{case}_0000.nii.gz").astype(np.float32)
        core = np.zeros(im0.shape, bool)
        core[8:-8, 8:-8, 2:-2] = True
        undone = _undo(im1, m, affine)
        assert np.corrcoef(im0[core], undone[core])[0, 1] > np.corrcoef(im0[core], im1[core])[0, 1] + 0.05


def test_stable_pvs_keep_their_volume(truth):
    """Stable PVS of at least MIN_SIZE voxels that stay in view keep their truth volume within partial
    volume noise (median ratio near 1); enlarged and shrunk ones move clearly out of that range."""
    stable = truth[(truth.status == "stable") & (truth.in_view_fraction == 1) & (truth.volume_baseline_mm3 >= 4)]
    ratio = stable.volume_follow_up_mm3 / stable.volume_baseline_mm3
    assert len(ratio) >= 5 and 0.7 <= ratio.median() <= 1.3 and (ratio > 0).mean() >= 0.95
    enl = truth[truth.status == "enlarged"]
    shr = truth[truth.status == "shrunk"]
    assert (enl.volume_follow_up_mm3 / enl.volume_baseline_mm3 >= V.GROWTH).all()
    assert (shr.volume_follow_up_mm3 / shr.volume_baseline_mm3 <= V.SHRINKAGE).all()
    assert enl.change.str.match(r"^(widen x1\.\d\d|lengthen \d+%)$").all()
    assert shr.change.str.match(r"^(narrow x0\.\d\d|shorten \d+%)$").all()


def test_rerun_with_the_same_flags_is_a_no_op_and_other_flags_need_force(datasets):
    folder = datasets[0]
    raw = folder.parent
    stamp = (folder / "visits" / "changes_truth.csv").stat().st_mtime_ns
    common = [CLI, "phantom", "--size", "tiny", "--subjects", 2, "--test", 1, "--seed", 4, "-o", raw, "-d", 31]
    p = run_cli([*common, "--rescan", "--follow-up"])
    assert "up to date" in p.stdout and (folder / "visits" / "changes_truth.csv").stat().st_mtime_ns == stamp
    p = run_cli(common, check=False)  # without visits: a different dataset, refused without --force
    assert p.returncode == 2 and "--force" in p.stderr and (folder / "visits").is_dir()


def test_id_stats_hand_computed():
    """Id 1: voxels x = 0 and 2 in white matter -> centroid at x = 1 voxel = 2 mm past the origin;
    id 2: two putamen voxels and one white-matter voxel -> bg; id 3 in cortex only -> other."""
    an = {"origin": np.array([10.0, 20.0, 30.0]), "spacing": np.array([2.0, 1.0, 0.5])}
    labels = np.full((4, 3, 2), 2, np.int16)      # left cerebral white matter
    labels[:, 2, :] = 12                          # left putamen
    labels[3, 0, 1] = 3                           # cortex
    ids = np.zeros(labels.shape, np.int32)
    ids[0, 0, 0] = ids[2, 0, 0] = 1
    ids[0, 2, 0] = ids[1, 2, 0] = 2
    ids[1, 1, 0] = 2
    ids[3, 0, 1] = 3
    count, centroid, region = V.id_stats(ids, labels, an)
    assert count[1:].tolist() == [2, 3, 1]
    np.testing.assert_allclose(centroid[1], [12.0, 20.0, 30.0])
    np.testing.assert_allclose(centroid[2], [10.0 + 2.0 * 2 / 3, 20.0 + 5 / 3, 30.0])
    np.testing.assert_allclose(centroid[3], [16.0, 20.0, 30.5])
    assert [V.REGION_NAMES[r] for r in region[1:]] == ["wm", "bg", "other"]


def test_inside_both_needs_the_pvs_off_the_slab_edges_before_and_after_the_motion():
    an = {"labels": np.zeros((10, 10, 10), np.int16), "origin": np.zeros(3), "spacing": np.ones(3)}
    still = np.eye(4)
    assert V.inside_both(np.array([[1, 1, 1], [8, 8, 8]]), still, an)
    assert not V.inside_both(np.array([[0, 5, 5]]), still, an)          # on the outermost layer
    assert not V.inside_both(np.zeros((0, 3), int), still, an)           # nothing to measure
    shift = V.rigid_matrix((0, 0, 0), (1.0, 0, 0), (0, 0, 0))
    assert V.inside_both(np.array([[7, 5, 5]]), shift, an)               # moved to x = 8: still inside
    assert not V.inside_both(np.array([[8, 5, 5]]), shift, an)           # moved onto the last layer
