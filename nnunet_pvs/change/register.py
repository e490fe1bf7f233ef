"""Rigid registration of the follow-up image to the baseline, and moving follow-up maps into baseline space.

The head moves between visits, so the follow-up's clusters sit elsewhere on the grid. The follow-up
image is registered to the baseline image with SimpleITK (ITK's v4 registration framework): a rigid
``Euler3DTransform`` started at the images' geometric centres, Mattes mutual information (works for
two scans whose intensities differ in scale or bias), a fixed random sample of voxels inside the
baseline brain, a regular-step gradient descent with scales from physical shift, three resolution
levels (shrink 4, 2, 1 with Gaussian smoothing of 2, 1, 0 voxels). This is the recipe of the
SimpleITK registration notebooks and of FreeSurfer/ANTs rigid stages for same-subject, same-contrast
pairs.

The quality of each registration is measured, not assumed: the Mattes MI before (identity, i.e.
the scanner's own coordinates) and after, and the normalised cross-correlation (Pearson r) of the
baseline image and the registered follow-up inside the baseline brain. Two scans of one head agree
far better than unrelated images, so a low NCC flags a failed registration (or a wrong pairing).

Coordinates: our arrays are nibabel's (x, y, z) with a RAS affine; SimpleITK works in LPS. The
transform maps baseline world points to follow-up world points (ITK's fixed-to-moving convention),
which is what resampling the follow-up onto the baseline grid needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)


@dataclass(frozen=True)
class RegistrationSettings:
    """How the rigid registration runs (defaults suit same-contrast brain MRI at ~1 mm)."""

    histogram_bins: int = 50
    max_samples: int = 200_000        # random metric samples per level at most (all voxels of small images)
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_voxels: tuple[float, ...] = (2.0, 1.0, 0.0)
    iterations: int = 300
    learning_rate: float = 1.0        # mm-equivalent first step (scales from physical shift)
    min_step: float = 1e-4
    seed: int = 1                     # the metric's random sample: same inputs, same result


@dataclass(frozen=True)
class Registration:
    """A rigid transform baseline world -> follow-up world (LPS Euler3D parameters around ``center``)
    and how well it aligned the images. Plain numbers only, so it crosses process boundaries."""

    center_lps: tuple[float, float, float]
    parameters: tuple[float, ...]     # angle x, y, z (rad), translation x, y, z (mm), LPS
    mi_identity: float                # Mattes mutual information (higher = better aligned), identity transform
    mi_final: float                   # ... after registration
    ncc_identity: float               # Pearson r of baseline and follow-up in the baseline brain, identity
    ncc: float                        # ... after registration
    overlap: float                    # share of the brain mask the registered follow-up covers
    iterations: int
    stop: str
    seconds: float = 0.0
    levels: tuple[int, ...] = field(default_factory=tuple)

    def sitk_transform(self):
        import SimpleITK as sitk

        t = sitk.Euler3DTransform()
        t.SetCenter(self.center_lps)
        t.SetParameters(self.parameters)
        return t

    def matrix_ras(self) -> np.ndarray:
        """4 x 4 matrix taking baseline world (RAS mm) to follow-up world (RAS mm)."""
        t = self.sitk_transform()
        r = np.asarray(t.GetMatrix(), float).reshape(3, 3)
        c = np.asarray(self.center_lps, float)
        shift = np.asarray(t.GetTranslation(), float)
        m = np.eye(4)
        m[:3, :3] = _LPS @ r @ _LPS
        m[:3, 3] = _LPS @ (c - r @ c + shift)
        return m

    def map_points(self, points_ras: np.ndarray) -> np.ndarray:
        """Baseline world points (n, 3), RAS mm, to where they are in the follow-up scan."""
        m = self.matrix_ras()
        return np.asarray(points_ras, float) @ m[:3, :3].T + m[:3, 3]

    def motion(self) -> dict:
        """The head motion in words a reader checks: total rotation and rotation about the RAS axes
        (x, y, z Euler angles, degrees) and the translation (RAS mm) of the rotation centre (the
        centre of the baseline grid)."""
        from scipy.spatial.transform import Rotation

        m = self.matrix_ras()
        r = m[:3, :3]
        angle = math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(r) - 1) / 2))))
        ex, ey, ez = Rotation.from_matrix(r).as_euler("xyz", degrees=True)
        tx, ty, tz = _LPS @ np.asarray(self.parameters[3:], float)
        return {"rotation_deg": angle, "rotation_x_deg": ex, "rotation_y_deg": ey, "rotation_z_deg": ez,
                "translation_x_mm": tx, "translation_y_mm": ty, "translation_z_mm": tz,
                "translation_mm": float(math.sqrt(tx * tx + ty * ty + tz * tz))}


# --- nibabel arrays <-> SimpleITK images ----------------------------------------------------------

def to_sitk(data: np.ndarray, affine: np.ndarray, dtype=np.float32):
    """A SimpleITK image of an (x, y, z) array with a RAS affine (spacing, origin, direction in LPS).

    A sheared affine (voxel axes not at right angles) has no ITK direction matrix: ValueError.
    """
    import SimpleITK as sitk

    a3 = np.asarray(affine, float)[:3, :3]
    spacing = np.linalg.norm(a3, axis=0)
    direction = _LPS @ a3 / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise ValueError("the affine is sheared (voxel axes not orthogonal); ITK cannot represent it")
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, dtype).transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(v) for v in _LPS @ np.asarray(affine, float)[:3, 3]))
    img.SetDirection(tuple(float(v) for v in direction.ravel()))
    return img


def from_sitk(img) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def levels_for(shape, settings: RegistrationSettings) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The resolution levels an image of ``shape`` allows: shrinking stops before an axis would fall
    under 8 voxels (a thin slab is registered at fewer levels rather than on a 2-voxel image)."""
    keep = [i for i, f in enumerate(settings.shrink_factors) if f == 1 or min(shape) / f >= 8]
    return (tuple(settings.shrink_factors[i] for i in keep) or (1,),
            tuple(settings.smoothing_voxels[i] for i in keep) or (0.0,))


