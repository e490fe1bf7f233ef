"""Phantom follow-up visits and same-session rescans, with the truth of every PVS change.

Why: a tool that tracks single PVS between visits (issue 29, ``nnunet-pvs change``) can only be
measured against known changes, and its noise floor only on a rescan in which nothing changed. No
real data set has either; the phantom can make both from the scene it drew for the baseline
(:class:`~nnunet_pvs.dataset_conversion.phantom.subject.Scene`).

How a visit is made:

1. **Head motion.** The head moves inside the scanner, the grid does not: every visit keeps the
   baseline's affine, so a registration is needed to undo the motion. The motion is rigid, about the
   centre of the field of view, each rotation angle drawn uniformly in +-3 deg and each translation
   in +-3 mm; follow-up and rescan draw from the same range, so the rescan's noise floor holds the
   same resampling effects as the follow-up. ``motion.csv`` holds the 4 x 4 world transform ``M``
   (baseline world mm -> visit world mm: anatomy at baseline point x lies at ``M x`` in the visit).
2. **Changes** (follow-up only), made to labelled PVS of at least ``MIN_SIZE`` (4) voxels that
   keep ``ISOLATION`` voxels from every other labelled PVS (below), those wholly inside the slab at
   both positions first (off its outermost layers before and after the motion, and still so once
   changed: a slab that cuts a PVS off cannot measure its change), those with most of their course
   in view first; a PVS the slab cuts off is changed only to give a subject its first change of a
   class (thin slabs such as ``tiny`` have few whole PVS); a candidate one class cannot use
   (too small to shrink by the margin) stays for the others: *enlarged*, by widening (radius x 1.3-1.6) or
   lengthening (grown on along its course by 40-80 % of its length; the width profile is stretched
   over the new length); *shrunk*, by narrowing (radius x 0.5-0.7) or shortening (50-70 % of the
   length cut from the tip); *vanished* (the tube is dropped); *new* (an extra tube drawn by the
   generator's own rules, apart from every labelled PVS, wholly inside the slab at both positions
   unless half the tries found no such one).
   The rescan changes nothing.
3. **Rendering.** The layers under the PVS (tissue, texture, WMH, sulci) and over them (vessels,
   lacunes) are resampled through the motion (linear; past the edge of the field of view the edge
   value continues, as the grid never held anatomy beyond it). The PVS are re-rendered at their
   moved position with the baseline's partial-volume rule, so their labels are exact, not
   interpolated. Then a new bias field and new Rician noise with the baseline's sigma (same protocol).
4. **Labels.** Truth by the baseline's voxel rule. Whether a PVS is labelled at all is decided once,
   at its unmoved position (the baseline's rule: it reaches a signal-weighted coverage of 0.5
   somewhere), so head position alone never adds or removes a PVS from the truth; it can only move
   voxels across partial-volume thresholds. Rater labels by the annotation model of ``labelsTr``
   (new draw). ``pvs_ids`` maps hold the id of the true PVS of each voxel, shared across visits.

**Change rates.** PVS burden rises slowly: computed PVS volumes grew significantly over three to four
annual visits in DELCODE, at rates that varied widely between people (Menze, Bernal et al. 2024,
Alzheimer's Res. Ther. 16:242); a systematic review finds the evolution of MRI-visible PVS slow
(Okar et al. 2023, Front. Neurosci. 17:1038011); across the lifespan PVS become wider and more
numerous (Lynch et al. 2023, NeuroImage 271:120009). Per-PVS rates are not published (studies
compare totals), so the rates here do not mimic a given interval: 10 % of a subject's labelled PVS
enlarged, 5 % shrunk, 7.5 % new, 5 % vanished, at least one of each, the rest (about three quarters)
stable: slow change, with enough examples in each class to measure a change detector's accuracy.

**Minimum change.** A change must hold both at the unmoved position (the designed change) and in the
written follow-up (after motion and re-rendering), or another PVS or action is tried: an enlarged
PVS's truth volume grows to at least ``GROWTH`` (1.5) x and by at least ``MIN_VOXELS`` (5) voxels; a
shrunk one falls to at most ``SHRINKAGE`` (0.5) x, by at least 5 voxels, and keeps at least 2; a
vanished or new PVS has at least 4 voxels where it is present. Why these: a one-voxel layer around a
PVS one or two voxels wide holds more voxels than the PVS itself, so the rule is a ratio, set beyond
the spread that head motion alone gives a stable PVS. Measured on a ``small`` T2w-like subject
under four motions (stable PVS in view): truth volume ratio p2.5-p97.5 0.50-1.31 for 5-8 voxels,
0.68-1.33 for 8-15, 0.85-1.15 above 15; PVS of 1-2 voxels vanish in about 8 % of visits, those of 4
voxels or more never. Motion alone shrinks more often than it grows (baseline PVS were selected as
visible at their baseline position), hence 1.5 up and 0.5 down. The 5 voxels: a change must exceed
the noise floor of a change measurement, which same-session rescans of this phantom put at 4 voxels
(90th percentile of ``|dV|``; ``nnunet-pvs change``'s default ``--min-change-voxels``, docs/change.md):
a smaller change is not one any measurement of two visits could tell from noise.

**Isolation.** A PVS that is changed, vanishes or is new keeps ``ISOLATION`` (2) voxels of empty space
to every other labelled PVS (a (2 x 2 + 1)^3 neighbourhood of each of its voxels), checked at the
unmoved position; the second voxel is room for the motion. One voxel of space is not enough: after the head moves and the PVS are re-rendered, two
PVS one empty voxel apart can touch, and a change tracker that allows a voxel of misregistration
(``nnunet-pvs change --tolerance 1``) links them into one track, so the change would be a property of
two PVS, not one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from nnunet_pvs.dataset_conversion.phantom import imaging
from nnunet_pvs.dataset_conversion.phantom.anatomy import BG_LABELS, WM_LABELS
from nnunet_pvs.dataset_conversion.phantom.pvs import DIAMETER, Tube, course_rules, grow, make_tube
from nnunet_pvs.dataset_conversion.phantom.rendering import render_tube
from nnunet_pvs.dataset_conversion.phantom.subject import (TUBE_VISIBLE, VOXEL_COVER, VOXEL_VISIBLE, Scene,
                                                           annotate, near_any)

VISITS = ("follow_up", "rescan")
VISIT_STREAM = {"follow_up": 1, "rescan": 2}   # random stream of each visit, apart from the baseline's
STATUSES = ("stable", "enlarged", "shrunk", "new", "vanished")
MAX_ROTATION_DEG = 3.0
MAX_TRANSLATION_MM = 3.0
RATES = {"enlarged": 0.10, "shrunk": 0.05, "new": 0.075, "vanished": 0.05}
WIDEN = (1.3, 1.6)       # radius factor
LENGTHEN = (0.4, 0.8)    # added length / length
NARROW = (0.5, 0.7)      # radius factor
SHORTEN = (0.5, 0.7)     # removed length / length
GROWTH = 1.5             # an enlarged PVS's truth volume becomes at least 1.5 x ...
SHRINKAGE = 0.5          # ... a shrunk one's at most 0.5 x (and at least 2 voxels) ...
MIN_VOXELS = 5           # ... and either gains or loses at least 5 voxels (above the rescan noise floor)
ISOLATION = 2            # voxels of empty space between a changed, vanished or new PVS and any other
MIN_SIZE = 4             # voxels of a PVS that is changed, vanishes or is new (where present)
NEW_TRIES = 40           # tubes drawn per wanted new PVS before giving up


@dataclass(frozen=True)
class Motion:
    """Rigid head motion: rotations about x, then y, then z (deg) about ``center_mm``, then the centre
    moves by ``translation_mm``."""

    rotation_deg: tuple
    translation_mm: tuple
    center_mm: tuple

    @property
    def matrix(self) -> np.ndarray:
        return rigid_matrix(self.rotation_deg, self.translation_mm, self.center_mm)


def rigid_matrix(rotation_deg, translation_mm, center_mm) -> np.ndarray:
    """4 x 4 world transform x -> R (x - c) + c + t, with R = Rz Ry Rx."""
    ax, ay, az = np.deg2rad(np.asarray(rotation_deg, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    r = rz @ ry @ rx
    c = np.asarray(center_mm, float)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c + np.asarray(translation_mm, float) - r @ c
    return m


def draw_motion(rng, center_mm) -> Motion:
    return Motion(tuple(np.round(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3), 4)),
                  tuple(np.round(rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, 3), 4)),
                  tuple(float(v) for v in center_mm))


def grid_center(an: dict) -> np.ndarray:
    return an["origin"] + (np.asarray(an["labels"].shape) - 1) / 2.0 * an["spacing"]


def resample(volume: np.ndarray, matrix: np.ndarray, an: dict, order: int = 1) -> np.ndarray:
    """``volume`` as the moved head shows it on the same grid: value at visit voxel y = volume at M^-1 y."""
    if np.allclose(matrix, np.eye(4)):
        return volume
    s, o = an["spacing"], an["origin"]
    inv = np.linalg.inv(matrix)
    a = inv[:3, :3] * s[None, :] / s[:, None]          # visit voxel index -> baseline voxel index
    b = (inv[:3, :3] @ o + inv[:3, 3] - o) / s
    return ndimage.affine_transform(volume, a, offset=b, order=order, mode="nearest")


def moved(tube: Tube, matrix: np.ndarray) -> Tube:
    return dataclasses.replace(tube, poly=tube.poly @ matrix[:3, :3].T + matrix[:3, 3])


def in_view_fraction(tube: Tube, matrix: np.ndarray, an: dict) -> float:
    """Fraction of the tube's centre-line points inside the field of view after the motion."""
    i = (moved(tube, matrix).poly - an["origin"]) / an["spacing"]
    inside = np.all((i >= -0.5) & (i <= np.asarray(an["labels"].shape) - 0.5), axis=1)
    return float(inside.mean())


