"""Read the few data patterns the difference figures need, and align them.

Only ``nav_binning**2`` raw patterns per segment are read (one zarr slice each), so
this stays cheap however large the input store is.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._load import ResultView, _pair, find_param

__all__ = ["brightest_positions", "data_patterns_at", "beam_radius", "subtract_radial_median"]


def brightest_positions(maps: np.ndarray) -> np.ndarray:
    """``(S, 2)`` int (y, x) of each segment map's maximum (binned scan pixels)."""
    s = maps.shape[0]
    flat = np.nan_to_num(maps.reshape(s, -1)).argmax(axis=1)
    return np.stack(np.unravel_index(flat, maps.shape[1:]), axis=1).astype(int)


def _bin_detector(p: np.ndarray, shape) -> np.ndarray:
    """Sum-bin a (ky, kx) pattern down to ``shape`` (crop to a multiple first)."""
    fy, fx = p.shape[0] // shape[0], p.shape[1] // shape[1]
    if (fy, fx) == (1, 1) and p.shape == tuple(shape):
        return p
    p = p[:shape[0] * fy, :shape[1] * fx]
    return p.reshape(shape[0], fy, shape[1], fx).sum(axis=(1, 3))


def data_patterns_at(view: ResultView, data, positions: np.ndarray) -> np.ndarray:
    """The binned, aligned data pattern at each binned scan position.

    Parameters
    ----------
    view : ResultView
        The result (for nav_binning, pattern shape and beam centres).
    data : (scan_y, scan_x, ky, kx) zarr or NumPy array
        The input store's raw data (unbinned, not aligned).
    positions : (S, 2) int array
        Binned scan positions (y, x).

    Returns
    -------
    (S, Ky, Kx) float64 array
        Each the sum of the ``nav_binning``-square of raw patterns, detector-binned to the
        result's pattern shape, shifted (linear interpolation) so the beam sits at
        ``(Ky//2, Kx//2)`` using ``beam/fitted`` (else ``beam/centres``; else unshifted).
        The detector pixels the run repaired (``resolved.bad_pixels``) are repaired here too.
    """
    from ..preprocess.kernels import pixels_off_detector, repair_pixels
    by, bx = _pair(view.meta.get("nav_binning"))
    ky, kx = view.pattern_shape
    centres = view.beam_fitted if view.beam_fitted is not None else view.beam_centres
    resolved = view.meta.get("resolved")
    bad = resolved.get("bad_pixels") if isinstance(resolved, dict) else None
    bad = np.asarray(bad, np.int64).reshape(-1, 2) if isinstance(bad, list) and bad else None
    if bad is not None and len(pixels_off_detector(bad, data.shape[2:])):
        bad = None  # not this data's detector: show it as it is
    out = np.zeros((len(positions), ky, kx))
    for i, (y, x) in enumerate(positions):
        raw = np.asarray(data[y * by:(y + 1) * by, x * bx:(x + 1) * bx], np.float64)
        if bad is not None:
            raw = repair_pixels(raw, bad)
        p = _bin_detector(raw.sum(axis=(0, 1)), (ky, kx))
        if centres is not None and y < centres.shape[0] and x < centres.shape[1]:
            cy, cx = (float(c) for c in centres[y, x])
            f = data.shape[2] / ky
            if f > 1 and (cy >= ky or cx >= kx):  # centres given in raw detector pixels
                cy, cx = (cy + 0.5) / f - 0.5, (cx + 0.5) / f - 0.5
            if np.isfinite(cy) and np.isfinite(cx):
                p = ndimage.shift(p, (ky // 2 - cy, kx // 2 - cx), order=1, mode="constant")
        out[i] = p
    return out


def beam_radius(patterns: np.ndarray, params=None) -> float:
    """Radius (px) of the direct-beam disc to leave out of normalised comparisons.

    Twice the half-maximum radius of the azimuthal mean of the summed aligned patterns
    around ``(Ky//2, Kx//2)`` (for a Gaussian-like beam profile, 2 x HWHM leaves ~6 % of
    the peak), or the beam radius from the workflow parameters when that is larger.
    Capped at a quarter of the detector so some of the pattern is always compared.
    """
    s = np.clip(np.nan_to_num(np.asarray(patterns, np.float64)), 0, None).sum(axis=0)
    ky, kx = s.shape
    yy, xx = np.indices(s.shape)
    r = np.hypot(yy - ky // 2, xx - kx // 2).astype(int)
    counts = np.bincount(r.ravel())
    profile = np.bincount(r.ravel(), s.ravel()) / np.maximum(counts, 1)
    radius = 1.0
    if profile[0] > 0:
        below = np.nonzero(profile < 0.5 * profile[0])[0]
        if below.size:
            radius = 2.0 * float(below[0])
    from_params = find_param(params or {}, "beam", "radius")
    if from_params:
        radius = max(radius, from_params)
    return float(min(radius, min(ky, kx) / 4))


def subtract_radial_median(patterns: np.ndarray) -> np.ndarray:
    """Remove the azimuthally symmetric background of each pattern.

    The diffuse background (amorphous film, inelastic and thermal diffuse scattering,
    the beam's tails) depends on the scattering angle only, while Bragg spots occupy a
    small fraction of each ring around the beam: the median over each one-pixel ring is
    the background there. Returns ``max(pattern - ring median, 0)``.

    Parameters
    ----------
    patterns : (S, Ky, Kx) array
        Aligned patterns, beam at ``(Ky//2, Kx//2)``.

    Returns
    -------
    (S, Ky, Kx) float64 array
    """
    a = np.nan_to_num(np.asarray(patterns, np.float64))
    s, ky, kx = a.shape
    yy, xx = np.indices((ky, kx))
    ring = np.rint(np.hypot(yy - ky // 2, xx - kx // 2)).astype(np.int64).ravel()
    n_rings = int(ring.max()) + 1
    order = np.argsort(ring, kind="stable")
    bounds = np.searchsorted(ring[order], np.arange(n_rings + 1))
    flat = a.reshape(s, -1)[:, order]
    med = np.zeros((s, n_rings))
    for r in range(n_rings):  # a few dozen rings, each vectorised over all patterns
        lo, hi = bounds[r], bounds[r + 1]
        if hi > lo:
            med[:, r] = np.median(flat[:, lo:hi], axis=1)
    return np.clip(a - med[:, ring].reshape(s, ky, kx), 0, None)
