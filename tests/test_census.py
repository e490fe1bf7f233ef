"""`nnunet-pvs census`: cluster shape against known geometry, regions and slice counts, the threshold
from an evaluation sweep, the CLI on binary and nnU-Net probability outputs, and bad input."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from synthetic import save_nifti, write_nnunet_probabilities
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from nnunet_pvs import __version__
from nnunet_pvs.census.case import Loaded, Options, SliceMask, census_arrays, load_case
from nnunet_pvs.census.inputs import Case, threshold_from_sweep
from nnunet_pvs.census.shape import cluster_stats, cluster_stats_loop
from nnunet_pvs.cli import main
from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation.clusters import label
from nnunet_pvs.evaluation.io import PredFiles

BIN = Path(sys.executable).parent
CLI = BIN / "nnunet-pvs"


# ---------------------------------------------------------------------------------------------
# helpers

def affine_of(spacing, angles=(0, 0, 0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Voxel-to-world matrix: rotation (x, y, z Euler angles in degrees) times the spacing."""
    a = np.eye(4)
    a[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def rasterise(shape, affine, curve: np.ndarray, radius: float) -> np.ndarray:
    """Voxels whose centre (world mm) lies within ``radius`` of a densely sampled curve: a tube
    with hemispherical caps, of length ``arc length + 2 radius``."""
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    near = np.flatnonzero(((xyz >= curve.min(0) - radius - 1e-6) & (xyz <= curve.max(0) + radius + 1e-6)).all(1))
    dist = cKDTree(curve).query(xyz[near], distance_upper_bound=radius + 1e-6)[0]
    out = np.zeros(len(xyz), bool)
    out[near[dist <= radius]] = True
    return out.reshape(shape)


def stats_of(mask, affine, prob=None):
    lab, n = label(mask)
    idx = np.flatnonzero(lab)
    return cluster_stats(idx, lab.ravel()[idx], n, mask.shape, affine,
                         None if prob is None else prob.ravel()[idx]), n, lab


def centre_of(shape, affine):
    return affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]


def angle_deg(u, v) -> float:
    return math.degrees(math.acos(min(1.0, abs(float(np.dot(u, v))))))


save = save_nifti




# ---------------------------------------------------------------------------------------------
# shape of single clusters against known geometry

def test_axis_aligned_one_voxel_tubes_are_exact():
    """A straight tube of N voxels along a voxel axis of spacing s: length = path length = N s,
    width = diameter of the circle of the voxel's cross-section area, exactly."""
    aff = affine_of((0.69, 0.69, 2.0), origin=(-10, 4, 7))
    m = np.zeros((30, 30, 12), bool)
    m[5, 5, 2:9] = True          # 7 voxels along z (superior)
    m[10:20, 12, 6] = True       # 10 voxels along x
    m[20, 5:17, 3] = True        # 12 voxels along y
    st, n, lab = stats_of(m, aff)
    assert n == 3
    order = [lab[5, 5, 2] - 1, lab[10, 12, 6] - 1, lab[20, 5, 3] - 1]
    for r, length, axis, cross in ((order[0], 14.0, (0, 0, 1), 0.69 * 0.69),
                                   (order[1], 6.9, (1, 0, 0), 0.69 * 2.0),
                                   (order[2], 12 * 0.69, (0, 1, 0), 0.69 * 2.0)):
        assert st["length_mm"][r] == pytest.approx(length, abs=1e-9)
        assert st["path_length_mm"][r] == pytest.approx(length, abs=1e-9)
        np.testing.assert_allclose(st["axis"][r], axis, atol=1e-12)
        assert st["width_mm"][r] == pytest.approx(2 * math.sqrt(cross / math.pi), rel=1e-9)
    assert st["elevation_deg"][order[0]] == pytest.approx(90.0)
    assert st["elevation_deg"][order[1]] == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(st["centroid"][order[0]], aff[:3, :3] @ [5, 5, 5] + aff[:3, 3])


def test_single_voxel_and_symmetric_clusters_have_no_orientation():
    """No unique principal axis: orientation and elevation NaN; lengths along the largest spacing."""
    aff = affine_of((0.7, 0.7, 2.5))
    m = np.zeros((12, 12, 6), bool)
    m[2, 2, 2] = True
    m[6:8, 6:8, 3] = True        # a 2 x 2 in-plane square
    st, n, _ = stats_of(m, aff)
    assert n == 2
    assert np.isnan(st["axis"]).all() and np.isnan(st["elevation_deg"]).all()
    np.testing.assert_allclose(st["length_mm"], [2.5, 2.5])
    path = np.array([2.5, 0.7 * math.sqrt(2) + 2.5])       # square: its diagonal + e(u) along z
    np.testing.assert_allclose(st["path_length_mm"], path)
    np.testing.assert_allclose(st["width_mm"], 2 * np.sqrt(np.array([1, 4]) * 0.7 * 0.7 * 2.5 / (math.pi * path)))


