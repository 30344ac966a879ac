"""Poisson normalisation, beam mask, scree/rank choice and background components."""

import dask
import dask.array as da
import numpy as np
import pytest

from spedflow.config import params_from_dict
from spedflow.decompose import (NMFParams, ScreeParams, beam_mask, choose_n_components,
                                classify_components, default_beam_mask_radius, loading_coverage,
                                marchenko_pastur_count, merge_poisson, normalised_matrix,
                                poisson_partial, poisson_statistics, randomized_svd, scree,
                                signflip_block, spatial_coherence, spot_fraction,
                                undo_normalisation)
from spedflow.errors import InputError, ParameterError


@pytest.fixture(autouse=True)
def _sync():
    with dask.config.set(scheduler="synchronous"):
        yield


def synth(rank, sy=32, sx=32, k=24, seed=0, counts=50.0):
    """Sum of `rank` spot patterns x disc-like loadings, plus a radial halo, Poisson noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:k, :k]
    pats = []
    for _ in range(rank):
        p = np.zeros((k, k))
        for _ in range(rng.integers(4, 9)):
            cy, cx = rng.uniform(2, k - 2, 2)
            p += rng.uniform(0.5, 1.5) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0)
        pats.append(p / p.sum() * k * k)
    Y, X = np.mgrid[:sy, :sx]
    loads = []
    for _ in range(rank):
        cy, cx, r = rng.uniform(0, sy), rng.uniform(0, sx), rng.uniform(4, 9)
        loads.append(np.clip(1.2 - np.hypot(Y - cy, X - cx) / r, 0, 1))
    pats, loads = np.array(pats), np.array(loads)
    mean = np.einsum("cyx,cij->yxij", loads, pats) * counts * 4 / (k * k)
    mean += 0.2 * np.exp(-np.hypot(yy - k // 2, xx - k // 2) / 8)
    return rng.poisson(mean).astype(np.float32), pats, loads


# ------------------------------------------------------------------ beam mask
def test_beam_mask_brute_force():
    m = beam_mask((9, 10), 2.5)
    ref = np.array([[(y - 4) ** 2 + (x - 5) ** 2 <= 6.25 for x in range(10)] for y in range(9)])
    np.testing.assert_array_equal(m, ref)


@pytest.mark.parametrize("seed", range(4))
def test_edge_mask_equals_the_pixels_alignment_leaves_incomplete(seed):
    """``edge_mask``: whole rows / columns that the bilinear shift to the centre (the
    alignment NMF uses) leaves incomplete in more than the given fraction of patterns;
    brute force: shift a detector of ones along each axis and count the rows / columns
    below 1 (two centres lie a whole detector off: patterns with nothing left)."""
    from scipy import ndimage
    from spedflow.decompose import edge_mask
    rng = np.random.default_rng(seed)
    ky, kx = (int(v) for v in rng.integers(9, 31, 2))
    n = int(rng.integers(5, 40))
    centres = np.array([ky // 2, kx // 2]) + rng.normal(0, 3, (n, 2)) + [2 * seed - 3, 0]
    if seed % 2:
        centres = np.round(centres)  # whole-pixel shifts
    # a few beams a whole detector or more off: those patterns keep nothing
    centres[:2] += np.array([[ky + seed, 0], [0, -(kx + 0.5)]])
    def short(shifts):  # (n, ky, kx): pixels the shift leaves below 1
        return np.stack([ndimage.shift(np.ones((ky, kx)), s, order=1, mode="constant", cval=0.0)
                         for s in shifts]) < 1 - 1e-9

    rows = short([(ky // 2 - cy, 0) for cy, _ in centres])[:, :, 0]   # shifted along y only
    cols = short([(0, kx // 2 - cx) for _, cx in centres])[:, 0, :]
    for fraction in (0.0, 0.1, 0.3):
        ref = np.zeros((ky, kx), bool)
        ref[rows.mean(axis=0) > fraction] = True
        ref[:, cols.mean(axis=0) > fraction] = True
        np.testing.assert_array_equal(edge_mask((ky, kx), centres, fraction), ref)
    assert not edge_mask((ky, kx), np.tile([ky // 2, kx // 2], (5, 1))).any()  # centred: none


def test_beam_mask_default_radius():
    assert default_beam_mask_radius(1.0) == 3.0          # small disc: +2 px margin
    assert default_beam_mask_radius(5.0) == 10.0         # large disc: 2x
    np.testing.assert_array_equal(beam_mask((16, 16), beam_radius=5), beam_mask((16, 16), 10.0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(shape=(8, 8)), "radius"),
    (dict(shape=(8, 8), radius=-1), "radius"),
    (dict(shape=(8,), radius=1), "shape"),
    (dict(shape=(8, 8), beam_radius=0), "beam_radius"),
])
def test_beam_mask_bad(kwargs, match):
    with pytest.raises(ParameterError, match=match):
        beam_mask(**kwargs)


# ------------------------------------------------------------------ Poisson statistics
def test_poisson_merge_associative_and_exact():
    data, _, _ = synth(2, sy=12, sx=8, k=10)
    mask = beam_mask((10, 10), 2)
    parts = [poisson_partial(data[s], mask) for s in (slice(0, 3), slice(3, 7), slice(7, 12))]
    left = merge_poisson(merge_poisson(parts[0], parts[1]), parts[2])
    right = merge_poisson(parts[0], merge_poisson(parts[1], parts[2]))
    whole = poisson_partial(data, mask)
    for got in (left, right):
        np.testing.assert_allclose(got.row_sums, whole.row_sums)
        np.testing.assert_allclose(got.col_sums, whole.col_sums)
    np.testing.assert_allclose(whole.row_sums, np.where(mask, 0, data).sum((2, 3)))
    np.testing.assert_allclose(whole.col_sums, np.where(mask, 0, data).sum((0, 1)))
    assert np.all(whole.col_sums[mask] == 0)


@pytest.mark.parametrize("chunks", [(12, 8), (5, 3), (1, 8), (7, 5)])
def test_poisson_statistics_lazy_equals_kernel(chunks):
    data, _, _ = synth(2, sy=12, sx=8, k=10)
    mask = beam_mask((10, 10), 2)
    ref = poisson_statistics(data, mask)
    got = poisson_statistics(da.from_array(data, chunks=chunks + (10, 10)), mask)
    np.testing.assert_allclose(got.row_sums, ref.row_sums)
    np.testing.assert_allclose(got.col_sums, ref.col_sums)


@pytest.mark.parametrize("chunks", [(12, 8), (5, 3), (4, 8)])
def test_normalised_matrix_brute_force(chunks):
    data, _, _ = synth(2, sy=12, sx=8, k=10)
    mask = beam_mask((10, 10), 2)
    stats = poisson_statistics(data, mask)
    got = normalised_matrix(da.from_array(data, chunks=chunks + (10, 10)), stats, mask).compute()
    x = data.reshape(96, 100).astype(np.float64)
    x[:, mask.ravel()] = 0
    r, c, t = x.sum(1), x.sum(0), x.sum()
    ref = np.zeros_like(x)
    for i in range(96):                       # brute force: Keenan & Kotula x sqrt(T)
        for j in range(100):
            if r[i] * c[j] > 0:
                ref[i, j] = x[i, j] / np.sqrt(r[i] * c[j] / t)
    np.testing.assert_allclose(got, ref[:, ~mask.ravel()], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unit", [1000.0, 1 / 37])
def test_normalisation_takes_the_cameras_units_out(unit):
    """Readings of ``unit`` data units per count, with ``stats.unit`` set, give the
    normalised matrix of the counts; undone, the factors come back in the camera's units."""
    data, _, _ = synth(2, sy=12, sx=8, k=10)
    mask = beam_mask((10, 10), 2)
    stats = poisson_statistics(data, mask)
    scaled = poisson_statistics(data * unit, mask)._replace(unit=unit)
    ref = normalised_matrix(data, stats, mask)
    np.testing.assert_allclose(normalised_matrix(data * unit, scaled, mask), ref, rtol=1e-5,
                               atol=1e-6 * float(ref.max()))
    rng = np.random.default_rng(0)
    w, h = rng.random((96, 3)), rng.random((3, int((~mask).sum())))
    f, l = undo_normalisation(h, w, stats, mask)
    fu, lu = undo_normalisation(h, w, scaled, mask)
    np.testing.assert_allclose(lu, l, rtol=1e-6)
    np.testing.assert_allclose(fu, unit * f, rtol=1e-5, atol=1e-6 * unit * float(f.max()))
    with pytest.raises(ParameterError, match="units per count"):
        normalised_matrix(data, stats._replace(unit=0.0), mask)


