"""Tests of spedflow.preprocess: kernels against references, lazy == kernel, bad input."""

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi

from spedflow.errors import ParameterError
from spedflow.preprocess import (PreprocessParams, centres_for_alignment, fit_descan,
                                 kernels, lazy, resolve)


@pytest.fixture(autouse=True)
def _sync():
    with dask.config.set(scheduler="synchronous"):
        yield


def disc(shape, centre, radius, amp=1.0, sub=8):
    """Anti-aliased disc: each pixel holds amp * the fraction of it inside the disc."""
    ky, kx = shape
    o = (np.arange(sub) + 0.5) / sub - 0.5
    y = (np.arange(ky)[:, None] + o[None, :]).ravel()
    x = (np.arange(kx)[:, None] + o[None, :]).ravel()
    inside = ((y[:, None] - centre[0]) ** 2 + (x[None, :] - centre[1]) ** 2) <= radius ** 2
    return amp * inside.reshape(ky, sub, kx, sub).mean(axis=(1, 3))


def gauss(shape, centre, sigma, amp=1.0):
    y, x = np.indices(shape)
    return amp * np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / (2 * sigma ** 2))


# ------------------------------------------------------------------------ binning

def test_bin_nav_equals_brute_force():
    rng = np.random.default_rng(0)
    a = rng.poisson(3, (6, 9, 4, 5)).astype(np.uint16)
    out = kernels.bin_nav(a, 3)
    ref = np.zeros((2, 3, 4, 5))
    for i in range(6):
        for j in range(9):
            ref[i // 3, j // 3] += a[i, j]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("chunks", [(6, 9, 4, 5), (1, 1, 4, 5), (4, 5, 4, 5), (5, 2, 4, 5),
                                    (6, 9, 2, 3)])
def test_bin_nav_lazy_equals_kernel(chunks):
    rng = np.random.default_rng(1)
    a = rng.poisson(3, (6, 12, 4, 5)).astype(np.float32)
    got = lazy.bin_nav(da.from_array(a, chunks=chunks), 3).compute()
    np.testing.assert_array_equal(got, kernels.bin_nav(a, 3))


