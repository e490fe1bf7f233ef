"""`nnunet-pvs change`: cluster tracks and statuses on hand-made label volumes, rigid registration against a
known head motion, the command end to end on a synthetic pair with known changes, resume, and bad input."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from scipy.spatial.transform import Rotation
from synthetic import save_nifti, write_nnunet_probabilities

from nnunet_pvs.change.tracks import (
    ChangeRules,
    build_tracks,
    classify,
    in_view,
    match,
    member_lists,
    neighbourhood_max,
    overlap_pairs,
)

CLI = "nnunet-pvs"

# ---------------------------------------------------------------------------------------------
# a synthetic head with tubes, seen at two visits through a known rigid motion

SHAPE = (48, 48, 32)
SPACING = (1.0, 1.0, 1.0)


def grid_affine(shape=SHAPE, spacing=SPACING) -> np.ndarray:
    """Voxel -> world (RAS mm), world origin at the grid centre."""
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2
    return a


@dataclass
class Tube:
    start: np.ndarray
    end: np.ndarray
    radius: float

    def distance(self, p: np.ndarray) -> np.ndarray:
        d = self.end - self.start
        t = np.clip((p - self.start) @ d / float(d @ d), 0.0, 1.0)
        return np.linalg.norm(p - (self.start + t[:, None] * d), axis=1)


@dataclass
class Scene:
    """A head (ellipsoids: scalp, brain, two unequal ventricles, a few blobs of texture) and PVS tubes,
    in head coordinates (mm)."""

    tubes: dict[str, Tube]
    blobs: list = field(default_factory=list)

    def render(self, points: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Noise-free intensity at head-coordinate points and each tube's mask."""
        def inside(c, r):
            return (((points - np.asarray(c)) / np.asarray(r)) ** 2).sum(1) <= 1.0

        img = np.zeros(len(points), np.float32)
        img[inside((0, 0, 0), (22, 22, 14.5))] = 60.0
        img[inside((0, 0, 0), (19.5, 19.5, 12.5))] = 100.0
        img[inside((-5, 4, 2), (3, 9, 4))] = 35.0
        img[inside((5, 2, 1), (2.5, 6, 3))] = 45.0
        for c, r, v in self.blobs:
            img[inside(c, r) & (img > 80)] += v
        masks = {}
        for name, tube in self.tubes.items():
            m = tube.distance(points) <= tube.radius
            masks[name] = m
            img[m] = 180.0
        return img, masks


def _clear_of(tube: Tube, others, gap: float) -> bool:
    """Every point of ``tube`` farther than ``gap`` mm from the surface of the others and from the ventricles."""
    pts = tube.start + np.linspace(0, 1, 25)[:, None] * (tube.end - tube.start)
    if (np.linalg.norm((pts - (-5, 4, 2)) / (5, 11, 6), axis=1) < 1).any():
        return False
    return all((o.distance(pts) > o.radius + tube.radius + gap).all() for o in others)


def random_tube(rng: np.random.Generator, others, radius: float | None = None, gap: float = 3.0) -> Tube:
    """A tube (radius 1.1-1.4 mm, 7-12 mm long, mostly superior-inferior) inside the brain, ``gap`` mm
    clear of ``others`` and of the ventricles."""
    while True:
        c = rng.uniform((-13, -13, -5), (13, 13, 5))
        d = rng.normal(0, 0.35, 3) + (0, 0, 1)
        d /= np.linalg.norm(d)
        half = rng.uniform(3.5, 6.0)
        t = Tube(c - half * d, c + half * d, float(rng.uniform(1.1, 1.4)) if radius is None else radius)
        if _clear_of(t, others, gap):
            return t


def base_scene(rng: np.random.Generator, n_tubes: int = 10) -> Scene:
    """``n_tubes`` tubes spread over the brain, clear of each other, and a few blobs of texture."""
    tubes: dict[str, Tube] = {}
    while len(tubes) < n_tubes:
        tubes[f"t{len(tubes)}"] = random_tube(rng, tubes.values())
    blobs = [(rng.uniform(-12, 12, 3), rng.uniform(2, 5, 3), float(rng.uniform(-15, 15))) for _ in range(6)]
    return Scene(tubes, blobs)


def motion_matrix(angles_deg, translation_mm) -> np.ndarray:
    """Head motion: head coordinates -> scanner world, rotation about the grid centre then shift."""
    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    m[:3, 3] = translation_mm
    return m