def inside_both(idx: np.ndarray, matrix: np.ndarray, an: dict) -> bool:
    """Whether the voxels ``idx`` (unmoved position) lie off the grid's outermost layers both where they
    are and where the motion takes them: a PVS a slab cuts off at either visit shows a volume change
    that is not one (``nnunet-pvs change`` calls such a track's change uncertain), so changes are made
    where a slab can see them whole (PVS at the edges stay, unchanged, as in any scan)."""
    shape = np.asarray(an["labels"].shape)
    if not len(idx) or ((idx < 1) | (idx > shape - 2)).any():
        return False
    world = an["origin"] + idx * an["spacing"]
    moved_idx = (world @ matrix[:3, :3].T + matrix[:3, 3] - an["origin"]) / an["spacing"]
    return bool(((moved_idx >= 0.5) & (moved_idx <= shape - 1.5)).all())


def _group(keys: np.ndarray, rows: np.ndarray) -> tuple[list, list]:
    """(unique keys, the rows of each) of rows sorted by key."""
    uniq, start = np.unique(keys, return_index=True)
    return [int(k) for k in uniq], np.split(rows, start[1:])


def _render(scene: Scene, tube: Tube, tissue_ok: np.ndarray):
    """(voxel indices, signal-weighted coverage, labelled-voxel flags) of one tube, or None."""
    an = scene.an
    res = render_tube(tube.poly, tube.radius_at, tube.signal_at, an["labels"].shape, an["origin"], an["spacing"],
                      scene.offsets)
    if res is None:
        return None
    idx, cover, weighted, centre_in = res
    voxel = ((cover >= VOXEL_COVER) | centre_in) & (weighted >= VOXEL_VISIBLE) & tissue_ok[tuple(idx.T)]
    return idx, weighted, voxel


