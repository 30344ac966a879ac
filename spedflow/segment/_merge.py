"""Correlation merging of VDF segments and of NMF components; virtual patterns.

Both merges of the paper were greedy in the reference (take the first remaining item
as a template, collect everything that correlates with it), so the answer depended
on the order of the input. Here the full correlation matrix is clustered by
*complete linkage* cut at the threshold: every pair inside a group correlates above
the threshold, so any member could have served as the paper's template, and the
groups do not depend on input order.

Complete rather than single linkage (connected components of the thresholded
graph): single linkage chains — a segment that covers two overlapping crystals
correlates with each of them and would join two different crystals into one group.
Complete linkage is the conservative choice; a crystal it splits into two groups
still shows up (twice), whereas a chain that fuses crystals is lost.

Ties (exactly equal distances) are the only way agglomerative clustering can depend
on order; the items are clustered in a canonical order computed from their content.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import dask
import numpy as np
from scipy import ndimage, sparse
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import squareform

from .._friedel import has_friedel_pair
from ..config import check_range
from ..errors import InputError, ParameterError
from ._lattice import one_lattice, same_lattice
from ._params import NMFMergeParams, VDFMergeParams
from ._watershed import _stack

__all__ = ["MergeResult", "merge_vdf_segments", "drop_radial_pairs", "drop_shared_reflections",
           "drop_rims", "fold_fragments", "virtual_patterns", "merge_components", "correlation_matrix"]


@dataclass(frozen=True)
class MergeResult:
    """Summed VDF segments and their diffraction vectors.

    Attributes
    ----------
    summed : (L, Y, X) numpy.ndarray of float32
        Summed segments, exactly 0 outside their masks; ordered by decreasing total.
    members : tuple of L (n_l,) int64 arrays
        Distinct vector indices (into ``vectors``) of each summed segment, sorted.
    intensities : tuple of L (n_l,) float64 arrays
        Per member vector: total of that vector's segment image(s) inside the
        summed segment's mask (same units as the VDF images).
    segment_members : tuple of L int64 arrays
        Indices of the input segments summed into each summed segment.
    vectors : (N, 2) numpy.ndarray of float64
        The diffraction vectors ``(gy, gx)`` relative to the beam, detector pixels.
    n_groups : int
        Number of correlation groups before the vector threshold and empty masks
        removed some.
    """

    summed: np.ndarray
    members: tuple
    intensities: tuple
    segment_members: tuple
    vectors: np.ndarray
    n_groups: int = 0

    def kept(self, keep) -> "MergeResult":
        """These groups less those not in ``keep`` (indices, in order)."""
        return MergeResult(self.summed[keep], tuple(self.members[i] for i in keep),
                           tuple(self.intensities[i] for i in keep),
                           tuple(self.segment_members[i] for i in keep), self.vectors,
                           self.n_groups)

    def membership_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Flat membership for storage.

        Returns
        -------
        table : (K, 2) numpy.ndarray of int32
            Rows ``(summed segment index, vector index)``.
        intensities : (K,) numpy.ndarray of float32
        """
        rows = [np.column_stack([np.full(m.size, i), m]) for i, m in enumerate(self.members)]
        table = np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 2), np.int32)
        inten = (np.concatenate(self.intensities).astype(np.float32) if rows
                 else np.zeros(0, np.float32))
        return table, inten


def correlation_matrix(images: np.ndarray) -> np.ndarray:
    """Zero-shift normalised cross-correlation (Pearson) of every pair of images.

    Parameters
    ----------
    images : (M, ...) array_like, or (M, P) scipy.sparse matrix
        M images of any (common) shape.

    Returns
    -------
    (M, M) numpy.ndarray of float64
        ``corr[i, j]``; a constant image correlates 0 with every other image and 1
        with itself.

    Notes
    -----
    Mostly-zero images (segments) go through a sparse Gram matrix,
    ``cov = S S^T - P m m^T``, so memory scales with the segment pixels, not M x P.
    Dense images are centred first (no cancellation).
    """
    if sparse.issparse(images):
        a = sparse.csr_matrix(images)
        m, p = a.shape
        dense = False
    else:
        a = np.asarray(images)
        m = a.shape[0]
        a = a.reshape(m, -1)
        p = a.shape[1]
        dense = np.count_nonzero(a) >= 0.1 * a.size
    if m == 0:
        return np.zeros((0, 0))
    if not dense:
        s = sparse.csr_matrix(a, dtype=np.float64)
        mean = np.asarray(s.sum(axis=1)).ravel() / p
        cov = (s @ s.T).toarray() - p * np.outer(mean, mean)
    else:
        c = a.astype(np.float64)
        c -= c.mean(axis=1, keepdims=True)
        cov = c @ c.T
    var = np.clip(np.diag(cov).copy(), 0.0, None)
    norm = np.sqrt(var)
    denom = np.outer(norm, norm)
    corr = np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 0)
    corr = np.clip(corr, -1.0, 1.0)
    np.fill_diagonal(corr, 1.0)
    return corr


def noise_corrected(params: VDFMergeParams, image_snr: float | None) -> bool:
    """``params.noise_corrected`` resolved: "auto" is on where the VDF images' median
    pixel signal-to-noise ratio ``image_snr`` is under
    :data:`~spedflow.segment._watershed.NOISY_IMAGES` (off if it is not known)."""
    from ._watershed import NOISY_IMAGES
    if params.noise_corrected != "auto":
        return bool(params.noise_corrected)
    return image_snr is not None and bool(image_snr < NOISY_IMAGES)


