"""Classical (non-learned) PVS baselines: a suite of filters whose choice, scales and threshold are
tuned on training data.

``vesselness`` (Frangi, Sato) and ``tophat`` compute filter responses, ``bank`` is the suite (which
filters at which scales, and their thresholds), ``tuning`` chooses filter, scales and threshold by
mean Dice on training cases and applies them unchanged to others. Pure functions on arrays: reading
and writing files is the caller's business (``nnunet_pvs.compare.classical``).
"""