def brain_mask(image: np.ndarray) -> np.ndarray:
    """Head voxels of an image without a region map: above Otsu's threshold (ITK's OtsuThreshold)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(image, np.float32))
    mask = sitk.GetArrayFromImage(sitk.OtsuThreshold(img, 0, 1, 128)).astype(bool)
    return mask if mask.any() else np.ones(image.shape, bool)


def _method(settings: RegistrationSettings, n_sample_space: int, mask_img, levels=None, threads: int = 0):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    fraction = min(1.0, settings.max_samples / max(1, n_sample_space))
    if fraction < 1.0:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(fraction, settings.seed)
    else:
        reg.SetMetricSamplingStrategy(reg.NONE)
    if mask_img is not None:
        reg.SetMetricFixedMask(mask_img)
    reg.SetInterpolator(sitk.sitkLinear)
    if threads > 0:
        reg.SetNumberOfThreads(threads)
    if levels is not None:
        shrink, smooth = levels
        reg.SetShrinkFactorsPerLevel(list(shrink))
        reg.SetSmoothingSigmasPerLevel(list(smooth))
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def _ncc(fixed: np.ndarray, moved: np.ndarray, mask: np.ndarray) -> float:
    a, b = fixed[mask].astype(np.float64), moved[mask].astype(np.float64)
    if a.size < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else 0.0


def register_rigid(fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray,
                   mask: np.ndarray | None = None, settings: RegistrationSettings = RegistrationSettings(),
                   threads: int = 0) -> Registration:
    """Rigidly register ``moving`` (follow-up image) to ``fixed`` (baseline image); ``mask``: the
    baseline brain (default :func:`brain_mask`); ``threads``: ITK threads (0: all cores; 1 in each
    of several worker processes). Raises RuntimeError where ITK cannot register."""
    import time

    import SimpleITK as sitk

    start = time.perf_counter()
    mask = brain_mask(fixed) if mask is None else np.asarray(mask, bool)
    if not mask.any():
        mask = np.ones(fixed.shape, bool)
    f_img, m_img = to_sitk(fixed, fixed_affine), to_sitk(moving, moving_affine)
    mask_img = to_sitk(mask, fixed_affine, np.uint8)
    n_mask = int(mask.sum())
    init = sitk.CenteredTransformInitializer(f_img, m_img, sitk.Euler3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.GEOMETRY)
    init = sitk.Euler3DTransform(init)
    shrink, smooth = levels_for(fixed.shape, settings)
    reg = _method(settings, n_mask, mask_img, (shrink, smooth), threads)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=settings.learning_rate, minStep=settings.min_step,
                                                 numberOfIterations=settings.iterations,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(init, inPlace=False)
    out = reg.Execute(f_img, m_img)
    euler = sitk.CompositeTransform(out).GetNthTransform(0) if out.GetName() == "CompositeTransform" else out
    euler = sitk.Euler3DTransform(euler)
    iterations, stop = int(reg.GetOptimizerIteration()), reg.GetOptimizerStopConditionDescription()

    identity = sitk.Euler3DTransform()
    identity.SetCenter(euler.GetCenter())

    def quality(transform) -> tuple[float, float, float]:
        ev = _method(settings, n_mask, mask_img, threads=threads)
        ev.SetInitialTransform(transform, inPlace=False)
        try:
            mi = -float(ev.MetricEvaluate(f_img, m_img))
        except RuntimeError:  # no sample falls inside the follow-up image
            mi = math.nan
        moved = from_sitk(sitk.Resample(m_img, f_img, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        ones = sitk.Image(m_img.GetSize(), sitk.sitkUInt8) + 1
        ones.CopyInformation(m_img)
        covered = from_sitk(sitk.Resample(ones, f_img, transform, sitk.sitkNearestNeighbor, 0,
                                          sitk.sitkUInt8)).astype(bool)
        both = mask & covered
        return mi, _ncc(np.asarray(fixed, np.float32), moved, both), float(both.sum()) / max(1, n_mask)

    mi0, ncc0, _ = quality(identity)
    mi1, ncc1, overlap = quality(euler)
    return Registration(tuple(float(v) for v in euler.GetCenter()), tuple(float(v) for v in euler.GetParameters()),
                        mi0, mi1, ncc0, ncc1, overlap, iterations, " ".join(stop.split()),
                        time.perf_counter() - start, tuple(int(s) for s in shrink))


# --- follow-up maps into baseline space -----------------------------------------------------------

def resample_to_baseline(data: np.ndarray, affine: np.ndarray, ref_shape, ref_affine: np.ndarray,
                         reg: Registration, nearest: bool) -> np.ndarray:
    """A follow-up map on the baseline grid: probabilities linearly (float32), labels / masks by
    nearest neighbour (dtype kept); outside the follow-up's field of view 0."""
    import SimpleITK as sitk

    ref = to_sitk(np.zeros(ref_shape, np.uint8), ref_affine, np.uint8)
    if nearest:
        dtype = np.uint32 if np.issubdtype(np.asarray(data).dtype, np.integer) else np.uint8
        img = to_sitk(data, affine, dtype)
        out = sitk.Resample(img, ref, reg.sitk_transform(), sitk.sitkNearestNeighbor, 0, img.GetPixelID())
        return from_sitk(out).astype(np.asarray(data).dtype, copy=False)
    img = to_sitk(data, affine, np.float32)
    out = sitk.Resample(img, ref, reg.sitk_transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return from_sitk(out)


def push_missing_labels(moved: np.ndarray, labels: np.ndarray, affine: np.ndarray, ref_affine: np.ndarray,
                        reg: Registration) -> np.ndarray:
    """Put back clusters that nearest-neighbour resampling dropped (a one-voxel cluster falling between
    the baseline grid points): each voxel of theirs goes to the baseline voxel nearest to where the
    registration sends it, where that voxel is still background. Every cluster then has a place."""
    n = int(labels.max()) if labels.size else 0
    present = np.zeros(n + 1, bool)
    present[np.unique(moved)] = True
    lost = ~present
    lost[0] = False
    if not lost.any():
        return moved
    out = moved.copy()
    idx = np.flatnonzero(lost[labels.ravel()])
    ijk = np.stack(np.unravel_index(idx, labels.shape), -1).astype(float)
    world = ijk @ np.asarray(affine, float)[:3, :3].T + np.asarray(affine, float)[:3, 3]
    m = reg.matrix_ras()
    base_world = (world - m[:3, 3]) @ np.linalg.inv(m[:3, :3]).T      # follow-up world -> baseline world
    inv = np.linalg.inv(np.asarray(ref_affine, float))
    vox = np.rint(base_world @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
    inside = ((vox >= 0) & (vox < np.array(moved.shape))).all(1)
    vox, lab = vox[inside], labels.ravel()[idx][inside]
    free = out[tuple(vox.T)] == 0
    out[tuple(vox[free].T)] = lab[free]
    return out
