"""Out-of-core NMF: kernels, planted-factor recovery, sklearn loss, determinism, chunking."""

import dask
import dask.array as da
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.decomposition import NMF

from spedflow.decompose import (NMFParams, hals_update_factors, merge_nmf_stats, nmf,
                                nmf_block_update, nmf_minibatch, nndsvda)
from spedflow.errors import InputError, ParameterError


@pytest.fixture(autouse=True)
def _sync():
    with dask.config.set(scheduler="synchronous"):
        yield


def planted(n=400, p=150, e=4, seed=0, noise=0.02):
    """Loadings with pure rows for each component (separable) x sparse spot-like factors."""
    rng = np.random.default_rng(seed)
    w = rng.random((n, e)) ** 3
    w[: e * 10] = np.repeat(np.eye(e), 10, axis=0)
    h = np.zeros((e, p))
    for k in range(e):
        h[k, rng.choice(p, 12, replace=False)] = rng.uniform(1, 3, 12)
    x = w @ h + noise * rng.random((n, p))
    return x.astype(np.float32), w, h


def _match_corr(a, b):
    """Mean correlation of rows of a with rows of b after optimal matching."""
    c = np.corrcoef(a, b)[: len(a), len(a):]
    r, col = linear_sum_assignment(-c)
    return c[r, col]


def test_block_update_and_merge():
    rng = np.random.default_rng(0)
    x = rng.random((30, 12)).astype(np.float32)
    h = rng.random((3, 12))
    w0 = rng.random((30, 3))
    w, (a, b, s) = nmf_block_update(x, w0, h, h @ h.T, sweeps=50)
    # many sweeps converge to the non-negative least-squares loadings (scipy nnls per row)
    from scipy.optimize import nnls
    ref = np.array([nnls(h.T, xi.astype(np.float64))[0] for xi in x])
    np.testing.assert_allclose(w, ref, atol=1e-4)
    np.testing.assert_allclose(a, w.T @ x, rtol=1e-5)
    np.testing.assert_allclose(b, w.T @ w)
    np.testing.assert_allclose(s, np.sum(x.astype(np.float64) ** 2))
    parts = [(rng.random((3, 12)), rng.random((3, 3)), float(rng.random())) for _ in range(3)]
    left = merge_nmf_stats(merge_nmf_stats(parts[0], parts[1]), parts[2])
    right = merge_nmf_stats(parts[0], merge_nmf_stats(parts[1], parts[2]))
    flat = merge_nmf_stats(*parts)
    for got in (left, right):
        for g, f in zip(got, flat):
            np.testing.assert_allclose(g, f)


def test_hals_factor_update_decreases_loss():
    rng = np.random.default_rng(1)
    x, w, _ = planted()
    h = rng.random((4, 150))
    loss0 = np.sum((x - w @ h) ** 2)
    h1 = hals_update_factors(h, w.T @ x, w.T @ w, sweeps=3)
    assert h1.min() >= 0 and np.sum((x - w @ h1) ** 2) < loss0


def test_nndsvda_nonnegative_and_exact_for_rank1():
    rng = np.random.default_rng(0)
    x = np.outer(rng.random(20), rng.random(9))
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    w, h = nndsvda(u[:, :1], s[:1], vt[:1], x.mean())
    np.testing.assert_allclose(w @ h, x, rtol=1e-8)


def test_nmf_recovers_planted_factors():
    x, w_true, h_true = planted()
    h, w, info = nmf(da.from_array(x, chunks=(64, 150)), 4, NMFParams(max_epochs=500, tol=1e-6))
    assert h.shape == (4, 150) and w.shape == (400, 4) and h.min() >= 0 and w.min() >= 0
    assert np.all(_match_corr(h, h_true) > 0.95)
    assert np.all(_match_corr(w.T, w_true.T) > 0.95)
    # loss from the summed statistics: float32 products, cancellation against ||X||^2
    assert info["loss"] == pytest.approx(np.sum((x.astype(np.float64) - w @ h) ** 2), rel=1e-3)
    assert info["relative_loss"] < 1e-3


def _poisson_matrix(seed=3):
    rng = np.random.default_rng(seed)
    _, w, h = planted(n=500, p=120, e=5, seed=seed)
    return rng.poisson(20 * w @ h + 0.5).astype(np.float32)


