"""The NMF residual search for weak crystals (spedflow.decompose._residual)."""

import numpy as np
import pytest

from spedflow.decompose import ResidualParams
from spedflow.decompose import _residual as R
from spedflow.errors import ParameterError


def test_params_validated():
    ResidualParams()
    with pytest.raises(ParameterError):
        ResidualParams(window=4)
    with pytest.raises(ParameterError):
        ResidualParams(alpha=0)


@pytest.mark.parametrize("k", [1, 3, 5, 15])
def test_box_sum_matches_loop(k):
    v = np.random.default_rng(k).random((17, 16, 2)).astype(np.float32)
    s = R._box_sum(v, k)
    ref = np.array([[v[i:i + k, j:j + k].astype(np.float64).sum(axis=(0, 1)) for j in range(16 - k + 1)]
                    for i in range(17 - k + 1)])
    assert s.shape == ref.shape and s.dtype == np.float64
    np.testing.assert_allclose(s, ref, rtol=1e-12)
    assert R._box_sum(v[:k - 1 or 0], k).shape[0] == 0


def test_merge_screens_is_associative():
    rng = np.random.default_rng(1)
    parts = [{"score": rng.normal(size=5), "rr": np.array(rng.random()), "vv": np.array(rng.random())}
             for _ in range(3)]
    a = R.merge_screens(R.merge_screens(parts[0], parts[1]), parts[2])
    b = R.merge_screens(parts[0], R.merge_screens(parts[1], parts[2]))
    assert np.allclose(a["score"], b["score"]) and np.isclose(a["rr"], b["rr"]) and np.isclose(a["vv"], b["vv"])


def _weak_scene(seed=0, amp=3.0):
    """Poisson data: a flat background model, plus a weak 2-spot crystal on a 6x6 patch."""
    rng = np.random.default_rng(seed)
    ny, nx, p = 32, 32, 400
    mean = np.full(p, 4.0)
    signal = np.zeros((ny, nx, p))
    spots = [50, 51, 250, 251]
    signal[10:16, 12:18][..., spots] = amp
    counts = rng.poisson(mean + signal).astype(np.float64)
    # the "global model": background only, in normalised units (a = 1, b = sqrt(mean))
    b = np.sqrt(mean)
    x = counts / b
    w = np.ones((ny, nx, 1))
    h = (mean / b)[None]
    return x, w, h, np.ones((ny, nx)), b, signal


def test_screen_finds_weak_spots_and_nothing_in_noise():
    x, w, h, a, b, signal = _weak_scene()
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    out = R.residual_screen_block(xp, np.pad(w, ((1, 1), (1, 1), (0, 0))), h, np.pad(a, 1), b,
                                  window=3, min_counts=10)
    c = out["rr"] / out["vv"]
    assert 0.8 < c < 1.2                         # Poisson counts: unit variance per count
    z = out["score"] / np.sqrt(c)
    thr = R.screen_threshold(x.shape[0] * x.shape[1] * x.shape[2], 0.01)
    found = set(np.flatnonzero(z > thr).tolist())
    assert {50, 51, 250, 251} <= found and len(found) <= 6   # normal approx. of a Poisson tail
    x0, *_ = _weak_scene(seed=1, amp=0.0)
    out0 = R.residual_screen_block(np.pad(x0, ((1, 1), (1, 1), (0, 0))),
                                   np.pad(w, ((1, 1), (1, 1), (0, 0))), h, np.pad(a, 1), b,
                                   window=3, min_counts=10)
    assert not (out0["score"] / np.sqrt(out0["rr"] / out0["vv"]) > thr).any()


def test_screen_by_pixel_slices_equals_one_pass(monkeypatch):
    """The screen works on slices of detector pixels to bound its temporaries; the
    statistics do not depend on the slice size."""
    x, w, h, a, b, _ = _weak_scene()
    args = (np.pad(x, ((1, 1), (1, 1), (0, 0))), np.pad(w, ((1, 1), (1, 1), (0, 0))), h,
            np.pad(a, 1), b)
    monkeypatch.setattr(R, "_SCREEN_SLICE_BYTES", 2**40)
    whole = R.residual_screen_block(*args, window=3, min_counts=10)
    monkeypatch.setattr(R, "_SCREEN_SLICE_BYTES", 1)  # 64-pixel slices
    sliced = R.residual_screen_block(*args, window=3, min_counts=10)
    np.testing.assert_array_equal(sliced["score"], whole["score"])
    np.testing.assert_allclose([sliced["rr"], sliced["vv"]], [whole["rr"], whole["vv"]], rtol=1e-12)