def _visible(rendered) -> bool:
    return rendered is not None and bool(rendered[2].any()) and float(rendered[1].max()) >= TUBE_VISIBLE


def _own_voxels(rendered) -> np.ndarray:
    return rendered[0][rendered[2]] if rendered is not None else np.zeros((0, 3), int)


_NEIGHBOURS = np.stack(np.meshgrid(*[np.arange(-ISOLATION, ISOLATION + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)


def _touches_other(idx: np.ndarray, ids: np.ndarray, own: int) -> bool:
    """Whether any of the voxels ``idx`` or a voxel within ``ISOLATION`` of one (every axis) holds a
    labelled PVS other than ``own``."""
    if not len(idx):
        return False
    n = np.clip((idx[:, None, :] + _NEIGHBOURS[None]).reshape(-1, 3), 0, np.asarray(ids.shape) - 1)
    v = ids[tuple(n.T)]
    return bool(np.any((v > 0) & (v != own)))


def touching_ids(ids: np.ndarray, reach: int = 1) -> set:
    """Ids of labelled PVS with a voxel of another PVS within ``reach`` voxels (every axis; 1: the 26
    neighbours) of one of theirs."""
    fg = ids > 0
    big = np.iinfo(np.int32).max
    size = 2 * reach + 1
    high = ndimage.maximum_filter(ids, size=size, mode="constant", cval=0)
    low = ndimage.minimum_filter(np.where(fg, ids, big).astype(np.int32), size=size, mode="constant", cval=big)
    return {int(i) for i in np.unique(ids[fg & ((high != ids) | (low != ids))])}


def _arc(poly: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(poly, axis=0), axis=1))])


