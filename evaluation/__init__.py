"""PVS evaluation: plain functions on numpy arrays, with thin CLIs on top.

voxel_metrics (DSC/SEN/PPV, empty-case convention), clusters (matching rules: Boutinaud's overlap,
many-to-many IoU, one-to-one maximum matching; size filtering, size agreement), lesion_metrics
(panoptic quality, per-lesion Dice, size groups), protocols (VALDO 2021, EPVS 2024 and SHiVAi
rules), surface_distance (HD95, Hausdorff, voxel-count surface Dice, per-cluster HD95),
surface_dice (area-weighted surface Dice of Nikolov et al.), case (all metrics of one case over thresholds and regions), io, regions, sweeps,
cohort_stats, report (outputs staged by nnunet_pvs.staging), plots, cli_evaluate. One region per
cluster comes from nnunet_pvs.cluster_regions, shared with the phantom, the census and change
(`nnunet-pvs evaluate`), cli_cohort (`nnunet-pvs evaluate-cohort`).
User documentation: docs/evaluation.md.
"""
