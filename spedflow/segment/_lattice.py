"""Do two sets of diffraction vectors belong to one crystal's reciprocal lattice?

A crystal's reflections in one pattern are the points of a 2-D lattice section
(the zero-order Laue zone), ``g = n1 * b1 + n2 * b2`` with integer ``n``. A bent
crystal, or one whose thickness varies, excites different reflections on different
parts of it; the watershed then cuts it into pieces whose vectors are different
points of the same lattice, slightly rotated by the bending. A different crystal
lying on it has its own lattice, and its vectors fall near the first one's points
only by chance. :func:`same_lattice` is that test, used by
:func:`~spedflow.segment.fold_fragments`.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["reciprocal_basis", "same_lattice", "second_lattice", "one_lattice", "off_lattice"]

#: Basis vectors closer to parallel than this |sin(angle)| (15 degrees) span no
#: reliable cell.
_MIN_SIN = math.sin(math.radians(15))
#: The basis is searched among pairs of this many shortest vectors.
_BASIS_CANDIDATES = 8
#: Vectors shorter than this (detector px) are the direct beam, not a reflection.
_BEAM = 2.0
#: Lattice points enumerated per axis at most by the ring model of :func:`_chance`.
_MAX_REACH = 40


def _at_least(k: int, n: int, p: float) -> float:
    """Binomial tail P(K >= k), K ~ B(n, p): the chance of ``k`` or more successes in
    ``n`` trials, its terms summed in log space (no overflow for thousands of vectors;
    scipy.stats is not imported for it, which would cost every spedflow import a third
    of a second)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
            for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def _half_set(g: np.ndarray, tolerance: float, bend: float) -> np.ndarray:
    """One of each Friedel pair ``g, -g`` (within the indexing tolerance of
    :func:`_tolerance`: two parts of a bent crystal show a pair rotated apart), the
    beam dropped. A reflection's mate is no independent evidence of a lattice."""
    g = np.asarray(g, np.float64).reshape(-1, 2)
    g = g[np.hypot(g[:, 0], g[:, 1]) > _BEAM]
    g = g[np.argsort(np.hypot(g[:, 0], g[:, 1]), kind="stable")]
    tol = _tolerance(g, tolerance, bend)
    keep = np.zeros(len(g), dtype=np.intp)
    k = 0
    for i in range(len(g)):  # greedy, shortest first: each against those kept
        s = g[i] + g[keep[:k]]
        if not (np.hypot(s[:, 0], s[:, 1]) <= tol[i]).any():
            keep[k] = i
            k += 1
    return g[keep[:k]]


