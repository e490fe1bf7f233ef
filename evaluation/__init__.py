"""PVS evaluation (issue 5): plain functions on numpy arrays, with thin CLIs on top.

voxel_metrics (DSC/SEN/PPV, empty-case convention), clusters (Boutinaud cluster rule, VALDO IoU
rule, size filtering, size agreement), surface_distance (HD95, per-cluster HD95), case (all
metrics of one case over thresholds and regions), io, regions, sweeps, cohort_stats, report,
plots, cli_evaluate (`nnunet-pvs evaluate`), cli_cohort (`nnunet-pvs evaluate-cohort`).
User documentation: docs/evaluation.md.
"""
