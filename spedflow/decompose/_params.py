"""Parameters of the decomposition stage (scree + NMF)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check_auto_switch, check_range
from ..errors import ParameterError

__all__ = ["NMFParams", "ScreeParams"]

_INITS = ("nndsvda", "random")


@dataclass(frozen=True)
class ScreeParams:
    """How the scree (explained variance ratio) is computed.

    n_components : int, default 40
        Number of leading singular values computed by the randomised SVD. The
        scree must reach past the largest rank one would ever pick
        (``NMFParams.max_components``) into the noise plateau, so the noise level
        can be read off it.
    n_power_iter : int, default 2
        Power (subspace) iterations of the randomised SVD. Each costs two passes
        over the data; with the flat noise spectrum of Poisson-normalised data the
        error of the leading singular values falls like ``(s_noise/s_k)^(2q+1)``.
        The scree serves to count components above the noise floor, and the
        signflip floor is measured with the same q, so both carry the same bias:
        q = 2 gave the same count as q = 4 on the benchmark sets at half the cost.
    n_oversamples : int, default 10
        Extra random probe vectors (Halko et al. 2011 recommend 5-10).
    seed : int, default 0
        Seed of the random probe matrix (results are deterministic for a seed).
    noise_draws : int, default 3
        Independent random sign flips the signflip noise floor is averaged over.
        One flip's floor varies by ~4 % (standard deviation) from draw to draw on
        sparse diffraction data, enough to move the rank by one or two where the
        scree's tail runs smoothly into the noise; the mean of three has 1/sqrt(3)
        of that spread. Each draw adds a sign flip and a matrix product per chunk
        and pass (no extra pass over the data) and an N x (n_components +
        n_oversamples) array in memory; at most 20.
    """

    n_components: int = 40
    n_power_iter: int = 2
    n_oversamples: int = 10
    seed: int = 0
    noise_draws: int = 3

    def __post_init__(self):
        check_range("n_components", self.n_components, low=1, integer=True)
        check_range("n_power_iter", self.n_power_iter, low=0, high=50, integer=True)
        check_range("n_oversamples", self.n_oversamples, low=0, integer=True)
        check_range("seed", self.seed, low=0, integer=True)
        check_range("noise_draws", self.noise_draws, low=1, high=20, integer=True)


@dataclass(frozen=True)
class NMFParams:
    """Parameters of the non-negative matrix factorisation.

    n_components : int or None, default None
        Number of components E. None: chosen from the scree by
        :func:`choose_n_components` (components above the noise edge).
    max_components : int, default 30
        Upper bound of the automatic choice (the paper needed 11 for 6 crystal
        orientations + film + vacuum; 30 leaves room for split crystals).
    beam_mask_radius : float or None, default None
        Radius (detector pixels) of the central disc excluded from the
        decomposition. None: :func:`default_beam_mask_radius` of the measured
        direct-beam radius.
    max_epochs : int, default 300
        Maximum passes over the data (one pass = one W and one H update).
    tol : float, default 1e-4
        Stop when the relative decrease of the Frobenius loss over one epoch is
        below ``tol`` (sklearn's default; the loss is dominated by the noise floor,
        so smaller improvements do not change the factors visibly).
    w_sweeps : int, default 2
        HALS sweeps over the loadings of a row chunk per epoch (cheap: uses the
        ``X_c H^T`` product computed once per pass).
    h_sweeps : int, default 2
        HALS sweeps over the factors per epoch, from the summed statistics.
    init : {"nndsvda", "random"}, default "nndsvda"
        Initialisation: NNDSVD with zeros filled by the data mean (Boutsidis &
        Gallopoulos 2008) from a randomised SVD, or seeded random values.
    seed : int, default 0
        Seed for the randomised SVD / random initialisation.
    extra_components : float, default 1/3
        With the automatic choice, NMF gets ``ceil(E_svd * (1 + extra_components))``
        components, where ``E_svd`` is the number above the scree's noise floor: the
        non-negative rank of a signal is at least its rank and in practice larger
        (NMF splits a crystal whose intensity varies with thickness or bending, and
        needs parts for overlaps); the correlation merging joins split parts again.
        The paper used 11 components where its scree showed about 8.
    min_spot_fraction : float, default 0.15
        Components whose pattern has less than this share of its energy outside
        circular symmetry about the beam are set aside as vacuum / glare / film
        (see :func:`spedflow.decompose.classify_components`: crystal components
        with a strong beam halo or film ring mixed in measure from ~0.13 up).
    max_coverage : float, default 1/3
        Components whose loading stands out from its pedestal (by 10 % of the way
        to its maximum, :func:`spedflow.decompose.loading_coverage`) over more than
        this fraction of the scan are set aside as support (film, vacuum) or as a
        mixture dominated by it, unless their spots dominate their pattern: nanocrystal segmentation is
        asked of scans in which each crystal occupies a minority of the positions,
        while the film and the vacuum are everywhere else. Components whose spots
        dominate their pattern (``crystal_spot_fraction``) are kept, however large.
    crystal_spot_fraction : float, default 2/3
        Components whose spots hold at least this share of their pattern's energy
        (twice the circularly symmetric part) are crystals however much of the scan
        they cover: a crystal, or a pair of one orientation, over more than
        ``max_coverage`` of it. A mixture of spots with the support, which the
        coverage rule is for, carries the film's ring and the beam's halo: the 32
        spotty components over a third of the scan in the benchmark suites measured
        0.18-0.57 (one of them a crystal), the large crystals of scans of three or four
        crystals 0.76-0.94. 1 applies the coverage rule to every component.
    min_coherence : float, default 0.5
        Components whose loading map, where it is strong, is less than this fraction
        as spatially coherent as a compact region of that size
        (:func:`spedflow.decompose.spatial_coherence`) are set aside as noise: below
        0.5 the map's pixel-to-pixel noise is comparable with its structure there, as
        in the spare components NMF fits to counting noise at low dose (on the
        benchmark sets every crystal measured 0.90 or more, most noise components
        less than 0.2). 0 keeps them all.
    dark_level : float or None, default None
        Data units subtracted from every reading before the Poisson scaling: the dark
        level (offset) of a camera that reads it with no electron, left in the data.
        None: measured from the detector's noise (:func:`spedflow.workflows._common.dark_level`;
        0 for counting detectors and dark-subtracted cameras). 0: none.
    gain : float or None, default None
        Data units per detector count (electron), taken out of the Poisson scaling so
        that the factorisation sees counts (``resolved.count_unit``). None: measured
        from the detector's noise, and 1 where the data cannot tell it (a relative
        error above 0.1, warned about by the VDF workflow; an 8-bit camera whose pixels
        sit at its dark level). Give it for such a camera.
    normalize : bool or "auto", default "auto"
        Divide every component's loading map by each pattern's dose (its total counts
        over the scan's median total), as ``vdf.normalize`` does the VDF images: a beam
        current that varies during the scan scales each pattern's loadings with it.
        "auto": where the totals spread beyond counting noise by more than
        :data:`spedflow.vdf.DOSE_SPREAD` (10 %) and more than that noise, the gain is
        given (``gain``) or measured, the beam is seen and not clipped
        (:func:`spedflow.vdf.dose_normalised`).
    """

    n_components: int | None = None
    max_components: int = 30
    beam_mask_radius: float | None = None
    max_epochs: int = 300
    tol: float = 1e-4
    w_sweeps: int = 2
    h_sweeps: int = 2
    init: str = "nndsvda"
    seed: int = 0
    extra_components: float = 1.0 / 3.0
    min_spot_fraction: float = 0.15
    max_coverage: float = 1.0 / 3.0
    crystal_spot_fraction: float = 2.0 / 3.0
    min_coherence: float = 0.5
    dark_level: float | None = None
    gain: float | None = None
    normalize: bool | str = "auto"

    def __post_init__(self):
        check_range("n_components", self.n_components, low=1, integer=True, allow_none=True)
        check_range("max_components", self.max_components, low=1, integer=True)
        if self.n_components is not None and self.n_components > self.max_components:
            raise ParameterError(f"`n_components` ({self.n_components}) must be <= "
                                 f"`max_components` ({self.max_components})")
        check_range("beam_mask_radius", self.beam_mask_radius, low=0, allow_none=True)
        check_range("max_epochs", self.max_epochs, low=1, integer=True)
        check_range("tol", self.tol, low=0, high=1, low_open=True, high_open=True)
        check_range("w_sweeps", self.w_sweeps, low=1, high=100, integer=True)
        check_range("h_sweeps", self.h_sweeps, low=1, high=100, integer=True)
        if self.init not in _INITS:
            raise ParameterError(f"`init` must be one of {', '.join(_INITS)} (got {self.init!r})")
        check_range("seed", self.seed, low=0, integer=True)
        check_range("dark_level", self.dark_level, low=0, allow_none=True)
        check_range("gain", self.gain, low=0, low_open=True, allow_none=True)
        check_auto_switch("normalize", self.normalize)
        check_range("extra_components", self.extra_components, low=0, high=4)
        check_range("min_spot_fraction", self.min_spot_fraction, low=0, high=1)
        check_range("max_coverage", self.max_coverage, low=0, high=1, low_open=True)
        check_range("crystal_spot_fraction", self.crystal_spot_fraction, low=0, high=1)
        check_range("min_coherence", self.min_coherence, low=0)
