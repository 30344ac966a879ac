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
from .kernels import find_peaks_log, log_sigmas, sorted_table

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
    block = np.asarray(block)
    if block.ndim != 4:
        raise InputError(f"`block` must be 4-D (scan_y, scan_x, ky, kx); got shape {block.shape}")
    cy, cx, ky, kx = block.shape
    return scan_table(flat_peaks(block.reshape(cy * cx, ky, kx), params), cx, scan_offset)


def flat_peaks(frames: np.ndarray, params: PeakParams) -> np.ndarray:
    """:func:`find_peaks_log` of ``(n, ky, kx)`` patterns with the scales, threshold and
    border of ``params`` (resolved): the table ``[pattern_index, ky, kx, intensity,
    sigma]``. The VDF workflow's pass 1 calls it slab by slab."""
    params = _check_params(params)
    sig = log_sigmas(params.min_sigma, params.max_sigma, params.num_sigma)
    return find_peaks_log(frames, sig, threshold=params.threshold,
                          exclude_border=params.exclude_border)


def scan_table(peaks: np.ndarray, cx: int, scan_offset: tuple[int, int]) -> np.ndarray:
    """The peak table of a block in global scan coordinates, from :func:`flat_peaks`'
    table of its flattened patterns (row-major, ``cx`` patterns per scan row).

    Returns
    -------
    (m, 5) float32 array
        ``[scan_y, scan_x, ky, kx, intensity]`` (see :func:`peaks_block`).
    """
    idx = peaks[:, 0].astype(np.int64)
    out = np.empty((len(peaks), 5), np.float32)
    out[:, 0] = idx // cx + int(scan_offset[0])
    out[:, 1] = idx % cx + int(scan_offset[1])
    out[:, 2:5] = peaks[:, 1:4]
    return out


