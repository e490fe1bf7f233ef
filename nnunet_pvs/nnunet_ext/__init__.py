"""Folder that ``nnUNet_extTrainer`` points at.

nnU-Net (>= 2.8.0) imports every module in this folder as a *top-level* module and looks for the
trainer class by name. The modules here are shims that only re-export trainers from the installed
``nnunet_pvs`` package, so the real code is imported once, under its own name.
"""