def modify(tube: Tube, action: str, amount: float, rng, scene: Scene) -> Tube | None:
    """The tube widened/narrowed (radius x ``amount``) or lengthened/shortened (by ``amount`` of its length)."""
    if action in ("widen", "narrow"):
        hi = DIAMETER[tube.kind][3] / 2.0  # the generator's largest radius
        return dataclasses.replace(tube, radius_knots=np.clip(tube.radius_knots * amount, 0.15, hi))
    arc = _arc(tube.poly)
    if action == "shorten":
        keep = int(np.searchsorted(arc, (1.0 - amount) * arc[-1], side="right"))
        return dataclasses.replace(tube, poly=tube.poly[:keep]) if keep >= 3 else None
    an = scene.an
    ok, bend = course_rules(tube.kind, an, an["origin"], an["spacing"], scene.warp,
                            lambda p: near_any(p, scene.lacunes), tube.poly[0])
    direction = tube.poly[-1] - tube.poly[-2]
    ext = grow(rng, tube.poly[-1].copy(), direction / np.linalg.norm(direction), amount * arc[-1], ok, bend,
               one_way=True)
    return dataclasses.replace(tube, poly=np.concatenate([tube.poly, ext[1:]])) if ext is not None else None


@dataclass
class Plan:
    """The follow-up scene: its tubes ((Tube, id), id 0 unlabelled), what changed, and new PVS voxels."""

    tubes: list
    changes: dict        # id -> (status, action)
    new_voxels: dict     # id -> voxel indices of a new PVS at its unmoved position


def meets_margin(status: str, before: int, after: int) -> bool:
    """Whether a truth volume going from ``before`` to ``after`` voxels is a clear ``status`` change."""
    if status == "enlarged":
        return after >= GROWTH * before and after - before >= MIN_VOXELS
    return 2 <= after <= SHRINKAGE * before and before - after >= MIN_VOXELS