def test_normalisation_zero_patterns_and_pixels_no_nan():
    data, _, _ = synth(2, sy=6, sx=6, k=10)
    data[2, 3] = 0                            # an all-zero pattern
    data[:, :, 0, :] = 0                      # a never-lit detector row
    stats = poisson_statistics(data)
    m = normalised_matrix(da.from_array(data, chunks=(4, 4, 10, 10)), stats).compute()
    assert np.all(np.isfinite(m))
    assert np.all(m[2 * 6 + 3] == 0) and np.all(m[:, :10] == 0)


def test_negative_values_clipped_with_warning():
    data, _, _ = synth(1, sy=4, sx=4, k=8)
    data[0, 0, 1, 1] = -3.0
    with pytest.warns(RuntimeWarning, match="1 negative"):
        stats = poisson_statistics(da.from_array(data, chunks=(2, 2, 8, 8)))
    assert stats.n_negative == 1
    m = normalised_matrix(data, stats)
    assert m.min() >= 0 and m[0, 9] == 0


def test_undo_normalisation_back_to_counts():
    rng = np.random.default_rng(1)
    data, _, _ = synth(2, sy=6, sx=5, k=8)
    mask = beam_mask((8, 8), 1)
    stats = poisson_statistics(data, mask)
    w, h = rng.random((30, 3)), rng.random((3, int((~mask).sum())))
    f, l = undo_normalisation(h, w, stats, mask)
    assert f.shape == (3, 8, 8) and l.shape == (3, 6, 5)
    np.testing.assert_allclose(l.reshape(3, -1).max(1), 1.0, rtol=1e-6)
    assert np.all(f[:, mask] == 0)
    x = data.reshape(30, 64).astype(np.float64)
    x[:, mask.ravel()] = 0
    r, c = x.sum(1), x.sum(0)
    counts = (w @ h) * np.sqrt(np.outer(r, c[~mask.ravel()]) / x.sum())
    recon = np.einsum("eyx,eij->yxij", l.astype(np.float64), f.astype(np.float64)).reshape(30, 64)
    np.testing.assert_allclose(recon[:, ~mask.ravel()], counts, rtol=1e-4)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(data=np.zeros((4, 4, 8))), InputError, "4-D"),
    (dict(data=np.zeros((4, 4, 8, 8)), mask=np.zeros((8, 8), int)), ParameterError, "boolean"),
    (dict(data=np.zeros((4, 4, 8, 8)), mask=np.zeros((7, 8), bool)), ParameterError, "detector shape"),
    (dict(data=np.zeros((4, 4, 8, 8)), mask=np.ones((8, 8), bool)), ParameterError, "every"),
    (dict(data=da.zeros((4, 4, 8, 8), chunks=(2, 2, 4, 8))), InputError, "whole patterns"),
])
def test_poisson_statistics_bad(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        poisson_statistics(**kwargs)


# ------------------------------------------------------------------ scree
def test_scree_matches_numpy_svd():
    rng = np.random.default_rng(0)
    x = rng.random((300, 8)) @ rng.random((8, 120)) * 5 + rng.standard_normal((300, 120))
    x = x.astype(np.float32)
    c = x.astype(np.float64) - x.mean(0)
    s = np.linalg.svd(c, compute_uv=False)
    ref = s ** 2 / np.sum(c ** 2)
    for chunks in ((300, 120), (37, 120), (100, 60)):
        res = scree(da.from_array(x, chunks=chunks), 20, n_power_iter=6)
        np.testing.assert_allclose(res.explained_variance_ratio[:12], ref[:12], atol=1e-3)
        np.testing.assert_allclose(res.total_variance, np.sum(c ** 2), rtol=1e-5)
        assert res.shape == (300, 120) and res.noise_edge is not None


def test_scree_noise_floor_is_the_mean_of_independent_draws():
    """Each draw's floor is the top explained variance ratio of one sign-flipped
    centred matrix (randomized_svd with that flip); the floor is their mean."""
    rng = np.random.default_rng(5)
    x = rng.poisson(0.3, (240, 90)).astype(np.float32)  # sparse, heavy-tailed
    d = da.from_array(x, chunks=(50, 90))
    mean = x.astype(np.float64).mean(0)
    total = np.sum((x - mean) ** 2)
    res = scree(d, 15, n_power_iter=2, seed=4, noise_draws=3)
    assert len(res.noise_edges) == 3 and len(set(res.noise_edges)) == 3
    for i, edge in enumerate(res.noise_edges):
        _, s, _ = randomized_svd(d, 15, n_power_iter=2, seed=5 + i, mean=mean,
                                 signflip_seed=4 + 7919 * i)
        np.testing.assert_allclose(edge, s[0] ** 2 / total, rtol=1e-6)
    np.testing.assert_allclose(res.noise_edge, np.mean(res.noise_edges), rtol=1e-12)
    assert scree(d, 15, n_power_iter=2, seed=4, noise_draws=1).noise_edges == res.noise_edges[:1]
    assert scree(d, 15, noise_edge=False).noise_edges == ()
    with pytest.raises(ParameterError, match="noise_draws"):
        scree(d, 15, noise_draws=0)


def test_randomized_svd_top_triplets():
    rng = np.random.default_rng(2)
    x = (rng.random((200, 5)) @ rng.random((5, 80)) + 0.01 * rng.random((200, 80))).astype(np.float32)
    u, s, vt = randomized_svd(da.from_array(x, chunks=(33, 80)), 5, n_power_iter=3)
    ur, sr, vr = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(s, sr[:5], rtol=1e-4)
    np.testing.assert_allclose(np.abs(np.sum(vt * vr[:5], axis=1)), 1, atol=1e-3)


@pytest.mark.parametrize("left_bytes", [1, 3 * 8 * 80 * 15 * 2])
def test_randomized_svds_of_a_wide_matrix_in_chains(monkeypatch, left_bytes):
    """Where the left products of all blocks would exceed _LEFT_BYTES (a wide matrix: a
    large detector's pixels), the blocks are accumulated in chains (here one, and three
    of 3-4 blocks): the same decomposition as one task per block."""
    from spedflow.decompose import _scree
    rng = np.random.default_rng(3)
    x = (rng.random((200, 6)) @ rng.random((6, 80)) + 0.1 * rng.random((200, 80))).astype(np.float32)
    d = da.from_array(x, chunks=(20, 80))
    variants = [(0, None), (1, 0)]
    ref = _scree.randomized_svds(d, 5, variants, n_power_iter=2)
    monkeypatch.setattr(_scree, "_LEFT_BYTES", left_bytes)
    got = _scree.randomized_svds(d, 5, variants, n_power_iter=2)
    for (_, s_ref, v_ref), (_, s_got, v_got) in zip(ref, got):
        np.testing.assert_allclose(s_got, s_ref, rtol=1e-9)
        np.testing.assert_allclose(np.abs(np.sum(v_got * v_ref, axis=1)), 1, atol=1e-6)


def test_signflip_independent_of_chunking():
    x = np.ones((20, 7), np.float32)
    whole = signflip_block(x, 0, 7, seed=3)
    parts = np.concatenate([signflip_block(x[:6], 0, 7, 3), signflip_block(x[6:], 6, 7, 3)])
    np.testing.assert_array_equal(whole, parts)
    assert set(np.unique(whole)) == {-1.0, 1.0} and abs(whole.mean()) < 0.3
    assert not np.array_equal(whole, signflip_block(x, 0, 7, seed=4))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, ">f8", ">f4"])
