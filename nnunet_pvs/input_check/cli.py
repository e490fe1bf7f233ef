"""``nnunet-pvs check-inputs -i SCANS -m MODEL -o OUT [--strict]``: the QC table of new scans against a
trained model, written whole or not at all (``nnunet_pvs.staging``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COMMAND = "check-inputs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", required=True, type=Path, metavar="SCANS",
                   help="folder of images named as nnU-Net wants them, CASE_0000.nii.gz (one file per channel "
                        "of the model's dataset.json)")
    p.add_argument("-m", "--model", required=True, type=Path, metavar="MODEL",
                   help="trained-model folder nnUNet_results/Dataset<ID>_<Name>/TRAINER__PLANS__CONFIG (plans.json, "
                        "dataset.json, dataset_fingerprint.json)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                   help="output folder: inputs_qc.csv, inputs_qc.md and, with a training reference, "
                        "inputs_reference.json (an earlier check-inputs there is replaced)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any scan is refused (default: exit 0 "
                   "whenever the check ran)")
    p.add_argument("-c", "--configuration", help="configuration in plans.json (default: CONFIG of the MODEL "
                   "folder name)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--training-images", type=Path, metavar="DIR",
                     help="the model's training images (default: MODEL/inputs_reference.json if present, else "
                          "$nnUNet_raw/<dataset>/imagesTr); needed for the orientation, intensity, contrast, "
                          "structure and brain-extraction checks")
    src.add_argument("--reference", type=Path, metavar="JSON",
                     help="inputs_reference.json written by an earlier check-inputs of this model (no training "
                          "images needed)")
    p.add_argument("--cases", nargs="+", metavar="ID", help="only these case ids")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    from nnunet_pvs import __version__
    from nnunet_pvs.input_check import run_checks
    from nnunet_pvs.input_check.checks import not_checked, sign_rules, training_bands
    from nnunet_pvs.input_check.model import load_model
    from nnunet_pvs.input_check.reference import REFERENCE_FILE, find_reference
    from nnunet_pvs.input_check.table import QC_FILE, REPORT_FILE, markdown_report, summary_line
    from nnunet_pvs.staging import check_output_folder, staged_folder

    model = load_model(args.model, args.configuration)
    check_output_folder(args.output, COMMAND)
    ref = find_reference(model, args.training_images, args.reference, progress=not args.quiet)
    qc = run_checks(args.input, model, ref, args.cases, progress=not args.quiet)
    thresholds = {k: b.describe() for k, b in training_bands(model, ref).items()}
    thresholds.update(sign_rules(model, ref))
    skipped = not_checked(model, ref)
    header = [(f"- model: `{model.folder.resolve()}` (configuration {model.configuration}, channels "
               f"{', '.join(model.channel_names)}, normalisation {', '.join(model.normalization)}, target spacing "
               f"{'x'.join(f'{s:.3g}' for s in model.target_spacing)} mm)"),
              f"- scans: `{args.input.resolve()}`",
              f"- training reference: {ref.source if ref is not None else 'none (fingerprint only)'}",
              f"- nnunet-pvs {__version__}"]
    with staged_folder(args.output, COMMAND) as stage:
        qc.to_csv(stage / QC_FILE, index=False, float_format="%.6g")
        (stage / REPORT_FILE).write_text(markdown_report(qc, header, thresholds, skipped))
        if ref is not None:  # reusable with --reference, or copied into MODEL for sites without the images
            reference = {**ref.to_json(), "thresholds": thresholds}
            (stage / REFERENCE_FILE).write_text(json.dumps(reference, indent=1) + "\n")
    for item in skipped:
        print(f"not checked: {item}", file=sys.stderr)
    print(f"{summary_line(qc)} ({args.output / QC_FILE})")
    return 1 if args.strict and (qc["verdict"] == "refuse").any() else 0
