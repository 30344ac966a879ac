"""Compiled kernels (numba) == their NumPy references, and the switch that turns them off."""

import numpy as np
import pytest

from spedflow import _jit
from spedflow.vdf import disc_masks
from spedflow.vdf import kernels as vk

pytest.importorskip("numba")


@pytest.fixture(autouse=True)
def _compiled_on(monkeypatch):
    """These tests compare the compiled path with NumPy: on, whatever the environment says."""
    monkeypatch.delenv(_jit.ENV, raising=False)


def _patterns(shape, n, rng, dtype):
    """Counting-noise patterns: a bright beam disc at a jittered centre, a few spots, a
    radial background; the beam centres returned with them."""
    ky, kx = shape
    centres = np.array([ky // 2, kx // 2], float) + rng.normal(0, 1.2, (n, 2))
    yy, xx = np.mgrid[:ky, :kx]
    out = np.empty((n, ky, kx))
    spots = rng.uniform(-0.35, 0.35, (6, 2)) * np.array([ky, kx])
    for i, (cy, cx) in enumerate(centres):
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        mean = 400.0 * (r2 <= 9) + 20.0 * np.exp(-np.sqrt(r2) / 6) + 0.3
        for gy, gx in spots[: 2 + i % 5]:
            mean += 30.0 * np.exp(-((yy - cy - gy) ** 2 + (xx - cx - gx) ** 2) / 4.5)
        out[i] = rng.poisson(mean)
    return out.astype(dtype), centres


def _both(frames, centres, masks, **kw):
    fast = vk._compiled_pass2(frames.reshape(-1, *frames.shape[-2:]), centres.reshape(-1, 2),
                              masks, kw["sigma_low"], kw["sigma_high"], kw["counts"])
    assert fast is not None, "the compiled path should apply here"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_jit.ENV, "0")
        ref = vk.preprocessed_sums(frames, centres, masks, **kw)
    return fast, ref


@pytest.mark.parametrize("shape, dtype", [((64, 64), np.uint16), ((48, 80), np.float64),
                                          ((192, 192), np.uint16), ((56, 56), ">u2"),
                                          ((64, 64), np.uint8), ((40, 40), "nan")])
def test_compiled_pass2_equals_numpy(shape, dtype):
    """Shift, ring background, DoG and disc sums: equal to float32 rounding, also on a
    non-square detector, one where NumPy blurs by FFTs (> 160 px), big-endian and 8-bit
    data, and NaN pixels (NaN where NumPy gives NaN)."""
    rng = np.random.default_rng(3)
    frames, centres = _patterns(shape, 40, rng, np.float32 if dtype == "nan" else dtype)
    if dtype == "nan":
        frames[5:9, 17, 22] = np.nan
    # whole-pixel shifts, a beam near the edge, one off the detector altogether
    centres[0] = np.rint(centres[0])
    centres[1] = (3.3, shape[1] - 4.6)
    centres[2] = (-2.0 * shape[0], 5.0)
    vectors = rng.uniform(-0.45, 0.45, (25, 2)) * np.array(shape)
    masks = disc_masks(vectors, 2.7, shape)
    kw = dict(sigma_low=1.2, sigma_high=9.0, counts=(1.3, 0.4))
    fast, ref = _both(frames, centres, masks, **kw)
    assert fast.shape == ref.shape == (40, 25) and fast.dtype == np.float32
    scale = np.nanmax(np.abs(ref))
    assert scale > 0 and np.count_nonzero(ref) > ref.size // 4  # a test with something in it
    np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-5 * scale)  # NaN where NaN
    assert np.isnan(ref).any() == (dtype == "nan")
    assert not ref[2].any() and not fast[2].any()  # nothing left of a pattern shifted away


@pytest.mark.parametrize("shape", [(64, 64), (128, 96)])
def test_compiled_pass2_takes_a_small_beam(shape):
    """A beam of 1.45 px radius (DoG sigmas 0.72 / 5.8 px): the wide Gaussian keeps
    ~n / 3 of its frequencies, more than the n / 4 below which NumPy factors it, and the
    whole of pass 2 ran in NumPy there (~4x the time). The compiled pass takes its
    rank-n/3 factors: equal to the NumPy path (the whole matrix) to float32 rounding."""
    from spedflow import _compiled
    rng = np.random.default_rng(5)
    frames, centres = _patterns(shape, 24, rng, np.uint16)
    vectors = rng.uniform(-0.4, 0.4, (20, 2)) * np.array(shape)
    masks = disc_masks(vectors, 1.5, shape)
    kw = dict(sigma_low=0.7248698444405481, sigma_high=5.798958755524385, counts=(1.0, 0.0))
    ops = _compiled.operators(shape, kw["sigma_low"], kw["sigma_high"])
    assert ops.ok and shape[0] // 4 < ops.ay.shape[1] <= shape[0] // 2
    fast, ref = _both(frames, centres, masks, **kw)
    scale = np.abs(ref).max()
    assert scale > 0 and np.count_nonzero(ref) > ref.size // 4
    np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-5 * scale)


