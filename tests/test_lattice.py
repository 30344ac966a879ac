"""Reciprocal-lattice test of fragment folding: bases against brute force, bent parts
of one crystal against other crystals (same phase at another orientation, other
phases), by simulation with known truth."""

import dataclasses
import itertools

import numpy as np
import pytest

from spedflow.errors import ParameterError
from spedflow.segment import VDFMergeParams, fold_fragments, merge_vdf_segments
from spedflow.segment._lattice import (_chance, off_lattice, reciprocal_basis, same_lattice,
                                       second_lattice)

from test_merge import SHAPE, disc


def random_basis(rng):
    """A reciprocal cell like the simulators' and the paper's (shortest vector 11-20 px
    on a 128-144 px detector, angle 60-120 degrees), as columns."""
    a_len, th = rng.uniform(11, 20), rng.uniform(0, np.pi)
    b_len, gam = a_len * rng.uniform(0.9, 1.5), np.radians(rng.uniform(60, 120))
    return np.array([[a_len * np.sin(th), b_len * np.sin(th + gam)],
                     [a_len * np.cos(th), b_len * np.cos(th + gam)]])


def points(basis, rmax, rmin=0.0):
    """The lattice's points with rmin < |g| < rmax, beam excluded."""
    n = np.array([ij for ij in itertools.product(range(-15, 16), repeat=2) if ij != (0, 0)])
    g = n @ basis.T
    r = np.hypot(g[:, 0], g[:, 1])
    return g[(r > rmin) & (r < rmax)]


def rotated(g, degrees):
    t = np.radians(degrees)
    return g @ np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]).T


@pytest.mark.parametrize("seed", range(6))
def test_reciprocal_basis_spans_the_lattice_of_its_points(seed):
    """Whatever the cell and the noise on the positions, the basis found spans the
    very lattice: it is the true basis times an integer matrix of determinant +-1
    (not a finer lattice, which would also index every point, nor a coarser one),
    and it is reduced (brute force over the lattice's points): its first vector is a
    shortest point, its second a shortest point not parallel to it."""
    rng = np.random.default_rng(seed)
    basis = random_basis(rng)
    exact = points(basis, 45)
    found = reciprocal_basis(exact + rng.normal(0, 0.3, exact.shape))
    assert found is not None
    u = np.linalg.solve(basis, found)
    np.testing.assert_allclose(u, np.rint(u), atol=0.03)  # refined on all the points
    assert abs(round(np.linalg.det(np.rint(u)))) == 1
    lengths = np.hypot(exact[:, 0], exact[:, 1])
    first = found[:, 0] / np.hypot(*found[:, 0])
    cross = np.abs(exact[:, 0] * first[1] - exact[:, 1] * first[0])
    assert np.hypot(*found[:, 0]) <= lengths.min() + 0.5
    assert np.hypot(*found[:, 1]) <= lengths[cross > 0.1 * lengths].min() + 0.5


def test_reciprocal_basis_needs_three_independent_vectors_off_a_line():
    basis = np.array([[12.0, 2.0], [1.0, 14.0]])
    row = np.array([k * basis[:, 0] for k in (-3, -2, -1, 1, 2, 3)])
    assert reciprocal_basis(row) is None  # a systematic row has no cell
    assert reciprocal_basis(np.array([basis[:, 0], -basis[:, 0], basis[:, 1], -basis[:, 1]])) is None
    three = np.array([basis[:, 0], basis[:, 1], basis[:, 0] + basis[:, 1]])
    assert reciprocal_basis(three) is not None
    assert reciprocal_basis(np.zeros((0, 2))) is None
    assert reciprocal_basis(np.array([[0.5, 0.2], [1.0, -0.3]])) is None  # the beam only


