"""Parameters of the preprocessing stage and how the data-derived ones are filled in."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..config import check_range
from ..errors import ParameterError

__all__ = ["PreprocessParams", "resolve", "DESCAN_MODES", "DOG_LOW_PER_RADIUS",
           "DOG_HIGH_PER_RADIUS"]

#: Descan models: per-pattern measured centre, a plane, a quadratic in scan position.
DESCAN_MODES = {"none": None, "plane": 1, "quadratic": 2}

#: ``sigma_low = DOG_LOW_PER_RADIUS * spot radius`` (see :class:`PreprocessParams`).
DOG_LOW_PER_RADIUS = 0.5
#: ``sigma_high = DOG_HIGH_PER_RADIUS * spot radius`` (see :class:`PreprocessParams`).
DOG_HIGH_PER_RADIUS = 4.0


def _check_bad_pixels(value):
    """``bad_pixels`` as "auto", "none" or a sorted tuple of distinct (ky, kx) pairs."""
    if isinstance(value, str):
        if value not in ("auto", "none"):
            raise ParameterError(f'`bad_pixels` must be "auto", "none" or a list of [ky, kx] '
                                 f"pixels (got {value!r})")
        return value
    try:
        pairs = [tuple(p) for p in value]
    except TypeError:
        pairs = None
    if pairs is None or any(len(p) != 2 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in p)
            for p in pairs):
        raise ParameterError(f'`bad_pixels` must be "auto", "none" or a list of [ky, kx] pairs '
                             f"of whole numbers >= 0 (got {value!r})")
    return tuple(sorted({(int(a), int(b)) for a, b in pairs}))


@dataclass(frozen=True)
class PreprocessParams:
    """Navigation binning, direct-beam alignment and background removal.

    ``None`` means "derive from the data"; :func:`resolve` fills those fields from the
    measured direct-beam radius ``R`` (half-width at half-maximum of the beam disc,
    detector pixels). In SPED the probe convergence sets both the beam disc and every
    Bragg spot, so ``R`` is the natural length scale of the patterns.

    Attributes
    ----------
    nav_binning : int, default 1
        Sum ``nav_binning x nav_binning`` scan positions (counts are kept). 1 = none.
    detector_binning : int, default 1
        Sum ``detector_binning x detector_binning`` detector pixels of every pattern
        (counts are kept; it must divide the detector's sides). 1 = none. For large
        detectors (512 x 512 and up), whose spots span many pixels: segmentation needs
        the spots resolved, not sampled finely, and every pass and the NMF's matrix
        shrink by the square of the factor. Bad pixels are repaired before binning
        (``bad_pixels`` lists raw detector pixels); every other length (beam radius,
        sigmas, VDF radius, and fixed tolerances such as ``merge.friedel_tolerance``,
        which binning makes coarser in raw pixels) and the result's vectors and
        patterns are in binned pixels.
    align : bool, default True
        Shift every pattern so its direct beam sits at ``(ky // 2, kx // 2)``.
    descan : {"none", "plane", "quadratic"}, default "quadratic"
        Which centres the alignment uses: each pattern's own measured centre
        ("none"), or a robust polynomial fit of the centres over the scan (order 1 or
        2). Descan from the scan coils is a smooth function of the probe position, and
        a robust fit removes the jitter and the mis-found centres (vacuum edges,
        thick crystals) that per-pattern centres carry; quadratic covers the
        usual pivot-point misalignment, a plane is safer on small scans.
    beam_radius : float or None, default None
        Direct-beam radius, detector pixels. None: measured from the data, the
        half-maximum radius of the beam's radial profile (the VDF workflow measures it
        on a sample of chunks before its first pass; for a clipped beam whose half
        maximum lies in its glare, the diffraction spots' radius is used:
        :func:`spedflow.workflows._common.radius_of_frames`).
    dog_sigma_low : float or None, default None
        Width of the small Gaussian of the difference of Gaussians, detector pixels.
        None: ``0.5 * R``. The small blur only decides where the pattern stands above
        its background; a Gaussian of sigma R/2 has a FWHM of about R (the spot's own
        size), so it averages Poisson noise over a spot without merging neighbouring
        spots or broadening them by more than ~15 %.
    dog_sigma_high : float or None, default None
        Width of the background Gaussian, detector pixels. None: ``4 * R``. A spot of
        Gaussian width ``s ~ R / 1.18`` raises a Gaussian background estimate of width
        ``S`` at its own centre by ``s**2 / (s**2 + S**2)`` of its peak: about 4 % for
        ``S = 4 R``, so spots lose little intensity, while background structure wider
        than a few spot radii (diffuse halo around the beam, amorphous-film rings) is
        still followed. The reference used 1.7 / 13.2 px on ~3 px spots, i.e. about
        the same ratios.
    bad_pixels : "auto", "none" or list of [ky, kx], default "auto"
        Detector pixels replaced in every pattern by the mean of their good neighbours
        before anything else. "auto": those found on the chunks the beam radius is
        measured on (:func:`spedflow.preprocess.kernels.find_bad_pixels`): hot pixels,
        brighter than 8x every neighbour in at least half the patterns and in the mean
        pattern, and dead ones, as dark where their neighbours are lit. A hot pixel
        sits at the same place in every pattern: the beam finder takes it for the beam
        and the peak finder for a spot of every crystal. A list gives the pixels
        instead (a detector's known defects; ``[]`` or "none": no repair).
    """

    nav_binning: int = 1
    detector_binning: int = 1
    align: bool = True
    descan: str = "quadratic"
    beam_radius: float | None = None
    dog_sigma_low: float | None = None
    dog_sigma_high: float | None = None
    bad_pixels: str | tuple = "auto"

    def __post_init__(self):
        object.__setattr__(self, "bad_pixels", _check_bad_pixels(self.bad_pixels))
        check_range("nav_binning", self.nav_binning, low=1, integer=True)
        check_range("detector_binning", self.detector_binning, low=1, integer=True)
        if not isinstance(self.align, bool):
            raise ParameterError(f"`align` must be true or false (got {self.align!r})")
        if self.descan not in DESCAN_MODES:
            raise ParameterError(
                f"`descan` must be one of {', '.join(DESCAN_MODES)} (got {self.descan!r})")
        check_range("beam_radius", self.beam_radius, low=0.5, allow_none=True)
        check_range("dog_sigma_low", self.dog_sigma_low, low=0, low_open=True, allow_none=True)
        check_range("dog_sigma_high", self.dog_sigma_high, low=0, low_open=True,
                    allow_none=True)
        if (self.dog_sigma_low is not None and self.dog_sigma_high is not None
                and self.dog_sigma_high <= self.dog_sigma_low):
            raise ParameterError(
                f"`dog_sigma_high` ({self.dog_sigma_high}) must be larger than "
                f"`dog_sigma_low` ({self.dog_sigma_low})")

    @property
    def descan_order(self) -> int | None:
        """Polynomial order of the descan model (None for per-pattern centres)."""
        return DESCAN_MODES[self.descan]

    @property
    def resolved(self) -> bool:
        """True when no field is left to derive from the data."""
        return None not in (self.beam_radius, self.dog_sigma_low, self.dog_sigma_high)


def resolve(params: PreprocessParams, beam_radius: float | None = None) -> PreprocessParams:
    """Fill the ``None`` fields of ``params`` from the measured beam radius.

    Parameters
    ----------
    params : PreprocessParams
    beam_radius : float, optional
        Measured direct-beam radius, detector pixels (of the binned data; binning the
        scan does not change the detector). Ignored when ``params.beam_radius`` is set.

    Returns
    -------
    PreprocessParams
        With ``beam_radius``, ``dog_sigma_low`` and ``dog_sigma_high`` all set.
    """
    radius = params.beam_radius if params.beam_radius is not None else beam_radius
    if radius is None:
        raise ParameterError("`beam_radius` must be measured or given to resolve the "
                             "preprocessing parameters (got None)")
    check_range("beam_radius", radius, low=0.5)
    radius = float(radius)
    low = params.dog_sigma_low
    high = params.dog_sigma_high
    if low is None:
        low = DOG_LOW_PER_RADIUS * radius
        if high is not None:
            low = min(low, high / 2)
    if high is None:
        high = max(DOG_HIGH_PER_RADIUS * radius, 2 * low)
    return dataclasses.replace(params, beam_radius=radius, dog_sigma_low=float(low),
                               dog_sigma_high=float(high))