def test_pass2_fill_beyond_the_detector_is_no_step_above_a_dark_level():
    """A flat pattern at a dark level (63 units, as a camera whose offset was left in
    the data), shifted by up to 3.4 px: the rows and columns shifted in from beyond
    the detector are left out of the ring background and then sit at it, so no disc
    of any ring lights up. Before, the shift's fill of 0 pulled every ring crossing it
    below the real pixels and their discs summed ~95 units (the VDF workflow's
    dark-level camera: false crystals where the descan is largest)."""
    shape = (48, 48)
    frames = np.full((6,) + shape, 63.0, np.float32)
    centres = 24.0 + np.array([[1.5, 0.0], [-2.3, 0.7], [0.0, -3.4], [0.2, 0.1],
                               [0.6, 0.6], [-1.0, 2.5]])
    ang = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    masks = disc_masks(np.column_stack([19 * np.sin(ang), 19 * np.cos(ang)]), 2.5, shape)
    fast, ref = _both(frames, centres, masks, sigma_low=1.0, sigma_high=8.0, counts=(1.0, 0.0))
    # float32 rounding of 63 over a ~20-pixel disc
    assert np.abs(fast).max() < 1e-3 and np.abs(ref).max() < 1e-3


def test_compiled_pass2_is_used_only_where_it_applies(monkeypatch):
    frames, centres = _patterns((40, 40), 3, np.random.default_rng(0), np.uint16)
    masks = disc_masks([[5.0, 3.0]], 2.0, (40, 40))
    args = (frames, centres, masks, 1.0, 8.0)
    assert vk._compiled_pass2(*args, (1.0, 0.0)) is not None
    assert vk._compiled_pass2(*args, None) is None  # no ring background: NumPy
    monkeypatch.setenv(_jit.ENV, "0")
    assert not _jit.enabled() and vk._compiled_pass2(*args, (1.0, 0.0)) is None
    monkeypatch.setenv(_jit.ENV, "1")
    assert _jit.enabled()


@pytest.mark.parametrize("shape, num_sigma, border, threshold", [
    ((64, 64), 2, 3, None), ((48, 80), 1, 1, None), ((72, 72), 3, 5, 4.0),
    ((40, 40), 2, 1, 0.5)])  # a threshold this low: thousands of maxima (the retry)
def test_compiled_candidates_equal_numpy(shape, num_sigma, border, threshold):
    """The peak finder's compiled candidate search gives the NumPy finder's table bit
    for bit (the same float32 operations in the same order)."""
    from spedflow.peaks import _params
    from spedflow.peaks.noise import find_peaks_counting
    from spedflow.peaks.kernels import log_sigmas
    rng = np.random.default_rng(7)
    frames, _ = _patterns(shape, 37, rng, np.float32)
    frames[3] = 0  # an empty pattern
    sig = log_sigmas(1.0, 2.0, num_sigma)
    thr = _params.default_threshold(*shape, num_sigma) if threshold is None else threshold
    kw = dict(threshold=thr, exclude_border=border, gain=1.0, read_var=0.0)
    fast, res_fast = find_peaks_counting(frames, sig, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_jit.ENV, "0")
        ref, res_ref = find_peaks_counting(frames, sig, **kw)
    assert len(ref) > 37  # spots found (and, at threshold 0.5, noise by the thousand)
    if threshold == 0.5:
        assert len(ref) > 2000
    np.testing.assert_array_equal(fast, ref)