def test_bin_detector_equals_brute_force():
    rng = np.random.default_rng(0)
    a = rng.poisson(3, (2, 3, 6, 9)).astype(np.uint16)
    out = kernels.bin_detector(a, 3)
    ref = np.zeros((2, 3, 2, 3))
    for i in range(6):
        for j in range(9):
            ref[..., i // 3, j // 3] += a[..., i, j]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(kernels.bin_detector(a[0, 0], 3), ref[0, 0])  # one pattern


@pytest.mark.parametrize("chunks", [(2, 3, 12, 8), (1, 1, 12, 8), (2, 2, 6, 8)])
def test_bin_detector_lazy_equals_kernel(chunks):
    rng = np.random.default_rng(1)
    a = rng.poisson(3, (2, 3, 12, 8)).astype(np.float32)
    got = lazy.bin_detector(da.from_array(a, chunks=chunks), 4)
    assert got.chunks[2:] == ((3,), (2,))
    np.testing.assert_array_equal(got.compute(), kernels.bin_detector(a, 4))
    with pytest.raises(ParameterError, match="does not divide the detector"):
        lazy.bin_detector(da.from_array(a), 3)


# -------------------------------------------------------------- Gaussian and DoG

@pytest.mark.parametrize("sigma", [0.6, 1.7, 6.0, 13.2, 40.0])
def test_gaussian_blur_matches_scipy_wrap(sigma):
    rng = np.random.default_rng(2)
    z = rng.poisson(5, (3, 48, 40)).astype(np.float32)
    ref = np.stack([ndi.gaussian_filter(p.astype(np.float64), sigma, mode="wrap",
                                        truncate=12) for p in z])
    np.testing.assert_allclose(kernels.gaussian_blur(z, sigma), ref, atol=2e-5)
    # the wide-Gaussian shortcut used for the background
    import scipy.fft as sfft
    lp = kernels._lowpass_inverse(sfft.rfft2(z), z.shape[-2:], sigma)
    np.testing.assert_allclose(lp, ref, atol=2e-5)


def _dog_reference(z, lo, hi):
    gl = ndi.gaussian_filter(z.astype(np.float64), lo, mode="wrap", truncate=12)
    gh = ndi.gaussian_filter(z.astype(np.float64), hi, mode="wrap", truncate=12)
    return np.maximum(np.where(gl > gh, z, 0) - gh, 0), np.abs(gl - gh)


@pytest.mark.parametrize("sigma", [0.6, 1.7, 6.0, 13.2, 40.0])
@pytest.mark.parametrize("shape", [(48, 40), (128, 128), (9, 150)])
def test_matrix_blur_matches_scipy_wrap(sigma, shape):
    """The DoG's blurs as matrix products (dense circulant, or low-rank factors for a
    wide Gaussian) equal scipy's periodic Gaussian, on non-square detectors too."""
    rng = np.random.default_rng(12)
    z = rng.poisson(5, (3,) + shape).astype(np.float32)
    ref = np.stack([ndi.gaussian_filter(p.astype(np.float64), sigma, mode="wrap",
                                        truncate=12) for p in z])
    got, _ = kernels._DoGMatrices(shape, sigma, sigma)(z)
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_wide_blur_is_low_rank():
    a, b = kernels._wrap_blur_factors(128, 11.88)  # the default background sigma
    assert b is not None and a.shape == b.shape and a.shape[1] < 32
    m, none = kernels._wrap_blur_factors(128, 1.5)
    assert none is None and m.shape == (128, 128)
    # the narrow one runs over its band (test_matrix_blur_matches_scipy_wrap checks the
    # values), unless the band is as wide as the detector
    assert kernels._DoGMatrices((128, 128), 1.5, 11.88).band is not None
    assert kernels._DoGMatrices((9, 150), 1.5, 11.88).band is None


@pytest.mark.parametrize("shape", [(64, 64), (40, 56)])
def test_dog_by_matrices_equals_dog_by_fft(shape):
    """Both routes of the fused shift + DoG give the same patterns (up to pixels
    where G_low and G_high tie to float32 rounding)."""
    rng = np.random.default_rng(13)
    centres = np.array(shape) / 2 + rng.uniform(-3, 3, (5, 2))
    z = np.stack([rng.poisson(1 + 80 * gauss(shape, c, 2.0) + 30 * gauss(shape, c + (9, 7), 1.5))
                  for c in centres]).astype(np.float32)
    a = kernels._pipeline(z, centres, 1.2, 9.0, matrices=True)
    b = kernels._pipeline(z, centres, 1.2, 9.0, matrices=False)
    assert a.dtype == b.dtype == np.float32
    close = np.isclose(a, b, atol=1e-4)
    assert close.mean() > 0.999
    assert np.count_nonzero(a) > 0.05 * a.size  # not trivially all zero


@pytest.mark.parametrize("matrices", [True, False])
def test_dog_matches_reference_formula(matrices):
    rng = np.random.default_rng(3)
    shape = (64, 64)
    z = np.stack([rng.poisson(2 + 50 * gauss(shape, (30, 33), 2.0)
                              + 20 * gauss(shape, (12, 50), 1.5)) for _ in range(3)])
    z = z.astype(np.float32)
    out = kernels._pipeline(z, None, 1.7, 13.2, matrices=matrices)
    for o, p in zip(out, z):
        ref, gap = _dog_reference(p, 1.7, 13.2)
        clear = gap > 1e-4  # where G_low and G_high differ beyond float32 rounding
        np.testing.assert_allclose(o[clear], ref[clear], atol=1e-4)
    assert (out >= 0).all() and out.dtype == np.float32


# --------------------------------------------------------------------- shifting

def test_integer_shift_is_exact_with_zero_fill():
    rng = np.random.default_rng(4)
    z = rng.random((2, 32, 30)).astype(np.float32)
    centres = np.array([[13.0, 19.0], [20.0, 10.0]])
    out = kernels.shift_patterns(z, centres)
    for o, p, c in zip(out, z, centres):
        ref = ndi.shift(p, (16 - c[0], 15 - c[1]), order=0, mode="constant")
        np.testing.assert_allclose(o, ref, atol=1e-5)


def test_subpixel_shift_equals_scipy_linear_shift():
    shape = (64, 64)
    rng = np.random.default_rng(5)
    centres = 32 + rng.uniform(-4, 4, (6, 2))
    z = np.stack([gauss(shape, c, 2.0, 100) + gauss(shape, c + (10.3, -7.7), 1.6, 40)
                  + rng.random(shape) for c in centres]).astype(np.float32)
    out = kernels.shift_patterns(z, centres)
    for o, p, c in zip(out, z, centres):
        ref = ndi.shift(p.astype(np.float64), (32 - c[0], 32 - c[1]), order=1,
                        mode="grid-constant", cval=0.0)
        np.testing.assert_allclose(o, ref, atol=1e-4)
        assert np.unravel_index(np.argmax(o), shape) == (32, 32)


def test_shift_does_not_ring_around_a_saturated_beam():
    """A flat-topped (saturated) beam shifted by half a pixel: no ripples along its row
    and column (a Fourier shift leaves a sinc cross there)."""
    shape = (64, 64)
    yy, xx = np.mgrid[:64, :64]
    beam = np.minimum(255, 2000 * ((yy - 30.5) ** 2 + (xx - 33.5) ** 2 <= 9)).astype(np.float32)
    out = kernels.shift_patterns(beam[None], np.array([[30.5, 33.5]]))[0]
    far = np.hypot(yy - 32, xx - 32) > 6
    assert np.abs(out[far]).max() < 1e-4
    assert out.min() >= 0


def test_fused_equals_shift_then_dog_inside():
    rng = np.random.default_rng(6)
    shape = (48, 48)
    centres = 24 + rng.uniform(-3, 3, (3, 2))
    z = np.stack([rng.poisson(1 + 80 * gauss(shape, c, 2.0) + 30 * gauss(shape, c + (9, 9), 1.5))
                  for c in centres]).astype(np.float32)
    fused = kernels.shift_and_subtract(z, centres, 1.0, 8.0)
    # reference: linear shift (scipy), the rows and columns shifted in from beyond the
    # detector continued from the nearest one that is not (no step for the DoG), then
    # the DoG formula, then zero fill
    for f, p, c in zip(fused, z, centres):
        d = (24 - c[0], 24 - c[1])
        shifted = ndi.shift(p.astype(np.float64), d, order=1, mode="grid-constant", cval=0.0)
        ok = [(np.arange(n) >= s - 1e-6) & (np.arange(n) <= n - 1 + s + 1e-6) for n, s in zip(shape, d)]
        rows, cols = np.flatnonzero(ok[0]), np.flatnonzero(ok[1])
        shifted = shifted[np.clip(np.arange(48), rows[0], rows[-1])]
        shifted = shifted[:, np.clip(np.arange(48), cols[0], cols[-1])]
        ref, gap = _dog_reference(shifted, 1.0, 8.0)
        sl = (slice(5, -5), slice(5, -5))
        clear = gap[sl] > 1e-3
        np.testing.assert_allclose(f[sl][clear], ref[sl][clear], atol=2e-3)


def test_shift_fill_is_no_step_for_the_dog_without_a_background_model():
    """Without the ring background (``peaks.noise = "pattern"``), a flat pattern at any
    level shifted by up to 3.4 px gives no DoG response: the rows and columns shifted in
    from beyond the detector continue its edge. Before, their 0 was a step the DoG
    spread ~8 px in, and a VDF disc 5 px from the edge summed up to 167 units at 63."""
    from spedflow.vdf import disc_masks, preprocessed_sums
    frames = np.full((6, 48, 48), 63.0, np.float32)
    centres = 24.0 + np.array([[1.5, 0.0], [-2.3, 0.7], [0.0, -3.4], [0.2, 0.1],
                               [0.6, 0.6], [-1.0, 2.5]])
    out = kernels.shift_and_subtract(frames, centres, 1.0, 8.0)
    assert np.abs(out).max() < 1e-4
    ang = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    masks = disc_masks(np.column_stack([19 * np.sin(ang), 19 * np.cos(ang)]), 2.5, (48, 48))
    assert np.abs(preprocessed_sums(frames, centres, masks, sigma_low=1.0, sigma_high=8.0)).max() < 1e-3


# ------------------------------------------------------------------ beam centre

@pytest.mark.parametrize("radius", [1.5, 3.0, 6.0, 10.0])
def test_beam_centre_of_discs(radius):
    rng = np.random.default_rng(7)
    shape = (64, 72)
    true = np.column_stack([rng.uniform(26, 38, 6), rng.uniform(30, 42, 6)])
    z = np.stack([disc(shape, c, radius, 100) for c in true])
    z = rng.poisson(z + 0.5).astype(np.float32)
    found = kernels.beam_centres(z, radius)
    assert np.abs(found - true).max() < 0.1
    # without a radius: provisional centres (radius from the mean pattern, which the
    # +-6 px spread of these beams smears), then radius, then final centres
    c0 = kernels.beam_centres(z)
    assert np.abs(c0 - true).max() < 0.65  # the converged centre of a window of that radius
    r = kernels.estimate_beam_radius(z, c0)
    assert abs(r - radius) < 0.1 * radius
    assert np.abs(kernels.beam_centres(z, r) - true).max() < 0.1


def test_beam_centre_saturated_and_bright_spot_nearby():
    rng = np.random.default_rng(8)
    shape = (64, 64)
    r = 4.0
    true = np.column_stack([rng.uniform(28, 36, 5), rng.uniform(28, 36, 5)])
    frames = []
    for c in true:
        beam = np.minimum(disc(shape, c, r, 3000), 1000)  # flat-topped (saturated)
        # Bragg spot 3x brighter per pixel, much smaller area, 2R + 4 px away
        spot = disc(shape, c + (0, 2 * r + 4), 1.5, 3000)
        frames.append(rng.poisson(beam + spot + 2))
    z = np.array(frames, np.float32)
    found = kernels.beam_centres(z, r)
    assert np.abs(found - true).max() < 0.1


@pytest.mark.parametrize("glare", [1.0, 2.0, 3.0, 6.0])  # clipped out to ~3, 6, 8, 17 px
def test_beam_centre_inside_a_clipped_plateau_larger_than_the_window(glare):
    """An 8-bit camera at high dose clips the beam *and its glare* to one flat plateau
    up to several times the radius passed in (the spots' radius, ``radius_of_frames``):
    the centre is still found to sub-pixel precision (the window grows past the
    plateau), not NaN (plateau filling the window) nor ~1 px off (filling ~75 % of it)."""
    rng = np.random.default_rng(21)
    shape = (96, 96)
    true = np.column_stack([rng.uniform(44, 52, 6), rng.uniform(44, 52, 6)])
    yy, xx = np.mgrid[:96, :96]
    frames = []
    for c in true:
        d = np.hypot(yy - c[0], xx - c[1])
        halo = 4000 * np.exp(-d / glare)  # above 255 out to 2.75 glare lengths
        frames.append(np.minimum(rng.poisson(halo + disc(shape, c, 2.0, 5000) + 20), 255))
    z = np.array(frames, np.float32)
    found = kernels.beam_centres(z, 2.0)
    assert np.isfinite(found).all()
    assert np.abs(found - true).max() < 0.15


def test_beam_centre_empty_pattern_is_nan():
    z = np.zeros((2, 32, 32), np.float32)
    z[1] = disc((32, 32), (15.3, 16.6), 3, 10)
    c = kernels.beam_centres(z, 3.0)
    assert np.isnan(c[0]).all() and np.abs(c[1] - (15.3, 16.6)).max() < 0.05


# ------------------------------------------------------------------ beam radius

@pytest.mark.parametrize("radius", [1.5, 2.5, 4.0, 7.0, 10.0])
def test_radius_of_discs(radius):
    rng = np.random.default_rng(9)
    shape = (96, 96)
    true = 48 + rng.uniform(-3, 3, (8, 2))
    z = rng.poisson(np.stack([disc(shape, c, radius, 200) for c in true]) + 1)
    r = kernels.estimate_beam_radius(z.astype(np.float32))
    assert abs(r - radius) < max(0.1, 0.02 * radius)


@pytest.mark.parametrize("sigma", [1.0, 2.0, 4.0])
def test_radius_of_gaussian_spots_is_hwhm(sigma):
    shape = (64, 64)
    true = 32 + np.random.default_rng(10).uniform(-2, 2, (6, 2))
    z = np.stack([gauss(shape, c, sigma, 100) for c in true]).astype(np.float32)
    r = kernels.estimate_beam_radius(z)
    assert abs(r - sigma * np.sqrt(2 * np.log(2))) < 0.05 * sigma + 0.03


def test_profile_merge_is_associative_and_matches_whole():
    rng = np.random.default_rng(11)
    shape = (48, 48)
    c = 24 + rng.uniform(-2, 2, (9, 2))
    z = rng.poisson(np.stack([disc(shape, cc, 3, 50) for cc in c]) + 1).astype(np.float32)
    parts = [kernels.beam_profile(z[i:i + 3], c[i:i + 3]) for i in (0, 3, 6)]
    left = kernels.merge_profiles(kernels.merge_profiles(parts[0], parts[1]), parts[2])
    right = kernels.merge_profiles(parts[0], kernels.merge_profiles(parts[1], parts[2]))
    whole = kernels.beam_profile(z, c)
    np.testing.assert_allclose(left, right)
    np.testing.assert_allclose(left, whole)


# ---------------------------------------------------------------------- descan

def test_fit_descan_recovers_quadratic_despite_outliers():
    rng = np.random.default_rng(12)
    sy, sx = 20, 25
    u, v = np.meshgrid(np.linspace(-1, 1, sy), np.linspace(-1, 1, sx), indexing="ij")
    truth = np.stack([64 + 3 * u - 2 * v + 1.5 * u * v + 2 * u ** 2,
                      60 - 1 * u + 4 * v - 1.0 * v ** 2], -1)
    meas = truth + rng.normal(0, 0.05, truth.shape)
    bad = rng.random((sy, sx)) < 0.10
    meas[bad] += rng.uniform(-15, 15, (bad.sum(), 2))
    meas[0, 0] = np.nan
    fit = fit_descan(meas, order=2)
    assert np.abs(fit.fitted - truth).max() < 0.05
    assert fit.outliers[bad].mean() > 0.9 and fit.outliers[0, 0]
    assert fit.residual_rms < 0.1 and 0.02 < fit.scale < 0.1
    # plain least squares is bent by the same outliers
    assert np.abs(fit_descan(meas[1:], order=2, robust=False).fitted - truth[1:]).max() > 0.3


def test_descan_misfit_is_warned_when_the_beam_drifts_in_time():
    """A beam that wanders with scan time (a random walk along the raster) is not a
    smooth function of position: the fit misses it by far more than the centres'
    own scatter, which second differences along the fast axis measure. A
    quadratic descan with the same noise and 10 % mis-found centres is not warned about."""
    from spedflow.workflows._common import centre_scatter, descan_misfit
    rng = np.random.default_rng(4)
    sy, sx = 48, 48
    u, v = np.meshgrid(np.linspace(-1, 1, sy), np.linspace(-1, 1, sx), indexing="ij")
    smooth = np.stack([64 + 3 * u - 2 * v + 2 * u ** 2, 60 - u + 4 * v - v ** 2], -1)
    noisy = smooth + rng.normal(0, 0.05, smooth.shape)
    assert centre_scatter(noisy) == pytest.approx(0.05, rel=0.15)
    bad = rng.random((sy, sx)) < 0.10
    noisy[bad] += rng.uniform(-15, 15, (bad.sum(), 2))
    assert centre_scatter(noisy) == pytest.approx(0.05, rel=0.3)  # a median: outliers barely move it
    fit = fit_descan(noisy, order=2)
    assert descan_misfit(fit.scale, centre_scatter(noisy), "quadratic") is None
    walk = np.cumsum(rng.normal(0, 0.15, (sy * sx, 2)), axis=0).reshape(sy, sx, 2)  # raster order
    drift = smooth + walk + rng.normal(0, 0.05, smooth.shape)
    fit = fit_descan(drift, order=2)
    assert fit.scale > 0.5
    message = descan_misfit(fit.scale, centre_scatter(drift), "quadratic")
    assert message and 'descan = "none"' in message
    assert centre_scatter(drift[:, :2]) != centre_scatter(drift[:, :2])  # NaN: two columns
    assert descan_misfit(5.0, float("nan"), "plane") is None


def test_centres_for_alignment_modes():
    meas = np.full((3, 4, 2), 30.0)
    meas[1, 1] = np.nan
    used, fit = centres_for_alignment(meas, "none")
    assert fit is None and np.isfinite(used).all()
    used, fit = centres_for_alignment(meas, "plane")
    np.testing.assert_allclose(used, 30.0)


# -------------------------------------------------------------- lazy == kernel

CHUNKINGS = [(6, 7, 40, 36), (1, 1, 40, 36), (4, 5, 40, 36), (5, 3, 40, 36), (6, 7, 20, 36)]


@pytest.fixture(scope="module")
def scan():
    rng = np.random.default_rng(13)
    sy, sx, shape = 6, 7, (40, 36)
    yy, xx = np.mgrid[0:sy, 0:sx]
    centres = np.stack([19.5 + 0.3 * yy, 17.2 - 0.2 * xx], -1)
    frames = np.stack([[disc(shape, centres[i, j], 3, 100)
                        + gauss(shape, centres[i, j] + (8, 5), 1.5, 40)
                        for j in range(sx)] for i in range(sy)])
    return rng.poisson(frames + 1).astype(np.float32), centres


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_lazy_equals_kernel(scan, chunks):
    z, centres = scan
    d = da.from_array(z, chunks=chunks)
    np.testing.assert_allclose(lazy.beam_centres(d, 3.0).compute(),
                               kernels.beam_centres(z, 3.0), atol=1e-9)
    np.testing.assert_allclose(lazy.beam_centres(d).compute(),
                               kernels.beam_centres(z, None, reference=z.mean((0, 1))),
                               atol=1e-6)
    r = lazy.estimate_beam_radius(d, centres).compute()
    assert r == pytest.approx(kernels.radius_from_profile(kernels.beam_profile(z, centres)))
    np.testing.assert_allclose(lazy.shift_patterns(d, centres).compute(),
                               kernels.shift_patterns(z, centres), atol=1e-5)
    np.testing.assert_allclose(lazy.subtract_background_dog(d, 1.5, 12).compute(),
                               kernels.subtract_background_dog(z, 1.5, 12), atol=1e-5)
    p = resolve(PreprocessParams(), 3.0)
    np.testing.assert_allclose(lazy.preprocess(d, centres, p).compute(),
                               kernels.shift_and_subtract(z, centres, p.dog_sigma_low,
                                                          p.dog_sigma_high), atol=1e-5)


def test_lazy_pipeline_recovers_centres(scan):
    z, centres = scan
    d = da.from_array(z, chunks=(4, 5, 40, 36))
    c0 = lazy.beam_centres(d).compute()
    r = float(lazy.estimate_beam_radius(d, c0).compute())
    assert abs(r - 3.0) < 0.15
    meas = lazy.beam_centres(d, r).compute()
    assert np.abs(meas - centres).max() < 0.1
    used, fit = centres_for_alignment(meas, "quadratic")
    aligned = lazy.align(d, used).compute()
    again = kernels.beam_centres(aligned, r)
    assert np.abs(again - (20, 18)).max() < 0.1


# ------------------------------------------------------------------- params

def test_resolve_derives_sigmas_from_radius():
    p = resolve(PreprocessParams(), 3.0)
    assert (p.beam_radius, p.dog_sigma_low, p.dog_sigma_high) == (3.0, 1.5, 12.0)
    p = resolve(PreprocessParams(beam_radius=2.0, dog_sigma_high=20.0), 5.0)
    assert (p.beam_radius, p.dog_sigma_low, p.dog_sigma_high) == (2.0, 1.0, 20.0)
    assert p.resolved


# ---------------------------------------------------------------- bad input

def _d(shape=(4, 6, 16, 16)):
    return da.zeros(shape, chunks=(2, 3, 16, 16)[:len(shape)], dtype=np.float32)


BAD = [
    (ParameterError, lambda: PreprocessParams(nav_binning=0), "nav_binning"),
    (ParameterError, lambda: PreprocessParams(detector_binning=0), "detector_binning"),
    (ParameterError, lambda: PreprocessParams(detector_binning=2.5), "detector_binning"),
    (ParameterError, lambda: PreprocessParams(nav_binning=1.5), "nav_binning"),
    (ParameterError, lambda: PreprocessParams(descan="cubic"), "descan"),
    (ParameterError, lambda: PreprocessParams(align="yes"), "align"),
    (ParameterError, lambda: PreprocessParams(beam_radius=-1), "beam_radius"),
    (ParameterError, lambda: PreprocessParams(dog_sigma_low=0), "dog_sigma_low"),
    (ParameterError, lambda: PreprocessParams(dog_sigma_low=5, dog_sigma_high=2),
     "dog_sigma_high"),
    (ParameterError, lambda: resolve(PreprocessParams()), "beam_radius"),
    (ParameterError, lambda: lazy.bin_nav(_d(), 4), r"factor.* 4 .*\(4, 6\)"),
    (ParameterError, lambda: lazy.bin_nav(_d(), 0), "factor"),
    (ParameterError, lambda: lazy.bin_nav(_d((4, 6, 16)), 2), "4-D"),
    (TypeError, lambda: lazy.bin_nav(np.zeros((4, 6, 16, 16)), 2), "dask array"),
    (ParameterError, lambda: lazy.shift_patterns(_d(), np.zeros((4, 5, 2))), "centres"),
    (ParameterError, lambda: lazy.shift_patterns(_d(), np.full((4, 6, 2), np.nan)),
     "finite"),
    (ParameterError, lambda: lazy.subtract_background_dog(_d(), 3, 2), "sigma_high"),
    (ParameterError, lambda: lazy.subtract_background_dog(_d(), -1, 2), "sigma_low"),
    (ParameterError, lambda: lazy.beam_centres(_d(), 0), "beam_radius"),
    (ParameterError, lambda: lazy.preprocess(_d(), np.zeros((4, 6, 2)), PreprocessParams()),
     "resolve"),
    (ParameterError, lambda: lazy.estimate_beam_radius(_d(), np.zeros((2, 2))), "centres"),
]


@pytest.mark.parametrize("exc, call, match", BAD)
def test_bad_input(exc, call, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("radius", [2.0, 3.0, 4.5])
def test_spot_scale_measures_the_radius_of_disc_spots(radius):
    """Scale-normalised LoG: a disc of radius R peaks at s = R / sqrt(2)."""
    from spedflow.preprocess.kernels import spot_scale
    rng = np.random.default_rng(int(radius * 10))
    yy, xx = np.mgrid[:64, :64]
    frames = np.zeros((20, 64, 64))
    for i in range(20):
        frames[i] += 250 * ((yy - 32) ** 2 + (xx - 32) ** 2 <= 16)  # the beam, excluded
        for _ in range(6):
            y, x = rng.uniform(8, 56, 2)
            if np.hypot(y - 32, x - 32) > 10:
                frames[i] += 100 * ((yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2)
    frames = rng.poisson(frames + 2).astype(np.float32)
    assert spot_scale(frames, np.full((20, 2), 32.0), exclude=8) == pytest.approx(radius, rel=0.1)


def test_profile_and_clip_test_skip_patterns_without_a_centre():
    """Patterns whose beam was not found count for nothing: the same answers as on the
    others alone (both work on the stack in place, a batch at a time)."""
    from spedflow.preprocess.kernels import beam_saturated
    rng = np.random.default_rng(12)
    shape = (48, 48)
    c = 24 + rng.uniform(-2, 2, (150, 2))  # more than one batch
    z = rng.poisson(np.stack([disc(shape, cc, 3, 50) for cc in c]) + 1).astype(np.float32)
    lost = rng.random(150) < 0.3
    c_lost = c.copy()
    c_lost[lost] = np.nan
    np.testing.assert_array_equal(kernels.beam_profile(z, c_lost), kernels.beam_profile(z[~lost], c[~lost]))
    z8 = np.minimum(z, 40)  # clipped where the centres were found; unclipped elsewhere
    z8[lost] = np.minimum(z[lost], 1)
    assert beam_saturated(z8, c_lost)
    assert not beam_saturated(z8, c)


def test_beam_saturated_only_for_a_clipped_beam():
    from spedflow.preprocess.kernels import beam_saturated
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:48, :48]
    beam = 400.0 * ((yy - 24) ** 2 + (xx - 24) ** 2 <= 9) + 3
    frames = rng.poisson(np.broadcast_to(beam, (10, 48, 48))).astype(np.float32)
    centres = np.full((10, 2), 24.0)
    assert not beam_saturated(frames, centres)             # counting noise on the beam
    assert beam_saturated(np.minimum(frames, 255), centres)  # an 8-bit camera's clip


def test_saturated_radius_equals_a_ring_by_ring_count():
    """The clipped plateau about each beam: rings walked outwards while at least half of
    a ring is at the clipped value; a saturated Bragg spot elsewhere does not count."""
    from spedflow.preprocess.kernels import saturated_radius
    rng = np.random.default_rng(3)
    ky, kx = 40, 52
    yy, xx = np.mgrid[:ky, :kx]
    frames = rng.integers(0, 250, (5, ky, kx)).astype(np.uint8)
    centres = np.array([[20.3, 25.6], [12.0, 40.0], [30.5, 10.2], [20.0, 26.0], [np.nan, np.nan]])
    for f, (cy, cx), r in zip(frames, centres, [7.2, 4.0, 2.6, 0.3, 5.0]):
        if np.isfinite(cy):
            f[np.hypot(yy - cy, xx - cx) <= r] = 255
    frames[0][np.hypot(yy - 4, xx - 6) <= 3] = 255  # a saturated spot, far out
    frames[2][np.hypot(yy - 30.5, xx - 10.2) >= 4.6] = 255  # clipped beyond a dark ring
    got = saturated_radius(frames, centres)
    for f, (cy, cx), g in zip(frames, centres, got):
        if not np.isfinite(cy):
            assert g == 0
            continue
        ring = np.rint(np.hypot(yy - cy, xx - cx)).astype(int)
        last = -1  # brute force: walk the rings with pixels until one is mostly unsaturated
        for k in range(ring.max() + 1):
            if not (ring == k).any():
                continue
            if 2 * (f[ring == k] == 255).sum() < (ring == k).sum():
                break
            last = k
        assert g == (last + 0.5 if last >= 0 else 0.0)
    assert got[0] == pytest.approx(7.2, abs=0.5) and got[1] == pytest.approx(4.0, abs=0.5)
    assert got[2] == pytest.approx(2.6, abs=0.5) and got[3] == 0.5  # one clipped pixel
    # the clipped value given explicitly: nothing at 254
    assert not saturated_radius(frames, centres, top=254).any()


@pytest.mark.parametrize("radius", [2.0, 3.0])
def test_spot_scale_is_not_set_by_the_noise_of_empty_patterns(radius):
    """Most patterns of a scan can hold no crystal (holes, film): their strongest LoG
    maxima are single counts at the smallest scale, and outnumber the spots."""
    from spedflow.preprocess.kernels import spot_scale
    rng = np.random.default_rng(int(radius * 7))
    yy, xx = np.mgrid[:96, :96]
    frames = np.zeros((120, 96, 96))
    for i in range(120):
        frames[i] += 200 * ((yy - 48) ** 2 + (xx - 48) ** 2 <= 9)
        if i % 5 == 0:  # one pattern in five on a crystal
            for _ in range(4):
                y, x = rng.uniform(10, 86, 2)
                if np.hypot(y - 48, x - 48) > 12:
                    frames[i] += 15 * ((yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2)
    frames = 8 * rng.poisson(frames + 0.05).astype(np.float32)  # sparse counts, 8 units each
    assert spot_scale(frames, np.full((120, 2), 48.0), exclude=8) == pytest.approx(radius, rel=0.15)