def test_rank_nmf_and_loadings_recover_the_crystal():
    x, w, h, a, b, signal = _weak_scene(amp=2.0)
    ny, nx, p = x.shape
    sel = np.array([50, 51, 250, 251, 7, 300])     # the spots and two noise pixels
    rs = R.residual_rows_block(x, w, h, sel).astype(np.float64)
    groups = np.array([0, 0, 1, 1, 2, 3])          # detector clusters: two spots, two singles
    k, s, null = R.shift_null_rank(rs, (ny, nx), groups)
    assert k == 1
    w2, h2 = R.residual_nmf(rs, k)
    assert h2[0, :4].min() > 2 * np.abs(h2[0, 4:]).max()
    load = R.significant_loadings(rs, h2, (ny, nx), 3, 0.01).reshape(ny, nx)
    truth = signal[..., 50] > 0
    on = load > 0
    assert (on & truth).sum() / (on | truth).sum() > 0.6


def test_pure_noise_gives_rank_zero():
    x, w, h, a, b, _ = _weak_scene(seed=3, amp=0.0)
    rs = R.residual_rows_block(x, w, h, np.arange(0, 400, 40)).astype(np.float64)
    k, _, _ = R.shift_null_rank(rs, x.shape[:2], np.arange(10))
    assert k == 0


def test_friedel_pair_keeps_a_crystal_and_rejects_one_sided_spots():
    # four clusters of two pixels on a 33 x 33 detector, beam at (16, 16)
    coords = np.array([[10, 12], [10, 13], [22, 20], [22, 19], [5, 30], [5, 29], [28, 8], [27, 8]], float)
    clusters = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    v = np.full(8, 4.0)
    pair = np.array([9, 9, 9, 9, 0, 0, 0, 0.0])           # g and -g, z = 18/sqrt(8) = 6.4
    assert R.has_friedel_pair(pair, v, clusters, coords, (16, 16), 4.0, 1.0)
    one_sided = np.array([9, 9, 0, 0, 9, 9, 9, 9.0])       # three spots, no two opposite
    assert not R.has_friedel_pair(one_sided, v, clusters, coords, (16, 16), 4.0, 1.0)
    weak_mate = np.array([9, 9, 2, 2, 0, 0, 0, 0.0])       # the mate is not significant
    assert not R.has_friedel_pair(weak_mate, v, clusters, coords, (16, 16), 4.0, 1.0)
    labels, z = R.cluster_z(pair, v, clusters)
    assert labels.tolist() == [0, 1, 2, 3] and np.isclose(z[0], 18 / np.sqrt(8))


def test_correction_of_a_crystal_versus_a_weak_crystal_inside_it():
    host_load = np.zeros((20, 20))
    host_load[2:18, 2:18] = 1.0
    inside = np.zeros((20, 20))
    inside[6:12, 6:12] = 0.3
    host_pat = np.array([1.0, 0.8, 0.5, 0.0, 0.0, 0.01])  # host's spots: the first three kept pixels
    fit, overlap, spots = R.is_correction(inside, np.array([0.5, 0.4, 0, 0, 0, 0.1]), host_load, host_pat)
    assert fit and overlap == 1.0 and spots > 0.8        # on the host's spots: a misfit of it
    fit, _, spots = R.is_correction(inside, np.array([0, 0, 0.1, 2.0, 2.0, 0]), host_load, host_pat)
    assert not fit and spots < 0.1                       # its own spots: a weak crystal
    outside = np.zeros((20, 20))
    outside[0:2, :] = 1.0
    assert not R.is_correction(outside, np.array([0.5, 0.4, 0, 0, 0, 0]), host_load, host_pat)[0]


