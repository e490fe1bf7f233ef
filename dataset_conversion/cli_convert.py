"""``nnunet-pvs convert``: a CSV manifest, a folder per subject or a BIDS tree to nnU-Net raw format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnunet_pvs.dataset_conversion import manifest
from nnunet_pvs.dataset_conversion.convert import raw_root, write_dataset
from nnunet_pvs.dataset_conversion.validation import validate


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", type=Path, help="CSV/TSV: id, one column per channel, optional mask, "
                     "regions, split (train/test/unlabeled); other columns are covariates")
    src.add_argument("--folder", type=Path, help="one folder per subject: <id>/<channel>.nii.gz, "
                     "optional mask.nii.gz, regions.nii.gz; optional covariates.csv (column id)")
    src.add_argument("--bids", type=Path, help="BIDS root: sub-*/[ses-*/]anat/*_<channel>.nii.gz, masks and "
                     "label maps under derivatives/, covariates from participants.tsv")
    p.add_argument("-c", "--channels", nargs="+", required=True, help="channel names in order, e.g. T2w T1w")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1..999)")
    p.add_argument("-n", "--name", required=True, help="dataset name: Dataset<ID>_<name>")
    p.add_argument("-o", "--raw", type=Path, help="nnU-Net raw folder (default $nnUNet_raw)")
    p.add_argument("--label-value", type=float,
                   help="mask value that means PVS (default: masks must hold only 0 and 1)")
    p.add_argument("--allow-empty-labels", action="store_true",
                   help="accept masks that are all empty, or that --label-value would empty (refused by "
                        "default: usually a wrong --label-value)")
    p.add_argument("--affine-tol", type=float, default=1e-3,
                   help="largest allowed difference between image/mask affines (default 1e-3)")
    p.add_argument("--mask-pattern", default="*_label-PVS*_mask.nii*", help="BIDS: mask file pattern in derivatives")
    p.add_argument("--regions-pattern", default="*_dseg.nii*", help="BIDS: label map pattern in derivatives")
    p.add_argument("--force", action="store_true",
                   help="replace a different dataset with the same id written by `nnunet-pvs convert` "
                        "(another command's dataset, or one made by hand, is never replaced)")
    p.add_argument("--check", action="store_true", help="validate only, write nothing")


def read_subjects(args) -> list:
    if args.manifest is not None:
        return manifest.read_csv_manifest(args.manifest, args.channels)
    if args.folder is not None:
        return manifest.read_subject_folders(args.folder, args.channels)
    return manifest.read_bids(args.bids, args.channels, args.mask_pattern, args.regions_pattern)


def run(args) -> int:
    subjects = read_subjects(args)
    if args.check:
        checked = validate(subjects, args.channels, args.label_value, args.affine_tol,
                           allow_empty_labels=args.allow_empty_labels)
        for w in checked.warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(f"{len(subjects)} subject(s): no problem found")
        return 0
    write_dataset(subjects, raw_root(args.raw), args.dataset_id, args.name, args.channels,
                  label_value=args.label_value, affine_tol=args.affine_tol, force=args.force,
                  allow_empty_labels=args.allow_empty_labels,
                  log=lambda m: print(m, file=sys.stderr if m.startswith("warning") else sys.stdout))
    return 0