def trial_rate(rng, n, fragment_degrees, other_phase=False):
    """Fraction of ``n`` random crystals whose 'fragment' is taken for part of them.
    The crystal shows its reflections out to 30 px; the fragment 5-12 reflections out
    to 45 px of the same lattice rotated by ``fragment_degrees`` (low, high), or of
    another random lattice."""
    hits = 0
    for _ in range(n):
        basis = random_basis(rng)
        gb = points(basis, 30)
        gb = gb + rng.normal(0, 0.3, gb.shape)
        other = random_basis(rng) if other_phase else basis
        ga = rotated(points(other, 45), rng.uniform(*fragment_degrees) * rng.choice([-1, 1]))
        ga = ga[rng.choice(len(ga), size=min(len(ga), int(rng.integers(5, 13))), replace=False)]
        ga = ga + rng.normal(0, 0.3, ga.shape)
        hits += same_lattice(ga, gb)
    return hits / n


def test_same_lattice_finds_bent_parts_and_not_other_crystals():
    """A part of a crystal bent by up to 2 degrees is recognised nearly always; a
    crystal of the same phase at 10-60 degrees (it shares every |g|) or of another
    phase hardly ever (the test's significance is 1e-3; the chance model is
    approximate, hence the margins)."""
    rng = np.random.default_rng(1)
    assert trial_rate(rng, 200, (0, 2)) >= 0.85
    assert trial_rate(rng, 200, (10, 60)) <= 0.01
    assert trial_rate(rng, 200, (0, 0), other_phase=True) <= 0.02


def test_same_lattice_rejects_rows_few_vectors_and_fine_lattices():
    basis = np.array([[16.0, 3.0], [2.0, 17.0]])
    gb = points(basis, 30)
    row = np.array([k * (basis[:, 0] + basis[:, 1]) for k in (1, 2)])
    assert not same_lattice(row, gb)                       # collinear: no 2-D evidence
    assert not same_lattice(basis[:, :1].T, gb)            # one vector
    good = points(basis, 45, rmin=30)
    assert same_lattice(good, gb)
    assert not same_lattice(good, gb, significance=0.0)
    # a cell of 9 px^2 against a tolerance disc of >= 3 px^2: anything indexes, nothing
    # is significant
    fine = np.array([[3.0, 0.0], [0.0, 3.0]])
    assert not same_lattice(points(fine, 30, rmin=20), points(fine, 20))
    # mostly off the lattice: a few coincidences do not make a fragment
    rng = np.random.default_rng(3)
    off = rng.uniform(-40, 40, (12, 2))
    assert not same_lattice(np.vstack([good[:3], off]), gb)


@pytest.mark.parametrize("seed", range(4))
def test_chance_of_a_vector_of_the_lattices_length_against_brute_force(seed):
    """A crystal of the same phase at a random orientation puts a vector of length
    |g| at a uniformly random angle: the probability that it lands within the
    tolerance of a lattice point, counted over 20,000 angles, is what ``_chance``
    says (ring model: the arcs near the points of that length), within 10 %."""
    rng = np.random.default_rng(seed)
    basis = random_basis(rng)
    lattice = points(basis, 80)
    g = points(basis, 45, rmin=10)[:1]
    tol = np.array([1.0 + np.hypot(*g[0]) * np.sin(np.radians(3.0))])
    angles = rng.uniform(0, 2 * np.pi, 20_000)
    r = np.hypot(*g[0])
    trial = np.stack([r * np.sin(angles), r * np.cos(angles)], axis=1)
    d = np.hypot(trial[:, None, 0] - lattice[None, :, 0], trial[:, None, 1] - lattice[None, :, 1])
    counted = (d.min(axis=1) <= tol[0]).mean()
    assert _chance(basis, g, tol) == pytest.approx(counted, rel=0.1)


def test_same_lattice_rejects_a_small_crystals_group_holding_the_larger_ones_reflections():
    """A group cut out on a small crystal lying on a larger one holds the larger one's
    reflections (they shine there too) beside its own: with half of them the larger
    one's, it is not a part of it; with nearly all, it is."""
    rng = np.random.default_rng(5)
    basis = random_basis(rng)
    gb = points(basis, 30)
    host = points(basis, 45, rmin=30)
    host = host[rng.permutation(len(host))]
    own = rotated(points(random_basis(rng), 45, rmin=15), 17.0)
    own = own[rng.permutation(len(own))]
    mixed = np.vstack([host[:12], own[:12]])  # about half each (Friedel mates count once)
    assert not same_lattice(mixed, gb)
    assert same_lattice(np.vstack([host, own[:1]]), gb)


