"""``nnunet-pvs evaluate-cohort``: PVS cluster counts of a cohort and their statistics.

Counts come from a prediction folder (binary NIfTI, nnU-Net ``.npz`` probabilities or an nnU-Net
results folder), per region and per cluster-size filter, or from a ``counts.csv`` this command
wrote before. They are compared with visual counts (Spearman, per rater and between raters), a
visual rating (ordinal logistic regression) and a second cohort (Kolmogorov-Smirnov).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from nnunet_pvs.tables import read_table
from nnunet_pvs.case_loop import map_cases
from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation import io
from nnunet_pvs.evaluation.cohort_stats import count_clusters, ks_two_samples, ordinal_logistic, spearman
from nnunet_pvs.evaluation.regions import load_regions
from nnunet_pvs.evaluation.report import markdown_table, write_csv
from nnunet_pvs.evaluation.sweeps import parse_range
from nnunet_pvs.staging import check_output_folder, earlier_layout, staged_folder

COMMAND = "evaluate-cohort"
# a cohort output of a version before the ownership marker (nnunet_pvs.staging.MARKER)
EARLIER_OUTPUT = earlier_layout("cohort_report.md", "# PVS cohort statistics")
COUNT_COLUMNS = ["case", "cohort", "region", "min_cluster_size", "n_clusters"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, type=Path,
                   help="cohort A: prediction folder (NIfTI / nnU-Net npz / results folder) or a counts.csv")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("--regions", type=Path, help="region maps of cohort A (as for `evaluate`)")
    p.add_argument("--compare", type=Path, help="cohort B, same forms as --pred: two-sample KS test")
    p.add_argument("--compare-regions", type=Path, help="region maps of cohort B")
    p.add_argument("--labels", default="A,B", help="names of the two cohorts (default A,B)")
    p.add_argument("--visual", type=Path, help="CSV with a 'case' column, optional 'region' column, "
                   "visual counts per rater and/or a rating column")
    p.add_argument("--raters", default="", help="comma-separated rater columns of --visual (visual counts)")
    p.add_argument("--rating-column", default="", help="column of --visual with an ordinal (e.g. 4-level) rating")
    p.add_argument("--count-region", default="whole",
                   help="region whose counts are compared with --visual rows without a 'region' column (default whole)")
    p.add_argument("--count-min-size", type=int, default=0,
                   help="cluster-size filter of the counts compared with --visual (default 0: all clusters)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold p >= t (default 0.5)")
    p.add_argument("--min-cluster-sizes", default="0,5",
                   help="size filters for the counts and KS test: clusters of <= s voxels removed (default 0,5)")
    p.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=26)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="worker processes (default 1)")


def _read_csv(path: Path, what: str, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """A user's table (``--visual``, a counts CSV) read strictly, cells as text: the delimiter (``,``
    ``;`` or tab) found from the header, a row with more or fewer cells than the header refused
    naming its line (pandas would shift the columns or blame another row), every row with a case."""
    return read_table(path, what, required=required, id_column="case", unique_ids=False)


def _numeric(df: pd.DataFrame, col: str, source: Path, what: str) -> None:
    """Column ``col`` as numbers in place; a text or empty cell is a user error naming its line."""
    vals = pd.to_numeric(df[col], errors="coerce")
    bad = vals.isna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        cell = df[col].iloc[i]
        shown = "an empty cell" if pd.isna(cell) else f"the non-numeric value '{cell}'"
        lines = df.attrs.get("lines")
        where = f"line {lines[i]}" if lines else f"row {i + 1}"
        raise UserError(f"{source}: {what} column {col!r} has {shown} ({where}, case {df['case'].iloc[i]}); "
                        "numbers expected")
    df[col] = vals


def _no_duplicates(df: pd.DataFrame, keys: list[str], source: Path) -> None:
    dup = df.duplicated(keys, keep=False)
    if dup.any():
        first = df.loc[dup, keys].astype(str).agg("/".join, axis=1).iloc[0]
        raise UserError(f"{source}: {int(dup.sum())} rows repeat the same {'/'.join(keys)}, e.g. {first}; "
                        "each must appear once")


def _count_one(job) -> list[dict]:
    case, files, region_dir, cohort, thr, connectivity, sizes, case_ids = job
    vol, path = io.load_prediction(files, case)
    mask = vol.data >= thr if vol.data.dtype != bool else vol.data
    regions = [("whole", None)]
    if region_dir is not None:
        for name, m, rvol, rpath in load_regions(region_dir, case, case_ids):
            if rvol.data.shape != mask.shape:
                raise UserError(f"{case}: shape {rvol.data.shape} of {rpath} differs from prediction "
                                f"{path} {mask.shape}")
            regions.append((name, m))
    rows = []
    for name, m in regions:
        c = count_clusters(mask if m is None else mask & m, connectivity, sizes)
        rows += [{"case": case, "cohort": cohort, "region": name, "min_cluster_size": s, "n_clusters": n}
                 for s, n in c.items()]
    return rows


def _counts(source: Path, region_dir, cohort: str, args, sizes) -> pd.DataFrame:
    """Counts of one cohort from a prediction folder or a counts CSV."""
    if source.is_file() and source.suffix == ".csv":
        df = _read_csv(source, "counts CSV", ("region", "min_cluster_size", "n_clusters"))
        if "cohort" in df.columns and df["cohort"].nunique() > 1:
            raise UserError(f"{source}: counts CSV holds several cohorts "
                            f"({', '.join(map(str, df['cohort'].unique()))}); give one cohort per file")
        for col in ("min_cluster_size", "n_clusters"):
            _numeric(df, col, source, "counts")
        df["region"] = df["region"].astype(str)
        _no_duplicates(df, ["case", "region", "min_cluster_size"], source)
        have = set(df["min_cluster_size"].astype(int))
        lacking = sorted(set(sizes) - have)
        if lacking:
            raise UserError(f"{source}: no counts for size filter(s) {', '.join(map(str, lacking))} "
                            f"(the file has {', '.join(map(str, sorted(have)))}); recount with "
                            "--min-cluster-sizes matching, or change --min-cluster-sizes/--count-min-size")
        df = df[df["min_cluster_size"].isin(sizes)].copy()
        df["min_cluster_size"] = df["min_cluster_size"].astype(int)
        df["cohort"] = cohort
        return df[COUNT_COLUMNS]
    if source.is_file():
        raise UserError(f"{source}: is a file, neither a prediction folder nor a counts .csv")
    if region_dir is not None:
        io.require_folder(region_dir, "--regions" if region_dir == args.regions else "--compare-regions",
                          "the region maps")
        io.refuse_twins([p for p in sorted(region_dir.iterdir()) if p.is_file()])
    preds = io.gather_predictions(source)
    jobs = [(c, f, region_dir, cohort, args.threshold, args.connectivity, sizes, set(preds))
            for c, f in sorted(preds.items())]
    rows = [row for r in map_cases(_count_one, jobs, processes=args.num_processes, desc=f"count {cohort}")
            for row in r]
    return pd.DataFrame(rows, columns=COUNT_COLUMNS)


def _visual(args, counts: pd.DataFrame, cohort: str) -> tuple[pd.DataFrame, list[str], pd.DataFrame, pd.DataFrame]:
    raters = [r for r in args.raters.split(",") if r]
    cols = raters + ([args.rating_column] if args.rating_column else [])
    if not cols:
        raise UserError(f"{args.visual}: name its visual-count columns with --raters and/or its rating "
                        "column with --rating-column")
    vis = _read_csv(args.visual, "visual CSV", tuple(cols))
    if "region" not in vis.columns:
        vis["region"] = args.count_region
    vis["region"] = vis["region"].astype(str)
    _no_duplicates(vis, ["case", "region"], args.visual)
    for c in cols:
        _numeric(vis, c, args.visual, "rater" if c in raters else "rating")
    a = counts[(counts["cohort"] == cohort)
               & (counts["min_cluster_size"] == args.count_min_size)]
    merged = vis.merge(a[["case", "region", "n_clusters"]], on=["case", "region"], how="left")
    if merged["n_clusters"].isna().any():
        miss = merged.loc[merged["n_clusters"].isna(), ["case", "region"]].astype(str).agg("/".join, axis=1)
        raise UserError(f"{args.visual}: no predicted count (min size {args.count_min_size}) for "
                        f"{', '.join(miss.tolist()[:10])}")
    sp, orl = [], []
    for region, g in merged.groupby("region", sort=False):
        for r in raters:
            sp.append({"region": region, "rater": r, **spearman(g[r], g["n_clusters"])})
        if len(raters) == 2:
            sp.append({"region": region, "rater": f"{raters[0]} vs {raters[1]}",
                       **spearman(g[raters[0]], g[raters[1]])})
        if args.rating_column:
            res = ordinal_logistic(g["n_clusters"], g[args.rating_column])
            res["cutpoints"] = ";".join(f"{t:.4g}" for t in res["cutpoints"])
            res["levels"] = ";".join(f"{v:g}" for v in res["levels"])
            orl.append({"region": region, **res})
    return merged, raters, pd.DataFrame(sp), pd.DataFrame(orl)


def run(args) -> int:
    try:
        sizes = parse_range(args.min_cluster_sizes, int)
    except ValueError as e:
        raise UserError(str(e)) from None
    sizes = tuple(sorted(set(sizes) | {args.count_min_size}))
    labels = [s for s in args.labels.split(",") if s]
    if len(labels) != 2 or labels[0] == labels[1]:
        raise UserError(f"--labels needs two different names, got {args.labels!r}")
    if args.visual is None and args.compare is None:
        raise UserError("nothing to compare: give --visual and/or --compare")
    if args.visual is not None and not args.visual.is_file():
        raise UserError(f"{args.visual}: --visual is a folder, not a CSV file" if args.visual.is_dir()
                        else f"{args.visual}: visual CSV does not exist")
    for src in (args.pred, args.compare):
        if src is not None and not src.exists():
            raise UserError(f"{src}: does not exist (give a prediction folder or a counts.csv)")
    check_output_folder(args.output, COMMAND, legacy=EARLIER_OUTPUT)
    counts = _counts(args.pred, args.regions, labels[0], args, sizes)
    if args.compare is not None:
        counts = pd.concat([counts, _counts(args.compare, args.compare_regions, labels[1], args, sizes)],
                           ignore_index=True)
    outputs: dict[str, pd.DataFrame] = {"counts.csv": counts}
    md = ["# PVS cohort statistics", "",
          f"Clusters: {args.connectivity}-connected, probability maps binarised with p >= {args.threshold:g}; "
          "a size filter s removes clusters of s voxels or fewer.", ""]
    pngs = []
    merged = raters = sp = None
    if args.visual is not None:
        merged, raters, sp, orl = _visual(args, counts, labels[0])
        if len(sp):
            outputs["spearman.csv"] = sp
            md += ["## Predicted counts vs visual counts (Spearman)", "", markdown_table(sp), ""]
        if len(orl):
            outputs["ordinal_regression.csv"] = orl
            md += [f"## Visual rating `{args.rating_column}` vs predicted counts (ordinal logistic regression)",
                   "", markdown_table(orl), ""]
    if args.compare is not None:
        for side, other in ((labels[0], labels[1]), (labels[1], labels[0])):
            only = sorted(set(counts.loc[counts["cohort"] == side, "region"])
                          - set(counts.loc[counts["cohort"] == other, "region"]))
            if only:
                raise UserError(f"region(s) {', '.join(only)} counted in cohort {side} only; give both "
                                "cohorts the same regions (--regions / --compare-regions)")
        ks = []
        for (region, s), g in counts.groupby(["region", "min_cluster_size"], sort=True):
            a = g.loc[g["cohort"] == labels[0], "n_clusters"]
            b = g.loc[g["cohort"] == labels[1], "n_clusters"]
            ks.append({"region": region, "min_cluster_size": s, **ks_two_samples(a, b)})
        ks = pd.DataFrame(ks)
        outputs["ks.csv"] = ks
        md += [f"## Cluster counts, {labels[0]} vs {labels[1]} (two-sample Kolmogorov-Smirnov)", "",
               markdown_table(ks), ""]
    with staged_folder(args.output, COMMAND, legacy=EARLIER_OUTPUT) as stage:
        if not args.no_plots:
            from nnunet_pvs.evaluation import plots as pl
            if merged is not None and raters:
                for region, g in merged.groupby("region", sort=False):
                    pngs.append(pl.counts_vs_visual(g, raters, sp[sp["region"] == region],
                                                    stage / f"counts_vs_visual_{region}.png"))
            if args.compare is not None:
                for (region, s), g in counts.groupby(["region", "min_cluster_size"], sort=True):
                    pngs.append(pl.count_distributions(
                        g.loc[g["cohort"] == labels[0], "n_clusters"].to_numpy(),
                        g.loc[g["cohort"] == labels[1], "n_clusters"].to_numpy(), tuple(labels),
                        f"{region}, clusters > {s} voxels", stage / f"count_cdf_{region}_min{s}.png"))
        for name, df in outputs.items():
            write_csv(df, stage / name)
        if pngs:
            md += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
        (stage / "cohort_report.md").write_text("\n".join(md))
    print(f"cohort statistics in {args.output}")
    return 0
