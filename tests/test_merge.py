"""Correlation merging (VDF, NMF) and virtual patterns: brute force, truth, permutations."""

import dataclasses
import math

import numpy as np
import pytest
from skimage.draw import disk as draw_disk

from spedflow.errors import InputError, ParameterError
from spedflow.segment import (NMFMergeParams, VDFMergeParams, correlation_matrix,
                              fold_fragments, merge_components, merge_vdf_segments,
                              pattern_sigma, virtual_patterns)

SHAPE = (40, 40)


def disc(centre, radius, shape=SHAPE):
    m = np.zeros(shape, bool)
    m[draw_disk(centre, radius, shape=shape)] = True
    return m


def pearson(a, b):
    return np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]


@pytest.fixture(scope="module")
def vdf_case():
    """Three crystals with known masks and vector sets, plus noise segments.

    Crystal 0 and 1 overlap a little and share vector 4; every segment is the
    crystal mask (eroded/dilated a little at random) times a random level, with
    noise inside. Segments 'noise' come from spurious vectors and random blobs.
    """
    rng = np.random.default_rng(0)
    masks = [disc((12, 12), 8), disc((14, 27), 7), disc((30, 20), 9)]
    vec_sets = [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8, 9], [10, 11, 12, 13]]
    n_vec = 17
    segs, src = [], []
    for mask, vs in zip(masks, vec_sets):
        for v in vs:
            jitter = mask.copy()
            edge = np.argwhere(mask ^ np.roll(mask, 1, axis=rng.integers(2)))
            drop = edge[rng.random(len(edge)) < 0.3]
            jitter[tuple(drop.T)] = False
            segs.append(jitter * rng.uniform(5, 50) * rng.uniform(0.7, 1.3, SHAPE))
            src.append(v)
    for v in range(14, n_vec):  # spurious vectors: blobs elsewhere, each alone
        segs.append(disc(tuple(rng.integers(5, 35, 2)), 3) * rng.uniform(1, 5))
        src.append(v)
    vectors = rng.uniform(-20, 20, (n_vec, 2))
    return dict(segments=np.array(segs, np.float32), source=np.array(src), vectors=vectors,
                masks=masks, vec_sets=vec_sets)


def test_recovers_crystals(vdf_case):
    res = merge_vdf_segments(vdf_case["segments"], vdf_case["source"], vdf_case["vectors"])
    assert res.summed.shape == (3, *SHAPE) and res.summed.dtype == np.float32
    found = sorted(tuple(m.tolist()) for m in res.members)
    assert found == sorted(tuple(v) for v in vdf_case["vec_sets"])
    for summed, members in zip(res.summed, res.members):
        truth = vdf_case["masks"][[set(v) for v in vdf_case["vec_sets"]].index(set(members))]
        iou = ((summed != 0) & truth).sum() / ((summed != 0) | truth).sum()
        assert iou > 0.9
    totals = res.summed.sum(axis=(1, 2))
    assert np.all(np.diff(totals) <= 0)           # decreasing total


def brute_force_check(segments, source, res, params):
    """Every group obeys the thresholds; masks, sums and intensities as specified."""
    corr = correlation_matrix(segments)
    for summed, members, inten, segs in zip(res.summed, res.members, res.intensities,
                                            res.segment_members):
        for i in segs:
            for j in segs:
                if i != j:
                    assert pearson(segments[i], segments[j]) > params.corr_threshold
                    assert corr[i, j] == pytest.approx(pearson(segments[i], segments[j]), abs=1e-9)
        assert members.tolist() == sorted(set(source[segs].tolist()))
        assert len(members) >= params.vector_threshold
        count = np.zeros(segments.shape[1:], int)
        for v in members:
            count += np.any([segments[s] != 0 for s in segs if source[s] == v], axis=0)
        mask = count >= math.ceil(params.segment_threshold * len(members))
        np.testing.assert_allclose(summed, np.where(mask, segments[segs].sum(axis=0), 0),
                                   rtol=1e-5, atol=1e-3)
        assert np.all(summed[~mask] == 0)
        for v, iv in zip(members, inten):
            tot = sum(segments[s][mask].sum(dtype=np.float64) for s in segs if source[s] == v)
            assert iv == pytest.approx(tot, rel=1e-6)


@pytest.mark.parametrize("params", [VDFMergeParams(), VDFMergeParams(corr_threshold=0.5),
                                    VDFMergeParams(corr_threshold=0.9, vector_threshold=2,
                                                   segment_threshold=1.0)])
def test_groups_obey_thresholds(vdf_case, params):
    seg, src = vdf_case["segments"], vdf_case["source"]
    brute_force_check(seg, src, merge_vdf_segments(seg, src, vdf_case["vectors"], params), params)


def test_no_chaining_through_a_segment_covering_two_crystals():
    a, c = disc((20, 12), 7), disc((20, 27), 7)
    segs = [a * 1.0] * 3 + [(a | c) * 1.0] + [c * 1.0] * 3
    segs = np.array(segs) * np.arange(1, 8)[:, None, None]
    src = np.arange(7)
    assert pearson(segs[0], segs[3]) > 0.6 and pearson(segs[4], segs[3]) > 0.6
    res = merge_vdf_segments(segs, src, np.zeros((7, 2)),
                             VDFMergeParams(corr_threshold=0.6, vector_threshold=1))
    for g in res.segment_members:   # never a crystal of a and one of c together
        assert not (set(g) & {0, 1, 2} and set(g) & {4, 5, 6})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_order_independent(vdf_case, seed):
    seg, src, vec = vdf_case["segments"], vdf_case["source"], vdf_case["vectors"]
    params = VDFMergeParams(corr_threshold=0.5, vector_threshold=2)
    ref = merge_vdf_segments(seg, src, vec, params)
    perm = np.random.default_rng(seed).permutation(len(seg))
    got = merge_vdf_segments(seg[perm], src[perm], vec, params)
    assert ({frozenset(g.tolist()) for g in ref.segment_members}
            == {frozenset(perm[g].tolist()) for g in got.segment_members})
    np.testing.assert_allclose(got.summed, ref.summed, rtol=1e-6)
    for a, b in zip(ref.members, got.members):
        np.testing.assert_array_equal(a, b)