def _bent_case(crystal_vectors, fragment_vectors):
    """A crystal A whose images light all of it, and a fragment lit only on its left
    half by the vectors given (after A's)."""
    yy, xx = np.mgrid[:40, :40]
    a = disc((20, 20), 12)
    half = a & (xx < 20)
    vectors = np.vstack([crystal_vectors, fragment_vectors]).astype(float)
    n, m = len(vectors), len(crystal_vectors)
    images = np.zeros((n, *SHAPE))
    images[:m] = a * 3.0
    images[m:] = half * 5.0
    segs = np.array([images[v] * a for v in range(m)] + [images[v] * half for v in range(m, n)],
                    np.float32)
    return segs, np.arange(n), vectors, images, a


def test_fold_fragments_folds_a_bent_part_whose_vectors_are_on_the_lattice():
    """The half's vectors light only the half (rules 2 and 3 keep it apart); they are
    the higher orders of A's lattice (A shows the first), rotated by 1.5 degrees:
    rule 4 folds it. Off the
    lattice (a crystal of the same cell at 25 degrees), it stays; with
    ``lattice_significance=0`` it stays."""
    lattice = np.array([[12.0, 0.0], [0.0, 12.0]])
    first = points(lattice, 20)  # +-(12, 0), +-(0, 12), +-(12, +-12)
    higher = points(lattice, 40, rmin=20)
    p = VDFMergeParams(vector_threshold=2)
    for degrees, folds in ((1.5, True), (25.0, False)):
        segs, src, vectors, images, a = _bent_case(first, rotated(higher, degrees))
        merged = merge_vdf_segments(segs, src, vectors, p)
        assert len(merged.summed) == 2
        folded = fold_fragments(merged, images, p)
        assert (len(folded.summed) == 1) is folds
        assert len(fold_fragments(merged, images, dataclasses.replace(
            p, lattice_significance=0.0)).summed) == 2
        if folds:
            np.testing.assert_array_equal(folded.summed[0] > 0, a)
            assert sorted(folded.members[0].tolist()) == list(range(len(vectors)))


@pytest.mark.parametrize("field, value", [("lattice_bend", -1), ("lattice_bend", 60),
                                          ("lattice_significance", 0.5),
                                          ("lattice_significance", float("nan"))])
def test_lattice_parameters_are_checked(field, value):
    from spedflow.segment import NMFMergeParams
    with pytest.raises(ParameterError, match=field):
        VDFMergeParams(**{field: value})
    if field == "lattice_significance":
        with pytest.raises(ParameterError, match=field):
            NMFMergeParams(**{field: value})


def test_binomial_tail_against_scipy():
    from scipy.stats import binom

    from spedflow.segment._lattice import _at_least
    for n in range(0, 40, 3):
        for k in range(-1, n + 2):
            for p in (0.0, 0.01, 0.2, 0.7, 1.0):
                assert _at_least(k, n, p) == pytest.approx(binom.sf(k - 1, n, p), rel=1e-9, abs=1e-15)
    for k in (1, 300, 700, 1500):  # thousands of vectors: no overflow
        assert _at_least(k, 3000, 0.2) == pytest.approx(binom.sf(k - 1, 3000, 0.2), rel=1e-6,
                                                        abs=1e-300)


def test_second_lattice_finds_another_crystal_among_the_vectors():
    """Vectors of the lattice plus those of a second crystal (same cell, 25 degrees):
    the rest lies on a lattice of its own. The lattice's own vectors alone, or with a
    few random strays, hold none; nor does anything when ``gb`` has no lattice."""
    rng = np.random.default_rng(7)
    basis = np.array([[12.0, -2.5], [2.0, 13.5]])  # a cell of 168 px^2, 18 points to 30 px
    gb = points(basis, 30)
    mine = points(basis, 45)
    other = rotated(points(basis, 45), 25.0)
    assert second_lattice(np.vstack([mine, other]), gb)
    assert not second_lattice(mine, gb)
    assert not second_lattice(np.vstack([mine, rng.uniform(-40, 40, (3, 2))]), gb)
    assert not second_lattice(np.vstack([mine, other]), gb[:2])
    # the larger component shows only a sublattice (every other row: reflections the
    # thin part does not excite): the rest is the same crystal, not a second one
    n1 = np.rint(np.linalg.solve(basis, mine.T)).T[:, 0]
    assert not second_lattice(mine, mine[n1 % 2 == 0])