GRIDS = [((1.0, 1.0, 1.0), (0, 0, 0)), ((0.69, 0.69, 2.0), (0, 0, 0)), ((0.69, 0.69, 2.0), (20, -15, 30)),
         ((0.5, 0.5, 1.2), (20, -15, 30)), ((0.9, 0.6, 1.5), (-35, 10, 70)), ((0.4, 0.4, 0.8), (20, -15, 30))]


def width_tolerance(spacing) -> float:
    """Relative width tolerance for a 2.4 mm wide tube: width goes with sqrt(voxel count), and the
    voxel count of a tube barely wider than the voxels is off by up to 25 % (12 % on the width);
    with every voxel edge at most a third of the diameter it is within 7 % (the rest: a short
    tube's centreline counts one voxel extent beyond the voxel centres, see docs/census.md)."""
    return 0.07 if max(spacing) <= 0.8 else 0.12


@pytest.mark.parametrize("spacing,angles", GRIDS)
def test_straight_oblique_cylinders(spacing, angles):
    """Capsule of axis length 20 mm + two 1.2 mm caps at 34 degrees elevation on anisotropic,
    rotated grids. Tolerances: axis within 2 degrees, length and path length within 2 mm of
    L + 2r (digitising adds up to one voxel extent), width see ``width_tolerance``."""
    aff = affine_of(spacing, angles, origin=(3.0, -7.0, 11.0))
    shape = tuple(int(math.ceil(36 / s)) for s in spacing)
    d = np.array([0.6, -0.55, 0.58])
    d /= np.linalg.norm(d)
    r, L = 1.2, 20.0
    curve = centre_of(shape, aff) + np.outer(np.linspace(-L / 2, L / 2, 4000), d)
    st, n, _ = stats_of(rasterise(shape, aff, curve, r), aff)
    assert n == 1
    assert angle_deg(st["axis"][0], d) < 2.0
    assert st["axis"][0][2] > 0                                  # points superior
    assert st["elevation_deg"][0] == pytest.approx(math.degrees(math.asin(abs(d[2]))), abs=2.0)
    assert st["length_mm"][0] == pytest.approx(L + 2 * r, abs=2.0)
    assert st["path_length_mm"][0] == pytest.approx(L + 2 * r, abs=2.0)
    assert st["width_mm"][0] == pytest.approx(2 * r, rel=width_tolerance(spacing))


@pytest.mark.parametrize("spacing,angles", GRIDS)
@pytest.mark.parametrize("radius_of_curvature,arc_deg", [(12.0, 60), (10.0, 120), (8.0, 180)])
def test_curved_tubes(spacing, angles, radius_of_curvature, arc_deg):
    """Circular arcs (tube radius 1.2 mm): path_length follows the arc (within 2 mm of
    R theta + 2r), length is the chord (within 1.5 mm of 2 R sin(theta/2) + 2r), width see ``width_tolerance``."""
    aff = affine_of(spacing, angles, origin=(-5.0, 2.0, 1.0))
    shape = tuple(int(math.ceil(40 / s)) for s in spacing)
    e1 = np.array([1.0, 0.2, 0.3])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(e1, [0.0, 0.3, 1.0])
    e2 /= np.linalg.norm(e2)
    R, theta, r = radius_of_curvature, math.radians(arc_deg), 1.2
    t = np.linspace(0, theta, 6000)
    curve = (centre_of(shape, aff) + R * np.outer(np.cos(t) - math.cos(theta / 2), e1)
             + R * np.outer(np.sin(t) - math.sin(theta / 2), e2))
    st, n, _ = stats_of(rasterise(shape, aff, curve, r), aff)
    assert n == 1
    assert st["path_length_mm"][0] == pytest.approx(R * theta + 2 * r, abs=2.0)
    assert st["length_mm"][0] == pytest.approx(2 * R * math.sin(theta / 2) + 2 * r, abs=1.5)
    assert st["width_mm"][0] == pytest.approx(2 * r, rel=width_tolerance(spacing))


def test_vectorised_statistics_equal_the_per_cluster_loop():
    rng = np.random.default_rng(4)
    aff = affine_of((0.8, 0.6, 1.7), (12, -40, 25), origin=(5, -3, 8))
    noise = ndimage.gaussian_filter(rng.random((40, 36, 20)), 1.0)
    m = noise > np.quantile(noise, 0.93)
    m[3, 3, 3] = True                   # a single voxel
    prob = np.where(m, 0.5 + 0.5 * rng.random(m.shape), 0.0)
    st, n, lab = stats_of(m, aff, prob)
    ref = cluster_stats_loop(lab, n, aff, prob)
    assert n > 20
    for k in st:
        np.testing.assert_allclose(st[k], ref[k], rtol=1e-9, atol=1e-9, err_msg=k)