@pytest.mark.parametrize("offset", [(0.0, 0.0), (1 / 3, -1 / 3)])
def test_compiled_ring_background_equals_numpy(offset):
    """Ring background and residual: exact on counts (integer sums in float32 do not
    depend on their order), to float32 rounding on a CCD's scaled counts plus read noise."""
    from spedflow._compiled import ring_residual
    from spedflow.peaks.noise import ring_model
    rng = np.random.default_rng(11)
    counts, _ = _patterns((56, 64), 20, rng, np.float32)
    ccd = (7.5 * counts + rng.normal(0, 3.0, counts.shape)).astype(np.float32)
    dark = ccd + np.float32(40)  # a dark level left in the data: a negative intercept
    rings = ring_model((56, 64), offset)
    for frames, (gain, read_var), exact in ((counts, (1.0, 0.0), True), (ccd, (7.5, 9.0), False),
                                            (dark, (7.5, 9.0 - 7.5 * 40), False)):
        background, residual = ring_residual(frames, gain, read_var, offset)
        want = rings.background(frames, gain, read_var)
        want_res = frames - rings.image(want)
        if exact:
            np.testing.assert_array_equal(background, want)
            np.testing.assert_array_equal(residual, want_res)
        else:
            np.testing.assert_allclose(background, want, rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(residual, want_res, rtol=1e-5, atol=1e-3)
        assert np.ptp(want) > 1  # a background with structure


def test_kernels_that_cannot_load_fall_back_to_numpy(caplog):
    """A compiled module that fails to import (a broken numba, no writable cache) gives
    None with one warning, and the NumPy kernels run."""
    _jit._load_once.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="spedflow._jit"):
            assert _jit.compiled("spedflow._no_such_compiled_module") is None
            assert _jit.compiled("spedflow._no_such_compiled_module") is None
        assert len([r for r in caplog.records if "NumPy" in r.getMessage()]) == 1
        assert _jit.compiled("spedflow._compiled") is not None
    finally:
        _jit._load_once.cache_clear()


