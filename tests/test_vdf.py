"""VDF sums: one sparse product == brute-force loop of masks; lazy == kernel over chunkings."""

import dask
import dask.array as da
import numpy as np
import pytest

from spedflow.errors import InputError, ParameterError
from spedflow.vdf import (VDFParams, annular_sums, annular_vdf, annulus_mask, disc_masks, resolve,
                          vdf_images, vdf_sums)

VECTORS = np.array([[5.3, -7.8], [-10.0, 2.0], [0.0, 0.0], [12.6, 12.4], [14.0, -14.5]])


@pytest.fixture(autouse=True)
def _synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


def brute_force(frames, vectors, radius, supersample=1):
    """Loop over vectors: mask (pixel area fraction at ``supersample``^2 points) times pattern."""
    ky, kx = frames.shape[-2:]
    s = (np.arange(supersample) + 0.5) / supersample - 0.5
    yy = (np.arange(ky)[:, None] + s[None, :]).reshape(-1)
    xx = (np.arange(kx)[:, None] + s[None, :]).reshape(-1)
    out = []
    for gy, gx in vectors:
        cy, cx = gy + ky // 2, gx + kx // 2
        fine = (yy[:, None] - cy) ** 2 + (xx[None, :] - cx) ** 2 <= radius ** 2
        mask = fine.reshape(ky, supersample, kx, supersample).mean(axis=(1, 3))
        out.append((frames * mask).sum(axis=(-2, -1)))
    return np.stack(out, axis=-1)


@pytest.fixture
def frames():
    return np.random.default_rng(0).poisson(5.0, (7, 9, 40, 40)).astype(np.float32)


@pytest.mark.parametrize("radius", [1.0, 2.0, 3.3])
def test_hard_discs_equal_brute_force(frames, radius):
    np.testing.assert_allclose(vdf_sums(frames, VECTORS, radius, subpixel=False),
                               brute_force(frames, VECTORS, radius), rtol=1e-5)


def test_subpixel_discs_equal_brute_force(frames):
    # same 8 x 8 supersampling as the kernel -> identical masks
    np.testing.assert_allclose(vdf_sums(frames, VECTORS, 2.5),
                               brute_force(frames, VECTORS, 2.5, supersample=8), rtol=1e-5)
    # and the area of every disc on the detector is pi r^2 to well within a percent
    area = np.asarray(disc_masks(VECTORS[:4], 2.5, (40, 40)).sum(axis=0)).ravel()
    np.testing.assert_allclose(area, np.pi * 2.5 ** 2, rtol=0.01)


def test_gather_and_sparse_product_paths_agree(frames):
    """Small discs are gathered; masks covering much of the detector use the sparse product."""
    from spedflow.vdf.kernels import apply_masks
    rng = np.random.default_rng(1)
    for vectors, radius in ((VECTORS, 2.5), (rng.uniform(-15, 15, (40, 2)), 6.0)):
        masks = disc_masks(vectors, radius, (40, 40))
        expect = (frames.reshape(-1, 1600) @ masks.toarray()).reshape(7, 9, -1)
        np.testing.assert_allclose(apply_masks(frames, masks), expect, rtol=1e-5, atol=1e-3)
    assert 40 * np.diff(disc_masks(rng.uniform(-15, 15, (40, 2)), 6.0, (40, 40)).tocsc().indptr).max() > 1600


def test_subpixel_sum_is_continuous_in_the_vector():
    """Moving a disc by 0.1 px changes the sum of a smooth image by little (no jumps)."""
    yy, xx = np.mgrid[:40, :40]
    img = np.exp(-((yy - 20.0) ** 2 + (xx - 26.0) ** 2) / 50.0)[None].astype(np.float32)
    shifts = np.linspace(0, 1, 11)
    vec = np.column_stack([np.zeros_like(shifts), 3 + shifts])
    soft = vdf_sums(img, vec, 2.2)[0]
    hard = vdf_sums(img, vec, 2.2, subpixel=False)[0]
    assert np.abs(np.diff(soft)).max() < 0.5 * np.abs(np.diff(hard)).max()


def test_disc_off_the_detector_is_clipped(frames):
    v = np.array([[19.5, 0.0], [40.0, 40.0]])  # half off; entirely off
    out = vdf_sums(frames, v, 2.0, subpixel=False)
    np.testing.assert_allclose(out, brute_force(frames, v, 2.0), rtol=1e-5)
    assert np.all(out[..., 1] == 0)


