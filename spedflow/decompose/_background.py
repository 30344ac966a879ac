"""Set aside NMF components that are not crystals (vacuum, detector glare, amorphous film).

Two measurable properties separate them from crystal components:

* **Spot fraction** of the component pattern: the fraction of its energy (sum of
  squares over unmasked pixels) *not* explained by its azimuthal average about
  the direct beam. Bragg spots break circular symmetry: the azimuthal average
  spreads a spot over its whole ring (2 pi g pixels against a spot of a few), so a
  spot pattern keeps nearly all its energy outside the average (fraction ~ 0.9-1).
  The amorphous-film ring, the glare/halo of the direct beam and the vacuum are
  circularly symmetric (fraction ~ 0, plus noise). The default threshold 0.15
  reflects asymmetric costs: a discarded crystal is lost for good, a kept
  background component only adds a segment that later steps can drop (its loading's
  coverage, its spatial coherence, the watershed's ``min_snr``). NMF mixes film ring
  and beam halo into crystal components, and the share it mixes in decides the
  fraction: spots + a ring at 0.3 of the spot height measure ~0.35, and several
  large discs on one ring less still (the ring's average holds a third of their
  energy). Over the 612 NMF components of 33 simulated sets (the foreign and third
  simulators of ``benchmarks/``, two seeds), six crystal components measured 0.13-0.23,
  each with a strong beam halo, a strong film ring or large discs; of the 77 other
  components below 0.25, 67 measured below 0.10, and keeping the ten at 0.10-0.25
  lowered the precision of no group of sets (later steps dropped them). A component
  is therefore set aside only when at least 85 % of its energy is circularly
  symmetric.
* **Coverage** of the loading map: the fraction of scan positions where it stands
  out from its pedestal (see :func:`loading_coverage`). Film and vacuum components
  are spread over most of the scan; a nanocrystal covers a small part. NMF often
  gives a crystal component a low pedestal (about a tenth of its maximum) wherever
  the film is, with some film mixed into its pattern, so the coverage is measured
  above that pedestal (the loading's median: a crystal is absent from most of the
  scan) and not above a fixed fraction of the maximum, which the pedestal exceeds.
  A component spread over more than ``max_coverage`` of the scan is set aside
  unless its spots dominate its pattern: with weak spot contrast (fraction below
  ``strong_spot_fraction`` = 0.5, i.e. mostly symmetric) as textured background,
  with clear spots as support (film, vacuum) or a mixture dominated by it. A
  mixture of crystals' spots with the support carries the film's ring and the beam's
  halo with them, and measured 0.18-0.57 over the benchmark suites (32 components);
  a component whose spots hold at least ``crystal_spot_fraction`` = 2/3 of its
  energy is a crystal larger than the workflow assumes (scans of three or four
  crystals 19-45 positions across: 0.76-0.94) and is kept.

A third property, used by the NMF workflow after these two, separates crystals from
noise: the **spatial coherence** of the loading map where it is strong
(:func:`spatial_coherence`). A crystal spans many neighbouring probe positions, so its
loading at one position predicts its neighbours'; a spare component fitted to counting
noise (at low dose the scree's count of components runs high, and NMF gets a third
more) lights scattered single positions.
"""

from __future__ import annotations

import functools

import numpy as np

from ..config import check_range
from ..errors import ParameterError
from ._poisson import beam_mask

__all__ = ["spot_fraction", "loading_coverage", "spatial_coherence", "classify_components"]


