"""LoG peak finder: against skimage blob_log, known spot centres, pure noise; lazy == kernel."""

import dask
import dask.array as da
import numpy as np
import pytest
from scipy.spatial import cKDTree
from skimage.feature import blob_log

from spedflow.errors import InputError, ParameterError
from spedflow.peaks import (PeakParams, default_threshold, find_peaks, find_peaks_log, log_sigmas,
                            peaks_block, resolve)

SPOT_SIGMA = 1.2  # Gaussian spot width, px
SIGMAS = log_sigmas(0.85, 1.7, 2)


@pytest.fixture(autouse=True)
def _synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


def gaussian_spots(shape, centres, amplitudes, sigma=SPOT_SIGMA):
    """Spots of integrated intensity ``amplitudes`` (pixel-centre sampled Gaussians)."""
    ky, kx = shape
    yy, xx = np.mgrid[:ky, :kx]
    img = np.zeros(shape)
    for (y, x), a in zip(centres, amplitudes):
        img += a / (2 * np.pi * sigma ** 2) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma ** 2))
    return img


def make_patterns(n, k=64, *, spacing=12, amplitude=(300.0, 3000.0), background=2.0, seed=0):
    """Background-subtracted Poisson patterns of well-separated spots on a jittered lattice.

    Returns frames (n, k, k) float32 and the truth table (m, 4) [index, y, x, amplitude].
    """
    rng = np.random.default_rng(seed)
    g = np.arange(spacing // 2 + 4, k - spacing // 2 - 3, spacing, dtype=float)
    lattice = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    frames, truth = [], []
    for i in range(n):
        c = lattice + rng.uniform(-2, 2, lattice.shape)
        a = rng.uniform(*amplitude, len(c))
        lam = gaussian_spots((k, k), c, a) + background
        frames.append(rng.poisson(lam) - background)
        truth.append(np.column_stack([np.full(len(c), i), c, a]))
    return np.asarray(frames, np.float32), np.concatenate(truth)


def match(found, truth, tol):
    """Distances from each truth spot to the nearest found peak in the same pattern."""
    gap = 1e4
    tree = cKDTree(np.column_stack([found[:, 0] * gap, found[:, 1], found[:, 2]]))
    d, j = tree.query(np.column_stack([truth[:, 0] * gap, truth[:, 1], truth[:, 2]]),
                      distance_upper_bound=tol)
    return d, j


def test_finds_every_spot_and_nothing_else():
    frames, truth = make_patterns(12)
    found = find_peaks_log(frames, SIGMAS, exclude_border=3)
    d, _ = match(found, truth, 1.0)
    assert np.isfinite(d).all()                 # every spot found within 1 px
    assert len(found) == len(truth)             # and nothing else
    assert found.dtype == np.float32 and found.shape[1] == 5
    assert set(np.unique(found[:, 4])) <= set(SIGMAS.astype(np.float32))


def test_same_peaks_as_skimage_blob_log():
    frames, truth = make_patterns(4, amplitude=(1500.0, 3000.0), seed=1)
    ours = find_peaks_log(frames, SIGMAS, exclude_border=3)
    for i, f in enumerate(frames):
        ref = blob_log(f / f.max(), min_sigma=0.85, max_sigma=1.7, num_sigma=5, threshold=0.02,
                       exclude_border=3)
        mine = ours[ours[:, 0] == i, 1:3]
        d_ref = cKDTree(mine).query(ref[:, :2])[0]
        d_mine = cKDTree(ref[:, :2]).query(mine)[0]
        assert len(ref) == len(mine)
        assert d_ref.max() <= 1.0 and d_mine.max() <= 1.0


def test_subpixel_accuracy():
    frames, truth = make_patterns(16, amplitude=(2000.0, 4000.0), seed=2)
    found = find_peaks_log(frames, SIGMAS, exclude_border=3)
    d, _ = match(found, truth, 1.0)
    assert np.sqrt(np.mean(d ** 2)) < 0.1
    assert d.max() < 0.2
    # the rounded position alone would be off by ~0.4 px on average
    d_int, _ = match(np.column_stack([found[:, 0], np.rint(found[:, 1:3]), found[:, 3:]]), truth, 1.0)
    assert d.mean() < 0.5 * d_int.mean()


def test_intensity_is_disc_integral():
    frames, truth = make_patterns(8, amplitude=(2000.0, 4000.0), seed=3)
    found = find_peaks_log(frames, SIGMAS, exclude_border=3)
    d, j = match(truth, found, 1.0)  # nearest truth spot of each found peak
    rho = np.sqrt(2) * SIGMAS.max()
    expected = truth[j, 3] * (1 - np.exp(-rho ** 2 / (2 * SPOT_SIGMA ** 2)))
    assert np.median(found[:, 3] / expected) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("rate", [0.5, 2.0, 20.0])
def test_pure_noise_false_peak_rate(rate):
    rng = np.random.default_rng(4)
    n, k = 400, 64
    noise = (rng.poisson(rate, (n, k, k)) - rate).astype(np.float32)
    found = find_peaks_log(noise, SIGMAS)
    # nominal 0.01 per pattern for Gaussian noise; allow for the Poisson skew
    assert len(found) / n <= 0.05


def test_intensity_scale_free():
    frames, _ = make_patterns(4, seed=5)
    a = find_peaks_log(frames, SIGMAS, exclude_border=3)
    b = find_peaks_log(frames * 1000.0, SIGMAS, exclude_border=3)
    assert len(a) == len(b)
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-4)
    np.testing.assert_allclose(b[:, 3], a[:, 3] * 1000.0, rtol=1e-4)


