"""The counting-noise model of the peak finder (spedflow.peaks.noise) against brute force
and against simulated counting noise."""

import dataclasses

import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr

from spedflow.errors import InputError, ParameterError
from spedflow.peaks import PeakParams, log_sigmas
from spedflow.peaks import kernels as K
from spedflow.peaks import noise as N
from spedflow.preprocess import kernels as pk


def _radius(shape):
    ky, kx = shape
    yy, xx = np.mgrid[:ky, :kx]
    return np.hypot(yy - ky // 2, xx - kx // 2)


def _clipped_ring_mean(x, gain, read_var):
    """The ring background by brute force: the mean of one ring's pixels ``x``, spots
    clipped at the Poisson bound, ``_CLIP_ITER`` times."""
    x = np.asarray(x, np.float64)
    m = x.mean()
    for _ in range(N._CLIP_ITER):
        m = x[x <= m + N._CLIP * np.sqrt(max(gain * max(m, 0) + read_var, 0)) + gain].mean()
    return m


@pytest.mark.parametrize("shape,dark", [((24, 24), 0), ((21, 30), 0), ((24, 24), 20)])
def test_ring_background_equals_a_loop_over_rings(shape, dark):
    """Also for a camera with a dark level left in the data: the variance line's
    intercept is negative, and the clip's variance is floored at 0 below it."""
    rng = np.random.default_rng(0)
    r = _radius(shape)
    frames = rng.poisson(5 * np.exp(-r / 6) + 0.3, (3,) + shape).astype(np.float32)
    frames[0, 3, 4] += 200  # a spot: clipped from its ring's mean
    gain, read_var = 1.3, 0.4
    if dark:
        frames = (1.3 * frames + dark + rng.normal(0, 2, frames.shape)).astype(np.float32)
        read_var = 4 - gain * dark
    got = N.RingModel(shape).background(frames, gain, read_var)
    ring = np.rint(r).astype(int)
    for i, f in enumerate(frames):
        for j in range(ring.max() + 1):
            m = _clipped_ring_mean(f[ring == j], gain, read_var)
            assert got[i, j] == pytest.approx(m, rel=1e-5, abs=1e-6)
    assert got[0, ring[3, 4]] < 10 + dark  # the spot did not enter its ring's background


def test_ring_background_in_batches_equals_one_pattern_at_a_time():
    """More patterns than one batch of the background: each pattern's means are its own."""
    shape = (24, 30)
    rng = np.random.default_rng(5)
    frames = rng.poisson(3 * np.exp(-_radius(shape) / 5) + 0.2, (N._BACKGROUND_BATCH * 2 + 5,) + shape)
    rings = N.RingModel(shape)
    got = rings.background(frames.astype(np.float32), 1.0, 0.0)
    want = np.concatenate([rings.background(f[None].astype(np.float32), 1.0, 0.0) for f in frames])
    assert got.shape == (len(frames), rings.n_rings) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(16, 16), (13, 20), (200, 180)])
def test_ring_image_is_linear_in_radius(shape):
    rings = N.RingModel(shape)
    prof = np.random.default_rng(1).random((2, rings.n_rings)).astype(np.float32)
    r = _radius(shape)
    want = np.stack([np.interp(r, np.arange(rings.n_rings), p) for p in prof])
    np.testing.assert_allclose(rings.image(prof), want, rtol=1e-5, atol=1e-6)
    # the same profiles as the finder's radial units: looked up pixel by pixel
    units = K.RadialUnits(prof[None], rings.j0, rings.j1, rings.f, shape)
    assert units.shape == (1, 2) + shape
    np.testing.assert_allclose(units.images()[0], want, rtol=1e-5, atol=1e-6)
    p, y, x = (np.random.default_rng(2).integers(0, k, 50) for k in (2,) + shape)
    np.testing.assert_allclose(units.at(0, p, y, x), want[p, y, x], rtol=1e-5, atol=1e-6)
    assert np.all(units.floor(0)[:, None, None] <= want)