def _reduced(b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """Lagrange-Gauss reduction: the shortest basis of the lattice ``b1``, ``b2`` span,
    as columns (2, 2)."""
    b1, b2 = b1.astype(np.float64), b2.astype(np.float64)
    for _ in range(64):
        if b1 @ b1 > b2 @ b2:
            b1, b2 = b2, b1
        mu = round(float(b1 @ b2) / float(b1 @ b1))
        if mu == 0:
            break
        b2 = b2 - mu * b1
    return np.stack([b1, b2], axis=1)


def _tolerance(g: np.ndarray, tolerance: float, bend: float) -> np.ndarray:
    """Distance (px) from a lattice point within which ``g`` indexes: the position
    scatter plus the arc a rotation by ``bend`` (degrees) moves it along."""
    return tolerance + np.hypot(g[:, 0], g[:, 1]) * math.sin(math.radians(bend))


def _indexed(basis: np.ndarray, g: np.ndarray, tol: np.ndarray) -> np.ndarray:
    """Which vectors ``g`` (n, 2) lie within ``tol`` of a point of the lattice ``basis``."""
    n = np.rint(np.linalg.solve(basis, g.T)).T
    return np.hypot(*(g - n @ basis.T).T) <= tol


def _independent(h: np.ndarray, tol: np.ndarray) -> np.ndarray:
    """Drop the vectors of ``h`` (shortest first) that repeat (``m = 1``) or are a
    multiple ``m * g`` (m = 2..4) of a shorter vector ``g`` kept: on a lattice, the
    multiples of a point are points too, so they are no independent evidence."""
    keep = np.zeros(len(h), dtype=np.int64)
    k = 0
    m = np.arange(1, 5, dtype=np.float64)[:, None, None]
    for i in range(len(h)):  # greedy, shortest first: each against those kept
        d = h[i] - m * h[keep[:k]][None]
        if not (np.hypot(d[..., 0], d[..., 1]) <= tol[i]).any():
            keep[k] = i
            k += 1
    return keep[:k]


def _chance(basis: np.ndarray, g: np.ndarray, tol: np.ndarray) -> float:
    """Probability that a vector ``g`` off the lattice lands within ``tol`` of one of
    its points, averaged over the vectors (each at most 1).

    Two models, the larger taken: a vector anywhere (the tolerance disc's area over
    the cell's), and a vector of a crystal of the same phase at another orientation,
    which has the lattice's own lengths: it lies at a random angle on the circle of
    its length, and lands near a point with the probability of the circle's arcs
    within ``tol`` of the points (``phi / pi`` for a point at angular half-width
    ``phi``; overlapping arcs counted twice, which errs on the safe side).
    """
    area = np.pi * tol ** 2 / abs(np.linalg.det(basis))
    r = np.hypot(g[:, 0], g[:, 1])
    reach = int(np.ceil((r.max() + tol.max()) / _shortest(basis))) + 1
    if reach > _MAX_REACH:  # a fine lattice: its points fill every circle evenly
        return float(np.minimum(1.0, area).mean())
    n = np.stack(np.meshgrid(np.arange(-reach, reach + 1), np.arange(-reach, reach + 1)),
                 -1).reshape(-1, 2)
    lengths = np.hypot(*(n @ basis.T).T)
    lengths = lengths[lengths > 0]
    # the half-angle at which the circle of radius r comes within tol of a point of
    # length l: r^2 + l^2 - 2 r l cos(phi) = tol^2
    cos_phi = (r[:, None] ** 2 + lengths[None, :] ** 2 - tol[:, None] ** 2) \
        / (2 * r[:, None] * lengths[None, :])
    ring = np.arccos(np.clip(cos_phi, -1.0, 1.0)).sum(axis=1) / np.pi
    return float(np.minimum(1.0, np.maximum(area, ring)).mean())


def _shortest(basis: np.ndarray) -> float:
    """A lower bound on the length of the lattice's non-zero points (its basis being
    reduced, the shorter basis vector times sin of the cell's angle)."""
    b1, b2 = basis[:, 0], basis[:, 1]
    return abs(b1[0] * b2[1] - b1[1] * b2[0]) / max(np.hypot(*b1), np.hypot(*b2))


def _prepared(g, tolerance: float, bend: float) -> tuple[np.ndarray, np.ndarray]:
    """The independent vectors of ``g`` (Friedel mates once, multiples of shorter ones
    dropped, shortest first) and their tolerances."""
    h = _half_set(g, tolerance, bend)
    tol = _tolerance(h, tolerance, bend)
    idx = _independent(h, tol)
    return h[idx], tol[idx]


def _best_basis(h: np.ndarray, tol: np.ndarray) -> tuple[np.ndarray | None, float]:
    """The best basis of :func:`reciprocal_basis` for prepared vectors, refined, and
    its chance probability times the number of bases tried (1 when there is none)."""
    if len(h) < 3:
        return None, 1.0
    cand = h[:_BASIS_CANDIDATES]
    best, best_p, tried = None, np.inf, 0
    for i in range(len(cand)):
        for j in range(i + 1, len(cand)):
            b1, b2 = cand[i], cand[j]
            cross = abs(b1[0] * b2[1] - b1[1] * b2[0])
            if cross < _MIN_SIN * np.hypot(*b1) * np.hypot(*b2):
                continue
            basis = _reduced(b1, b2)
            tried += 1
            k = int(_indexed(basis, h, tol).sum())
            # the pair itself indexes by construction: n - 2 trials, k - 2 successes
            p = _at_least(k - 2, len(h) - 2, _chance(basis, h, tol))
            if p < best_p:
                best, best_p = basis, p
    if best is None:
        return None, 1.0
    # refined by least squares on the vectors it indexes (the pair alone carries the
    # position scatter of two vectors into every higher order)
    ok = _indexed(best, h, tol)
    n = np.rint(np.linalg.solve(best, h[ok].T)).T
    if np.linalg.matrix_rank(n) == 2:
        best = np.linalg.lstsq(n, h[ok], rcond=None)[0].T
    return best, min(1.0, float(best_p) * tried)


def reciprocal_basis(g, tolerance: float = 1.0, bend: float = 3.0) -> np.ndarray | None:
    """The reduced 2-D lattice basis (columns, (2, 2)) on which the vectors ``g``
    (n, 2, relative to the beam, detector px) lie, or None.

    Candidate bases are the reduced cells of pairs of the shortest vectors (one of
    each Friedel pair, multiples of shorter ones dropped). Each is scored by the
    probability that the other vectors index on it as often as they do by chance
    (binomial, with the chance of :func:`_chance`): a fine lattice indexes anything,
    and scores no better for it. The best is refined by least squares on the vectors
    it indexes. None for fewer than three such vectors, and for collinear ones (a
    systematic row has no cell).

    The basis is not required to be significant itself: :func:`same_lattice` asks
    whether *other* vectors lie on it beyond chance, which a poor basis only makes
    less likely.
    """
    return _best_basis(*_prepared(g, tolerance, bend))[0]


def same_lattice(ga, gb, tolerance: float = 1.0, bend: float = 3.0,
                 significance: float = 1e-3) -> bool:
    """True when the vectors ``ga`` lie on the reciprocal lattice of the vectors ``gb``.

    ``gb``'s lattice is :func:`reciprocal_basis`. ``ga``'s vectors (Friedel mates
    counted once, multiples of shorter ones dropped) index when they lie within
    ``tolerance + |g| sin(bend)`` of a lattice point. Then

    - at least two thirds of them must index. A few strays are common (a
      neighbour's reflection, a spot bent further than ``bend``): in the bent and
      wedge-shaped crystals of the benchmark simulators up to a third of a true
      part's vectors. A group cut out on a small crystal lying on a larger one
      holds the larger one's reflections too, which shine there as well: 40-60 %
      of its vectors index on the larger one's lattice.
    - the indexed ones span two dimensions (a row of reflections fits a line
      through the points of any lattice somewhere);
    - a different crystal's vectors index as often with probability at most
      ``significance`` (binomial, with the chance of :func:`_chance`).
    """
    basis = reciprocal_basis(gb, tolerance, bend)
    if basis is None:
        return False
    h, tol = _prepared(ga, tolerance, bend)
    if len(h) < 2:
        return False
    ok = _indexed(basis, h, tol)
    k = int(ok.sum())
    if 3 * k < 2 * len(h) or _at_least(k, len(h), _chance(basis, h, tol)) > significance:
        return False
    on = h[ok]
    norms = np.hypot(on[:, 0], on[:, 1])
    cross = np.abs(on[:, None, 0] * on[None, :, 1] - on[:, None, 1] * on[None, :, 0])
    return bool((cross >= _MIN_SIN * norms[:, None] * norms[None, :]).any())


#: :func:`one_lattice`: at least this fraction of the larger area's reflections must
#: index on the smaller one's lattice (a stray at the edge of a large area may not).
_REVERSE = 0.9


def one_lattice(ga, gb, tolerance: float = 1.0, bend: float = 3.0,
                significance: float = 1e-3) -> bool:
    """True when the reflections ``ga`` of one area and ``gb`` of a larger one are of
    one crystal: every reflection of ``ga`` (at least three independent ones) lies on
    ``gb``'s lattice, more of them than chance at ``significance`` would place there
    (the binomial test of :func:`same_lattice`), and at least 90 % of ``gb``'s lie on
    ``ga``'s lattice. Where ``ga`` holds ``gb``'s own reflections (the area lies on that
    crystal) the test says they are that crystal's; it cannot tell whether one more
    reflection among them, a pair of a weak crystal's, lies on the lattice by chance:
    the caller must have seen the area's light as the crystal's (rule 5 of
    :func:`~spedflow.segment.fold_fragments` asks that one of the smaller group's own
    vectors be found at most positions).

    Stricter than :func:`same_lattice`, for the reflections *seen* in an area (every
    crystal there shows its own): a second crystal inside the area shows reflections
    off the larger one's lattice, and an area over two crystals (a twin's halves, whose
    lattices share a row and so a finer common lattice) shows reflections off either
    half's.
    """
    h, tol = _prepared(ga, tolerance, bend)
    hb, tol_b = _prepared(gb, tolerance, bend)
    basis_b = _best_basis(hb, tol_b)[0]  # reciprocal_basis(gb), its vectors prepared once
    if basis_b is None or len(h) < 3 or not _indexed(basis_b, h, tol).all():
        return False
    if _at_least(len(h), len(h), _chance(basis_b, h, tol)) > significance:
        return False
    basis_a = _best_basis(h, tol)[0]
    return bool(basis_a is not None and _indexed(basis_a, hb, tol_b).mean() >= _REVERSE)


def second_lattice(ga, gb, tolerance: float = 1.0, bend: float = 3.0,
                   significance: float = 1e-3) -> bool:
    """True when the vectors of ``ga`` that are off the reciprocal lattice of ``gb``
    lie on a lattice of their own beyond chance: ``ga`` holds a second crystal.

    An NMF component of a small crystal lying on a larger one also carries the larger
    one's spots, which shine where it is: half its spots on the larger one's lattice,
    the other half on another lattice (its own). A thickness component of the larger
    crystal has all its spots on that lattice. The test of the rest is that of
    :func:`reciprocal_basis`, at ``significance`` times the number of bases tried.
    False when ``gb`` has no lattice.
    """
    basis = reciprocal_basis(gb, tolerance, bend)
    if basis is None:
        return False
    h, tol = _prepared(ga, tolerance, bend)
    off = ~_indexed(basis, h, tol) if len(h) else np.zeros(0, bool)
    other, chance = _best_basis(h[off], tol[off])
    return chance <= significance and not _commensurate(basis, other, bend)


#: :func:`off_lattice`: at least this fraction of ``gb``'s own vectors must index on the
#: lattice found for them before other vectors are judged by it.
_SELF_INDEXED = 0.9


def off_lattice(ga, gb, tolerance: float = 1.0, bend: float = 3.0,
                significance: float = 1e-3) -> bool:
    """True when ``gb`` lies on a clear lattice and most vectors of ``ga`` lie off it.

    ``gb``'s lattice (:func:`reciprocal_basis`) must be significant (its own vectors
    index on it as often by chance with probability at most ``significance``, times
    the bases tried) and hold at least 90 % of them: a cell found on a few vectors of
    a noisy component may be wrong, and then indexes nothing. Then fewer than half of
    ``ga``'s independent vectors (Friedel mates once, multiples of shorter ones
    dropped; at least two of them) index on it. (:func:`same_lattice` allows a part
    of one bent crystal up to a third of strays. Over the NMF components the join by
    spots linked in the benchmark simulators' sets, pairs of one crystal had at least
    56 % of one's spots on the other's clear lattice, but for a component mixing
    several crystals; pairs of two crystals had 0-37 %, and two 55-60 %.)

    Unlike :func:`second_lattice` this needs no cell of ``ga``'s own: a crystal that
    shows two independent reflections beside a larger one is told from it by those
    alone lying off the larger one's lattice. Where ``ga`` has a cell of its own that
    is commensurate with ``gb``'s (one a sublattice of the other: the part of one
    crystal that excites every other row), it is not off.
    """
    hb, tol_b = _prepared(gb, tolerance, bend)
    basis, chance = _best_basis(hb, tol_b)
    if basis is None or chance > significance or _indexed(basis, hb, tol_b).mean() < _SELF_INDEXED:
        return False
    h, tol = _prepared(ga, tolerance, bend)
    if len(h) < 2 or 2 * int(_indexed(basis, h, tol).sum()) >= len(h):
        return False
    own = _best_basis(h, tol)[0]
    return own is None or not _commensurate(basis, own, bend)


def _commensurate(b1: np.ndarray, b2: np.ndarray, bend: float) -> bool:
    """Whether two bases span lattices of one crystal: one's vectors are integer
    combinations of the other's (a sublattice: reflections the other component does
    not show), to within a rotation by about twice ``bend``."""
    slack = max(0.1, math.sin(math.radians(2 * bend)))
    for a, b in ((b1, b2), (b2, b1)):
        u = np.linalg.solve(a, b)
        if np.abs(u - np.rint(u)).max() <= slack and round(abs(np.linalg.det(np.rint(u)))) >= 1:
            return True
    return False
