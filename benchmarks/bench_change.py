"""How well does ``nnunet-pvs change`` find known PVS changes? Phantom visits with labels and a model.

The phantom (``nnunet-pvs phantom --size small --follow-up --rescan``: T2w-like, 0.69 x 0.69 x 2 mm slabs
of 24 slices) gives every subject a follow-up with known changes and a same-session rescan with none,
both after head motion (up to 3 deg and 3 mm per axis) and with new noise. Two kinds of prediction of
each visit go through the stock command ``nnunet-pvs change`` (default rules):

- ``labels``: the noise-free truth labels of each visit (``visits/*/pvs_ids > 0``); the tool's own error;
- ``model``: ``nnUNetv2_predict_from_modelfolder ... --save_probabilities`` of a trained model (default:
  the demo's MfNS_De, trained on other phantom subjects of the same generator); the tool as used.

Measured, per kind:

- **status accuracy per class**: every true PVS of ``changes_truth.csv`` is followed to the track of the
  predicted cluster that covers most of its voxels (baseline voxels; a new PVS's follow-up voxels), and
  the track's status is compared with the truth; a PVS no predicted cluster touches is ``missed``.
  Reported for all PVS, for those wholly inside both slabs (no voxel on an outermost layer of either
  visit's grid, at its own position or carried by the true motion to the other visit: what a slab can
  measure) and, of those, the PVS
  of at least 4 voxels where present (the tool's ``--min-size-voxels``: smaller ones cannot be called
  new or vanished by design);
- **false changes on rescans**: share of tracks called ``enlarged``, ``shrunk``, ``new`` or
  ``vanished`` (and ``uncertain``);
- **registration error**: the recovered transform (``record.json``) against the true motion
  (``motion.csv``), displacement of every head voxel: mean and worst, mm;
- **PVS-count scan-rescan ICC** of ``nnunet-pvs census`` (baseline against rescan, default options),
  ICC(A,1) and ICC(C,1) with 95 % intervals, against the published 0.82-0.93.

    python benchmarks/bench_change.py [--subjects 10] [--seed 3] [--model DIR] [--fold 0] [--no-model]
        [--work-dir /work/bench_change] [--name change]

Results: ``benchmarks/results/NAME.md`` and ``NAME.csv`` (one row per true PVS and visit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from skimage.filters import threshold_otsu
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BIN, RESULTS, nnunet_environment, run_logged, write_result  # noqa: E402

from nnunet_pvs.change.tracks import CHANGES  # noqa: E402
from nnunet_pvs.evaluation.clusters import label  # noqa: E402
from nnunet_pvs.evaluation.cohort_stats import icc  # noqa: E402
from nnunet_pvs.evaluation.io import read_probabilities  # noqa: E402
from nnunet_pvs.tables import markdown_table  # noqa: E402

DEMO_MODEL = Path("/work/demo_try/nnUNet_results/Dataset901_PVSPhantomT2w/nnUNetTrainerMfNSDe_budget__nnUNetPlans__2d")
DATASET_ID = 980
VISITS = ("follow_up", "rescan")
CLASSES = ("stable", "enlarged", "shrunk", "new", "vanished")
MIN_SIZE = 4  # the tool's default --min-size-voxels
PUBLISHED_ICC = "0.82-0.93"


def make_phantom(work: Path, args, env: dict, logs: Path) -> Path:
    raw = work / "nnUNet_raw"
    found = list(raw.glob(f"Dataset{DATASET_ID}_*"))
    if not found:
        run_logged([BIN / "nnunet-pvs", "phantom", "-d", DATASET_ID, "--contrast", "T2w", "--size", "small",
                    "--subjects", args.subjects, "--seed", args.seed, "--follow-up", "--rescan", "-o", raw], env,
                   logs / "phantom.log")
        found = list(raw.glob(f"Dataset{DATASET_ID}_*"))
    return found[0]


def image_folders(ds: Path) -> dict[str, Path]:
    return {"baseline": ds / "imagesTr", **{v: ds / "visits" / v / "images" for v in VISITS}}


def cases_of(ds: Path) -> list[str]:
    return sorted(p.name[:-len(".nii.gz")] for p in (ds / "visits" / "baseline" / "pvs_ids").glob("*.nii.gz"))


def ids_of(ds: Path, visit: str, case: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(ds / "visits" / visit / "pvs_ids" / f"{case}.nii.gz"))
    return np.asarray(img.dataobj).astype(np.int32), img.affine


def label_predictions(ds: Path, work: Path) -> dict[str, Path]:
    """The noise-free truth of each visit as binary predictions."""
    out = {}
    for visit in ("baseline", *VISITS):
        folder = work / "pred_labels" / visit
        folder.mkdir(parents=True, exist_ok=True)
        for case in cases_of(ds):
            target = folder / f"{case}.nii.gz"
            if not target.exists():
                ids, affine = ids_of(ds, visit, case)
                nib.save(nib.Nifti1Image((ids > 0).astype(np.uint8), affine), str(target))
        out[visit] = folder
    return out


def model_predictions(ds: Path, work: Path, args, env: dict, logs: Path) -> tuple[dict[str, Path], dict]:
    """Every visit predicted by the stock nnU-Net command, probabilities saved."""
    out, timing = {}, {}
    for visit, images in image_folders(ds).items():
        folder = work / "pred_model" / visit
        if not (folder / "done").exists():
            cases = cases_of(ds)
            stage = work / "pred_model" / f"input_{visit}"
            stage.mkdir(parents=True, exist_ok=True)
            for case in cases:  # only the visit's subjects (imagesTr holds them all, the test ones too)
                link = stage / f"{case}_0000.nii.gz"
                if not link.exists():
                    link.symlink_to(images / f"{case}_0000.nii.gz")
            timing[visit] = run_logged([BIN / "nnUNetv2_predict_from_modelfolder", "-i", stage, "-o", folder,
                                        "-m", args.model, "-f", args.fold, "-device", "cpu", "--save_probabilities",
                                        "-npp", 1, "-nps", 1, "-step_size", args.step_size,
                                        *([] if args.tta else ["--disable_tta"])], env, logs / f"predict_{visit}.log")
            (folder / "done").write_text(json.dumps(timing[visit]))
        else:  # predicted by an earlier run: its timing
            timing[visit] = json.loads((folder / "done").read_text() or "{}")
        out[visit] = folder
    return out, timing


def run_change(preds: dict[str, Path], ds: Path, work: Path, kind: str, env: dict, logs: Path) -> dict[str, Path]:
    images = image_folders(ds)
    outs = {}
    for visit in VISITS:
        out = work / f"change_{kind}_{visit}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh run: its wall time is measured
        run_logged([BIN / "nnunet-pvs", "change", "--baseline", preds["baseline"], "--follow-up", preds[visit],
                    "--images-baseline", images["baseline"], "--images-follow-up", images[visit], "-o", out,
                    "--no-plots", "-np", 2], env, logs / f"change_{kind}_{visit}.log")
        outs[visit] = out
    return outs


def predicted_clusters(folder: Path, case: str) -> np.ndarray:
    """The clusters ``change`` finds (probabilities p >= 0.5 where a .npz exists, else the mask; 26-connected)."""
    npz = folder / f"{case}.npz"
    if npz.exists():
        mask = read_probabilities(npz, case).data >= 0.5
    else:
        mask = np.asarray(nib.load(str(folder / f"{case}.nii.gz")).dataobj) > 0
    return label(mask, 26)[0]


def track_lookup(changes: pd.DataFrame, side: str) -> dict[int, int]:
    """cluster number -> track number of one side (``cluster_baseline`` / ``cluster_follow_up``)."""
    out = {}
    for track, members in zip(changes["track"], changes[f"cluster_{side}"].fillna("").astype(str)):
        for m in filter(None, members.split("+")):
            out[int(float(m))] = int(track)
    return out


def cut_by_a_slab(ids0: np.ndarray, ids1: np.ndarray, affine: np.ndarray, motion: np.ndarray) -> set[int]:
    """Ids of true PVS not wholly inside both slabs: a voxel on an outermost layer of its own visit's grid,
    or one that the true motion (baseline world -> visit world) carries onto or past an outermost layer
    of the other visit's grid (both visits share the baseline's grid and affine)."""
    shape = np.asarray(ids0.shape)
    out: set[int] = set()
    for ids, transform in ((ids0, motion), (ids1, np.linalg.inv(motion))):
        fg = np.argwhere(ids > 0)
        own_edge = ((fg == 0) | (fg == shape - 1)).any(1)
        world = np.c_[fg, np.ones(len(fg))] @ affine.T @ transform.T
        other = (world @ np.linalg.inv(affine).T)[:, :3]
        other_edge = ((other < 0.5) | (other > shape - 1.5)).any(1)
        out |= set(np.unique(ids[tuple(fg[own_edge | other_edge].T)]).tolist())
    return out


def majority(values: np.ndarray) -> int:
    values = values[values > 0]
    return int(np.bincount(values).argmax()) if values.size else 0


def score_case(ds: Path, case: str, visit: str, truth: pd.DataFrame, preds: dict[str, Path], out: Path) -> list[dict]:
    """One row per true PVS of ``case`` at ``visit``: its true and called status."""
    changes = pd.read_csv(out / "changes.csv")
    changes = changes[changes["case"].astype(str) == case]
    status = dict(zip(changes["track"].astype(int), changes["status"]))
    relation = dict(zip(changes["track"].astype(int), changes["relation"]))
    by_base, by_follow = track_lookup(changes, "baseline"), track_lookup(changes, "follow_up")
    ids0, affine = ids_of(ds, "baseline", case)
    ids1, _ = ids_of(ds, visit, case)
    lab0, lab1 = predicted_clusters(preds["baseline"], case), predicted_clusters(preds[visit], case)
    cut = cut_by_a_slab(ids0, ids1, affine, true_motion(ds, case, visit))
    fg0, fg1 = ids0 > 0, ids1 > 0
    vox0 = pd.Series(lab0[fg0]).groupby(ids0[fg0]).agg(lambda s: majority(s.to_numpy()))
    vox1 = pd.Series(lab1[fg1]).groupby(ids1[fg1]).agg(lambda s: majority(s.to_numpy()))
    n0, n1 = np.bincount(ids0.ravel()), np.bincount(ids1.ravel())
    rows = []
    for r in truth.itertuples(index=False):
        tid = int(r.pvs_id)
        track = 0
        if r.status != "new" and vox0.get(tid, 0):
            track = by_base.get(int(vox0[tid]), 0)
        if not track and vox1.get(tid, 0):
            track = by_follow.get(int(vox1[tid]), 0)
        before = int(n0[tid]) if tid < len(n0) else 0
        after = int(n1[tid]) if tid < len(n1) else 0
        whole = tid not in cut
        rows.append({"case": case, "visit": visit, "pvs_id": tid, "truth": r.status, "change": r.change,
                     "voxels_baseline": before, "voxels_visit": after,
                     "called": status.get(track, "missed") if track else "missed",
                     "relation": relation.get(track, "") if track else "",
                     "in_both_slabs": whole, "size_ok": max(before, after) >= MIN_SIZE if r.status != "stable"
                     else before >= MIN_SIZE})
    return rows


def true_motion(ds: Path, case: str, visit: str) -> np.ndarray:
    """The phantom's head motion of ``case`` at ``visit``: 4 x 4, baseline world mm -> visit world mm."""
    motion = pd.read_csv(ds / "visits" / "motion.csv")
    m = motion[(motion["case"].astype(str) == case) & (motion["visit"] == visit)].iloc[0]
    return np.array([[m[f"m{i}{j}"] for j in range(4)] for i in range(4)], float)