def test_signflip_is_an_iid_sign_matrix(dtype):
    """Across the 64-column words too: the flipped all-ones matrix has the top singular
    value of an i.i.d. random sign matrix (Bai-Yin: sqrt(N) + sqrt(P)), not that of a
    matrix with repeated or correlated rows or columns; magnitudes and dtype are kept."""
    n, p = 300, 200
    x = (np.arange(n * p).reshape(n, p) % 5 + 1).astype(dtype)
    f = signflip_block(x, 0, p, seed=1)
    assert f.dtype == x.dtype.newbyteorder("=")  # (big-endian input comes back native)
    np.testing.assert_array_equal(np.abs(f), x)
    signs = np.sign(f).astype(np.float64)
    parts = np.concatenate([signflip_block(x[:97], 0, p, 1), signflip_block(x[97:], 97, p, 1)])
    np.testing.assert_array_equal(parts, f)
    assert abs(signs.mean()) < 4 / np.sqrt(n * p)
    top = np.linalg.svd(signs, compute_uv=False)[0]
    assert top < 1.1 * (np.sqrt(n) + np.sqrt(p)), top
    for a, b in ((signs[:, :-1], signs[:, 1:]), (signs[:-1], signs[1:]), (signs[:, :-64], signs[:, 64:])):
        assert abs(np.mean(a * b)) < 4 / np.sqrt(a.size)