def recentre_table(table: np.ndarray, centres: np.ndarray, detector_shape, *,
                   found_at: np.ndarray | None = None, exclude_border: int = 1,
                   fill_margin: float | None = None) -> np.ndarray:
    """Move a peak table to the frame of other alignment centres.

    The VDF workflow finds the peaks in the pass that measures the beam centres,
    on patterns aligned by their own measured centre ``found_at``; once the descan
    is fitted, each peak moves by ``found_at - centres`` (a pattern shifted by
    ``(ky // 2, kx // 2) - a`` holds at ``p`` what the raw pattern holds at
    ``p - (ky // 2, kx // 2) + a``). Peaks that land within ``exclude_border`` px
    of the detector's edge (rounded position) are dropped, as in the peak finder.

    Parameters
    ----------
    table : (m, 5) array
        ``[scan_y, scan_x, ky, kx, intensity]``, global scan indices.
    centres : (scan_y, scan_x, 2) array
        The new alignment centres of the whole scan (finite), indexed by the
        table's scan columns.
    detector_shape : (ky, kx)
    found_at : (scan_y, scan_x, 2) array, optional
        The centres the patterns were aligned by when the peaks were found.
        Default: the detector centre (the peaks were found on raw patterns).
    exclude_border : int
    fill_margin : float, optional
        With ``found_at``: first drop the peaks that lie within this distance (px) of
        a detector edge the alignment by ``found_at`` shifted into the patterns, or
        beyond it (:func:`~spedflow.peaks.kernels.drop_fill_edge`; the VDF workflow
        does this in its pass 1: ``FILL_EDGE_SCALES * max_sigma`` for patterns aligned
        into a zero fill, as :func:`spedflow.preprocess.preprocess` does).

    Returns
    -------
    (m', 5) float32 array, rows in the input's order.
    """
    t = np.array(table, dtype=np.float32, copy=True).reshape(-1, 5)
    ky, kx = (int(v) for v in detector_shape)
    sy, sx = t[:, 0].astype(np.intp), t[:, 1].astype(np.intp)
    c = np.asarray(centres, dtype=np.float64)[sy, sx]
    a = (np.array([ky // 2, kx // 2], np.float64) if found_at is None
         else np.asarray(found_at, dtype=np.float64)[sy, sx])
    if fill_margin is not None and found_at is not None:
        from .kernels import clear_of_fill
        clear = clear_of_fill(t[:, 2:4], a, (ky, kx), fill_margin)
        t, c, a = t[clear], c[clear], a[clear]
    t[:, 2:4] += (a - c).astype(np.float32)
    b = int(exclude_border)
    iy, ix = np.rint(t[:, 2]), np.rint(t[:, 3])
    keep = (iy >= b) & (iy <= ky - 1 - b) & (ix >= b) & (ix <= kx - 1 - b)
    return t[keep]

def find_peaks(data: da.Array, params: PeakParams, *,
               spot_radius: float | None = None) -> list:
    """Lazy peak finding: one delayed peak table per block of ``data``.

    The threshold's noise unit is measured per pattern and scale on the given
    background-subtracted patterns (:func:`~spedflow.peaks.kernels.noise_level`);
    ``params.noise`` chooses the VDF workflow's model, whose counting statistics need
    the raw counts (:func:`spedflow.peaks.noise.find_peaks_counting`).

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


def _counting_block(block, centres, scan_offset, params, counts):
    """:func:`find_peaks_counting` of one block of raw patterns aligned by ``centres``:
    the table in global scan coordinates, positions in the frame of the patterns
    shifted to ``centres`` (the same task as the VDF workflow's pass 1)."""
    from .noise import counting_peaks_by_slab
    cy, cx, ky, kx = block.shape
    frames = np.asarray(block, np.float32).reshape(-1, ky, kx)
    parts = [t for _, t, _ in counting_peaks_by_slab(
        frames, np.asarray(centres, np.float64).reshape(-1, 2), params, counts)]
    return scan_table(sorted_table(parts), cx, scan_offset)


def find_peaks_counting(data: da.Array, centres, params: PeakParams, counts, *,
                        spot_radius: float | None = None) -> list:
    """Lazy peak finding with the counting-noise threshold (``params.noise = "counting"``,
    the VDF workflow's default): one delayed peak table per block of ``data``.

    Parameters
    ----------
    data : (scan_y, scan_x, ky, kx) dask.array.Array
        Raw patterns (counts in data units), whole patterns in every chunk.
    centres : (scan_y, scan_x, 2) array
        Beam centre of every pattern; peak positions are in the frame of the patterns
        shifted so it sits at ``(ky // 2, kx // 2)``.
    params : PeakParams
    counts : (gain, read_var)
        :func:`measure_counts`.
    spot_radius : float, optional
        Needed only if ``params`` is not resolved.

    Returns
    -------
    list of dask.delayed.Delayed
        One ``(m, 5)`` table ``[scan_y, scan_x, ky, kx, intensity]`` per block.
    """
    check_lazy_patterns(data)
    if not isinstance(params, PeakParams):
        raise ParameterError(f"`params` must be a PeakParams (got {type(params).__name__})")
    params = _check_params(resolve(params, spot_radius, detector_shape=data.shape[2:]))
    centres = np.asarray(centres, np.float64)
    if centres.shape != data.shape[:2] + (2,):
        raise ParameterError(f"`centres` must have shape {data.shape[:2] + (2,)} (got {centres.shape})")
    blocks = data.to_delayed()
    oy = np.cumsum((0,) + data.chunks[0][:-1])
    ox = np.cumsum((0,) + data.chunks[1][:-1])
    task = dask.delayed(_counting_block, pure=True)
    return [task(blocks[i, j, 0, 0],
                 centres[oy[i]:oy[i] + data.chunks[0][i], ox[j]:ox[j] + data.chunks[1][j]],
                 (int(oy[i]), int(ox[j])), params, tuple(counts))
            for i in range(blocks.shape[0]) for j in range(blocks.shape[1])]


#: Scan positions in a row (or column) the detector's noise is measured on: a pair of
#: neighbours and a third reading (:func:`spedflow.peaks.noise.count_scale`).
_SAMPLE_RUN = 3
#: Patterns the sample holds at least (or the whole scan). On one simulated 32 x 32 scan
#: of counts, five blocks of 3-12 patterns measured 0.98-1.78 data units per count with
#: the chunking; ~500 patterns, 1.05-1.15.
_SAMPLE_PATTERNS = 512
#: ... unless they take more than this as float32 (the beam radius is measured on the
#: whole sample at once): a large detector's patterns hold many readings each, and the
#: noise fit needs readings, not patterns. 512 patterns of 1024 x 1024 took the client
#: to 4.7 GB; 64 of them hold 8x the readings of 512 of 128 x 128.
_SAMPLE_BYTES = 256 * 2**20
#: ... and at least this many patterns, whatever their size.
_SAMPLE_MIN_PATTERNS = 16


def sample_size(detector_shape) -> int:
    """Patterns the noise and beam sample should hold for patterns of ``detector_shape``:
    512, fewer where they would take more than 256 MB as float32 (at least 16)."""
    per = 4 * max(1, int(np.prod(detector_shape)))
    return int(max(_SAMPLE_MIN_PATTERNS, min(_SAMPLE_PATTERNS, _SAMPLE_BYTES // per)))


def _sample_span(n: int, c: int, i: int, need: int) -> tuple[int, int, int]:
    """Whole chunks of size ``c`` along an axis of ``n`` positions from chunk ``i``, at
    least ``need`` positions, moved back so they end inside the axis (a partial last
    chunk is joined to the one before it): ``(start, stop, 1)``."""
    k = -(-need // c)
    i = min(i, max(0, -(-n // c) - k))
    lo, hi = i * c, min(n, (i + k) * c)
    while hi - lo < need and lo > 0:
        lo -= c
    return lo, hi, 1


def sample_blocks(data):
    """Blocks of ``data`` spread over the scan, as NumPy arrays of the data's dtype, read
    one at a time: the sample the VDF workflow measures the beam radius and the
    detector's counting noise on. ``data``: a dask or Zarr array (chunks of whole
    patterns).

    Five blocks, one chunk each (the corners and the centre). Where chunks are under
    three positions in a row along the rows (the columns, if the chunks are taller or
    the scan's rows are shorter), each block joins as many whole chunks as make three:
    the counting noise is measured on neighbouring readings. Where the five hold fewer
    patterns than :func:`sample_size` (512 up to 362 x 362 patterns; large detectors'
    chunks hold a few: a 16 MB chunk of 1024 x 1024 float32 patterns holds four), more
    blocks, spread evenly over the scan, until the sample holds that many."""
    if isinstance(data, da.Array):
        cy, cx = data.chunksize[:2]
    else:
        cy, cx = data.chunks[:2]
    ny, nx = data.shape[:2]
    cy, cx = max(1, min(cy, ny)), max(1, min(cx, nx))  # a Zarr array's chunks may exceed it
    gy, gx = -(-ny // cy), -(-nx // cx)
    # the axis count_scale runs along: the rows, unless the block is narrower than
    # three positions and taller (it then takes the columns); chunks joined along it
    # only where they are shorter than three positions
    along_x = cx >= _SAMPLE_RUN or (cy < _SAMPLE_RUN and nx >= min(ny, _SAMPLE_RUN))
    need_x = min(nx, _SAMPLE_RUN) if along_x and cx < _SAMPLE_RUN else 1
    need_y = min(ny, _SAMPLE_RUN) if not along_x and cy < _SAMPLE_RUN else 1

    def window(i, j):
        return _sample_span(ny, cy, i, need_y), _sample_span(nx, cx, j, need_x)

    def size(w):
        return (w[0][1] - w[0][0]) * (w[1][1] - w[1][0])

    picks = sorted({window(i, j) for i, j in ((0, 0), (gy // 2, gx // 2), (gy - 1, gx - 1), (0, gx - 1),
                                              (gy - 1, 0))})
    total = sum(size(w) for w in picks)
    target = sample_size(data.shape[2:])
    if total < target:
        ky, kx = -(-need_y // cy), -(-need_x // cx)
        grid = sorted({window(i, j) for i in range(0, gy, ky) for j in range(0, gx, kx)} - set(picks))
        if grid:
            want = -(-(target - total) // max(1, size(grid[0])))
            for k in dict.fromkeys(np.linspace(0, len(grid) - 1, min(want, len(grid))).round().astype(int)):
                if total >= target:
                    break
                picks.append(grid[k])
                total += size(grid[k])
    for sy, sx in picks:
        yield np.asarray(data[slice(*sy), slice(*sx)])


def measure_counts(data) -> tuple[float, float]:
    """Data units per count and read-out variance of the detector
    (:func:`spedflow.peaks.noise.count_scale`) on :func:`sample_blocks` of ``data``."""
    from .noise import count_scale
    return count_scale(sample_blocks(data))