def test_distinct_vectors_counted_once():
    m = disc((20, 20), 8)
    segs = np.array([m * 1.0, m * 1.1, m * 0.9, m * 1.2])
    vectors = np.zeros((3, 2))
    same = np.array([0, 0, 1, 1])       # four segments but two vectors
    assert len(merge_vdf_segments(segs, same, vectors, VDFMergeParams(vector_threshold=3)).members) == 0
    res = merge_vdf_segments(segs, same, vectors, VDFMergeParams(vector_threshold=2))
    assert res.members[0].tolist() == [0, 1]
    np.testing.assert_allclose(res.intensities[0], [2.1 * m.sum(), 2.1 * m.sum()], rtol=1e-6)
    res = merge_vdf_segments(segs, np.array([0, 1, 2, 2]), vectors, VDFMergeParams(vector_threshold=3))
    assert res.members[0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("n, high", [(0, 5), (1, 5), (1000, 30), (50_000, 2**40)])
def test_distinct_equals_numpy_unique(n, high):
    from spedflow.segment._merge import _distinct
    keys = np.random.default_rng(n).integers(0, high, n, dtype=np.int64)
    got = _distinct(keys)
    np.testing.assert_array_equal(got, np.unique(keys))
    assert got.dtype == keys.dtype


def test_segment_threshold_is_a_fraction():
    base = disc((20, 20), 8)
    segs = np.array([base | disc((20, 30), 4)] + [base] * 3, float)   # one member has a tail
    params = VDFMergeParams(corr_threshold=0.5, vector_threshold=1, segment_threshold=0.5)
    res = merge_vdf_segments(segs, np.arange(4), np.zeros((4, 2)), params)
    assert len(res.members) == 1
    np.testing.assert_array_equal(res.summed[0] != 0, base)           # tail outvoted 1:3
    low = merge_vdf_segments(segs, np.arange(4), np.zeros((4, 2)),
                             VDFMergeParams(corr_threshold=0.5, vector_threshold=1,
                                            segment_threshold=0.25))
    np.testing.assert_array_equal(low.summed[0] != 0, segs[0] != 0)  # 1 of 4 is enough


def test_empty_and_membership_table(vdf_case):
    res = merge_vdf_segments(np.zeros((0, 5, 6)), np.zeros(0, int), np.zeros((3, 2)))
    assert res.summed.shape == (0, 5, 6) and res.membership_table()[0].shape == (0, 2)
    res = merge_vdf_segments(vdf_case["segments"], vdf_case["source"], vdf_case["vectors"])
    table, inten = res.membership_table()
    assert table.dtype == np.int32 and inten.dtype == np.float32
    assert table.shape == (sum(m.size for m in res.members), 2)
    for i, (m, iv) in enumerate(zip(res.members, res.intensities)):
        np.testing.assert_array_equal(table[table[:, 0] == i, 1], m)
        np.testing.assert_allclose(inten[table[:, 0] == i], iv, rtol=1e-6)


# -- virtual patterns -------------------------------------------------------------------

def test_virtual_patterns_brute_force():
    rng = np.random.default_rng(1)
    vectors = rng.uniform(-12, 12, (9, 2))
    members = [np.array([0, 3, 5]), np.array([1, 2, 4, 6, 8]), np.array([], int)]
    intens = [rng.uniform(1, 10, 3), rng.uniform(1, 10, 5), np.zeros(0)]
    ky, kx, sigma = 31, 36, 1.3
    got = virtual_patterns(vectors, members, intens, (ky, kx), sigma)
    assert got.shape == (3, ky, kx) and got.dtype == np.float32
    expect = np.zeros((3, ky, kx))
    for l in range(3):
        for y in range(ky):
            for x in range(kx):
                for v, a in zip(members[l], intens[l]):
                    cy, cx = vectors[v] + (ky // 2, kx // 2)
                    r2 = (y - cy) ** 2 + (x - cx) ** 2
                    expect[l, y, x] += a / (2 * np.pi * sigma**2) * np.exp(-r2 / (2 * sigma**2))
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-7)


def test_virtual_pattern_spot_integral_is_intensity():
    pat = virtual_patterns(np.array([[3.0, -5.5]]), [[0]], [[42.0]], (64, 64), 1.5)
    assert pat.sum() == pytest.approx(42.0, rel=1e-4)
    assert np.unravel_index(pat.argmax(), pat.shape)[1:] == (35, 26)


def test_pattern_sigma():
    assert pattern_sigma(VDFMergeParams(), 3.0) == pytest.approx(3 / math.sqrt(2))
    assert pattern_sigma(VDFMergeParams(pattern_sigma=1.5), 3.0) == 1.5


# -- NMF component merging --------------------------------------------------------------

@pytest.fixture(scope="module")
def nmf_case():
    """Crystal A split into components 0 and 3, B into 1, 2 and 5, C alone (4)."""
    rng = np.random.default_rng(2)
    k = 32

    def pattern(spots, weights):
        p = np.zeros((k, k))
        for (y, x), w in zip(spots, weights):
            p[draw_disk((y, x), 1.5, shape=(k, k))] += w
        return p

    spots = {c: rng.integers(3, k - 3, (8, 2)) for c in "ABC"}
    patterns, loadings = [], []
    parts = {0: ("A", (15, 10), (0, 0)), 3: ("A", (15, 10), (0, 4)), 1: ("B", (28, 28), (0, 0)),
             2: ("B", (28, 28), (3, 0)), 5: ("B", (28, 28), (-2, 3)), 4: ("C", (10, 30), (0, 0))}
    for e in range(6):
        c, centre, shift = parts[e]
        patterns.append(pattern(spots[c], rng.uniform(0.5, 1.5, 8)))
        loadings.append(disc((centre[0] + shift[0], centre[1] + shift[1]), 7)
                        * rng.uniform(0.5, 1.0, SHAPE))
    return np.array(patterns), np.array(loadings)


def test_merge_components_groups(nmf_case):
    f, l = nmf_case
    mf, ml, groups = merge_components(f, l)
    assert [g.tolist() for g in groups] == [[0, 3], [1, 2, 5], [4]]
    assert mf.shape == (3, 32, 32) and ml.shape == (3, *SHAPE) and mf.dtype == np.float32
    for g, a, b in zip(groups, mf, ml):
        np.testing.assert_allclose(a, f[g].sum(axis=0), rtol=1e-6)
        np.testing.assert_allclose(b, l[g].sum(axis=0), rtol=1e-6)


@pytest.mark.parametrize("tp, tl", [(0.45, 0.3), (0.2, 0.0), (0.8, 0.6), (-0.5, -0.5)])
def test_merge_components_thresholds_brute_force(nmf_case, tp, tl):
    f, l = nmf_case
    _, _, groups = merge_components(f, l, pattern_threshold=tp, loading_threshold=tl)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        for i in g:
            for j in g:
                if i != j:
                    assert pearson(f[i], f[j]) > tp and pearson(l[i], l[j]) > tl


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_merge_components_order_independent(nmf_case, seed):
    f, l = nmf_case
    perm = np.random.default_rng(seed).permutation(6)
    _, _, ref = merge_components(f, l, pattern_threshold=0.2, loading_threshold=0.1)
    _, _, got = merge_components(f[perm], l[perm], pattern_threshold=0.2, loading_threshold=0.1)
    assert {frozenset(g.tolist()) for g in ref} == {frozenset(perm[g].tolist()) for g in got}


def test_merge_components_pattern_mask_ignores_shared_beam(nmf_case):
    f, l = nmf_case
    f = f.copy()
    beam = np.zeros((32, 32), bool)
    beam[draw_disk((16, 16), 4)] = True
    f[:, beam] = 50.0                          # a strong direct beam in every pattern
    l = np.repeat(l[:1], 6, axis=0)            # loadings identical: only patterns decide
    _, _, merged = merge_components(f, l)
    assert len(merged) == 1                    # the beam makes everything correlate
    _, _, groups = merge_components(f, l, pattern_mask=~beam)
    assert [g.tolist() for g in groups] == [[0, 3], [1, 2, 5], [4]]


# -- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("cls, kwargs, match", [
    (VDFMergeParams, {"corr_threshold": 1.0}, "corr_threshold"),
    (VDFMergeParams, {"corr_threshold": -2}, "corr_threshold"),
    (VDFMergeParams, {"vector_threshold": 0}, "vector_threshold"),
    (VDFMergeParams, {"vector_threshold": 2.5}, "vector_threshold"),
    (VDFMergeParams, {"segment_threshold": 0}, "segment_threshold"),
    (VDFMergeParams, {"segment_threshold": 1.5}, "segment_threshold"),
    (VDFMergeParams, {"pattern_sigma": 0}, "pattern_sigma"),
    (VDFMergeParams, {"fragment_containment": 0}, "fragment_containment"),
    (NMFMergeParams, {"pattern_threshold": 1.2}, "pattern_threshold"),
    (NMFMergeParams, {"loading_threshold": "high"}, "loading_threshold"),
])
def test_bad_params(cls, kwargs, match):
    with pytest.raises(ParameterError, match=match):
        cls(**kwargs)