@pytest.mark.parametrize("rank", [3, 6, 12])
def test_choose_n_components_finds_planted_rank(rank):
    """The signflip floor is one random draw, so a single data set can miss by more
    than the tolerance; the median over three sets must not."""
    found = []
    for seed in range(rank, rank + 3):
        data, _, _ = synth(rank, seed=seed)
        d = da.from_array(data, chunks=(8, 32, 24, 24))
        stats = poisson_statistics(d)
        res = scree(normalised_matrix(d, stats), 30)
        e, reason = choose_n_components(res.explained_variance_ratio, noise_edge=res.noise_edge)
        assert "signflip" in reason and e <= rank, reason  # noise is not counted as signal
        found.append(e)
    assert abs(np.median(found) - rank) <= max(1, 0.2 * rank), found


def test_choose_n_components_other_criteria():
    # pure noise spectrum of an n x p Gaussian matrix plus 4 strong components
    rng = np.random.default_rng(0)
    n, p = 400, 150
    x = rng.standard_normal((n, 4)) @ rng.standard_normal((4, p)) * 0.8 + rng.standard_normal((n, p))
    c = x - x.mean(0)
    s = np.linalg.svd(c, compute_uv=False)
    evr = s ** 2 / np.sum(c ** 2)
    assert marchenko_pastur_count(evr, (n, p))[0] == 4
    e, reason = choose_n_components(evr[:40], shape=(n, p))
    assert e == 4 and "Marchenko" in reason
    e, reason = choose_n_components(evr[:40])
    assert abs(e - 4) <= 1 and "elbow" in reason
    e, reason = choose_n_components(evr[:40], shape=(n, p), max_components=2)
    assert e == 2 and "capped" in reason
    e, reason = choose_n_components(evr[:40], noise_edge=1.0)
    assert e == 1 and "no signal" in reason


