"""Which baseline and follow-up files belong to one subject.

Each visit is found exactly as the census finds its inputs (:func:`nnunet_pvs.census.inputs.gather_cases`:
binary NIfTIs or nnU-Net ``.npz`` + ``.pkl`` predictions, ``CASE_0000.nii.gz`` or ``CASE.nii.gz``
images, region maps for the baseline). The visits are paired by case id, or by a ``--pairs`` table
(columns ``case``, ``baseline``, ``follow_up``) when the visits are named differently
(``sub-01_ses-1`` / ``sub-01_ses-2``). Ids that do not pair are an error naming them: change between
two different subjects is meaningless, and a silently dropped subject is worse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nnunet_pvs.census.inputs import Case, find_image, gather_cases
from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation import io
from nnunet_pvs.tables import read_table

PAIR_COLUMNS = ("case", "baseline", "follow_up")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class VisitPair:
    """One subject's two visits: ``case`` names it in the outputs."""

    case: str
    baseline: Case
    follow_up: Case


def _listing(items, limit: int = 5) -> str:
    items = sorted(items)
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _visit(pred_dir: Path, image_dir: Path, region_dir: Path | None, wanted: set[str] | None,
           option: str) -> dict[str, Case]:
    """The cases of one visit that have every input; a wanted id lacking one is an error naming it."""
    cases, _, _ = gather_cases(pred_dir, image_dir, region_dir, allow_missing=True)
    found = {c.case: c for c in cases}
    preds = io.gather_predictions(pred_dir)
    ids = set(preds) if wanted is None else wanted
    lacking = sorted(i for i in ids if i in preds and i not in found)
    if lacking:
        c = lacking[0]
        what = (f"no image ({c}_0000.nii.gz or {c}.nii.gz) in {image_dir}" if find_image(image_dir, c) is None
                else f"no region map ({c}.nii.gz or {c}_<name>.nii.gz) in {region_dir}")
        more = f" (and {len(lacking) - 1} more: {_listing(lacking[1:])})" if len(lacking) > 1 else ""
        raise UserError(f"{option} {pred_dir}: prediction {c} has {what}{more}")
    return found


def gather_pairs(baseline: Path, follow_up: Path, images_baseline: Path, images_follow_up: Path,
                 regions: Path | None = None, pairs: Path | None = None) -> tuple[list[VisitPair], dict]:
    """The subjects to compare, sorted by case, and what was not used ({what: [ids]})."""
    for option, folder, holding in (("--images-baseline", images_baseline, "the baseline images"),
                                    ("--images-follow-up", images_follow_up, "the follow-up images")):
        io.require_folder(folder, option, holding)
    ids_b, ids_f = set(io.gather_predictions(baseline)), set(io.gather_predictions(follow_up))
    unused: dict[str, list[str]] = {}
    if pairs is None:
        only_b, only_f = sorted(ids_b - ids_f), sorted(ids_f - ids_b)
        if only_b or only_f:
            parts = ([f"baseline only: {_listing(only_b)}"] if only_b else []) + (
                [f"follow-up only: {_listing(only_f)}"] if only_f else [])
            raise UserError(f"case ids do not pair between {baseline} and {follow_up} ({'; '.join(parts)}); "
                            "give both visits of every subject, or name the pairs with --pairs CSV "
                            "(columns case, baseline, follow_up)")
        table = [(c, c, c) for c in sorted(ids_b)]
    else:
        df = read_table(pairs, "pairs table", required=PAIR_COLUMNS, id_column="case")
        for col in ("baseline", "follow_up"):
            empty = [df.attrs["lines"][i] for i in range(len(df)) if not isinstance(df[col].iloc[i], str)]
            if empty:
                raise UserError(f"{pairs}: line(s) {', '.join(map(str, empty[:10]))} have no {col!r} id")
        table = [(str(r.case), str(r.baseline), str(r.follow_up)) for r in df.itertuples(index=False)]
        no_b = sorted({b for _, b, _ in table} - ids_b)
        no_f = sorted({f for _, _, f in table} - ids_f)
        if no_b or no_f:
            parts = ([f"baseline id(s) {_listing(no_b)} not in {baseline}"] if no_b else []) + (
                [f"follow-up id(s) {_listing(no_f)} not in {follow_up}"] if no_f else [])
            raise UserError(f"{pairs}: {'; '.join(parts)}")
        left_b, left_f = ids_b - {b for _, b, _ in table}, ids_f - {f for _, _, f in table}
        if left_b:
            unused[f"baseline prediction(s) in {baseline} not in {pairs}"] = sorted(left_b)
        if left_f:
            unused[f"follow-up prediction(s) in {follow_up} not in {pairs}"] = sorted(left_f)
    bad = [c for c, _, _ in table if not _SAFE_NAME.match(c)]
    if bad:
        raise UserError(f"case name(s) {_listing(bad)} cannot name an output folder (letters, digits, '.', '_', "
                        "'-'; starting with a letter or digit)")
    found_b = _visit(baseline, images_baseline, regions, {b for _, b, _ in table}, "--baseline")
    found_f = _visit(follow_up, images_follow_up, None, {f for _, _, f in table}, "--follow-up")
    out = [VisitPair(c, found_b[b], found_f[f]) for c, b, f in sorted(table)]
    return out, unused
