"""PVS geometry: how many, where, how wide, how long, along which course.

Sources (docs/data.md lists each parameter with its reference):

* diameter: log-normal, median 0.9 mm in white matter (clipped 0.4-2.5 mm), 1.3 mm in the basal
  ganglia (clipped 0.5-3.0 mm): most PVS are below 1 mm, visible ones reach 2-3 mm, larger in the
  basal ganglia (Wardlaw et al. 2020, Nat. Rev. Neurol.; Boutinaud et al. 2021);
* length 3-20 mm (log-normal, median 9 mm in WM and 7 mm in the basal ganglia); every tube tapers
  towards its tip and its width varies by up to +-40 % along it; its signal (fluid fraction) varies
  between 0.4 and 1.0 along it;
* course: centrum semiovale PVS follow the medullary arteries, radially inward, perpendicular to
  the ventricular wall and the cortex; basal-ganglia PVS follow the lenticulostriate arteries,
  rising from the base of the lenticular nucleus, tilted laterally and bending as they ascend;
* burden: per-subject log-normal load (about tenfold spread across subjects) rising with age.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nnunet_pvs.dataset_conversion.phantom.anatomy import LENTICULAR_LABELS, WM_LABELS, inward

# Rendered tubes per cm3 of seed tissue at load 1 (before the rater's visibility rule drops faint ones).
DENSITY = {"T2w": {"wm": 2.0, "bg": 10.0}, "T1w": {"wm": 0.3, "bg": 3.0}}
LOAD_SIGMA = 0.6      # log-normal spread of the per-subject load: p5-p95 ratio about 7, x age factor
AGE_SLOPE = 0.03      # load rises by 3 % per year of age above the cohort's youngest
DIAMETER = {"wm": (0.9, 0.40, 0.4, 2.5), "bg": (1.3, 0.35, 0.5, 3.0)}  # median mm, log-sd, min, max
LENGTH = {"wm": (9.0, 0.5, 3.0, 20.0), "bg": (7.0, 0.45, 3.0, 20.0)}   # median mm, log-sd, min, max
WIDTH_VARIATION = 0.4  # +- fraction of the radius along a tube
TAPER = (0.2, 0.5)     # radius at the tip relative to the base
SIGNAL = (0.4, 1.0)    # relative signal (fluid fraction) range along a tube


@dataclass
class Tube:
    """One PVS: centre line, radius and signal profiles along its arc length, and its family."""

    poly: np.ndarray
    radius_knots: np.ndarray
    signal_knots: np.ndarray
    kind: str

    def radius_at(self, f):
        return np.interp(f, np.linspace(0, 1, len(self.radius_knots)), self.radius_knots)

    def signal_at(self, f):
        return np.interp(f, np.linspace(0, 1, len(self.signal_knots)), self.signal_knots)


def subject_load(rng, age: int, youngest: int) -> float:
    return float(np.exp(rng.normal(0.0, LOAD_SIGMA)) * (1.0 + AGE_SLOPE * (age - youngest)))


def _lognormal(rng, median, sd, lo, hi):
    return float(np.clip(rng.lognormal(np.log(median), sd), lo, hi))


def smooth_profile(rng, n_knots: int, lo: float, hi: float) -> np.ndarray:
    """A slowly varying random profile within [lo, hi] (a random walk, smoothed)."""
    walk = np.cumsum(rng.normal(0, 1, n_knots))
    walk = np.convolve(np.pad(walk, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    span = np.ptp(walk)
    u = (walk - walk.min()) / span if span > 1e-9 else np.full(n_knots, 0.5)
    return lo + (hi - lo) * u


def tube_profiles(rng, kind: str, length: float) -> tuple[np.ndarray, np.ndarray]:
    """Radius knots (tapering, +-40 % variation) and signal knots (0.4-1.0) along one tube."""
    median, sd, lo, hi = DIAMETER[kind]
    r0 = _lognormal(rng, median, sd, lo, hi) / 2.0
    n = max(3, int(length / 2.0) + 1)
    taper = np.linspace(1.0, rng.uniform(*TAPER), n)
    wobble = 1.0 + WIDTH_VARIATION * (2 * smooth_profile(rng, n, 0, 1) - 1) * rng.uniform(0.5, 1.0)
    radius = np.clip(r0 * taper * wobble, 0.15, hi / 2)
    lo_s = rng.uniform(SIGNAL[0], 0.8)
    signal = smooth_profile(rng, n, lo_s, rng.uniform(max(lo_s, 0.8), SIGNAL[1]))
    return radius, signal


def grow(rng, seed_pt, direction, length, ok, bend, one_way=False, jitter=0.08):
    """Polyline grown in 1 mm steps from a seed (both ways unless ``one_way``) while ``ok(point)``."""
    halves = []
    for sign in ((1.0,) if one_way else (1.0, -1.0)):
        pts, p, d = [], seed_pt.copy(), sign * direction
        for _ in range(int(length if one_way else length / 2)):
            d = d + bend(p, d) + rng.normal(0, jitter, 3)
            d /= np.linalg.norm(d)
            q = p + d
            if not ok(q):
                break
            pts.append(q)
            p = q
        halves.append(pts)
    back = list(reversed(halves[1])) if len(halves) > 1 else []
    poly = [*back, seed_pt, *halves[0]]
    return np.array(poly) if len(poly) >= 3 else None


def course_rules(kind, an, origin, spacing, warp, forbid, start):
    """(ok, bend) of the course of a ``kind`` PVS starting at ``start``: where it may run (its tissue,
    inside the grid, not where ``forbid(point)``) and how it turns at each 1 mm step."""
    labels = an["labels"]
    shape = np.array(labels.shape)
    allowed = WM_LABELS if kind == "wm" else LENTICULAR_LABELS + WM_LABELS

    def ok(p):
        i = np.round((p - origin) / spacing).astype(int)
        if np.any(i < 0) or np.any(i >= shape) or forbid(p):
            return False
        return labels[tuple(i)] in allowed

    if kind == "wm":
        def bend(p, d):  # keeps to the inward normal, in whichever direction it runs
            g = inward(an, p)
            return 0.15 * g * np.sign(np.dot(g, d))
    else:
        lateral = np.sign(warp(np.asarray(start, float)[None])[0, 0]) or 1.0

        def bend(p, d):  # lenticulostriate: drifts outward as it rises
            return np.array([0.04 * lateral, 0.0, 0.0])
    return ok, bend


def make_tube(rng, kind, seed_pt, an, origin, spacing, warp, forbid) -> Tube | None:
    """One PVS of family ``kind`` ("wm": centrum semiovale, "bg": lenticulostriate) from a seed point."""
    ok, bend = course_rules(kind, an, origin, spacing, warp, forbid, seed_pt)
    if not ok(seed_pt):
        return None
    median, sd, lo, hi = LENGTH[kind]
    length = _lognormal(rng, median, sd, lo, hi)
    if kind == "wm":
        d0 = inward(an, seed_pt) + rng.normal(0, 0.2, 3)
        poly = grow(rng, seed_pt, d0 / np.linalg.norm(d0), length, ok, bend)
    else:
        lateral = np.sign(warp(seed_pt[None])[0, 0]) or 1.0
        theta = np.deg2rad(rng.uniform(5, 30))
        d0 = np.array([lateral * np.sin(theta), rng.normal(0, 0.15), np.cos(theta)])
        poly = grow(rng, seed_pt, d0 / np.linalg.norm(d0), length, ok, bend, one_way=True)
    if poly is None:
        return None
    arc = float(np.linalg.norm(np.diff(poly, axis=0), axis=1).sum())
    if arc < LENGTH[kind][2] - 1.0:
        return None
    radius, signal = tube_profiles(rng, kind, arc)
    return Tube(poly, radius, signal, kind)