@pytest.mark.parametrize("kwargs, match", [
    (dict(evr=[0.5]), "evr"),
    (dict(evr=[0.5, np.nan]), "evr"),
    (dict(evr=[0.5, 0.1], max_components=0), "max_components"),
    (dict(evr=[0.5, 0.1], shape=(1, 5)), "shape"),
    (dict(evr=[0.5, 0.1], noise_edge=-1), "noise_edge"),
])
def test_choose_n_components_bad(kwargs, match):
    with pytest.raises(ParameterError, match=match):
        choose_n_components(**kwargs)


def test_scree_bad_input():
    with pytest.raises(InputError, match="2-D"):
        scree(np.zeros((4, 4, 4)))
    with pytest.raises(InputError, match="no variance"):
        scree(np.ones((10, 6), np.float32), 3)
    with pytest.raises(ParameterError, match="n_components"):
        scree(np.ones((10, 6), np.float32), 0)


# ------------------------------------------------------------------ params
@pytest.mark.parametrize("cls, kwargs, match", [
    (NMFParams, dict(n_components=0), "n_components"),
    (NMFParams, dict(n_components=40), "max_components"),
    (NMFParams, dict(tol=0), "tol"),
    (NMFParams, dict(max_epochs=0), "max_epochs"),
    (NMFParams, dict(init="svd"), "init"),
    (NMFParams, dict(beam_mask_radius=-2), "beam_mask_radius"),
    (NMFParams, dict(min_coherence=-0.1), "min_coherence"),
    (NMFParams, dict(min_coherence=float("nan")), "min_coherence"),
    (NMFParams, dict(bogus=1), "unknown parameter"),
    (ScreeParams, dict(n_components=0), "n_components"),
    (ScreeParams, dict(n_power_iter=-1), "n_power_iter"),
])
def test_params_bad(cls, kwargs, match):
    with pytest.raises(ParameterError, match=match):
        params_from_dict(cls, kwargs)


def test_params_defaults_valid():
    assert NMFParams().n_components is None and ScreeParams().n_components >= NMFParams().max_components