def scan(scene: Scene, motion: np.ndarray, rng: np.random.Generator, shape=SHAPE, spacing=SPACING,
         noise: float = 4.0, gain: float = 1.0):
    """Image and PVS mask of ``scene`` with the head at ``motion``: the scanner samples the head at
    ``motion^-1(world)`` of each voxel centre; Gaussian noise; ``gain`` scales the intensities."""
    aff = grid_affine(shape, spacing)
    ijk = np.indices(shape).reshape(3, -1).T.astype(float)
    world = ijk @ aff[:3, :3].T + aff[:3, 3]
    inv = np.linalg.inv(motion)
    head = world @ inv[:3, :3].T + inv[:3, 3]
    img, masks = scene.render(head)
    img = gain * img + rng.normal(0, noise, len(img)).astype(np.float32)
    mask = np.zeros(len(img), bool)
    for m in masks.values():
        mask |= m
    return img.reshape(shape).astype(np.float32), mask.reshape(shape), aff


def changed_scene(scene: Scene, rng: np.random.Generator) -> tuple[Scene, dict[str, str]]:
    """The follow-up scene: t0 enlarged (radius x 1.6), t1 shrunk (half as long, radius x 0.8), t2
    vanished, one new tube (radius 1.3 mm) where there was none; the others stable."""
    tubes = dict(scene.tubes)
    truth = {k: "stable" for k in tubes}
    t0 = tubes["t0"]
    tubes["t0"] = Tube(t0.start, t0.end, t0.radius * 1.6)
    truth["t0"] = "enlarged"
    t1 = tubes["t1"]
    mid = (t1.start + t1.end) / 2
    tubes["t1"] = Tube((t1.start + mid) / 2, (t1.end + mid) / 2, t1.radius * 0.8)
    truth["t1"] = "shrunk"
    del tubes["t2"]
    truth["t2"] = "vanished"
    tubes["new"] = random_tube(rng, scene.tubes.values(), radius=1.3)
    truth["new"] = "new"
    return Scene(tubes, scene.blobs), truth


@dataclass
class Pair:
    root: Path
    motion: np.ndarray
    truth: dict[str, str]
    scene0: Scene
    scene1: Scene

    def args(self, out: Path, *extra) -> list:
        return change_args(self.root, out, *extra)


def change_args(root: Path, out: Path, *extra) -> list:
    """``nnunet-pvs change`` on the folders pred0, pred1, img0, img1 under ``root``."""
    return [CLI, "change", "--baseline", root / "pred0", "--follow-up", root / "pred1", "--images-baseline",
            root / "img0", "--images-follow-up", root / "img1", "-o", out, *map(str, extra)]


def write_pair(root: Path, case: str = "sub01", seed: int = 0, angles=(2.0, 0.0, 0.0), shift_vox=(2, 0, 0),
               change: bool = True, follow_up_noise_only: bool = False) -> Pair:
    """Baseline and follow-up of one subject (images, and the true masks as the predictions)."""
    rng = np.random.default_rng(seed)
    s0 = base_scene(rng)
    s1, truth = changed_scene(s0, rng) if change else (s0, {k: "stable" for k in s0.tubes})
    motion = motion_matrix(angles, np.asarray(shift_vox) * SPACING)
    img0, m0, aff = scan(s0, np.eye(4), rng)
    img1, m1, _ = scan(s1, motion, rng, gain=1.15)
    if follow_up_noise_only:
        img1 = rng.normal(100, 30, SHAPE).astype(np.float32)
    save_nifti(img0, root / "img0" / f"{case}_0000.nii.gz", aff)
    save_nifti(img1, root / "img1" / f"{case}_0000.nii.gz", aff)
    save_nifti(m0.astype(np.uint8), root / "pred0" / f"{case}.nii.gz", aff)
    save_nifti(m1.astype(np.uint8), root / "pred1" / f"{case}.nii.gz", aff)
    return Pair(root, motion, truth, s0, s1)


