"""Line defects: detector rows / columns that collect a constant factor of their
neighbours' signal (the enlarged chip-boundary pixels of a Medipix3 quad)."""

from __future__ import annotations

import numpy as np
import pytest

from spedflow.preprocess import kernels as K


def _scene(rng, n=200, k=128, spots=(), beam=(64.3, 63.7), background=2.0):
    """Counting patterns (n, k, k): a flat-topped beam disc, a smooth diffuse
    background and Gaussian spots [(ky, kx, amplitude, sigma)], as rates (k, k)."""
    y, x = np.mgrid[0:k, 0:k].astype(float)
    r = np.hypot(y - beam[0], x - beam[1])
    rate = background * (1 + 30 / (r ** 2 + 16)) + 400 * 0.5 * (1 - np.tanh((r - 5) / 0.6))
    for sy, sx, amp, s in spots:
        rate = rate + amp * np.exp(-((y - sy) ** 2 + (x - sx) ** 2) / (2 * s * s))
    return rate, rng.poisson(rate, size=(n, k, k)).astype(np.float64)


def _brute_force_gains(rate_with, rate_without):
    """The truth: a row's gain is the ratio of what it collects to what it would."""
    ratio = rate_with / rate_without
    return np.median(ratio, axis=1), np.median(ratio, axis=0)


@pytest.mark.parametrize("rows,cols,gain", [((63, 64), (63, 64), 2.0), ((40,), (), 2.5),
                                            ((), (90, 91, 92), 3.0), ((70,), (), 0.5)])
def test_line_gains_match_truth(rows, cols, gain):
    rng = np.random.default_rng(1)
    rate, _ = _scene(rng, n=1)
    g_r, g_c = np.ones(128), np.ones(128)
    g_r[list(rows)] = gain
    g_c[list(cols)] = gain
    rate_d = rate * np.outer(g_r, g_c)
    frames = rng.poisson(rate_d, size=(200, 128, 128)).astype(np.float64)
    got_r, got_c = K.line_gains(frames.mean(0), [p.mean(0) for p in np.array_split(frames, 4)])
    want_r, want_c = _brute_force_gains(rate_d, rate)
    np.testing.assert_allclose(got_r, want_r, rtol=0.05)
    np.testing.assert_allclose(got_c, want_c, rtol=0.05)
    assert set(np.flatnonzero(got_r != 1)) == set(rows)
    assert set(np.flatnonzero(got_c != 1)) == set(cols)
    # divided out, the mean pattern is the defect-free one
    fixed = K.flat_field(frames, got_r, got_c).mean(0)
    for sel in ((list(rows), slice(None)), (slice(None), list(cols))):
        if len(sel[0] if isinstance(sel[0], list) else sel[1]):
            np.testing.assert_allclose(fixed[sel].mean(), rate[sel].mean(), rtol=0.05)


def test_spots_beam_and_noise_are_no_line():
    """A row of strong spots along a detector row (a lattice row aligned with it), the
    beam, a ring, a sharp illumination edge and counting noise: nothing is flagged."""
    rng = np.random.default_rng(2)
    spots = [(30, x, 300.0, 0.8) for x in range(4, 124, 6)]  # every 6 px along row 30
    spots += [(100, x, 80.0, 1.2) for x in range(8, 120, 14)]
    rate, frames = _scene(rng, spots=spots)
    y, x = np.mgrid[0:128, 0:128]
    ring = 5 * np.exp(-0.5 * ((np.hypot(y - 64, x - 64) - 45) / 1.0) ** 2)
    frames += rng.poisson(ring, size=frames.shape)
    frames[:, :, 120:] = 0  # a shadowed strip: a step edge along a column
    parts = [p.mean(0) for p in np.array_split(frames, 4)]
    g_r, g_c = K.line_gains(frames.mean(0), parts)
    assert (g_r == 1).all() and (g_c == 1).all()


@pytest.mark.parametrize("lam,n", [(0.02, 200), (0.5, 50), (20.0, 400)])
def test_counting_noise_is_no_line(lam, n):
    rng = np.random.default_rng(3)
    frames = rng.poisson(lam, size=(n, 96, 96)).astype(np.float64)
    g_r, g_c = K.line_gains(frames.mean(0), [p.mean(0) for p in np.array_split(frames, 4)])
    assert (g_r == 1).all() and (g_c == 1).all()


def test_spots_in_one_region_only_are_no_line():
    """A row of spots that only part of the scan shows (one crystal) is no defect,
    however consistent along the row it is in the mean."""
    rng = np.random.default_rng(4)
    rate, frames = _scene(rng, n=200)
    y, x = np.mgrid[0:128, 0:128]
    row = 1.5 * rate * (y == 50)  # the row 2.5x as bright, in a quarter of the patterns
    frames[:50] += rng.poisson(row, size=(50, 128, 128))
    parts = [p.mean(0) for p in np.array_split(frames, 4)]
    g_r, g_c = K.line_gains(frames.mean(0), parts)
    assert (g_r == 1).all() and (g_c == 1).all()
    # the same row brighter in every pattern is a line defect
    frames[50:] += rng.poisson(row, size=(150, 128, 128))
    g_r, _ = K.line_gains(frames.mean(0), [p.mean(0) for p in np.array_split(frames, 4)])
    assert np.flatnonzero(g_r != 1).tolist() == [50]


def test_flat_field_dtype_and_identity():
    frames = np.full((2, 8, 8), 10, np.uint16)
    frames[:, 3] = 21
    g_r = np.ones(8)
    g_r[3] = 2.0
    out = K.flat_field(frames, g_r, np.ones(8))
    assert out.dtype == np.uint16 and (out == 10).all() and (frames[:, 3] == 21).all()
    assert (K.flat_field(frames, np.ones(8), np.ones(8)) == frames).all()


def test_workflow_divides_out_a_medipix_cross(tmp_path):
    """The sample's line gains reach the plan: patterns read through it are flat."""
    import zarr
    from spedflow.workflows._common import prepare_run, with_bad_pixels
    from spedflow.workflows._cache import StageCache
    from spedflow.preprocess import PreprocessParams
    rng = np.random.default_rng(5)
    rate, _ = _scene(rng, n=1, k=64, beam=(32.2, 31.6))
    g = np.ones(64)
    g[31:33] = 2.0
    data = rng.poisson(rate * np.outer(g, g), size=(16, 16, 64, 64)).astype(np.uint16)
    from spedflow.io import ingest
    np.save(tmp_path / "x.npy", data)
    store = ingest(tmp_path / "x.npy", tmp_path / "x.zarr", progress=False)
    plan = prepare_run(store, tmp_path / "r.zarr")
    plan = with_bad_pixels(plan, PreprocessParams(), StageCache(tmp_path / "r.zarr.cache"))
    assert plan.line_gains is not None
    np.testing.assert_allclose(plan.line_gains[0][31:33], 2.0, rtol=0.1)
    mean = np.asarray(plan.data()[...].mean((0, 1)))
    assert abs(mean[31:33, 10:50].mean() / rate[31:33, 10:50].mean() - 1) < 0.05
    assert abs(mean[10:50, 31:33].mean() / rate[10:50, 31:33].mean() - 1) < 0.05