def _loaded(pred, affine, regions=None, brain=None, slices=()):
    return Loaded(pred, Path("x.nii.gz"), affine, tuple(np.linalg.norm(affine[:3, :3], axis=0)), None,
                  regions=regions or {}, brain=brain, slices=list(slices))


def test_min_size_is_in_mm3_and_holds_across_resolutions():
    """The same objects (3, 6 and 12 mm^3) at 1 mm and 0.5 mm: --min-size-mm3 5 keeps 6 and 12."""
    kept = []
    for s in (1.0, 0.5):
        k = int(round(1 / s))
        m = np.zeros((24 * k, 12 * k, 12 * k), bool)
        m[2 * k:3 * k, 2 * k:3 * k, 2 * k:5 * k] = True          # 1 x 1 x 3 mm
        m[8 * k:9 * k, 2 * k:4 * k, 2 * k:5 * k] = True          # 1 x 2 x 3 mm
        m[14 * k:16 * k, 2 * k:4 * k, 2 * k:5 * k] = True        # 2 x 2 x 3 mm
        res = census_arrays("c", _loaded(m, np.diag([s, s, s, 1.0])), Options(min_size_mm3=5.0))
        kept.append(sorted(res["clusters"]["volume_mm3"].round(6)))
        assert list(res["clusters"]["cluster"]) == [1, 2]
        assert res["labels"].max() == 2
    assert kept[0] == kept[1] == [6.0, 12.0]


def test_region_tie_goes_to_the_first_listed_region_and_regions_add_up():
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    m = np.zeros((20, 10, 10), bool)
    m[4:8, 5, 5] = True            # 2 voxels in bg (x < 6), 2 in wm: a tie
    m[12:15, 2, 2] = True          # wm
    m[18, 8, 8] = True             # outside both
    bg = np.zeros(m.shape, bool)
    bg[:6] = True
    wm = np.zeros(m.shape, bool)
    wm[6:17] = True
    brain = bg | wm
    brain[17:] = True
    for order, winner in ((("bg", "wm"), "bg"), (("wm", "bg"), "wm")):
        regions = {k: {"bg": bg, "wm": wm}[k] for k in order}
        res = census_arrays("c", _loaded(m, aff, regions, brain), Options())
        cl = res["clusters"].sort_values("centroid_x_mm")
        assert list(cl["region"]) == [winner, "wm", "outside"]
        sub = res["subjects"].set_index("region")
        assert sub.loc["whole", "n_clusters"] == 3
        assert sum(sub.loc[r, "n_clusters"] for r in ("bg", "wm", "outside")) == 3
        assert sub.loc["whole", "volume_mm3"] == sum(sub.loc[r, "volume_mm3"] for r in ("bg", "wm", "outside"))
        assert sub.loc["bg", "volume_in_region_mm3"] == 2 and sub.loc["bg", "region_volume_mm3"] == bg.sum()
        assert sub.loc["outside", "region_volume_mm3"] == 3 * 10 * 10
        assert sub.loc["whole", "volume_fraction"] == pytest.approx(8 / brain.sum())


def test_size_classes_and_slice_counts():
    aff = np.eye(4)
    m = np.zeros((30, 10, 10), bool)
    m[1, 1, 1:3] = True            # 2 mm3
    m[5, 1, 1:8] = True            # 7 mm3, crosses slice z=4
    m[10:13, 1:5, 1:6] = True      # 60 mm3, crosses slice z=4
    m[20, 5, 5:9] = True           # 4 mm3, not on the slice
    sl = np.zeros(m.shape, bool)
    sl[:, :, 4] = True
    res = census_arrays("c", _loaded(m, aff, slices=[SliceMask("bgslice", sl, 4, 2)]), Options())
    sub = res["subjects"].set_index("region")
    w = sub.loc["whole"]
    assert (w["n_lt_5mm3"], w["n_5_10mm3"], w["n_10_50mm3"], w["n_ge_50mm3"]) == (2, 1, 0, 1)
    b = sub.loc["bgslice"]
    assert b["n_clusters"] == 2 and b["volume_mm3"] == 67 and b["volume_in_region_mm3"] == 1 + 12
    assert b["slice_index"] == 4 and b["region_volume_mm3"] == 300