Z = np.zeros


@pytest.mark.parametrize("call, exc, match", [
    (lambda: merge_vdf_segments(Z((3, 4)), Z(3, int), Z((2, 2))), InputError, "3-D"),
    (lambda: merge_vdf_segments(Z((3, 4, 4)), Z(2, int), Z((2, 2))), InputError, "source_vector"),
    (lambda: merge_vdf_segments(Z((3, 4, 4)), np.array([0, 1, 2]), Z((2, 2))), InputError,
     "indices"),
    (lambda: merge_vdf_segments(Z((3, 4, 4)), Z(3), Z((2, 2))), InputError, "indices"),
    (lambda: merge_vdf_segments(Z((3, 4, 4)), Z(3, int), Z((2, 3))), InputError, r"\(N, 2\)"),
    (lambda: merge_vdf_segments(np.full((1, 2, 2), np.nan), Z(1, int), Z((1, 2))), InputError,
     "finite"),
    (lambda: virtual_patterns(Z((2, 2)), [[0]], [[1.0]], (8, 8), 0), ParameterError, "sigma"),
    (lambda: virtual_patterns(Z((2, 2)), [[0]], [[1.0]], (8, 0), 1), ParameterError, "shape"),
    (lambda: virtual_patterns(Z((2, 2)), [[0]], [[1.0], [2.0]], (8, 8), 1), InputError,
     "same length"),
    (lambda: virtual_patterns(Z((2, 2)), [[0, 1]], [[1.0]], (8, 8), 1), InputError, "intensities"),
    (lambda: virtual_patterns(Z((2, 2)), [[5]], [[1.0]], (8, 8), 1), InputError, "indices"),
    (lambda: merge_components(Z((3, 4, 4)), Z((2, 5, 5))), InputError, "components"),
    (lambda: merge_components(Z((3, 16)), Z((3, 5, 5))), InputError, "3-D"),
    (lambda: merge_components(Z((3, 4, 4)), Z((3, 5, 5)), pattern_mask=Z((5, 5), bool)),
     InputError, "pattern_mask"),
    (lambda: merge_components(Z((3, 4, 4)), Z((3, 5, 5)), pattern_threshold=1), ParameterError,
     "pattern_threshold"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_friedel_pair_keeps_a_two_vector_crystal_and_noise_pairs_are_dropped():
    """An off-axis crystal showing one Friedel pair (g, -g) is kept below the vector
    threshold; two correlated segments of unrelated vectors are not."""
    from spedflow.segment import VDFMergeParams, merge_vdf_segments
    yy, xx = np.mgrid[:32, :32]
    blob = ((yy - 10) ** 2 + (xx - 12) ** 2 < 25).astype(np.float32)
    segs = np.stack([blob, blob * 0.9])
    friedel = np.array([[10.0, 4.0], [-10.2, -3.9]])
    unrelated = np.array([[10.0, 4.0], [3.0, -12.0]])
    p = VDFMergeParams(vector_threshold=4)
    kept = merge_vdf_segments(segs, np.array([0, 1]), friedel, p)
    assert len(kept.summed) == 1 and set(kept.members[0]) == {0, 1}
    assert len(merge_vdf_segments(segs, np.array([0, 1]), unrelated, p).summed) == 0
    off = VDFMergeParams(vector_threshold=4, friedel_tolerance=0.0)
    assert len(merge_vdf_segments(segs, np.array([0, 1]), friedel, off).summed) == 0


# -- fragment folding -------------------------------------------------------------------

def _fragment_case():
    """A large crystal A (vectors 0-5) cut in half by the watershed in the images of
    vectors 4 and 5, and a small crystal B (vectors 6-9) lying inside A.

    VDF images: A's vectors light up all of A (thickness-like profile), B's vectors
    only B. Segments: A whole in vectors 0-3, A's left half in 4 and 5, B in 6-9.
    """
    yy, xx = np.mgrid[:40, :40]
    a = disc((20, 20), 12)
    b = disc((24, 26), 4)
    profile = np.clip(12 - np.hypot(yy - 20, xx - 20), 0, None)  # thicker in the middle
    images = np.zeros((10, *SHAPE))
    images[:6] = a * profile
    images[6:] = b * 5.0
    half = a & (xx < 20)
    segs = [images[v] * a for v in range(4)] + [images[v] * half for v in (4, 5)]
    segs += [images[v] * b for v in range(6, 10)]
    vectors = np.array([[10, 0], [-10, 0], [0, 10], [0, -10], [7, 7], [-7, -7],
                        [12, 5], [-12, -5], [5, -12], [-5, 12]], float)
    src = np.arange(10)
    return np.array(segs, np.float32), src, vectors, images, a, b


def test_fold_fragments_folds_a_cut_crystal_and_keeps_a_crystal_inside_it():
    segs, src, vectors, images, a, b = _fragment_case()
    p = VDFMergeParams(vector_threshold=2)
    merged = merge_vdf_segments(segs, src, vectors, p)
    # without folding: A whole, A's half (its own group), B
    assert sorted(tuple(m.tolist()) for m in merged.members) == [(0, 1, 2, 3), (4, 5),
                                                                  (6, 7, 8, 9)]
    folded = fold_fragments(merged, images, p)
    assert sorted(tuple(m.tolist()) for m in folded.members) == [(0, 1, 2, 3, 4, 5),
                                                                 (6, 7, 8, 9)]
    big = next(i for i, m in enumerate(folded.members) if 0 in m)
    small = 1 - big
    np.testing.assert_array_equal(folded.summed[big] > 0, a)
    np.testing.assert_array_equal(folded.summed[small] > 0, b)
    # the folded-in half adds its intensity inside A; totals and memberships agree
    half_total = segs[4].sum() + segs[5].sum()
    np.testing.assert_allclose(folded.summed[big].sum(), merged.summed[
        next(i for i, m in enumerate(merged.members) if 0 in m)].sum() + half_total, rtol=1e-5)
    np.testing.assert_allclose(sum(folded.intensities[big]), folded.summed[big].sum(), rtol=1e-5)
    assert sorted(folded.segment_members[big].tolist()) == [0, 1, 2, 3, 4, 5]
    # decreasing total, as merge_vdf_segments orders
    totals = folded.summed.reshape(len(folded.summed), -1).sum(axis=1)
    assert np.all(np.diff(totals) <= 0)


def test_fold_fragments_joins_groups_on_one_mask_whatever_their_profiles():
    """Thickness fringes: half of a crystal's reflections bright where the other half
    are dark (dynamical diffraction). The correlation merge gives two groups on one
    mask, which the contrast test does not join (each half is brighter on its own
    fringes); their masks coincide, so they are one crystal. A second, smaller crystal
    inside it (B of the fragment case, IoU 0.11) stays."""
    yy, xx = np.mgrid[:40, :40]
    a = disc((20, 20), 12)
    b = disc((24, 26), 4)
    fringe = np.cos(2 * np.pi * xx / 12.0)
    images = np.zeros((12, *SHAPE))
    images[:4] = a * (1.05 + fringe)
    images[4:8] = a * (1.05 - fringe)
    images[8:] = b * 5.0
    segs = np.array([images[v] * a for v in range(8)] + [images[v] * b for v in range(8, 12)],
                    np.float32)
    vectors = np.array([[10, 0], [-10, 0], [0, 10], [0, -10], [7, 7], [-7, -7], [7, -7],
                        [-7, 7], [12, 5], [-12, -5], [5, -12], [-5, 12]], float)
    p = VDFMergeParams(vector_threshold=2)
    merged = merge_vdf_segments(segs, np.arange(12), vectors, p)
    assert sorted(tuple(m.tolist()) for m in merged.members) == [(0, 1, 2, 3), (4, 5, 6, 7),
                                                                  (8, 9, 10, 11)]
    assert fold_fragments(merged, images, dataclasses.replace(p, coincident_iou=1.5)) is merged
    folded = fold_fragments(merged, images, p)
    assert sorted(tuple(m.tolist()) for m in folded.members) == [tuple(range(8)), (8, 9, 10, 11)]
    big = next(i for i, m in enumerate(folded.members) if 0 in m)
    np.testing.assert_array_equal(folded.summed[big] > 0, a)
    np.testing.assert_allclose(folded.summed[big].sum(), segs[:8].sum(), rtol=1e-5)


def test_fold_fragments_can_be_disabled_and_checks_images():
    segs, src, vectors, images, a, b = _fragment_case()
    p = VDFMergeParams(vector_threshold=2, fragment_containment=1.5)
    merged = merge_vdf_segments(segs, src, vectors, p)
    assert fold_fragments(merged, images, p) is merged
    with pytest.raises(InputError, match="images"):
        fold_fragments(merged, images[:, :20], p)
    with pytest.raises(InputError, match="images"):
        fold_fragments(merged, images[:5], p)


def test_fold_fragments_keeps_a_fragment_whose_vectors_light_only_it():
    """Containment alone is not enough: a half-crystal whose own vectors are dark on
    the other half is a different crystal and stays."""
    segs, src, vectors, images, a, b = _fragment_case()
    yy, xx = np.mgrid[:40, :40]
    images = images.copy()
    images[4:6] = images[4:6] * (xx < 20)
    p = VDFMergeParams(vector_threshold=2)
    merged = merge_vdf_segments(segs, src, vectors, p)
    assert len(fold_fragments(merged, images, p).summed) == 3


def test_fold_fragments_keeps_a_weak_crystal_whose_apertures_catch_the_strong_ones_spots():
    """B's vectors sit close to A's spots, so their images carry A's intensity (a leak
    following A's thickness) plus B's own on B: correlated with A over A's mask, but
    brighter on B relative to A than elsewhere. B stays; with the contrast test
    loosened it is folded."""
    segs, src, vectors, images, a, b = _fragment_case()
    images = images.copy()
    images[6:] = 0.3 * images[0] + b * 2.0
    p = VDFMergeParams(vector_threshold=2)
    merged = merge_vdf_segments(segs, src, vectors, p)
    in_a = a.ravel()
    pa, pb = images[6:].sum(0).ravel()[in_a], images[:6].sum(0).ravel()[in_a]
    r = pearson(pa, pb)
    assert p.corr_threshold < r < 0.9  # correlation alone would fold it
    folded = fold_fragments(merged, images, p)
    assert any(tuple(m.tolist()) == (6, 7, 8, 9) for m in folded.members)
    loose = VDFMergeParams(vector_threshold=2, fragment_contrast=1e6)
    assert not any(tuple(m.tolist()) == (6, 7, 8, 9)
                   for m in fold_fragments(merged, images, loose).members)


def test_sparse_segments_give_the_same_merge(vdf_case):
    """The sparse form (what the workflow uses on large scans) merges exactly as dense."""
    from scipy import sparse
    from spedflow.segment import segments_from_labels
    segs = vdf_case["segments"]
    dense = merge_vdf_segments(segs, vdf_case["source"], vdf_case["vectors"])
    sp = sparse.csr_matrix(segs.reshape(len(segs), -1))
    res = merge_vdf_segments(sp, vdf_case["source"], vdf_case["vectors"], scan_shape=SHAPE)
    np.testing.assert_array_equal(res.summed, dense.summed)
    assert [m.tolist() for m in res.members] == [m.tolist() for m in dense.members]
    with pytest.raises(InputError, match="scan_shape"):
        merge_vdf_segments(sp, vdf_case["source"], vdf_case["vectors"])
    np.testing.assert_allclose(correlation_matrix(sp), correlation_matrix(segs), atol=1e-12)
    # segments_from_labels' sparse form holds the same values
    labels = (segs > 0).astype(np.int32)
    d, src_d = segments_from_labels(segs, labels)
    s_, src_s = segments_from_labels(segs, labels, sparse=True)
    np.testing.assert_array_equal(s_.toarray().reshape(d.shape), d)
    np.testing.assert_array_equal(src_s, src_d)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_component_wise_complete_linkage_equals_full_matrix(seed):
    """Grouping per connected component of the above-threshold graph (what scales to
    10^4 segments) gives exactly the groups of complete linkage on the full matrix."""
    from scipy import sparse
    from spedflow.segment._merge import (_canonical_order, _complete_groups,
                                         _complete_groups_sparse)
    rng = np.random.default_rng(seed)
    segs = []
    for _ in range(60):  # overlapping blobs of a few sizes: chains, cliques and loners
        m = disc(tuple(rng.integers(4, 36, 2)), rng.integers(3, 8))
        segs.append(m * rng.uniform(0.5, 2.0, SHAPE))
    flat = np.array(segs).reshape(60, -1)
    canon = _canonical_order(flat)
    for thr in (0.3, 0.7, 0.9):
        corr = correlation_matrix(flat)[np.ix_(canon, canon)]
        full = [np.sort(canon[g]) for g in _complete_groups(1.0 - corr, 1.0 - thr)]
        for form in (flat, sparse.csr_matrix(flat)):
            got = _complete_groups_sparse(form, canon, thr)
            assert [g.tolist() for g in got] == [g.tolist() for g in full]


# --------------------------------------------------------------- Friedel pairs on a ring

def _ring_case():
    """Eight vectors on one ring |g| = 20 (four Friedel pairs) plus a crystal's four
    vectors elsewhere. Images: a radially symmetric background (film, glare) lights
    every ring vector alike over the film region F; crystal C (a disc) is bright only
    in the images of the pair (0, 4); crystal D in its own four vectors."""
    yy, xx = np.mgrid[:40, :40]
    film = (xx < 26).astype(np.float32)              # F: the film, holes to the right
    c = disc((10, 32), 5)                            # C: a crystal over a hole
    d = disc((30, 10), 6)                            # D: a four-vector crystal
    ang = np.arange(8) * np.pi / 4
    ring = np.column_stack([20 * np.sin(ang), 20 * np.cos(ang)])  # i and i+4 are -g
    vectors = np.vstack([ring, [[7.0, 31.0], [-7.0, -31.0], [31.0, -7.0], [-31.0, 7.0]]])
    images = np.full((12, 40, 40), 0.5, np.float32)  # counting noise everywhere
    images[:8] += 5.0 * film
    images[[0, 4]] += 40.0 * c
    images[8:] += 30.0 * d
    segs = [40.0 * c, 40.0 * c, 5.0 * film, 5.0 * film] + [30.0 * d] * 4
    src = [0, 4, 2, 6] + [8, 9, 10, 11]
    return np.array(segs, np.float32), np.array(src), vectors, images


def test_friedel_pair_of_a_ring_background_is_dropped_and_a_crystal_pair_kept():
    from spedflow.segment import drop_radial_pairs
    segs, src, vectors, images = _ring_case()
    p = VDFMergeParams()
    merged = merge_vdf_segments(segs, src, vectors, p)
    # the Friedel rule keeps both two-vector groups: the crystal's (0, 4) and the
    # film's (2, 6), which is centrosymmetric like any radial background
    assert sorted(tuple(m.tolist()) for m in merged.members) == [(0, 4), (2, 6), (8, 9, 10, 11)]
    kept = drop_radial_pairs(merged, images, p, radius=2.5)
    assert sorted(tuple(m.tolist()) for m in kept.members) == [(0, 4), (8, 9, 10, 11)]
    i = next(k for k, m in enumerate(kept.members) if 0 in m)
    np.testing.assert_array_equal(kept.summed[i] > 0, disc((10, 32), 5))
    # disabled: all three; a ring with no other vector on it: kept too
    off = VDFMergeParams(friedel_ring_contrast=0)
    assert drop_radial_pairs(merged, images, off, radius=2.5) is merged
    # the film pair alone on its ring (the others moved out): nothing to compare with, kept
    far = vectors.copy()
    far[[0, 1, 3, 4, 5, 7]] *= 1.5
    alone = merge_vdf_segments(segs, src, far, p)
    assert len(drop_radial_pairs(alone, images, p, radius=2.5).summed) == 3
    # VDF images are exactly 0 off their spots after the DoG (no noise floor), and
    # vectors of other crystals on the ring may show nothing at all: still decided
    dark = images - 0.5
    kept = drop_radial_pairs(merged, dark, p, radius=2.5)
    assert sorted(tuple(m.tolist()) for m in kept.members) == [(0, 4), (8, 9, 10, 11)]
    empty = images.copy()
    empty[[1, 3, 5, 7]] = 0  # ring vectors that show nothing: contrast 0, not 0 / 0
    kept = drop_radial_pairs(merged, empty, p, radius=2.5)
    assert (0, 4) in [tuple(m.tolist()) for m in kept.members]
    with pytest.raises(InputError, match="images"):
        drop_radial_pairs(merged, images[:5], p, radius=2.5)
    with pytest.raises(ParameterError, match="friedel_ring_contrast"):
        VDFMergeParams(friedel_ring_contrast=-1)


def _shared_case():
    """Crystals A and B (six vectors each) side by side; vectors 12, 13 a Friedel pair
    both of them excite (one phase: a shared reflection); W a weak two-vector crystal
    over a small part of A; D a four-vector crystal half over A, half over B's side."""
    from spedflow.segment import MergeResult
    a, b = disc((20, 11), 8), disc((20, 29), 8)
    w = disc((20, 8), 3)
    d = disc((8, 20), 5)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:40, :40]
    ta = a * (1.5 - np.hypot(yy - 20, xx - 11) / 8)  # thicker in the middle, like a crystal
    tb = b * (1.5 - np.hypot(yy - 20, xx - 29) / 8)
    images = rng.uniform(0, 0.1, (20, 40, 40)).astype(np.float32)
    images[0:6] += 10 * ta
    images[6:12] += 10 * tb
    images[12:14] += 4 * ta + 7 * tb
    images[14:16] += 3 * w
    images[16:20] += 5 * d
    vectors = np.array([[np.sin(t) * 20, np.cos(t) * 20] for t in np.linspace(0, 6, 20)])
    groups = [(a, range(0, 6)), (b, range(6, 12)), (a | b, range(12, 14)), (w, range(14, 16)),
              (d, range(16, 20))]
    summed = np.stack([images[list(v)].sum(0) * m for m, v in groups])
    members = tuple(np.array(list(v)) for _, v in groups)
    inten = tuple(np.array([images[i][m].sum() for i in v], float) for m, v in groups)
    return MergeResult(summed, members, inten, tuple(np.array([k]) for k in range(5)), vectors,
                       5), images, a, b


def test_shared_reflection_group_is_dropped_and_joins_its_crystals():
    from spedflow.segment import drop_shared_reflections
    merged, images, a, b = _shared_case()
    out = drop_shared_reflections(merged, images, VDFMergeParams())
    # the union of A and B goes; the weak crystal over A and the crystal D stay
    assert [tuple(m.tolist()) for m in out.members] == [
        tuple(range(0, 6)) + (12, 13), tuple(range(6, 14)), (14, 15), (16, 17, 18, 19)]
    np.testing.assert_array_equal(out.summed, merged.summed[[0, 1, 3, 4]])
    # the shared vectors join each crystal with their image total over its mask
    np.testing.assert_allclose(out.intensities[0][-2:], [images[12][a].sum(), images[13][a].sum()],
                               rtol=1e-6)
    np.testing.assert_allclose(out.intensities[1][-2:], [images[12][b].sum(), images[13][b].sum()],
                               rtol=1e-6)
    # the same answer whatever the order of the groups
    order = [4, 2, 0, 3, 1]
    from spedflow.segment import MergeResult
    shuffled = MergeResult(merged.summed[order], tuple(merged.members[i] for i in order),
                           tuple(merged.intensities[i] for i in order),
                           tuple(merged.segment_members[i] for i in order), merged.vectors, 5)
    out2 = drop_shared_reflections(shuffled, images, VDFMergeParams())
    assert sorted(tuple(m.tolist()) for m in out2.members) == sorted(
        tuple(m.tolist()) for m in out.members)
    # disabled
    assert drop_shared_reflections(merged, images, VDFMergeParams(shared_coverage=1.5)) is merged
    with pytest.raises(ParameterError, match="shared_coverage"):
        VDFMergeParams(shared_coverage=0)


def test_friedel_pair_inside_most_of_one_crystal_is_dropped_a_weak_crystal_kept():
    from spedflow.segment import MergeResult, drop_shared_reflections
    merged, images, a, b = _shared_case()
    # the pair's segment covers 90 % of A and little else (its watershed cut only A):
    # A's reflection; the same with four vectors is a crystal over A and stays
    part = a & ~disc((20, 4), 3)
    summed = merged.summed.copy()
    summed[2] = images[12:14].sum(0) * part
    one = MergeResult(summed, merged.members, merged.intensities, merged.segment_members,
                      merged.vectors, 5)
    out = drop_shared_reflections(one, images, VDFMergeParams())
    assert [tuple(m.tolist()) for m in out.members] == [
        tuple(range(0, 6)) + (12, 13), tuple(range(6, 12)), (14, 15), (16, 17, 18, 19)]
    four = MergeResult(summed,
                       merged.members[:2] + (np.array([12, 13, 14, 15]),) + merged.members[3:],
                       merged.intensities[:2] + (np.ones(4),) + merged.intensities[3:],
                       merged.segment_members, merged.vectors, 5)
    assert len(drop_shared_reflections(four, images, VDFMergeParams()).summed) == 5


def test_weak_friedel_crystal_over_most_of_a_stronger_one_is_kept():
    """The paper's P2 case over most of its host: a two-vector crystal covering 60 % of a
    better-supported one is bright in its vectors on its own part only; it stays."""
    from spedflow.segment import MergeResult, drop_shared_reflections
    rng = np.random.default_rng(2)
    host = disc((20, 20), 10)
    yy, xx = np.mgrid[:40, :40]
    thick = host * (1.5 - np.hypot(yy - 20, xx - 20) / 10)
    weak = host & (np.arange(40)[None, :] < 23)  # the left 60 % of the host
    images = rng.uniform(0, 0.1, (8, 40, 40)).astype(np.float32)
    images[:6] += 10 * thick
    images[6:] += 2 * weak
    vectors = np.array([[np.sin(t) * 20, np.cos(t) * 20] for t in np.linspace(0, 6, 8)])
    groups = [(host, range(0, 6)), (weak, range(6, 8))]
    summed = np.stack([images[list(v)].sum(0) * m for m, v in groups])
    merged = MergeResult(summed, tuple(np.array(list(v)) for _, v in groups),
                         tuple(np.ones(len(v)) for _, v in groups), (np.array([0]), np.array([1])),
                         vectors, 2)
    assert (weak.sum() / host.sum()) > 0.5
    assert len(drop_shared_reflections(merged, images, VDFMergeParams()).summed) == 2
    # the same pair lighting all of the host (its own reflection, cut short by the watershed)
    images[6:] = images[6:] - 2 * weak + 3 * thick
    summed[1] = images[6:].sum(0) * weak
    own = MergeResult(summed, merged.members, merged.intensities, merged.segment_members,
                      vectors, 2)
    assert len(drop_shared_reflections(own, images, VDFMergeParams()).summed) == 1


def test_shared_group_over_parts_of_large_crystals_is_dropped_a_crystal_there_kept():
    """On large scans a shared reflection's segment can be a band across two crystals
    (its watershed cut the union), less than half of either: its vectors still light
    both of them all over, beyond the band as inside it, so they are theirs. A
    four-vector crystal on the same band, bright in its own vectors only, stays."""
    from spedflow.segment import MergeResult, drop_shared_reflections
    _, images, a, b = _shared_case()
    yy, xx = np.mgrid[:40, :40]
    ta = a * (1.5 - np.hypot(yy - 20, xx - 11) / 8)
    tb = b * (1.5 - np.hypot(yy - 20, xx - 29) / 8)
    band = (a | b) & (np.abs(yy - 20) <= 2)
    assert (band & a).sum() < 0.5 * a.sum() and (band & b).sum() < 0.5 * b.sum()

    def merged_with(imgs):
        groups = [(a, range(0, 6)), (b, range(6, 12)), (band, range(12, 16))]
        summed = np.stack([imgs[list(v)].sum(0) * m for m, v in groups])
        return MergeResult(summed, tuple(np.array(list(v)) for _, v in groups),
                           tuple(np.array([imgs[i][m].sum() for i in v], float) for m, v in groups),
                           tuple(np.array([k]) for k in range(3)), np.zeros((20, 2)), 3)

    shared = images.copy()
    shared[12:16] = images[12:16] - images[12:16].min() + 4 * ta + 7 * tb
    out = drop_shared_reflections(merged_with(shared), shared, VDFMergeParams())
    assert [tuple(m.tolist()) for m in out.members] == [
        tuple(range(0, 6)) + (12, 13, 14, 15), tuple(range(6, 16))]
    own = images.copy()
    own[12:16] = images[12:16] - images[12:16].min() + 5 * band
    assert len(drop_shared_reflections(merged_with(own), own, VDFMergeParams()).summed) == 3


# -- image stacks on disk ---------------------------------------------------------------

def _same_result(x, y):
    assert [m.tolist() for m in x.members] == [m.tolist() for m in y.members]
    for a, b in zip(x.intensities, y.intensities):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(x.summed, y.summed)


@pytest.mark.parametrize("case", ["fragments", "shared", "ring"])
def test_merging_steps_read_a_zarr_stack_an_image_at_a_time(tmp_path, case, monkeypatch):
    """The workflow hands the merging steps its stage's zarr stack (one image per chunk)
    rather than the stack in memory: every step gives the same answer, bit for bit, also
    when its cache holds a single image and images are read again."""
    import zarr

    from spedflow.segment import drop_radial_pairs, drop_shared_reflections
    from spedflow.segment import _merge as M

    if case == "fragments":
        segs, src, vectors, images, _, _ = _fragment_case()
        merged = merge_vdf_segments(segs, src, vectors, VDFMergeParams(vector_threshold=2))
    elif case == "shared":
        merged, images, _, _ = _shared_case()
    else:
        segs, src, vectors, images = _ring_case()
        merged = merge_vdf_segments(segs, src, vectors, VDFMergeParams())
    images = images.astype(np.float32)
    z = zarr.open_group(str(tmp_path / "s.zarr"), mode="w").create_array(
        "images", shape=images.shape, chunks=(1,) + images.shape[1:], dtype=np.float32)
    z[...] = images
    p = VDFMergeParams(vector_threshold=2) if case == "fragments" else VDFMergeParams()
    steps = [lambda m, im: drop_radial_pairs(m, im, p, radius=2.5),
             lambda m, im: drop_shared_reflections(m, im, p),
             lambda m, im: fold_fragments(m, im, p)]
    want = [step(merged, images) for step in steps]
    assert any(w is not merged for w in want)  # the case changes something
    for cache_bytes in (64 * 2**20, 1):
        monkeypatch.setattr(M._Images.__init__, "__defaults__", (cache_bytes,))
        for step, w in zip(steps, want):
            _same_result(step(merged, z), w)


def test_image_reader_sums_like_numpy_and_keeps_a_bounded_cache(tmp_path):
    import zarr

    from spedflow.segment._merge import _Images
    rng = np.random.default_rng(0)
    images = rng.normal(size=(9, 5, 7)).astype(np.float32)
    z = zarr.open_group(str(tmp_path / "s.zarr"), mode="w").create_array(
        "images", shape=images.shape, chunks=(1, 5, 7), dtype=np.float32)
    z[...] = images
    im = _Images(z, cache_bytes=3 * 4 * 35)  # three images
    order = [4, 0, 8, 4, 2, 7]
    np.testing.assert_array_equal(im.sum_of(order),
                                  images[order].reshape(6, -1).sum(axis=0, dtype=np.float64))
    assert len(im._cache) == 3 and list(im._cache) == [4, 2, 7]
    np.testing.assert_array_equal(im.image(3), images[3])
    # integer stacks come back as floating point
    assert _Images(np.arange(8).reshape(2, 2, 2)).image(1).dtype == np.float32


def test_merging_computes_a_dask_stack_once():
    """A dask stack (e.g. ``vdf.vdf_images`` not yet computed) is computed once, not once
    per image read: each of its chunks may hold every image."""
    import dask
    import dask.array as da

    segs, src, vectors, images, _, _ = _fragment_case()
    p = VDFMergeParams(vector_threshold=2)
    merged = merge_vdf_segments(segs, src, vectors, p)
    calls = []

    def counted(block):
        calls.append(1)
        return block

    lazy = da.from_array(images, chunks=(10, 20, 20)).map_blocks(counted)
    calls.clear()  # map_blocks tried the function on an empty block
    with dask.config.set(scheduler="synchronous"):
        _same_result(fold_fragments(merged, lazy, p), fold_fragments(merged, images, p))
    assert len(calls) == 4  # the four chunks, each computed once


def test_fold_fragments_joins_groups_on_one_small_mask_up_to_a_one_pixel_rim():
    """Two groups of one small crystal whose watershed outlines differ by a pixel all
    round (IoU 0.51 < coincident_iou) are one crystal (rule 3), also with a stray pixel
    of noise beyond the rim; two pixels apart, or with ``coincident_iou`` above 1, they
    stay apart. (The profiles are anti-correlated fringes and the lattice rule is off:
    only the rim can join them.)"""
    yy, xx = np.mgrid[:40, :40]
    small = (np.abs(yy - 20) <= 2) & (np.abs(xx - 20) <= 2)          # 5 x 5
    rim = small.copy()
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        rim |= np.roll(small, (dy, dx), axis=(0, 1))                 # grown by one pixel
    wide = (np.abs(yy - 20) <= 4) & (np.abs(xx - 20) <= 4)           # two pixels all round
    stray = rim.copy()
    stray[20, 26] = True                                             # 3 px beyond the rim
    fringe = np.cos(2 * np.pi * xx / 3.0)
    vectors = np.array([[10, 0], [-10, 0], [0, 10], [0, -10], [7, 7], [-7, -7], [7, -7],
                        [-7, 7]], float)
    p = VDFMergeParams(vector_threshold=2, lattice_significance=0.0)
    for outer, joins in ((rim, True), (stray, True), (wide, False)):
        images = np.zeros((8, *SHAPE))
        images[:4] = small * (1.05 + fringe)
        images[4:] = outer * (1.05 - fringe)
        segs = np.array([images[v] for v in range(8)], np.float32)
        merged = merge_vdf_segments(segs, np.arange(8), vectors, p)
        assert len(merged.summed) == 2
        inter = (small & outer).sum()
        assert inter / (small | outer).sum() < p.coincident_iou
        assert len(fold_fragments(merged, images, p).summed) == (1 if joins else 2)
        off = dataclasses.replace(p, coincident_iou=1.5)
        assert len(fold_fragments(merged, images, off).summed) == 2


def test_drop_rims_drops_a_crystals_rim_only():
    """A group of two of a crystal's vectors lit in a ring about it (the probe's tail,
    thickness fringes at its thin edge) is dropped; the same subset of vectors on a
    crystal of its own away from the first, a ring of other vectors, and a subset lying
    mostly beyond the rim width stay; ``rim_width = 0`` keeps all."""
    from scipy import ndimage

    from spedflow.segment import MergeResult, drop_rims
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 12, xx - 12)
    crystal = r <= 6
    ring = (r > 5) & (r <= 8.5)
    far = np.hypot(yy - 32, xx - 30) <= 4                      # its own crystal
    beyond = (np.hypot(yy - 12, xx - 22) <= 4.5) & ~crystal      # mostly > 3 px out
    masks = np.stack([crystal, ring, far, ring, beyond]).astype(np.float32)
    members = (np.arange(8), np.array([6, 7]), np.array([6, 7]), np.array([6, 9]),
               np.array([1, 2]))
    res = MergeResult(masks, members, tuple(np.ones(m.size) for m in members),
                      tuple(np.array([i]) for i in range(5)), np.zeros((10, 2)), 5)
    out = drop_rims(res, VDFMergeParams())
    kept = [tuple(m) for m in out.members]
    assert kept == [tuple(members[i]) for i in (0, 2, 3, 4)]
    assert np.array_equal(out.summed, masks[[0, 2, 3, 4]])
    assert drop_rims(res, VDFMergeParams(rim_width=0)) is res
    near = (masks[4] > 0) & ndimage.binary_dilation(crystal, iterations=3)
    assert near.sum() < 0.75 * masks[4].sum()  # the case is one the rule keeps


# --- noise-corrected correlation (segment_reliability) ------------------------------

def _reliability_brute(segments):
    """segment_reliability written out for dense (M, Y, X) segments, one loop each."""
    from spedflow.segment._merge import _MIN_NOISE_PAIRS, RELIABILITY_FLOOR
    out = []
    from scipy import ndimage
    for s in segments:
        s = s.astype(np.float64)
        m = ndimage.binary_erosion(s != 0, border_value=0)  # all four neighbours inside
        d = list(s[:, 1:][m[:, 1:] & m[:, :-1]] - s[:, :-1][m[:, 1:] & m[:, :-1]])
        d += list(s[1:][m[1:] & m[:-1]] - s[:-1][m[1:] & m[:-1]])
        m = s != 0
        d = np.asarray(d)
        if d.size < _MIN_NOISE_PAIRS:
            out.append(np.nan)
            continue
        sigma2 = (1.4826 * np.median(np.abs(d - np.median(d)))) ** 2 / 2
        rel = 1 - m.sum() * sigma2 / (s.size * s.var())
        out.append(float(np.clip(rel, RELIABILITY_FLOOR, 1.0)))
    return np.array(out)


@pytest.mark.parametrize("block", [1 << 20, 150])  # one block; several (a row per block too)
def test_segment_reliability_equals_a_brute_force_loop_dense_and_sparse(block, monkeypatch):
    from scipy import sparse

    from spedflow.segment import _merge
    from spedflow.segment._merge import segment_reliability
    monkeypatch.setattr(_merge, "_BLOCK_VALUES", block)
    rng = np.random.default_rng(3)
    segs = []
    for k, (c, r, snr) in enumerate([((10, 10), 7, 20.0), ((20, 25), 9, 1.0), ((30, 8), 6, 3.0),
                                     ((5, 35), 1, 1.0), ((39, 39), 3, 2.0)]):
        m = disc(c, r)
        segs.append(np.where(m, 10.0 + rng.normal(0, 10.0 / snr, SHAPE), 0.0))
    segs = np.stack(segs).astype(np.float32)  # as the workflow's segments
    want = _reliability_brute(segs)
    flat = segs.reshape(len(segs), -1)
    np.testing.assert_allclose(segment_reliability(flat, SHAPE), want, rtol=1e-10)
    np.testing.assert_allclose(segment_reliability(sparse.csr_matrix(flat), SHAPE), want, rtol=1e-10)
    assert want[0] > 0.95 and np.isnan(want[3])  # little noise; too few pairs to tell


def test_noise_corrected_correlation_recovers_the_signals_correlation():
    """Two noisy copies of one crystal's segment (signal-to-noise 2, as at low dose)
    correlate well below the noise-free copies; divided by sqrt(rel_a rel_b) they come
    back to it (Spearman's correction), within the scatter of the estimate."""
    from spedflow.segment._merge import _disattenuated, segment_reliability
    rng = np.random.default_rng(7)
    shape = (64, 64)
    m = disc((32, 30), 14, shape)
    yy, xx = np.indices(shape)
    signal = np.where(m, 5.0 + 0.1 * (yy - 32), 0.0)  # a thickness ramp
    clean = np.stack([signal, 0.8 * signal])
    noisy = np.stack([np.where(m, s + rng.normal(0, 5.0 / 2.0, shape), 0.0) for s in clean])
    c_clean = correlation_matrix(clean)[0, 1]
    c_noisy = correlation_matrix(noisy)[0, 1]
    rel = segment_reliability(noisy.reshape(2, -1), shape)
    c_fixed = _disattenuated(correlation_matrix(noisy), rel)[0, 1]
    assert c_noisy < c_clean - 0.1
    assert abs(c_fixed - c_clean) < 0.05, (c_noisy, c_fixed, c_clean)


@pytest.mark.parametrize("corrected, image_snr, n_crystals", [
    (True, None, 2), (False, 1.0, 0),
    ("auto", 1.0, 2),    # the images noise-dominated (under NOISY_IMAGES): corrected
    ("auto", 3.0, 0),    # not: the paper's comparison
    ("auto", None, 0),   # not known: the paper's
])
def test_low_dose_segments_of_one_crystal_merge_when_noise_corrected(corrected, image_snr,
                                                                     n_crystals):
    """Two crystals, four vectors each, every VDF segment its crystal's mask with pixel
    noise of signal-to-noise 1.5: their segments correlate ~0.6 (< 0.7) and no group
    reaches four vectors; corrected for the noise they form the two crystals, and the
    two crystals (overlapping a little) stay apart."""
    rng = np.random.default_rng(11)
    masks = [disc((12, 12), 9), disc((26, 26), 9)]
    segs, src = [], []
    for k, m in enumerate(masks):
        for v in range(4):
            segs.append(np.where(m, np.clip(10.0 + rng.normal(0, 10.0 / 1.5, SHAPE), 0.1, None), 0.0))
            src.append(4 * k + v)
    vectors = np.array([[10.0 * np.cos(a), 10.0 * np.sin(a)] for a in np.linspace(0, 6, 8)])
    params = VDFMergeParams(noise_corrected=corrected, friedel_tolerance=0)
    res = merge_vdf_segments(np.stack(segs), np.array(src), vectors, params, image_snr=image_snr)
    assert len(res.members) == n_crystals
    if n_crystals:
        assert sorted(tuple(m) for m in res.members) == [(0, 1, 2, 3), (4, 5, 6, 7)]


@pytest.mark.parametrize("value", ["yes", 1, None, "AUTO"])
def test_noise_corrected_takes_true_false_or_auto(value):
    with pytest.raises(ParameterError, match="noise_corrected"):
        VDFMergeParams(noise_corrected=value)


def test_a_pair_is_corrected_only_where_both_segments_noise_is_measured():
    """A grain too small to measure its noise on keeps its measured correlation with
    every segment (the other's reliability alone does not lift it)."""
    from spedflow.segment._merge import _disattenuated
    corr = np.array([[1.0, 0.6, 0.6], [0.6, 1.0, 0.6], [0.6, 0.6, 1.0]])
    out = _disattenuated(corr, np.array([0.64, np.nan, 0.81]))
    np.testing.assert_allclose(out, [[1, 0.6, 0.6 / np.sqrt(0.64 * 0.81)],
                                     [0.6, 1, 0.6], [0.6 / np.sqrt(0.64 * 0.81), 0.6, 1]])
