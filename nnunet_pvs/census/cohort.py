"""The census at cohort scale: each subject's result written as soon as it is done, a re-run that
skips what is done, a failed subject recorded instead of ending the run, parts that share one
output folder, and the cohort tables assembled from the finished subjects.

OUT is a folder the census owns (``nnunet_pvs.staging`` marker; another command's folder is
refused) and fills incrementally through :class:`nnunet_pvs.resume.CaseStore`::

    OUT/cohort.json          the cohort (case ids), options and their digest; written by every run / part
    OUT/cases/CASE/          record.json, clusters.csv, subjects.csv (the subject's rows, full precision),
                             overlay.png, labels.nii.gz; appears whole (one rename) or not at all
    OUT/clusters.csv, subjects.csv, failures.csv, summary.json, plots/, report.html
                             assembled by a run with --num-parts 1 or by --merge, each file atomically

A subject is redone when its input files (path, size, modification time) or the options that change
its result (threshold, size filter, connectivity, size classes, --binary, tolerance, plots, label
maps, the checked model, the nnunet-pvs version) differ from its record. The assembled files are
removed when a run starts, so they never describe another run than the subjects beside them.
"""

from __future__ import annotations

import dataclasses
import datetime
import shutil
from pathlib import Path

import pandas as pd

from nnunet_pvs import resume
from nnunet_pvs.census import report
from nnunet_pvs.census.case import CLUSTER_COLUMNS, subject_columns
from nnunet_pvs.errors import UserError
from nnunet_pvs.staging import LEGACY_MARKER, MARKER, owner

COHORT = "cohort.json"
CASES = "cases"
ASSEMBLED = ("clusters.csv", "subjects.csv", report.FAILURES, "summary.json", "report.html")
OLD_LAYOUT = ("overlays", "labels")   # per-subject files of versions that staged the whole folder


# --- the output folder --------------------------------------------------------------------------

def prepare_output(out: Path, manifest: dict) -> resume.CaseStore:
    """Make OUT the census's (marker first, atomically: N parts may start at once), clear what an
    earlier run assembled and the previous layout's folders, record the cohort; the store of subjects."""
    from nnunet_pvs import __version__

    report.check_output(out)
    out.mkdir(parents=True, exist_ok=True)
    # the marker first (a folder of an earlier version may have none, or the old one): renamed into place,
    # so a part starting beside this one never reads half a marker
    resume.write_json_atomic(out / MARKER, {"command": "census", "version": __version__})
    (out / LEGACY_MARKER).unlink(missing_ok=True)
    for name in ASSEMBLED:
        (out / name).unlink(missing_ok=True)
    for name in ("plots", *OLD_LAYOUT):
        shutil.rmtree(out / name, ignore_errors=True)
    resume.write_json_atomic(out / COHORT, manifest)
    store = resume.CaseStore(out / CASES, manifest["options_digest"])
    store.clean_leftovers()
    return store


def read_manifest(out: Path) -> dict:
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"{out}: --merge folder does not exist")
    by = owner(out)
    if by not in (None, "census"):
        raise UserError(f"{out} was written by 'nnunet-pvs {by}', not by the census parts")
    manifest = resume.read_json(out / COHORT)
    if not isinstance(manifest, dict) or "cases" not in manifest or "options_digest" not in manifest:
        raise UserError(f"{out}: no {COHORT}, so no census parts wrote into it (run `nnunet-pvs census ... "
                        "--num-parts N --part-id K` first)")
    return manifest


# --- one subject (in a worker process) --------------------------------------------------------

def _write_table(df: pd.DataFrame, path: Path) -> None:
    """A subject's rows at full precision (rounded once, when the cohort tables are written)."""
    df.to_csv(path, index=False)


# floats read back exactly as written, so the cohort table rounds the values the subject computed
# (pandas 3 does so by default and deprecates the option)
_EXACT = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}


def _read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"case": str, "region": str}, keep_default_na=False, na_values=[""], **_EXACT)
    return df[columns]


def census_subject(job) -> dict:
    """Census of one subject into its own folder: the folder appears only once every file is written.
    ``job`` = (case id, Case, region folder, Options, CaseStore, inputs digest, input-check verdict or None)."""
    from nnunet_pvs.census import case as case_module

    cid, c, region_dir, opts, store, inputs, verdict = job
    with store.writing(cid, inputs) as (folder, record):
        if verdict is not None:
            record["qc"] = verdict
        res = case_module.run_case((c, region_dir, opts, folder))
        _write_table(res["clusters"], folder / "clusters.csv")
        _write_table(res["subjects"], folder / "subjects.csv")
        record["info"] = res["info"]
    return {"case": cid, "n_clusters": res["info"]["n_clusters"]}


def run_subjects(cases: list, region_dir: Path | None, opts, store: resume.CaseStore, check,
                 processes: int) -> tuple[int, int, dict[str, str]]:
    """Census of every case not done yet: (censused, skipped, {failed case: reason}). ``check``:
    (images, model) of ``--check-model``, run first over the cases to do."""
    from nnunet_pvs.case_loop import CaseFailure, iter_cases
    from nnunet_pvs.census import qc

    pending, skipped = [], 0
    for c in cases:
        inputs = resume.inputs_digest(c.input_files)
        if store.is_done(c.case, inputs):
            skipped += 1
        else:
            pending.append((c, inputs))
    verdicts = qc.check_cases(*check, [c.case for c, _ in pending]) if check is not None else {}
    todo = [(c.case, c, region_dir, opts, store, inputs, verdicts.get(c.case)) for c, inputs in pending]
    failed: dict[str, str] = {}
    done = 0
    for job, result in iter_cases(census_subject, todo, processes=processes, desc="census", unit="subject",
                                  keep_going=True):
        if isinstance(result, CaseFailure):
            store.write_failure(job[0], job[5], result.reason)
            failed[job[0]] = result.reason
        else:
            done += 1
    return done, skipped, failed