def test_annular(frames):
    ky = kx = 40
    yy, xx = np.mgrid[:ky, :kx]
    r2 = (yy - 20) ** 2 + (xx - 20) ** 2
    mask = (r2 >= 4.0 ** 2) & (r2 <= 12.0 ** 2)
    np.testing.assert_allclose(annular_sums(frames, 4.0, 12.0, subpixel=False),
                               (frames * mask).sum(axis=(-2, -1)), rtol=1e-5)
    area = annulus_mask((ky, kx), 4.0, 12.0).sum()
    assert area == pytest.approx(np.pi * (12 ** 2 - 4 ** 2), rel=0.01)


@pytest.mark.parametrize("chunks", [(7, 9), (4, 5), (3, 2), (1, 9), (7, 1)])
def test_lazy_equals_kernel(frames, chunks):
    d = da.from_array(frames, chunks=chunks + (40, 40))
    imgs = vdf_images(d, VECTORS, 2.5)
    assert imgs.shape == (len(VECTORS), 7, 9) and imgs.dtype == np.float32
    np.testing.assert_allclose(imgs.compute(), vdf_sums(frames, VECTORS, 2.5).transpose(2, 0, 1),
                               rtol=1e-6)
    ann = annular_vdf(d, 3.0, 10.0)
    assert ann.shape == (7, 9)
    np.testing.assert_allclose(ann.compute(), annular_sums(frames, 3.0, 10.0), rtol=1e-6)


def test_integer_data_and_no_vectors(frames):
    raw = frames.astype(np.uint16)
    np.testing.assert_allclose(vdf_sums(raw, VECTORS, 2.0), vdf_sums(frames, VECTORS, 2.0))
    assert vdf_sums(frames, np.zeros((0, 2)), 2.0).shape == (7, 9, 0)


def test_params():
    assert resolve(VDFParams(), 3.1).radius == 3.1
    assert resolve(VDFParams(radius=2.0), 3.1).radius == 2.0


