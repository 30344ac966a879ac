"""Which reflection lights a VDF segment: the offset of its spots from its vector.

A VDF image integrates a disc of radius ``r`` about its vector ``v`` in every pattern.
A reflection of another crystal whose spot falls near ``v`` (inside the disc, or
with its tail across the disc's edge) lights that image too, on that crystal. Its
vector was merged into ``v`` when the unique vectors were picked (within the
clustering radius), or lies just beyond. The watershed cuts such a region out like
any other: a segment of ``v`` lit by a spot that is not at ``v``. Where that
crystal's thickness or bending varies, the spot's intensity varies across it, and
these segments are parts of the crystal whose nominal vectors lie off its lattice
(on the wedge- and bent-crystal sets of ``benchmarks/third_sim.py``, most of the
surplus segments are such parts).

:func:`spot_offsets` measures, from the peak table, where the spots that light each
segment are: per scan position inside the segment, the peak nearest ``v`` within
``search_radius``; over the segment, the intensity-weighted mean of their positions
relative to ``v``. A segment lit by ``v``'s own reflection has it within the
position scatter of the peaks (``vectors.scatter``); one lit by a neighbouring spot
has it where that spot is.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

from ..errors import InputError, ParameterError

__all__ = ["spot_offsets", "member_positions", "area_reflections", "SpotOffsets",
           "AreaReflections", "read_peak_tables", "feed_peak_tables"]


class _Sums:
    """What both accumulators share: sums over the peak tables that can be taken in
    parts (on other tables, in other processes) and added up."""

    #: the arrays :meth:`add` adds into
    _SUMS: tuple[str, ...] = ()

    def zeroed(self):
        """A copy that shares the lookup structures and starts its sums at 0: one part of
        a reduction over the peak tables, to be fed other tables and joined by
        :meth:`absorb`."""
        part = copy.copy(self)
        for name in self._SUMS:
            setattr(part, name, np.zeros_like(getattr(self, name)))
        return part

    def sums(self) -> tuple:
        """The sums alone (a part's result to ship back: the lookup structures it
        shares with the others are far larger)."""
        return tuple(getattr(self, name) for name in self._SUMS)

    def absorb(self, other) -> "_Sums":
        """Add the sums of ``other`` (a :meth:`zeroed` part of this one, or its
        :meth:`sums`) to this one's; returns this one."""
        theirs = other if isinstance(other, tuple) else other.sums()
        for mine, more in zip(self.sums(), theirs):
            np.add(mine, more, out=mine)
        return self


