"""nnunet-pvs: perivascular-space segmentation methods as nnU-Net v2 plugin trainers.

Trainers are found by stock nnU-Net through ``nnUNet_extTrainer`` (see ``nnunet-pvs env``).
"""

__version__ = "0.1.0"
