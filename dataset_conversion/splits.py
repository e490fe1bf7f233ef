"""Five folds stratified by a covariate, written as nnU-Net's ``splits_final.json``.

* ``nnunet`` protocol: fold k validates on group k and trains on the other four; with
  ``--by pvs_load`` this is Boutinaud et al. 2021 (folds with a similar spread of PVS load, the
  load being the PVS voxel count of the manual mask).
* ``cai`` protocol (Cai et al. 2024): five age-balanced groups; fold k tests on group k, validates
  on one other group drawn at random, trains on the remaining three. The test groups go to
  ``test_groups.json`` and ``test_fold<k>.txt`` beside ``splits_final.json``.

Stratification: cases sorted by the covariate (ties broken by id) are cut into consecutive blocks of
five, and each block is dealt to the five groups in a random order, so every group spans the whole
range. Deterministic by seed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from nnunet_pvs.errors import UserError
from nnunet_pvs.staging import check_writable_target, clean_leftovers, sigterm_raises, write_texts_atomic
from nnunet_pvs.tables import read_table

PVS_LOAD_COLUMN = "pvs_voxels"


def stratified_groups(values: dict[str, object], n_groups: int = 5, seed: int = 0) -> list[list[str]]:
    """Partition case ids into ``n_groups`` groups balanced on ``values`` (numbers or categories)."""
    if len(values) < n_groups:
        raise UserError(f"{len(values)} case(s): need at least {n_groups} for {n_groups} groups")
    rng = np.random.default_rng(seed)
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) for v in values.values())
    order = sorted(values, key=lambda k: (float(values[k]), k) if numeric else (str(values[k]), k))
    groups: list[list[str]] = [[] for _ in range(n_groups)]
    for start in range(0, len(order), n_groups):
        block = order[start:start + n_groups]
        if len(block) == n_groups:
            targets = rng.permutation(n_groups)
        else:  # last partial block: groups that are smallest so far, chosen at random
            sizes = np.array([len(g) for g in groups])
            smallest = np.flatnonzero(sizes == sizes.min())
            targets = rng.permutation(smallest)[: len(block)]
        for case, g in zip(block, targets):
            groups[int(g)].append(case)
    return [sorted(g) for g in groups]


def make_folds(groups: list[list[str]], protocol: str = "nnunet", seed: int = 0) -> tuple[list[dict], list[list[str]]]:
    """(nnU-Net splits, test lists) from stratified groups."""
    n = len(groups)
    splits, tests = [], []
    rng = np.random.default_rng([seed, 1])
    for k in range(n):
        if protocol == "nnunet":
            val, test = groups[k], []
            train = [c for j, g in enumerate(groups) if j != k for c in g]
        elif protocol == "cai":
            others = [j for j in range(n) if j != k]
            v = int(rng.choice(others))
            val, test = groups[v], groups[k]
            train = [c for j, g in enumerate(groups) if j not in (k, v) for c in g]
        else:
            raise UserError(f"protocol {protocol!r}: choose nnunet or cai")
        splits.append({"train": sorted(train), "val": sorted(val)})
        tests.append(sorted(test))
    return splits, tests


def load_covariate(dataset_dir: Path, by: str, log=None) -> dict[str, object]:
    """case id -> covariate for the training cases (``labelsTr``); ``pvs_load`` counts mask voxels
    when covariates.csv lacks ``pvs_voxels``.

    A column is numeric when every value is a number; text among numbers ("unknown", "61,5") is a
    :class:`UserError` naming the case, line and value, never a silent switch to categories. A
    column of text only (sex, site) is categorical, and the log says so.
    """
    dataset_dir = Path(dataset_dir)
    cases = sorted(p.name[: -len(".nii.gz")] for p in (dataset_dir / "labelsTr").glob("*.nii.gz"))
    if not cases:
        raise UserError(f"{dataset_dir / 'labelsTr'}: no training labels")
    cov_path = dataset_dir / "covariates.csv"
    table = read_table(cov_path, "covariate table", id_column="case_id") if cov_path.is_file() else None
    column = PVS_LOAD_COLUMN if by == "pvs_load" else by
    if table is not None and column in table.columns:
        lines = dict(zip(table["case_id"], table.attrs["lines"]))
        col = table.set_index("case_id")[column]
        missing = [c for c in cases if c not in col.index or pd.isna(col.get(c))]
        if missing and by != "pvs_load":
            raise UserError(f"{cov_path}: no {column!r} value for training case(s) {', '.join(missing[:10])}"
                            f"{' ...' if len(missing) > 10 else ''}; fill them in or drop those cases")
        if not missing:
            out = {c: col[c] for c in cases}
            text = {c: v for c, v in out.items() if not _is_number(v)}
            decimal_comma = [v for v in text.values() if _DECIMAL_COMMA.match(v)]
            if text and (len(text) < len(out) or decimal_comma or by == "pvs_load"):
                shown = ", ".join(f"{c} (line {lines[c]}): {v!r}" for c, v in list(text.items())[:5])
                raise UserError(f"{cov_path}: column {column!r} is numeric but has non-numeric value(s) "
                                f"{shown}{' ...' if len(text) > 5 else ''}; use numbers with '.' as decimal "
                                f"separator (fix or remove those values)")
            if not text:
                return {c: float(v) for c, v in out.items()}
            if log:
                cats = sorted(set(out.values()))
                log(f"{column!r} is categorical ({len(cats)} categories: {', '.join(cats[:10])}"
                    f"{' ...' if len(cats) > 10 else ''}): folds balanced on category counts")
            return {c: str(v) for c, v in out.items()}
    if by != "pvs_load":
        where = cov_path if table is not None else f"{dataset_dir} (no covariates.csv)"
        raise UserError(f"{where}: no covariate column {column!r}")
    return {c: _pvs_voxels(dataset_dir / "labelsTr" / f"{c}.nii.gz") for c in cases}


def _pvs_voxels(label: Path) -> float:
    """PVS load of one training label: its voxels above 0; an unreadable file is named, not a traceback."""
    try:
        return float((np.asanyarray(nib.load(str(label)).dataobj) > 0).sum())
    except Exception as e:  # nibabel and zlib raise many types for broken files
        raise UserError(f"{label}: cannot be read as NIfTI to count its PVS voxels for --by pvs_load "
                        f"({type(e).__name__}: {str(e).strip()[:200]})") from None


_DECIMAL_COMMA = re.compile(r"^[+-]?\d+,\d+$")


def _is_number(v) -> bool:
    try:
        return np.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def fold_table(splits: list[dict], tests: list[list[str]], values: dict[str, object]) -> pd.DataFrame:
    """Per fold: sizes and the covariate's mean, sd, min, max in validation (and test, Cai)."""
    rows = []
    numeric = all(isinstance(v, float) for v in values.values())
    for k, (s, t) in enumerate(zip(splits, tests)):
        row = {"fold": k, "n_train": len(s["train"]), "n_val": len(s["val"]), "n_test": len(t)}
        for part, ids in (("train", s["train"]), ("val", s["val"]), ("test", t)):
            if not ids or (part == "test" and not t):
                continue
            v = [values[c] for c in ids]
            if numeric:
                row[f"{part}_mean"] = float(np.mean(v))
                row[f"{part}_sd"] = float(np.std(v))
                if part != "train":
                    row[f"{part}_min"], row[f"{part}_max"] = float(np.min(v)), float(np.max(v))
            else:
                cats = pd.Series(v).value_counts().sort_index()
                row[f"{part}_counts"] = " ".join(f"{i}:{n}" for i, n in cats.items())
        rows.append(row)
    return pd.DataFrame(rows)