def spot_fraction(factors: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Fraction of each pattern's energy that breaks circular symmetry about the beam.

    Parameters
    ----------
    factors : (E, ky, kx) ndarray, component patterns, beam at (ky//2, kx//2).
    mask : (ky, kx) bool, optional, True = excluded pixels (the direct beam).

    Returns
    -------
    (E,) float64 in [0, 1]; 0 for an all-zero pattern.
    """
    f = np.asarray(factors, np.float64)
    if f.ndim != 3:
        raise ParameterError(f"`factors` must be (E, ky, kx) (got shape {f.shape})")
    ky, kx = f.shape[1:]
    keep = np.ones((ky, kx), bool) if mask is None else ~np.asarray(mask, bool)
    yy, xx = np.indices((ky, kx))
    rbin = np.rint(np.hypot(yy - ky // 2, xx - kx // 2)).astype(np.intp)[keep]
    vals = f[:, keep]                                          # (E, P)
    counts = np.bincount(rbin)
    nb = counts.size
    # azimuthal averages of all components at once: one bincount over (E * nbins)
    idx = (np.arange(f.shape[0])[:, None] * nb + rbin[None]).ravel()
    sums = np.bincount(idx, weights=vals.ravel(), minlength=f.shape[0] * nb).reshape(-1, nb)
    radial = sums / np.maximum(counts, 1)
    resid = vals - radial[:, rbin]
    energy = np.sum(vals ** 2, axis=1)
    out = np.zeros(f.shape[0])
    np.divide(np.sum(resid ** 2, axis=1), energy, out=out, where=energy > 0)
    return out


def loading_coverage(loadings: np.ndarray, level: float = 0.1) -> np.ndarray:
    """Fraction of scan positions where each loading stands out from its pedestal.

    A position counts when the loading exceeds ``min(p + level * (max - p), max / 2)``,
    with the pedestal ``p`` the loading's median. A crystal is absent from most of
    the scan, so its median is the low level NMF leaves outside it (zero, or a
    pedestal where the film is) and only the crystal counts. A component present
    over most of the scan (film, vacuum) has its own level as median; capping the
    threshold at half the maximum then counts every position where it is at least
    at half its peak, so it still covers most of the scan. (A level below 4/9 of the
    peak, where the two thresholds meet for ``level`` = 0.1, is read as a pedestal:
    from the loading alone, such a film is not told from a crystal on a pedestal.)

    Parameters
    ----------
    loadings : (E, Y, X) ndarray.
    level : float in (0, 1)
        Fraction of the way from the pedestal to the maximum.

    Returns
    -------
    (E,) float64; 0 for an all-zero loading.
    """
    w = np.asarray(loadings, np.float64)
    if w.ndim != 3:
        raise ParameterError(f"`loadings` must be (E, Y, X) (got shape {w.shape})")
    check_range("level", level, low=0, high=1, low_open=True, high_open=True)
    flat = w.reshape(w.shape[0], -1)
    peak = flat.max(axis=1, keepdims=True)
    pedestal = np.median(flat, axis=1, keepdims=True)
    cov = np.mean(flat > _stands_out(pedestal, peak, level), axis=1)
    return np.where(peak[:, 0] > 0, cov, 0.0)


def spatial_coherence(loadings: np.ndarray, margin: int = 2) -> np.ndarray:
    """How spatially coherent each loading map is where it is strong, against a compact
    region of that size.

    1. The strong part: where the map smoothed by a Gaussian of 1 position is above
       half its height over the pedestal (the map's median), capped at half its
       maximum as in :func:`loading_coverage` (a crystal filling most of the scan has
       its own level as median).
    2. The map is clipped at 1.5x the strong part's own level (its 90th percentile
       over the pedestal), so that a few hot positions do not decide, and the strong
       part found again on it, then widened by ``margin`` positions.
    3. There, the lag-1 autocorrelation of the clipped map (Moran's I with unit weights,
       pairs of neighbours along both scan axes inside the region) is divided by that of
       a flat digital disc of the same size within its own widened region (averaged over
       sizes within 20 %: a digital disc's edge, and so its value, jumps with its size).

    A crystal's map, a compact region with a smooth thickness profile, measures ~1 (a
    dome up to ~1.3); white noise 0 or less. Noise on a coherent map scales the
    autocorrelation by ``S / (S + N)``, the share of the variance that is signal there:
    a crystal under noise of its own variance measures 0.26-0.72 (20 seeds). Only the
    strong part counts, so the measure does not depend on the size of the scan:
    measured over the whole map, noise spread over a 256 x 256 scan outweighed a
    crystal of 113 positions whose own noise was a tenth of its height (0.28).

    Parameters
    ----------
    loadings : (E, Y, X) ndarray.
    margin : int, >= 2
        Positions added around the strong part.

    Returns
    -------
    (E,) float64; 1 for a map without a finite maximum above its median (nothing to
    judge).
    """
    from scipy import ndimage as ndi
    if np.ndim(loadings) != 3:
        raise ParameterError(f"`loadings` must be (E, Y, X) (got shape {np.shape(loadings)})")
    check_range("margin", margin, low=2, integer=True)
    out = np.ones(np.shape(loadings)[0])
    for i in range(len(out)):  # one map at a time: E scan-sized float64 maps can be large
        w = np.asarray(loadings[i], np.float64)
        if w.size == 0 or not np.isfinite(w).all():
            continue
        pedestal = float(np.median(w))
        core = _strong_part(w, pedestal)
        if core is None:
            continue
        # a few hot positions must not decide: clip at 1.5x the strong part's own level
        level = float(np.percentile(w[core], 90))
        w = np.minimum(w, pedestal + 1.5 * (level - pedestal))
        core = _strong_part(w, pedestal)
        if core is None:
            continue
        region = ndi.binary_dilation(core, iterations=int(margin))
        ref = _disc_reference(int(core.sum()), int(margin))
        out[i] = _moran(w, region) / ref
    return out


def _strong_part(w: np.ndarray, pedestal: float):
    """Where ``w`` smoothed by a Gaussian of 1 position is above half its height over
    ``pedestal``, capped at half its maximum (None if it has no height)."""
    from scipy import ndimage as ndi
    smooth = ndi.gaussian_filter(w, 1.0, mode="nearest")
    peak = float(smooth.max())
    if not peak > pedestal:
        return None
    return smooth > _stands_out(pedestal, peak, 0.5)


def _stands_out(pedestal, peak, level: float):
    """The level above which a loading stands out from its pedestal: ``level`` of the way
    from the pedestal to the peak, capped at half the peak (a component present over
    most of the scan has its own level as pedestal; see :func:`loading_coverage`)."""
    return np.minimum(pedestal + level * (peak - pedestal), 0.5 * peak)


def _moran(w: np.ndarray, region: np.ndarray) -> float:
    """Lag-1 autocorrelation of ``w`` over ``region`` (pairs of 4-neighbours inside it)."""
    x = w[region]
    d = np.where(region, w - x.mean(), 0.0)
    var = float(np.mean((x - x.mean()) ** 2))
    pairs_y = region[1:, :] & region[:-1, :]
    pairs_x = region[:, 1:] & region[:, :-1]
    n_pairs = int(pairs_y.sum() + pairs_x.sum())
    if var == 0 or n_pairs == 0:
        return 1.0
    cov = (d[1:, :] * d[:-1, :])[pairs_y].sum() + (d[:, 1:] * d[:, :-1])[pairs_x].sum()
    return float(cov / n_pairs / var)


@functools.lru_cache(maxsize=2048)
def _disc_moran(n: int, margin: int) -> float:
    """:func:`_moran` of a flat digital disc of ``n`` positions (the ``n`` nearest its
    centre) over the disc widened by ``margin``."""
    from scipy import ndimage as ndi
    n = max(n, 1)
    h = int(np.sqrt(n / np.pi)) + margin + 2
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    order = np.argsort(np.hypot(yy, xx).ravel(), kind="stable")
    disc = np.zeros(yy.size, bool)
    disc[order[:n]] = True
    disc = disc.reshape(yy.shape)
    return _moran(disc.astype(np.float64), ndi.binary_dilation(disc, iterations=margin))


@functools.lru_cache(maxsize=256)
def _disc_reference(n: int, margin: int) -> float:
    """:func:`_disc_moran` averaged over disc sizes within 20 % of ``n`` (at least 9,
    at most 400 positions: beyond, the value has settled at ~0.65 for margin 2)."""
    n = min(max(n, 9), 400)
    sizes = range(max(9, int(0.8 * n)), int(1.2 * n) + 1)
    return float(np.mean([_disc_moran(k, margin) for k in sizes]))


#: How :func:`classify_components` begins the reason of a spotty component set aside for
#: its coverage (the NMF workflow then suggests raising ``nmf.max_coverage``).
SUPPORT_REASON = "present over more of the scan than one crystal"


def classify_components(factors: np.ndarray, loadings: np.ndarray, *,
                        beam_radius: float | None = None, mask: np.ndarray | None = None,
                        min_spot_fraction: float = 0.15, strong_spot_fraction: float = 0.5,
                        max_coverage: float = 0.9, crystal_spot_fraction: float = 2 / 3,
                        level: float = 0.1) -> list[tuple[bool, str]]:
    """Decide which NMF components are crystals (keep) and which are background.

    Parameters
    ----------
    factors : (E, ky, kx) ndarray, component patterns (beam at the centre).
    loadings : (E, Y, X) ndarray, loading maps.
    beam_radius : float, optional
        Measured direct-beam radius (px): the beam region (:func:`beam_mask` with
        the default radius) is left out of the spot fraction. Ignored if ``mask``.
    mask : (ky, kx) bool, optional, explicit excluded pixels.
    min_spot_fraction : float, default 0.15
        Below it the pattern is circularly symmetric: vacuum/glare/film.
    strong_spot_fraction : float, default 0.5
        Names the reason a component covering more than ``max_coverage`` is set
        aside: below it textured background, above it support or a mixture with it.
    max_coverage : float, default 0.9
        Coverage (:func:`loading_coverage`) above which a component is set aside,
        unless its spot fraction reaches ``crystal_spot_fraction``.
    crystal_spot_fraction : float, default 2/3
        Spot fraction from which a component is a crystal whatever its coverage
        (spots with twice the energy of the symmetric part); 1: none is.
    level : float, default 0.1
        Coverage level, fraction of the way from the pedestal to the maximum.

    Returns
    -------
    list of (keep, reason), one per component, reason a short sentence with the
    measured spot fraction and coverage.
    """
    f = np.asarray(factors)
    w = np.asarray(loadings)
    if f.ndim != 3 or w.ndim != 3 or f.shape[0] != w.shape[0]:
        raise ParameterError(f"`factors` (E, ky, kx) and `loadings` (E, Y, X) must have the same E "
                             f"(got shapes {f.shape} and {w.shape})")
    for name, v in (("min_spot_fraction", min_spot_fraction),
                    ("strong_spot_fraction", strong_spot_fraction), ("max_coverage", max_coverage),
                    ("crystal_spot_fraction", crystal_spot_fraction)):
        check_range(name, v, low=0, high=1)
    if mask is None and beam_radius is not None:
        mask = beam_mask(f.shape[1:], beam_radius=beam_radius)
    if mask is not None and np.shape(mask) != f.shape[1:]:
        raise ParameterError(f"`mask` (shape {np.shape(mask)}) must have the pattern shape {f.shape[1:]}")
    spots = spot_fraction(f, mask)
    cover = loading_coverage(w, level)
    out = []
    for s, c, fe, we in zip(spots, cover, f.reshape(f.shape[0], -1).any(1),
                            w.reshape(w.shape[0], -1).any(1)):
        what = f"spot fraction {s:.2f}, coverage {c:.2f}"
        if not (fe and we):
            out.append((False, f"empty component ({what})"))
        elif s < min_spot_fraction:
            out.append((False, f"diffuse, circularly symmetric pattern: vacuum/glare/film ({what})"))
        elif c > max_coverage and s >= crystal_spot_fraction:
            out.append((True, f"crystal larger than max_coverage: its spots hold most of its "
                              f"pattern's energy ({what})"))
        elif s < strong_spot_fraction and c > max_coverage:
            out.append((False, f"weak spots spread over the whole scan: textured background ({what})"))
        elif c > max_coverage:
            out.append((False, f"{SUPPORT_REASON}: support (film, "
                               f"vacuum) or a mixture dominated by it ({what})"))
        else:
            out.append((True, f"crystal: spots break circular symmetry ({what})"))
    return out