def test_align_whole_pixels_is_an_integer_shift():
    rng = np.random.default_rng(2)
    frames = rng.random((6, 11, 14)).astype(np.float32)
    # the last two: shifted off the detector entirely, and by exactly its height
    centres = np.array([[3.2, 4.7], [5.0, 7.0], [9.6, 1.4], [5.5, 7.49], [30.2, -20.1],
                        [-6.0, 7.0]])
    out, rest = pk.align_whole_pixels(frames, centres)
    target = np.array([11 // 2, 14 // 2])
    for f, o, c, rr in zip(frames, out, centres, rest):
        shift = np.rint(target - c)
        np.testing.assert_array_equal(o, ndi.shift(f, shift, order=0, mode="constant", cval=0))
        np.testing.assert_allclose(rr, target - c - shift)
        assert np.all(np.abs(rr) <= 0.5)


@pytest.mark.parametrize("sigma", [0.7, 1.5])
def test_log_moments_equal_scipy_filters(sigma):
    ky, kx = 41, 37
    delta = np.zeros((ky, kx))
    delta[ky // 2, kx // 2] = 1
    g = ndi.gaussian_filter(delta, sigma, mode="nearest", truncate=3.5)
    w = -ndi.laplace(g)[1:-1, 1:-1]
    s2, s3 = N.log_moments(ky, kx, sigma)
    assert s2 == pytest.approx((w ** 2).sum(), rel=1e-4)
    assert s3 == pytest.approx((w ** 3).sum(), rel=1e-3)


def _scene(rng, n, shape, gain, read_sd):
    """Counts of a smooth, slowly varying mean (a beam tail and a film ring) at
    neighbouring scan positions, scaled by ``gain``, plus read-out noise."""
    r = _radius(shape)
    mean = 40 * np.exp(-r / 3) + 2 * np.exp(-((r - 12) / 3) ** 2) + 0.05
    scale = 1 + 0.1 * np.sin(np.arange(n) / 7)[:, None, None]
    counts = rng.poisson(mean[None] * scale)
    return gain * counts + rng.normal(0, read_sd, counts.shape)


@pytest.mark.parametrize("gain,read_sd", [(1.0, 0.0), (0.25, 0.0), (4.0, 0.0)])
def test_count_scale_recovers_the_gain(gain, read_sd):
    rng = np.random.default_rng(3)
    block = _scene(rng, 8 * 40, (48, 48), gain, read_sd).reshape(8, 40, 48, 48)
    g, v = N.count_scale([block])
    assert g == pytest.approx(gain, rel=0.05)
    assert v <= 0.05 * gain ** 2


@pytest.mark.parametrize("gain,read_sd,seed", [(4.0, 3.0, 4), (1.0, 3.0, 5), (7.3, 12.0, 6)])
def test_count_scale_is_not_flattened_by_read_noise(gain, read_sd, seed):
    """Read-out noise comparable to the signal (a CCD): the pair mean's own noise
    spreads the pixels along the regressor, and the weighted, trimmed least-squares
    line of the pairs' variance on their mean came out flattened (2.5 for a gain of 4,
    0.38 for 1, with 12.3 and 9.4 for the read-out variance 9); the
    instrumental-variable fit recovers both."""
    rng = np.random.default_rng(seed)
    block = _scene(rng, 8 * 40, (48, 48), gain, read_sd).reshape(8, 40, 48, 48)
    g, v = N.count_scale([block])
    assert g == pytest.approx(gain, rel=0.1)
    assert v == pytest.approx(read_sd ** 2, rel=0.12)


@pytest.mark.parametrize("gain,read_sd,dark", [(1.0, 3.0, 20.0), (4.0, 3.0, 50.0), (1.0, 0.0, 10.0)])
def test_count_scale_measures_a_dark_level(gain, read_sd, dark):
    """A camera whose dark level was not subtracted: the variance ``g (z - o) + v`` is a
    line of negative intercept ``v - g o``. With the intercept clamped at 0 the fit
    gave 1.28 units per count for 1 on a simulated CCD (dark level 20, read-out sigma
    3), and the dark rings' noise 2.8 times its variance."""
    rng = np.random.default_rng(4)
    block = (_scene(rng, 8 * 40, (48, 48), gain, read_sd) + dark).reshape(8, 40, 48, 48)
    g, v = N.count_scale([block])
    assert g == pytest.approx(gain, rel=0.1)
    assert v == pytest.approx(read_sd ** 2 - gain * dark, rel=0.1)


def test_noise_units_of_a_dark_level_are_those_above_it():
    """A negative intercept ``-g o`` is a dark level ``o``: the noise units of
    backgrounds ``b + o`` are those of ``b`` on a camera without one."""
    b = np.geomspace(0.01, 50, 24)[None, :].repeat(3, axis=0) * np.array([[1.0], [0.5], [2.0]])
    shape = (48, 48)
    rings = N.ring_model(shape)
    b = np.resize(b, (3, rings.n_rings))
    got = N.noise_units(b + 20.0, 1.5, -1.5 * 20.0, [1.0, 2.0], 5.0, shape, rings)
    want = N.noise_units(b, 1.5, 0.0, [1.0, 2.0], 5.0, shape, rings)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_count_scale_of_a_narrow_scan_uses_its_columns():
    rng = np.random.default_rng(7)
    block = _scene(rng, 160 * 2, (48, 48), 2.0, 0.0).reshape(160, 2, 48, 48)
    g, v = N.count_scale([block])
    assert g == pytest.approx(2.0, rel=0.1)


def _blurred_scene(rng, n, shape, psf):
    """``_scene`` in counts, each electron spread by a Gaussian point spread of ``psf`` px
    (a scintillator read by a camera), as (n // 40, 40, ky, kx)."""
    z = _scene(rng, n, shape, 1.0, 0.0)
    return ndi.gaussian_filter(z, (0, psf, psf)).reshape(n // 40, 40, *shape)


def _expected_factor(shape, sigma, psf):
    """The LoG noise's variance with the point spread over the independent-pixel sum of
    the same per-pixel variance, for a locally uniform mean: sum (w * p)^2 / (sum w^2
    sum p^2), ``w`` the finder's LoG weights, ``p`` the point spread."""
    ky, kx = shape
    delta = np.zeros((1, ky, kx), np.float32)
    delta[0, ky // 2, kx // 2] = 1
    w = K._neg_laplacian(K._smooth_batch(delta, K._smoothing_operators(ky, kx, [sigma]))[0])[0]
    p = ndi.gaussian_filter(np.pad(np.ones((1, 1)), 12), psf)
    wp = ndi.convolve(np.pad(w.astype(np.float64), 12), p, mode="constant")
    return float((wp ** 2).sum() / ((w.astype(np.float64) ** 2).sum() * (p ** 2).sum()))


def test_log_noise_factors_of_independent_pixels_are_none():
    """Counts, a CCD, a dark level: each pixel's noise its own, no factor (empty)."""
    for gain, read_sd, dark in [(1.0, 0.0, 0.0), (4.0, 3.0, 0.0), (1.0, 3.0, 20.0)]:
        rng = np.random.default_rng(8)
        block = (_scene(rng, 8 * 40, (48, 48), gain, read_sd) + dark).reshape(8, 40, 48, 48)
        g, v = N.count_scale([block])
        assert N.log_noise_factors([block], [1.0, 2.0], g, v) == ()


@pytest.mark.parametrize("psf,shape", [(0.7, (48, 48)), (1.2, (48, 48)), (1.0, (40, 56))])
def test_log_noise_factors_measure_a_point_spread(psf, shape):
    """Each electron spread over neighbouring pixels: the per-pixel gain reads low (the
    sum of the squared point spread), and the LoG noise's variance exceeds the
    independent-pixel sum by the factor the point spread and the LoG weights give."""
    rng = np.random.default_rng(9)
    block = _blurred_scene(rng, 8 * 40, shape, psf)
    g, v = N.count_scale([block])
    got = N.log_noise_factors([block], [1.0, 2.0], g, v)
    want = [_expected_factor(shape, s, psf) for s in (1.0, 2.0)]
    assert max(want) > 1.5  # the case is one the factors are for
    assert len(got) == 2
    for f, w in zip(got, want):
        assert f == pytest.approx(w if w >= N._CORRELATED else 1.0, rel=0.15)


@pytest.mark.parametrize("shape,h", [((24, 24), 2), ((20, 31), 4), ((9, 12), 1)])
def test_summed_variance_equals_the_sum_of_the_convolutions(shape, h):
    """The LoG noise factors' denominator, one weighted sum per image, equals
    convolving each image with the squared weights and summing over the kept pixels
    (scipy's convolution; a kernel without symmetry, so a flip would show)."""
    rng = np.random.default_rng(h)
    var = rng.gamma(2.0, 3.0, (5,) + shape).astype(np.float32)
    w2 = rng.random((2 * h + 1, 2 * h + 1))
    ok = rng.random((shape[0] - 2, shape[1] - 2)) < 0.6
    want = [ndi.convolve(v.astype(np.float64), w2, mode="constant")[1:-1, 1:-1][ok].sum()
            for v in var]
    np.testing.assert_allclose(N._summed_variance(var, w2, ok), want, rtol=1e-10)


def test_log_noise_factors_of_tiny_inputs_are_none():
    """Detectors too small for the LoG's support, scans of one position: nothing to
    measure, no factor (and no error)."""
    rng = np.random.default_rng(2)
    for shape in [(3, 3), (8, 8)]:
        assert N.log_noise_factors([rng.poisson(3.0, (4, 8) + shape)], [1.0, 2.0], 1.0, 0.0) == ()
    assert N.log_noise_factors([rng.poisson(3.0, (1, 1, 32, 32))], [1.0], 1.0, 0.0) == ()


def test_noise_units_with_a_factor_are_those_of_a_gain_that_many_times_larger():
    """The LoG sees counts of ``factor`` times the pixels' gain: the same units."""
    shape = (48, 48)
    rings = N.ring_model(shape)
    b = np.resize(np.geomspace(2, 60, 24), (2, rings.n_rings))
    got = N.noise_units(b, 0.1, 0.0, [1.0, 2.0], 5.0, shape, rings, factors=(1.0, 8.0))
    np.testing.assert_allclose(got[0], N.noise_units(b, 0.1, 0.0, [1.0], 5.0, shape, rings)[0],
                               rtol=1e-6)
    np.testing.assert_allclose(got[1], N.noise_units(b, 0.8, 0.0, [2.0], 5.0, shape, rings)[0],
                               rtol=1e-6)


@pytest.mark.parametrize("psf", [0.7, 1.5])
def test_point_spread_false_peaks_are_gone_with_the_measured_factors(psf):
    """A scene without spots, each electron spread over neighbouring pixels: without the
    factors the finder took the correlated noise for thousands of spots (7-16 per
    pattern); with the measured ones, nearly none, as on the same counts unspread."""
    rng = np.random.default_rng(10)
    shape, n = (64, 64), 8 * 40
    counts = _scene(rng, n, shape, 1.0, 0.0).astype(np.float32)
    blurred = ndi.gaussian_filter(counts, (0, psf, psf)).astype(np.float32)
    block = blurred.reshape(8, 40, *shape)
    g, v = N.count_scale([block])
    sig = [1.0, 2.0]
    factors = N.log_noise_factors([block], sig, g, v)
    kw = dict(threshold=5.0, exclude_border=4)
    plain, _ = N.find_peaks_counting(counts, sig, gain=1.0, read_var=0.0, **kw)
    without, _ = N.find_peaks_counting(blurred, sig, gain=g, read_var=v, **kw)
    with_f, _ = N.find_peaks_counting(blurred, sig, gain=g, read_var=v, factors=factors, **kw)
    assert len(plain) <= 0.02 * n
    assert len(without) > 5 * n
    assert len(with_f) <= 0.1 * n


def _old_sample_blocks(data):
    """The sample before small chunks were extended: the five corner/centre chunks."""
    cy, cx = data.chunksize[:2]
    gy, gx = -(-data.shape[0] // cy), -(-data.shape[1] // cx)
    for i, j in sorted({(0, 0), (gy // 2, gx // 2), (gy - 1, gx - 1), (0, gx - 1), (gy - 1, 0)}):
        yield np.asarray(data[i * cy:(i + 1) * cy, j * cx:(j + 1) * cx])


@pytest.mark.parametrize("scan,chunks", [((64, 64), (22, 23)), ((64, 64), (64, 64)), ((32, 32), (2, 2)),
                                         ((41, 37), (2, 2)), ((32, 32), (1, 3)), ((1, 200), (1, 2)),
                                         ((100, 2), (2, 1)), ((2, 2), (1, 1)), ((512, 512), (2, 2)),
                                         ((72, 72), (12, 12)), ((120, 120), (15, 15)), ((64, 64), (31, 31)),
                                         ((256, 256), (15, 15)), ((40, 40), (6, 6))])
def test_sample_blocks_are_whole_chunks_with_three_in_a_row(scan, chunks):
    """Each block is a chunk-aligned window of the data; under three positions wide both
    ways, chunks are joined along the rows (the columns of a narrower scan); small
    blocks are added, spread over the scan, up to ~512 patterns; chunks of 3+ positions
    give the five blocks they always gave first, and only those where those hold 512."""
    import dask.array as da
    from spedflow.peaks import lazy as L
    ny, nx = scan
    pos = np.arange(ny * nx, dtype=np.int32).reshape(ny, nx, 1, 1)
    data = da.from_array(pos, chunks=chunks + (1, 1))
    blocks = list(L.sample_blocks(data))
    seen = set()
    for b in blocks:
        y0, x0 = divmod(int(b[0, 0, 0, 0]), nx)
        h, w = b.shape[:2]
        np.testing.assert_array_equal(b, pos[y0:y0 + h, x0:x0 + w])   # a window of the data
        assert y0 % chunks[0] == 0 and x0 % chunks[1] == 0              # chunk-aligned
        assert (y0 + h == ny or h % chunks[0] == 0) and (x0 + w == nx or w % chunks[1] == 0)
        if max(chunks) < 3:  # joined to three in a row (a chunk of 3+ is taken as it is)
            assert max(h, w) >= min(3, max(ny, nx)) or max(ny, nx) < 3
        assert (y0, x0, h, w) not in seen
        seen.add((y0, x0, h, w))
    total = sum(b.shape[0] * b.shape[1] for b in blocks)
    assert total >= min(ny * nx, L._SAMPLE_PATTERNS) * 0.75, total
    assert total <= max(5 * chunks[0] * chunks[1], 2 * L._SAMPLE_PATTERNS)
    old = list(_old_sample_blocks(data))
    if min(chunks) >= 3:  # the five blocks chunks of 3+ positions always gave come first
        assert len(blocks) >= len(old)
        for b, o in zip(blocks, old):
            np.testing.assert_array_equal(b, o)
        if sum(o.shape[0] * o.shape[1] for o in old) >= L._SAMPLE_PATTERNS:
            assert len(blocks) == len(old)  # and nothing else where they hold enough


def test_sample_of_a_large_detector_is_bounded_in_bytes(monkeypatch):
    """512 patterns up to 256 MB of float32 (362 x 362 pixels), fewer beyond, at least 16:
    the sample of a 1024 x 1024 detector holds 64 patterns, not 512 (2 GB)."""
    import dask.array as da
    from spedflow.peaks import lazy as L
    assert L.sample_size((128, 128)) == L.sample_size((362, 362)) == 512
    assert L.sample_size((1024, 1024)) == 64 and L.sample_size((4096, 4096)) == 16
    assert L.sample_size((363, 363)) < 512
    # the blocks stop at the bound (here 100 patterns of 8 x 8) as they stop at 512
    monkeypatch.setattr(L, "_SAMPLE_BYTES", 100 * 4 * 64)
    data = da.zeros((40, 40, 8, 8), chunks=(2, 2, 8, 8), dtype=np.uint16)
    total = sum(b.shape[0] * b.shape[1] for b in L.sample_blocks(data))
    assert 100 <= total < 100 + 2 * 6, total  # the last block added holds 2 x 6 positions


def test_sample_blocks_of_a_zarr_array_with_chunks_larger_than_the_scan():
    """A Zarr array's chunks are not clipped to its shape: a 100 x 2 scan in (2, 64)
    chunks is sampled along its 100 rows."""
    from spedflow.peaks import lazy as L
    z = zarr.create_array(store={}, shape=(100, 2, 1, 1), chunks=(2, 64, 1, 1), dtype="i4")
    z[:] = np.arange(200, dtype=np.int32).reshape(100, 2, 1, 1)
    blocks = list(L.sample_blocks(z))
    assert all(b.shape[0] >= 3 for b in blocks), [b.shape for b in blocks]
    assert sum(b.shape[0] * b.shape[1] for b in blocks) >= 0.75 * 200


@pytest.mark.parametrize("chunks", [(2, 2), (1, 3), (1, 1), (8, 40)])
def test_measure_counts_on_small_chunks(chunks):
    """Chunks of a few patterns (large detectors) measure the gain as whole blocks do:
    chunks under three positions wide both ways used to give no measurement at all."""
    import dask.array as da
    from spedflow.peaks.lazy import measure_counts
    rng = np.random.default_rng(11)
    scene = _scene(rng, 16 * 40, (48, 48), 3.0, 0.0).reshape(16, 40, 48, 48)
    g, v = measure_counts(da.from_array(scene, chunks=chunks + (48, 48)))
    assert g == pytest.approx(3.0, rel=0.1)
    assert abs(v) <= 0.1 * 3.0 ** 2


def test_count_scale_needs_neighbouring_positions():
    with pytest.raises(InputError, match="neighbouring"):
        N.count_scale([np.ones((5, 1, 8, 8))])
    empty = np.zeros((4, 6, 16, 16))
    empty[0, 0, 3, 3] = 5  # a lone count: nothing to measure a scale on
    assert N.count_scale([empty]) == (1.0, 0.0)
    assert N.count_scale([np.zeros((4, 6, 16, 16))]) == (1.0, 0.0)  # all zeros: no scale either
    # every reading at the largest value (taken for saturation): said so, not "too few patterns"
    with pytest.raises(InputError, match=r"largest value \(7\): constant or saturated"):
        N.count_scale([np.full((4, 6, 16, 16), 7, np.uint16)])


@pytest.mark.parametrize("level", [0.02, 0.5, 20.0, "beam"])
def test_counting_threshold_keeps_false_peaks_rare(level):
    """Pure counting noise: the default threshold allows ~0.01 noise peaks per pattern
    (Bonferroni, so fewer); here at most 0.05 for every background, a bright beam with
    its tail included."""
    rng = np.random.default_rng(5)
    shape = (64, 64)
    r = _radius(shape)
    mean = (2000 * (r <= 3) + 30 * np.exp(-r / 4) + 0.02) if level == "beam" else np.full(shape, level)
    frames = rng.poisson(mean, (400,) + shape).astype(np.float32)
    p = PeakParams(min_sigma=0.7, max_sigma=1.4, exclude_border=2)
    sig = log_sigmas(p.min_sigma, p.max_sigma, p.num_sigma)
    from spedflow.peaks import default_threshold
    t, residual = N.find_peaks_counting(frames, sig, threshold=default_threshold(64, 64, 2),
                                        exclude_border=2, gain=1.0, read_var=0.0)
    t = t[np.hypot(t[:, 1] - 32, t[:, 2] - 32) > 8]  # the beam itself is found, as it should
    assert len(t) / len(frames) <= 0.05
    assert residual.shape == frames.shape


def test_counting_threshold_finds_a_weak_spot_next_to_the_beam():
    """A 60-count spot 10 px from a beam of 2000 counts per pixel: the paper's DoG spreads
    the beam over it and zeroes it; the counting model finds it in nine patterns of ten."""
    rng = np.random.default_rng(6)
    shape = (64, 64)
    r = _radius(shape)
    yy, xx = np.mgrid[:64, :64]
    spot = 60 / (2 * np.pi * 1.2 ** 2) * np.exp(-((yy - 32) ** 2 + (xx - 42) ** 2) / (2 * 1.2 ** 2))
    mean = 2000 * (r <= 3) + 30 * np.exp(-r / 4) + 0.05 + spot
    frames = rng.poisson(mean, (50,) + shape).astype(np.float32)
    sig = log_sigmas(0.85, 1.7, 2)
    from spedflow.peaks import default_threshold
    thr = default_threshold(64, 64, 2)
    t, _ = N.find_peaks_counting(frames, sig, threshold=thr, exclude_border=2, gain=1.0,
                                 read_var=0.0)
    near = np.hypot(t[:, 1] - 32, t[:, 2] - 42) < 2
    assert len(np.unique(t[near, 0])) >= 0.9 * len(frames)
    dog = pk.subtract_background_dog(frames, 1.5, 12.0)
    old = K.find_peaks_log(dog, sig, threshold=thr, exclude_border=2)
    assert np.count_nonzero(np.hypot(old[:, 1] - 32, old[:, 2] - 42) < 2) <= 0.1 * len(frames)


def test_radial_units_give_the_table_of_their_unit_images(monkeypatch):
    """The counting finder looks its radial units up at its candidates only: the same
    table as with the whole unit images, and as the per-pattern level given as units."""
    rng = np.random.default_rng(9)
    shape = (48, 56)
    r = _radius(shape)
    frames = rng.poisson(40 * np.exp(-r / 5) + 0.2, (30,) + shape).astype(np.float32)
    frames[:, 12:15, 30:33] += rng.integers(5, 40, (30, 1, 1))
    sig = log_sigmas(0.8, 1.6, 2)
    rings = N.ring_model(shape)
    bg = rings.background(frames, 1.0, 0.0)
    units = K.RadialUnits(N.noise_units(bg, 1.0, 0.0, sig, 4.0, shape, rings),
                          rings.j0, rings.j1, rings.f, shape)
    residual = frames - rings.image(bg)
    got = K.find_peaks_log(residual, sig, threshold=4.0, exclude_border=2, units=units)
    want = K.find_peaks_log(residual, sig, threshold=4.0, exclude_border=2, units=units.images())
    assert len(want) >= 25
    np.testing.assert_array_equal(got, want)
    # Z looked up candidate by candidate, or made for every pixel: the same table
    for frac in (0.0, 1.0):
        monkeypatch.setattr(K, "_SPARSE_CANDIDATES", frac)
        for u in (units, units.images()):
            np.testing.assert_array_equal(
                K.find_peaks_log(residual, sig, threshold=4.0, exclude_border=2, units=u), want)
    monkeypatch.setattr(K, "_SPARSE_CANDIDATES", 0.0)  # and with the per-pattern level
    dense_none = K.find_peaks_log(residual, sig, threshold=4.0, exclude_border=2)
    monkeypatch.setattr(K, "_SPARSE_CANDIDATES", 1.0)
    np.testing.assert_array_equal(
        K.find_peaks_log(residual, sig, threshold=4.0, exclude_border=2), dense_none)


def test_find_peaks_log_units_equal_the_per_pattern_level():
    """Given the noise levels the finder would measure, as unit images, the table is the same."""
    rng = np.random.default_rng(7)
    frames = rng.poisson(3, (20, 32, 40)).astype(np.float32)
    frames[:, 10:13, 20:23] += 40
    sig = log_sigmas(0.8, 1.6, 2)
    thr = 4.0
    ops = K._smoothing_operators(32, 40, sig)
    units = np.empty((2, 20, 32, 40), np.float32)
    for i, g in enumerate(K._smooth_batch(frames, ops)):
        units[i] = K.noise_level(K._neg_laplacian(g), thr)[:, None, None]
    want = K.find_peaks_log(frames, sig, threshold=thr, exclude_border=2)
    got = K.find_peaks_log(frames, sig, threshold=thr, exclude_border=2, units=units)
    assert len(want) >= 20
    np.testing.assert_array_equal(got, want)
    with pytest.raises(InputError, match="units"):
        K.find_peaks_log(frames, sig, threshold=thr, units=units[:1])


@pytest.mark.parametrize("kw,field", [(dict(noise="poisson"), "noise"), (dict(gain=0), "gain"),
                                      (dict(gain=-2.0), "gain")])
def test_noise_parameters_are_checked(kw, field):
    with pytest.raises(ParameterError, match=field):
        PeakParams(**kw)


@pytest.mark.parametrize("shape", [(24, 24), (21, 30)])
def test_ring_model_about_an_offset_centre_equals_a_loop_over_rings(shape):
    """Rings about the centre moved by a sub-pixel offset: each pixel's ring is the
    rounded distance from that point, the background the clipped ring means."""
    rng = np.random.default_rng(9)
    off = (0.33, -0.33)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    r = np.hypot(yy - shape[0] // 2 - off[0], xx - shape[1] // 2 - off[1])
    frames = rng.poisson(8 * np.exp(-r / 5) + 0.5, (2,) + shape).astype(np.float32)
    rings = N.ring_model(shape, off)
    np.testing.assert_array_equal(rings.ring, np.rint(r).astype(int).ravel())
    got = rings.background(frames, 1.0, 0.0)
    ring = np.rint(r).astype(int)
    for i, f in enumerate(frames):
        for j in range(ring.max() + 1):
            m = _clipped_ring_mean(f[ring == j], 1.0, 0.0)
            assert got[i, j] == pytest.approx(m, rel=1e-5, abs=1e-6)
    want = np.stack([np.interp(r, np.arange(rings.n_rings), p) for p in got])
    np.testing.assert_allclose(rings.image(got), want, rtol=1e-5, atol=1e-5)


def test_rings_about_the_sub_pixel_beam_leave_no_false_peaks_on_its_flank():
    """Whole-pixel alignment leaves the beam up to half a pixel off the rings' centre;
    on the steep flank of the beam and its glare, ring means about the wrong point leave
    a dipole the finder takes for spots (1.5 per pattern at |g| = 4-14 px on these
    simulated patterns, the spots' own reflections being ~3.5 per pattern further out).
    Rings about the beam to a third of a pixel (``peaks.ring_centres = 3``, through
    counting_peaks_by_slab as in pass 1 of the VDF workflow) remove most of them and
    keep the rest."""
    from spedflow.peaks import resolve
    from spedflow.simulate import simulate_array
    data, _ = simulate_array(scan=(12, 12), detector=128, crystals=2, seed=3)
    frames = data.reshape(-1, 128, 128).astype(np.float32)
    centres = pk.beam_centres(frames, 3.0)
    p = resolve(PeakParams(), 3.0, detector_shape=(128, 128))
    assert p.ring_centres == 1  # the default: about the centre pixel
    counts = N.count_scale([data])
    whole, _ = pk.align_whole_pixels(frames, centres)
    t0, _ = N.find_peaks_counting(whole, log_sigmas(p.min_sigma, p.max_sigma, p.num_sigma),
                                  threshold=p.threshold, exclude_border=p.exclude_border,
                                  gain=counts[0], read_var=counts[1])
    one = np.concatenate([t for _, t, _ in N.counting_peaks_by_slab(frames, centres, p, counts)])
    assert len(one) == pytest.approx(len(t0), rel=0.01)
    p3 = dataclasses.replace(p, ring_centres=3)
    parts = list(N.counting_peaks_by_slab(frames, centres, p3, counts, slab=16))
    t1 = np.concatenate([t for _, t, _ in parts])

    def per_pattern(t, lo, hi):
        g = np.hypot(t[:, 1] - 64, t[:, 2] - 64)
        return np.count_nonzero((g >= lo) & (g < hi)) / len(frames)

    assert per_pattern(t0, 4, 14) >= 1.0 and per_pattern(t1, 4, 14) <= 0.4
    assert per_pattern(t1, 14, 90) == pytest.approx(per_pattern(t0, 14, 90), rel=0.05)
    # every pattern once, in slabs of one ring model each
    idx = np.concatenate([i for i, _, _ in parts])
    assert sorted(idx.tolist()) == list(range(len(frames)))
    assert all(len(np.unique(N.ring_offset_bins(centres[i], (128, 128), 3))) == 1
               for i, _, _ in parts)
    with pytest.raises(ParameterError, match="ring_centres"):
        PeakParams(ring_centres=2)


def test_fill_beyond_copies_the_nearest_detector_pixel():
    """Patterns aligned into a NaN fill, then filled by fill_beyond: scipy's whole-pixel
    shift with mode="nearest" (the detector's edge continued, no step)."""
    from scipy import ndimage as ndi
    from spedflow.preprocess.kernels import align_whole_pixels, fill_beyond, fill_boxes, whole_shifts
    rng = np.random.default_rng(2)
    frames = rng.normal(size=(6, 9, 11)).astype(np.float32)
    centres = np.array([[4, 5], [1.2, 8.7], [7.6, 1.1], [4, 5.4], [0, 0], [8, 10]], float)
    out, _ = align_whole_pixels(frames, centres, fill="nan")
    whole = whole_shifts(centres, (9, 11))
    fill_beyond(out, fill_boxes(whole, (9, 11)))
    for f, a, s in zip(frames, out, whole):
        np.testing.assert_array_equal(a, ndi.shift(f, s, order=0, mode="nearest"))


def _dark_camera(rng, shape=(12, 24, 48, 48), beam=True):
    """An 8-bit camera at its dark level (12 units, read-out sigma 1.5, 1.5 units per
    count) seeing ~0.05 counts per pixel, and a saturated beam: no pixel but the
    beam's varies enough to measure the gain on."""
    ky, kx = shape[-2:]
    mean = np.full(shape, 0.05)
    if beam:
        r = np.hypot(*np.mgrid[:ky, :kx] - np.array([ky // 2, kx // 2])[:, None, None])
        mean = mean + 400.0 * (r <= 3)
    v = 1.5 * rng.poisson(mean) + 12.0 + rng.normal(0, 1.5, shape)
    return np.clip(np.round(v), 0, 255).astype(np.uint8)


def test_count_scale_says_how_well_it_measured_the_gain():
    """The relative standard error of the gain: small where a beam tail spreads the
    pixels' means, large on a camera whose pixels all sit at its dark level but the
    beam's (left out), where the gain it gives is a guess."""
    rng = np.random.default_rng(12)
    good = _scene(rng, 8 * 40, (48, 48), 1.0, 0.0).reshape(8, 40, 48, 48)
    g, v, err = N.count_scale([good], return_error=True)
    assert (g, v) == N.count_scale([good]) and g == pytest.approx(1.0, rel=0.05)
    assert 0 < err < 0.02
    _, _, err_dark = N.count_scale([_dark_camera(np.random.default_rng(13))], return_error=True)
    assert err_dark > 0.1
    assert N.count_scale([np.zeros((4, 6, 16, 16))], return_error=True) == (1.0, 0.0, 0.0)


def test_a_poorly_measured_gain_falls_back_to_the_pattern_noise(tmp_path, caplog):
    """On such a camera the VDF peak finder builds no counting unit on the guessed gain:
    it measures each pattern's own noise level (``noise = "pattern"``), says so and names
    ``peaks.gain``, also when the measurement comes from the stage cache. A given gain
    keeps counting statistics; a well-measured gain says nothing; the NMF workflow's
    dark level reads the same measurement without a word of the VDF gain."""
    import spedflow
    from spedflow.peaks import resolve as resolve_peaks
    from spedflow.preprocess import PreprocessParams
    from spedflow.preprocess import resolve as resolve_pre
    from spedflow.workflows._cache import StageCache
    from spedflow.workflows._common import measured_counts, prepare_run
    from spedflow.workflows.vdf import noise_model
    prep = resolve_pre(PreprocessParams(), 3.0)

    def plan_of(name, data):
        np.save(tmp_path / f"{name}.npy", data)
        store = spedflow.ingest(tmp_path / f"{name}.npy", tmp_path / f"{name}.zarr", progress=False)
        return prepare_run(store, tmp_path / f"{name}.out.zarr")

    def model(plan, cache, **given):
        pk = resolve_peaks(PeakParams(**given), 3.0, detector_shape=plan.detector_shape)
        return noise_model(plan, prep, pk, cache)

    def warned():
        return [r.getMessage() for r in caplog.records if "poorly determined" in r.getMessage()]

    plan = plan_of("dark", _dark_camera(np.random.default_rng(14)))
    cache = StageCache(tmp_path / "cache")
    for _ in range(2):  # measured, then from the cache
        caplog.clear()
        pk, counts = model(plan, cache)
        assert pk.noise == "pattern" and counts is None
        assert len(warned()) == 1 and "peaks.gain" in warned()[0]
    caplog.clear()
    _, _, error = measured_counts(plan, cache, return_error=True)  # NMF's dark level
    assert error > 0.1 and not warned()
    pk, counts = model(plan, StageCache(tmp_path / "cache2"), gain=1.5)
    assert pk.noise == "counting" and counts[0] == 1.5 and not warned()
    rng = np.random.default_rng(15)
    good = _scene(rng, 8 * 40, (48, 48), 1.0, 0.0).reshape(8, 40, 48, 48).astype(np.uint16)
    pk, counts = model(plan_of("good", good), StageCache(tmp_path / "cache3"))
    assert pk.noise == "counting" and counts[0] == pytest.approx(1.0, rel=0.05) and not warned()
    assert len(counts) in (2, 3)  # (gain, read_var[, LoG noise factors]): no error item


@pytest.mark.parametrize("gain,read_sd,dark", [(1.0, 3.0, 20.0), (4.0, 3.0, 50.0), (1.0, 0.0, 0.0)])
def test_count_scale_with_the_gain_given_fits_the_intercept(gain, read_sd, dark):
    """The camera's gain held: the intercept ``v - g o`` alone, from the same triples."""
    rng = np.random.default_rng(16)
    block = (_scene(rng, 8 * 40, (48, 48), gain, read_sd) + dark).reshape(8, 40, 48, 48)
    g, v, err = N.count_scale([block], gain=gain, return_error=True)
    assert g == gain and err == 0.0
    assert v == pytest.approx(read_sd ** 2 - gain * dark, abs=0.05 * (read_sd ** 2 + gain * dark) + 0.02)


def test_a_given_gain_on_a_camera_at_its_dark_level_gives_its_intercept(tmp_path):
    """Where the gain cannot be measured (every pixel at the dark level but the beam's),
    giving it is enough: the VDF workflow's noise model then measures the intercept
    with it held, 1.5^2 + 1/12 - 1.5 x 12 (read-out noise, rounding, dark level), where
    it took 0 before (the dark level's 18 units of variance taken for counts)."""
    import spedflow
    from spedflow.peaks import resolve as resolve_peaks
    from spedflow.preprocess import PreprocessParams
    from spedflow.preprocess import resolve as resolve_pre
    from spedflow.workflows._cache import StageCache
    from spedflow.workflows._common import prepare_run
    from spedflow.workflows.vdf import counts_of
    np.save(tmp_path / "dark.npy", _dark_camera(np.random.default_rng(17)))
    store = spedflow.ingest(tmp_path / "dark.npy", tmp_path / "dark.zarr", progress=False)
    plan = prepare_run(store, tmp_path / "out.zarr")
    prep = resolve_pre(PreprocessParams(), 3.0)
    pk = resolve_peaks(PeakParams(gain=1.5), 3.0, detector_shape=plan.detector_shape)
    gain, read_var = counts_of(plan, prep, pk, StageCache(tmp_path / "cache"))[:2]
    assert gain == 1.5
    assert read_var == pytest.approx(1.5 ** 2 + 1 / 12 - 1.5 * 12, abs=0.5)
    pk = resolve_peaks(PeakParams(gain=1.5, read_variance=-10.0), 3.0,
                       detector_shape=plan.detector_shape)
    assert counts_of(plan, prep, pk, StageCache(tmp_path / "cache"))[:2] == (1.5, -10.0)
