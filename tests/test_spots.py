"""Where the spots lighting a VDF segment are (segment._spots): against a brute-force
loop over segments, positions and peaks; and fragment folding on those positions."""

import dataclasses

import numpy as np
import pytest
from scipy import sparse

from spedflow.errors import InputError, ParameterError
from spedflow.segment import (AreaReflections, SpotOffsets, VDFMergeParams, area_reflections,
                              feed_peak_tables, fold_fragments, member_positions,
                              merge_vdf_segments, read_peak_tables, spot_offsets)
from spedflow.segment._lattice import one_lattice

from test_lattice import _bent_case, points, random_basis, rotated

DET = (64, 48)
SCAN = (9, 11)


def _random_case(rng, n_vec=6, n_peaks=900):
    vectors = rng.uniform(-18, 18, (n_vec, 2))
    # per vector, labels 0..3 over the scan: a vector's segments do not overlap
    labels = rng.integers(0, 4, (n_vec,) + SCAN)
    rows, source = [], []
    for v in range(n_vec):
        for lab in range(1, 4):
            m = labels[v] == lab
            if m.any():
                rows.append((m * rng.uniform(0.5, 2.0, SCAN)).ravel())
                source.append(v)
    segs = sparse.csr_matrix(np.array(rows))
    # peaks: near the vectors (within 0-8 px) and anywhere; some of negative intensity
    pos = np.column_stack([rng.integers(0, SCAN[0], n_peaks), rng.integers(0, SCAN[1], n_peaks)])
    near = vectors[rng.integers(0, n_vec, n_peaks)] + rng.normal(0, 3.0, (n_peaks, 2))
    k = near + [DET[0] // 2, DET[1] // 2]
    inten = rng.uniform(-1, 5, n_peaks)
    table = np.column_stack([pos, k, inten])
    return segs, np.array(source), vectors, table


def _brute(segs, source, vectors, table, radius):
    dense = segs.toarray()
    out = np.full((len(source), 2), np.nan)
    wsum = np.zeros(len(source))
    c = np.array([DET[0] // 2, DET[1] // 2])
    for s in range(len(source)):
        v = vectors[source[s]]
        acc, tot = np.zeros(2), 0.0
        for p in np.flatnonzero(dense[s]):
            y, x = divmod(p, SCAN[1])
            here = table[(table[:, 0] == y) & (table[:, 1] == x) & (table[:, 4] > 0)]
            if not len(here):
                continue
            d = np.hypot(*(here[:, 2:4] - c - v).T)
            if d.min() > radius:
                continue
            best = here[np.argmin(d)]
            acc += best[4] * (best[2:4] - c - v)
            tot += best[4]
        if tot > 0:
            out[s] = acc / tot
        wsum[s] = tot
    return out, wsum


@pytest.mark.parametrize("seed", range(4))
def test_spot_offsets_equal_a_brute_force_loop_for_any_blocking(seed):
    rng = np.random.default_rng(seed)
    segs, source, vectors, table = _random_case(rng)
    want, wsum = _brute(segs, source, vectors, table, 5.0)
    assert np.isfinite(want).all(axis=1).sum() > 5  # segments with peaks near their vector
    # the table in blocks of whole scan rows, in any order
    rows = [table[table[:, 0] == y] for y in rng.permutation(SCAN[0])]
    blocks = [np.concatenate(rows[i:i + 3]) for i in range(0, len(rows), 3)]
    for tables in ([table], blocks):
        got, w = spot_offsets(segs, source, vectors, iter(tables), detector_shape=DET,
                              scan_shape=SCAN, search_radius=5.0)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(w, wsum, rtol=1e-9)
    # dense segments give the same
    got, _ = spot_offsets(segs.toarray().reshape(-1, *SCAN), source, vectors, [table],
                          detector_shape=DET, scan_shape=SCAN, search_radius=5.0)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_spot_offsets_check_their_input():
    rng = np.random.default_rng(0)
    segs, source, vectors, table = _random_case(rng)
    with pytest.raises(ParameterError, match="search_radius"):
        spot_offsets(segs, source, vectors, [table], detector_shape=DET, scan_shape=SCAN,
                     search_radius=0)
    with pytest.raises(InputError, match="pixels per row"):
        spot_offsets(segs, source, vectors, [table], detector_shape=DET, scan_shape=(3, 3),
                     search_radius=4)
    with pytest.raises(InputError, match="source"):
        spot_offsets(segs, source[:-1], vectors, [table], detector_shape=DET, scan_shape=SCAN,
                     search_radius=4)
    empty, w = spot_offsets(segs[:0], source[:0], vectors, [table], detector_shape=DET,
                            scan_shape=SCAN, search_radius=4)
    assert empty.shape == (0, 2) and w.shape == (0,)
    empty, _ = spot_offsets(np.zeros((0,) + SCAN), source[:0], vectors, [table],
                            detector_shape=DET, scan_shape=SCAN, search_radius=4)
    assert empty.shape == (0, 2)
    outside = table.copy()
    outside[0, 1] = SCAN[1]  # one column past the scan's edge
    with pytest.raises(InputError, match="outside the 9 x 11 scan"):
        spot_offsets(segs, source, vectors, [outside], detector_shape=DET, scan_shape=SCAN,
                     search_radius=4)
    with pytest.raises(InputError, match="outside"):
        area_reflections(segs.toarray() > 0, vectors, [outside], scan_shape=SCAN,
                         detector_shape=DET, radius=3)


def test_member_positions_weigh_each_groups_own_segments():
    vectors = np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0]])
    source = np.array([0, 0, 1, 2, 2])
    offsets = np.array([[1.0, 0.0], [3.0, 0.0], [np.nan, np.nan], [0.0, 2.0], [0.0, -2.0]])
    weights = np.array([1.0, 3.0, 0.0, 1.0, 1.0])
    members = (np.array([0, 1]), np.array([0, 2]))
    segment_members = (np.array([0, 1, 2]), np.array([1, 3, 4]))
    a, b = member_positions(members, segment_members, source, vectors, offsets, weights)
    np.testing.assert_allclose(a, [[10 + (1 + 9) / 4, 0], [0, 10]])  # vector 1: no peaks
    np.testing.assert_allclose(b, [[13, 0], [-10, 0]])  # segment 1 alone; 3 and 4 cancel