def test_threshold_from_sweep(tmp_path):
    rows = []
    means = {0.3: (0.5, 0.7), 0.5: (0.9, 0.7), 0.7: (0.8, 0.8)}   # mean 0.6, 0.8, 0.8: tie -> 0.5
    for t, (a, b) in means.items():
        rows += [{"case": "a", "region": "whole", "threshold": t, "metric": "dice", "value": a},
                 {"case": "b", "region": "whole", "threshold": t, "metric": "dice", "value": b},
                 {"case": "a", "region": "bg", "threshold": t, "metric": "dice", "value": 0.99 * (t == 0.3)},
                 {"case": "a", "region": "whole", "threshold": t, "metric": "cluster_dice", "value": 1.0}]
    rows.append({"case": "c", "region": "whole", "threshold": 0.7, "metric": "dice", "value": float("nan")})
    (tmp_path / "eval").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "eval" / "thresholds.csv", index=False)
    got = threshold_from_sweep(tmp_path / "eval")
    assert got["value"] == 0.5 and got["mean_dice"] == pytest.approx(0.8) and got["n_cases"] == 2
    assert got["metric"] == "dice" and got["region"] == "whole" and got["source"] == "sweep"
    assert threshold_from_sweep(tmp_path / "eval" / "thresholds.csv")["value"] == 0.5
    (tmp_path / "binary_eval").mkdir()
    with pytest.raises(UserError, match="no thresholds.csv"):
        threshold_from_sweep(tmp_path / "binary_eval")
    with pytest.raises(UserError, match="does not exist"):
        threshold_from_sweep(tmp_path / "nowhere")


def test_slices_found_from_an_aseg_label_map(tmp_path):
    """Region folder with an aseg map: regions bg, wm and the visual-rating slices of `regions`."""
    aff = np.eye(4)
    lab = np.zeros((20, 20, 30), np.int16)
    lab[2:18, 2:18, 2:28] = 41
    lab[2:8, 2:18, 2:28] = 2
    lab[3:6, 5:10, 5:10] = 12
    lab[14:17, 5:10, 5:10] = 51
    lab[6:7, 5:9, 6:9] = 13          # pallidum centred on z = 7: BG slice 7
    lab[13:14, 5:9, 6:9] = 52
    lab[9:11, 9:12, 8:13] = 4        # ventricles up to z = 12: CSO slice 12 + 10 = 22
    save(lab, tmp_path / "regions" / "s1.nii.gz", aff)
    pred = np.zeros(lab.shape, np.uint8)
    pred[4, 7, 5:10] = 1             # in the putamen, crosses z = 7
    pred[10, 4, 18:26] = 1           # white matter, crosses z = 22
    pred[12, 15, 5:9] = 1            # white matter, below both slices
    save(pred, tmp_path / "pred" / "s1.nii.gz", aff)
    case = Case("s1", PredFiles(seg=tmp_path / "pred" / "s1.nii.gz"), None, True)
    ld = load_case(case, tmp_path / "regions", Options())
    assert list(ld.regions) == ["bg", "wm"]
    assert {s.name: s.index for s in ld.slices} == {"bgslice": 7, "csoslice": 22}
    sub = census_arrays("s1", ld, Options())["subjects"].set_index("region")
    assert list(sub.index) == ["whole", "bg", "wm", "outside", "bgslice", "csoslice"]
    assert (sub.loc["bg", "n_clusters"], sub.loc["wm", "n_clusters"]) == (1, 2)
    assert (sub.loc["bgslice", "n_clusters"], sub.loc["csoslice", "n_clusters"]) == (1, 1)
    assert sub.loc["csoslice", "slice_index"] == 22


# ---------------------------------------------------------------------------------------------
# the command line

SHAPE = (26, 22, 12)
# voxel axis 0 -> world y (0.69 mm), 1 -> world -z (0.69 mm), 2 -> world x (2 mm): oblique to the
# array, so the axial plane is not an array plane and world coordinates must come from the affine
AFFINE = np.array([[0.0, 0.0, 2.0, -10.0], [0.69, 0.0, 0.0, 5.0], [0.0, -0.69, 0.0, 3.0], [0, 0, 0, 1]])


def _subject(rng, k: int):
    """Binary mask with tubes of known geometry, a probability map, an image and an aseg map."""
    m = np.zeros(SHAPE, bool)
    m[4, 2:12, 3] = True                       # along voxel axis 1: world z, 10 x 0.69 mm
    m[10:12, 6, 2:8] = True                    # along voxel axis 2: world x, 12 mm, 2 voxels thick
    m[20, 16, 5:7] = True                      # 2 voxels across the bg/wm border at axis 2: tie
    m[14 + k, 18, 9] = True                    # a single voxel
    prob = np.where(m, 0.6 + 0.4 * rng.random(SHAPE), 0.2 * rng.random(SHAPE)).astype(np.float32)
    image = (100 + 20 * rng.standard_normal(SHAPE) + 150 * m).astype(np.float32)
    aseg = np.full(SHAPE, 41, np.int16)
    aseg[:, :, 6:] = 2
    aseg[16:, 12:, :6] = 12                    # putamen (bg), first-listed
    aseg[0, :, :] = 0
    return m, prob, image, aseg


@pytest.fixture
def cohort(tmp_path):
    rng = np.random.default_rng(0)
    subjects = {}
    for k, cid in enumerate(("sub-01", "sub-02", "sub-03")):
        m, prob, image, aseg = _subject(rng, k)
        seg = save(m.astype(np.uint8), tmp_path / "bin" / f"{cid}.nii.gz", AFFINE)
        save(image, tmp_path / "images" / f"{cid}_0000.nii.gz", AFFINE)
        save(aseg, tmp_path / "regions" / f"{cid}.nii.gz", AFFINE)
        (tmp_path / "prob").mkdir(exist_ok=True)
        write_nnunet_probabilities(prob, seg, tmp_path / "prob" / cid)
        subjects[cid] = (m, prob, aseg)
    return tmp_path, subjects


