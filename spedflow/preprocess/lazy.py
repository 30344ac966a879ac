"""Lazy (dask) wrappers of the preprocessing kernels.

Each wrapper validates its arguments, builds one ``map_blocks``/``blockwise`` layer with
``dtype=`` and ``meta=``, and never computes. Data are ``(scan_y, scan_x, ky, kx)`` dask
arrays with whole patterns in every chunk (rechunked here if they are not).

Typical sequence (the workflow layer computes the small intermediate results)::

    data = bin_nav(data, p.nav_binning)
    c0 = beam_centres(data).compute()                 # provisional radius from the mean
    r = float(estimate_beam_radius(data, c0).compute())
    measured = beam_centres(data, r).compute()
    used, fit = kernels.centres_for_alignment(measured, p.descan)
    p = resolve(p, r)
    clean = preprocess(data, used, p)                 # aligned + background removed
    aligned = align(data, used)                       # for NMF
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

from .._heap import task_reusing_heap
from ..errors import ParameterError
from . import kernels
from ._params import PreprocessParams

__all__ = ["bin_nav", "bin_detector", "beam_centres", "estimate_beam_radius", "shift_patterns", "align",
           "subtract_background_dog", "preprocess"]


# ---------------------------------------------------------------------- validation

# the kernels as dask task functions that reuse the heap for their batch temporaries
# (spedflow._heap); they keep the kernels' names
_shift_patterns = task_reusing_heap(kernels.shift_patterns)
_subtract_background_dog = task_reusing_heap(kernels.subtract_background_dog)
_shift_and_subtract = task_reusing_heap(kernels.shift_and_subtract)


def _check_data(data, name: str = "data") -> da.Array:
    if not isinstance(data, da.Array):
        raise TypeError(f"`{name}` must be a dask array (got {type(data).__name__})")
    if data.ndim != 4:
        raise ParameterError(f"`{name}` must be 4-D (scan_y, scan_x, ky, kx); got shape {data.shape}")
    if 0 in data.shape:
        raise ParameterError(f"`{name}` is empty (shape {data.shape})")
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise ParameterError(f"`{name}` must be numeric (got dtype {data.dtype})")
    if len(data.chunks[2]) > 1 or len(data.chunks[3]) > 1:  # whole patterns per chunk
        data = data.rechunk({2: -1, 3: -1})
    return data


def _check_centres(centres, data: da.Array, name: str = "centres") -> np.ndarray:
    c = np.asarray(centres, dtype=np.float64)
    if c.shape != data.shape[:2] + (2,):
        raise ParameterError(f"`{name}` must have shape {data.shape[:2] + (2,)} "
                             f"(scan_y, scan_x, 2); got {c.shape}")
    if not np.isfinite(c).all():
        raise ParameterError(f"`{name}` must be finite everywhere "
                             f"({int((~np.isfinite(c)).any(-1).sum())} positions are not)")
    return c


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ParameterError(f"`{name}` must be a number (got {value!r})")
    if not (np.isfinite(value) and value > 0):
        raise ParameterError(f"`{name}` must be > 0 (got {value!r})")


def _check_sigmas(sigma_low, sigma_high):
    _check_positive("sigma_low", sigma_low)
    _check_positive("sigma_high", sigma_high)
    if sigma_high <= sigma_low:
        raise ParameterError(f"`sigma_high` ({sigma_high}) must be larger than "
                             f"`sigma_low` ({sigma_low})")


def _centres_like(centres: np.ndarray, data: da.Array) -> da.Array:
    return da.from_array(centres, chunks=(data.chunks[0], data.chunks[1], 2))


_META4 = np.empty((0, 0, 0, 0), np.float32)


# ----------------------------------------------------------------------- binning

def bin_nav(data: da.Array, factor: int) -> da.Array:
    """Sum ``factor x factor`` scan positions (counts kept).

    Parameters
    ----------
    data : (scan_y, scan_x, ky, kx) dask.array.Array
    factor : int
        Must divide both scan dimensions (crop the scan first otherwise).

    Returns
    -------
    (scan_y // factor, scan_x // factor, ky, kx) dask.array.Array of float32
        ``factor == 1`` returns ``data`` cast to float32.
    """
    data = _check_data(data)
    _check_factor(factor)
    sy, sx = data.shape[:2]
    if sy % factor or sx % factor:
        raise ParameterError(f"nav binning `factor` {factor} does not divide the scan shape "
                             f"({sy}, {sx}); crop the scan or choose a divisor")
    if factor == 1:
        return data.astype(np.float32)

    def _multiple(chunks):
        c = max(factor, (max(chunks) // factor) * factor)
        return c

    data = data.rechunk((_multiple(data.chunks[0]), _multiple(data.chunks[1]), -1, -1))
    chunks = (tuple(c // factor for c in data.chunks[0]),
              tuple(c // factor for c in data.chunks[1])) + data.chunks[2:]
    return data.map_blocks(kernels.bin_nav, factor, chunks=chunks, dtype=np.float32,
                           meta=_META4)


def _check_factor(factor) -> None:
    """A binning factor must be a whole number >= 1 (one-line ParameterError)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ParameterError(f"`factor` must be a whole number >= 1 (got {factor!r})")


def bin_detector(data: da.Array, factor: int) -> da.Array:
    """Sum ``factor x factor`` detector pixels of every pattern (counts kept): a large
    detector's patterns at the resolution the segmentation needs.

    Parameters
    ----------
    data : (scan_y, scan_x, ky, kx) dask.array.Array
        Chunked in whole patterns.
    factor : int
        Must divide both detector dimensions.

    Returns
    -------
    (scan_y, scan_x, ky // factor, kx // factor) dask.array.Array of float32
        ``factor == 1`` returns ``data`` cast to float32.
    """
    data = _check_data(data)
    _check_factor(factor)
    ky, kx = data.shape[2:]
    if ky % factor or kx % factor:
        raise ParameterError(f"detector binning `factor` {factor} does not divide the detector "
                             f"shape ({ky}, {kx}); choose a divisor")
    if factor == 1:
        return data.astype(np.float32)
    data = data.rechunk({2: -1, 3: -1})
    return data.map_blocks(kernels.bin_detector, factor, dtype=np.float32, meta=_META4,
                           chunks=data.chunks[:2] + ((ky // factor,), (kx // factor,)))


# ------------------------------------------------------------------- beam centres

def beam_centres(data: da.Array, beam_radius: float | None = None) -> da.Array:
    """Sub-pixel direct-beam centre of every pattern (see :func:`kernels.beam_centres`).

    Parameters
    ----------
    data : (scan_y, scan_x, ky, kx) dask.array.Array
    beam_radius : float, optional
        Beam radius, detector pixels. None: a provisional radius is measured from the
        mean pattern of the whole data set (one extra reduction in the graph).

    Returns
    -------
    (scan_y, scan_x, 2) dask.array.Array of float64
        ``(ky, kx)`` centres; NaN for patterns without signal.
    """
    data = _check_data(data)
    meta = np.empty((0, 0, 0), np.float64)
    if beam_radius is not None:
        _check_positive("beam_radius", beam_radius)
        return da.blockwise(kernels.beam_centres, "ijm", data, "ijkl", new_axes={"m": 2},
                            concatenate=True, dtype=np.float64, meta=meta,
                            beam_radius=float(beam_radius))
    mean = data.mean(axis=(0, 1), dtype=np.float64).astype(np.float32)

    def _with_ref(block, ref):
        return kernels.beam_centres(block, None, reference=ref)

    return da.blockwise(_with_ref, "ijm", data, "ijkl", mean, "kl", new_axes={"m": 2},
                        concatenate=True, dtype=np.float64, meta=meta)


def estimate_beam_radius(data: da.Array, centres, max_radius: float | None = None) -> da.Array:
    """Direct-beam radius from the radial profile summed over all patterns.

    A process / merge / finalize reduction: :func:`kernels.beam_profile` per chunk,
    summed (:func:`kernels.merge_profiles`), then :func:`kernels.radius_from_profile`.

    Parameters
    ----------
    data : (scan_y, scan_x, ky, kx) dask.array.Array
    centres : (scan_y, scan_x, 2) array
        Beam centres (NaN entries are skipped).
    max_radius : float, optional
        Largest radius profiled; default ``min(ky, kx) / 4``.

    Returns
    -------
    0-d dask.array.Array of float64
        Half-maximum radius, detector pixels (NaN if no beam was found).
    """
    data = _check_data(data)
    c = np.asarray(centres, dtype=np.float64)
    if c.shape != data.shape[:2] + (2,):
        raise ParameterError(f"`centres` must have shape {data.shape[:2] + (2,)}; got {c.shape}")
    ky, kx = data.shape[2:]
    if max_radius is None:
        max_radius = min(ky, kx) / 4
    _check_positive("max_radius", max_radius)
    nbins = int(np.ceil(max_radius / kernels.PROFILE_BIN))

    def _process(block, cen):
        return kernels.beam_profile(block, cen, max_radius)[None, None]

    parts = da.blockwise(_process, "ijpb", data, "ijkl", _centres_like(c, data), "ijm",
                         new_axes={"p": 3, "b": nbins}, concatenate=True, dtype=np.float64,
                         meta=np.empty((0, 0, 0, 0), np.float64))
    total = parts.sum(axis=(0, 1))
    radius = dask.delayed(kernels.radius_from_profile)(total)
    return da.from_delayed(radius, shape=(), dtype=np.float64)


# ------------------------------------------------------------- shift / background

def shift_patterns(data: da.Array, centres) -> da.Array:
    """Move every pattern's beam centre to ``(ky // 2, kx // 2)`` (sub-pixel).

    Parameters
    ----------
    data : (scan_y, scan_x, ky, kx) dask.array.Array
    centres : (scan_y, scan_x, 2) array
        Beam centres to use (finite), e.g. the fitted descan model.

    Returns
    -------
    (scan_y, scan_x, ky, kx) dask.array.Array of float32
    """
    data = _check_data(data)
    c = _check_centres(centres, data)
    return da.blockwise(_shift_patterns, "ijkl", data, "ijkl",
                        _centres_like(c, data), "ijm", concatenate=True,
                        dtype=np.float32, meta=_META4)


align = shift_patterns
"""Alias of :func:`shift_patterns`: aligned patterns without background removal (NMF)."""


def subtract_background_dog(data: da.Array, sigma_low: float, sigma_high: float) -> da.Array:
    """Difference-of-Gaussians background removal (see :func:`kernels.subtract_background_dog`).

    Parameters
    ----------
    data : (scan_y, scan_x, ky, kx) dask.array.Array
    sigma_low, sigma_high : float
        Gaussian widths, detector pixels, ``0 < sigma_low < sigma_high``.

    Returns
    -------
    (scan_y, scan_x, ky, kx) dask.array.Array of float32
    """
    data = _check_data(data)
    _check_sigmas(sigma_low, sigma_high)
    return data.map_blocks(_subtract_background_dog, dtype=np.float32, meta=_META4,
                           sigma_low=float(sigma_low), sigma_high=float(sigma_high))


def preprocess(data: da.Array, centres_used, params: PreprocessParams, counts=None) -> da.Array:
    """Align and remove the background in one pass over the data.

    Navigation binning is *not* applied here (use :func:`bin_nav` first; the centres
    refer to the binned data).

    Parameters
    ----------
    data : (scan_y, scan_x, ky, kx) dask.array.Array
    centres_used : (scan_y, scan_x, 2) array
        Centres the alignment uses (ignored when ``params.align`` is False).
    params : PreprocessParams
        Resolved (:func:`spedflow.preprocess.resolve`): DoG sigmas must be set.
    counts : (gain, read_var), optional
        Remove the ring background about the aligned beam before the DoG
        (:func:`kernels.shift_and_subtract`; only with ``params.align``).

    Returns
    -------
    (scan_y, scan_x, ky, kx) dask.array.Array of float32
    """
    if not isinstance(params, PreprocessParams):
        raise TypeError(f"`params` must be PreprocessParams (got {type(params).__name__})")
    if params.dog_sigma_low is None or params.dog_sigma_high is None:
        raise ParameterError("`params` must be resolved (dog_sigma_low/high set); "
                             "call spedflow.preprocess.resolve(params, beam_radius) first")
    data = _check_data(data)
    _check_sigmas(params.dog_sigma_low, params.dog_sigma_high)
    kw = dict(sigma_low=float(params.dog_sigma_low), sigma_high=float(params.dog_sigma_high))
    if not params.align:
        return data.map_blocks(_subtract_background_dog, dtype=np.float32,
                               meta=_META4, **kw)
    c = _check_centres(centres_used, data, "centres_used")
    return da.blockwise(_shift_and_subtract, "ijkl", data, "ijkl",
                        _centres_like(c, data), "ijm", concatenate=True,
                        dtype=np.float32, meta=_META4,
                        counts=None if counts is None else tuple(counts), **kw)


# ------------------------------------------------------------------- bad pixels

def repair_pixels(data: da.Array, bad) -> da.Array:
    """Bad detector pixels replaced by the mean of their good neighbours in every pattern
    (:func:`kernels.repair_pixels`; same dtype)."""
    data = _check_data(data)
    bad = np.asarray(bad, dtype=np.int64).reshape(-1, 2)
    ky, kx = data.shape[2:]
    if len(kernels.pixels_off_detector(bad, (ky, kx))):
        raise ParameterError(f"bad pixels must lie on the {ky} x {kx} detector")
    return data.map_blocks(kernels.repair_pixels, bad, dtype=data.dtype,
                           meta=np.empty((0, 0, 0, 0), data.dtype))


def flat_field(data: da.Array, row_gains, column_gains) -> da.Array:
    """Every pattern divided by the detector's line gains (:func:`kernels.flat_field`;
    same dtype)."""
    data = _check_data(data)
    return data.map_blocks(kernels.flat_field, np.asarray(row_gains, np.float64),
                           np.asarray(column_gains, np.float64), dtype=data.dtype,
                           meta=np.empty((0, 0, 0, 0), data.dtype))
