"""How hard is the phantom? Classical PVS filters with an oracle threshold, and the phantom's statistics.

For each contrast, ``--subjects`` subjects of ``--size`` are generated; every filter (white/black
top-hat in 2D and 3D with several footprints; Frangi and Sato vesselness from scikit-image) is run,
and one threshold per filter and contrast is chosen to maximise the mean Dice over subjects *on
the subjects themselves* (an oracle no real method has), inside white matter + basal ganglia.
The best such Dice is an upper bound for a tuned classical method. Real 3T data: filters about
0.3-0.45, trained networks 0.5-0.7 (see docs/data.md); the phantom is meant to sit in that range.

Also reported: clusters per subject and region, diameters and cluster sizes, contrast-to-noise,
WMH volumes, lacunes. Results: benchmarks/results/phantom_difficulty.md and .csv.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cc3d
import numpy as np
import pandas as pd
from scipy import ndimage
from skimage import filters, morphology

from nnunet_pvs.dataset_conversion.phantom import BG_LABELS, SPACING, WM_LABELS, generate_subject
from nnunet_pvs.cluster_regions import majority_regions

RESULTS = Path(__file__).parent / "results"


def filter_bank(contrast: str):
    """name -> function(image) -> response (higher = more PVS-like)."""
    bright = contrast == "T2w"
    sign = 1.0 if bright else -1.0
    two_d = SPACING[contrast][2] > 1.5  # thick slices: filter slice by slice

    def slicewise(fn):
        return lambda img: np.stack([fn(img[:, :, k]) for k in range(img.shape[2])], axis=2)

    bank = {}
    for r in (1, 2, 3):  # footprints 3, 5, 7 voxels
        fp2 = morphology.disk(r)
        th = morphology.white_tophat if bright else morphology.black_tophat
        bank[f"tophat2d_{2 * r + 1}"] = slicewise(lambda x, fp=fp2, th=th: th(x, fp))
        if not two_d:
            bank[f"tophat3d_{2 * r + 1}"] = lambda x, r=r, th=th: th(x, morphology.ball(r))
        else:
            fp3 = np.stack([fp2] * 3, axis=2) if r > 1 else fp2[:, :, None]
            bank[f"tophat3d_{2 * r + 1}"] = lambda x, fp=fp3, th=th: th(x, fp)
    for name, fn in (("frangi", filters.frangi), ("sato", filters.sato)):
        for sig in ((0.5, 1.0), (0.5, 1.0, 1.5, 2.0)):
            key = f"{name}_{'-'.join(map(str, sig))}"
            if two_d:
                bank[key] = slicewise(lambda x, fn=fn, sig=sig: fn(sign * x, sigmas=sig, black_ridges=False))
            else:
                bank[key] = lambda x, fn=fn, sig=sig: fn(sign * x, sigmas=sig, black_ridges=False)
    return bank


def oracle_dice(responses: list[np.ndarray], refs: list[np.ndarray], n_thr: int = 60) -> tuple[float, float]:
    """Best mean-over-subjects Dice over one shared threshold (quantile grid of the pooled responses)."""
    pooled = np.concatenate(responses)
    qs = np.quantile(pooled, np.linspace(0.90, 0.9995, n_thr))
    dices = np.zeros((len(responses), n_thr))
    for i, (r, y) in enumerate(zip(responses, refs)):
        above = r[None, :] >= qs[:, None]
        tp = (above & y[None]).sum(1)
        dices[i] = 2 * tp / np.maximum(above.sum(1) + y.sum(), 1)
    mean = dices.mean(0)
    k = int(np.argmax(mean))
    return float(mean[k]), float(qs[k])


def dice_at(responses: list[np.ndarray], refs: list[np.ndarray], threshold: float) -> float:
    """Mean-over-subjects Dice of ``response >= threshold``."""
    return float(np.mean([2 * ((r >= threshold) & y).sum() / max((r >= threshold).sum() + y.sum(), 1)
                          for r, y in zip(responses, refs)]))


def subject_stats(s, contrast: str) -> dict:
    spacing = np.asarray(SPACING[contrast])
    lab, n = cc3d.connected_components(s.mask, connectivity=26, return_N=True)
    sizes = np.bincount(lab.ravel())[1:]
    regions = majority_regions(lab, int(n), {"bg": np.isin(s.labels, BG_LABELS), "wm": np.isin(s.labels, WM_LABELS)})
    wm = np.isin(s.labels, WM_LABELS) & (s.pvs_fraction == 0) & ~s.lacunes
    for m in s.mimics.values():
        wm &= m < 0.05
    noise = s.covariates["noise_sigma"]
    # CNR of labelled voxels against the median of PVS-free, mimic-free white matter
    wm_level = float(np.median(s.image[wm])) if wm.any() else np.nan
    cnr = np.abs(s.image[s.mask > 0] - wm_level) / noise if s.mask.any() else np.array([np.nan])
    # diameter per cluster from volume and extent: 2 sqrt(V / (pi L)), L = longest bounding-box side (mm)
    diam = []
    for sl, k in zip(ndimage.find_objects(lab), range(1, n + 1)):
        ext = (np.array([x.stop - x.start for x in sl]) * spacing).max()
        vol = sizes[k - 1] * np.prod(spacing)
        diam.append(2 * np.sqrt(vol / (np.pi * max(ext, spacing.min()))))
    return {"clusters": int(n), "clusters_wm": int((regions[1:] == "wm").sum()),
            "clusters_bg": int((regions[1:] == "bg").sum()), "sizes": sizes, "diam": np.array(diam),
            "cnr_median": float(np.median(cnr)), "wmh_cm3": s.covariates["wmh_cm3"],
            "lacunes": s.covariates["lacune_count"], "age": s.covariates["age"],
            "truth_vs_rater_dice": float(2 * (s.mask & s.truth).sum() / max(s.mask.sum() + s.truth.sum(), 1))}


def burden(contrast: str, n: int, seed: int) -> pd.DataFrame:
    """Whole-brain (``--size full``) burden per subject: 3D clusters per region; on T2w-like data also
    Cai-style counts (2D clusters) on the basal-ganglia and centrum-semiovale rating slices."""
    from nnunet_pvs.dataset_conversion.regions import region_masks

    rows = []
    for i in range(n):
        t0 = time.process_time()
        s = generate_subject(contrast, "full", seed, i)
        cpu = time.process_time() - t0
        st = subject_stats(s, contrast)
        row = {"contrast": contrast, "subject": i, "age": st["age"], "cpu_seconds": round(cpu, 1),
               "clusters": st["clusters"], "clusters_wm": st["clusters_wm"], "clusters_bg": st["clusters_bg"],
               "wmh_cm3": st["wmh_cm3"], "lacunes": st["lacunes"]}
        if contrast == "T2w":
            reg = region_masks(s.labels, s.affine, slices=True)
            for key, name in (("bgslice", "bg_slice_count"), ("csoslice", "cso_slice_count")):
                if key in reg.masks:
                    k = reg.bg_slice if key == "bgslice" else reg.cso_slice
                    sl = [slice(None)] * 3
                    sl[reg.axis] = k
                    m2 = (s.mask > 0)[tuple(sl)] & reg.masks[key][tuple(sl)]
                    row[name] = int(cc3d.connected_components(m2[..., None].astype(np.uint8), connectivity=26,
                                                              return_N=True)[1])
        rows.append(row)
    return pd.DataFrame(rows)


def network_vs_classical(dataset_dir: Path, validation_dir: Path) -> pd.DataFrame:
    """Dice inside WM + BG of an nnU-Net validation folder and of every filter (oracle threshold on
    those same held-out cases) on the cases that folder predicted: is the phantom learnable?"""
    import nibabel as nib

    ds = json.loads((dataset_dir / "dataset.json").read_text())
    contrast = ds["channel_names"]["0"]
    cases = sorted(p.name[:-7] for p in validation_dir.glob("*.nii.gz"))
    load = lambda p: np.asanyarray(nib.load(str(p)).dataobj)  # noqa: E731
    imgs = [load(dataset_dir / "imagesTr" / f"{c}_0000.nii.gz").astype(np.float32) / 1000 for c in cases]
    regions = [np.isin(load(dataset_dir / "regions" / f"{c}.nii.gz"), WM_LABELS + BG_LABELS) for c in cases]
    refs = [load(dataset_dir / "labelsTr" / f"{c}.nii.gz")[r] > 0 for c, r in zip(cases, regions)]
    preds = [load(validation_dir / f"{c}.nii.gz")[r] > 0 for c, r in zip(cases, regions)]
    net = [2 * (p & y).sum() / max(p.sum() + y.sum(), 1) for p, y in zip(preds, refs)]
    rows = [{"method": "nnU-Net (validation)", "dice_wm_bg": round(float(np.mean(net)), 4), "cases": len(cases)}]
    truth_dir = dataset_dir / "labelsTr_truth"
    if truth_dir.is_dir():  # the noise-free truth: how far rater noise caps the measured Dice
        truths = [load(truth_dir / f"{c}.nii.gz")[r] > 0 for c, r in zip(cases, regions)]
        vs_truth = [2 * (p & y).sum() / max(p.sum() + y.sum(), 1) for p, y in zip(preds, truths)]
        rater = [2 * (p & y).sum() / max(p.sum() + y.sum(), 1) for p, y in zip(refs, truths)]
        rows += [{"method": "nnU-Net (validation) vs noise-free truth", "dice_wm_bg": round(float(np.mean(vs_truth)), 4),
                  "cases": len(cases)},
                 {"method": "rater label vs noise-free truth", "dice_wm_bg": round(float(np.mean(rater)), 4),
                  "cases": len(cases)}]
    train = sorted(p.name[:-7] for p in (dataset_dir / "labelsTr").glob("*.nii.gz") if p.name[:-7] not in cases)
    train_imgs = [load(dataset_dir / "imagesTr" / f"{c}_0000.nii.gz").astype(np.float32) / 1000 for c in train]
    train_regions = [np.isin(load(dataset_dir / "regions" / f"{c}.nii.gz"), WM_LABELS + BG_LABELS) for c in train]
    train_refs = [load(dataset_dir / "labelsTr" / f"{c}.nii.gz")[r] > 0 for c, r in zip(train, train_regions)]
    for name, fn in filter_bank(contrast).items():
        d, _ = oracle_dice([fn(x)[r] for x, r in zip(imgs, regions)], refs)
        rows.append({"method": f"{name} (oracle threshold)", "dice_wm_bg": round(d, 4), "cases": len(cases)})
        if train:  # a method a user can run: threshold chosen on the fold's training cases
            _, thr = oracle_dice([fn(x)[r] for x, r in zip(train_imgs, train_regions)], train_refs)
            d = dice_at([fn(x)[r] for x, r in zip(imgs, regions)], refs, thr)
            rows.append({"method": f"{name} (threshold from the {len(train)} training cases)",
                         "dice_wm_bg": round(d, 4), "cases": len(cases), "filter": name, "threshold": thr})
    return pd.DataFrame(rows)


ERROR_KINDS = ("label border (1 voxel off a label)", "noise-free truth the rater left out",
               "faint rendered PVS below visibility", "WMH", "sulcal CSF", "vessel", "lacune",
               "nothing (noise, texture)")


def _error_kinds(s, region: np.ndarray) -> dict:
    """Masks (inside ``region``) of what an unlabelled voxel can be, in ERROR_KINDS order; first match wins."""
    near = ndimage.binary_dilation(s.mask > 0, ndimage.generate_binary_structure(3, 1))[region]
    truth = (s.truth > 0)[region]
    pvs = s.pvs_fraction[region] > 0.05
    return dict(zip(ERROR_KINDS[:-1], (near & ~truth, truth, pvs, s.mimics["wmh"][region] > 0.1,
                                       s.mimics["sulci"][region] > 0.1, s.mimics["vessels"][region] > 0.1,
                                       s.lacunes[region])))


def error_breakdown(dataset_dir: Path, validation_dir: Path, filter_name: str, threshold: float) -> pd.DataFrame:
    """False positives of the network and of one filter (at ``threshold``) by what the phantom put there,
    and recall by the labelled voxel's signal-weighted PVS coverage: where does the network win?

    The phantom's subjects are regenerated from dataset.json (generator, seed, case index) to get the
    mimic maps; a case whose regenerated label differs from the stored one is refused."""
    import nibabel as nib

    ds = json.loads((dataset_dir / "dataset.json").read_text())
    ph = ds["nnunet_pvs"]["phantom"]
    contrast = ds["channel_names"]["0"]
    fn = filter_bank(contrast)[filter_name]
    cases = sorted(p.name[:-7] for p in validation_dir.glob("*.nii.gz"))
    bins = (0.0, 0.35, 0.45, 0.55, 0.7, 1.01)
    fp = {m: dict.fromkeys(ERROR_KINDS, 0) for m in ("network", filter_name)}
    hits = {m: np.zeros(len(bins) - 1) for m in fp}
    counts = np.zeros(len(bins) - 1)
    for case in cases:
        s = generate_subject(contrast, ph["size"], ph["seed"], int(case[3:]))
        stored = np.asanyarray(nib.load(str(dataset_dir / "labelsTr" / f"{case}.nii.gz")).dataobj)
        if not np.array_equal(stored > 0, s.mask > 0):
            raise SystemExit(f"{case}: regenerated label differs from {dataset_dir / 'labelsTr'}; "
                             "the dataset comes from another generator version")
        region = np.isin(s.labels, WM_LABELS + BG_LABELS)
        y = s.mask[region] > 0
        w = s.pvs_fraction[region]
        kinds = _error_kinds(s, region)
        preds = {"network": np.asanyarray(nib.load(str(validation_dir / f"{case}.nii.gz")).dataobj)[region] > 0,
                 filter_name: fn(s.image.astype(np.float32))[region] >= threshold}
        which = np.digitize(w[y], bins) - 1
        counts += np.bincount(which, minlength=len(bins) - 1)[: len(bins) - 1]
        for m, p in preds.items():
            wrong, seen = p & ~y, np.zeros_like(y)
            for kind, mask in kinds.items():
                fp[m][kind] += int((wrong & mask & ~seen).sum())
                seen |= mask
            fp[m][ERROR_KINDS[-1]] += int((wrong & ~seen).sum())
            hits[m] += np.bincount(which[p[y]], minlength=len(bins) - 1)[: len(bins) - 1]
    rows = [{"measure": "false-positive voxels", "kind": k, **{m: fp[m][k] for m in fp}} for k in ERROR_KINDS]
    rows += [{"measure": "recall of labelled voxels", "kind": f"PVS coverage {lo:.2f}-{min(hi, 1.0):.2f} "
              f"({int(n)} voxels)", **{m: round(float(hits[m][i] / max(n, 1)), 3) for m in fp}}
             for i, (lo, hi, n) in enumerate(zip(bins[:-1], bins[1:], counts))]
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small")
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contrasts", nargs="+", default=["T2w", "T1w"])
    p.add_argument("--out", type=Path, default=RESULTS / "phantom_difficulty")
    p.add_argument("--burden-subjects", type=int, default=0,
                   help="also generate N whole-brain subjects per contrast for the burden table")
    p.add_argument("--nnunet-validation", type=Path, nargs=2, metavar=("DATASET_DIR", "VALIDATION_DIR"),
                   help="compare an nnU-Net fold's validation predictions with the filters on the same cases")
    a = p.parse_args(argv)
    if a.nnunet_validation:
        t = network_vs_classical(*a.nnunet_validation)
        print(t.to_string(index=False))
        a.out.parent.mkdir(parents=True, exist_ok=True)
        t.to_csv(a.out.parent / (a.out.name + "_network_vs_classical.csv"), index=False)
        return 0
    if a.burden_subjects:
        b = pd.concat([burden(c, a.burden_subjects, a.seed) for c in a.contrasts])
        print(b.to_string(index=False))
        a.out.parent.mkdir(parents=True, exist_ok=True)
        b.to_csv(a.out.parent / (a.out.name + "_burden_full.csv"), index=False)
    rows, stats_rows = [], []
    from tqdm import tqdm
    for contrast in a.contrasts:
        t0 = time.time()
        subs = [generate_subject(contrast, a.size, a.seed, i) for i in tqdm(range(a.subjects), desc=f"{contrast} subjects")]
        gen_s = (time.time() - t0) / a.subjects
        regions = [np.isin(s.labels, WM_LABELS + BG_LABELS) for s in subs]
        refs = [s.mask[r] > 0 for s, r in zip(subs, regions)]
        for name, fn in tqdm(filter_bank(contrast).items(), desc=f"{contrast} filters"):
            resp = [fn(s.image.astype(np.float32))[r].astype(np.float32) for s, r in zip(subs, regions)]
            d, thr = oracle_dice(resp, refs)
            rows.append({"contrast": contrast, "filter": name, "oracle_dice_wm_bg": round(d, 4), "threshold": thr})
        st = [subject_stats(s, contrast) for s in subs]
        sizes = np.concatenate([x["sizes"] for x in st]) * float(np.prod(SPACING[contrast]))
        diam = np.concatenate([x["diam"] for x in st])
        stats_rows.append({
            "contrast": contrast, "size": a.size, "subjects": a.subjects, "seconds_per_subject": round(gen_s, 2),
            "clusters_median": float(np.median([x["clusters"] for x in st])),
            "clusters_min": min(x["clusters"] for x in st), "clusters_max": max(x["clusters"] for x in st),
            "clusters_wm_median": float(np.median([x["clusters_wm"] for x in st])),
            "clusters_bg_median": float(np.median([x["clusters_bg"] for x in st])),
            "cluster_mm3_p10": round(float(np.percentile(sizes, 10)), 2),
            "cluster_mm3_p50": round(float(np.percentile(sizes, 50)), 2),
            "cluster_mm3_p90": round(float(np.percentile(sizes, 90)), 2),
            "diameter_mm_p10": round(float(np.percentile(diam, 10)), 2),
            "diameter_mm_p50": round(float(np.percentile(diam, 50)), 2),
            "diameter_mm_p90": round(float(np.percentile(diam, 90)), 2),
            "cnr_median_min": round(min(x["cnr_median"] for x in st), 2),
            "cnr_median_max": round(max(x["cnr_median"] for x in st), 2),
            "wmh_cm3_range": f"{min(x['wmh_cm3'] for x in st):.1f}-{max(x['wmh_cm3'] for x in st):.1f}",
            "lacunes_total": int(sum(x["lacunes"] for x in st)),
            "rater_vs_truth_dice_mean": round(float(np.mean([x["truth_vs_rater_dice"] for x in st])), 3),
        })
    res = pd.DataFrame(rows)
    stats = pd.DataFrame(stats_rows)
    best = res.loc[res.groupby("contrast")["oracle_dice_wm_bg"].idxmax()]
    print(res.to_string(index=False))
    print(stats.T.to_string())
    print("best classical oracle Dice:", best[["contrast", "filter", "oracle_dice_wm_bg"]].to_dict("records"))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    res.to_csv(a.out.with_suffix(".csv"), index=False)
    stats.to_csv(a.out.parent / (a.out.name + "_stats.csv"), index=False)
    (a.out.parent / (a.out.name + "_best.json")).write_text(json.dumps(best.to_dict("records"), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