def test_cli_binary_with_images_and_regions(cohort):
    tmp, subjects = cohort
    out = tmp / "census"
    proc = run_cli([CLI, "census", "-i", tmp / "bin", "-o", out, "--images", tmp / "images",
                    "--regions", tmp / "regions"])
    assert "census of 3 subject(s), 12 cluster(s)" in proc.stdout
    cl = pd.read_csv(out / "clusters.csv", dtype={"case": str, "region": str})
    required = ["case", "cluster", "region", "n_voxels", "volume_mm3", "centroid_x_mm", "centroid_y_mm",
                "centroid_z_mm", "length_mm", "width_mm", "orientation_x", "orientation_y", "orientation_z",
                "elevation_deg", "max_prob", "mean_prob"]
    assert set(required) <= set(cl.columns)
    assert cl["max_prob"].isna().all() and cl["mean_prob"].isna().all()       # binary input
    one = cl[cl["case"] == "sub-01"].set_index("n_voxels")
    z_tube = one.loc[10]                                                    # along world z
    assert z_tube["length_mm"] == pytest.approx(6.9, abs=1e-4)
    assert z_tube["elevation_deg"] == pytest.approx(90.0, abs=1e-4)
    assert (z_tube["orientation_x"], z_tube["orientation_y"], z_tube["orientation_z"]) == pytest.approx((0, 0, 1))
    world = AFFINE[:3, :3] @ [4, 6.5, 3] + AFFINE[:3, 3]
    assert (z_tube["centroid_x_mm"], z_tube["centroid_y_mm"], z_tube["centroid_z_mm"]) == pytest.approx(tuple(world))
    x_tube = one.loc[12]
    assert x_tube["length_mm"] == pytest.approx(12.0, abs=1e-4) and x_tube["elevation_deg"] == pytest.approx(0.0, abs=1e-4)
    assert x_tube["region"] == "wm"
    assert one.loc[2, "region"] == "bg"                                     # the tie: bg listed first
    assert np.isnan(one.loc[1, "orientation_x"])                           # single voxel
    sub = pd.read_csv(out / "subjects.csv", dtype={"case": str, "region": str})
    assert set(sub["region"]) == {"whole", "bg", "wm", "outside", "bgslice"}
    for cid, g in sub.groupby("case"):
        g = g.set_index("region")
        assert g.loc["whole", "n_clusters"] == 4
        assert g.loc[["bg", "wm", "outside"], "n_clusters"].sum() == 4
        assert g.loc["whole", "volume_mm3"] == pytest.approx(g.loc[["bg", "wm", "outside"], "volume_mm3"].sum())
        vv = 0.69 * 0.69 * 2.0
        assert g.loc["whole", "volume_mm3"] == pytest.approx(subjects[cid][0].sum() * vv, rel=1e-6)
        assert g.loc["whole", "region_volume_mm3"] == pytest.approx((subjects[cid][2] != 0).sum() * vv, rel=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["version"] == __version__ and summary["threshold"] == {"value": 0.5, "source": "default"}
    assert summary["min_size_mm3"] == 0 and summary["inputs"]["images"] == str((tmp / "images").resolve())
    assert summary["kinds"] == ["binary"] and summary["n_clusters"] == 12
    html = (out / "report.html").read_text()
    # each subject's files are in its own folder (cases/CASE/), the report links there
    assert html.count("data:image/png;base64,") == 2 and 'href="cases/sub-02/overlay.png"' in html
    assert "sub-03" in html and "<table" in html and "http" not in html.replace("http-equiv", "")
    for cid in subjects:
        assert (out / "cases" / cid / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp.iterdir() if p.name.startswith(".census")]  # no temporary folder left


def test_cli_nnunet_probability_files_threshold_workers_and_label_maps(cohort):
    """nnU-Net-format .npz + .pkl (written with nnU-Net's reader): world coordinates from the
    .pkl match the NIfTI's; thresholding at T equals censusing the mask p >= T; -np 2 = -np 1."""
    tmp, subjects = cohort
    for cid, (m, prob, _) in subjects.items():
        save((prob >= 0.4).astype(np.uint8), tmp / "bin04" / f"{cid}.nii.gz", AFFINE)
    a, b, c = tmp / "a", tmp / "b", tmp / "c"
    run_cli([CLI, "census", "-i", tmp / "prob", "-o", a, "--threshold", "0.4", "--no-plots", "--label-maps"])
    run_cli([CLI, "census", "-i", tmp / "prob", "-o", b, "--threshold", "0.4", "--no-plots", "-np", "2"])
    run_cli([CLI, "census", "-i", tmp / "bin04", "-o", c, "--no-plots"])
    ca = pd.read_csv(a / "clusters.csv", dtype={"case": str})
    pd.testing.assert_frame_equal(ca, pd.read_csv(b / "clusters.csv", dtype={"case": str}))
    cc = pd.read_csv(c / "clusters.csv", dtype={"case": str})
    geo = [k for k in ca.columns if k not in ("max_prob", "mean_prob")]
    pd.testing.assert_frame_equal(ca[geo], cc[geo])
    assert (ca["max_prob"] >= ca["mean_prob"]).all() and (ca["mean_prob"] >= 0.4).all()
    m, prob, _ = subjects["sub-02"]
    lab = nib.load(a / "cases" / "sub-02" / "labels.nii.gz")
    assert np.allclose(lab.affine, AFFINE, atol=1e-4)
    lab = np.asarray(lab.dataobj)
    rows = ca[ca["case"] == "sub-02"]
    assert list(np.bincount(lab.ravel())[1:]) == list(rows["n_voxels"])
    for _, r in rows.iterrows():
        assert r["max_prob"] == pytest.approx(prob[lab == r["cluster"]].max(), abs=1e-6)
    summary = json.loads((a / "summary.json").read_text())
    assert summary["threshold"] == {"value": 0.4, "source": "option"} and summary["kinds"] == ["probabilities"]
    # the reliability columns: the map's own values (nnunet_pvs.reliability), NaN for binary masks
    from nnunet_pvs.reliability import mean_core_probability

    sa = pd.read_csv(a / "subjects.csv", dtype={"case": str})
    got = sa.loc[(sa["case"] == "sub-02") & (sa["region"] == "whole"), "mean_core_probability"].item()
    assert got == pytest.approx(mean_core_probability(prob.astype(np.float32), 0.4), abs=1e-5)
    assert pd.read_csv(c / "subjects.csv")["mean_core_probability"].isna().all()


def test_cli_threshold_from_an_evaluation_folder(cohort):
    tmp, _ = cohort
    ev = tmp / "eval"
    ev.mkdir()
    pd.DataFrame({"case": ["sub-01", "sub-01", "sub-02", "sub-02"], "region": "whole",
                  "threshold": [0.3, 0.6, 0.3, 0.6], "metric": "dice",
                  "value": [0.5, 0.7, 0.6, 0.8]}).to_csv(ev / "thresholds.csv", index=False)
    out = tmp / "o"
    run_cli([CLI, "census", "-i", tmp / "prob", "-o", out, "--threshold-from", ev, "--no-plots",
             "--min-size-mm3", "1.5"])
    s = json.loads((out / "summary.json").read_text())
    assert s["threshold"]["value"] == 0.6 and s["threshold"]["source"] == "sweep"
    assert s["threshold"]["mean_dice"] == pytest.approx(0.75) and s["min_size_mm3"] == 1.5
    cl = pd.read_csv(out / "clusters.csv")
    assert (cl["volume_mm3"] >= 1.5).all() and len(cl) == 9        # single voxels (0.95 mm3) dropped
    (tmp / "eval_binary").mkdir()
    proc = run_cli([CLI, "census", "-i", tmp / "prob", "-o", tmp / "o2", "--threshold-from", tmp / "eval_binary"],
                   check=False)
    assert proc.returncode == 2 and "no thresholds.csv" in proc.stderr and not (tmp / "o2").exists()


def test_cli_empty_prediction_is_zero_clusters(tmp_path):
    save(np.zeros(SHAPE, np.uint8), tmp_path / "pred" / "empty.nii.gz", AFFINE)
    out = tmp_path / "out"
    proc = run_cli([CLI, "census", "-i", tmp_path / "pred", "-o", out])
    assert "0 cluster(s)" in proc.stdout
    assert len(pd.read_csv(out / "clusters.csv")) == 0
    sub = pd.read_csv(out / "subjects.csv")
    assert list(sub["region"]) == ["whole"] and sub["n_clusters"].tolist() == [0]
    assert (out / "cases" / "empty" / "overlay.png").is_file() and (out / "report.html").is_file()


def _census(args, capsys) -> tuple[int, str]:
    rc = main(["census", *map(str, args), "--no-plots"])
    return rc, capsys.readouterr().err


def _bad(tmp: Path, what: str) -> tuple[list, str]:
    """Break a copy of the cohort in one way; return census arguments and the file to be named."""
    b = tmp / f"bad_{what}"
    for sub in ("bin", "images", "regions", "prob"):
        shutil.copytree(tmp / sub, b / sub)
    args = ["-i", b / "bin", "--images", b / "images", "--regions", b / "regions"]
    if what == "image_geometry":
        f = b / "images" / "sub-02_0000.nii.gz"
        img = nib.load(f)
        aff = img.affine.copy()
        aff[0, 3] += 1.0
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), f)
    elif what == "region_shape":
        f = b / "regions" / "sub-03.nii.gz"
        save(np.full((26, 22, 11), 2, np.int16), f, AFFINE)
    elif what == "not_binary":
        f = b / "bin" / "sub-01.nii.gz"
        save(np.full(SHAPE, 0.3, np.float32), f, AFFINE)
    elif what == "nan_probabilities":
        f = b / "prob" / "sub-02.npz"
        with np.load(f) as z:
            p = z["probabilities"].copy()
        p[1, 3, 3, 3] = np.nan
        np.savez_compressed(f, probabilities=p)
        args = ["-i", b / "prob"]
    elif what == "image_missing":
        f = b / "bin" / "sub-03.nii.gz"
        (b / "images" / "sub-03_0000.nii.gz").unlink()
    elif what == "image_only":
        f = b / "images" / "sub-04_0000.nii.gz"
        shutil.copy(b / "images" / "sub-01_0000.nii.gz", f)
    elif what == "regions_missing":
        f = b / "bin" / "sub-01.nii.gz"
        (b / "regions" / "sub-01.nii.gz").unlink()
    else:
        raise ValueError(what)
    return args, str(f)


