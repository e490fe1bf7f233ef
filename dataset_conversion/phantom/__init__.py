"""Synthetic PVS phantom on nilearn's bundled MNI152 template: the default dataset (no download).

Modules: ``anatomy`` (warped template, grid, region labels), ``pvs`` (PVS geometry and burden),
``mimics`` (WMH, sulcal CSF, vessels, lacunes: never labelled), ``rendering`` (partial volume on a
sub-voxel grid), ``imaging`` (intensities, texture, bias field, Rician noise), ``subject`` (one
subject with rater and noise-free labels), ``visits`` (follow-up visits with known PVS changes and
same-session rescans, with head motion), ``dataset`` (nnU-Net raw dataset).
"""

from nnunet_pvs.dataset_conversion.phantom.anatomy import (AGE_RANGE, BG_LABELS, CSF_LABELS, LENTICULAR_LABELS,
                                                           SIZES, SPACING, WM_LABELS)
from nnunet_pvs.dataset_conversion.phantom.dataset import GENERATOR_VERSION, make_phantom_dataset
from nnunet_pvs.dataset_conversion.phantom.subject import PhantomSubject, generate_subject

__all__ = ["AGE_RANGE", "BG_LABELS", "CSF_LABELS", "LENTICULAR_LABELS", "SIZES", "SPACING", "WM_LABELS",
           "GENERATOR_VERSION", "make_phantom_dataset", "PhantomSubject", "generate_subject"]
