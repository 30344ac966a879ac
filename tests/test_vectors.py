"""Unique vectors: histogram reduction (process / merge / finalize) vs truth and DBSCAN."""

import dask
import dask.array as da
import numpy as np
import pytest
from sklearn.cluster import DBSCAN

from spedflow.errors import InputError, ParameterError
from spedflow.peaks import PeakParams, find_peaks
from spedflow.peaks.vectors import VectorParams, merge, peak_histogram, resolve, unique_vectors

K = 64
BEAM = np.array([K // 2, K // 2], float)


def synthetic_table(vectors, counts, *, scatter=0.3, n_noise=300, n_beam=400, seed=0):
    """A peak table: ``counts[i]`` peaks scattered about each vector, beam peaks, noise."""
    rng = np.random.default_rng(seed)
    pos = [BEAM + v + rng.normal(0, scatter, (c, 2)) for v, c in zip(vectors, counts)]
    pos.append(BEAM + rng.normal(0, 0.5, (n_beam, 2)))
    pos.append(rng.uniform(0, K - 1, (n_noise, 2)))
    pos = np.concatenate(pos)
    scan = rng.integers(0, 40, (len(pos), 2))
    return np.column_stack([scan, pos, rng.uniform(1, 10, len(pos))]).astype(np.float32)


TRUE_VECTORS = np.array([[10.3, 0.2], [-10.1, -0.4], [0.6, 12.7], [7.2, 7.9], [-15.5, 11.1]])
COUNTS = [200, 60, 25, 16, 80]


def test_histogram_is_a_mergeable_reduction():
    t = synthetic_table(TRUE_VECTORS, COUNTS)
    parts = np.array_split(t, 5)
    hists = [peak_histogram(p, (K, K), oversample=2) for p in parts]
    whole = peak_histogram(t, (K, K), oversample=2)
    np.testing.assert_array_equal(merge(merge(hists[0], hists[1]), hists[2]),
                                  merge(hists[0], merge(hists[1], hists[2])))
    total = hists[0]
    for h in hists[1:]:
        total = merge(total, h)
    np.testing.assert_array_equal(total, whole)
    assert whole.sum() == len(t)  # every peak lies on the detector
    w = np.round(t[:, 4])
    np.testing.assert_allclose(sum(peak_histogram(p, (K, K), 2, weights=np.round(p[:, 4]))
                                   for p in parts), peak_histogram(t, (K, K), 2, weights=w))


def test_histogram_bins_match_numpy():
    t = synthetic_table(TRUE_VECTORS, COUNTS, seed=1)
    o = 3
    edges_y = (np.arange(K * o + 1)) / o - 0.5
    ref, _, _ = np.histogram2d(t[:, 2], t[:, 3], bins=[edges_y, edges_y])
    np.testing.assert_array_equal(peak_histogram(t, (K, K), oversample=o), ref)


def test_recovers_known_vectors():
    t = synthetic_table(TRUE_VECTORS, COUNTS, seed=2)
    hist = peak_histogram(t, (K, K), oversample=2)
    v, support = unique_vectors(hist, detector_shape=(K, K), params=VectorParams(),
                                beam_radius=3.0, return_support=True)
    assert len(v) == len(TRUE_VECTORS)  # beam and noise dropped
    d = np.linalg.norm(v[:, None, :] - TRUE_VECTORS[None], axis=2)
    assert d.min(axis=1).max() < 0.2
    assert support[0] == support.max()  # strongest first
    assert np.all(support >= 10)


def test_min_patterns_and_edge():
    vec = np.array([[10.0, 0.0], [-10.0, 0.0], [0.0, 30.0]])  # last one 1 px from the edge
    t = synthetic_table(vec, [40, 6, 40], n_noise=0, seed=3)
    hist = peak_histogram(t, (K, K), 2)
    v = unique_vectors(hist, detector_shape=(K, K), beam_radius=3.0)
    np.testing.assert_allclose(v, [[10.0, 0.0]], atol=0.2)
    v = unique_vectors(hist, detector_shape=(K, K), beam_radius=3.0, min_patterns=5, edge_margin=0)
    assert len(v) == 3
    v = unique_vectors(hist, detector_shape=(K, K), beam_radius=3.0, beam_exclusion_radius=0)
    assert np.min(np.linalg.norm(v, axis=1)) < 0.2  # the beam itself


def test_random_peaks_make_no_vectors():
    rng = np.random.default_rng(4)
    pos = rng.uniform(0, K - 1, (20000, 2))  # ~5 peaks per pixel, local maxima > 10
    t = np.column_stack([np.zeros((len(pos), 2)), pos, np.ones(len(pos))])
    v = unique_vectors(peak_histogram(t, (K, K), 2), detector_shape=(K, K), beam_radius=3.0)
    assert len(v) == 0
    # a real cluster on top of that floor is still found
    t2 = np.concatenate([t, synthetic_table([[12.0, -5.0]], [150], n_noise=0, n_beam=0)])
    v = unique_vectors(peak_histogram(t2, (K, K), 2), detector_shape=(K, K), beam_radius=3.0)
    np.testing.assert_allclose(v, [[12.0, -5.0]], atol=0.3)


def test_same_vectors_as_dbscan():
    """The reference: DBSCAN (eps 0.89 px, min_samples 10) on all peak positions."""
    t = synthetic_table(TRUE_VECTORS, COUNTS, n_noise=100, n_beam=0, seed=5)
    labels = DBSCAN(eps=0.89, min_samples=10).fit_predict(t[:, 2:4])
    ref = np.array([t[labels == i, 2:4].mean(0) for i in range(labels.max() + 1)]) - BEAM
    ours = unique_vectors(peak_histogram(t, (K, K), 2), detector_shape=(K, K), beam_radius=3.0)
    assert len(ours) == len(ref)
    d = np.linalg.norm(ours[:, None] - ref[None], axis=2)
    assert d.min(axis=1).max() < 1.0


def test_end_to_end_from_patterns():
    """Patterns with spots at known vectors in some scan positions -> those vectors."""
    rng = np.random.default_rng(6)
    sy, sx, k = 8, 8, 48
    vec = np.array([[9.4, -3.2], [-6.7, 8.1]])
    yy, xx = np.mgrid[:k, :k]
    data = np.zeros((sy, sx, k, k))
    for iy in range(sy):
        for ix in range(sx):
            lam = 2.0 + 4000 / (2 * np.pi * 1.5 ** 2) * np.exp(-((yy - 24) ** 2 + (xx - 24) ** 2) / 4.5)
            for j, v in enumerate(vec):
                if (j == 0 and iy < 5) or (j == 1 and ix > 3):
                    c = 24 + v + rng.normal(0, 0.1, 2)
                    lam = lam + 800 / (2 * np.pi * 1.2 ** 2) * np.exp(
                        -((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / (2 * 1.2 ** 2))
            data[iy, ix] = rng.poisson(lam) - 2.0
    d = da.from_array(data.astype(np.float32), chunks=(3, 5, k, k))
    tables = dask.compute(*find_peaks(d, PeakParams(), spot_radius=2.1), scheduler="synchronous")
    hist = sum(peak_histogram(tb, (k, k), 2) for tb in tables)
    v = unique_vectors(hist, detector_shape=(k, k), beam_radius=2.1)
    assert len(v) == 2
    dist = np.linalg.norm(v[:, None] - vec[None], axis=2)
    assert dist.min(axis=1).max() < 0.2


def test_defaults():
    p = resolve(VectorParams(), 3.0)
    assert (p.cluster_radius, p.scatter, p.beam_exclusion_radius, p.edge_margin) == (3.0, 1.5, 6.0, 3.0)
    from spedflow.segment import WatershedParams
    assert VectorParams().min_patterns == WatershedParams().min_size
    assert resolve(p) is p


@pytest.mark.parametrize("exc, call, match", [
    (ParameterError, lambda: VectorParams(oversample=0), "oversample"),
    (ParameterError, lambda: VectorParams(cluster_radius=0), "cluster_radius"),
    (ParameterError, lambda: VectorParams(min_patterns=0), "min_patterns"),
    (ParameterError, lambda: VectorParams(edge_margin=-1), "edge_margin"),
    (ParameterError, lambda: resolve(VectorParams()), "spot_radius"),
    (InputError, lambda: peak_histogram(np.zeros((3, 2)), (K, K)), "peak table"),
    (ParameterError, lambda: peak_histogram(np.zeros((3, 5)), (K,)), "detector_shape"),
    (InputError, lambda: peak_histogram(np.zeros((3, 5)), (K, K), weights=np.ones(2)), "weights"),
    (InputError, lambda: unique_vectors(np.zeros((10, 10)), detector_shape=(K, K), beam_radius=3),
     "does not match"),
    (ParameterError, lambda: unique_vectors(np.zeros((K, K)), detector_shape=(K, K)), "beam_radius"),
    (InputError, lambda: unique_vectors(-np.ones((K, K)), detector_shape=(K, K), beam_radius=3),
     "non-negative"),
])
def test_bad_inputs(exc, call, match):
    with pytest.raises(exc, match=match):
        call()


def _ring_hist(rng, k=96, o=2, spots=(), amorphous=0.0, radius=30.0):
    """A merged peak histogram: discrete clusters of peaks at ``spots`` ((gy, gx, n)),
    plus, with ``amorphous`` peaks per pixel of arc, a smooth ring of radius ``radius``."""
    table = []
    for gy, gx, n in spots:
        table.append(np.column_stack([np.zeros((n, 2)),
                                      rng.normal([k // 2 + gy, k // 2 + gx], 0.3, (n, 2)),
                                      np.ones(n)]))
    if amorphous:
        n = rng.poisson(amorphous * 2 * np.pi * radius)
        a = rng.uniform(0, 2 * np.pi, n)
        r = radius + rng.normal(0, 0.7, n)
        table.append(np.column_stack([np.zeros((n, 2)), k // 2 + r * np.sin(a),
                                      k // 2 + r * np.cos(a), np.ones(n)]))
    return peak_histogram(np.concatenate(table), (k, k), o)


def test_ring_contrast_counts_match_brute_force():
    from spedflow.peaks import ring_contrast
    rng = np.random.default_rng(3)
    h = _ring_hist(rng, spots=[(0, 30, 50), (30, 0, 40)], amorphous=3.0)
    v = np.array([[0.0, 30.0], [21.2, 21.2]])
    support, ring = ring_contrast(h, v, oversample=2, radius=2.0, n_angles=90)
    def count(gy, gx):
        # brute force: the bin nearest the point, and every bin within 2 px (4 bins) of it
        by, bx = np.rint((gy + 48) * 2 + 0.5), np.rint((gx + 48) * 2 + 0.5)
        return h[((np.arange(h.shape[0])[:, None] - by) ** 2
                  + (np.arange(h.shape[1])[None] - bx) ** 2) <= 16].sum()

    assert support[0] == count(0.0, 30.0)
    # a disc partly off the histogram counts what it reaches
    edge = _ring_hist(rng, spots=[(-47.0, 10.0, 30), (46.5, -47.5, 20)])
    s_edge, _ = ring_contrast(edge, np.array([[-47.6, 10.0], [47.4, -48.2]]), oversample=2,
                              radius=2.0)
    brute = [edge[((np.arange(192)[:, None] - np.rint((gy + 48) * 2 + 0.5)) ** 2
                   + (np.arange(192)[None] - np.rint((gx + 48) * 2 + 0.5)) ** 2) <= 16].sum()
             for gy, gx in [(-47.6, 10.0), (47.4, -48.2)]]
    assert s_edge[0] > 0 and s_edge.tolist() == brute
    ang = np.arctan2(21.2, 21.2) + np.linspace(0, 2 * np.pi, 90, endpoint=False)
    g = np.hypot(21.2, 21.2)
    q = np.quantile([count(g * np.sin(a), g * np.cos(a)) for a in ang], 0.2)
    assert ring[1] == pytest.approx(q + 0.8416 * np.sqrt(q))


def test_ring_vectors_dropped_on_a_smooth_ring_kept_on_a_ring_of_spots():
    from spedflow.peaks import drop_ring_vectors
    rng = np.random.default_rng(4)
    # an amorphous ring: 12 more of its peaks about one place, spread as the ring's are
    # (a fluctuation of its density), are not a vector (12 as tight as a reflection's,
    # 0.3 px, may be: they pass the test in their own disc at some draws)
    h = _ring_hist(rng, spots=[(-20.0, -12.0, 40)], amorphous=4.0)
    a, r = rng.uniform(-2 / 30, 2 / 30, 12), 30 + rng.normal(0, 0.7, 12)
    h += peak_histogram(np.column_stack([np.zeros((12, 2)), 48 + r * np.sin(a), 48 + r * np.cos(a),
                                         np.ones(12)]), (96, 96), 2)
    v = np.array([[0.0, 30.0], [-20.0, -12.0]])
    kept, keep = drop_ring_vectors(h, v, oversample=2, radius=2.0, min_patterns=10)
    assert keep.tolist() == [False, True]
    # a polycrystalline ring: the strong spots of many crystals of one phase cover most
    # of the |g| = 30 ring (the median of the ring is a spot's count); a weak crystal's
    # 25-peak vector on it is kept, as it is where the ring has gaps
    ang = np.linspace(0, 2 * np.pi, 28, endpoint=False)[1:]
    strong = [(30 * np.sin(a), 30 * np.cos(a), 200) for a in ang]
    h = _ring_hist(rng, spots=strong + [(0.0, 30.0, 25)])
    kept, keep = drop_ring_vectors(h, np.array([[0.0, 30.0]]), oversample=2, radius=2.0,
                                   min_patterns=10)
    assert keep.tolist() == [True]


def test_ring_of_evenly_spaced_spots_is_kept_with_discs_of_their_own_scatter():
    """Two crystals of one phase, 30 degrees apart, on a small detector: their twelve
    first-order spots sit 6 px apart on a ring of |g| = 11.5 px. Discs of the clustering
    radius (3.2 px) join them into an even ring (every vector was dropped as film);
    discs of 3 times each vector's own scatter keep each spot apart, and a weak spot far
    out whose peaks scatter 1.2 px keeps its support. A smooth ring's noise maximum is
    dropped with either disc."""
    from spedflow.peaks import drop_ring_vectors, ring_contrast, vector_scatter
    rng = np.random.default_rng(5)
    ang = np.deg2rad(np.arange(0, 360, 30))
    v = np.column_stack([11.5 * np.sin(ang), 11.5 * np.cos(ang)])
    spots = _ring_hist(rng, k=64, spots=[(gy, gx, 110) for gy, gx in v])
    support, ring = ring_contrast(spots, v, oversample=2, radius=3.2)
    assert (support - ring < 10).all()  # the wide discs: an even ring
    # a weak reflection at |g| = 28 whose 20 peaks scatter by 1.2 px
    weak = peak_histogram(np.column_stack([np.zeros((20, 2)), rng.normal([60, 32], 1.2, (20, 2)),
                                           np.ones(20)]), (64, 64), 2)
    h = spots + weak
    vv = np.vstack([v, [[28.0, 0.0]]])
    s = vector_scatter(h, vv, oversample=2, radius=3.2)
    assert s[:12] == pytest.approx(0.3, rel=0.6)  # (a median of distances in 0.5 px bins)
    assert s[12] == pytest.approx(1.2, rel=0.3)
    _, keep = drop_ring_vectors(h, vv, oversample=2, radius=3.2, min_patterns=10)
    assert keep.all()
    # ... which one disc of 3 times the strong spots' scatter would lose
    s1, r1 = ring_contrast(h, vv, oversample=2, radius=1.0)
    assert s1[12] - r1[12] < 10
    # the second test is for rings their own spots made even: a vector failing alone
    # where the others on its ring stand out keeps the first test's verdict
    rng = np.random.default_rng(1)
    ang = np.deg2rad(np.arange(0, 360, 60))
    strong = [(30 * np.sin(a), 30 * np.cos(a), 200) for a in ang]
    lone = (30 * np.sin(np.pi / 6), 30 * np.cos(np.pi / 6), 25)
    h = _ring_hist(rng, spots=strong + [lone], amorphous=6.0)
    vl = np.array([[gy, gx] for gy, gx, _ in strong + [lone]])
    s1, r1 = ring_contrast(h, vl[-1:], oversample=2, radius=1.0)
    assert s1[0] - r1[0] >= max(10, 5 * np.sqrt(r1[0]))  # it would pass in its own disc
    _, keep = drop_ring_vectors(h, vl, oversample=2, radius=2.0, min_patterns=10)
    assert keep.tolist() == [True] * 6 + [False]
    # an amorphous ring's densest place (where a noise maximum is picked) is dropped, a
    # real vector on the ring is kept
    for seed in range(5):
        rng = np.random.default_rng(seed)
        h = _ring_hist(rng, spots=[(-20.0, -12.0, 40)], amorphous=4.0)
        a = np.linspace(0, 2 * np.pi, 720, endpoint=False)
        circle = np.column_stack([30 * np.sin(a), 30 * np.cos(a)])
        s, _ = ring_contrast(h, circle, oversample=2, radius=2.0)
        far = np.hypot(*(circle - [-20.0, -12.0]).T) > 4  # away from the real vector
        densest = circle[far][np.argmax(s[far])]
        _, keep = drop_ring_vectors(h, np.array([densest, [-20.0, -12.0]]), oversample=2,
                                    radius=2.0, min_patterns=10)
        assert keep.tolist() == [False, True]


@pytest.mark.parametrize("sigma", [0.3, 0.6, 1.0])
def test_position_scatter_recovers_the_spread_of_peak_positions(sigma):
    from spedflow.peaks import position_scatter
    rng = np.random.default_rng(int(sigma * 10))
    k = 96
    centres = rng.uniform(-35, 35, (12, 2))
    table = np.concatenate([np.column_stack([np.zeros((400, 2)),
                                             rng.normal(c + k // 2, sigma, (400, 2)), np.ones(400)])
                            for c in centres])
    h = peak_histogram(table, (k, k), 2)
    got = position_scatter(h, centres, oversample=2, radius=4 * sigma)
    # the disc of 4 sigma holds nearly all of each cluster; bins of 0.5 px add (0.5^2 / 12)
    assert got == pytest.approx(np.sqrt(sigma ** 2 + 0.25 / 12), rel=0.12)
    assert np.isnan(position_scatter(h, np.zeros((0, 2)), oversample=2, radius=2.0))


def test_measured_scatter_keeps_two_reflections_one_spot_radius_apart():
    """Two crystals' reflections 4 px apart, spots of radius 3 px, positions scattered by
    0.5 px: smoothed by the spot size (r / 2) they make one maximum; by the measured
    scatter, two vectors."""
    from spedflow.peaks import position_scatter
    rng = np.random.default_rng(5)
    k = 100
    where = {(10.0, 15.0): 60, (6.0, 15.5): 85, (-10.0, -15.0): 60, (-6.0, -15.5): 85}
    table = np.concatenate([np.column_stack([np.zeros((n, 2)),
                                             rng.normal(np.add(g, k // 2), 0.5, (n, 2)), np.ones(n)])
                            for g, n in where.items()])
    h = peak_histogram(table, (k, k), 2)
    kw = dict(detector_shape=(k, k), oversample=2, cluster_radius=3.0, min_patterns=10,
              beam_exclusion_radius=6.0, edge_margin=3.0)
    assert len(unique_vectors(h, scatter=1.5, **kw)) == 2
    s = position_scatter(h, unique_vectors(h, scatter=1.5, **kw), oversample=2, radius=3.0)
    found = unique_vectors(h, scatter=s, **kw)
    assert len(found) == 4
    assert np.abs(np.sort(found, axis=0) - np.sort(np.array(list(where)), axis=0)).max() < 0.3


@pytest.mark.parametrize("shape,radius", [((50, 60), 3.5), ((64, 64), 7.0), ((5, 40), 6.2),
                                          ((30, 30), 0.5), ((40, 33), 1.0), ((128, 97), 12.3),
                                          ((40, 40), float(np.sqrt(26))), ((40, 40), float(np.sqrt(41))),
                                          ((9, 9), 0.0)])
def test_disc_maximum_equals_scipy_with_the_disc_footprint(shape, radius):
    """Row-segment maximum filter == ndi.maximum_filter(footprint=disc, mode="constant"),
    bins outside read as 0, also for negative images and discs taller than the image."""
    from scipy import ndimage as ndi

    from spedflow.peaks.vectors import _disc_maximum, _disc_offsets
    rng = np.random.default_rng(1)
    oy, ox = _disc_offsets(radius)
    h = int(radius)
    footprint = np.zeros((2 * h + 1,) * 2, bool)
    footprint[oy + h, ox + h] = True
    for img in (rng.random(shape), rng.random(shape) - 0.5, rng.poisson(0.3, shape).astype(float)):
        np.testing.assert_array_equal(_disc_maximum(img, radius),
                                      ndi.maximum_filter(img, footprint=footprint, mode="constant"))


@pytest.mark.parametrize("shape,radius", [((50, 60), 3.5), ((64, 64), 7.0), ((5, 40), 6.2),
                                          ((30, 30), 0.5), ((20, 20), 35.2), ((3, 90), 40.0),
                                          ((40, 40), float(np.sqrt(26))), ((40, 40), float(np.sqrt(41)))])
def test_disc_sum_filter_equals_scipy_correlate_with_the_disc(shape, radius):
    """Row-segment disc sums == ndi.correlate(img, disc, mode="constant"), also for discs
    wider and taller than the image."""
    from scipy import ndimage as ndi

    from spedflow.peaks._measure import disc_sum_filter
    rng = np.random.default_rng(2)
    rr = int(np.ceil(radius))
    dy, dx = np.mgrid[-rr:rr + 1, -rr:rr + 1]
    disc = ((dy ** 2 + dx ** 2) <= radius ** 2).astype(float)
    for img in (rng.poisson(0.5, shape).astype(float), rng.random(shape)):
        np.testing.assert_allclose(disc_sum_filter(img, radius),
                                   ndi.correlate(img, disc, mode="constant", cval=0.0),
                                   rtol=1e-12, atol=1e-9)


def test_disc_filters_refuse_a_negative_radius():
    from spedflow.peaks._measure import disc_sum_filter
    from spedflow.peaks.vectors import _disc_maximum
    for f in (disc_sum_filter, _disc_maximum):
        with pytest.raises(ParameterError, match="radius"):
            f(np.ones((4, 4)), -1.0)


def test_weak_vector_beside_a_strong_one():
    """A thin crystal's reflection (14 peaks) 4.6 px from a strong one's (400), on a floor
    of random peaks: over the spot-radius disc it is not 5 sigma above the floor, in its
    core it is. Found where it is; and the floor alone still makes no vectors."""
    rng = np.random.default_rng(11)
    strong, weak = np.array([10.0, 0.0]), np.array([11.2, 4.44])   # 4.6 px apart
    n_noise = 1400                                                 # ~9 peaks per disc of 3 px
    t = synthetic_table([strong, weak], [400, 14], scatter=0.4, n_noise=n_noise, n_beam=0, seed=13)
    # the old test alone, by brute force on the table: excess over the expected floor
    # in the disc of cluster_radius (3 px) about the weak reflection < 5 sigma
    floor = n_noise / (K - 1) ** 2 * np.pi * 9
    inside = np.hypot(*(t[:, 2:4] - BEAM - weak).T) <= 3.0
    assert 10 <= inside.sum() - floor < 5 * np.sqrt(floor)
    v = unique_vectors(peak_histogram(t, (K, K), 2), detector_shape=(K, K), beam_radius=3.0,
                       scatter=0.4)
    d = np.linalg.norm(v[:, None] - np.array([strong, weak])[None], axis=2)
    # the floor's peaks in its disc, a dozen against its 14, pull its centre (~0.56 px)
    assert len(v) == 2 and d.min(axis=0)[0] < 0.1 and d.min(axis=0)[1] < 0.25 * 3.0
    false = 0
    for seed in range(20):  # the same floor without the reflections, and denser ones
        pos = rng.uniform(0, K - 1, ((1 + seed % 4) * n_noise, 2))
        tn = np.column_stack([np.zeros((len(pos), 2)), pos, np.ones(len(pos))])
        false += len(unique_vectors(peak_histogram(tn, (K, K), 2), detector_shape=(K, K),
                                    beam_radius=3.0, scatter=0.4))
    assert false == 0


def test_a_bent_reflections_ridge_is_one_vector_two_clusters_are_two():
    """Two clusters 5 px apart (scatter 0.8 px), the weaker (60 peaks) shadowed by the
    stronger's (300) flank: no maximum within the 3 px cluster radius. Separate
    reflections when the histogram falls to the floor between them (both found; the
    rule of maxima within the cluster radius lost the weaker); one reflection moving
    across a bent crystal when a ridge of 100 peaks joins them (the histogram stays
    above half the weaker's height; without the rule it made two vectors)."""
    strong, weak = np.array([10.0, 0.0]), np.array([10.0, 5.0])
    rng = np.random.default_rng(21)
    two = synthetic_table([strong, weak], [300, 60], scatter=0.8, n_noise=200, n_beam=0, seed=21)
    f = rng.uniform(0, 1, 100)[:, None]
    ridge_pos = BEAM + strong + f * (weak - strong) + rng.normal(0, 0.8, (100, 2))
    ridge = np.concatenate([two, np.column_stack([np.zeros((100, 2)), ridge_pos, np.ones(100)])])
    kw = dict(detector_shape=(K, K), beam_radius=3.0, scatter=0.8)
    v2 = unique_vectors(peak_histogram(two, (K, K), 2), **kw)
    d = np.linalg.norm(v2[:, None] - np.array([strong, weak])[None], axis=2)
    assert len(v2) == 2 and d.min(axis=0).max() < 0.5
    v1 = unique_vectors(peak_histogram(ridge.astype(np.float32), (K, K), 2), **kw)
    assert len(v1) == 1 and np.linalg.norm(v1[0] - strong) < 1.0