@pytest.mark.parametrize("exc, call, match", [
    (ParameterError, lambda: VDFParams(radius=0), "radius"),
    (ParameterError, lambda: VDFParams(subpixel="yes"), "subpixel"),
    (ParameterError, lambda: resolve(VDFParams()), "spot_radius"),
    (InputError, lambda: vdf_sums(np.zeros((2, 8, 8)), np.zeros((3, 3)), 1.0), r"\(N, 2\)"),
    (InputError, lambda: vdf_sums(np.zeros((2, 8, 8)), [[np.nan, 0]], 1.0), "finite"),
    (ParameterError, lambda: vdf_sums(np.zeros((2, 8, 8)), [[0, 0]], -1.0), "radius"),
    (InputError, lambda: vdf_sums(np.zeros(8), [[0, 0]], 1.0), "ky, kx"),
    (ParameterError, lambda: annular_sums(np.zeros((2, 8, 8)), 5.0, 3.0), "inner"),
    (InputError, lambda: vdf_images(np.zeros((2, 2, 8, 8)), [[0, 0]], 1.0), "dask"),
    (InputError, lambda: vdf_images(da.zeros((2, 8, 8)), [[0, 0]], 1.0), "4-D"),
    (InputError, lambda: vdf_images(da.zeros((2, 2, 8, 8), chunks=(1, 1, 4, 8)), [[0, 0]], 1.0),
     "whole patterns"),
    (InputError, lambda: annular_vdf(da.zeros((2, 2, 8, 8), chunks=(1, 1, 8, 4)), 1.0, 2.0),
     "whole patterns"),
])
def test_bad_inputs(exc, call, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("counts", [None, (1.0, 0.0)])
@pytest.mark.parametrize("chunks", [(7, 9), (4, 5), (1, 9)])
def test_preprocessed_images_equal_preprocess_then_vdf(frames, chunks, counts, monkeypatch):
    """The fused pass 2 (slab by slab) equals preprocess followed by vdf_images, also with
    slabs that do not divide the chunks."""
    from spedflow.preprocess import PreprocessParams
    from spedflow.preprocess import lazy as pre
    from spedflow.preprocess import resolve as resolve_pre
    from spedflow.vdf import kernels, preprocessed_vdf_images
    monkeypatch.setattr(kernels, "_SLAB", 10)
    rng = np.random.default_rng(1)
    centres = np.array([20.0, 20.0]) + rng.normal(0, 1.5, (7, 9, 2))
    prep = resolve_pre(PreprocessParams(), 2.0)
    d = da.from_array(frames, chunks=chunks + (40, 40))
    want = vdf_images(pre.preprocess(d, centres, prep, counts=counts), VECTORS, 2.5).compute()
    got = preprocessed_vdf_images(d, centres, prep, VECTORS, 2.5, counts=counts)
    assert got.shape == (len(VECTORS), 7, 9) and got.dtype == np.float32
    np.testing.assert_allclose(got.compute(), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ParameterError, match="resolved"):
        preprocessed_vdf_images(d, centres, PreprocessParams(), VECTORS, 2.5)
    with pytest.raises(ParameterError, match="align"):
        preprocessed_vdf_images(d, centres, PreprocessParams(align=False, dog_sigma_low=1.0,
                                                             dog_sigma_high=8.0), VECTORS, 2.5)


# ------------------------------------------------------------------ dose normalisation
def test_dose_spread_leaves_out_counting_noise():
    """Totals of a steady beam spread by counting noise only: ~0 beyond it, in any
    camera units (gain) and with a camera's read-out noise; a flickering beam's spread
    is the flicker's own robust spread."""
    from spedflow.vdf import dose_spread
    rng = np.random.default_rng(1)
    steady = rng.poisson(30_000, (64, 64)).astype(float)
    rel, spread, noise = dose_spread(steady, gain=1.0)
    assert spread < 0.002 and abs(np.median(rel) - 1) < 1e-12
    assert noise == pytest.approx(1 / np.sqrt(30_000), rel=0.01)
    assert dose_spread(2.5 * steady, gain=2.5)[1] < 0.002  # 2.5 units per electron
    # read-out noise of 3 units on each of 16384 pixels, at 3,000 counts per pattern
    cam = rng.poisson(3_000, (64, 64)) + rng.normal(0, 3 * np.sqrt(128 * 128), (64, 64))
    assert dose_spread(cam, gain=1.0, read_var=9.0, n_pixels=128 * 128)[1] < 0.005
    assert dose_spread(cam, gain=1.0)[1] > 0.02  # the read-out noise unaccounted for
    f = rng.uniform(0.6, 1.0, (64, 64))
    rel, spread, _ = dose_spread(rng.poisson(30_000 * f).astype(float), gain=1.0)
    g = f / np.median(f)
    assert spread == pytest.approx(1.4826 * np.median(np.abs(g - 1)), rel=0.05)
    np.testing.assert_allclose(rel, g, rtol=0.03)
    assert np.isnan(dose_spread(steady, gain=None)[1])  # the counting noise unknown


def test_dose_spread_guards_empty_and_blanked_patterns():
    from spedflow.vdf import dose_spread
    t = np.full((8, 8), 1000.0)
    t[0, 0], t[0, 1], t[0, 2] = 0.0, np.nan, 10.0  # empty, broken, a blanked beam
    rel, _, _ = dose_spread(t, gain=1.0)
    assert rel[0, 0] == 1 and rel[0, 1] == 1 and rel[0, 2] == pytest.approx(0.2)
    rel, spread, _ = dose_spread(t[:3, :3], gain=1.0)  # too few totals to measure
    assert np.isnan(spread) and (rel == 1).all()


@pytest.mark.parametrize("normalize, spread, noise, clipped, seen, expected", [
    ("auto", 0.20, 0.006, False, True, True),
    ("auto", 0.05, 0.006, False, True, False),    # counting noise and crystals only
    ("auto", 0.12, 0.15, False, True, False),     # ~50 counts: the totals noisier than that
    ("auto", 0.20, 0.006, True, True, False),     # a clipped beam: the total follows the crystals
    ("auto", 0.20, 0.006, False, False, False),   # a beam stop
    ("auto", float("nan"), float("nan"), False, True, False),  # gain unknown
    (True, 0.0, 0.0, True, False, True),
    (False, 0.5, 0.0, False, True, False),
])
def test_dose_normalised_rule(normalize, spread, noise, clipped, seen, expected):
    from spedflow.vdf import dose_normalised
    assert dose_normalised(normalize, spread, noise, clipped=clipped, beam_seen=seen) is expected


def test_normalize_must_be_a_bool_or_auto():
    with pytest.raises(ParameterError, match="normalize"):
        VDFParams(normalize="yes")
    # the switches of "auto" that the data resolve share one check and one message
    from spedflow.decompose import NMFParams
    from spedflow.segment import VDFMergeParams
    for cls, name in ((VDFParams, "normalize"), (NMFParams, "normalize"),
                      (VDFMergeParams, "noise_corrected")):
        for bad in ("yes", 1, None):
            with pytest.raises(ParameterError, match=rf'^`{name}` must be true, false or "auto" '
                                                     rf"\(got {bad!r}\)$"):
                cls(**{name: bad})
        for good in (True, False, "auto"):
            assert getattr(cls(**{name: good}), name) == good