def write_splits(raw_dataset: Path, preprocessed_root: Path, by: str = "pvs_load", protocol: str = "nnunet",
                 seed: int = 0, n_folds: int = 5, force: bool = False, log=print) -> Path:
    """Write ``splits_final.json`` (and Cai test lists) into ``preprocessed_root/<dataset>/``.

    The output folder is checked before anything is computed; every file is staged, then all are
    renamed into place together, so a killed run leaves the old files or the new ones.
    """
    out_dir = Path(preprocessed_root) / Path(raw_dataset).name
    target = out_dir / "splits_final.json"
    check_writable_target(out_dir, "nnU-Net preprocessed dataset folder", want_dir=True)
    check_writable_target(target, "splits file", want_dir=False)
    for prefix in ("splits_final.json", "test_groups.json", "test_fold"):  # only our own files' leftovers
        clean_leftovers(out_dir, prefix, log=log)
    values = load_covariate(raw_dataset, by, log=log)
    groups = stratified_groups(values, n_folds, seed)
    splits, tests = make_folds(groups, protocol, seed)
    if target.is_file() and not force:
        try:
            same = json.loads(target.read_text()) == splits
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise UserError(f"{target}: exists but is not valid JSON ({e}), so nnU-Net cannot read it either; "
                            "pass --force to replace it, or remove it") from None
        except OSError as e:
            raise UserError(f"{target}: cannot be read ({e.strerror}); pass --force to replace it") from None
        if not same:
            raise UserError(f"{target}: exists with different folds; pass --force to replace it "
                            "(models already trained on it would no longer match)")
    files = {target: json.dumps(splits, indent=2)}
    test_json = out_dir / "test_groups.json"
    if protocol == "cai":
        files[test_json] = json.dumps({"protocol": "cai", "by": by, "seed": seed,
                                       "folds": [{"fold": k, "test": t} for k, t in enumerate(tests)]}, indent=2)
        for k, t in enumerate(tests):
            files[out_dir / f"test_fold{k}.txt"] = "".join(f"{c}\n" for c in t)
    obsolete = [p for p in [test_json, *out_dir.glob("test_fold*.txt")] if p not in files and p.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    with sigterm_raises():
        write_texts_atomic(files)
        for p in obsolete:
            p.unlink()
    table = fold_table(splits, tests, values)
    if protocol != "cai":
        table = table.drop(columns=["n_test"])
    log(f"{target}: {n_folds} folds, protocol {protocol}, stratified by {by} (seed {seed})")
    log(table.to_string(index=False, float_format=lambda x: f"{x:.1f}"))
    return target