def registration_errors(ds: Path, out: Path, visit: str) -> pd.DataFrame:
    motion = pd.read_csv(ds / "visits" / "motion.csv")
    rows = []
    for m in motion[motion["visit"] == visit].itertuples(index=False):
        case = str(m.case)
        truth = true_motion(ds, case, visit)
        record = json.loads((out / "cases" / case / "record.json").read_text())
        found = np.asarray(record["registration"]["matrix_ras"], float)
        img = nib.load(str(image_folders(ds)["baseline"] / f"{case}_0000.nii.gz"))
        data = np.asarray(img.dataobj, np.float32)
        head = np.argwhere(data > threshold_otsu(data))
        pts = np.c_[head, np.ones(len(head))] @ img.affine.T
        err = np.linalg.norm(pts @ (found - truth).T, axis=1)
        rows.append({"case": case, "visit": visit, "mean_mm": float(err.mean()), "max_mm": float(err.max()),
                     "true_rotation_deg": float(np.degrees(np.arccos(np.clip((np.trace(truth[:3, :3]) - 1) / 2, -1, 1)))),
                     "true_translation_mm": float(np.linalg.norm([m.translation_x_mm, m.translation_y_mm,
                                                                  m.translation_z_mm]))})
    return pd.DataFrame(rows)


