"""The aseg label vocabulary (FreeSurfer's ``aseg``, also SynthSeg's output), written once for the project.

The region masks of evaluation and census, the region maps of ``nnunet-pvs regions``, the phantom's
label maps and the previews all speak this numbering; each reads its labels from here. Pairs are
(left, right). Source: FreeSurferColorLUT.txt.
"""

from __future__ import annotations

STRUCTURES: dict[str, tuple[int, ...]] = {
    "cerebral_white_matter": (2, 41),
    "cortex": (3, 42),
    "lateral_ventricle": (4, 43),
    "thalamus": (10, 49),
    "caudate": (11, 50),
    "putamen": (12, 51),
    "pallidum": (13, 52),
    "accumbens": (26, 58),
    "csf": (24,),
    "wm_hypointensities": (77, 78, 79),  # 77 unlateralised; 78/79 left/right
}

CEREBRAL_WHITE_MATTER = STRUCTURES["cerebral_white_matter"]
LATERAL_VENTRICLES = STRUCTURES["lateral_ventricle"]
PUTAMEN = STRUCTURES["putamen"]
PALLIDUM = STRUCTURES["pallidum"]
CSF = STRUCTURES["csf"][0]
# basal ganglia as Boutinaud et al. 2021 count them: thalamus, caudate, putamen, pallidum, accumbens
BASAL_GANGLIA = tuple(sorted(sum((STRUCTURES[s] for s in ("thalamus", "caudate", "putamen", "pallidum",
                                                           "accumbens")), ())))
# the lentiform nucleus (putamen + pallidum), where basal-ganglia PVS concentrate
LENTICULAR = tuple(sorted(PUTAMEN + PALLIDUM))
# the evaluation's white matter: cerebral white matter and the hypointensities FreeSurfer/SynthSeg label in it
WHITE_MATTER = CEREBRAL_WHITE_MATTER + STRUCTURES["wm_hypointensities"]
# every CSF label: lateral ventricles and extra-ventricular CSF
CSF_ALL = LATERAL_VENTRICLES + (CSF,)