# --- the cohort tables ---------------------------------------------------------------------------

def _listing(items, limit: int = 10) -> str:
    items = list(items)
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def assemble(out: Path, manifest: dict) -> dict:
    """clusters.csv, subjects.csv, failures.csv, summary.json, plots and report.html from the subjects
    in OUT/cases; refused, naming them, while some subject of the cohort has no record of these options."""
    from nnunet_pvs import __version__
    from nnunet_pvs.census import qc

    out = Path(out)
    store = resume.CaseStore(out / CASES, manifest["options_digest"])
    cases = list(manifest["cases"])
    done, failed, missing = store.status(cases)
    if missing:
        raise UserError(f"{out}: {len(missing)} of {len(cases)} subject(s) not censused yet with these options: "
                        f"{_listing(missing)}; run the parts that hold them (or the same census again), "
                        "then merge")
    edges = manifest["result_options"]["size_classes"]
    records = {c: store.record(c) for c in done}
    out_csv = out / "clusters.csv"
    clusters = stream_clusters(out_csv, [store.folder(c) / "clusters.csv" for c in done])
    subjects = _concat([_read_table(store.folder(c) / "subjects.csv", subject_columns(edges)) for c in done],
                       subject_columns(edges))
    qc_info = None
    check = manifest.get("qc")
    if check:
        if "file" in check:
            verdicts = qc.read_file(Path(check["file"]))
            source, missing_reason = f"file {check['file']}", f"not in {Path(check['file']).name}"
        else:
            verdicts = {c: records[c]["qc"] for c in done if records[c].get("qc")}
            source, missing_reason = f"checked against the model {check['model']}", "not checked"
        subjects = qc.add_columns(subjects, verdicts, missing_reason)
        qc_info = {**check, "source": source, "counts": qc.counts(verdicts, done),
                   "flagged": {c: verdicts[c] for c in done if verdicts.get(c, {}).get("verdict") in report.QC_FLAGS}}
    infos = []
    for c in done:
        info = dict(records[c]["info"])
        info["files"] = {k: f"{CASES}/{c}/{v}" for k, v in info.get("files", {}).items()}
        infos.append(info)
    failures = pd.DataFrame({"case": list(failed), "reason": list(failed.values())}, columns=["case", "reason"])
    opts = manifest["result_options"]
    summary = {
        "command": report.COMMAND, "version": __version__,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "options": manifest.get("options", {}), "inputs": manifest["inputs"],
        "threshold": manifest["threshold"],
        "binarisation": "p >= threshold (probability inputs; binary masks used as is)",
        "min_size_mm3": opts["min_size_mm3"], "min_size": manifest["min_size"],
        "connectivity": opts["connectivity"], "size_classes_mm3": list(edges),
        "region_rule": "a cluster goes to the region holding most of its voxels (voxels outside every "
                       "region do not vote; no voxel in any region: outside); on a tie, the region listed "
                       "first (aseg map: bg before wm; then CASE_<name> masks by file name)",
        "n_cases": len(infos), "n_clusters": len(clusters),
        "kinds": sorted({i["kind"] for i in infos}),
        "left_out": manifest.get("left_out", {}), "unused": manifest.get("unused", {}),
        "failures": [{"case": c, "reason": r} for c, r in failed.items()],
        "qc": qc_info, "cases": infos,
    }
    others = store.others(cases)
    if others:
        summary["other_subject_folders"] = others
    report.write_outputs(out, clusters, subjects, summary, plots=opts["plots"], failures=failures,
                         clusters_csv=False)
    return summary


# what the report and the plots need of every cluster; the rest is only written to clusters.csv
SHAPE_COLUMNS = ("region", "volume_mm3", "length_mm", "width_mm", "elevation_deg")


def stream_clusters(path: Path, files: list[Path]) -> pd.DataFrame:
    """clusters.csv written atomically, one subject's rows at a time (40,000 whole-brain subjects hold
    some 40 million clusters: about 10 GB as one table in memory); returns the columns the report needs.
    The text is that of ``report.write_csv`` of the whole table: each row is formatted on its own."""
    from nnunet_pvs.staging import write_file_atomic

    kept: list[pd.DataFrame] = []

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            pd.DataFrame(columns=CLUSTER_COLUMNS).to_csv(f, index=False)   # the header, as to_csv writes it
            for p in files:
                df = _read_table(p, CLUSTER_COLUMNS)
                if len(df):
                    df.to_csv(f, index=False, header=False, float_format=report.FLOAT_FORMAT)
                    kept.append(df[list(SHAPE_COLUMNS)].astype({"region": "category"}))

    write_file_atomic(path, write)
    if not kept:
        return pd.DataFrame(columns=list(SHAPE_COLUMNS))
    out = pd.concat(kept, ignore_index=True)
    out["region"] = out["region"].astype(str)
    return out


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """Rows of every subject; subjects without rows (no clusters) add nothing, so the column types
    are those of the rows (an empty frame read from a header-only CSV has no numeric types)."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


def options_for_digest(opts, check_model: Path | None) -> dict:
    """The options that change a subject's result, with the version that computed it."""
    from nnunet_pvs import __version__
    from nnunet_pvs.census import qc

    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(opts).items()}
    out["version"] = __version__
    if check_model is not None:
        out["check_model"] = [str(Path(check_model).resolve()), qc.model_stamp(check_model)]
    return out


