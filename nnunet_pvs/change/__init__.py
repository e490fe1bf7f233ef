"""``nnunet-pvs change``: PVS change per subject between two visits, cluster by cluster.

Modules, in the order a subject goes through them: :mod:`~nnunet_pvs.change.pairs` (which
predictions and images belong together), :mod:`~nnunet_pvs.change.register` (rigid registration,
follow-up maps into baseline space), :mod:`~nnunet_pvs.change.tracks` (matching clusters across
visits, status of each track), :mod:`~nnunet_pvs.change.case` (one subject), :mod:`~nnunet_pvs.change.resume`
(per-subject results, skipped on a re-run), :mod:`~nnunet_pvs.change.report` (cohort tables and
report.html), :mod:`~nnunet_pvs.change.cli` (the command).
"""
