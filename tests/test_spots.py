"""Where the spots lighting a VDF segment are (segment._spots): against a brute-force
loop over segments, positions and peaks; and fragment folding on those positions."""

import numpy as np
import pytest
from scipy import sparse

from spedflow.errors import InputError, ParameterError
from spedflow.segment import (VDFMergeParams, fold_fragments, member_positions,
                              merge_vdf_segments, spot_offsets)

from test_lattice import _bent_case, points, rotated

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
