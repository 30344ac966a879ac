"""Hot and dead detector pixels: found on a sample, repaired in every pattern before
anything else (``preprocess.bad_pixels``)."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from spedflow.errors import InputError, ParameterError
from spedflow.preprocess import PreprocessParams
from spedflow.preprocess import kernels as K
from spedflow.preprocess import lazy as L
from spedflow.simulate import simulate, simulate_array

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def _brute_repair(frames, bad):
    out = np.array(frames, copy=True)
    ky, kx = out.shape[-2:]
    badset = {tuple(p) for p in np.asarray(bad).tolist()}
    for y, x in badset:
        nb = [(y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
              if (dy or dx) and 0 <= y + dy < ky and 0 <= x + dx < kx
              and (y + dy, x + dx) not in badset]
        for idx in np.ndindex(out.shape[:-2]):
            v = np.mean([float(frames[idx + p]) for p in nb]) if nb else 0.0
            out[idx + (y, x)] = np.rint(v) if np.issubdtype(out.dtype, np.integer) else v
    return out


# corners, edges, two bad neighbours side by side, and one surrounded by bad pixels
BAD = np.array([[0, 0], [0, 9], [5, 0], [11, 9], [4, 4], [4, 5], [7, 7],
                [6, 6], [6, 7], [6, 8], [7, 6], [7, 8], [8, 6], [8, 7], [8, 8]])


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.int32])
def test_repair_equals_brute_force(dtype):
    rng = np.random.default_rng(0)
    frames = (rng.poisson(20, (2, 3, 12, 10)) * (1 if dtype != np.float32 else 1.37)).astype(dtype)
    got = K.repair_pixels(frames, BAD)
    ref = _brute_repair(frames, BAD)
    assert got.dtype == frames.dtype and got.shape == frames.shape
    np.testing.assert_allclose(got.astype(float), ref.astype(float), rtol=1e-6)
    # (7, 7) has no good neighbour: 0; other pixels untouched; the input unchanged
    assert (got[..., 7, 7] == 0).all()
    good = np.ones((12, 10), bool)
    good[BAD[:, 0], BAD[:, 1]] = False
    np.testing.assert_array_equal(got[..., good], frames[..., good])
    assert not np.shares_memory(got, frames)


def test_repair_with_nan_at_bad_pixels():
    """NaN at the bad pixels (a mask some tools write), two of them side by side: each
    takes the mean of its good neighbours only."""
    rng = np.random.default_rng(4)
    frames = rng.poisson(20, (2, 3, 12, 10)).astype(np.float32)
    bad = np.array([[3, 3], [3, 4], [0, 9]])
    frames[..., bad[:, 0], bad[:, 1]] = np.nan
    got = K.repair_pixels(frames, bad)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, _brute_repair(frames, bad), rtol=1e-6)


def test_repair_nothing_and_off_detector():
    frames = np.arange(2 * 6 * 5, dtype=np.float32).reshape(2, 6, 5)
    np.testing.assert_array_equal(K.repair_pixels(frames, np.zeros((0, 2), int)), frames)
    with pytest.raises(ValueError, match="detector"):
        K.repair_pixels(frames, [[6, 0]])


@pytest.mark.parametrize("chunks", [(4, 6), (1, 1), (3, 2)])
def test_lazy_repair_equals_kernel(chunks):
    rng = np.random.default_rng(1)
    raw = rng.poisson(5, (4, 6, 12, 10)).astype(np.uint16)
    data = da.from_array(raw, chunks=chunks + (12, 10))
    lazy = L.repair_pixels(data, BAD)
    assert lazy.dtype == raw.dtype
    np.testing.assert_array_equal(lazy.compute(), K.repair_pixels(raw, BAD))
    with pytest.raises(ParameterError, match="detector"):
        L.repair_pixels(data, [[0, 10]])


def _as_set(a):
    return {tuple(p) for p in np.asarray(a).tolist()}


@pytest.mark.parametrize("kw", [dict(), dict(saturate="8bit"), dict(dose=2000.0),
                                dict(shape="sphere", detector=96)])
def test_simulated_defects_are_found(kw):
    kw = {"scan": (24, 24), "detector": 64, "crystals": 5, "seed": 4} | kw
    data, truth = simulate_array(hot_pixels=5, dead_pixels=5, **kw)
    hot, dead = K.find_bad_pixels(data.reshape((-1,) + data.shape[2:]))
    assert _as_set(hot) == _as_set(truth["attrs"]["hot_pixels"])
    # a dead pixel is judged only where its neighbours are lit; none is made up
    assert _as_set(dead) <= _as_set(truth["attrs"]["dead_pixels"])
    # the same data without defects: nothing found
    clean, _ = simulate_array(**kw)
    hot, dead = K.find_bad_pixels(clean.reshape((-1,) + clean.shape[2:]))
    assert len(hot) == 0 and len(dead) == 0


@pytest.mark.parametrize("lam, n", [(0.05, 2000), (0.3, 500), (1.0, 500), (30.0, 200), (0.5, 3)])
def test_counting_noise_is_not_a_bad_pixel(lam, n):
    """Pure Poisson noise at every level, and a handful of sparse patterns: no pixel is
    bad (at 1 count per pixel a good pixel reads 0 where its neighbours are lit about
    half the time)."""
    z = np.random.default_rng(2).poisson(lam, (n, 96, 96)).astype(np.uint16)
    hot, dead = K.find_bad_pixels(z)
    assert len(hot) == 0 and len(dead) == 0


def _pixel_gaussian(shape, centre, sigma):
    """A Gaussian integrated over each pixel (what a detector records), peak pixel ~1."""
    from scipy.special import erf
    ky, kx = shape

    def axis(n, c):
        edges = np.arange(n + 1) - 0.5
        return np.diff(0.5 * (1 + erf((edges - c) / (sigma * np.sqrt(2)))))
    g = np.outer(axis(ky, centre[0]), axis(kx, centre[1]))
    return g / g.max()


def test_sharp_spots_and_beam_everywhere_are_not_hot():
    """A crystal filling the scan puts its spots at the same pixels in every pattern; a
    static beam sits on one pixel. Spots and beam of Gaussian width 0.45 px (FWHM ~1 px,
    the sharpest a detector samples), pixel-centred, are not single bright pixels. A
    pixel at 10x its neighbours in every pattern is, and one reading 0 amid lit ones."""
    img = np.zeros((64, 64))
    for cy, cx, a in [(32, 32, 5000.0), (20, 40, 800.0), (44, 24, 800.0), (10, 10, 300.0)]:
        img += a * _pixel_gaussian((64, 64), (cy, cx), 0.45)
    z = np.random.default_rng(3).poisson(img + 2, (400, 64, 64)).astype(np.float32)
    hot, dead = K.find_bad_pixels(z)
    assert len(hot) == 0 and len(dead) == 0
    z[:, 5, 50] = 10 * z[:, 4:7, 49:52].max(axis=(1, 2)) + 1
    z[:, 30, 10] = 0  # among lit neighbours (the background is 2 counts)
    hot, dead = K.find_bad_pixels(z)
    assert _as_set(hot) == {(5, 50)} and _as_set(dead) == {(30, 10)}


def test_repair_any_memory_layout():
    rng = np.random.default_rng(5)
    frames = rng.poisson(20, (3, 4, 12, 10)).astype(np.float32)
    frames[..., 4, 4] = 1e6
    for view in (np.asfortranarray(frames), frames[:, ::-1], frames.transpose(1, 0, 2, 3)):
        np.testing.assert_allclose(K.repair_pixels(view, [[4, 4]]),
                                   _brute_repair(np.ascontiguousarray(view), [[4, 4]]), rtol=1e-6)


def test_counts_merge_by_addition():
    data, _ = simulate_array(scan=(16, 16), detector=48, crystals=3, seed=1, hot_pixels=2,
                             dead_pixels=2)
    flat = data.reshape((-1,) + data.shape[2:])
    a, b = K.bad_pixel_counts(flat[:100]), K.bad_pixel_counts(flat[100:])
    merged = {k: a[k] + b[k] for k in a}
    whole = K.bad_pixel_counts(flat)
    for k in whole:
        np.testing.assert_allclose(merged[k], whole[k])
    for x, y in zip(K.bad_pixels_from(merged), K.bad_pixels_from(whole)):
        np.testing.assert_array_equal(x, y)


def test_params():
    assert PreprocessParams().bad_pixels == "auto"
    assert PreprocessParams(bad_pixels=[[3, 4], [1, 2], [3, 4]]).bad_pixels == ((1, 2), (3, 4))
    for bad in ["x", [[1]], [[1.5, 2]], 3, [[-1, 2]], [[True, 1]]]:
        with pytest.raises(ParameterError, match="bad_pixels"):
            PreprocessParams(bad_pixels=bad)


@pytest.fixture(scope="module")
def hot_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("hot")
    simulate(d / "hot.zarr", scan=(32, 32), detector=64, crystals=5, seed=6, hot_pixels=4,
             dead_pixels=4, progress=False)
    simulate(d / "clean.zarr", scan=(32, 32), detector=64, crystals=5, seed=6, progress=False)
    return d


@pytest.mark.parametrize("method", ["vdf", "nmf"])
def test_workflows_repair_hot_pixels(hot_store, method):
    """Hot pixels at 4x the beam's peak: without the repair the beam finder takes one for
    the beam (one clear error naming the remedy); with it, the crystals found are those
    of the same data without defects."""
    from spedflow.api import segment
    from spedflow.evaluate import evaluate
    d = hot_store
    with pytest.raises(InputError, match="hot pixel.*preprocess.bad_pixels"):
        segment(d / "hot.zarr", method=method, out=d / f"none.{method}.zarr", local=True,
                progress=False, overrides={"preprocess": {"bad_pixels": "none"}})
    out = segment(d / "hot.zarr", method=method, out=d / f"hot.{method}.zarr", local=True,
                  progress=False)
    clean = segment(d / "clean.zarr", method=method, out=d / f"clean.{method}.zarr", local=True,
                    progress=False)
    truth = zarr.open_group(str(d / "hot.zarr"), mode="r")["truth"].attrs["simulation"]
    found = zarr.open_group(str(out), mode="r").attrs["spedflow"]["resolved"]["bad_pixels"]
    assert _as_set(truth["hot_pixels"]) <= _as_set(found)
    assert _as_set(found) <= _as_set(truth["hot_pixels"]) | _as_set(truth["dead_pixels"])
    s, c = evaluate(out, d / "hot.zarr"), evaluate(clean, d / "clean.zarr")
    assert (s["recall"], s["precision"]) == (c["recall"], c["precision"])
    assert s["recall"] >= 0.6
    # the report lists the pixels repaired
    from spedflow.report._html import write_report
    page = write_report(out, d / f"report-{method}")
    page = page if page.is_file() else page / "report.html"
    assert f"detector pixels repaired (ky, kx)</td><td></td><td>{len(found)}:" in page.read_text()


def test_bad_pixel_off_the_detector_is_refused(hot_store):
    from spedflow.api import segment
    with pytest.raises(ParameterError, match="bad_pixels.*off the 64 x 64"):
        segment(hot_store / "clean.zarr", method="vdf", out=hot_store / "x.zarr", local=True,
                progress=False, overrides={"preprocess": {"bad_pixels": [[64, 3]]}})
    assert not (hot_store / "x.zarr").exists()


@pytest.mark.skipif(not REAL.is_dir(), reason=f"real detector files not found at {REAL}")
def test_real_detector_defects(tmp_path):
    """The Merlin file named for its hot pixel at x 52, y 39 (rows counted from the
    bottom: row 88 of 128), and the fpd Medipix file's pixels that read 0 in every
    pattern amid lit neighbours; the ASTAR camera has none."""
    from spedflow.io import ingest
    found = {}
    for name, src in [("mib", "merlin_mib/002_merlin_test_roi_sig256x128_nav4x2_hot_pixel_52x_39y.mib"),
                      ("fpd", "fpd_hdf5/fpd_file_test.hdf5"), ("blo", "astar_blo/test1.blo")]:
        store = ingest(REAL / src, tmp_path / f"{name}.zarr", progress=False)
        a = zarr.open_group(str(store), mode="r")["data"][:]
        flat = a.reshape((-1,) + a.shape[-2:])
        found[name] = (flat, *K.find_bad_pixels(flat))
    flat, hot, dead = found["mib"]
    assert (88, 52) in _as_set(hot) and len(dead) == 0
    flat, hot, dead = found["fpd"]
    assert len(hot) == 0 and len(dead) >= 5
    assert (flat[:, dead[:, 0], dead[:, 1]] == 0).all()
    assert len(found["blo"][1]) == 0 and len(found["blo"][2]) == 0


@pytest.mark.parametrize("shape", [(3, 7, 9), (2, 1, 5), (1, 4, 1), (2, 3, 3)])
def test_ring_filter_equals_scipy(shape):
    from scipy import ndimage as ndi
    rng = np.random.default_rng(11)
    z = rng.normal(size=shape).astype(np.float32)
    z[0, 0, 0] = np.inf if z.size > 1 else z[0, 0, 0]
    foot = np.ones((1, 3, 3), bool)
    foot[0, 1, 1] = False
    for op, ref, cval in [(np.maximum, ndi.maximum_filter, -np.inf),
                          (np.minimum, ndi.minimum_filter, np.inf)]:
        np.testing.assert_array_equal(K._ring_filter(z, op, cval),
                                      ref(z, footprint=foot, mode="constant", cval=cval))