def test_warm_up_loads_what_the_kernels_then_use():
    """warm_up runs each compiled kernel with the argument types of real calls, so a
    worker's first task neither compiles nor loads anything more, read-only chunks
    included (in a fresh process: here earlier tests have loaded every type already)."""
    import subprocess
    import sys
    code = """
import numpy as np
from spedflow import _jit
from spedflow import _compiled as C
from spedflow.peaks.noise import find_peaks_counting
from spedflow.vdf import disc_masks
from spedflow.vdf.kernels import preprocessed_sums
_jit.warm_up()
kernels = (C._ring_chunk, C._maxima, C._pass2_chunk)
before = [list(k.signatures) for k in kernels]
rng = np.random.default_rng(5)
frames = rng.poisson(3.0, (8, 64, 64)).astype(np.uint16)
centres = np.full((8, 2), 32.0) + rng.normal(0, 1, (8, 2))
preprocessed_sums(frames, centres, disc_masks([[10.0, 4.0]], 2.5, (64, 64)), sigma_low=1.0,
                  sigma_high=8.0, counts=(1.0, 0.0))
find_peaks_counting(frames.astype(np.float32), [1.0, 2.0], threshold=5.0, exclude_border=2,
                    gain=1.0, read_var=0.0)
# a chunk dask moved between workers is read-only: no new type (numba compiles those apart)
for ro in (frames.copy(), frames.astype(np.float32)):
    ro.setflags(write=False)
    preprocessed_sums(ro, centres, disc_masks([[10.0, 4.0]], 2.5, (64, 64)), sigma_low=1.0,
                      sigma_high=8.0, counts=(1.0, 0.0))
    find_peaks_counting(ro, [1.0, 2.0], threshold=5.0, exclude_border=2, gain=1.0, read_var=0.0)
after = [list(k.signatures) for k in kernels]
assert all(before), before
assert after == before, (before, after)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_workflow_gives_the_same_result_without_the_compiled_kernels(tmp_path, sim_mgo_like,
                                                                      monkeypatch):
    """The VDF workflow end to end with the compiled kernels and with the NumPy ones: the
    same peaks, vectors and segments, VDF images equal to float32 rounding but for at
    most 1 value in 10^5: pass 2 clips each ring's spots at a Poisson bound of the ring's
    mean, and the two sum the sub-pixel-shifted values in other orders, so a pixel
    lying within an ulp of the bound can fall on the other side (seen once, one value
    of 802,816, when the measured gain changed to 1.0013)."""
    import zarr

    import spedflow
    runs = {}
    for jit in ("1", "0"):
        monkeypatch.setenv(_jit.ENV, jit)
        path = spedflow.segment(sim_mgo_like, method="vdf", out=tmp_path / f"jit{jit}.zarr",
                                local=True, progress=False)
        runs[jit] = zarr.open_group(str(path), mode="r")
    fast, ref = runs["1"], runs["0"]
    for name in ("peaks", "vectors", "vdf/labels", "vdf/segment_vectors"):
        np.testing.assert_array_equal(fast[name][:], ref[name][:], err_msg=name)
    for name in ("vdf/images", "segments/maps", "segments/patterns"):  # sums of the images
        a, b = fast[name][:], ref[name][:]
        off = np.abs(a - b) > 1e-4 * np.abs(b) + 1e-5 * np.abs(b).max()
        assert off.sum() <= off.size // 100_000, (name, np.argwhere(off)[:5])
        np.testing.assert_allclose(a[~off], b[~off], rtol=1e-4, atol=1e-5 * np.abs(b).max(),
                                   err_msg=name)
    assert ref["segments/maps"].shape[0] >= 5


def test_small_workers_run_the_numpy_kernels():
    """numba adds ~150 MB to a process: a worker under MIN_WORKER_MEMORY would sit at
    distributed's pause threshold, so it runs the NumPy kernels and never imports numba
    (not even in the warm-up); a larger worker, and a process that is not a worker, run
    the compiled ones."""
    import sys

    from distributed import Client, LocalCluster

    def probe():
        _jit.warm_up()
        return _jit.enabled(), _jit.compiled("spedflow._compiled") is not None, "numba" in sys.modules

    assert _jit.enabled()  # not in a worker
    for limit, want in (("512MB", False), ("2GB", True)):
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit=limit,
                          host="127.0.0.1", dashboard_address=None) as cluster, \
                Client(cluster) as client:
            assert client.submit(probe, pure=False).result(timeout=120) == (want, want, want), limit


def test_first_compile_is_announced(tmp_path):
    """With no numba cache yet, the first kernel a process runs says they are being
    compiled (the first run stalls ~10 s otherwise without a word), once; with the
    cache, nothing is said, even though a kernel this process never calls (pass 2's)
    has no cache entry: that one said "compiling" on every run of the NMF workflow and
    wherever the compiled pass 2 does not apply."""
    import os
    import subprocess
    import sys
    code = ("import numpy as np; from spedflow.peaks.noise import find_peaks_counting; "
            "f = np.random.default_rng(0).poisson(3.0, (4, 40, 40)).astype(np.float32); "
            "find_peaks_counting(f, [1.0, 2.0], threshold=5.0, exclude_border=1, gain=1.0, "
            "read_var=0.0); find_peaks_counting(f, [1.0, 2.0], threshold=5.0, "
            "exclude_border=1, gain=1.0, read_var=0.0)")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop(_jit.ENV, None)
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert runs[0].stderr.count("compiling spedflow's kernels") == 1, runs[0].stderr[-2000:]
    assert "compiling" not in runs[1].stderr, runs[1].stderr[-2000:]
    names = [n for _, _, files in os.walk(tmp_path) for n in files]
    assert any("_maxima" in n for n in names)
    assert not any("_pass2_chunk" in n for n in names)  # pass 2's kernel is still not cached


def test_compiled_ring_background_leaves_out_pixels_beyond_the_detector():
    """Patterns aligned into a NaN fill: the rings are measured on the detector's pixels
    only, a ring with none takes its inner neighbour's mean; compiled = NumPy."""
    from spedflow._compiled import ring_residual
    from spedflow.peaks.noise import ring_model
    from spedflow.preprocess.kernels import align_whole_pixels
    rng = np.random.default_rng(12)
    counts, _ = _patterns((48, 48), 12, rng, np.float32)
    centres = np.column_stack([rng.uniform(4, 44, 12), rng.uniform(4, 44, 12)])
    frames, _ = align_whole_pixels(counts, centres, fill="nan")
    assert np.isnan(frames).any()
    background, residual = ring_residual(frames, 1.0, 0.0)
    want = ring_model((48, 48)).background(frames, 1.0, 0.0)
    np.testing.assert_array_equal(background, want)
    assert np.isfinite(background).all()
    # every ring of a pattern measured on its detector pixels alone, brute force
    rings = ring_model((48, 48))
    for i, f in enumerate(frames.reshape(len(frames), -1)):
        on = ~np.isnan(f)
        for j in range(rings.n_rings):
            px = f[(rings.ring == j) & on].astype(np.float64)
            if len(px):
                m = px.mean()
                for _ in range(2):  # the Poisson clip, gain 1, no read-out noise
                    below = px[px <= m + 4 * np.sqrt(max(m, 0)) + 1]
                    m = below.mean() if len(below) else 0.0
                assert background[i, j] == pytest.approx(m, rel=1e-5, abs=1e-6)