@pytest.mark.parametrize("seed", range(6))
def test_off_lattice_tells_a_crystal_of_few_reflections(seed):
    """A crystal showing two independent reflections and their Friedel mates (too few
    for a cell of its own, so :func:`second_lattice` cannot see it) at a random
    orientation is off another crystal's lattice, unless one of its vectors indexes
    there by chance (brute force decides); the lattice's own points, bent by 2
    degrees, with a stray, are not. Nothing is off a lattice that ``gb`` does not clearly hold
    (two vectors; four, a cell that could be chance), nor is ``ga`` of one independent
    vector (a systematic row ``n g``)."""
    rng = np.random.default_rng(seed)
    basis = random_basis(rng)
    gb = points(basis, 70)                                      # a clear lattice
    other = random_basis(rng)
    two = other[:, 0], other[:, 0] + other[:, 1]
    few = np.array([two[0], two[1], -two[0], -two[1]])
    on = sum(_indexed_brute(basis, g) for g in two)
    assert off_lattice(few, gb) == (on == 0)                    # fewer than half index
    own = rotated(points(basis, 45), 2.0)                       # >= 5 independent vectors
    assert not off_lattice(np.vstack([own, rng.uniform(-40, 40, (1, 2))]), gb)
    turned = rotated(points(basis, 45), 37.0)                    # its phase at another angle
    assert off_lattice(np.vstack([own[:2], turned]), gb)        # mostly off
    assert not off_lattice(few, gb[:2])
    short = points(basis, 50)
    short = short[np.argsort(np.hypot(*short.T))][:8]           # 4 vectors and their mates
    assert not off_lattice(turned, short)
    row = np.array([n * two[0] for n in (-3, -2, -1, 1, 2, 3)])
    assert not off_lattice(row, gb)
    # half on it is not "fewer than half": one reflection of the lattice, one off
    off = turned[[not _indexed_brute(basis, g) for g in turned]]
    half = np.array([gb[np.argmin(np.hypot(*gb.T))], off[0]])
    assert not off_lattice(half, gb) and off_lattice(off[:2], gb)
    # a lattice holding a fifth of strays (a component mixing crystals) is no judge
    mixed = np.vstack([gb, rotated(gb, 37.0)[: len(gb) // 4]])
    assert not off_lattice(few, mixed)
    # the part of the crystal that excites only every other row is on it
    wide = points(basis, 90)                                    # a clear sublattice too
    n = np.rint(np.linalg.solve(basis, wide.T)).T
    even = (n[:, 0] + n[:, 1]) % 2 == 0
    assert not off_lattice(wide, wide[even])
    # even the part showing only the other rows, none of them on the first part's
    # lattice: its cell is the crystal's, commensurate with it
    assert not off_lattice(wide[~even], wide[even])


def _indexed_brute(basis, g, tol=1.0, bend=3.0):
    """Whether ``g`` lies within the lattice test's tolerance of a point of ``basis``'s
    lattice (every point to 15 steps tried: brute force)."""
    pts = points(basis, 400)
    t = tol + np.hypot(*g) * np.sin(np.radians(bend))
    return bool((np.hypot(*(pts - g).T) <= t).any())


def test_repeated_vectors_are_no_new_evidence():
    """Three copies of a few lattice vectors among strays do not make a lattice match."""
    basis = np.array([[12.0, -2.5], [2.0, 13.5]])
    gb = points(basis, 30)
    few = points(basis, 45, rmin=30)[:3]
    strays = np.random.default_rng(2).uniform(-40, 40, (3, 2))
    assert same_lattice(np.vstack([few, few + 0.01, few - 0.01, strays]), gb) == \
        same_lattice(np.vstack([few, strays]), gb)