def merge_vdf_segments(segments, source_vector: np.ndarray, vectors: np.ndarray,
                       params: VDFMergeParams | None = None, *,
                       scan_shape: tuple[int, int] | None = None,
                       image_snr: float | None = None) -> MergeResult:
    """Group VDF image segments of the same crystal and sum them (paper, Fig. 1C).

    Segments whose pairwise Pearson correlation exceeds ``corr_threshold`` for every
    pair form a group (complete linkage on ``1 - corr``). A group with fewer than
    ``vector_threshold`` distinct vectors is discarded. The summed segment is the sum
    of the group's segments inside the mask where at least
    ``ceil(segment_threshold * n_vectors)`` of the group's vectors have a non-zero
    segment.

    Parameters
    ----------
    segments : (M, Y, X) array_like of float, or (M, Y * X) scipy.sparse matrix
        VDF image segments, 0 outside each segment (``segments_from_labels``; with
        ``sparse=True`` it gives the sparse form, which a large scan needs: thousands
        of segments, each a whole scan-sized image, are gigabytes dense).
    source_vector : (M,) array_like of int
        Index into ``vectors`` of the VDF image each segment was cut from.
    vectors : (N, 2) array_like of float
        Unique diffraction vectors ``(gy, gx)`` relative to the beam, detector pixels.
    params : VDFMergeParams, optional
    scan_shape : (Y, X), optional
        Required with sparse ``segments``.
    image_snr : float, optional
        The median pixel signal-to-noise ratio of the VDF images
        (:func:`~spedflow.segment._watershed.image_snr`), for
        ``params.noise_corrected = "auto"`` (:func:`noise_corrected`).

    Returns
    -------
    MergeResult
    """
    params = VDFMergeParams() if params is None else params
    if sparse.issparse(segments):
        if scan_shape is None or len(scan_shape) != 2 \
                or int(np.prod(scan_shape)) != segments.shape[1]:
            raise InputError(f"sparse `segments` ({segments.shape[0]} x {segments.shape[1]}) "
                             f"need `scan_shape` (Y, X) with Y * X = {segments.shape[1]} "
                             f"(got {scan_shape!r})")
        flat = sparse.csr_matrix(segments, dtype=np.float32)
        values = flat.data
        scan_shape = tuple(int(v) for v in scan_shape)
    else:
        segments = np.asarray(segments)
        if segments.ndim != 3:
            raise InputError(f"`segments` must be 3-D (M, Y, X); got shape {segments.shape}")
        flat = segments.reshape(segments.shape[0], int(np.prod(segments.shape[1:])))
        values = segments
        scan_shape = segments.shape[1:]
    vectors = np.asarray(vectors, dtype=np.float64)
    source_vector = np.asarray(source_vector)
    if vectors.ndim != 2 or vectors.shape[1] != 2:
        raise InputError(f"`vectors` must have shape (N, 2); got {vectors.shape}")
    if source_vector.shape != (flat.shape[0],):
        raise InputError(f"`source_vector` (shape {source_vector.shape}) must have shape "
                         f"({flat.shape[0]},), one vector index per segment")
    if source_vector.size and (not np.issubdtype(source_vector.dtype, np.integer)
                               or source_vector.min() < 0
                               or source_vector.max() >= vectors.shape[0]):
        raise InputError(f"`source_vector` must hold integer indices in [0, {vectors.shape[0]})")
    if not np.isfinite(values).all() or not np.isfinite(vectors).all():
        raise InputError("`segments` and `vectors` must be finite (no NaN/inf)")
    m = flat.shape[0]
    empty = MergeResult(np.zeros((0,) + tuple(scan_shape), np.float32), (), (), (), vectors, 0)
    if m == 0:
        return empty

    canon = _canonical_order(flat, vectors[source_vector])
    rel = segment_reliability(flat, scan_shape) if noise_corrected(params, image_snr) else None
    groups = _complete_groups_sparse(flat, canon, params.corr_threshold, rel)

    out_sum, out_members, out_int, out_seg, totals = [], [], [], [], []
    for g in groups:
        vec, inv = np.unique(source_vector[g], return_inverse=True)
        if (vec.size < params.vector_threshold
                and not has_friedel_pair(vectors[vec], params.friedel_tolerance)):
            continue
        # the group's pixels as CSR rows (a group can hold a hundred scan-sized
        # segments: never dense)
        sub = sparse.csr_matrix(flat[g], dtype=np.float32, copy=True)
        sub.eliminate_zeros()
        p = sub.shape[1]
        vec_of = np.repeat(inv.ravel(), np.diff(sub.indptr))  # the vector of each pixel
        # votes per pixel: the vectors with a segment there (several segments of one
        # vector count as one vote)
        votes = np.bincount(_distinct(vec_of * p + sub.indices) % p, minlength=p)
        need = max(1, math.ceil(params.segment_threshold * vec.size - 1e-9))
        mask = votes >= need
        if not mask.any():
            continue
        inside = mask[sub.indices]
        summed = np.bincount(sub.indices[inside], weights=sub.data[inside], minlength=p)
        inten = np.bincount(vec_of[inside], weights=sub.data[inside], minlength=vec.size)
        out_sum.append(summed)
        out_members.append(vec.astype(np.int64))
        out_int.append(inten)
        out_seg.append(g.astype(np.int64))
        totals.append(summed.sum())
    if not out_sum:
        return MergeResult(empty.summed, (), (), (), vectors, len(groups))
    # decreasing total; ties by the canonical position of the first member
    rank = np.empty(m, dtype=np.int64)
    rank[canon] = np.arange(m)
    order = sorted(range(len(out_sum)), key=lambda i: (-totals[i], rank[out_seg[i]].min()))
    summed = np.stack([out_sum[i] for i in order]).astype(np.float32)
    return MergeResult(summed.reshape((len(order),) + tuple(scan_shape)),
                       tuple(out_members[i] for i in order),
                       tuple(out_int[i] for i in order),
                       tuple(out_seg[i] for i in order), vectors, len(groups))