def plan_follow_up(scene: Scene, rng, matrix: np.ndarray, tissue_ok_moved: np.ndarray) -> Plan:
    """Choose and make the follow-up's changes (module docstring: rates, kinds, minimum change)."""
    an = scene.an
    ids0 = scene.truth_ids
    volume0 = np.bincount(ids0.ravel())
    tubes = list(scene.tubes)
    where = {tid: k for k, (_, tid) in enumerate(tubes) if tid}
    present = [tid for tid in where if tid < len(volume0) and volume0[tid] > 0]
    touching = touching_ids(ids0, ISOLATION)
    candidates = [int(t) for t in rng.permutation([tid for tid in present
                                                   if tid not in touching and volume0[tid] >= MIN_SIZE])]
    view = {tid: in_view_fraction(tubes[where[tid]][0], matrix, an) for tid in candidates}
    fg = np.argwhere(ids0 > 0)
    order = np.argsort(ids0[tuple(fg.T)], kind="stable")
    voxels_of = dict(zip(*_group(ids0[tuple(fg.T)][order], fg[order])))
    whole = {tid: inside_both(voxels_of[tid], matrix, an) for tid in candidates}
    # taken from the end: PVS wholly inside the slab at both positions first, then by the share of the course in view
    queue = sorted(candidates, key=lambda tid: (whole[tid], view[tid]))
    want = {k: max(1, int(round(r * len(present)))) for k, r in RATES.items()} if present else dict.fromkeys(RATES, 0)
    occupied = ids0.copy()   # labelled voxels so far, to keep changed and new PVS apart from the others
    changes: dict[int, tuple[str, str]] = {}

    def change(status: str, tid: int) -> bool:
        """Enlarge or shrink PVS ``tid`` by one of the two actions that meets the margin; False if none."""
        actions = (("widen", WIDEN), ("lengthen", LENGTHEN)) if status == "enlarged" else \
            (("narrow", NARROW), ("shorten", SHORTEN))
        for k in rng.permutation(len(actions)):
            action, span = actions[k]
            amount = float(rng.uniform(*span))
            new = modify(tubes[where[tid]][0], action, amount, rng, scene)
            still = _render(scene, new, scene.tissue_ok) if new is not None else None
            if not _visible(still):
                continue
            voxels = _own_voxels(still)
            after = len(_own_voxels(_render(scene, moved(new, matrix), tissue_ok_moved)))
            if (not meets_margin(status, int(volume0[tid]), len(voxels))
                    or not meets_margin(status, int(volume0[tid]), after) or _touches_other(voxels, occupied, tid)
                    or (whole[tid] and not inside_both(voxels, matrix, an))):
                continue
            sl = tuple(voxels.T)
            occupied[sl] = np.where(occupied[sl] == 0, tid, occupied[sl])
            tubes[where[tid]] = (new, tid)
            size = f"x{amount:.2f}" if action in ("widen", "narrow") else f"{amount:.0%}"
            changes[tid] = (status, f"{action} {size}")
            return True
        return False

    got = dict.fromkeys(("enlarged", "shrunk", "vanished"), 0)
    tried = {k: set() for k in got}   # candidates a class could not use stay for the other classes
    open_ = set(got)
    while open_:
        for status in got:  # one of each class in turn: a subject with few candidates still gets each class
            if status not in open_:
                continue
            # a PVS the slab cuts off only when the subject has no whole one left for a class it lacks
            tid = next((t for t in reversed(queue) if t not in tried[status] and (whole[t] or not got[status])), None)
            if got[status] >= want[status] or tid is None:
                open_.discard(status)
                continue
            if status == "vanished":
                tubes[where[tid]] = None
                changes[tid] = ("vanished", "remove")
            elif not change(status, tid):
                tried[status].add(tid)
                continue
            got[status] += 1
            queue.remove(tid)
    tubes = [t for t in tubes if t is not None]

    # new PVS: drawn like the baseline's, in proportion to the labelled PVS of each family
    labelled = set(present)
    kinds = [t.kind for t, tid in scene.tubes if tid in labelled]
    families = [k for k in ("wm", "bg") if len(scene.seeds[k])]
    weights = np.array([kinds.count(k) + 1.0 for k in families])
    next_id = int(max(where, default=0)) + 1
    new_voxels: dict[int, np.ndarray] = {}
    tries, budget = 0, NEW_TRIES * max(want["new"], 1)
    while len(new_voxels) < want["new"] and families and tries < budget:
        tries += 1
        kind = families[int(rng.choice(len(families), p=weights / weights.sum()))]
        seeds = scene.seeds[kind]
        p0 = an["origin"] + seeds[rng.integers(len(seeds))] * an["spacing"] + rng.uniform(-0.5, 0.5, 3) * an["spacing"]
        if near_any(p0, scene.lacunes):
            continue
        tube = make_tube(rng, kind, p0, an, an["origin"], an["spacing"], scene.warp,
                         lambda p: near_any(p, scene.lacunes))
        if tube is None:
            continue
        still = _render(scene, tube, scene.tissue_ok)
        if not _visible(still):
            continue
        voxels = _own_voxels(still)
        after = len(_own_voxels(_render(scene, moved(tube, matrix), tissue_ok_moved)))
        if len(voxels) < MIN_SIZE or after < MIN_SIZE or _touches_other(voxels, occupied, 0):
            continue
        if not inside_both(voxels, matrix, an) and (new_voxels or tries <= budget // 2):
            continue  # one the slab cuts off only if half the tries gave the subject no new PVS at all
        occupied[tuple(voxels.T)] = next_id
        tubes.append((tube, next_id))
        changes[next_id] = ("new", "add")
        new_voxels[next_id] = voxels
        next_id += 1
    return Plan(tubes, changes, new_voxels)


def compose(scene: Scene, tubes: list, matrix: np.ndarray, labelled: set | None = None):
    """Noise-free visit: (image, PVS signal fraction, truth ids, where PVS may show, {id: mean visibility}).

    ``labelled``: the ids that may hold truth voxels (default all): a tube the baseline drew but did not
    label (its voxels all taken by a neighbour) stays unlabelled, whatever the motion does to it."""
    an = scene.an
    shape = an["labels"].shape
    below = resample(scene.below_pvs, matrix, an)
    brain = resample(an["brain"], matrix, an)
    tissue_ok = resample(scene.tissue_ok.astype(np.float32), matrix, an) >= 0.5
    pvs_w = np.zeros(shape, np.float32)
    ids = np.zeros(shape, np.int32)
    visibility: dict[int, float] = {}
    for tube, tid in tubes:
        r = _render(scene, moved(tube, matrix), tissue_ok)
        if r is None:
            continue
        idx, weighted, voxel = r
        sl = tuple(idx.T)
        pvs_w[sl] = np.maximum(pvs_w[sl], weighted * tissue_ok[sl])
        if tid and voxel.any() and (labelled is None or tid in labelled):
            ids[sl] = np.where(voxel & (ids[sl] == 0), tid, ids[sl])
            visibility[tid] = float(weighted[voxel].mean())
    c = scene.intensities
    img = imaging.mix(below, pvs_w, c["pvs"], brain)
    for coverage, value in scene.above_pvs:
        img = imaging.mix(img, resample(coverage, matrix, an), value, brain)
    return img, pvs_w, ids, tissue_ok, visibility


@dataclass
class Visit:
    """One later visit of a subject, on the baseline's grid."""

    name: str
    motion: Motion
    image: np.ndarray       # float32
    mask: np.ndarray        # uint8 rater label
    pvs_ids: np.ndarray     # int32 truth ids (truth = pvs_ids > 0)
    rows: list              # changes_truth.csv rows


def make_visit(scene: Scene, name: str) -> Visit:
    """The ``follow_up`` (changes, motion, noise) or ``rescan`` (motion, noise) visit of a subject."""
    if name not in VISIT_STREAM:
        raise ValueError(f"visit {name!r}: one of {', '.join(VISITS)}")
    code = 0 if scene.contrast == "T2w" else 1
    motion_rng, change_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(
        [scene.seed, code, scene.index, VISIT_STREAM[name]]).spawn(3))
    motion = draw_motion(motion_rng, grid_center(scene.an))
    matrix = motion.matrix
    if name == "follow_up":
        tissue_ok_moved = resample(scene.tissue_ok.astype(np.float32), matrix, scene.an) >= 0.5
        plan = plan_follow_up(scene, change_rng, matrix, tissue_ok_moved)
    else:
        plan = Plan(list(scene.tubes), {}, {})
    volume0 = np.bincount(scene.truth_ids.ravel())
    labelled = {int(t) for t in np.flatnonzero(volume0)} - {0} | set(plan.new_voxels)
    img, _, ids, tissue_ok, visibility = compose(scene, plan.tubes, matrix, labelled)
    image, _ = imaging.bias_and_noise(noise_rng, img, scene.sigma, scene.an["spacing"])
    mask = annotate(noise_rng, ids, visibility, tissue_ok) if visibility else ids > 0
    rows = truth_rows(scene, name, ids, plan, matrix)
    return Visit(name, motion, image, mask.astype(np.uint8), ids, rows)