def census_icc(preds: dict[str, Path], work: Path, kind: str, env: dict, logs: Path) -> dict:
    counts = {}
    for visit in ("baseline", "rescan"):
        out = work / f"census_{kind}_{visit}"
        run_logged([BIN / "nnunet-pvs", "census", "-i", preds[visit], "-o", out, "--no-plots", "-np", 2], env,
                   logs / f"census_{kind}_{visit}.log")
        s = pd.read_csv(out / "subjects.csv")
        counts[visit] = s[s["region"] == "whole"].set_index("case")["n_clusters"]
    table = pd.concat(counts, axis=1).dropna()
    return {**icc(table.to_numpy()), "counts": table}


def accuracy_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per truth class: right / all, for all PVS, those in both slabs, and those of them of at least 4 voxels."""
    subsets = {"all PVS": rows, "wholly in both slabs": rows[rows["in_both_slabs"]],
               "in both slabs, >= 4 voxels": rows[rows["in_both_slabs"] & rows["size_ok"]]}
    out = []
    for name, sub in subsets.items():
        row = {"PVS": name}
        for c in CLASSES:
            s = sub[sub["truth"] == c]
            right = int((s["called"] == c).sum())
            row[c] = f"{right}/{len(s)} ({right / len(s):.0%})" if len(s) else "-"
        out.append(row)
    return pd.DataFrame(out)


def confusion(rows: pd.DataFrame) -> pd.DataFrame:
    called = ["stable", "enlarged", "shrunk", "new", "vanished", "uncertain", "missed"]
    return pd.crosstab(rows["truth"], rows["called"]).reindex(index=list(CLASSES), columns=called, fill_value=0)


def rescan_rate(out: Path) -> dict:
    ch = pd.read_csv(out / "changes.csv")
    n = len(ch)
    changed = int(ch["status"].isin(CHANGES).sum())
    return {"tracks": n, "changed": changed, "changed_share": changed / n if n else float("nan"),
            "uncertain_share": float((ch["status"] == "uncertain").mean()) if n else float("nan"),
            "by_status": ch["status"].value_counts().to_dict()}


def evaluate(kind: str, preds: dict[str, Path], ds: Path, work: Path, env: dict, logs: Path) -> dict:
    t0 = time.perf_counter()
    outs = run_change(preds, ds, work, kind, env, logs)
    seconds = time.perf_counter() - t0
    truth = pd.read_csv(ds / "visits" / "changes_truth.csv")
    rows = []
    for visit in VISITS:
        for case in tqdm(cases_of(ds), desc=f"score {kind} {visit}"):
            t = truth[(truth["case"].astype(str) == case) & (truth["visit"] == visit)]
            rows += score_case(ds, case, visit, t, preds, outs[visit])
    rows = pd.DataFrame(rows)
    rows.insert(0, "predictions", kind)
    reg = pd.concat([registration_errors(ds, outs[v], v) for v in VISITS])
    return {"rows": rows, "registration": reg, "rescan": rescan_rate(outs["rescan"]),
            "icc": census_icc(preds, work, kind, env, logs), "change_seconds": seconds}


def _md_table(df: pd.DataFrame, index: bool = False) -> list[str]:
    df = df.reset_index() if index else df
    return [markdown_table(df), ""]


def report(results: dict, args, ds: Path, timing: dict) -> list[str]:
    truth = pd.read_csv(ds / "visits" / "changes_truth.csv")
    fu = truth[truth["visit"] == "follow_up"]
    lines = [
        "# `nnunet-pvs change` on phantom visits with known changes",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} by `benchmarks/bench_change.py --subjects {args.subjects} --seed "
        f"{args.seed}` on this 2-core CPU machine: `nnunet-pvs phantom --size small --follow-up --rescan` "
        f"({args.subjects} T2w-like subjects, 0.69 x 0.69 x 2 mm slabs of 24 slices), every rule at its default "
        "(K 0.5, M 4, S 4 voxels, absence P 0.25, tolerance 1 voxel).",
        "",
        "True follow-up PVS: " + ", ".join(f"{c} {int((fu['status'] == c).sum())}" for c in CLASSES) + ".",
        "",
    ]
    for kind, res in results.items():
        rows = res["rows"]
        fu_rows, re_rows = rows[rows["visit"] == "follow_up"], rows[rows["visit"] == "rescan"]
        title = {"labels": "Predictions = the noise-free truth labels of each visit",
                 "model": f"Predictions of a trained model (`{args.model.name}`, fold {args.fold}, "
                          f"probabilities, `nnUNetv2_predict_from_modelfolder -step_size {args.step_size:g}"
                          f"{'' if args.tta else ' --disable_tta'}` on the CPU)"}[kind]
        rr, ic, reg = res["rescan"], res["icc"], res["registration"]
        lines += [f"## {title}", "", "Status accuracy on the follow-ups (right / true PVS of the class):", ""]
        lines += _md_table(accuracy_table(fu_rows))
        lines += ["What each true follow-up PVS was called (all PVS):", ""]
        lines += _md_table(confusion(fu_rows), index=True)
        lines += [f"Rescans (nothing changed): {rr['changed']} of {rr['tracks']} tracks called changed "
                  f"(**{rr['changed_share']:.1%}**), {rr['uncertain_share']:.1%} uncertain; of the true PVS "
                  f"wholly in both slabs, {(re_rows[re_rows['in_both_slabs']]['called'].isin(CHANGES)).mean():.1%} "
                  "are on a track called changed.", "",
                  f"Registration error (recovered transform against the true motion, over the head): mean "
                  f"{reg['mean_mm'].mean():.2f} mm (per pair {reg['mean_mm'].min():.2f}-{reg['mean_mm'].max():.2f}), "
                  f"worst point {reg['max_mm'].max():.2f} mm, over {len(reg)} pairs (true rotations "
                  f"{reg['true_rotation_deg'].min():.1f}-{reg['true_rotation_deg'].max():.1f} deg, shifts "
                  f"{reg['true_translation_mm'].min():.1f}-{reg['true_translation_mm'].max():.1f} mm).", "",
                  f"PVS-count scan-rescan reliability of `nnunet-pvs census` (whole slab, default options, "
                  f"{ic['n']} subjects; counts {int(ic['counts'].min().min())}-{int(ic['counts'].max().max())}): "
                  f"ICC(A,1) **{ic['icc_a1']:.3f}** (95 % CI {ic['icc_a1_low']:.3f}-{ic['icc_a1_high']:.3f}), "
                  f"ICC(C,1) {ic['icc_c1']:.3f} ({ic['icc_c1_low']:.3f}-{ic['icc_c1_high']:.3f}); published "
                  f"{PUBLISHED_ICC}. Mean absolute count difference "
                  f"{(ic['counts']['rescan'] - ic['counts']['baseline']).abs().mean():.1f} "
                  f"({((ic['counts']['rescan'] - ic['counts']['baseline']).abs() / ic['counts']['baseline']).mean():.1%}).",
                  "", f"`nnunet-pvs change` wall time, both visit pairs of all subjects: {res['change_seconds']:.0f} s "
                  "(-np 2).", ""]
    lines += ["## Reading", ""]
    for kind, res in results.items():
        fu_rows = res["rows"][res["rows"]["visit"] == "follow_up"]
        missed = (fu_rows["called"] == "missed").mean()
        uncertain = (fu_rows["called"] == "uncertain").mean()
        lowest = min(CLASSES, key=lambda c: (fu_rows[fu_rows["truth"] == c]["called"] == c).mean())
        lines.append(f"* `{kind}`: {missed:.0%} of the true follow-up PVS lie on no predicted cluster (missed), "
                     f"{uncertain:.0%} are on a track called uncertain; the class recovered least often is "
                     f"`{lowest}`; rescans: {res['rescan']['changed_share']:.1%} of tracks called changed.")
    lines += ["* With the truth as predictions the rules themselves are tested: what is left is the slab (PVS it "
              "cuts off are `uncertain` by design) and a few changes at the ratio boundary. With a model, status "
              "accuracy is bounded by the segmentation: a PVS the model misses at one visit becomes a `new` or "
              "`vanished` track, and most of a weak model's clusters are small enough to be `uncertain`; the "
              "rescan's share of changed tracks is the false-change rate a user of that model should expect.",
              "* The phantom's rescans are same-session (no repositioning of the coil, no scanner drift, the same "
              "noise level), so their count ICC is an upper bound of what real scan-rescan pairs give (published "
              f"{PUBLISHED_ICC}).", ""]
    if timing:
        lines += ["Model prediction wall time per visit: " + ", ".join(f"{v} {t['wall_s']:.0f} s" for v, t in
                                                                        timing.items() if t) + ".", ""]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=10)
    ap.add_argument("--seed", type=int, default=3, help="phantom seed (the demo's model was trained on seed 0)")
    ap.add_argument("--model", type=Path, default=DEMO_MODEL,
                    help="trained nnU-Net model folder (default: the demo's MfNS_De under /work/demo_try)")
    ap.add_argument("--fold", default="0")
    ap.add_argument("--no-model", action="store_true", help="labels only")
    ap.add_argument("--step-size", type=float, default=1.0,
                    help="sliding-window step of the model's prediction (nnU-Net's default 0.5; 1.0 here: 4x fewer "
                         "tiles on a 2-core CPU, the same for every visit)")
    ap.add_argument("--tta", action="store_true", help="test-time mirroring (nnU-Net's default; off here, 4x faster)")
    ap.add_argument("--work-dir", type=Path, default=Path("/work/bench_change"))
    ap.add_argument("--name", default="change", help="results file stem (default change)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    work = args.work_dir
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = nnunet_environment(work)
    ds = make_phantom(work, args, env, logs)
    results = {"labels": evaluate("labels", label_predictions(ds, work), ds, work, env, logs)}
    timing = {}
    if not args.no_model:
        if not (args.model / f"fold_{args.fold}").is_dir():
            raise SystemExit(f"{args.model}: no fold_{args.fold}; train one (nnunet-pvs demo) or pass --no-model")
        preds, timing = model_predictions(ds, work, args, env, logs)
        results["model"] = evaluate("model", preds, ds, work, env, logs)
    rows = pd.concat([r["rows"] for r in results.values()])
    write_result(args.results / f"{args.name}.md", report(results, args, ds, timing))
    rows.to_csv(args.results / f"{args.name}.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