def test_weak_spot_beside_strong_beam():
    """A thin crystal's spot at 0.3 % of the beam is found (blob_log's relative cut loses it)."""
    rng = np.random.default_rng(6)
    k = 64
    lam = gaussian_spots((k, k), [(32, 32), (20, 45)], [3e5, 900.0]) + 2.0
    frame = (rng.poisson(lam) - 2.0).astype(np.float32)[None]
    found = find_peaks_log(frame, SIGMAS, exclude_border=3)
    assert np.min(np.hypot(found[:, 1] - 20, found[:, 2] - 45)) < 0.5
    ref = blob_log(frame[0] / frame.max(), min_sigma=0.85, max_sigma=1.7, num_sigma=5,
                   threshold=0.046, exclude_border=3)
    assert not np.any(np.hypot(ref[:, 0] - 20, ref[:, 1] - 45) < 1)


@pytest.mark.parametrize("shape,sig", [((70, 90), (0.85, 2.1)), ((128, 61), (1.05, 2.1, 3.0))])
def test_banded_smoothing_equals_scipy_and_the_dense_product(shape, sig):
    """On patterns several kernel widths across the Gaussians run block by block over the
    band (last blocks ragged here): the same as scipy's ``gaussian_filter``, and the
    same bits as the product with the whole matrix."""
    from scipy import ndimage as ndi

    from spedflow.peaks.kernels import _banded_blocks, _gauss_matrix, _smooth_batch, _smoothing_operators
    ops = _smoothing_operators(*shape, sig)
    assert len(ops[0][1]) > 1 and all(len(b) > 1 for _, b in ops[1])  # banded, not dense
    frames = np.random.default_rng(3).poisson(4.0, (5,) + shape).astype(np.float32)
    got = _smooth_batch(frames, ops)
    for s, g in zip(sig, got):
        ref = np.stack([ndi.gaussian_filter(f.astype(np.float64), s, mode="nearest", truncate=3.5)
                        for f in frames])
        np.testing.assert_allclose(g.transpose(0, 2, 1), ref, rtol=1e-5, atol=1e-6)
        dense = np.matmul(_gauss_matrix(shape[0], s), frames @ _gauss_matrix(shape[1], s).T)
        np.testing.assert_allclose(g.transpose(0, 2, 1), dense, rtol=1e-6, atol=1e-6)
    assert _banded_blocks(20, (3.0,))[0] == 20  # a band as wide as the pattern: one block