def spot_offsets(segments, source: np.ndarray, vectors: np.ndarray, tables: Iterable,
                 *, detector_shape: tuple[int, int], scan_shape: tuple[int, int],
                 search_radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean offset (px) of the spots lighting each segment from the segment's vector.

    Parameters
    ----------
    segments : (M, Y * X) scipy.sparse matrix, or (M, Y, X) array
        VDF image segments, non-zero inside (:func:`segments_from_labels`). The
        segments of one vector do not overlap.
    source : (M,) array of int
        Index into ``vectors`` of each segment's image.
    vectors : (N, 2) array
        ``(gy, gx)`` relative to the beam at ``(ky // 2, kx // 2)``, px.
    tables : iterable of (m, 5) arrays
        Peak tables ``[scan_y, scan_x, ky, kx, intensity]`` in the aligned frame (the
        beam at ``(ky // 2, kx // 2)``), streamed block by block; all the peaks of one
        scan position in one table (the workflow's blocks are scan chunks).
    detector_shape, scan_shape : (int, int)
    search_radius : float
        Only peaks within this distance (px) of the vector count.

    Returns
    -------
    offsets : (M, 2) numpy.ndarray of float64
        ``sum_p w_p (k_p - v) / sum_p w_p`` over the segment's positions ``p`` that
        have a peak of positive intensity ``w_p`` within ``search_radius`` of ``v``
        (``k_p`` the one nearest ``v``); NaN for a segment without any.
    weights : (M,) numpy.ndarray of float64
        ``sum_p w_p`` (0 for a segment without peaks): to combine segments' offsets.
    """
    acc = SpotOffsets(segments, source, vectors, scan_shape=scan_shape,
                      search_radius=search_radius)
    return read_peak_tables(tables, [acc], scan_shape=scan_shape,
                            detector_shape=detector_shape)[0]


class SpotOffsets(_Sums):
    """The accumulator of :func:`spot_offsets` (same parameters), fed by
    :func:`read_peak_tables`: one read of the peak tables can feed several."""

    _SUMS = ("acc",)

    def __init__(self, segments, source: np.ndarray, vectors: np.ndarray, *,
                 scan_shape: tuple[int, int], search_radius: float):
        if not search_radius > 0:
            raise ParameterError(f"`search_radius` must be > 0 (got {search_radius})")
        if not sparse.issparse(segments):
            segments = np.asarray(segments)
            segments = segments.reshape(segments.shape[0], int(np.prod(segments.shape[1:])))
        seg = sparse.csr_matrix(segments)
        seg.eliminate_zeros()
        m, n_pix = seg.shape
        ny, nx = (int(s) for s in scan_shape)
        if n_pix != ny * nx:
            raise InputError(f"`segments` have {n_pix} pixels per row; the scan {ny} x {nx} has "
                             f"{ny * nx}")
        source = np.asarray(source, np.int64)
        self.vectors = np.asarray(vectors, np.float64).reshape(-1, 2)
        if source.shape != (m,):
            raise InputError(f"`source` (shape {source.shape}) must have one entry per segment "
                             f"({m})")
        self.m, self.n_pix, self.search_radius = m, n_pix, float(search_radius)
        self.acc = np.zeros((3, m))  # sum of w * dy, w * dx, w per segment
        # positions inside some segment: the only peaks that count
        self.covered = np.zeros(n_pix, bool)
        self.covered[seg.indices] = True
        if m == 0 or len(self.vectors) == 0:
            self.covered[:] = False
            return
        # (vector, position) -> segment, by a sorted key: one segment of a vector per position
        rows = np.repeat(np.arange(m), np.diff(seg.indptr))
        keys = source[rows] * n_pix + seg.indices
        order = np.argsort(keys, kind="stable")
        self.keys, self.rows = keys[order], rows[order]
        self.tree = cKDTree(self.vectors)
        # a peak within search_radius of k vectors has them all within 2 search_radius of
        # each other: the most vectors any peak can be near
        self.k_max = int(max(len(n) for n in self.tree.query_ball_point(
            self.vectors, 2.0 * search_radius)))

    def add(self, t: np.ndarray, g: np.ndarray, at_pos: np.ndarray) -> None:
        """Peaks ``t`` (rows of a table), at ``g`` relative to the beam, at flat scan
        positions ``at_pos``; peaks outside every segment are ignored."""
        inside = self.covered[at_pos]
        if not inside.any():
            return
        t, g, at_pos = t[inside], g[inside], at_pos[inside]
        k_max, n_pix, keys, rows = self.k_max, self.n_pix, self.keys, self.rows
        d, v = self.tree.query(g, k=k_max, distance_upper_bound=self.search_radius)
        d, v = d.reshape(len(g), k_max), v.reshape(len(g), k_max)
        near = np.isfinite(d)
        if not near.any():
            return
        i = np.nonzero(near)[0]
        d, v = d[near], v[near].astype(np.int64)
        key = v * n_pix + at_pos[i]
        # nearest peak first within each (vector, position): d / (2 search_radius) < 1/2
        # orders within a key without reaching the next (exact below 2**52)
        first = np.argsort(key + d / (2.0 * self.search_radius), kind="stable")
        key, i, v = key[first], i[first], v[first]
        lead = np.ones(key.size, bool)
        np.not_equal(key[1:], key[:-1], out=lead[1:])
        key, i, v = key[lead], i[lead], v[lead]
        at = np.minimum(np.searchsorted(keys, key), keys.size - 1)
        hit = keys[at] == key
        s, i, v = rows[at[hit]], i[hit], v[hit]
        w = t[i, 4]
        dg = g[i] - self.vectors[v]
        self.acc[0] += np.bincount(s, w * dg[:, 0], minlength=self.m)
        self.acc[1] += np.bincount(s, w * dg[:, 1], minlength=self.m)
        self.acc[2] += np.bincount(s, w, minlength=self.m)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        acc = self.acc
        with np.errstate(invalid="ignore", divide="ignore"):
            offsets = np.where(acc[2] > 0, acc[:2] / acc[2], np.nan).T
        return offsets, acc[2].copy()


def member_positions(members: Sequence, segment_members: Sequence, source: np.ndarray,
                     vectors: np.ndarray, offsets: np.ndarray, weights: np.ndarray, *,
                     return_weights: bool = False) -> tuple:
    """Where each group's reflections are: per member vector of each group, the vector
    moved by the weighted mean offset (:func:`spot_offsets`) of the group's segments of
    that vector; the vector itself where none of them has a peak near it.

    Parameters
    ----------
    members, segment_members : sequences of int arrays
        Per group, its distinct vector indices (sorted) and the indices of its input
        segments (``MergeResult.members``, ``MergeResult.segment_members``).
    source : (M,) int array
        The vector of each input segment.
    vectors : (N, 2) array
    offsets, weights : (M, 2) and (M,) arrays
        From :func:`spot_offsets`.
    return_weights : bool
        Also return, per group, the total intensity of the peaks found near each member
        vector over its segments (0: no spot found near it anywhere in the group).

    Returns
    -------
    tuple of (n_l, 2) numpy.ndarray of float64, aligned with ``members``; with
    ``return_weights``, ``(positions, weights)``, weights a tuple of (n_l,) arrays.
    """
    source = np.asarray(source, np.int64)
    vectors = np.asarray(vectors, np.float64).reshape(-1, 2)
    ok = np.isfinite(offsets).all(axis=1) & (weights > 0)
    out, lit = [], []
    for mem, segs in zip(members, segment_members):
        mem = np.asarray(mem, np.int64)
        segs = np.asarray(segs, np.int64)
        segs = segs[ok[segs]]
        at = np.searchsorted(mem, source[segs])  # segs' vectors are members
        w = np.bincount(at, weights[segs], minlength=mem.size)
        shift = np.stack([np.bincount(at, weights[segs] * offsets[segs, k], minlength=mem.size)
                          for k in (0, 1)], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            shift = np.where(w[:, None] > 0, shift / w[:, None], 0.0)
        out.append(vectors[mem] + shift)
        lit.append(w)
    return (tuple(out), tuple(lit)) if return_weights else tuple(out)


def area_reflections(masks, vectors: np.ndarray, tables: Iterable, *,
                     scan_shape: tuple[int, int], detector_shape: tuple[int, int],
                     radius: float) -> tuple[np.ndarray, np.ndarray]:
    """How often each vector's reflection shows in each mask's area, and where.

    Each peak of positive intensity is assigned to the nearest vector within
    ``radius`` (the clustering radius of the unique vectors). Per mask and vector: the
    number of the mask's scan positions with a peak of that vector, and the
    intensity-weighted mean position of those peaks.

    Parameters
    ----------
    masks : (L, Y * X) bool array or scipy.sparse matrix
    vectors : (N, 2) array
        ``(gy, gx)`` relative to the beam at ``(ky // 2, kx // 2)``, px.
    tables : iterable of (m, 5) arrays
        Peak tables as for :func:`spot_offsets` (a scan position's peaks in one table).
    scan_shape, detector_shape : (int, int)
    radius : float

    Returns
    -------
    counts : (L, N) numpy.ndarray of int64
        Positions of each mask showing each vector's reflection.
    positions : (L, N, 2) numpy.ndarray of float64
        Their mean position, relative to the beam (NaN where the count is 0).
    """
    acc = AreaReflections(masks, vectors, scan_shape=scan_shape, radius=radius)
    return read_peak_tables(tables, [acc], scan_shape=scan_shape,
                            detector_shape=detector_shape)[0]


class AreaReflections(_Sums):
    """The accumulator of :func:`area_reflections` (same parameters), fed by
    :func:`read_peak_tables`."""

    _SUMS = ("counts", "acc")

    def __init__(self, masks, vectors: np.ndarray, *, scan_shape: tuple[int, int],
                 radius: float):
        if not radius > 0:
            raise ParameterError(f"`radius` must be > 0 (got {radius})")
        m = sparse.csr_matrix(masks, dtype=np.float64)
        m.eliminate_zeros()
        m.data[:] = 1.0
        n_l, n_pix = m.shape
        ny, nx = (int(s) for s in scan_shape)
        if n_pix != ny * nx:
            raise InputError(f"`masks` have {n_pix} pixels per row; the scan {ny} x {nx} has "
                             f"{ny * nx}")
        self.vectors = np.asarray(vectors, np.float64).reshape(-1, 2)
        self.radius = float(radius)
        n_v = len(self.vectors)
        self.counts = np.zeros((n_l, n_v))
        self.acc = np.zeros((3, n_l, n_v))
        self.covered = np.asarray(m.sum(axis=0)).ravel() > 0
        if not (n_l and n_v):
            self.covered[:] = False
            return
        self.by_position = m.T.tocsr()  # (positions, masks): a table's rows only, not all of m
        self.tree = cKDTree(self.vectors)

    def add(self, t: np.ndarray, g: np.ndarray, at_pos: np.ndarray) -> None:
        """Peaks as for :meth:`SpotOffsets.add`; peaks outside every mask are ignored."""
        inside = self.covered[at_pos]
        if not inside.any():
            return
        t, g, at_pos = t[inside], g[inside], at_pos[inside]
        d, v = self.tree.query(g, distance_upper_bound=self.radius)
        ok = np.isfinite(d)
        if not ok.any():
            return
        g, v, w = g[ok], v[ok], t[ok, 4]
        here, row = np.unique(at_pos[ok], return_inverse=True)  # this table's positions
        m_t = self.by_position[here].T.tocsr()  # (masks, its positions)
        shape = (len(here), len(self.vectors))
        # (position, vector) once for the counts, every peak for the positions
        once = sparse.csr_matrix((np.ones(len(v)), (row, v)), shape=shape)
        once.data[:] = 1.0
        self.counts += (m_t @ once).toarray()
        for k, vals in enumerate((w * g[:, 0], w * g[:, 1], w)):
            self.acc[k] += (m_t @ sparse.csr_matrix((vals, (row, v)), shape=shape)).toarray()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        acc = self.acc
        with np.errstate(invalid="ignore", divide="ignore"):
            where = np.where(acc[2][..., None] > 0,
                             np.stack([acc[0], acc[1]], -1) / acc[2][..., None], np.nan)
        return self.counts.astype(np.int64), where


def read_peak_tables(tables: Iterable, accumulators: Sequence, *, scan_shape: tuple[int, int],
                     detector_shape: tuple[int, int]) -> list:
    """Read the peak tables once and feed every accumulator (:class:`SpotOffsets`,
    :class:`AreaReflections`; ``None`` entries are skipped and give ``None``); their
    results, in order."""
    feed_peak_tables(tables, accumulators, scan_shape=scan_shape, detector_shape=detector_shape)
    return [None if a is None else a.result() for a in accumulators]


def feed_peak_tables(tables: Iterable, accumulators: Sequence, *, scan_shape: tuple[int, int],
                     detector_shape: tuple[int, int]) -> None:
    """:func:`read_peak_tables` without the results: feed the accumulators in place (a
    part of a reduction, see :meth:`SpotOffsets.zeroed`)."""
    live = [a for a in accumulators if a is not None]
    if live:
        covered = np.logical_or.reduce([a.covered for a in live])
        for t, g, at_pos in _peaks_inside(tables, covered, scan_shape, detector_shape):
            for a in live:
                a.add(t, g, at_pos)


def _peaks_inside(tables: Iterable, covered: np.ndarray, scan_shape, detector_shape):
    """Per table, its peaks of positive intensity at the positions ``covered`` (a flat
    bool over the scan): as float64 rows, their positions relative to the beam, and
    their flat scan positions; tables with none are skipped, a row outside the scan is
    refused."""
    ny, nx = scan_shape
    c = np.array([detector_shape[0] // 2, detector_shape[1] // 2], np.float64)
    for table in tables:
        t = np.asarray(table, np.float64).reshape(-1, 5)
        if len(t) and (t[:, 0].min() < 0 or t[:, 1].min() < 0 or t[:, 0].max() >= ny
                       or t[:, 1].max() >= nx):
            raise InputError(f"a peak table row lies outside the {ny} x {nx} scan")
        pos = t[:, 0].astype(np.int64) * nx + t[:, 1].astype(np.int64)
        keep = (t[:, 4] > 0) & covered[pos]
        if keep.any():
            yield t[keep], t[keep, 2:4] - c, pos[keep]
