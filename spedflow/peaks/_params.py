"""Parameters of the peak finder, and how unset ones are derived from the spot radius.

All lengths are detector pixels. ``None`` means "derive from the measured spot
(direct-beam) radius ``r``", done by :func:`resolve`, which the workflow calls once
it has measured ``r``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from scipy.special import ndtri

from ..config import check_range
from ..errors import ParameterError

__all__ = ["PeakParams", "resolve", "default_threshold", "FALSE_PEAKS_PER_PATTERN",
           "MIN_SIGMA"]

#: Noise models of the peak threshold (see :class:`PeakParams`).
NOISE_MODELS = ("counting", "pattern")
#: Expected number of pure-noise peaks per pattern that the default threshold allows.
FALSE_PEAKS_PER_PATTERN = 0.01
#: Smallest LoG scale (px) at which the discrete 5-point Laplacian still approximates
#: the continuous one (its error at the Gaussian's cut-off frequency is ~10 %).
MIN_SIGMA = 0.7


@dataclass(frozen=True)
class PeakParams:
    """Multi-scale Laplacian-of-Gaussian peak finding.

    Attributes
    ----------
    min_sigma, max_sigma : float or None
        Smallest and largest Gaussian scale of the LoG, px. A flat disc of radius
        ``rho`` (or a Gaussian spot of width ``rho / sqrt(2)``) gives its largest
        scale-normalised LoG response at ``sigma = rho / sqrt(2)``. In SPED every
        spot is an image of the same convergence disc as the direct beam, so
        ``None`` gives ``max_sigma = r / sqrt(2)`` (spots as large as the beam) and
        ``min_sigma = r / (2 sqrt(2))`` (half as large: the measured beam radius
        includes its bright, possibly saturated rim, and precession-integrated
        spots are often sharper); both at least ``MIN_SIGMA`` = 0.7 px.
    num_sigma : int
        Number of scales, geometrically spaced from ``min_sigma`` to ``max_sigma``.
        Default 2: all spots have about the same size, so more scales only cost time
        (each costs a full 2-D Gaussian filter of every pattern); two absorb a
        factor-2 error in ``r``.
    threshold : float or None
        Detection threshold in noise units of the LoG response (see ``noise``: the
        counting-noise unit of each ring about the beam, or the robust level of each
        pattern, 1.4826 x the median absolute response, measured per scale), hence
        free of the intensity scale and adapted to each pattern's dose; a skewed
        (gamma) tail is converted to the same tail probability. ``None``: the
        one-sided Gaussian quantile that lets on average
        ``FALSE_PEAKS_PER_PATTERN`` = 0.01 pure-noise pixels per pattern exceed
        it, counting every pixel at every scale as a candidate (a Bonferroni
        bound): ``default_threshold(ky, kx, num_sigma)``, ~5.0 for 128 x 128
        patterns and 2 scales, 5.3 for 256 x 256. The LoG at the spot scale is
        close to the matched filter of a spot, so any spot with matched-filter
        SNR above ~5 is found, however weak relative to the direct beam (the
        reference's threshold relative to the pattern maximum, i.e. the beam,
        loses the weak spots of thin crystals). Resolved from the detector shape
        by :func:`resolve` (``detector_shape``) or by the kernel.
    exclude_border : int or None
        Peaks closer than this to the detector edge (px) are dropped. ``None``:
        ``ceil(sqrt(2) * max_sigma)``, the spot radius: a spot cut by the edge has
        a distorted position and intensity. At least 1.
    noise : {"counting", "pattern"}
        What a noise unit is (the VDF workflow). "counting" (default): the LoG runs on
        each pattern aligned by whole pixels minus its background about the beam
        (ring means with the spots clipped), and the unit follows counting statistics
        ring by ring (:mod:`spedflow.peaks.noise`): the same threshold is the same
        false-alarm rate next to the beam, where the background is tens of counts,
        and in the dark outer rings, where a lone count is no spot. "pattern": the
        paper's DoG first, then one robust level per pattern and scale
        (:func:`~spedflow.peaks.kernels.noise_level`); on sparse counts most of the
        DoG output is exactly 0, and the level then follows the direct beam's response
        rather than the noise.
    gain : float or None
        Data units per detected electron ("counting" only). ``None``: measured, with the
        read-out variance, from neighbouring scan positions
        (:func:`spedflow.peaks.noise.count_scale`); the result's attributes give both
        (``resolved.gain``, ``resolved.read_variance``). Where the data cannot tell it
        (relative standard error above 0.1: nothing but the beam varies, as on an 8-bit
        camera sitting at its dark level) the VDF workflow uses ``noise = "pattern"``
        instead and says so (:func:`spedflow.workflows.vdf.noise_model`).
    read_variance : float or None
        Variance of a reading of 0, data units squared ("counting" only): the read-out
        noise's variance, less ``gain`` times the dark level of a camera whose dark level
        (offset) was not subtracted, so negative for such a camera (a dark level of 20
        units with read-out sigma 3 at 1 unit per count: 9 - 20 = -11). ``None``:
        measured, with the gain, or with the gain held where it is given (0 where the
        scan is too small to measure it on).
    ring_centres : int
        ("counting" only) Where the ring background is drawn about in patterns aligned
        by whole pixels, which leaves the beam up to half a pixel off the pixel grid:
        1 (default), the centre pixel; 3, the nearest of 3 x 3 points a third of a pixel
        apart (:func:`spedflow.peaks.noise.ring_offset_bins`). 3 removes most false
        peaks on the steep flank of the beam and its glare (1.5 -> 0.25 per pattern at
        4-14 px on simulated patterns) and finds reflections next to the beam. On the
        small benchmark sets it gained seed3's weak crystal and precision (foreign sets
        0.977 -> 1.000), but on the 256 x 256 and 512 x 512 scans it lost the weak
        crystal and added fragments, and pass 1 took 7 % longer; see
        ``benchmarks/README.md`` (session 9).
    """

    min_sigma: float | None = None
    max_sigma: float | None = None
    num_sigma: int = 2
    threshold: float | None = None
    exclude_border: int | None = None
    noise: str = "counting"
    gain: float | None = None
    read_variance: float | None = None
    ring_centres: int = 1

    def __post_init__(self):
        check_range("min_sigma", self.min_sigma, low=0.5, high=100, allow_none=True)
        check_range("max_sigma", self.max_sigma, low=0.5, high=100, allow_none=True)
        check_range("num_sigma", self.num_sigma, low=1, high=20, integer=True)
        check_range("threshold", self.threshold, low=0, low_open=True, allow_none=True)
        check_range("exclude_border", self.exclude_border, low=1, integer=True, allow_none=True)
        if self.noise not in NOISE_MODELS:
            raise ParameterError(f"`noise` must be one of {', '.join(NOISE_MODELS)} "
                                 f"(got {self.noise!r})")
        check_range("gain", self.gain, low=0, low_open=True, allow_none=True)
        check_range("read_variance", self.read_variance, allow_none=True)
        if self.ring_centres not in (1, 3) or isinstance(self.ring_centres, bool):
            raise ParameterError(f"`ring_centres` must be 1 or 3 (got {self.ring_centres!r})")
        if (self.min_sigma is not None and self.max_sigma is not None
                and self.min_sigma > self.max_sigma):
            raise ParameterError(f"`min_sigma` ({self.min_sigma}) must be <= `max_sigma` "
                                 f"({self.max_sigma})")

    @property
    def resolved(self) -> bool:
        """True when no field other than ``threshold`` is left to derive."""
        return None not in (self.min_sigma, self.max_sigma, self.exclude_border)


def default_threshold(ky: int, kx: int, num_sigma: int,
                      false_peaks: float = FALSE_PEAKS_PER_PATTERN) -> float:
    """Noise-unit threshold allowing ``false_peaks`` noise peaks per pattern.

    Bonferroni over ``ky * kx * num_sigma`` candidate pixels of a Gaussian noise
    field: ``Phi^-1(1 - false_peaks / (ky kx num_sigma))``.
    """
    # the Gaussian upper quantile norm.isf(q) = -ndtri(q) (scipy.stats costs 0.7 s to import)
    return float(-ndtri(false_peaks / (int(ky) * int(kx) * int(num_sigma))))


def resolve(params: PeakParams, spot_radius: float | None = None, *,
            detector_shape: tuple[int, int] | None = None) -> PeakParams:
    """Fill the ``None`` fields of ``params`` from the spot radius (and detector shape).

    Parameters
    ----------
    params : PeakParams
    spot_radius : float, optional
        Measured radius of the direct-beam disc, px; needed if a scale or the
        border is unset.
    detector_shape : (ky, kx), optional
        Pattern shape; resolves ``threshold`` when given (else it stays ``None``
        and the kernel derives it from the patterns' shape, the same value).

    Returns
    -------
    PeakParams with every derivable field set.
    """
    if not isinstance(params, PeakParams):
        raise ParameterError(f"`params` must be a PeakParams (got {type(params).__name__})")
    need_r = params.min_sigma is None or params.max_sigma is None
    if need_r:
        check_range("spot_radius", spot_radius, low=0, low_open=True)
    s_max = params.max_sigma
    if s_max is None:
        s_max = max(MIN_SIGMA, float(spot_radius) / math.sqrt(2.0))
        if params.min_sigma is not None:
            s_max = max(s_max, params.min_sigma)
    s_min = params.min_sigma
    if s_min is None:
        s_min = min(s_max, max(MIN_SIGMA, float(spot_radius) / (2.0 * math.sqrt(2.0))))
    border = params.exclude_border
    if border is None:
        border = max(1, math.ceil(math.sqrt(2.0) * s_max))
    thr = params.threshold
    if thr is None and detector_shape is not None:
        thr = default_threshold(detector_shape[0], detector_shape[1], params.num_sigma)
    return dataclasses.replace(params, min_sigma=float(s_min), max_sigma=float(s_max),
                               exclude_border=int(border), threshold=thr)