@pytest.mark.parametrize("what", ["image_missing", "regions_missing"])
def test_bad_input_is_one_line_naming_the_file_exit_2_nothing_written(cohort, capsys, what):
    """Inputs that do not pair are found before any subject is censused: nothing is written."""
    tmp, _ = cohort
    args, named = _bad(tmp, what)
    out = tmp / "new" / "census"
    rc, err = _census([*args, "-o", out], capsys)
    assert rc == 2
    lines = err.strip().splitlines()        # a progress bar may come first, closed on its own line
    assert err.count("error:") == 1 and lines[-1].startswith("nnunet-pvs census: error:") and named in lines[-1]
    assert not out.exists() and not (tmp / "new").exists()


@pytest.mark.parametrize("what", ["image_geometry", "region_shape", "not_binary", "nan_probabilities"])
def test_a_subject_that_fails_a_check_is_listed_and_the_others_complete(cohort, capsys, what):
    """Changed with the cohort-scale census (issue 27): one subject's bad file no longer stops the run.
    It is listed in failures.csv with the one-line reason naming the file; the others are censused;
    the run exits 1 with one line; nothing of the failed subject is in the tables or its folder."""
    tmp, _ = cohort
    args, named = _bad(tmp, what)
    bad_case = Path(named).name.split(".")[0].split("_")[0]
    out = tmp / "new" / "census"
    rc, err = _census([*args, "-o", out], capsys)
    assert rc == 1
    assert err.strip().splitlines()[-1] == (f"nnunet-pvs census: 1 of 3 subject(s) failed; listed with the reason "
                                            f"in {out / 'failures.csv'}")
    failures = pd.read_csv(out / "failures.csv", dtype=str)
    assert list(failures["case"]) == [bad_case] and named in failures["reason"].iloc[0]
    sub = pd.read_csv(out / "subjects.csv", dtype={"case": str})
    assert sorted(set(sub["case"])) == sorted({"sub-01", "sub-02", "sub-03"} - {bad_case})
    assert sorted(p.name for p in (out / "cases" / bad_case).iterdir()) == ["record.json"]