@pytest.mark.parametrize("e", [3, 5])
def test_nmf_loss_within_2_percent_of_sklearn(e):
    x = _poisson_matrix()
    sk = NMF(e, init="nndsvda", solver="cd", max_iter=2000, tol=1e-6)
    wsk = sk.fit_transform(x.astype(np.float64))
    loss_sk = np.sum((x - wsk @ sk.components_) ** 2)
    h, w, info = nmf(da.from_array(x, chunks=(77, 120)), e)
    loss = np.sum((x.astype(np.float64) - w @ h) ** 2)
    assert loss <= 1.02 * loss_sk
    assert info["converged"]


def test_nmf_deterministic_for_seed_and_random_init():
    x = _poisson_matrix()
    d = da.from_array(x, chunks=(100, 120))
    p = NMFParams(init="random", seed=5, max_epochs=50)
    h1, w1, _ = nmf(d, 4, p)
    h2, w2, _ = nmf(d, 4, p)
    np.testing.assert_array_equal(h1, h2)
    np.testing.assert_array_equal(w1, w2)
    h3, _, _ = nmf(d, 4, NMFParams(init="random", seed=6, max_epochs=50))
    assert not np.array_equal(h1, h3)


@pytest.mark.parametrize("chunks", [(500, 120), (33, 120), (250, 50), (37, 120)])
def test_nmf_lazy_equals_in_memory(chunks):
    x = _poisson_matrix()
    params = NMFParams(max_epochs=30, tol=1e-9)
    h_ref, w_ref, info_ref = nmf(x, 4, params)
    h, w, info = nmf(da.from_array(x, chunks=chunks), 4, params)
    np.testing.assert_allclose(info["loss"], info_ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(w @ h, w_ref @ h_ref, rtol=1e-3, atol=1e-3 * float(x.max()))


def test_nmf_threaded_scheduler_matches():
    x = _poisson_matrix()
    d = da.from_array(x, chunks=(64, 120))
    params = NMFParams(max_epochs=20)
    h1, w1, _ = nmf(d, 3, params)
    with dask.config.set(scheduler="threads"):
        h2, w2, _ = nmf(d, 3, params)
    np.testing.assert_allclose(h1, h2, rtol=1e-6)


def test_nmf_minibatch_runs():
    x = _poisson_matrix()
    h, w, info = nmf_minibatch(da.from_array(x, chunks=(100, 120)), 3, batch_epochs=3)
    assert h.shape == (3, 120) and w.shape == (500, 3) and info["loss"] > 0


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((np.zeros((5, 4, 3)), 2), {}, InputError, "2-D"),
    ((-np.ones((6, 5), np.float32), 2), {}, InputError, "non-negative"),
    ((np.ones((6, 5), np.float32), 0), {}, ParameterError, "n_components"),
    ((np.ones((6, 5), np.float32), 6), {}, ParameterError, "n_components"),
    ((np.ones((6, 5), np.float32), 2.5), {}, ParameterError, "n_components"),
    ((np.ones((6, 5), np.float32), 2), dict(params={"tol": 1}), ParameterError, "NMFParams"),
])
def test_nmf_bad(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        nmf(*args, **kwargs)


def test_region_means_equal_the_mean_of_the_data_over_each_region():
    """The mean pattern over a union of segments, from one tree-summed pass over a
    block-major matrix of scaled rows: equal to the mean of the unscaled data over the
    region's positions (brute force), for any blocking and row order."""
    from spedflow.workflows.nmf import region_means
    rng = np.random.default_rng(3)
    n, shape = 60, (6, 7)
    cut = np.zeros(shape, bool)
    cut[3, 3] = cut[0, :2] = True
    data = rng.poisson(5.0, (n,) + shape).astype(np.float64)
    a, b = rng.uniform(0.5, 2, n), rng.uniform(0.5, 2, shape)
    order = rng.permutation(n)  # the matrix's rows, as raster indices
    rows = data[order][:, ~cut] / a[order, None] / b[~cut][None]
    sup = rng.random((4, n)) < 0.3
    sup[:, :3] = False  # positions no segment covers
    for chunks in (7, 25, n):
        pattern = region_means(da.from_array(rows.astype(np.float32), chunks=(chunks, -1)), order,
                               a, b[~cut], cut, sup)
        for region in (sup[0], sup[1] | sup[3], sup.any(axis=0)):
            want = np.where(cut, 0.0, data[region].mean(axis=0))
            np.testing.assert_allclose(pattern(region), want, rtol=1e-5)
