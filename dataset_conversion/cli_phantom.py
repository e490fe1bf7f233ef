"""``nnunet-pvs phantom``: the synthetic PVS dataset, written in nnU-Net raw format."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from nnunet_pvs.dataset_conversion.convert import raw_root


def add_arguments(p: argparse.ArgumentParser) -> None:
    from nnunet_pvs.dataset_conversion.phantom import SIZES

    p.add_argument("-d", "--dataset-id", type=int, default=900, help="nnU-Net dataset id (default 900)")
    p.add_argument("-n", "--name", help="dataset name (default PVSPhantom<contrast>)")
    p.add_argument("--contrast", choices=("T2w", "T1w"), default="T2w",
                   help="T2w-like at 0.69x0.69x2 mm axial (Cai) or T1w-like at 1 mm isotropic (Boutinaud)")
    p.add_argument("--size", choices=tuple(SIZES), default="small",
                   help="; ".join(f"{k}: {v.doc}" for k, v in SIZES.items() if k != "demo")
                   + "; demo = small (default small)")
    p.add_argument("--subjects", type=int, help="labelled subjects (default per size: "
                   + ", ".join(f"{k} {v.n_subjects}" for k, v in SIZES.items() if k != "demo") + ")")
    p.add_argument("--test", type=int, default=0, help="extra labelled test subjects -> imagesTs/labelsTs")
    p.add_argument("--unlabeled", type=int, default=0, help="unlabelled subjects -> imagesUnlabeled/")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("-o", "--raw", type=Path, help="nnU-Net raw folder (default $nnUNet_raw)")
    p.add_argument("--force", action="store_true",
                   help="replace a different phantom dataset with the same id (another command's dataset, "
                        "or one made by hand, is never replaced)")
    p.add_argument("--follow-up", action="store_true",
                   help="also write, for every labelled subject, a follow-up visit with known PVS changes "
                        "(enlarged, shrunk, new, vanished), head motion and new noise under <dataset>/visits/, "
                        "with changes_truth.csv and motion.csv (docs/data.md)")
    p.add_argument("--rescan", action="store_true",
                   help="also write a same-session rescan of every labelled subject: head motion and new noise, "
                        "no change (the noise floor of a change measurement)")
    p.add_argument("--preview", nargs="?", const=True, default=False, metavar="PNG",
                   help="also write a PNG of axial slices with the mask overlay (default <dataset>/preview.png)")


def run(args) -> int:
    from nnunet_pvs.dataset_conversion.phantom import make_phantom_dataset

    t0 = time.time()
    folder = make_phantom_dataset(raw_root(args.raw), args.dataset_id, args.name, contrast=args.contrast,
                                  n_subjects=args.subjects, size=args.size, seed=args.seed,
                                  n_unlabeled=args.unlabeled, n_test=args.test, force=args.force,
                                  visits=tuple(v for v, on in (("follow_up", args.follow_up),
                                                               ("rescan", args.rescan)) if on))
    print(f"{folder} ({time.time() - t0:.1f} s)")
    if args.preview:
        from nnunet_pvs.dataset_conversion.preview import write_preview

        png = write_preview(folder, None if args.preview is True else Path(args.preview))
        print(f"preview: {png}")
    return 0
