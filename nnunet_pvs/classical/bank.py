"""The classical filter suite: the PVS filter families of the literature, each at a few scales.

* ``frangi``: Frangi vesselness (Frangi et al. 1998; for PVS Ballerini et al. 2018, Sepehrband
  et al. 2019), scikit-image's ``frangi``;
* ``sato``: Sato tubeness (Sato et al. 1998), scikit-image's ``sato``; the best filter on our
  T2w-like phantom (oracle Dice 0.448 against Frangi's 0.074, benchmarks/results/phantom_difficulty.md);
* ``tophat``: white (T2w) / black (T1w) morphological top-hat, scikit-image's (``tophat.py``).

Jerman's and RORPO's filters, also compared for PVS (Bernal et al. 2022), are in no maintained
Python library (the reference codes are MATLAB and C++), so they are left out rather than hand-written.

A ``Filter`` is a family with its scales in mm (sigmas for the Hessian filters, one footprint
radius for the top-hat). ``responses`` computes every filter of a suite on one image, sharing
work where the library allows it exactly: Sato's multi-scale response is the voxel-wise maximum
of its one-sigma responses, so each sigma is filtered once. Frangi's is not (scikit-image takes
its gamma from the first sigma of the set), so each Frangi set is filtered as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nnunet_pvs.classical import tophat, vesselness

FAMILIES = ("frangi", "sato", "tophat")

#: sigma sets / radii in mm. PVS are 0.4-3 mm wide; the best sigma for a tube is about its radius.
#: Frangi's are the sets compare has always used (so ``frangi`` reproduces older reports). Sato's are
#: mostly single sigmas: its multi-scale maximum is dominated by the largest sigma (the response is
#: scaled by sigma^2), so on the T2w-like phantom 0.5 mm alone beats the 0.35-0.7 mm set; one
#: two-scale set is kept for wider PVS. Top-hat radii span 1-3 mm (footprints 3-9 voxels at 0.69 mm).
DEFAULT_SCALES: dict[str, tuple[tuple[float, ...], ...]] = {
    "frangi": ((0.5, 1.0), (0.75, 1.5), (1.0, 2.0), (0.5, 1.0, 1.5, 2.0)),
    "sato": ((0.5,), (0.7,), (1.0,), (0.7, 1.4)),
    "tophat": ((1.0,), (1.5,), (2.0,), (3.0,)),
}

#: thresholds per family. Frangi's response lies in [0, 1]; Sato's and the top-hat's are in units of
#: the normalised image (its 99th percentile inside the brain is 1), so one absolute grid transfers
#: from training to held-out subjects. Steps of 9 % (Frangi 19 %, as before).
DEFAULT_THRESHOLDS: dict[str, tuple[float, ...]] = {
    "frangi": tuple(float(t) for t in np.round(np.geomspace(1e-3, 0.95, 40), 6)),
    "sato": tuple(float(t) for t in np.round(np.geomspace(1e-3, 2.0, 90), 6)),
    "tophat": tuple(float(t) for t in np.round(np.geomspace(1e-3, 2.0, 90), 6)),
}


@dataclass(frozen=True)
class Filter:
    family: str
    scales_mm: tuple[float, ...]

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown filter family {self.family!r}; choose from {', '.join(FAMILIES)}")
        if self.family == "tophat" and len(self.scales_mm) != 1:
            raise ValueError("a top-hat has one footprint radius")

    @property
    def scale_text(self) -> str:
        """``0.35 0.7`` (sigmas) or ``r=1.5`` (top-hat radius), in mm."""
        text = " ".join(f"{s:g}" for s in self.scales_mm)
        return f"r={text}" if self.family == "tophat" else text

    def __str__(self) -> str:
        return f"{self.family} {self.scale_text} mm"


def suite(families=FAMILIES, scales: dict | None = None) -> tuple[Filter, ...]:
    """Every filter of the given families at their default (or given) scales, in ``FAMILIES`` order."""
    scales = {**DEFAULT_SCALES, **(scales or {})}
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown filter family {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    return tuple(Filter(fam, tuple(float(x) for x in s)) for fam in FAMILIES if fam in families
                 for s in scales[fam])


def response(f: Filter, image: np.ndarray, spacing, bright: bool) -> np.ndarray:
    """One filter's response (higher = more PVS-like) on a normalised 3D image."""
    if f.family == "frangi":
        return vesselness.frangi_response(image, spacing, f.scales_mm, bright)
    if f.family == "sato":
        return vesselness.sato_response(image, spacing, f.scales_mm, bright)
    return tophat.tophat_response(image, spacing, f.scales_mm[0], bright)


def responses(filters, image: np.ndarray, spacing, bright: bool) -> list[np.ndarray]:
    """Every filter's response on one image, in ``filters`` order; each Sato sigma computed once."""
    one_sigma: dict[float, np.ndarray] = {}
    out = []
    for f in filters:
        if f.family == "sato":
            for s in f.scales_mm:
                if s not in one_sigma:
                    one_sigma[s] = vesselness.sato_response(image, spacing, (s,), bright)
            out.append(np.maximum.reduce([one_sigma[s] for s in f.scales_mm]))
        else:
            out.append(response(f, image, spacing, bright))
    return out