def test_bad_input_through_the_installed_command(cohort):
    tmp, _ = cohort
    args, named = _bad(tmp, "not_binary")
    proc = run_cli([CLI, "census", *args, "-o", tmp / "o"], check=False)
    # changed with the cohort-scale census (issue 27): the subject is listed, the others complete, exit 1
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "1 of 3 subject(s) failed" in proc.stderr
    reason = pd.read_csv(tmp / "o" / "failures.csv", dtype=str)["reason"].iloc[0]
    assert named in reason and "no probability file" in reason


def test_allow_missing_and_images_or_regions_of_ids_not_predicted(cohort, capsys):
    """A prediction without its image is an error unless --allow-missing (then skipped and
    listed); images and region maps of ids that were not predicted are listed, not used."""
    tmp, _ = cohort
    args, named = _bad(tmp, "image_missing")
    out = tmp / "o"
    rc, err = _census([*args, "-o", out, "--allow-missing"], capsys)
    assert rc == 0 and "sub-03" in err
    s = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in s["cases"]] == ["sub-01", "sub-02"]
    assert any(named in v for v in s["left_out"].values())
    args, named = _bad(tmp, "image_only")
    shutil.copy(tmp / "regions" / "sub-01.nii.gz", tmp / "bad_image_only" / "regions" / "sub-09.nii.gz")
    out = tmp / "o2"
    rc, err = _census([*args, "-o", out], capsys)
    assert rc == 0 and "not used" in err
    s = json.loads((out / "summary.json").read_text())
    assert s["n_cases"] == 3 and not s["left_out"]
    listed = [f for v in s["unused"].values() for f in v]
    assert named in listed and str(tmp / "bad_image_only" / "regions" / "sub-09.nii.gz") in listed