def id_stats(ids: np.ndarray, labels: np.ndarray, an: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per id: voxel count, centroid (world mm) and majority region (index into ``REGION_NAMES``; the census rule)."""
    fg = np.nonzero(ids)
    v = ids[fg].astype(np.int64)
    n = int(ids.max()) + 1 if ids.size else 1
    count = np.bincount(v, minlength=n)
    pts = an["origin"] + np.stack(fg, 1) * an["spacing"]
    centroid = np.stack([np.bincount(v, weights=pts[:, k], minlength=n) for k in range(3)], 1).astype(float)
    centroid /= np.maximum(count, 1)[:, None]
    region = np.where(np.isin(labels[fg], BG_LABELS), 2, np.where(np.isin(labels[fg], WM_LABELS), 1, 0))
    votes = np.bincount(v * 3 + region, minlength=n * 3).reshape(n, 3)
    return count, centroid, np.argmax(votes[:, [2, 1, 0]], 1)  # bg before wm before other on a tie, as the
    # covariates' pvs_count_bg / pvs_count_wm count


REGION_NAMES = ("bg", "wm", "other")


def truth_rows(scene: Scene, visit: str, ids: np.ndarray, plan: Plan, matrix: np.ndarray) -> list[dict]:
    """One row per PVS labelled in the baseline or this visit (and every changed one)."""
    an = scene.an
    voxel_mm3 = float(np.prod(an["spacing"]))
    count0, centroid0, region0 = id_stats(scene.truth_ids, an["labels"], an)
    count1 = np.bincount(ids.ravel())
    tube_of = {tid: t for t, tid in scene.tubes if tid}
    tube_of.update({tid: t for t, tid in plan.tubes if tid})
    all_ids = ({int(i) for i in np.flatnonzero(count0[1:]) + 1} | {int(i) for i in np.flatnonzero(count1[1:]) + 1}
               | set(plan.changes))
    rows = []
    for tid in sorted(all_ids):
        status, action = plan.changes.get(tid, ("stable", ""))
        before = int(count0[tid]) if tid < len(count0) else 0
        after = int(count1[tid]) if tid < len(count1) else 0
        if before:
            centre, region = centroid0[tid], REGION_NAMES[region0[tid]]
        else:   # a new PVS: where it is at its unmoved position, i.e. in baseline space
            vox = plan.new_voxels.get(tid)
            if vox is None or not len(vox):
                vox = np.argwhere(resample((ids == tid).astype(np.float32), np.linalg.inv(matrix), an) >= 0.5)
            mini = np.zeros(an["labels"].shape, np.int32)
            mini[tuple(vox.T)] = 1
            _, c, r = id_stats(mini, an["labels"], an)
            centre, region = c[1], REGION_NAMES[r[1]]
        tube = tube_of.get(tid)
        rows.append({"visit": visit, "pvs_id": tid, "status": status, "change": action,
                     "family": tube.kind if tube is not None else "",
                     "volume_baseline_mm3": round(before * voxel_mm3, 3),
                     "volume_follow_up_mm3": round(after * voxel_mm3, 3),
                     "centroid_x_mm": round(float(centre[0]), 2), "centroid_y_mm": round(float(centre[1]), 2),
                     "centroid_z_mm": round(float(centre[2]), 2), "region": region,
                     "in_view_fraction": round(in_view_fraction(tube, matrix, an), 3) if tube is not None else 1.0})
    return rows


def motion_row(case: str, visit: Visit) -> dict:
    m = visit.motion
    row = {"case": case, "visit": visit.name}
    row.update({f"rotation_{a}_deg": float(v) for a, v in zip("xyz", m.rotation_deg)})
    row.update({f"translation_{a}_mm": float(v) for a, v in zip("xyz", m.translation_mm)})
    row.update({f"center_{a}_mm": round(float(v), 4) for a, v in zip("xyz", m.center_mm)})
    row.update({f"m{i}{j}": round(float(m.matrix[i, j]), 8) for i in range(4) for j in range(4)})
    return row


def ids_dtype(ids: np.ndarray):
    return np.int16 if int(ids.max(initial=0)) < np.iinfo(np.int16).max else np.int32


def write_case(folder, case: str, scene: Scene, affine: np.ndarray, visits, save) -> tuple[list, list]:
    """Write one subject's visits under ``folder`` (the dataset's ``visits/``); returns (truth rows,
    motion rows). ``save(array, affine, path, dtype)`` writes one NIfTI file."""
    folder = Path(folder)
    (folder / "baseline" / "pvs_ids").mkdir(parents=True, exist_ok=True)
    save(scene.truth_ids, affine, folder / "baseline" / "pvs_ids" / f"{case}.nii.gz", ids_dtype(scene.truth_ids))
    truth, motion = [], []
    for name in visits:
        v = make_visit(scene, name)
        sub = folder / name
        for d in ("images", "labels", "labels_truth", "pvs_ids"):
            (sub / d).mkdir(parents=True, exist_ok=True)
        save(v.image * 1000.0, affine, sub / "images" / f"{case}_0000.nii.gz", np.int16)
        save(v.mask, affine, sub / "labels" / f"{case}.nii.gz", np.uint8)
        save(v.pvs_ids > 0, affine, sub / "labels_truth" / f"{case}.nii.gz", np.uint8)
        save(v.pvs_ids, affine, sub / "pvs_ids" / f"{case}.nii.gz", ids_dtype(v.pvs_ids))
        truth += [{"case": case, **r} for r in v.rows]
        motion.append(motion_row(case, v))
    return truth, motion


def write_tables(folder, truth_rows_: list, motion_rows: list) -> None:
    """``changes_truth.csv`` and ``motion.csv`` under ``folder`` (written inside the staged dataset)."""
    import pandas as pd

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    columns = ["case", "visit", "pvs_id", "status", "change", "family", "volume_baseline_mm3",
               "volume_follow_up_mm3", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "region",
               "in_view_fraction"]
    pd.DataFrame(truth_rows_, columns=columns).to_csv(folder / "changes_truth.csv", index=False)
    pd.DataFrame(motion_rows).to_csv(folder / "motion.csv", index=False)