def test_fold_fragments_indexes_where_the_spots_are_not_the_vectors():
    """A bent part whose reflections were picked 2.5 px off (a neighbour's spot took
    the vector): off A's lattice by the vectors, on it by the measured spots."""
    lattice = np.array([[12.0, 0.0], [0.0, 12.0]])
    first = points(lattice, 20)
    higher = rotated(points(lattice, 40, rmin=20), 1.0)
    rng = np.random.default_rng(3)
    shift = rng.normal(size=higher.shape)
    shift *= 2.5 / np.hypot(shift[:, :1], shift[:, 1:])
    segs, src, vectors, images, a = _bent_case(first, higher + shift)
    p = VDFMergeParams(vector_threshold=2)
    merged = merge_vdf_segments(segs, src, vectors, p)
    assert len(merged.summed) == 2
    assert len(fold_fragments(merged, images, p).summed) == 2
    where = np.vstack([first, higher])
    measured = [where[m] for m in merged.members]
    folded = fold_fragments(merged, images, p, measured=measured)
    assert len(folded.summed) == 1
    np.testing.assert_array_equal(folded.summed[0] > 0, a)
    with pytest.raises(InputError, match="measured"):
        fold_fragments(merged, images, p, measured=measured[:1])


def test_area_reflections_equal_a_brute_force_loop():
    rng = np.random.default_rng(5)
    segs, source, vectors, table = _random_case(rng, n_peaks=1500)
    masks = rng.random((4, SCAN[0] * SCAN[1])) < 0.4
    radius = 3.0
    counts, where = area_reflections(masks, vectors, np.array_split(table, 1), scan_shape=SCAN,
                                     detector_shape=DET, radius=radius)
    c = np.array([DET[0] // 2, DET[1] // 2])
    want_n = np.zeros((4, len(vectors)), int)
    want_g = np.zeros((4, len(vectors), 3))
    for y in range(SCAN[0]):
        for x in range(SCAN[1]):
            here = table[(table[:, 0] == y) & (table[:, 1] == x) & (table[:, 4] > 0)]
            seen = set()
            for pk in here:
                g = pk[2:4] - c
                d = np.hypot(*(vectors - g).T)
                if d.min() > radius:
                    continue
                v = int(np.argmin(d))
                for m in range(4):
                    if masks[m, y * SCAN[1] + x]:
                        want_g[m, v] += [pk[4] * g[0], pk[4] * g[1], pk[4]]
                        if v not in seen:
                            want_n[m, v] += 1
                seen.add(v)
    np.testing.assert_array_equal(counts, want_n)
    assert (want_n > 0).sum() > 10
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(where, want_g[..., :2] / want_g[..., 2:], rtol=1e-9)
    # blocks of whole scan rows give the same
    rows = [table[table[:, 0] == y] for y in range(SCAN[0])]
    again, _ = area_reflections(masks, vectors, rows, scan_shape=SCAN, detector_shape=DET,
                                radius=radius)
    np.testing.assert_array_equal(again, counts)


def test_one_read_of_the_tables_feeds_both_passes_as_two_reads_would():
    rng = np.random.default_rng(9)
    segs, source, vectors, table = _random_case(rng, n_peaks=1500)
    # masks covering only part of what the segments cover, and positions no segment covers
    masks = rng.random((3, SCAN[0] * SCAN[1])) < 0.3
    masks[:, 0] = True
    segs = segs.tolil()
    segs[:, 0] = 0
    segs = segs.tocsr()
    want_o = spot_offsets(segs, source, vectors, [table], detector_shape=DET, scan_shape=SCAN,
                          search_radius=5.0)
    want_a = area_reflections(masks, vectors, [table], scan_shape=SCAN, detector_shape=DET,
                              radius=3.0)
    reads = []

    def tables():  # blocks of whole scan rows, counted as they are read
        for y in range(SCAN[0]):
            reads.append(y)
            yield table[table[:, 0] == y]

    got_o, got_a = read_peak_tables(
        tables(), [SpotOffsets(segs, source, vectors, scan_shape=SCAN, search_radius=5.0),
                   AreaReflections(masks, vectors, scan_shape=SCAN, radius=3.0)],
        scan_shape=SCAN, detector_shape=DET)
    assert reads == list(range(SCAN[0]))  # each block read once
    for got, want in zip(got_o + got_a, want_o + want_a):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # an accumulator left out gives None; with none at all nothing is read
    none, (o, w) = read_peak_tables(
        [table], [None, SpotOffsets(segs, source, vectors, scan_shape=SCAN, search_radius=5.0)],
        scan_shape=SCAN, detector_shape=DET)
    assert none is None
    np.testing.assert_allclose(o, want_o[0], rtol=1e-12, atol=1e-12)
    reads.clear()
    assert read_peak_tables(tables(), [None], scan_shape=SCAN, detector_shape=DET) == [None]
    assert reads == []


@pytest.mark.parametrize("seed", range(3))
def test_parts_fed_apart_and_absorbed_equal_one_read(seed):
    """The accumulators' reduction in parts (each a ``zeroed`` copy fed some of the
    tables, in another process: pickled there and back), joined by ``absorb`` in any
    grouping, gives what one read of all the tables gives, and leaves the templates
    unfed."""
    import pickle
    rng = np.random.default_rng(seed)
    segs, source, vectors, table = _random_case(rng, n_peaks=1500)
    masks = rng.random((3, SCAN[0] * SCAN[1])) < 0.4
    rows = [table[table[:, 0] == y] for y in range(SCAN[0])]

    def fresh():
        return [SpotOffsets(segs, source, vectors, scan_shape=SCAN, search_radius=5.0),
                AreaReflections(masks, vectors, scan_shape=SCAN, radius=3.0)]

    want = read_peak_tables(rows, fresh(), scan_shape=SCAN, detector_shape=DET)
    templates = fresh()
    cuts = np.sort(rng.choice(np.arange(1, SCAN[0]), 3, replace=False))
    parts = []
    for group in np.split(np.arange(SCAN[0]), cuts):
        part = pickle.loads(pickle.dumps([a.zeroed() for a in templates]))
        feed_peak_tables([rows[y] for y in group], part, scan_shape=SCAN, detector_shape=DET)
        parts.append(pickle.loads(pickle.dumps(part)))
    total = parts.pop()
    for k, part in enumerate(parts):  # absorbed as parts, or as their sums alone
        total = [a.absorb(b if k % 2 else b.sums()) for a, b in zip(total, part)]
    got = [a.result() for a in total]
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
    assert not templates[0].acc.any() and not templates[1].counts.any()


def test_one_lattice_tells_a_part_from_a_crystal_inside_and_from_a_twins_union():
    rng = np.random.default_rng(2)
    basis = random_basis(rng)
    whole = points(basis, 45)
    part = whole[rng.permutation(len(whole))[:len(whole) // 2]]
    assert one_lattice(part, whole)
    # a crystal inside: its own reflections besides the larger one's
    own = rotated(points(random_basis(rng), 45, rmin=15), 23.0)
    assert not one_lattice(np.vstack([part, own[:3]]), whole)
    # the union of two crystals: each one's reflections index on the union's lattice
    # only if the union has one; the other's do not index on the part's
    other = rotated(whole, 31.0)
    assert not one_lattice(whole, np.vstack([whole, other]))
    assert not one_lattice(part[:2], whole)  # too few to tell


def _one_pair_case(pair_share: int):
    """A crystal A (a square lattice) and a part of it lit by one Friedel pair: the
    merged groups, and what their areas show: A's reflections all over both, the pair
    at 1 / ``pair_share`` of each area's positions."""
    lattice = np.array([[12.0, 0.0], [0.0, 12.0]])
    first = points(lattice, 30)
    pair = np.array([[24.0, 12.0], [-24.0, -12.0]])
    segs, src, vectors, images, a = _bent_case(first, pair)
    p = VDFMergeParams(vector_threshold=2)
    merged = merge_vdf_segments(segs, src, vectors, p)
    n = len(vectors)
    sizes = (merged.summed.reshape(2, -1) > 0).sum(axis=1)
    counts = np.zeros((2, n), int)
    counts[:, :len(first)] = sizes[:, None]
    counts[:, len(first):] = sizes[:, None] // pair_share
    where = np.broadcast_to(vectors, (2, n, 2)).copy()
    return segs, src, vectors, images, a, p, merged, sizes, counts, where


def test_fold_fragments_folds_a_fringe_lit_by_one_pair_where_its_crystal_shows():
    """A fragment lit by one Friedel pair (a thickness fringe of A): rule 4 cannot index
    two vectors beyond chance; all of A's reflections show in the fragment's area, and
    rule 5 folds it. A crystal there with reflections of its own stays."""
    segs, src, vectors, images, a, p, merged, sizes, counts, where = _one_pair_case(2)
    assert len(merged.summed) == 2
    assert len(fold_fragments(merged, images, p).summed) == 2
    n, big = len(vectors), int(np.argmax([m.size for m in merged.members]))
    folded = fold_fragments(merged, images, p, seen_in=(counts, where))
    assert len(folded.summed) == 1
    np.testing.assert_array_equal(folded.summed[0] > 0, a)
    # the fragment's area shows reflections off A's lattice: a crystal of its own
    small = 1 - big
    own = rotated(points(random_basis(np.random.default_rng(0)), 40, rmin=15), 20.0)[:4]
    vectors2 = np.vstack([vectors, own])
    merged2 = merge_vdf_segments(segs, src, vectors2, p)
    counts2 = np.concatenate([counts, np.zeros((2, len(own)), int)], axis=1)
    counts2[small, n:] = sizes[small]
    where2 = np.broadcast_to(vectors2, (2, len(vectors2), 2)).copy()
    images2 = np.concatenate([images, np.zeros((len(own),) + images.shape[1:])])
    assert len(fold_fragments(merged2, images2, p, seen_in=(counts2, where2)).summed) == 2
    with pytest.raises(InputError, match="seen_in"):
        fold_fragments(merged, images, p, seen_in=(counts[:1], where[:1]))


def test_fold_fragments_keeps_a_weak_crystal_whose_area_shows_the_larger_ones_reflections():
    """A weak crystal inside A lit by one pair on A's lattice (by chance): its spots are
    found at few of its positions, so its area shows A's reflections only; its pair,
    seen neither there nor in A's area, is no reflection of A, and rule 5 keeps it."""
    _, _, _, images, _, p, merged, _, counts, where = _one_pair_case(10)  # rarely found
    assert len(fold_fragments(merged, images, p, seen_in=(counts, where)).summed) == 2


def _side_by_side(left_vectors, right_vectors, *, gap=1, rng_seed=0):
    """Two groups side by side on a 40 x 40 scan (the left and right halves of a disc,
    ``gap`` columns apart), each lit by its own vectors, each area showing its own
    vectors' reflections at every position: the MergeResult, images and ``seen_in``."""
    from spedflow.segment import MergeResult
    from test_merge import disc
    xx = np.mgrid[:40, :40][1]
    d = disc((20, 20), 12)
    left, right = d & (xx < 20), d & (xx >= 19 + gap)
    vectors = np.vstack([left_vectors, right_vectors]).astype(float)
    n_l = len(left_vectors)
    images = np.zeros((len(vectors), 40, 40))
    images[:n_l], images[n_l:] = left * 5.0, right * 3.0
    members = (np.arange(n_l), np.arange(n_l, len(vectors)))
    merged = MergeResult(np.stack([left * 5.0, right * 3.0]).astype(np.float32), members,
                         tuple(np.ones(m.size) for m in members),
                         (np.array([0]), np.array([1])), vectors, 2)
    counts = np.zeros((2, len(vectors)), int)
    counts[0, :n_l], counts[1, n_l:] = left.sum(), right.sum()
    where = np.broadcast_to(vectors, (2, len(vectors), 2)).copy()
    return merged, images, (counts, where), left | right


def test_rule_6_folds_the_halves_of_a_bent_crystal_and_nothing_else():
    """Two halves side by side, each lit by its own reflections of one lattice (a bent
    crystal excites different ones on each part): rule 6 folds them into their
    union. Another orientation next to it, halves further apart than
    ``adjacent_gap``, or the rule off: two crystals."""
    rng = np.random.default_rng(4)
    whole = rotated(points(random_basis(rng), 45), 0.0)
    pick = rng.permutation(len(whole))
    one, two = whole[pick[:len(whole) // 2]], whole[pick[len(whole) // 2:]]
    assert one_lattice(one, two) and one_lattice(two, one)
    p = VDFMergeParams(vector_threshold=2)
    merged, images, seen_in, union = _side_by_side(one, two)
    assert len(fold_fragments(merged, images, p).summed) == 2  # rules 1-5 see no containment
    folded = fold_fragments(merged, images, p, seen_in=seen_in)
    assert len(folded.summed) == 1
    np.testing.assert_array_equal(folded.summed[0] > 0, union)
    assert folded.members[0].tolist() == list(range(len(whole)))
    # the other half at another orientation: a crystal of its own
    merged, images, seen_in, _ = _side_by_side(one, rotated(two, 31.0))
    assert len(fold_fragments(merged, images, p, seen_in=seen_in).summed) == 2
    # 4 columns apart: within adjacent_gap = 5, not within 2; 0 turns the rule off
    merged, images, seen_in, _ = _side_by_side(one, two, gap=4)
    assert len(fold_fragments(merged, images, p, seen_in=seen_in).summed) == 2
    wide = dataclasses.replace(p, adjacent_gap=5)
    assert len(fold_fragments(merged, images, wide, seen_in=seen_in).summed) == 1
    merged, images, seen_in, _ = _side_by_side(one, two)
    off = dataclasses.replace(p, adjacent_gap=0)
    assert len(fold_fragments(merged, images, off, seen_in=seen_in).summed) == 2


def test_rule_6_keeps_two_crystals_of_one_orientation_side_by_side():
    """Two crystals of one orientation side by side light the same reflections: every
    vector's image shows both, cut by the watershed between them, and the correlation
    merge gives one group per crystal with the same vectors. Each area shows the
    other's lattice (it is the same one), but they are not a bent crystal's halves,
    each lit by other reflections: two crystals. With ``adjacent_shared`` = 1 (rule 6
    regardless of shared vectors) they fold, as in version 0.19."""
    from spedflow.segment import MergeResult
    from test_merge import disc
    rng = np.random.default_rng(7)
    vectors = rotated(points(random_basis(rng), 45), 0.0).astype(float)
    xx = np.mgrid[:40, :40][1]
    left = disc((20, 11), 7) & (xx < 18)
    right = disc((20, 25), 7) & (xx >= 19)  # one column between them
    images = np.broadcast_to(left * 5.0 + right * 3.0, (len(vectors), 40, 40)).copy()
    everyone = np.arange(len(vectors))
    merged = MergeResult(np.stack([left * 5.0 * len(vectors), right * 3.0 * len(vectors)]
                                  ).astype(np.float32), (everyone, everyone),
                         (np.ones(everyone.size), np.ones(everyone.size)),
                         (np.array([0]), np.array([1])), vectors, 2)
    counts = np.stack([np.full(len(vectors), left.sum()), np.full(len(vectors), right.sum())])
    seen_in = (counts, np.broadcast_to(vectors, (2, len(vectors), 2)).copy())
    p = VDFMergeParams(vector_threshold=2)
    assert len(fold_fragments(merged, images, p, seen_in=seen_in).summed) == 2
    regardless = dataclasses.replace(p, adjacent_shared=1.0)
    folded = fold_fragments(merged, images, regardless, seen_in=seen_in)
    assert len(folded.summed) == 1
    np.testing.assert_array_equal(folded.summed[0] > 0, left | right)


def test_rule_5_leaves_out_an_overlapping_crystals_reflections_and_unlit_vectors():
    """The fringe of crystal A (lit by one pair) overlaps crystal C, which lies mostly
    outside A: the fringe's area shows C's reflections too. They are C's, not evidence
    against the fringe being A's: rule 5 folds it. Without C's group they are
    unexplained and it stays. An own vector of the fringe off A's lattice stays
    against folding unless no spot was found near it (``lit``)."""
    from spedflow.segment import MergeResult
    segs, src, vectors, images, a, p, merged, sizes, counts, where = _one_pair_case(2)
    big = int(np.argmax([m.size for m in merged.members]))
    small = 1 - big
    # C: another orientation, its mask the fringe's plus a region outside A
    other = rotated(points(random_basis(np.random.default_rng(1)), 40, rmin=15), 17.0)[:6]
    n = len(vectors)
    vectors3 = np.vstack([vectors, other])
    xx = np.mgrid[:40, :40][1]
    fringe = merged.summed[small] > 0
    c_mask = fringe | (xx >= 33)  # A is a disc of radius 12 about (20, 20)
    assert (c_mask & a).sum() < 0.5 * c_mask.sum()  # C lies mostly outside A
    images3 = np.concatenate([images, np.broadcast_to(c_mask * 4.0, (len(other), 40, 40))])
    summed = np.concatenate([merged.summed, (c_mask * 4.0)[None]]).astype(np.float32)
    members = merged.members + (np.arange(n, n + len(other)),)
    merged3 = MergeResult(summed, members, tuple(np.ones(m.size) for m in members),
                          merged.segment_members + (np.array([len(segs)]),), vectors3, 3)
    sizes3 = (summed.reshape(3, -1) > 0).sum(axis=1)
    counts3 = np.zeros((3, len(vectors3)), int)
    counts3[:2, :n] = counts
    counts3[small, n:] = sizes3[small]  # C's reflections show all over the fringe
    counts3[2, n:] = sizes3[2]
    where3 = np.broadcast_to(vectors3, (3, len(vectors3), 2)).copy()
    folded = fold_fragments(merged3, images3, p, seen_in=(counts3, where3))
    assert len(folded.summed) == 2  # the fringe went into A; C stays
    # without C's group, C's reflections in the fringe's area are unexplained
    alone = MergeResult(merged.summed, merged.members, merged.intensities,
                        merged.segment_members, vectors3, 2)
    images2 = np.concatenate([images, np.zeros((len(other), 40, 40))])
    assert len(fold_fragments(alone, images2, p, seen_in=(counts3[:2], where3[:2])).summed) == 2
    # an own vector of the fringe off A's lattice: it stays, unless no spot lit it
    off = np.vstack([vectors, [[17.3, -6.1]]])
    fr = MergeResult(merged.summed, tuple(np.append(m, n) if i == small else m
                                          for i, m in enumerate(merged.members)),
                     tuple(np.append(w, 1.0) if i == small else w
                           for i, w in enumerate(merged.intensities)),
                     merged.segment_members, off, 2)
    images_off = np.concatenate([images, images[fr.members[small][0]][None]])
    c4 = np.concatenate([counts, np.zeros((2, 1), int)], axis=1)
    w4 = np.broadcast_to(off, (2, len(off), 2)).copy()
    assert len(fold_fragments(fr, images_off, p, seen_in=(c4, w4)).summed) == 2
    lit = [np.ones(m.size) for m in fr.members]
    lit[small][-1] = 0.0  # no spot found near the stray vector in the fringe's segments
    assert len(fold_fragments(fr, images_off, p, seen_in=(c4, w4), lit=lit).summed) == 1
    with pytest.raises(InputError, match="lit"):
        fold_fragments(fr, images_off, p, seen_in=(c4, w4), lit=lit[:1])