# ------------------------------------------------------------------ background components
def _factors(k=40, seed=0):
    yy, xx = np.mgrid[:k, :k]
    r = np.hypot(yy - k // 2, xx - k // 2)
    rng = np.random.default_rng(seed)
    ring = np.exp(-(r - 12) ** 2 / 8)
    glare = np.exp(-r / 5)
    spots = sum(np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 2) for y, x in rng.uniform(4, k - 4, (6, 2)))
    # Friedel-symmetric spot pattern (a zone axis) is still far from circular
    zone = sum(np.exp(-((yy - k // 2 - g[0]) ** 2 + (xx - k // 2 - g[1]) ** 2) / 2)
               for g in [(8, 0), (-8, 0), (0, 8), (0, -8), (8, 8), (-8, -8), (8, -8), (-8, 8)])
    return np.array([ring, glare, spots, zone, spots + 0.3 * ring])


def test_spot_fraction_symmetric_vs_spots():
    f = _factors()
    frac = spot_fraction(f, beam_mask((40, 40), 3))
    assert frac[0] < 0.05 and frac[1] < 0.05
    # a zone axis puts 4 spots on a small ring: less asymmetric, still far above 0.25
    assert frac[2] > 0.8 and frac[3] > 0.5 and frac[4] > 0.25
    noisy = np.random.default_rng(1).poisson(50 * f) / 50
    frac_noisy = spot_fraction(noisy)
    assert frac_noisy[0] < 0.25 and frac_noisy[1] < 0.25 and frac_noisy[2] > 0.8


def test_classify_components():
    f = _factors()
    sy = sx = 20
    Y, X = np.mgrid[:sy, :sx]
    small = (np.hypot(Y - 5, X - 5) < 4).astype(float)
    everywhere = np.ones((sy, sx)) * 0.5 + 0.1 * np.random.default_rng(0).random((sy, sx))
    loads = np.array([everywhere, everywhere, small, small, small])
    out = classify_components(f, loads, beam_radius=1.5)
    assert [k for k, _ in out] == [False, False, True, True, True]
    assert "circularly symmetric" in out[0][1] and "crystal" in out[2][1]
    # weak spots everywhere = textured background; a zero component = empty
    weak = 0.5 * f[0] / np.sqrt(np.sum(f[0] ** 2)) + 0.6 * f[2] / np.sqrt(np.sum(f[2] ** 2))
    out = classify_components(np.array([weak, weak, np.zeros_like(weak)]),
                              np.array([everywhere, small, small]), beam_radius=1.5)
    assert [k for k, _ in out] == [False, True, False]
    assert "whole scan" in out[0][1] and "empty" in out[2][1]


def test_classify_components_keeps_large_discs_with_film():
    """Six large discs (sigma 2.5 px) on one ring keep only ~0.6 of their energy out of
    the ring's average; with the film ring NMF mixes into a crystal's component the
    fraction drops to ~0.19: a crystal (the old threshold 0.25 set it aside). The film
    ring and the beam halo alone, with counting noise, stay far below the threshold."""
    k = 64
    yy, xx = np.mgrid[:k, :k]
    c = k // 2
    r = np.hypot(yy - c, xx - c)
    discs = sum(np.exp(-((yy - c - 20 * np.sin(a)) ** 2 + (xx - c - 20 * np.cos(a)) ** 2) / 12.5)
                for a in np.arange(6) * np.pi / 3)
    ring = 0.4 * np.exp(-(r - 22) ** 2 / 18)
    halo = 1.2 * np.exp(-r / 8)
    factors = np.random.default_rng(3).poisson(200 * np.array([discs + ring, ring, halo])) / 200
    Y, X = np.mgrid[:20, :20]
    small = (np.hypot(Y - 5, X - 5) < 4).astype(float)
    mask = beam_mask((k, k), beam_radius=3)
    frac = spot_fraction(factors, mask)
    assert 0.15 < frac[0] < 0.25 and frac[1] < 0.05 and frac[2] < 0.05
    out = classify_components(factors, np.array([small] * 3), beam_radius=3)
    assert [keep for keep, _ in out] == [True, False, False]
    assert NMFParams().min_spot_fraction == 0.15


def _pedestal_loadings(sy=40, sx=40, seed=0):
    """Loading maps: a crystal on a pedestal, the film under it, the film with a bright spot."""
    rng = np.random.default_rng(seed)
    Y, X = np.mgrid[:sy, :sx]
    film = X < 0.7 * sx                                          # vacuum on the right
    disc = np.hypot(Y - 12, X - 12) < 5                          # ~5 % of the scan
    # NMF leaves a crystal component a pedestal (here 12 % of its peak) where the film is
    crystal = np.where(disc, 1.0, 0.12 * film) + 0.01 * rng.random((sy, sx))
    support = film * (0.5 + 0.1 * rng.random((sy, sx)))
    # a region brighter than the film (here by half its level) leaves the film counted
    spotted = support + np.where(np.hypot(Y - 30, X - 8) < 3, 0.3, 0.0)
    return np.array([crystal, support, spotted]), disc.mean(), film.mean()


def test_loading_coverage_above_pedestal():
    loads, disc, film = _pedestal_loadings()
    cov = loading_coverage(loads)
    # the crystal counts, not its pedestal (above 10 % of its maximum: the whole film)
    assert cov[0] == pytest.approx(disc, abs=0.01)
    assert np.mean(loads[0] > 0.1 * loads[0].max()) > 0.6
    # a component present over most of the scan still covers it, bright spot or not
    assert cov[1] == pytest.approx(film, abs=0.01) and cov[2] == pytest.approx(film, abs=0.01)
    assert loading_coverage(np.ones((1, 4, 4)))[0] == 1 and loading_coverage(np.zeros((1, 4, 4)))[0] == 0


def test_classify_components_crystal_on_pedestal():
    """A crystal with clear spots and a 12 % pedestal is kept; support is set aside."""
    f = _factors()
    loads, _, _ = _pedestal_loadings()
    weak = 0.5 * f[0] / np.sqrt(np.sum(f[0] ** 2)) + 0.6 * f[2] / np.sqrt(np.sum(f[2] ** 2))
    mixture = f[2] + 0.2 * f[0]  # spots with the film's ring: spot fraction ~0.53
    # crystal on a pedestal; spots mixed with the film spread over it; textured film
    out = classify_components(np.array([f[4], mixture, weak]), loads[[0, 1, 1]], beam_radius=1.5,
                              max_coverage=NMFParams().max_coverage)
    assert [k for k, _ in out] == [True, False, False]
    assert "crystal" in out[0][1] and "support" in out[1][1] and "textured" in out[2][1]


@pytest.mark.parametrize("ring, kept", [(0.0, True), (0.1, True), (0.15, False), (0.2, False)])
def test_classify_components_large_crystal(ring, kept):
    """Spots over most of the scan are a crystal larger than ``max_coverage`` when they
    hold at least ``crystal_spot_fraction`` (2/3) of the pattern's energy (pure spots:
    0.92; with a film ring of 0.1 of their height: 0.75); with more of the ring mixed in
    (0.64, 0.53) they are support, as they all are with ``crystal_spot_fraction`` = 1."""
    f = _factors()
    loads, _, _ = _pedestal_loadings()
    pattern = f[2] + ring * f[0]
    assert bool(spot_fraction(pattern[None], beam_mask((40, 40), 1.5))[0]
                >= NMFParams().crystal_spot_fraction) is kept
    out = classify_components(pattern[None], loads[[1]], beam_radius=1.5,
                              max_coverage=NMFParams().max_coverage)
    assert loading_coverage(loads[[1]])[0] > 0.6 and bool(out[0][0]) is kept
    assert ("larger than max_coverage" in out[0][1]) is kept
    strict = classify_components(pattern[None], loads[[1]], beam_radius=1.5,
                                 max_coverage=NMFParams().max_coverage, crystal_spot_fraction=1.0)
    assert strict[0][0] is False and "support" in strict[0][1]


def _moran_brute_force(w, region):
    """Lag-1 autocorrelation of a 2-D map over ``region``, by a loop over every pair of
    4-neighbours inside it."""
    x = w[region]
    mu, var = x.mean(), np.mean((x - x.mean()) ** 2)
    num, pairs = 0.0, 0
    for y in range(w.shape[0]):
        for xx in range(w.shape[1]):
            for dy, dx in ((0, 1), (1, 0)):
                y2, x2 = y + dy, xx + dx
                if y2 < w.shape[0] and x2 < w.shape[1] and region[y, xx] and region[y2, x2]:
                    num += (w[y, xx] - mu) * (w[y2, x2] - mu)
                    pairs += 1
    return num / pairs / var


def _strong_part(w, pedestal):
    from scipy import ndimage as ndi
    s = ndi.gaussian_filter(w, 1.0, mode="nearest")
    return s > min(pedestal + (s.max() - pedestal) / 2, s.max() / 2)


def test_spatial_coherence_is_autocorrelation_where_the_map_is_strong():
    """Brute force: the strong part of the map clipped at 1.5x its level, widened by 2;
    there the autocorrelation over that of digital discs of its size (+-20 %)."""
    from scipy import ndimage as ndi
    rng = np.random.default_rng(7)
    Y, X = np.mgrid[:17, :21]
    maps = [np.exp(-((Y - 8) ** 2 + (X - 9) ** 2) / 18.0) + rng.gamma(0.5, 0.05, Y.shape),
            rng.gamma(0.5, size=Y.shape)]
    got = spatial_coherence(np.array(maps))
    r = np.hypot(*np.mgrid[-15:16, -15:16])
    rank = np.argsort(r.ravel(), kind="stable")

    def disc_moran(k):
        disc = np.zeros(r.size, bool)
        disc[rank[:k]] = True
        disc = disc.reshape(r.shape)
        return _moran_brute_force(disc * 1.0, ndi.binary_dilation(disc, iterations=2))

    for w, g in zip(maps, got):
        p = np.median(w)
        level = np.percentile(w[_strong_part(w, p)], 90)
        w = np.minimum(w, p + 1.5 * (level - p))
        core = _strong_part(w, p)
        n = min(max(int(core.sum()), 9), 400)
        ref = np.mean([disc_moran(k) for k in range(max(9, int(0.8 * n)), int(1.2 * n) + 1)])
        region = ndi.binary_dilation(core, iterations=2)
        assert g == pytest.approx(_moran_brute_force(w, region) / ref, rel=1e-9)
    assert got[0] > 0.9 and got[1] < 0.3
    assert (spatial_coherence(np.full((1, 6, 6), 2.0)) == 1).all()  # nothing to judge
    assert spatial_coherence(np.zeros((0, 4, 4))).shape == (0,)
    with pytest.raises(ParameterError, match="margin"):
        spatial_coherence(np.array(maps), margin=1)


@pytest.mark.parametrize("radius", [3, 6, 12])
def test_spatial_coherence_of_crystals_noise_and_their_mixture(radius):
    """~1 for a flat or domed crystal of any size and for a rod two pixels wide, 0 or
    less for white noise (sparse or dense); a crystal under noise of its own variance
    where it is lies between, around the default threshold (0.5) or below it."""
    Y, X = np.mgrid[:64, :64]
    r = np.hypot(Y - 30, X - 33)
    flat = (r < radius).astype(float)
    dome = np.sqrt(np.clip(radius ** 2 - r ** 2, 0, None))
    rng = np.random.default_rng(radius)
    noise = rng.exponential(size=(64, 64)) * (rng.random((64, 64)) < 0.05)  # sparse specks
    dense = rng.random((64, 64))
    rod = ((abs(Y - 20) < 1.1) & (abs(X - 32) < 4 * radius)).astype(float)  # 2 px wide
    c = spatial_coherence(np.array([flat, dome, noise, dense, rod]))
    assert 0.9 < c[0] < 1.1 and 0.9 < c[1] < 1.3  # a dome's smooth profile: above a flat disc
    assert c[2] < 0.1 and c[3] < 0.1
    assert c[4] > 0.8
    near = r < radius + 2  # the strong part and its rim: the noise there is what counts
    mixed = [flat + np.where(near, np.random.default_rng(s).normal(0, flat[near].std(), flat.shape), 0)
             for s in range(9)]
    m = spatial_coherence(np.array(mixed))
    assert 0.1 < np.median(m) < 0.6 and m.max() < 0.9, m


def test_spatial_coherence_of_a_crystal_filling_the_scan_or_with_a_hot_position():
    """A crystal covering most of the scan (its level is then the map's median) and one
    with a position at 5x its height are still crystals."""
    rng = np.random.default_rng(3)
    Y, X = np.mgrid[:48, :48]
    r = np.hypot(Y - 24, X - 24)
    filling = [np.clip((r < np.sqrt(f * 48 * 48 / np.pi)) + rng.normal(0, 0.02, r.shape), 0, None)
               for f in (0.54, 0.66, 0.87)]
    hot = np.clip((r < 3.5) + rng.normal(0, 0.05, r.shape), 0, None)
    hot[24, 24] = 5.0
    assert (spatial_coherence(np.array(filling + [hot])) > 0.75).all()


@pytest.mark.parametrize("sd", [0.1, 0.2])
def test_spatial_coherence_does_not_depend_on_the_scan_size(sd):
    """The same crystal with the same noise everywhere measures the same on a 48x48 and
    a 384x384 scan (over the whole map, the noise of the larger scan outweighed it)."""
    rng = np.random.default_rng(11)
    got = []
    for n in (48, 384):
        Y, X = np.mgrid[:n, :n]
        crystal = (np.hypot(Y - n / 2, X - n / 2) < 6).astype(float)
        got.append(spatial_coherence(np.clip(crystal + rng.normal(0, sd, crystal.shape), 0, None)[None])[0])
    assert got[0] > 0.75 and got[1] > 0.75 and abs(got[0] - got[1]) < 0.1, got


def test_classify_components_bad():
    with pytest.raises(ParameterError, match="same E"):
        classify_components(np.zeros((2, 8, 8)), np.zeros((3, 4, 4)))
    with pytest.raises(ParameterError, match="min_spot_fraction"):
        classify_components(np.zeros((2, 8, 8)), np.zeros((2, 4, 4)), min_spot_fraction=2)
    with pytest.raises(ParameterError, match="mask"):
        classify_components(np.zeros((2, 8, 8)), np.zeros((2, 4, 4)), mask=np.zeros((4, 4), bool))


def test_randomized_svds_share_passes_and_equal_separate_svds():
    """The data and its sign-flipped null in one set of passes give exactly what two
    separate randomised SVDs give."""
    import dask.array as da
    from spedflow.decompose import randomized_svd, randomized_svds
    rng = np.random.default_rng(8)
    x = (rng.random((300, 4)) @ rng.random((4, 120)) + rng.normal(0, 0.05, (300, 120)))
    m = da.from_array(x.astype(np.float32), chunks=(70, 120))
    mean = x.mean(axis=0)
    both = randomized_svds(m, 6, [(0, None), (1, 0)], n_power_iter=2, mean=mean)
    for (seed, flip), (u, s, vt) in zip([(0, None), (1, 0)], both):
        u1, s1, vt1 = randomized_svd(m, 6, n_power_iter=2, seed=seed, mean=mean,
                                     signflip_seed=flip)
        np.testing.assert_array_equal(s, s1)
        np.testing.assert_array_equal(u, u1)
        np.testing.assert_array_equal(vt, vt1)
    # and the data's spectrum is the exact one of the centred matrix
    exact = np.linalg.svd(x - mean, compute_uv=False)[:4]
    np.testing.assert_allclose(both[0][1][:4], exact, rtol=1e-4)
