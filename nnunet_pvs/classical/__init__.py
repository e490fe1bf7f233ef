"""Classical (non-learned) PVS baselines: Frangi vesselness with scales and threshold tuned on training data.

``vesselness`` computes the filter response, ``tuning`` chooses its scales and threshold by mean
Dice on training cases and applies them unchanged to others. Pure functions on arrays: reading
and writing files is the caller's business (``nnunet_pvs.compare.classical``).
"""
