"""Peak finding over a dask array of patterns: one peak table per block.

A peak table has no fixed length, so this stage does not return a dask array: it
returns one ``dask.delayed`` table per block (the workflow reduces them to a
position histogram on the workers, :mod:`spedflow.peaks.vectors`). The per-block
function :func:`peaks_block` is public so the workflow can call it inside its own
tasks.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

from ..errors import InputError, ParameterError
from ..io._store import check_lazy_patterns
from ._params import PeakParams, resolve
from .kernels import find_peaks_log, log_sigmas

__all__ = ["find_peaks", "peaks_block", "TABLE_COLUMNS"]

#: Columns of a peak table (docs/DESIGN.md).
TABLE_COLUMNS = ("scan_y", "scan_x", "ky", "kx", "intensity")


def _check_params(params) -> PeakParams:
    if not isinstance(params, PeakParams):
        raise ParameterError(f"`params` must be a PeakParams (got {type(params).__name__})")
    if not params.resolved:
        raise ParameterError("`params` has unset scales or border; call "
                             "spedflow.peaks.resolve(params, spot_radius) first")
    return params


def peaks_block(block: np.ndarray, scan_offset: tuple[int, int], params: PeakParams) -> np.ndarray:
    """Peak table of one block of patterns, in global scan coordinates.

    Parameters
    ----------
    block : (cy, cx, ky, kx) array
        Background-subtracted, aligned patterns (whole patterns).
    scan_offset : (int, int)
        Global scan index ``(y, x)`` of ``block[0, 0]``.
    params : PeakParams
        Resolved (:func:`spedflow.peaks.resolve`); ``threshold=None`` is derived
        from the pattern shape.

    Returns
    -------
    (m, 5) float32 array
        ``[scan_y, scan_x, ky, kx, intensity]``: global scan pixel, sub-pixel
        absolute detector position (px), integrated spot intensity (data units).
    """
    params = _check_params(params)
    block = np.asarray(block)
    if block.ndim != 4:
        raise InputError(f"`block` must be 4-D (scan_y, scan_x, ky, kx); got shape {block.shape}")
    cy, cx, ky, kx = block.shape
    sig = log_sigmas(params.min_sigma, params.max_sigma, params.num_sigma)
    peaks = find_peaks_log(block.reshape(cy * cx, ky, kx), sig, threshold=params.threshold,
                           exclude_border=params.exclude_border)
    idx = peaks[:, 0].astype(np.int64)
    out = np.empty((len(peaks), 5), np.float32)
    out[:, 0] = idx // cx + int(scan_offset[0])
    out[:, 1] = idx % cx + int(scan_offset[1])
    out[:, 2:5] = peaks[:, 1:4]
    return out


def find_peaks(data: da.Array, params: PeakParams, *,
               spot_radius: float | None = None) -> list:
    """Lazy peak finding: one delayed peak table per block of ``data``.

    Parameters
    ----------
    data : (scan_y, scan_x, ky, kx) dask.array.Array
        Background-subtracted, aligned patterns, whole patterns in every chunk.
    params : PeakParams
        Peak parameters; unset fields are resolved with ``spot_radius``.
    spot_radius : float, optional
        Measured spot (direct-beam) radius, px; needed only if ``params`` is not
        resolved.

    Returns
    -------
    list of dask.delayed.Delayed
        One ``(m, 5)`` float32 table per block (row-major block order), columns
        ``[scan_y, scan_x, ky, kx, intensity]`` with global scan indices
        (:func:`peaks_block`). ``np.concatenate`` of the computed list is the
        table of the whole scan.
    """
    check_lazy_patterns(data)
    if not isinstance(params, PeakParams):
        raise ParameterError(f"`params` must be a PeakParams (got {type(params).__name__})")
    params = _check_params(resolve(params, spot_radius, detector_shape=data.shape[2:]))
    blocks = data.to_delayed()
    oy = np.cumsum((0,) + data.chunks[0][:-1])
    ox = np.cumsum((0,) + data.chunks[1][:-1])
    task = dask.delayed(peaks_block, pure=True)
    return [task(blocks[i, j, 0, 0], (int(oy[i]), int(ox[j])), params)
            for i in range(blocks.shape[0]) for j in range(blocks.shape[1])]