def _distinct(keys: np.ndarray) -> np.ndarray:
    """The distinct values of an integer array, sorted: ``np.unique(keys)``, by a sort.
    NumPy >= 2.3 finds the distinct values of a plain ``np.unique`` by hashing, which on
    millions of mostly distinct int64 keys is ~14x slower than sorting them (2.5 s
    against 0.18 s for 3 million; the 512 x 512 benchmark's merge spent 3.3 s there)."""
    s = np.sort(np.asarray(keys).ravel())
    if s.size == 0:
        return s
    keep = np.empty(s.size, bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def _mask_overlaps(result: MergeResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks of the summed segments (L, P) bool, their areas (L,) and pixel overlaps (L, L)."""
    masks = result.summed.reshape(len(result.summed), -1) > 0
    m_sp = sparse.csr_matrix(masks, dtype=np.float64)
    return masks, masks.sum(axis=1), (m_sp @ m_sp.T).toarray()


class _Images:
    """The VDF images of all vectors, (N, Y, X): a NumPy array, or an array read one
    image at a time (a zarr array chunked an image per chunk, as the workflow's stage
    cache holds them), so the merging steps never need the whole stack in memory.
    Images read are kept up to ``cache_bytes``; the least recently used goes first."""

    def __init__(self, images, cache_bytes: int = 64 * 2**20):
        self._arr = images
        self.shape = tuple(int(s) for s in images.shape)
        self._in_memory = isinstance(images, np.ndarray)
        self._cache: dict[int, np.ndarray] = {}
        itemsize = np.dtype(getattr(images, "dtype", np.float64)).itemsize
        self._keep = max(1, cache_bytes // max(1, itemsize * math.prod(self.shape[1:])))

    def image(self, v) -> np.ndarray:
        """Image ``v`` (Y, X), floating point."""
        v = int(v)
        if self._in_memory:
            im = self._arr[v]
        else:
            im = self._cache.pop(v, None)
            if im is None:
                im = np.asarray(self._arr[v])
            self._cache[v] = im  # most recent last
            if len(self._cache) > self._keep:
                del self._cache[next(iter(self._cache))]
        return im if np.issubdtype(im.dtype, np.floating) else im.astype(np.float32)

    def flat(self, v) -> np.ndarray:
        """Image ``v`` as a row (Y * X,)."""
        return self.image(v).reshape(-1)

    def sum_of(self, vs) -> np.ndarray:
        """The images ``vs`` summed in float64, as a row (Y * X,) (added in the order
        given, as ``stack[vs].sum(axis=0, dtype=np.float64)`` adds them)."""
        acc = np.zeros(math.prod(self.shape[1:]))
        for v in vs:
            acc += self.flat(v)
        return acc


def _check_images(result: MergeResult, images) -> _Images:
    """The VDF images of all of ``result``'s vectors, (N, Y, X) like its segments."""
    images = _stack(images)
    if dask.is_dask_collection(images):
        # computed once: each of a dask stack's chunks may hold every image
        images = np.asarray(images)
    if len(images.shape) != 3 or images.shape[0] != len(result.vectors) \
            or tuple(images.shape[1:]) != result.summed.shape[1:]:
        raise InputError(f"`images` must have shape ({len(result.vectors)}, "
                         f"{', '.join(map(str, result.summed.shape[1:]))}); got {tuple(images.shape)}")
    return _Images(images)


def fold_fragments(result: MergeResult, images: np.ndarray,
                   params: VDFMergeParams | None = None, *,
                   measured: Sequence | None = None, seen_in: tuple | None = None,
                   lit: Sequence | None = None) -> MergeResult:
    """Fold summed segments that are fragments of a larger crystal into it.

    The watershed of some VDF images cuts a crystal into parts (uneven thickness,
    noise in weak images); the parts of several such images correlate with each
    other and form a group of their own, a second "crystal" inside the first. A
    summed segment ``a`` is folded into a larger one ``b`` when

    1. at least ``params.fragment_containment`` of ``a``'s mask lies in ``b``'s mask (``b``
       at least as large), and
    2. ``a``'s vectors light up all of ``b``. With ``P_a``, ``P_b`` the sums of the whole
       VDF images of each one's vectors, over ``b``'s mask: ``P_a`` correlates with
       ``P_b`` (Pearson) above ``params.corr_threshold``, and either at least 0.9, or
       the ratio ``P_a / P_b`` (summed over the region) on ``a`` is at most
       ``params.fragment_contrast`` times that on the rest of ``b``.

    or 3. ``a``'s and ``b``'s masks coincide: their intersection over union is at least
       ``params.coincident_iou``, or (on small crystals, where a one-pixel rim is
       most of the area) at least 0.5 with each mask within one pixel (4-connected)
       of the other, up to a stray pixel in twenty (1 and 2 aside; like every
       candidate, ``a`` has at least ``min(fragment_containment, coincident_iou)``
       of its mask in ``b``'s).

    or 4. 1 holds and ``a``'s reflections lie on ``b``'s reciprocal lattice (where
       their spots are, ``measured``; :func:`~spedflow.segment._lattice.same_lattice`,
       within ``params.lattice_bend`` of rotation, beyond chance at
       ``params.lattice_significance``).

    or 5. 1 holds and the reflections seen in ``a``'s area are ``b``'s crystal's
       (``seen_in``; :func:`~spedflow.segment._lattice.one_lattice`): those showing at
       ``params.area_reflections`` of its positions or more, and ``a``'s own
       (``measured``; one of them at least seen that often in ``a``'s area or in
       ``b``'s), all lie on the lattice of those seen in ``b``'s area, and nearly all
       of ``b``'s on theirs. A part of a crystal whose thickness varies is lit by one
       pair of reflections (thickness fringes): too few for rule 4, while all of the
       crystal's reflections show in it. A crystal inside ``b`` shows its own.
       Left out of the test: reflections that another group ``c`` overlapping ``a``
       (and lying mostly outside ``b``) shows and ``b``'s area does not, since a crystal
       overlapping in projection adds its own spots; and ``a``'s own vectors near
       which no spot was found in any of its segments (``lit``).

    or 6. ``a``'s and ``b``'s masks come within ``params.adjacent_gap`` scan positions
       of each other (side by side: containment aside) and rule 5's test holds both
       ways, ``a`` on ``b``'s lattice and ``b`` on ``a``'s: the halves of a bent crystal,
       each lit by reflections of its own (at most ``params.adjacent_shared`` of the
       smaller one's vectors shared: two crystals of one orientation side by side are
       lit by the same ones). Tested after rules 1-5, on what they left; the folded
       mask is the union of both.

    A fragment's vectors belong to the same crystal, whose thickness scales every
    reflection alike where diffraction is kinematic: their images follow ``b``'s
    everywhere. Where it is not (thickness fringes, bending), one crystal's
    reflections vary unlike each other across it and the correlation merge splits
    its vectors into groups on one mask: rule 3; or it cuts the crystal into parts,
    each lit by other reflections of it (a bent crystal excites different
    reflections on different parts), whose vectors are points of one lattice:
    rule 4. A different crystal
    inside ``b`` (a weak crystal over a strong one) is bright in its own vectors on
    its own part, whatever leaks into their apertures from ``b``'s spots elsewhere:
    the correlation is moderate and the ratio higher on ``a``. (On small crystals the
    background subtraction cuts weak reflections to zero on the thin edges, which
    also raises a true fragment's ratio on the thick core; a correlation of 0.9 or
    more is taken as one crystal whatever the ratio.)

    Segments are visited from the smallest mask up, each folded into the qualifying
    candidate whose profile correlates best with its own; what is folded into is
    itself still a candidate for a larger one.

    Parameters
    ----------
    result : MergeResult
        From :func:`merge_vdf_segments`.
    images : (N, Y, X) array, or zarr array (read an image at a time)
        The VDF images of all vectors (``result.vectors``), same scan shape.
    params : VDFMergeParams, optional
    measured : sequence of (n_l, 2) arrays, optional
        Where each summed segment's reflections are, per member vector
        (:func:`~spedflow.segment.member_positions`): rule 4 indexes these. A segment
        can be lit by a reflection of its crystal whose spot lies off the vector's
        centre (a neighbouring crystal's spot, picked as the vector, lies within the
        clustering radius of it); the vector is then off the crystal's lattice while
        the spot is on it. Default: the vectors themselves.
    seen_in : (counts (n, N), positions (n, N, 2)), optional
        Per summed segment and vector, the scan positions of its mask showing that
        vector's reflection and their mean position
        (:func:`~spedflow.segment.area_reflections`): rules 5 and 6. Default: neither.
    lit : sequence of (n_l,) arrays, optional
        Per summed segment and member vector, the intensity of the spots found near the
        vector in its segments (:func:`~spedflow.segment.member_positions` with
        ``return_weights``): rule 5 leaves out vectors with none. Default: none left out.

    Returns
    -------
    MergeResult
        Folded segments: summed images added (inside the larger mask), vector
        memberships united (intensities of shared vectors added), input segments
        concatenated; ordered by decreasing total as before.
    """
    params = VDFMergeParams() if params is None else params
    images = _check_images(result, images)
    n = len(result.summed)
    if n < 2 or (params.fragment_containment > 1 and params.coincident_iou > 1):
        return result
    masks, area, inter = _mask_overlaps(result)  # masks change in rule 6 only
    profile = np.stack([images.sum_of(m).astype(np.float32) for m in result.members])  # (n, P)
    summed = [s.reshape(-1).astype(np.float64) for s in result.summed]
    members = [dict(zip(m.tolist(), i.tolist())) for m, i in zip(result.members, result.intensities)]
    if measured is None:
        measured = [result.vectors[m] for m in result.members]
    if len(measured) != n or any(np.shape(g) != (m.size, 2) for g, m in zip(measured, result.members)):
        raise InputError("`measured` must hold one (n_l, 2) array per summed segment, a row per "
                         "member vector")
    where = [dict(zip(m.tolist(), np.asarray(g, np.float64))) for m, g in zip(result.members, measured)]
    seen = _seen(seen_in, area, len(result.vectors), params)
    if lit is None:
        lit = [np.ones(m.size) for m in result.members]
    if len(lit) != n or any(np.shape(w) != (m.size,) for w, m in zip(lit, result.members)):
        raise InputError("`lit` must hold one (n_l,) array per summed segment, an entry per "
                         "member vector")
    lit = [dict(zip(m.tolist(), np.asarray(w, np.float64).tolist())) for m, w in zip(result.members, lit)]
    segs = list(result.segment_members)
    alive = np.ones(n, dtype=bool)

    def left_out(a, b):
        """Rule 5's reflections of ``a`` that are no evidence for or against ``b``: those
        of a crystal overlapping ``a`` in projection, and own vectors without a spot."""
        skip = {v for v in where[a] if lit[a].get(v, 0.0) <= 0}
        for c in np.flatnonzero(inter[a] > 0):
            if c != a and c != b and alive[c] and inter[c, b] < 0.5 * area[c]:
                skip |= (seen[c].keys() - seen[b].keys()) & (seen[a].keys() | where[a].keys())
        return skip

    def fold(a, best, *, union=False):
        summed[best] = summed[best] + (summed[a] if union else summed[a] * masks[best])
        for v, i in members[a].items():
            members[best][v] = members[best].get(v, 0.0) + i
            where[best].setdefault(v, where[a][v])
            lit[best][v] = lit[best].get(v, 0.0) + lit[a][v]
        segs[best] = np.sort(np.concatenate([segs[best], segs[a]]))
        profile[best] = images.sum_of(sorted(members[best]))
        alive[a] = False

    for a in sorted(range(n), key=lambda i: (area[i], i)):
        best, best_corr = None, -np.inf
        for b in np.flatnonzero(inter[a] >= min(params.fragment_containment,
                                                params.coincident_iou) * area[a]):
            if b == a or not alive[b] or area[b] < area[a]:
                continue
            r = _pearson_1d(profile[a][masks[b]], profile[b][masks[b]])
            coincide = params.coincident_iou <= 1 and (
                inter[a, b] >= params.coincident_iou * (area[a] + area[b] - inter[a, b])
                or (2 * inter[a, b] >= area[a] + area[b] - inter[a, b]
                    and _within_rim(masks[a], masks[b], result.summed.shape[1:])))
            contained = inter[a, b] >= params.fragment_containment * area[a]
            if r > best_corr and (coincide or (contained and (
                    _lights_up(profile[a], profile[b], masks[a], masks[b], r, params)
                    or _on_lattice(where[a], where[b], params)
                    or _one_crystal(seen[a], where[a], seen[b], params, left_out(a, b))))):
                best, best_corr = b, r
        if best is not None:
            fold(a, best)
    # rule 6: parts side by side, one lattice both ways (masks grow by the union),
    # smallest first, in passes until none folds
    shape = result.summed.shape[1:]
    folded = params.adjacent_gap > 0 and any(seen) and alive.sum() > 1
    if folded:
        near = _adjacent(masks, shape, int(params.adjacent_gap))
    while folded:
        folded = False
        for a in sorted(np.flatnonzero(alive), key=lambda i: (area[i], i)):
            if not alive[a]:
                continue
            best, best_corr = None, -np.inf
            for b in np.flatnonzero(near[a] & alive & (area >= area[a])):
                shared = len(members[a].keys() & members[b].keys())
                smaller = min(len(members[a]), len(members[b]))
                if b == a or shared > params.adjacent_shared * smaller:
                    continue  # the same reflections on both sides: two crystals of one orientation
                if not (_one_crystal(seen[a], where[a], seen[b], params, left_out(a, b))
                        and _one_crystal(seen[b], where[b], seen[a], params, left_out(b, a))):
                    continue
                r = _pearson_1d(profile[a], profile[b])
                if r > best_corr:
                    best, best_corr = b, r
            if best is not None:
                fold(a, best, union=True)
                masks[best] |= masks[a]
                area[best] = masks[best].sum()
                near[best] |= near[a]
                near[:, best] |= near[:, a]
                folded = True
    keep = [i for i in range(n) if alive[i]]
    if len(keep) == n:
        return result
    order = sorted(keep, key=lambda i: (-summed[i].sum(), i))
    return MergeResult(
        np.stack([summed[i] for i in order]).astype(np.float32).reshape((len(order),) + shape),
        tuple(np.array(sorted(members[i]), np.int64) for i in order),
        tuple(np.array([members[i][v] for v in sorted(members[i])], np.float64) for i in order),
        tuple(segs[i] for i in order), result.vectors, result.n_groups)


def drop_shared_reflections(result: MergeResult, images: np.ndarray,
                            params: VDFMergeParams | None = None) -> MergeResult:
    """Drop groups that are the shared reflections of better-supported crystals.

    Crystals of one phase share reflections: where the spots of two crystals fall on
    the same vector (the same ``|g|`` at nearly the same azimuth), that vector's VDF
    image shows both crystals, and its segments (with its Friedel mate's) form a
    group of their own whose mask covers both. It is not a crystal; its vectors
    belong to each of the crystals it covers.

    A group ``a`` is such a union when at least ``params.fragment_containment`` of its
    mask lies inside the masks of other groups that each have more distinct vectors
    than ``a`` and each either lie at least ``params.shared_coverage`` inside ``a``'s
    mask or are lit up by ``a``'s vectors all over, beyond ``a``'s mask as inside it
    (the test of :func:`fold_fragments`), and there are two or more of those. The
    second kind is the shared reflection of large crystals (hundreds of positions
    across): the watershed cuts its image into bands across them, each band less than
    half of any of them. A crystal there is bright in its own vectors on its own mask
    only, and stays. A group kept by the Friedel rule alone (fewer
    than ``params.vector_threshold`` vectors) needs only one, if its vectors also light
    up all of that crystal (the test of :func:`fold_fragments`): a reflection pair
    whose segment lies inside a better-supported crystal, covers most of it and
    follows its thickness everywhere is that crystal's (the watershed of its image,
    lit by a second crystal too, did not cut the same mask). A weak crystal over a
    strong one is bright in its own vectors on its own part only, and stays.

    The dropped group's vectors join each covering crystal (that is not dropped
    itself), with the total of the vector's whole VDF image over the crystal's mask
    as intensity, so the crystals' virtual patterns keep their shared spots. The
    groups are tested against the input groups, so the result does not depend on
    their order.

    Parameters
    ----------
    result : MergeResult
        From :func:`merge_vdf_segments` (or :func:`drop_radial_pairs`).
    images : (N, Y, X) array, or zarr array (read an image at a time)
        The VDF images of all vectors (``result.vectors``).
    params : VDFMergeParams, optional

    Returns
    -------
    MergeResult
        The remaining groups in the same order.
    """
    params = VDFMergeParams() if params is None else params
    images = _check_images(result, images)
    n = len(result.summed)
    if n < 2 or params.shared_coverage > 1:
        return result
    masks, area, inter = _mask_overlaps(result)
    n_vec = np.array([m.size for m in result.members])
    summed = [None] * n  # each group's vectors' images, summed (when first needed)

    def image_of(g):
        if summed[g] is None:
            summed[g] = images.sum_of(result.members[g])
        return summed[g]

    covers = {}
    for a in range(n):
        if area[a] == 0:
            continue
        # better-supported crystals covering part of a: lying mostly inside it, or lit up
        # by its vectors all over, beyond a's mask as well (those vectors are theirs)
        bs, lit = [], []
        for b in np.flatnonzero((n_vec > n_vec[a]) & (area > 0) & (inter[a] > 0)):
            r = _pearson_1d(image_of(a)[masks[b]], image_of(b)[masks[b]])
            lights = _lights_up(image_of(a), image_of(b), masks[a], masks[b], r, params)
            if lights or inter[a, b] >= params.shared_coverage * area[b]:
                bs.append(b)
                lit.append(lights)
        if len(bs) == 0 or (len(bs) < 2 and n_vec[a] >= params.vector_threshold):
            continue
        if len(bs) == 1 and not (lit[0] and inter[a, bs[0]] >= params.shared_coverage * area[bs[0]]):
            continue  # one crystal: it must lie mostly inside a and be lit up by a's vectors
        union = masks[bs].any(axis=0)
        if (union & masks[a]).sum() < params.fragment_containment * area[a]:
            continue
        covers[a] = np.array(bs)
    if not covers:
        return result
    members = [dict(zip(m.tolist(), i.tolist())) for m, i in zip(result.members, result.intensities)]
    for a, bs in covers.items():
        for b in bs:
            if b in covers:
                continue
            for v in result.members[a].tolist():
                if v not in members[b]:
                    members[b][v] = float(images.flat(v)[masks[b]].sum(dtype=np.float64))
    keep = [i for i in range(n) if i not in covers]
    mem = tuple(np.array(sorted(members[i]), dtype=np.int64) for i in keep)
    inten = tuple(np.array([members[i][v] for v in sorted(members[i])], dtype=np.float64)
                  for i in keep)
    return MergeResult(result.summed[keep], mem, inten,
                       tuple(result.segment_members[i] for i in keep), result.vectors,
                       result.n_groups)


def split_overlapping(result: MergeResult, params: VDFMergeParams | None = None) -> MergeResult:
    """Cut each group that is two crystals of one orientation overlapping in two
    (:func:`~spedflow.segment.overlap_cut` with ``params.overlap_contrast``).

    Both parts keep the group's vectors and input segments (one orientation, the same
    reflections); each vector's intensity is scaled by the part's share of the group's
    summed map, so both virtual patterns keep the group's relative intensities.
    """
    from ._overlap import split_overlaps
    params = VDFMergeParams() if params is None else params
    if not len(result.summed) or params.overlap_contrast <= 0:
        return result
    summed, origin = split_overlaps(result.summed, params.overlap_contrast)
    if len(origin) == len(result.summed):
        return result
    totals = result.summed.reshape(len(result.summed), -1).sum(axis=1, dtype=np.float64)
    parts = summed.reshape(len(summed), -1).sum(axis=1, dtype=np.float64)
    share = parts / np.where(totals[origin] > 0, totals[origin], 1.0)
    order = np.argsort(-parts, kind="stable")  # by decreasing total, as documented
    return MergeResult(summed[order], tuple(result.members[origin[i]] for i in order),
                       tuple(result.intensities[origin[i]] * share[i] for i in order),
                       tuple(result.segment_members[origin[i]] for i in order), result.vectors,
                       result.n_groups)


def drop_radial_pairs(result: MergeResult, images: np.ndarray,
                      params: VDFMergeParams | None = None, *, radius: float) -> MergeResult:
    """Drop groups kept by the Friedel rule alone whose signal is not azimuthally local.

    The Friedel rule (``VDFMergeParams.friedel_tolerance``) keeps a group of fewer than
    ``vector_threshold`` vectors when it holds a pair ``g, -g``, because noise has no
    reason to respect that symmetry. A radially symmetric background does: the glare
    of a clipped beam, the film's diffuse scattering, the edge of a saturated
    plateau whose radius follows the film thickness. It lights the VDF images of
    every vector at that ``|g|`` alike, and the watershed cuts the film from the holes
    in each. Bragg scattering is local in azimuth: on a crystal's mask the pair's
    images stand out from those of the other vectors at the same ``|g|``.

    A group with fewer than ``params.vector_threshold`` distinct vectors is kept when
    the on/off-mask contrast (mean inside / mean outside its mask) of the weaker of
    its vectors' *whole* VDF images is at least ``params.friedel_ring_contrast`` times
    the median contrast, on the same mask, of the other vectors whose ``|g|`` is within
    ``radius`` (the VDF disc radius) of the group's mean ``|g|``. Without such vectors,
    or with a mask of all or no pixels, the group is kept.

    Parameters
    ----------
    result : MergeResult
        From :func:`merge_vdf_segments`.
    images : (N, Y, X) array, or zarr array (read an image at a time)
        The VDF images of all vectors (``result.vectors``).
    params : VDFMergeParams, optional
    radius : float
        VDF disc radius, detector pixels.

    Returns
    -------
    MergeResult
        The same groups in the same order, less the dropped ones.
    """
    params = VDFMergeParams() if params is None else params
    images = _check_images(result, images)
    n = len(result.summed)
    if params.friedel_ring_contrast == 0:
        return result
    g = np.hypot(result.vectors[:, 0], result.vectors[:, 1])
    keep = []
    for i, mem in enumerate(result.members):
        mask = result.summed[i] > 0
        if mem.size >= params.vector_threshold or mask.all() or not mask.any():
            keep.append(i)
            continue
        mates = np.flatnonzero(np.abs(g - g[mem].mean()) <= radius)
        mates = mates[~np.isin(mates, mem)]
        if mates.size == 0:  # nothing to compare with
            keep.append(i)
            continue
        own = min(_contrast(images.image(v), mask) for v in mem)
        ring = float(np.median([_contrast(images.image(v), mask) for v in mates]))
        if own >= params.friedel_ring_contrast * ring:
            keep.append(i)
    if len(keep) == n:
        return result
    return result.kept(keep)


#: :func:`drop_rims`: the least fraction of a group's mask within ``rim_width`` of the
#: larger group's. On the 38 simulated sets of four simulators the groups it drops
#: (two, neither a crystal) lie 0.85 and 1.00 there; the ten crystals whose vectors are
#: a subset of another group's, at most 0.25.
_RIM_FRACTION = 0.75


def drop_rims(result: MergeResult, params: VDFMergeParams | None = None) -> MergeResult:
    """Drop groups that are another crystal's rim.

    A group is dropped when every one of its vectors belongs to a group with more
    vectors and at least three quarters of its mask lies within ``params.rim_width``
    scan positions (4-connected steps) of that group's mask, inside it or around it.
    Such a group holds a few of the crystal's reflections where the crystal's own
    group does not reach: the probe's tail beyond the crystal's edge, or thickness
    fringes at its thin edge lighting weak reflections in a ring. It adds no vector,
    and folding it into the crystal would widen the crystal by its rim. A crystal of
    its own with a subset of another's reflections (the same phase, a shared
    systematic row) lies mostly away from the other's mask.

    Parameters
    ----------
    result : MergeResult
    params : VDFMergeParams, optional

    Returns
    -------
    MergeResult
        The same groups in the same order, less the dropped ones.
    """
    params = VDFMergeParams() if params is None else params
    n = len(result.summed)
    if params.rim_width == 0 or n < 2:
        return result
    masks = result.summed > 0
    sets = [frozenset(m.tolist()) for m in result.members]
    grown = {}  # each larger group's mask grown by rim_width, once

    def is_rim(g):
        area = int(masks[g].sum())
        for h in range(n):
            if h == g or not area or not sets[g] < sets[h]:
                continue
            if h not in grown:
                grown[h] = ndimage.binary_dilation(masks[h], iterations=params.rim_width)
            if (masks[g] & grown[h]).sum() >= _RIM_FRACTION * area:
                return True
        return False

    keep = [g for g in range(n) if not is_rim(g)]
    if len(keep) == n:
        return result
    return result.kept(keep)


#: Floor of the off-mask mean in :func:`_contrast`, relative to the image's mean: DoG
#: images are exactly 0 in the holes, and 0 / 0 or x / 0 must not decide anything.
_CONTRAST_FLOOR = 1e-3


def _contrast(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean of a (non-negative) VDF image inside ``mask`` over its mean outside (the
    latter floored at ``_CONTRAST_FLOOR`` times the image's mean); 0 for an empty image."""
    level = float(image.mean(dtype=np.float64))
    if level <= 0:
        return 0.0
    off = float(image[~mask].mean(dtype=np.float64))
    on = float(image[mask].mean(dtype=np.float64))
    return on / max(off, _CONTRAST_FLOOR * level)


#: Fragment folding: the contrast test needs at least this fraction of b outside a.
_MIN_REST = 0.1
#: Fragment folding: profiles this correlated are one crystal whatever the contrast.
_FOLD_CORR = 0.9


def _lights_up(pa, pb, in_a, in_b, r, params) -> bool:
    """Condition 2 of :func:`fold_fragments`: a's vectors light up all of b."""
    if r <= params.corr_threshold:
        return False
    if r >= _FOLD_CORR:
        return True
    rest = in_b & ~in_a
    inside = in_a & in_b
    pb_in, pb_out = pb[inside].sum(), pb[rest].sum()
    if rest.sum() < _MIN_REST * in_b.sum() or pb_in <= 0 or pb_out <= 0:
        return False
    r_in, r_out = pa[inside].sum() / pb_in, pa[rest].sum() / pb_out
    return bool(r_out > 0 and r_in <= params.fragment_contrast * r_out)


#: A mask "lies within one pixel" of another with at most this fraction of its pixels
#: (and at least one) beyond: a stray pixel of a noisy threshold does not break it.
STRAY_FRACTION = 0.05


def _within_rim(mask_a: np.ndarray, mask_b: np.ndarray, shape) -> bool:
    """Whether two flat masks (of a scan of ``shape``) each lie inside the other grown by
    one pixel (4-connected): the same outline, up to where the watershed put its edge,
    and up to a stray pixel in twenty (``STRAY_FRACTION``, at least one), where noise
    crossed the threshold away from the outline."""
    a, b = mask_a.reshape(shape), mask_b.reshape(shape)
    rows, cols = np.flatnonzero((a | b).any(axis=1)), np.flatnonzero((a | b).any(axis=0))
    if not rows.size:
        return False
    box = (slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2))
    a, b = a[box], b[box]
    cross = ndimage.generate_binary_structure(2, 1)

    def inside(x, y):
        stray = int((x & ~ndimage.binary_dilation(y, cross)).sum())
        return stray <= max(1, int(STRAY_FRACTION * x.sum()))
    return inside(a, b) and inside(b, a)


def _adjacent(masks: np.ndarray, shape, gap: int) -> np.ndarray:
    """(L, L) bool: which masks (L, P) come within ``gap`` scan positions (4-connected
    steps) of each other, overlapping ones included."""
    grown = np.stack([ndimage.binary_dilation(m.reshape(shape), iterations=gap).ravel()
                      for m in masks])
    return (sparse.csr_matrix(grown, dtype=np.float32)
            @ sparse.csr_matrix(masks, dtype=np.float32).T).toarray() > 0


def _on_lattice(where_a: dict, where_b: dict, params) -> bool:
    """Condition 4 of :func:`fold_fragments`: a's reflections lie on b's lattice
    (``where_*``: member vector -> measured position, in vector order)."""
    if params.lattice_significance <= 0:
        return False
    return same_lattice(np.array([where_a[v] for v in sorted(where_a)]),
                        np.array([where_b[v] for v in sorted(where_b)]),
                        tolerance=params.friedel_tolerance, bend=params.lattice_bend,
                        significance=params.lattice_significance)


def _seen(seen_in, sizes: np.ndarray, n_vectors: int, params) -> list:
    """Per summed segment, the reflections seen at ``params.area_reflections`` of its
    positions or more: vector -> mean position (empty dicts without ``seen_in``)."""
    n = len(sizes)
    if seen_in is None or params.area_reflections <= 0:
        return [{} for _ in range(n)]
    counts, positions = seen_in
    counts, positions = np.asarray(counts), np.asarray(positions, np.float64)
    if counts.shape != (n, n_vectors) or positions.shape != (n, n_vectors, 2):
        raise InputError(f"`seen_in` must hold counts ({n}, {n_vectors}) and positions "
                         f"({n}, {n_vectors}, 2), a row per summed segment")
    out = []
    for i in range(n):
        often = np.flatnonzero((counts[i] >= params.area_reflections * sizes[i]) & (counts[i] > 0))
        out.append({int(v): positions[i, v] for v in often})
    return out


def _one_crystal(seen_a: dict, where_a: dict, seen_b: dict, params, skip=frozenset()) -> bool:
    """Condition 5 of :func:`fold_fragments`: the reflections seen in a's area, and a's
    own, are those of the crystal seen in b's.

    One of a's own vectors at least must itself be seen often, in a's area or in b's: a
    band of b's crystal is lit by a reflection the peak finder finds there, while a weak
    crystal inside b lights its vectors' discs without its spots being found at most of
    its positions, and its area then shows b's reflections only. (Not every vector: a
    segment lit by a neighbouring reflection off its vector's centre has its peaks
    counted at that reflection's own vector, or at none.) Vectors in ``skip`` are left
    out of a's, own and seen, the guard's too."""
    if not seen_a or not seen_b or params.lattice_significance <= 0:
        return False
    own = {v: g for v, g in where_a.items() if v not in skip}
    if not any(v in seen_a or v in seen_b for v in own):
        return False
    # a member seen often: where it is seen
    ga = {**own, **{v: g for v, g in seen_a.items() if v not in skip}}
    return one_lattice(np.array([ga[v] for v in sorted(ga)]),
                       np.array([seen_b[v] for v in sorted(seen_b)]),
                       tolerance=params.friedel_tolerance, bend=params.lattice_bend,
                       significance=params.lattice_significance)


def _pearson_1d(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean(dtype=np.float64)
    y = y - y.mean(dtype=np.float64)
    x, y = x.astype(np.float64), y.astype(np.float64)
    d = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / d if d > 0 else 0.0


def virtual_patterns(vectors: np.ndarray, members: Sequence, intensities: Sequence,
                     shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Virtual diffraction patterns: one Gaussian spot per member vector.

    Parameters
    ----------
    vectors : (N, 2) array_like of float
        ``(gy, gx)`` relative to the direct beam, detector pixels; the beam is drawn
        at ``(Ky // 2, Kx // 2)`` (not itself added).
    members : sequence of L int arrays
        Vector indices of each pattern (``MergeResult.members``).
    intensities : sequence of L float arrays
        Intensity of each member vector (``MergeResult.intensities``).
    shape : (Ky, Kx)
        Detector shape, pixels.
    sigma : float
        Gaussian width, detector pixels (:func:`spedflow.segment.pattern_sigma`).

    Returns
    -------
    (L, Ky, Kx) numpy.ndarray of float32
        Each spot is ``I / (2 pi sigma^2) exp(-r^2 / (2 sigma^2))``: its integral
        over the plane is the vector's intensity (as in the reference), so spot
        sums compare with the VDF intensities whatever sigma is.
    """
    check_range("sigma", sigma, low=0, low_open=True)
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[1] != 2:
        raise InputError(f"`vectors` must have shape (N, 2); got {vectors.shape}")
    if len(shape) != 2 or any(int(s) != s or s < 1 for s in shape):
        raise ParameterError(f"`shape` must be two positive integers (Ky, Kx); got {shape!r}")
    if len(members) != len(intensities):
        raise InputError(f"`members` ({len(members)}) and `intensities` ({len(intensities)}) "
                         "must have the same length")
    ky, kx = int(shape[0]), int(shape[1])
    yy = np.arange(ky, dtype=np.float64) - ky // 2
    xx = np.arange(kx, dtype=np.float64) - kx // 2
    out = np.zeros((len(members), ky, kx), dtype=np.float32)
    for i, (mem, inten) in enumerate(zip(members, intensities)):
        mem = np.asarray(mem, dtype=np.int64).reshape(-1)
        inten = np.asarray(inten, dtype=np.float64).reshape(-1)
        if mem.shape != inten.shape:
            raise InputError(f"pattern {i}: {mem.size} members but {inten.size} intensities")
        if mem.size and (mem.min() < 0 or mem.max() >= vectors.shape[0]):
            raise InputError(f"pattern {i}: member indices must be in [0, {vectors.shape[0]})")
        g = vectors[mem]
        gy = np.exp(-(yy[None, :] - g[:, :1]) ** 2 / (2 * sigma**2))  # (n, Ky)
        gx = np.exp(-(xx[None, :] - g[:, 1:]) ** 2 / (2 * sigma**2))  # (n, Kx)
        out[i] = (gy.T * (inten / (2 * np.pi * sigma**2))) @ gx
    return out


def merge_components(factors: np.ndarray, loadings: np.ndarray, *,
                     pattern_threshold: float = NMFMergeParams.pattern_threshold,
                     loading_threshold: float = NMFMergeParams.loading_threshold,
                     pattern_mask: np.ndarray | None = None,
                     ) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Sum NMF components of the same crystal (paper, Fig. 2B).

    Components form a group when, for EVERY pair in it, the Pearson correlation of
    the patterns exceeds ``pattern_threshold`` AND that of the loadings exceeds
    ``loading_threshold`` (complete linkage on
    ``max((1 - c_p) / (1 - t_p), (1 - c_l) / (1 - t_l))`` cut below 1). Patterns and
    loadings of a group are summed, as in the paper.

    Parameters
    ----------
    factors : (E, Ky, Kx) array_like of float
        Component patterns.
    loadings : (E, Y, X) array_like of float
        Loading maps.
    pattern_threshold, loading_threshold : float
        See :class:`NMFMergeParams`.
    pattern_mask : (Ky, Kx) array_like of bool, optional
        Detector pixels used for the pattern correlation (e.g. False on the
        direct beam, which every pattern shares). Default: all.

    Returns
    -------
    factors : (F, Ky, Kx) numpy.ndarray of float32
    loadings : (F, Y, X) numpy.ndarray of float32
    groups : tuple of F int64 arrays
        Sorted input component indices of each merged component; groups are ordered
        by their smallest member.
    """
    NMFMergeParams(pattern_threshold, loading_threshold)  # validates
    factors = np.asarray(factors, dtype=np.float64)
    loadings = np.asarray(loadings, dtype=np.float64)
    if factors.ndim != 3 or loadings.ndim != 3:
        raise InputError(f"`factors` (shape {factors.shape}) and `loadings` (shape "
                         f"{loadings.shape}) must be 3-D (E, ., .)")
    if factors.shape[0] != loadings.shape[0]:
        raise InputError(f"`factors` has {factors.shape[0]} components but `loadings` has "
                         f"{loadings.shape[0]}")
    if not np.isfinite(factors).all() or not np.isfinite(loadings).all():
        raise InputError("`factors` and `loadings` must be finite (no NaN/inf)")
    e = factors.shape[0]
    fp = factors.reshape(e, -1)
    if pattern_mask is not None:
        pattern_mask = np.asarray(pattern_mask, dtype=bool)
        if pattern_mask.shape != factors.shape[1:]:
            raise InputError(f"`pattern_mask` (shape {pattern_mask.shape}) must have the "
                             f"pattern shape {factors.shape[1:]}")
        fp = fp[:, pattern_mask.ravel()]
    fl = loadings.reshape(e, -1)
    if e == 0:
        return (np.zeros(factors.shape, np.float32), np.zeros(loadings.shape, np.float32), ())
    canon = _canonical_order(np.concatenate([fp, fl], axis=1))
    cp = correlation_matrix(fp)[np.ix_(canon, canon)]
    cl = correlation_matrix(fl)[np.ix_(canon, canon)]
    dist = np.maximum((1 - cp) / (1 - pattern_threshold), (1 - cl) / (1 - loading_threshold))
    groups = sorted((np.sort(canon[g]) for g in _complete_groups(dist, 1.0)),
                    key=lambda g: g[0])
    return summed_groups(factors, loadings, groups)


def summed_groups(factors: np.ndarray, loadings: np.ndarray, groups) -> tuple:
    """``(factors, loadings, groups)`` of :func:`merge_components` for the given groups
    (index arrays): each group's factors and loadings summed, float32."""
    merged_f = np.stack([factors[g].sum(axis=0) for g in groups]).astype(np.float32)
    merged_l = np.stack([loadings[g].sum(axis=0) for g in groups]).astype(np.float32)
    return merged_f, merged_l, tuple(np.asarray(g, np.int64) for g in groups)


# -- helpers --------------------------------------------------------------------------

#: :func:`segment_reliability`: the lowest reliability a correlation is corrected for
#: (a segment whose pixel noise outweighs its signal is not rescued: at most 2x).
RELIABILITY_FLOOR = 0.5
#: Fewest pairs of neighbouring positions inside a segment to measure its noise on.
_MIN_NOISE_PAIRS = 8
#: :func:`segment_reliability` takes the segments' pixels about this many at a time.
_BLOCK_VALUES = 1 << 20


def segment_reliability(flat, scan_shape: tuple[int, int]) -> np.ndarray:
    """Share of each segment image's variance over the scan that is not pixel noise.

    A VDF image is a crystal's signal, smooth over neighbouring scan positions, plus
    counting noise, independent from position to position. The noise of a segment is
    measured on the differences of horizontally and vertically neighbouring positions
    of its interior (both with all four neighbours in the segment: across its edge the
    difference is the signal's step), robustly (the MAD, divided by sqrt(2)); its
    reliability is
    ``1 - n sigma^2 / (P var)``: ``n`` positions in the segment, ``P`` in the scan,
    ``var`` the image's variance over the scan (what the Pearson correlation divides
    by). Two noisy images of one signal correlate ``sqrt(rel_a rel_b)`` times as much
    as the signals do (Spearman's attenuation), which at low dose keeps the segments
    of one crystal apart (a median correlation of 0.51 at 1,000 counts per pattern).
    Clipped to [:data:`RELIABILITY_FLOOR`, 1]; NaN where a segment's interior has
    fewer than :data:`_MIN_NOISE_PAIRS` neighbouring pairs (a grain a few positions
    across: its noise cannot be told from its shape), and a pair with such a segment
    is not corrected (:func:`_correction`): corrected by the other's alone, a grain of
    30 positions joined a 90-position segment spanning its neighbours, whose steps
    between grains counted as noise (a dense aggregate at full dose).

    Parameters
    ----------
    flat : (M, Y * X) array_like or scipy.sparse matrix
        Segments, zero outside their masks.
    scan_shape : (Y, X)

    Returns
    -------
    (M,) numpy.ndarray of float64, NaN where not measured
    """
    nx = int(scan_shape[1])
    s = sparse.csr_matrix(flat, dtype=np.float32, copy=True)  # sorted below: not the caller's
    s.eliminate_zeros()
    s.sort_indices()
    m, p = s.shape
    sigma2 = np.full(m, np.nan)
    # rows a block at a time: a 512 x 512 scan's segments hold ~10^7 pixels
    for r0, r1 in _row_blocks(s.indptr, _BLOCK_VALUES):
        idx = s.indices[s.indptr[r0]:s.indptr[r1]].astype(np.int64)
        val = s.data[s.indptr[r0]:s.indptr[r1]].astype(np.float64)
        rows = np.repeat(np.arange(r0, r1), np.diff(s.indptr[r0:r1 + 1]))
        keys = (rows - r0) * p + idx  # ascending

        def present(step, ok):
            """Where ``key + step`` is in the block too (and ``ok``), and its index."""
            at = np.clip(np.searchsorted(keys, keys + step), 0, max(keys.size - 1, 0))
            return ok & (keys[at] == keys + step), at

        # interior positions (all four neighbours in the segment): a difference across
        # the segment's edge would be its signal's step, not noise
        right, at_r = present(1, idx % nx != nx - 1)
        down, at_d = present(nx, idx + nx < p)
        inner = right & down & present(-1, idx % nx != 0)[0] & present(-nx, idx >= nx)[0]
        diffs, owner = [], []
        for hit, at in ((right, at_r), (down, at_d)):
            hit = hit & inner
            hit[hit] = inner[at[hit]]
            diffs.append(val[at[hit]] - val[hit])
            owner.append(rows[hit])
        d, owner = np.concatenate(diffs), np.concatenate(owner)
        order = np.argsort(owner, kind="stable")
        d, owner = d[order], owner[order]
        bounds = np.searchsorted(owner, np.arange(r0, r1 + 1))
        for k in np.flatnonzero(np.diff(bounds) >= _MIN_NOISE_PAIRS):
            x = d[bounds[k]:bounds[k + 1]]
            mad = 1.4826 * np.median(np.abs(x - np.median(x)))
            sigma2[r0 + k] = mad * mad / 2.0
    total = _row_sums(s)
    ss = _row_sums(s, square=True) - total * total / p  # P var
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = 1.0 - np.diff(s.indptr) * sigma2 / ss
    return np.clip(rel, RELIABILITY_FLOOR, 1.0)  # NaN stays NaN


def _row_blocks(indptr: np.ndarray, size: int):
    """``(r0, r1)`` ranges of CSR rows holding about ``size`` values each (a longer
    row on its own)."""
    m = len(indptr) - 1
    r0 = 0
    while r0 < m:
        r1 = max(r0 + 1, int(np.searchsorted(indptr, indptr[r0] + size, side="right")) - 1)
        r1 = min(r1, m)
        yield r0, r1
        r0 = r1


def _pairs_above(flat, threshold: float, reliability: np.ndarray | None = None):
    """Pairs ``i < j`` of rows whose Pearson correlation exceeds ``threshold`` (> 0);
    with ``reliability`` (:func:`segment_reliability`), the correlation divided by
    ``sqrt(rel_i rel_j)`` where both are measured (:func:`_correction`; at most 1).

    Segments are zero outside their masks: two that do not overlap correlate
    negatively, so only overlapping pairs (the non-zeros of the sparse Gram matrix)
    can pass. Memory scales with the overlapping pairs, not with M^2 (a 512 x 512
    scan has ~10^4 segments: a dense correlation matrix is 0.9 GB per copy).
    """
    m, p = flat.shape
    if not sparse.issparse(flat) and np.count_nonzero(flat) >= 0.1 * flat.size:
        c = _disattenuated(correlation_matrix(flat), reliability)  # dense images: M is small
        i, j = np.nonzero(np.triu(c > threshold, k=1))
        return i, j, c[i, j]
    s = sparse.csr_matrix(flat, dtype=np.float64)
    mean = _row_sums(s) / p
    var = _row_sums(s, square=True) - p * mean ** 2
    gram = sparse.triu(s @ s.T, k=1).tocoo()
    i, j = gram.row.astype(np.intp), gram.col.astype(np.intp)
    denom = np.sqrt(np.clip(var[i], 0, None) * np.clip(var[j], 0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(denom > 0, (gram.data - p * mean[i] * mean[j]) / denom, 0.0)
    if reliability is not None:
        c = c * _correction(reliability[i], reliability[j])
    keep = c > threshold
    return i[keep], j[keep], np.clip(c[keep], -1.0, 1.0)


def _correction(rel_i: np.ndarray, rel_j: np.ndarray) -> np.ndarray:
    """``1 / sqrt(rel_i rel_j)``, and 1 where either is not measured (NaN)."""
    prod = rel_i * rel_j
    return np.where(np.isfinite(prod), 1.0 / np.sqrt(np.where(np.isfinite(prod), prod, 1.0)), 1.0)


def _disattenuated(corr: np.ndarray, reliability: np.ndarray | None) -> np.ndarray:
    """``corr`` times :func:`_correction` in [-1, 1], the diagonal 1 (``reliability``
    None: as is)."""
    if reliability is None:
        return corr
    out = np.clip(corr * _correction(reliability[:, None], reliability[None, :]), -1.0, 1.0)
    np.fill_diagonal(out, 1.0)
    return out


def _complete_groups_sparse(flat, canon: np.ndarray, threshold: float,
                            reliability: np.ndarray | None = None) -> list[np.ndarray]:
    """Complete-linkage groups (every pair correlating above ``threshold``) of the rows.

    Same groups as :func:`_complete_groups` on the full matrix in canonical order
    ``canon``: rows in different connected components of the "correlates above
    threshold" graph can never share a group, so each component is clustered on its
    own (distances of pairs below the threshold only need to be at least the cut).
    Returns the groups as sorted row indices, ordered by their first member in
    canonical order.
    """
    m = flat.shape[0]
    if threshold <= 0:  # non-overlapping segments could pass: use the full matrix
        corr = _disattenuated(correlation_matrix(flat), reliability)[np.ix_(canon, canon)]
        return [np.sort(canon[g]) for g in _complete_groups(1.0 - corr, 1.0 - threshold)]
    rank = np.empty(m, dtype=np.intp)
    rank[canon] = np.arange(m)
    i, j, c = _pairs_above(flat, threshold, reliability)
    i, j = rank[i], rank[j]  # canonical positions
    graph = sparse.coo_matrix((np.ones(i.size), (i, j)), shape=(m, m))
    _, comp = connected_components(graph, directed=False)
    groups = []
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    for members in np.split(order, bounds):  # canonical positions, ascending
        if members.size == 1:
            groups.append(members)
            continue
        local = np.full(m, -1, dtype=np.intp)
        local[members] = np.arange(members.size)
        sel = local[i] >= 0
        dist = np.full((members.size, members.size), 2.0)
        dist[local[i[sel]], local[j[sel]]] = 1.0 - c[sel]
        dist[local[j[sel]], local[i[sel]]] = 1.0 - c[sel]
        groups.extend(members[g] for g in _complete_groups(dist, 1.0 - threshold))
    groups.sort(key=lambda g: g.min())
    return [np.sort(canon[g]) for g in groups]


def _complete_groups(dist: np.ndarray, cut: float) -> list[np.ndarray]:
    """Complete-linkage clusters whose every pairwise distance is strictly < ``cut``."""
    m = dist.shape[0]
    if m == 1:
        return [np.array([0])]
    d = np.maximum((dist + dist.T) / 2, 0.0)
    np.fill_diagonal(d, 0.0)
    z = linkage(squareform(d, checks=False), method="complete")
    labels = fcluster(z, t=np.nextafter(cut, -np.inf), criterion="distance")
    # clusters numbered by their first item (canonical order)
    _, first = np.unique(labels, return_index=True)
    return [np.nonzero(labels == labels[i])[0] for i in np.sort(first)]


def _row_sums(s, square: bool = False) -> np.ndarray:
    """Per-row sums of a CSR matrix's values (or of their squares), in float64, straight
    from its data: no float64 or squared copy of the matrix (on a 512 x 512 scan the
    segments hold ~8 M pixels, ~100 MB per float64 copy)."""
    out = np.zeros(s.shape[0])
    starts = s.indptr[:-1]
    filled = np.diff(s.indptr) > 0
    if filled.any():
        data = s.data[:s.indptr[-1]]
        if square:
            data = np.square(data, dtype=np.float64)
        out[filled] = np.add.reduceat(data, starts[filled], dtype=np.float64)
    return out


def _canonical_order(rows, extra: np.ndarray | None = None) -> np.ndarray:
    """A permutation that sorts items by content, so input order cannot matter."""
    w = np.linspace(1.0, 2.0, rows.shape[1])
    if sparse.issparse(rows):
        r = sparse.csr_matrix(rows)
        keys = [_row_sums(r), _row_sums(r, square=True), np.asarray(r @ w, dtype=np.float64)]
    else:
        keys = np.zeros((3, rows.shape[0]))
        step = max(1, (32 << 20) // (8 * max(rows.shape[1], 1)))  # ~32 MB float64 temporaries
        for start in range(0, rows.shape[0], step):
            block = rows[start:start + step].astype(np.float64)
            keys[:, start:start + step] = [block.sum(axis=1), np.einsum("ij,ij->i", block, block),
                                           block @ w]
        keys = list(keys)
    if extra is not None:
        keys += [extra[:, 1], extra[:, 0]]
    return np.lexsort(keys[::-1])