def test_residual_crystal_where_the_host_reaches_without_a_segment_is_kept():
    """A global component can reach, weakly, over a second crystal that shares some of
    its spots; the residual search's component for that crystal is kept (it is no
    correction: the host has no segment there). Inside the host's segment, on its
    spots, a residual component is still a correction."""
    from spedflow.workflows.nmf import NMFConfig, _set_aside_corrections
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    second = (yy - 30) ** 2 + (xx - 30) ** 2 <= 16
    host = np.zeros((40, 40))
    host[4:20, 4:20] = 1.0
    host = (host + 0.15 * second + rng.normal(0, 0.03, host.shape)).clip(0)  # 5 sigma: no segment
    inside = np.zeros((40, 40))
    inside[8:14, 8:14] = 0.3
    h = np.array([[1.0, 0.8, 0.5, 0.0, 0.0, 0.01]])      # host's spots: the first three pixels
    on_host_spots = np.array([[0.5, 0.4, 0.3, 0, 0, 0]])
    w_raster = np.column_stack([host.ravel(), second.ravel() * 0.5, inside.ravel()])
    sel = np.arange(6)
    keep, reasons = np.ones(3, bool), ["kept"] * 3
    _set_aside_corrections(keep, reasons, 1, h, w_raster, sel,
                           np.vstack([on_host_spots, on_host_spots]), host[None], NMFConfig().watershed)
    assert keep.tolist() == [True, True, False]
    assert "correction" in reasons[2]
    # the old rule (the host present above 10 % of its maximum) calls both corrections
    assert R.is_correction(w_raster[:, 1], on_host_spots[0], host.ravel(), h[0])[0]


def test_nmf_refuses_a_detector_the_edge_band_leaves_almost_empty(caplog):
    """Beam centres spread over most of a small detector (a beam stop taken for the beam,
    say) leave NMF a few pixels: one line saying why, before any computation; a band
    taking more than a quarter of the detector is a warning."""
    import logging

    from spedflow.decompose import beam_mask, edge_mask
    from spedflow.errors import InputError
    from spedflow.workflows.nmf import _check_edge
    shape = (32, 32)
    mask = beam_mask(shape, 3.0)
    wide = np.column_stack([np.linspace(2, 30, 200), np.linspace(30, 2, 200)])
    edge = edge_mask(shape, wide) & ~mask
    with pytest.raises(InputError, match=r"only \d+ of the 1024 detector pixels.*check the beam centres") as err:
        _check_edge(edge, mask, int((~(mask | edge)).sum()), wide, shape)
    assert "\n" not in str(err.value)
    # a beam mask taking most of the detector names its parameter instead
    big = beam_mask((16, 16), 7.9)
    still = np.full((200, 2), 8.0)
    with pytest.raises(InputError, match=r"beam mask \(nmf.beam_mask_radius\) takes \d+.*lower nmf.beam_mask_radius"):
        _check_edge(edge_mask((16, 16), still) & ~big, big, int((~big).sum()), still, (16, 16))
    drift = np.column_stack([np.linspace(12, 20, 200), np.full(200, 16.0)])  # +-4 px along ky
    edge = edge_mask(shape, drift) & ~mask
    with caplog.at_level(logging.INFO, logger="spedflow"):
        _check_edge(edge, mask, int((~(mask | edge)).sum()), drift, shape)
    assert [r.levelname for r in caplog.records] == ["INFO"] and f"{int(edge.sum())} detector pixels" in caplog.text
    caplog.clear()
    drift[:, 0] = np.linspace(8, 24, 200)  # +-8 px: half the rows
    edge = edge_mask(shape, drift) & ~mask
    with caplog.at_level(logging.INFO, logger="spedflow"):
        _check_edge(edge, mask, int((~(mask | edge)).sum()), drift, shape)
    assert [r.levelname for r in caplog.records] == ["WARNING"]


def test_singular_values_from_the_gram_matrix_equal_svd():
    m = np.random.default_rng(3).normal(size=(700, 9)).astype(np.float32)
    np.testing.assert_allclose(R._singular_values(m, rows=128),
                               np.linalg.svd(m.astype(np.float64), compute_uv=False), rtol=1e-6)
