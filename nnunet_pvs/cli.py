"""The ``nnunet-pvs`` command: one subcommand per feature, each in its own module.

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported only when their subcommand runs, so ``nnunet-pvs env`` stays fast and torch-free.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nnunet_pvs.errors import UserError

# name -> (module, one-line help). Keep in the order a user meets them.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "env": ("nnunet_pvs.plugin_env", "print the shell export that lets stock nnU-Net find our trainers"),
    "phantom": ("nnunet_pvs.dataset_conversion.cli_phantom", "generate the synthetic PVS dataset (MNI152-based phantom) in nnU-Net raw format"),
    "convert": ("nnunet_pvs.dataset_conversion.cli_convert", "CSV manifest, subject folders or BIDS to an nnU-Net raw dataset, validated"),
    "splits": ("nnunet_pvs.dataset_conversion.cli_splits", "5-fold splits_final.json stratified by age or PVS load (nnU-Net or Cai protocol)"),
    "regions": ("nnunet_pvs.dataset_conversion.cli_regions", "basal ganglia / white matter masks and visual-count slices from aseg label maps"),
    "pretrain-autoencoder": ("nnunet_pvs.pretrain_autoencoder", "pretrain the Boutinaud autoencoder on unlabelled images; writes -pretrained_weights for nnUNetTrainerAEUNet"),
    "evaluate": ("nnunet_pvs.evaluation.cli_evaluate", "PVS metrics of predictions vs reference labels: voxel, cluster, HD95, sweeps, regions"),
    "evaluate-cohort": ("nnunet_pvs.evaluation.cli_cohort", "cohort statistics of PVS cluster counts: visual counts, ratings, two-cohort KS test"),
    "check-inputs": ("nnunet_pvs.input_check.cli", "new scans against what a trained model saw: spacing, orientation, intensity, contrast, brain extraction; ok / warn / refuse per scan"),
    "census": ("nnunet_pvs.census.cli", "PVS burden of new scans from nnU-Net predictions: per-cluster shape, per-region counts, QC report"),
    "change": ("nnunet_pvs.change.cli", "PVS change between two visits, cluster by cluster: registration, tracks, new/enlarged/shrunk/vanished"),
    "demo": ("nnunet_pvs.demo", "the whole project on the bundled synthetic data: phantom, plan, train, compare"),
    "compare": ("nnunet_pvs.compare.cli", "head-to-head comparison of nnU-Net models on identical cases: Table-2 report, paired stats, SLURM scale-out"),
}




def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnunet-pvs",
        description="Perivascular-space segmentation on top of stock nnU-Net v2. "
        'Start with: eval "$(nnunet-pvs env)"',
    )
    p.add_argument("--version", action="version", version=_version())
    return p


def _version() -> str:
    from nnunet_pvs import __version__

    return f"nnunet-pvs {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C, caught once for every command: each writer stages its output (nnunet_pvs.staging)
        # and its clean-up has run by now, so one line and the shell's status for SIGINT (128 + 2)
        name = f" {argv[0]}" if argv and argv[0] in SUBCOMMANDS else ""
        print(("\n" if sys.stderr.isatty() else "") + f"nnunet-pvs{name}: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    parser = _parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
            sp.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"nnunet-pvs {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
