"""``nnunet-pvs census``: per-subject PVS burden, per-cluster shape and a visual QC report for nnU-Net
predictions of new scans (see docs/census.md)."""