def test_smoothing_by_matrix_products_equals_scipy():
    """Each scale's Gaussian (two BLAS passes, transposed result) equals scipy's
    ``gaussian_filter`` with "nearest" edges, on non-square patterns; and the local
    maxima equal ``maximum_filter``'s."""
    from scipy import ndimage as ndi

    from spedflow.peaks.kernels import _local_max_at, _smooth_batch, _smoothing_operators
    rng = np.random.default_rng(8)
    frames = rng.poisson(3.0, (3, 24, 30)).astype(np.float32)
    sig = (0.85, 1.7, 2.6, 9.0)  # the last kernel is wider than the patterns
    got = _smooth_batch(frames, _smoothing_operators(24, 30, sig))
    for s, g in zip(sig, got):
        ref = np.stack([ndi.gaussian_filter(f.astype(np.float64), s, mode="nearest", truncate=3.5)
                        for f in frames])
        assert g.shape == (3, 30, 24)
        np.testing.assert_allclose(g.transpose(0, 2, 1), ref, rtol=1e-5)
    z = rng.poisson(2.0, (4, 9, 13)).astype(np.float32)  # ties included
    every = np.arange(z.size)
    def value_at(k):
        return z.ravel()[k]

    np.testing.assert_array_equal(
        _local_max_at(value_at, z.shape, every),
        (z >= ndi.maximum_filter(z, size=(1, 3, 3), mode="nearest")).ravel())
    some = rng.choice(z.size, 50, replace=False)  # a subset, as the finder passes
    np.testing.assert_array_equal(_local_max_at(value_at, z.shape, some),
                                  _local_max_at(value_at, z.shape, every)[some])


def test_border_exclusion_and_empty_patterns():
    k = 48
    lam = gaussian_spots((k, k), [(2.0, 24.0), (24.0, 24.0), (24.0, k - 3.0)], [3000.0] * 3)
    frames = np.stack([lam, np.zeros((k, k))]).astype(np.float32)
    found = find_peaks_log(frames, SIGMAS, exclude_border=4)
    assert len(found) == 1 and found[0, 0] == 0
    assert found[0, 1:3] == pytest.approx([24.0, 24.0], abs=0.05)  # noise-free: exact fit
    assert find_peaks_log(np.zeros((3, k, k), np.float32), SIGMAS).shape == (0, 5)


def test_resolve_defaults_from_spot_radius():
    p = resolve(PeakParams(), 3.0, detector_shape=(128, 128))
    assert p.max_sigma == pytest.approx(3.0 / np.sqrt(2))
    assert p.min_sigma == pytest.approx(3.0 / (2 * np.sqrt(2)))
    assert p.exclude_border == 3
    assert p.threshold == pytest.approx(default_threshold(128, 128, 2))
    assert 4.8 < p.threshold < 5.2
    small = resolve(PeakParams(), 1.0)
    assert small.min_sigma == pytest.approx(0.7)
    assert small.max_sigma == pytest.approx(1 / np.sqrt(2))
    assert small.threshold is None
    fixed = PeakParams(min_sigma=1, max_sigma=2, num_sigma=3, threshold=6, exclude_border=2)
    assert resolve(fixed) == fixed