def test_output_folder_rules(cohort, capsys):
    tmp, _ = cohort
    other = tmp / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    rc, err = _census(["-i", tmp / "bin", "-o", other], capsys)
    assert rc == 2 and "not written by 'nnunet-pvs census'" in err and (other / "notes.txt").read_text() == "keep me"
    evaluation = tmp / "eval_out"        # another command's output folder (earlier versions' marker) is not replaced
    evaluation.mkdir()
    (evaluation / ".nnunet-pvs-output").write_text("written by nnunet-pvs evaluate\n")
    (evaluation / "per_case.csv").write_text("case\n")
    rc, err = _census(["-i", tmp / "bin", "-o", evaluation], capsys)
    assert rc == 2 and "was written by 'nnunet-pvs evaluate'" in err and (evaluation / "per_case.csv").exists()
    out = tmp / "census"
    assert _census(["-i", tmp / "bin", "-o", out], capsys)[0] == 0
    (out / "stale.txt").write_text("from an earlier run")
    first = (out / "summary.json").read_text()
    # a rerun that stops on bad input before any subject leaves the earlier census untouched
    args, _ = _bad(tmp, "image_missing")
    assert _census([*args, "-o", out], capsys)[0] == 2
    assert (out / "summary.json").read_text() == first and (out / "stale.txt").exists()
    # changed with the cohort-scale census (issue 27): OUT is refilled subject by subject, so a rerun on
    # other inputs redoes every subject and assembles new tables; files of the user's inside OUT are kept
    assert _census(["-i", tmp / "prob", "-o", out], capsys)[0] == 0
    assert json.loads((out / "summary.json").read_text())["kinds"] == ["probabilities"]
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".census")) == []


@pytest.mark.parametrize("option,value,message", [
    ("--threshold", "0", "--threshold must be in (0, 1]"), ("--threshold", "1.5", "(0, 1]"),
    ("--min-size-mm3", "-1", "--min-size-mm3"), ("--size-classes", "10,5", "increasing"),
])
def test_bad_options(cohort, capsys, option, value, message):
    tmp, _ = cohort
    rc, err = _census(["-i", tmp / "bin", "-o", tmp / "o", option, value], capsys)
    assert rc == 2 and message in err and not (tmp / "o").exists()


# ---------------------------------------------------------------------------------------------
# end to end: real nnU-Net predictions of the phantom, a sweep on them, then the census

@pytest.mark.e2e
def test_census_of_real_nnunet_predictions(nnunet_env, tmp_path):
    env = {**nnunet_env["env"], "NNUNET_PVS_EPOCHS": "1", "NNUNET_PVS_ITERATIONS": "2",
           "NNUNET_PVS_VAL_ITERATIONS": "1"}
    run_cli([CLI, "phantom", "--size", "tiny", "-d", "951", "--test", "2"], env=env)
    ds = next(nnunet_env["nnUNet_raw"].glob("Dataset951_*"))
    run_cli([BIN / "nnUNetv2_plan_and_preprocess", "-d", "951", "-c", "2d", "-np", "1"], env=env)
    run_cli([BIN / "nnUNetv2_train", "951", "2d", "0", "-tr", "nnUNetTrainer_budget", "-device", "cpu"], env=env)
    pred = tmp_path / "pred"
    run_cli([BIN / "nnUNetv2_predict", "-i", ds / "imagesTs", "-o", pred, "-d", "951", "-c", "2d",
             "-tr", "nnUNetTrainer_budget", "-f", "0", "--save_probabilities", "-device", "cpu",
             "-npp", "1", "-nps", "1"], env=env)
    ev = tmp_path / "eval"
    run_cli([CLI, "evaluate", "--ref", ds / "labelsTs", "--pred", pred, "-o", ev, "--no-plots",
             "--min-cluster-sizes", "0"], env=env)
    out = tmp_path / "census"
    run_cli([CLI, "census", "-i", pred, "-o", out, "--images", ds / "imagesTs", "--regions", ds / "regions",
             "--threshold-from", ev], env=env)
    s = json.loads((out / "summary.json").read_text())
    assert s["threshold"]["source"] == "sweep" and s["kinds"] == ["probabilities"]
    ids = sorted(p.name[: -len("_0000.nii.gz")] for p in (ds / "imagesTs").glob("*_0000.nii.gz"))
    assert [c["case"] for c in s["cases"]] == ids
    sub = pd.read_csv(out / "subjects.csv", dtype={"case": str})
    assert set(ids) == set(sub["case"]) and {"whole", "bg", "wm"} <= set(sub["region"])
    for cid in ids:
        assert (out / "cases" / cid / "overlay.png").is_file()
        # the binary segmentation nnU-Net wrote has the same grid as the probabilities we read
        seg = nib.load(pred / f"{cid}.nii.gz")
        assert s["cases"][ids.index(cid)]["shape"] == list(seg.shape)