def track_at(changes: pd.DataFrame, point_mm, max_mm: float = 2.0) -> pd.Series:
    """The track whose centroid (baseline world mm) is nearest ``point_mm``, within ``max_mm``."""
    cen = changes[["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]].to_numpy(float)
    d = np.linalg.norm(cen - np.asarray(point_mm), axis=1)
    assert d.min() <= max_mm, f"no track within {max_mm} mm of {point_mm} (nearest {d.min():.2f} mm)"
    return changes.iloc[int(d.argmin())]


def brain_points(shape=SHAPE, spacing=SPACING) -> np.ndarray:
    """World points (mm) of the voxels of the synthetic brain: where the registration error is measured."""
    aff = grid_affine(shape, spacing)
    ijk = np.indices(shape).reshape(3, -1).T.astype(float)
    world = ijk @ aff[:3, :3].T + aff[:3, 3]
    return world[(((world / (19.5, 19.5, 12.5)) ** 2).sum(1) <= 1.0)]


def registration_error_mm(record: dict, motion: np.ndarray) -> np.ndarray:
    """Distance between where the recovered transform and the true head motion send each brain point."""
    m = np.asarray(record["registration"]["matrix_ras"])
    pts = brain_points()
    return np.linalg.norm((pts @ m[:3, :3].T + m[:3, 3]) - (pts @ motion[:3, :3].T + motion[:3, 3]), axis=1)


# ---------------------------------------------------------------------------------------------
# tracks and statuses on hand-made label volumes

def lab(shape, *clusters) -> np.ndarray:
    """Label image: cluster k + 1 at the voxel index lists ``clusters[k]``."""
    out = np.zeros(shape, np.int64)
    for k, vox in enumerate(clusters, start=1):
        for v in vox:
            out[v] = k
    return out


def line(x, y, z0, z1):
    return [(x, y, z) for z in range(z0, z1)]


def test_one_voxel_shift_is_one_track_within_tolerance_and_two_without():
    base = lab((12, 12, 12), line(3, 3, 2, 9))
    follow = lab((12, 12, 12), line(4, 3, 2, 9))        # shifted one voxel: no shared voxel
    tr = match(base, 1, follow, 1, tolerance=1)
    assert tr.n == 1 and list(tr.relations()) == ["one-to-one"]
    tr0 = match(base, 1, follow, 1, tolerance=0)
    assert tr0.n == 2 and list(tr0.relations()) == ["baseline-only", "follow-up-only"]
    far = lab((12, 12, 12), line(6, 3, 2, 9))           # three voxels away: even tolerance 1 does not link
    assert list(match(base, 1, far, 1, tolerance=1).relations()) == ["baseline-only", "follow-up-only"]
    assert list(match(base, 1, far, 1, tolerance=2).relations()) == ["baseline-only", "follow-up-only"]
    assert list(match(base, 1, far, 1, tolerance=3).relations()) == ["one-to-one"]


def test_split_merge_and_merge_split_are_named():
    shape = (16, 16, 16)
    base = lab(shape, line(2, 2, 1, 12), line(8, 8, 1, 5), line(8, 8, 9, 13), line(12, 2, 1, 6), line(12, 4, 1, 6))
    follow = lab(shape, line(2, 2, 1, 5), line(2, 2, 8, 12),   # 1 -> 2 pieces: split
                 line(8, 8, 1, 13),                             # 2 + 3 -> one: merge
                 [(12, 2, 1), (12, 3, 1), (12, 4, 1)], [(12, 2, 4), (12, 3, 4), (12, 4, 4)])  # 4 + 5 <-> 4 + 5
    tr = match(base, 5, follow, 5, tolerance=0)
    assert tr.n == 3
    assert list(tr.relations()) == ["split", "merge", "merge-split"]
    assert member_lists(tr.track_of_baseline, tr.n) == [[1], [2, 3], [4, 5]]
    assert member_lists(tr.track_of_follow_up, tr.n) == [[1, 2], [3], [4, 5]]


def test_tracks_are_numbered_by_baseline_then_follow_up_and_edges_do_not_wrap():
    shape = (10, 10, 10)
    base = lab(shape, [(0, 0, 0)], [(5, 5, 5)])
    follow = lab(shape, [(9, 0, 0)], [(5, 5, 6)], [(0, 9, 9)])   # (9,0,0) is not next to (0,0,0): no wrap-around
    pb, pf = overlap_pairs(base, follow, 1)
    assert list(zip(pb, pf)) == [(2, 2)]
    tr = build_tracks(2, 3, pb, pf)
    assert tr.n == 4
    assert list(tr.track_of_baseline) == [0, 1, 2] and list(tr.track_of_follow_up) == [0, 3, 2, 4]
    assert list(tr.relations()) == ["baseline-only", "one-to-one", "follow-up-only", "follow-up-only"]


def test_classify_each_status_at_its_thresholds():
    rules = ChangeRules(min_relative_change=0.5, min_change_voxels=4, min_size_voxels=4, absence_prob=0.25)
    vv = 0.5  # mm^3 per baseline voxel: thresholds 2 mm^3 of change, 2 mm^3 of size
    cases = [  # relation, V0, V1 (mm^3), other visit's max probability, expected status
        ("one-to-one", 5.0, 8.0, np.nan, "enlarged"),    # x 1.6, +3 mm^3 = 6 voxels
        ("one-to-one", 5.0, 7.0, np.nan, "stable"),      # x 1.4: under 1 + k
        ("one-to-one", 2.0, 4.0, np.nan, "stable"),      # x 2 but +2 mm^3 = 4 voxels: not above m
        ("one-to-one", 6.0, 10.0, np.nan, "enlarged"),   # x 1.67 up ...
        ("one-to-one", 10.0, 6.0, np.nan, "shrunk"),     # ... and x 1.67 down: the same change
        ("one-to-one", 10.0, 7.0, np.nan, "stable"),     # x 1.43 down
        ("one-to-one", 10.0, 10.0, np.nan, "stable"),
        ("split", 5.0, 9.0, np.nan, "enlarged"),         # pieces add up to x 1.8
        ("merge", 10.0, 3.0, np.nan, "shrunk"),
        ("merge-split", 9.0, 9.5, np.nan, "stable"),
        ("baseline-only", 2.0, 0.0, 0.1, "vanished"),    # 4 voxels, nothing at follow-up
        ("baseline-only", 1.5, 0.0, 0.1, "uncertain"),   # 3 voxels: under s
        ("baseline-only", 2.0, 0.0, 0.3, "uncertain"),   # the follow-up had p = 0.3 there: under the threshold, not gone
        ("baseline-only", 2.0, 0.0, np.nan, "vanished"),  # binary follow-up (NaN): no absence test
        ("follow-up-only", 0.0, 3.0, 0.2, "new"),
        ("follow-up-only", 0.0, 1.0, 0.0, "uncertain"),  # 2 voxels
        ("follow-up-only", 0.0, 3.0, 0.25, "uncertain"),  # p 0.25 at baseline is not below 0.25
    ]
    rel, v0, v1, other, expect = (np.array(c, dtype=object) for c in zip(*cases))
    got = classify(rel, v0.astype(float), v1.astype(float), vv, rules, other.astype(float))
    assert list(got) == list(expect)
    # without an absence rule (binary inputs) the probabilities do not matter
    no_abs = classify(rel, v0.astype(float), v1.astype(float), vv, replace(rules, absence_prob=None), other.astype(float))
    assert list(no_abs[[12, 16]]) == ["vanished", "new"]


def test_a_track_at_the_edge_of_either_field_of_view_cannot_change():
    """The follow-up imaged only z < 8 of the baseline grid. A track reaching z = 8 or beyond, or lying on
    the baseline grid's outer layer, or with no voxel on the grid, is not in view; with a margin of one
    voxel, one ending at z = 7 is not either. A change of a track not in view becomes uncertain."""
    shape = (12, 12, 12)
    tracks = lab(shape, line(5, 5, 2, 5), line(2, 2, 4, 8), [(0, 6, 3)], line(8, 8, 6, 10), line(3, 8, 3, 6))
    imaged = np.zeros(shape, bool)
    imaged[:, :, :8] = True
    assert in_view(tracks, 6, imaged).tolist() == [True, True, False, False, True, False]
    assert in_view(tracks, 6, imaged, margin=1).tolist() == [True, False, False, False, True, False]
    rules = ChangeRules(0.5, 1, 1)
    status = classify(np.array(["one-to-one", "one-to-one", "baseline-only", "one-to-one"], object),
                      np.array([10.0, 10.0, 5.0, 10.0]), np.array([3.0, 3.0, 0.0, 10.0]), 1.0, rules, None,
                      np.array([True, False, False, False]))
    assert status.tolist() == ["shrunk", "uncertain", "uncertain", "stable"]


def test_neighbourhood_max_reaches_tolerance_voxels_and_no_further():
    labels = lab((9, 9, 9), [(4, 4, 4)], [(0, 0, 0)])
    p = np.zeros((9, 9, 9), np.float32)
    p[5, 5, 5] = 0.4      # diagonal neighbour of cluster 1
    p[4, 4, 7] = 0.9      # three voxels away
    assert neighbourhood_max(labels, 2, p, 1).tolist() == pytest.approx([0.4, 0.0])
    assert neighbourhood_max(labels, 2, p, 0).tolist() == pytest.approx([0.0, 0.0])
    assert neighbourhood_max(labels, 2, p, 3).tolist() == pytest.approx([0.9, 0.0])
    assert neighbourhood_max(labels, 2, p, 5).tolist() == pytest.approx([0.9, 0.4])   # (5, 5, 5) from (0, 0, 0)


# ---------------------------------------------------------------------------------------------
# follow-up maps into baseline space, by hand

def shift_only(dx_ras_mm: float):
    """A registration that is a pure shift: baseline point x lies at x + (dx, 0, 0) in the follow-up."""
    from nnunet_pvs.change.register import Registration

    return Registration((0.0, 0.0, 0.0), (0.0, 0.0, 0.0, -dx_ras_mm, 0.0, 0.0), math.nan, math.nan, math.nan,
                        math.nan, 1.0, 0, "")


def iso_affine(spacing: float, origin: float) -> np.ndarray:
    a = np.diag([spacing, spacing, spacing, 1.0])
    a[:3, 3] = origin
    return a


def test_transform_convention_matches_itk():
    """matrix_ras / map_points (RAS) and SimpleITK's TransformPoint (LPS) send a point to the same place."""
    from nnunet_pvs.change.register import Registration

    r = Registration((1.0, -2.0, 3.0), (0.03, -0.02, 0.05, 1.5, -0.5, 2.0), 0, 0, 0, 0, 1, 0, "")
    p_ras = np.array([[10.0, -4.0, 7.0], [0.0, 0.0, 0.0]])
    itk = np.array([r.sitk_transform().TransformPoint(tuple(float(v) for v in (-x, -y, z))) for x, y, z in p_ras])
    np.testing.assert_allclose(r.map_points(p_ras), itk * (-1, -1, 1), atol=1e-9)
    assert shift_only(2.0).map_points(np.zeros((1, 3))).tolist() == [[2.0, 0.0, 0.0]]
    assert shift_only(2.0).motion()["translation_x_mm"] == pytest.approx(2.0)


def test_a_coarser_follow_up_grid_is_pulled_by_nearest_neighbour():
    """Follow-up voxel (6, 5, 5) of a 2 mm grid is centred at (3, 1, 1) mm; shifted 2 mm it covers baseline
    points x in (0, 2), y in (0, 2), z in (0, 2): the 2 x 2 x 2 baseline voxels 10..11 of a 1 mm grid."""
    from nnunet_pvs.change.register import push_missing_labels, resample_to_baseline

    follow = np.zeros((10, 10, 10), np.int64)
    follow[6, 5, 5] = 1
    f_aff, b_aff = iso_affine(2.0, -9.0), iso_affine(1.0, -9.5)
    moved = resample_to_baseline(follow, f_aff, (20, 20, 20), b_aff, shift_only(2.0), nearest=True)
    expect = np.zeros((20, 20, 20), np.int64)
    expect[10:12, 10:12, 10:12] = 1
    np.testing.assert_array_equal(moved, expect)
    np.testing.assert_array_equal(push_missing_labels(moved, follow, f_aff, b_aff, shift_only(2.0)), expect)
    prob = resample_to_baseline(follow.astype(np.float32), f_aff, (20, 20, 20), b_aff, shift_only(2.0), nearest=False)
    assert prob.dtype == np.float32 and prob.max() == pytest.approx(0.75 ** 3)   # a quarter voxel off in each axis


def test_a_cluster_lost_between_grid_points_is_put_back_where_the_registration_sends_it():
    """A 0.4 mm follow-up voxel at (3.2, 0.4, 0.4) mm lies, 2 mm back, at (1.2, 0.4, 0.4) in baseline space:
    no 1 mm baseline voxel centre pulls it, so it is pushed to the nearest baseline voxel (11, 10, 10)."""
    from nnunet_pvs.change.register import push_missing_labels, resample_to_baseline

    follow = np.zeros((51, 51, 51), np.int64)
    follow[33, 26, 26] = 7
    f_aff, b_aff = iso_affine(0.4, -10.0), iso_affine(1.0, -9.5)
    moved = resample_to_baseline(follow, f_aff, (20, 20, 20), b_aff, shift_only(2.0), nearest=True)
    assert not moved.any()
    pushed = push_missing_labels(moved, follow, f_aff, b_aff, shift_only(2.0))
    assert list(zip(*np.nonzero(pushed))) == [(11, 10, 10)] and pushed[11, 10, 10] == 7


# ---------------------------------------------------------------------------------------------
# the command end to end

@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Pair:
    """sub01: the head turned 2 degrees about x and moved 2 voxels along x; t0 enlarged, t1 shrunk,
    t2 vanished, one new tube, seven stable."""
    return write_pair(tmp_path_factory.mktemp("pair"))


def write_half_regions(root: Path, case: str = "sub01") -> Path:
    """Region masks ``CASE_xneg`` / ``CASE_xpos``: the brain on either side of x = 0 (baseline world)."""
    aff = grid_affine()
    ijk = np.indices(SHAPE).reshape(3, -1).T.astype(float)
    world = ijk @ aff[:3, :3].T + aff[:3, 3]
    brain = (((world / (19.5, 19.5, 12.5)) ** 2).sum(1) <= 1.0)
    for name, side in (("xneg", world[:, 0] < 0), ("xpos", world[:, 0] >= 0)):
        save_nifti((brain & side).reshape(SHAPE).astype(np.uint8), root / "regions" / f"{case}_{name}.nii.gz", aff)
    return root / "regions"


@pytest.fixture(scope="module")
def first_run(pair):
    out = pair.root / "out"
    proc = run_cli(pair.args(out, "--label-maps", "--regions", write_half_regions(pair.root)))
    return out, proc


def test_statuses_registration_and_outputs_of_a_known_pair(pair, first_run):
    out, proc = first_run
    changes = pd.read_csv(out / "changes.csv", dtype={"cluster_baseline": str, "cluster_follow_up": str})
    # every true tube is found where it is, with its status (the new one where the registration puts it)
    for name, status in pair.truth.items():
        tube = (pair.scene1 if name == "new" else pair.scene0).tubes[name]
        row = track_at(changes, (tube.start + tube.end) / 2)
        assert row["status"] == status, f"{name}: {row.to_dict()}"
    assert len(changes) == len(pair.truth)
    assert set(changes["relation"]) == {"one-to-one", "baseline-only", "follow-up-only"} and changes["in_view"].all()
    gone = changes[changes["status"] == "vanished"].iloc[0]
    assert pd.isna(gone["cluster_follow_up"]) and gone["volume_follow_up_mm3"] == 0
    # the registration recovers the motion: 2 degrees about x, 2 mm along x, to a fraction of a voxel
    record = json.loads((out / "cases" / "sub01" / "record.json").read_text())
    err = registration_error_mm(record, pair.motion)
    print(f"registration error over the brain: mean {err.mean():.3f} mm, max {err.max():.3f} mm")
    assert err.max() < 0.5
    reg = pd.read_csv(out / "registration.csv").iloc[0]
    assert reg["rotation_x_deg"] == pytest.approx(2.0, abs=1.0) and reg["translation_x_mm"] == pytest.approx(2.0, abs=0.3)
    assert reg["ncc"] > reg["ncc_identity"] and reg["mi_gain"] > 0 and reg["overlap"] > 0.95
    # per-subject counts add up; the summary states every rule with its value
    whole = pd.read_csv(out / "subjects.csv").set_index("region").loc["whole"]
    assert (whole["n_stable"], whole["n_enlarged"], whole["n_shrunk"], whole["n_new"], whole["n_vanished"]) == (7, 1, 1, 1, 1)
    assert whole["count_change"] == 0 and whole["n_clusters_baseline"] == 10
    assert whole["volume_change_mm3"] == pytest.approx(changes["volume_change_mm3"].sum())
    # each track in the region of its centroid's side; the regions add up to the whole
    for row in changes.itertuples():
        assert row.region == ("xneg" if row.centroid_x_mm < 0 else "xpos"), row
    subjects = pd.read_csv(out / "subjects.csv")
    assert list(subjects["region"]) == ["whole", "xneg", "xpos", "outside"]
    parts = subjects[subjects["region"] != "whole"].drop(columns=["case", "region"]).sum()
    np.testing.assert_allclose(parts.to_numpy(float), whole.drop("case").to_numpy(float))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rules"]["min_relative_change"]["value"] == 0.5 and summary["status_totals"]["new"] == 1
    assert summary["rules"]["min_size_voxels"]["source"] == "default"
    # the track map holds each track where changes.csv puts its centroid
    tracks = nib.load(out / "cases" / "sub01" / "tracks.nii.gz")
    t = int(gone["track"])
    ijk = np.argwhere(np.asarray(tracks.dataobj) == t).mean(0)
    np.testing.assert_allclose(tracks.affine[:3, :3] @ ijk + tracks.affine[:3, 3],
                               gone[["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]].to_numpy(float), atol=1e-3)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "vanished" in html  # volume plot and the overlay
    assert (out / "cases" / "sub01" / "overlay.png").stat().st_size > 1000
    assert "1 enlarged, 1 shrunk, 1 new, 1 vanished" in proc.stdout


def test_a_rerun_keeps_what_is_done_and_redoes_it_when_an_option_changes(pair, first_run):
    out, _ = first_run
    record = out / "cases" / "sub01" / "record.json"
    before = record.stat().st_mtime_ns
    regions = pair.root / "regions"
    again = run_cli(pair.args(out, "--label-maps", "--regions", regions))
    assert "resumed: 1 subject(s)" in again.stderr and record.stat().st_mtime_ns == before
    stricter = run_cli(pair.args(out, "--label-maps", "--regions", regions, "--min-relative-change", "2"))
    assert "resumed" not in stricter.stderr and record.stat().st_mtime_ns != before
    changes = pd.read_csv(out / "changes.csv")
    assert "enlarged" not in set(changes["status"])     # x 2.5 is not above 1 + k = 3
    assert json.loads((out / "summary.json").read_text())["rules"]["min_relative_change"]["source"] == "option"


def test_probability_maps_paired_by_table_and_the_absence_rule(tmp_path):
    """nnU-Net .npz + .pkl at both visits, visits named differently (--pairs). The vanished tube t2 is still
    there at follow-up with p = 0.4: under the threshold 0.5, so no cluster, but not absent either: uncertain
    (absence below 0.25, half the threshold); with --absence-prob 0.45 it is vanished."""
    rng = np.random.default_rng(3)
    p = write_pair(tmp_path / "binary", seed=3)
    faint_t2 = scan(Scene({"t2": p.scene0.tubes["t2"]}), p.motion, rng)[1]
    m0 = np.asarray(nib.load(p.root / "pred0" / "sub01.nii.gz").dataobj) > 0
    m1 = np.asarray(nib.load(p.root / "pred1" / "sub01.nii.gz").dataobj) > 0
    prob0 = np.where(m0, 0.9, 0.02)
    prob1 = np.where(m1, 0.9, np.where(faint_t2, 0.4, 0.02))
    root = tmp_path / "prob"
    for visit, prob, ses in ((0, prob0, "ses-1"), (1, prob1, "ses-2")):
        img = save_nifti(np.asarray(nib.load(p.root / f"img{visit}" / "sub01_0000.nii.gz").dataobj),
                   root / f"img{visit}" / f"sub01_{ses}_0000.nii.gz", grid_affine())
        (root / f"pred{visit}").mkdir(parents=True)
        write_nnunet_probabilities(prob, img, root / f"pred{visit}" / f"sub01_{ses}")
    write_nnunet_probabilities(prob1, img, root / "pred1" / "sub02_ses-2")   # a follow-up not in the table: unused
    (root / "pairs.csv").write_text("case,baseline,follow_up\nsub01,sub01_ses-1,sub01_ses-2\n")
    args = [CLI, "change", "--baseline", root / "pred0", "--follow-up", root / "pred1", "--images-baseline",
            root / "img0", "--images-follow-up", root / "img1", "--pairs", root / "pairs.csv", "--no-plots"]
    proc = run_cli([*args, "-o", root / "out"])
    assert "1 follow-up prediction(s)" in proc.stderr and "not used" in proc.stderr
    changes = pd.read_csv(root / "out" / "changes.csv")
    t2 = p.scene0.tubes["t2"]
    row = track_at(changes, (t2.start + t2.end) / 2)
    assert row["status"] == "uncertain" and row["relation"] == "baseline-only"
    assert 0.3 < row["other_visit_max_prob"] <= 0.4 + 1e-6
    new = p.scene1.tubes["new"]
    assert track_at(changes, (new.start + new.end) / 2)["status"] == "new"
    assert track_at(changes, (new.start + new.end) / 2)["other_visit_max_prob"] == pytest.approx(0.02)
    assert set(changes["case"]) == {"sub01"}
    run_cli([*args, "-o", root / "out", "--absence-prob", "0.45"])
    changes = pd.read_csv(root / "out" / "changes.csv")
    assert track_at(changes, (t2.start + t2.end) / 2)["status"] == "vanished"
    summary = json.loads((root / "out" / "summary.json").read_text())
    assert summary["rules"]["absence_prob"] == {**summary["rules"]["absence_prob"], "value": 0.45, "source": "option"}
    assert summary["cases"][0]["baseline"]["kind"] == "probabilities"


# ---------------------------------------------------------------------------------------------
# bad input: one line each, exit status 2, nothing written

def copy_pair(pair: Pair, root: Path) -> Path:
    import shutil

    for sub in ("img0", "img1", "pred0", "pred1"):
        shutil.copytree(pair.root / sub, root / sub)
    return root


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("nnunet-pvs change: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_ids_that_do_not_pair_are_named(pair, tmp_path):
    import shutil

    root = copy_pair(pair, tmp_path)
    shutil.copy(root / "pred0" / "sub01.nii.gz", root / "pred0" / "sub07.nii.gz")
    shutil.copy(root / "img0" / "sub01_0000.nii.gz", root / "img0" / "sub07_0000.nii.gz")
    line = one_error_line(run_cli(change_args(root, tmp_path / "out"), check=False))
    assert "do not pair" in line and "baseline only: sub07" in line
    assert not (tmp_path / "out").exists()
    (tmp_path / "pairs.csv").write_text("case,baseline,follow_up\nsub01,sub01,sub01\nsub02,sub07,sub02\n")
    line = one_error_line(run_cli([*change_args(root, tmp_path / "out"), "--pairs", tmp_path / "pairs.csv"],
                                  check=False))
    assert "follow-up id(s) sub02 not in" in line and not (tmp_path / "out").exists()


def test_prediction_and_image_of_different_geometry_are_refused(pair, tmp_path):
    root = copy_pair(pair, tmp_path)
    pred = root / "pred1" / "sub01.nii.gz"
    img = nib.load(pred)
    moved = img.affine.copy()
    moved[:3, 3] += (0.0, 1.5, 0.0)
    save_nifti(np.asarray(img.dataobj), pred, moved)
    line = one_error_line(run_cli(change_args(root, tmp_path / "out"), check=False))
    assert "sub01" in line and "affine" in line and str(pred) in line
    assert not (tmp_path / "out").exists()


def test_an_unregistrable_follow_up_is_refused_with_its_metric(pair, tmp_path):
    """Pure noise as the follow-up image: refused naming the NCC. Alone: nothing written. With a good
    subject before it: the good one's result is kept for resuming, no cohort tables. --keep-going: the
    good one (resumed) in the tables, the bad one in failures.csv, exit status 1."""
    root = copy_pair(pair, tmp_path)
    write_pair(root, "sub02", seed=5, follow_up_noise_only=True)
    (tmp_path / "only2.csv").write_text("case,baseline,follow_up\nsub02,sub02,sub02\n")
    line = one_error_line(run_cli([*change_args(root, tmp_path / "alone"), "--pairs", tmp_path / "only2.csv", "--no-plots"],
                                  check=False))
    assert "sub02" in line and "does not register" in line and "NCC" in line and "below --min-ncc 0.5" in line
    ncc = float(line.split("NCC ")[1].split()[0])
    print(f"NCC of the noise follow-up after registration: {ncc:.3f}")
    assert ncc < 0.2
    assert not (tmp_path / "alone").exists()

    out = tmp_path / "out"
    one_error_line(run_cli([*change_args(root, out), "--no-plots"], check=False))
    assert (out / "cases" / "sub01" / "record.json").is_file() and not (out / "cases" / "sub02").exists()
    assert not (out / "changes.csv").exists()

    proc = run_cli([*change_args(root, out), "--no-plots", "--keep-going"], check=False)
    assert proc.returncode == 1 and "1 of 2 subject(s) failed" in proc.stderr and "resumed: 1" in proc.stderr
    failures = pd.read_csv(out / "failures.csv")
    assert list(failures["case"]) == ["sub02"] and "NCC" in failures["reason"][0]
    assert set(pd.read_csv(out / "changes.csv")["case"]) == {"sub01"}
    assert json.loads((out / "summary.json").read_text())["failures"].keys() == {"sub02"}