@pytest.mark.parametrize("chunks", [(9, 7), (4, 5), (3, 2), (1, 7)])
def test_lazy_equals_kernel(chunks):
    frames, _ = make_patterns(63, k=48, seed=7)
    data = frames.reshape(9, 7, 48, 48)
    params = resolve(PeakParams(), 2.0)
    whole = peaks_block(data, (0, 0), params)
    tables = dask.compute(*find_peaks(da.from_array(data, chunks=chunks + (48, 48)), params))
    lazy = np.concatenate(tables)
    lazy = lazy[np.lexsort((lazy[:, 3], lazy[:, 2], lazy[:, 1], lazy[:, 0]))]
    whole = whole[np.lexsort((whole[:, 3], whole[:, 2], whole[:, 1], whole[:, 0]))]
    np.testing.assert_array_equal(lazy, whole)
    # and the kernel's pattern index maps to global scan coordinates
    sig = log_sigmas(params.min_sigma, params.max_sigma, params.num_sigma)
    k = find_peaks_log(frames, sig, exclude_border=params.exclude_border)
    assert len(k) == len(whole)
    np.testing.assert_array_equal(np.sort(k[:, 0] // 7), np.sort(whole[:, 0]))


def test_find_peaks_resolves_with_spot_radius():
    frames, _ = make_patterns(4, k=48, seed=8)
    data = da.from_array(frames.reshape(2, 2, 48, 48), chunks=(1, 2, 48, 48))
    a = np.concatenate(dask.compute(*find_peaks(data, PeakParams(), spot_radius=2.0)))
    b = np.concatenate(dask.compute(*find_peaks(data, resolve(PeakParams(), 2.0))))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("exc, kwargs, match", [
    (ParameterError, dict(min_sigma=0.1), "min_sigma"),
    (ParameterError, dict(max_sigma=-1), "max_sigma"),
    (ParameterError, dict(min_sigma=3, max_sigma=2), "min_sigma"),
    (ParameterError, dict(num_sigma=0), "num_sigma"),
    (ParameterError, dict(num_sigma=2.5), "num_sigma"),
    (ParameterError, dict(threshold=0), "threshold"),
    (ParameterError, dict(threshold="5"), "threshold"),
    (ParameterError, dict(exclude_border=0), "exclude_border"),
])
def test_bad_params(exc, kwargs, match):
    with pytest.raises(exc, match=match):
        PeakParams(**kwargs)


@pytest.mark.parametrize("exc, call, match", [
    (InputError, lambda: find_peaks_log(np.zeros((8, 8)), [1.0]), "3-D"),
    (InputError, lambda: find_peaks_log(np.zeros((1, 2, 8)), [1.0]), "3 x 3"),
    (InputError, lambda: find_peaks_log(np.zeros((1, 8, 8), bool), [1.0]), "numeric"),
    (ParameterError, lambda: find_peaks_log(np.zeros((1, 8, 8)), []), "sigmas"),
    (ParameterError, lambda: find_peaks_log(np.zeros((1, 8, 8)), [0.2]), "sigmas"),
    (ParameterError, lambda: find_peaks_log(np.zeros((1, 8, 8)), [1.0], threshold=-1), "threshold"),
    (ParameterError, lambda: find_peaks_log(np.zeros((1, 8, 8)), [1.0], exclude_border=0),
     "exclude_border"),
    (ParameterError, lambda: resolve(PeakParams(), None), "spot_radius"),
    (ParameterError, lambda: resolve({}, 2.0), "PeakParams"),
    (ParameterError, lambda: peaks_block(np.zeros((1, 1, 8, 8)), (0, 0), PeakParams()), "resolve"),
    (InputError, lambda: peaks_block(np.zeros((8, 8)), (0, 0), resolve(PeakParams(), 2.0)), "4-D"),
    (InputError, lambda: find_peaks(np.zeros((1, 1, 8, 8)), PeakParams(), spot_radius=2), "dask"),
    (InputError, lambda: find_peaks(da.zeros((2, 2, 8, 8), chunks=(1, 1, 4, 8)), PeakParams(),
                                    spot_radius=2), "whole patterns"),
    (ParameterError, lambda: find_peaks(da.zeros((2, 2, 8, 8)), PeakParams()), "spot_radius"),
])
def test_bad_inputs(exc, call, match):
    with pytest.raises(exc, match=match):
        call()


def test_recentre_table_equals_a_loop():
    """Each peak moves by found_at - centres of its pattern; border peaks are dropped."""
    from spedflow.peaks import recentre_table
    rng = np.random.default_rng(3)
    ny, nx, k, b = 4, 5, 32, 2
    found_at = rng.uniform(12, 20, (ny, nx, 2))
    centres = found_at + rng.normal(0, 0.7, (ny, nx, 2))
    table = np.column_stack([rng.integers(0, ny, 300), rng.integers(0, nx, 300),
                             rng.uniform(0, k - 1, (300, 2)), rng.uniform(1, 9, 300)]).astype(np.float32)
    got = recentre_table(table, centres, (k, k), found_at=found_at, exclude_border=b)
    ref = []
    for sy, sx, y, x, inten in table:
        dy, dx = found_at[int(sy), int(sx)] - centres[int(sy), int(sx)]
        y2, x2 = np.float32(y) + np.float32(dy), np.float32(x) + np.float32(dx)
        if b <= np.rint(y2) <= k - 1 - b and b <= np.rint(x2) <= k - 1 - b:
            ref.append([sy, sx, y2, x2, inten])
    np.testing.assert_allclose(got, np.array(ref, np.float32), rtol=0, atol=1e-5)
    assert 0 < len(got) < len(table)  # some were dropped at the border
    # default found_at: the peaks were found on raw patterns (detector centre)
    raw = recentre_table(table, centres, (k, k), exclude_border=1)
    flat = np.full((ny, nx, 2), k // 2, float)
    np.testing.assert_allclose(raw, recentre_table(table, centres, (k, k), found_at=flat), atol=0)


def test_peaks_found_before_the_final_alignment_land_where_it_puts_them():
    """Peaks of patterns aligned by one set of centres, recentred to another, match
    the peaks of the patterns aligned by the other set directly (the VDF workflow's
    pass 1 aligns by the measured centres, the descan fit comes later)."""
    from spedflow.peaks import recentre_table
    from spedflow.preprocess import kernels as pre
    frames, _ = make_patterns(12, seed=5)
    k = frames.shape[-1]
    rng = np.random.default_rng(6)
    measured = rng.uniform(k // 2 - 3, k // 2 + 3, (3, 4, 2))
    fitted = measured + rng.normal(0, 0.4, measured.shape)
    raw = frames.reshape(3, 4, k, k)
    pp = resolve(PeakParams(), SPOT_SIGMA * 1.4, detector_shape=(k, k))
    first = peaks_block(pre.shift_patterns(raw, measured), (0, 0), pp)
    moved = recentre_table(first, fitted, (k, k), found_at=measured, exclude_border=pp.exclude_border)
    direct = peaks_block(pre.shift_patterns(raw, fitted), (0, 0), pp)
    strong_m, strong_d = moved[moved[:, 4] > 100], direct[direct[:, 4] > 100]
    assert abs(len(strong_m) - len(strong_d)) <= 0.02 * len(strong_d)
    tree = cKDTree(np.column_stack([strong_d[:, 0] * 1e3 + strong_d[:, 1] * 1e2, strong_d[:, 2:4]]))
    d, _ = tree.query(np.column_stack([strong_m[:, 0] * 1e3 + strong_m[:, 1] * 1e2, strong_m[:, 2:4]]))
    assert np.median(d) < 0.05 and np.quantile(d, 0.98) < 0.3


def _brute_fill_edge(table, centres, shape, margin):
    """Row by row: the raw position of each peak against each edge moved inward."""
    keep = []
    for row in table:
        c = centres[int(row[0])]
        ok = True
        for a, n in enumerate(shape):
            shift = round(n // 2 - c[a])
            raw = row[1 + a] - (n // 2 - c[a])
            if shift >= 1:
                ok &= raw >= margin - 0.5
            if shift <= -1:
                ok &= raw <= n - 1 - (margin - 0.5)
        keep.append(ok)
    return table[np.array(keep, bool)]


@pytest.mark.parametrize("margin", [0.0, 2.5, 6.3])
def test_drop_fill_edge_equals_brute_force(margin):
    from spedflow.peaks.kernels import drop_fill_edge
    rng = np.random.default_rng(3)
    shape = (40, 56)
    centres = np.column_stack([rng.uniform(5, 35, 30), rng.uniform(5, 51, 30)])
    centres[0] = (20, 28)  # centred: nothing filled
    centres[1] = (20.4, 27.6)  # within half a pixel: nothing filled
    table = np.column_stack([rng.integers(0, 30, 4000), rng.uniform(-2, 42, 4000),
                             rng.uniform(-2, 58, 4000), rng.uniform(1, 9, (4000, 2))])
    got = drop_fill_edge(table, centres, shape, margin)
    np.testing.assert_array_equal(got, _brute_fill_edge(table, centres, shape, margin))
    assert 0 < len(got) < len(table)
    centred = table[table[:, 0] < 2]
    np.testing.assert_array_equal(drop_fill_edge(centred, centres, shape, margin), centred)
    assert len(drop_fill_edge(table[:0], centres, shape, margin)) == 0


@pytest.mark.parametrize("noise", ["counting", "pattern"])
def test_off_centre_beam_gives_no_vectors_at_the_detector_edge(tmp_path, noise):
    """A beam far off the detector centre on a lit background: aligning it shifts the
    detector's edge into the patterns, where the step to the zero fill made a line of
    false peaks and vectors (seen on a real Merlin file). Only the spots remain."""
    import spedflow
    rng = np.random.default_rng(0)
    k, bx = 64, 14  # beam 18 px left of the centre
    yy, xx = np.mgrid[:k, :k]
    lam = np.where((yy - 32) ** 2 + (xx - bx) ** 2 <= 4, 1500.0, 0.0)
    lam += 25 * np.exp(-np.hypot(yy - 32, xx - bx) / 50)
    spots = [(14, 20), (-14, -8), (16, -6)]  # (dy, dx) from the beam
    crystal = sum(np.where((yy - 32 - dy) ** 2 + (xx - bx - dx) ** 2 <= 4, 150.0, 0.0)
                  for dy, dx in spots)
    data = np.empty((12, 12, k, k), np.uint16)
    for i in range(12):
        for j in range(12):
            data[i, j] = rng.poisson(lam + (crystal if j < 6 else 0))
    store = spedflow.from_array(data, tmp_path / "off.zarr", progress=False)
    res = spedflow.segment(store, method="vdf", out=tmp_path / "r.zarr", local=True,
                           progress=False, overrides={"peaks": {"noise": noise}})
    vectors = np.asarray(spedflow.open_result(res)["vectors"].values)
    for dy, dx in spots:
        assert np.hypot(vectors[:, 0] - dy, vectors[:, 1] - dx).min() < 1.0
    # the detector's column 0 lies at kx = -18 once aligned; nothing is found near it
    assert vectors[:, 1].min() > -18 + 3, vectors
    if noise == "counting":  # (the per-pattern noise model passes noise peaks too)
        assert len(vectors) == len(spots), vectors


def test_recentre_table_drops_the_fill_edge_as_pass_1_does():
    """recentre_table(fill_margin=) keeps the rows drop_fill_edge keeps (scan table vs
    the flat table of the same patterns), then moves them."""
    from spedflow.peaks import drop_fill_edge, recentre_table
    rng = np.random.default_rng(4)
    ny, nx, shape = 3, 5, (40, 48)
    found = np.stack([rng.uniform(8, 32, (ny, nx)), rng.uniform(8, 40, (ny, nx))], -1)
    fitted = found + rng.normal(0, 0.3, found.shape)
    m = 3000
    flat = np.column_stack([rng.integers(0, ny * nx, m), rng.uniform(0, 40, m),
                            rng.uniform(0, 48, m), rng.uniform(1, 9, m), np.arange(m)])
    scan = np.column_stack([flat[:, 0] // nx, flat[:, 0] % nx, flat[:, 1:4]])
    kept = drop_fill_edge(flat, found.reshape(-1, 2), shape, 4.5)
    want = recentre_table(scan[kept[:, 4].astype(int)], fitted, shape, found_at=found,
                          exclude_border=2)
    got = recentre_table(scan, fitted, shape, found_at=found, exclude_border=2, fill_margin=4.5)
    assert 0 < len(got) < len(recentre_table(scan, fitted, shape, found_at=found, exclude_border=2))
    np.testing.assert_array_equal(got, want)
