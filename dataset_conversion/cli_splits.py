"""``nnunet-pvs splits``: stratified 5-fold ``splits_final.json`` in the nnU-Net preprocessed folder."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nnunet_pvs.errors import UserError
from nnunet_pvs.dataset_conversion.convert import find_dataset, raw_root
from nnunet_pvs.dataset_conversion.splits import write_splits


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id")
    p.add_argument("--by", default="pvs_load",
                   help="covariate: pvs_load (mask voxel count, Boutinaud), age (Cai), or any covariates.csv column")
    p.add_argument("--protocol", choices=("nnunet", "cai"), default="nnunet",
                   help="nnunet: validate on one group, train on four; cai: test on one group, validate on "
                        "a random other, train on three (test lists in test_groups.json)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--raw", type=Path, help="nnU-Net raw folder (default $nnUNet_raw)")
    p.add_argument("--preprocessed", type=Path, help="nnU-Net preprocessed folder (default $nnUNet_preprocessed)")
    p.add_argument("--force", action="store_true", help="replace an existing, different splits_final.json")


def run(args) -> int:
    dataset = find_dataset(raw_root(args.raw), args.dataset_id)
    pre = args.preprocessed or os.environ.get("nnUNet_preprocessed")
    if not pre:
        raise UserError("nnUNet_preprocessed is not set: export it or pass --preprocessed")
    write_splits(dataset, Path(pre), by=args.by, protocol=args.protocol, seed=args.seed, force=args.force)
    return 0
