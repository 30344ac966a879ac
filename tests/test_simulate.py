"""The simulator: geometry kernels against brute force, truth against the data,
determinism across chunkings, the store format, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from scipy import ndimage

from spedflow.errors import ParameterError, StoreExistsError
from spedflow.io import open_input, verify_store
from spedflow.simulate import SimParams, simulate, simulate_array
from spedflow.simulate import _kernels as K
from spedflow.simulate._scene import _random_rotation

SMALL = dict(scan=(12, 10), detector=32, crystals=3, seed=3)


# --------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ray_lengths_box_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    rot = _random_rotation(rng)
    half = np.array([4.0, 2.5, 3.0])
    pts = rng.uniform(-7, 7, size=(200, 2))
    got = K.ray_lengths(pts, np.zeros(2), rot, half, "box")
    # brute force: fraction of fine steps along z inside the box (body coordinates)
    z = np.linspace(-12, 12, 24001)
    lab = np.stack(np.broadcast_arrays(pts[:, None, 0], pts[:, None, 1], z[None, :]), axis=-1)
    body = lab @ rot
    inside = (np.abs(body) <= half).all(axis=-1)
    ref = inside.sum(axis=1) * (z[1] - z[0])
    np.testing.assert_allclose(got, ref, atol=3e-3)
    assert (got > 0).any() and (got == 0).any()


def test_ray_lengths_axis_aligned_and_sphere():
    pts = np.array([[0.0, 0.0], [1.0, 1.9], [0.0, 2.1]])
    got = K.ray_lengths(pts, np.zeros(2), np.eye(3), np.array([2.0, 2.0, 1.5]), "box")
    np.testing.assert_allclose(got, [3.0, 3.0, 0.0])  # parallel slabs handled exactly
    r = 3.0
    got = K.ray_lengths(pts, np.zeros(2), np.eye(3), np.array([r, r, r]), "sphere")
    np.testing.assert_allclose(got, 2 * np.sqrt(np.maximum(r * r - (pts ** 2).sum(1), 0)))


def test_spot_image_is_pixel_integrated_gaussian():
    img = K.spot_image(np.array([[0.3, -0.4]]), np.array([2.0]), (16.0, 15.0), 1.1, (32, 32))
    assert img.sum() == pytest.approx(2.0, rel=1e-9)
    ky, kx = np.indices(img.shape)
    assert (img * ky).sum() / img.sum() == pytest.approx(16.3, abs=1e-6)
    assert (img * kx).sum() / img.sum() == pytest.approx(14.6, abs=1e-6)


def test_sparse_spot_images_match_dense():
    rng = np.random.default_rng(0)
    spots = rng.uniform(-20, 20, size=(30, 2))
    w = rng.uniform(0.1, 1, 30)
    group = rng.integers(0, 3, 30)
    got = K.spot_images(spots, w, group, 3, (16.3, 15.8), 1.2, (40, 36))
    for k in range(3):
        ref = K.spot_image(spots[group == k], w[group == k], (16.3, 15.8), 1.2, (40, 36))
        np.testing.assert_allclose(got[k], ref, atol=1e-4 * w.max())


# --------------------------------------------------------------------------- determinism
def test_deterministic_for_seed():
    a, ta = simulate_array(**SMALL)
    b, tb = simulate_array(**SMALL)
    c, _ = simulate_array(**{**SMALL, "seed": 4})
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ta["masks"], tb["masks"])
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("chunks,workers", [((12, 10), 1), ((5, 7), 2), ((1, 3), 2), ((7, 1), 1)])
def test_store_identical_for_any_chunking(tmp_path, chunks, workers):
    ref, truth = simulate_array(**SMALL)
    path = simulate(tmp_path / "s.zarr", chunks=chunks, workers=workers, progress=False, **SMALL)
    arr, meta = open_input(path)
    assert arr.chunks == (*chunks, 32, 32)
    np.testing.assert_array_equal(arr[...], ref)
    g = zarr.open_group(str(path), mode="r")
    for name in ("masks", "patterns", "groups", "thickness", "beam_centres"):
        np.testing.assert_array_equal(g["truth"][name][...], truth[name])


def test_store_format(sim_store):
    arr, meta = open_input(sim_store)
    assert arr.shape == (48, 48, 64, 64) and arr.dtype == np.uint16
    assert meta["kind"] == "input" and meta["complete"] is True
    assert meta["original_shape"] == [48, 48, 64, 64] and meta["original_dtype"] == "uint16"
    assert meta["scan_step"]["units"] == "nm" and meta["reciprocal_scale"]["value"] > 0
    g = zarr.open_group(str(sim_store), mode="r")
    t = g["truth"]
    assert t["masks"].shape == (8, 48, 48) and t["masks"].dtype == bool
    assert t["patterns"].shape == (8, 64, 64) and t["patterns"].dtype == np.float32
    assert t["groups"].shape == (8,) and t["groups"].dtype == np.int32
    assert len(t.attrs["simulation"]["crystals"]) == 8
    assert verify_store(sim_store) == []
    assert not (sim_store.parent / (sim_store.name + ".partial")).exists()


def test_overwrite_refused_then_allowed(tmp_path):
    path = simulate(tmp_path / "s.zarr", progress=False, **SMALL)
    with pytest.raises(StoreExistsError, match="exists"):
        simulate(path, progress=False, **SMALL)
    simulate(path, progress=False, overwrite=True, **{**SMALL, "seed": 5})
    assert open_input(path)[1]["simulation"]["seed"] == 5


# --------------------------------------------------------------------------- truth vs data
def test_descan_matches_beam_centre_of_mass():
    data, truth = simulate_array(scan=(20, 20), detector=64, crystals=2, seed=2, descan=5.0)
    br = truth["attrs"]["beam_radius"]
    d = data.astype(float)
    ky, kx = np.indices(d.shape[2:])
    peak = np.stack(np.unravel_index(
        ndimage.gaussian_filter(d, (0, 0, 2, 2)).reshape(400, -1).argmax(1), (64, 64)), 1)
    err = []
    for n, (py, px) in enumerate(peak):
        y, x = divmod(n, 20)
        w = np.hypot(ky - py, kx - px) <= br + 2
        img = d[y, x] * w
        com = np.array([(img * ky).sum(), (img * kx).sum()]) / img.sum()
        err.append(com - truth["beam_centres"][y, x])
    err = np.abs(np.array(err))
    spread = np.ptp(truth["beam_centres"].reshape(-1, 2), axis=0)
    assert spread.max() > 4  # the beam really wanders
    assert np.median(err) < 0.1 and err.max() < 0.5
    # the recorded polynomial reproduces the stored centres
    c = truth["attrs"]["descan"]
    u, v = 19 / 19 - 0.5, 0 / 19 - 0.5
    terms = np.array([1, u, v, u * u, u * v, v * v])
    assert terms @ np.array(c["ky"]) == pytest.approx(truth["beam_centres"][19, 0, 0], abs=1e-4)


def _aligned(frames, centres, det):
    """Shift each pattern by the rounded beam offset (integer roll, test helper)."""
    out = np.empty(frames.shape, float)
    shift = np.round(np.array([det[0] // 2, det[1] // 2]) - centres).astype(int)
    for i, (f, s) in enumerate(zip(frames, shift)):
        out[i] = np.roll(f, tuple(s), axis=(0, 1))
    return out


@pytest.mark.parametrize("shape", ["cube", "sphere", "rod", "mixed"])
def test_crystal_only_sum_correlates_with_its_truth(shape):
    data, truth = simulate_array(scan=(40, 40), detector=64, crystals=5, seed=7, shape=shape,
                                 paper_like=False, groups=5)
    masks, pats = truth["masks"], truth["patterns"]
    det = data.shape[2:]
    aligned = _aligned(data.reshape(-1, *det), truth["beam_centres"].reshape(-1, 2), det)
    aligned = aligned.reshape(data.shape)
    only = masks & (masks.sum(0) == 1)
    # background of each position: its nearest crystal-free neighbour (film, glare, beam)
    free = ~ndimage.binary_dilation(masks.any(0), iterations=2)
    _, (iy, ix) = ndimage.distance_transform_edt(~free, return_indices=True)
    ky, kx = np.indices(det)
    keep = np.hypot(ky - det[0] // 2, kx - det[1] // 2) > truth["attrs"]["beam_radius"] + 4
    for c in range(len(masks)):
        sel = only[c]
        assert sel.sum() >= 4
        s = aligned[sel].sum(0) - aligned[iy[sel], ix[sel]].sum(0)
        corr = [np.corrcoef(s[keep], p[keep])[0, 1] for p in pats]
        assert corr[c] > 0.8, (c, corr)
        assert np.argmax(corr) == c


def test_masks_match_spot_intensity():
    data, truth = simulate_array(scan=(40, 40), detector=64, crystals=5, seed=11)
    masks, groups = truth["masks"], truth["groups"]
    det = data.shape[2:]
    aligned = _aligned(data.reshape(-1, *det), truth["beam_centres"].reshape(-1, 2), det)
    aligned = aligned.reshape(data.shape)
    for c in range(len(masks)):
        p = truth["patterns"][c]
        # virtual aperture: this crystal's spots that no other group shares
        others = truth["patterns"][groups != groups[c]].sum(0)
        ap = (p > 0.2 * p.max()) & (others < 0.05 * p.max())
        if ap.sum() < 3:
            continue
        vdf = (aligned * ap).sum(axis=(2, 3))
        bg = vdf[~masks[groups == groups[c]].any(0)]
        inside = vdf[masks[c] & (truth["thickness"][c] > 0.5 * truth["thickness"][c].max())]
        assert inside.mean() > bg.mean() + 5 * bg.std(), c


def test_spot_intensity_proportional_to_thickness():
    _, truth = simulate_array(scan=(24, 24), detector=48, crystals=1, seed=0, film_scatter=0.0,
                              holes=0, glare=0.0, descan=0.0)
    e = truth["expected"].astype(float)
    ky, kx = np.indices(e.shape[2:])
    far = np.hypot(ky - 24, kx - 24) > truth["attrs"]["beam_radius"] + 3
    bragg = e[..., far].sum(-1).ravel()
    t = truth["thickness"][0].ravel()
    slope = (bragg @ t) / (t @ t)
    np.testing.assert_allclose(bragg, slope * t, atol=1e-3 * bragg.max())
    # what is scattered leaves the beam: total counts are the dose everywhere
    # (less the part of spots and beam tails that falls off the detector)
    total = e.sum(axis=(2, 3))
    dose = truth["attrs"]["dose"]
    assert total.max() <= dose * (1 + 1e-4) and total.min() > 0.99 * dose


def test_saturate_8bit_clips_beam_not_spots():
    data, truth = simulate_array(scan=(16, 16), detector=48, crystals=2, seed=0, saturate="8bit")
    assert data.dtype == np.uint8
    assert data.max() == 255
    centres = np.round(truth["beam_centres"]).astype(int)
    beam = data[np.arange(16)[:, None], np.arange(16)[None, :], centres[..., 0], centres[..., 1]]
    assert (beam == 255).mean() > 0.9
    assert (truth["expected"] > 255).any()
    assert (data[data > 0] < 255).mean() > 0.9  # spots, film and glare mostly below saturation


def test_paper_like_composition():
    _, truth = simulate_array(scan=(48, 48), detector=32, crystals=10, seed=0)
    g, m, info = truth["groups"], truth["masks"], truth["attrs"]["crystals"]
    assert g[0] == g[1] and (m[0] & m[1]).any()  # same orientation, overlapping
    assert g[2] != g[3] and (m[2] & m[3]).sum() > 0.3 * m[2].sum()  # weak over strong
    assert info[2]["off_axis"] and not info[3]["off_axis"]
    assert info[2]["scattered_fraction_max"] < 0.25 * info[3]["scattered_fraction_max"]
    assert len(set(g.tolist())) == 7
    assert all(mm.sum() > 0 for mm in m)


def test_shapes_thickness():
    for shape, lo, hi in (("sphere", 0.95, 1.0), ("cube", 1.0, 3 ** 0.5 + 0.05), ("rod", 0.3, 1.0)):
        _, truth = simulate_array(scan=(48, 48), detector=32, crystals=3, seed=1, shape=shape)
        for c in truth["attrs"]["crystals"]:
            assert lo * c["size"] - 1 <= c["thickness_max"] <= hi * c["size"] + 1e-6, (shape, c)


@pytest.mark.parametrize("detector", [16, 24])
def test_a_small_detector_keeps_a_beam_the_workflow_measures(tmp_path, detector):
    """The optics scale with the detector but no finer than on 32 px: on 16 px the beam
    was 0.375 px, one bright pixel, and `segment` refused the data it had made."""
    import spedflow
    from spedflow.simulate._scene import make_scene
    def beam(k):
        return make_scene((8, 8), (k, k), 1, 0, SimParams())["optics"]["beam_radius"]
    assert beam(detector) == 0.75 and beam(64) == 1.5
    store = simulate(tmp_path / "s.zarr", scan=(24, 24), detector=detector, crystals=3, seed=0,
                     progress=False)
    res = spedflow.segment(store, out=tmp_path / "r.zarr", local=True, progress=False)
    assert spedflow.evaluate(res)["n_matched"] >= 1


def test_zero_crystals():
    data, truth = simulate_array(scan=(8, 8), detector=32, crystals=0)
    assert truth["masks"].shape == (0, 8, 8) and truth["patterns"].shape == (0, 32, 32)
    assert data.sum() > 0


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(scan=0), "`scan` must be >= 4"),
    (dict(scan=(8,)), "`scan` must be an integer or a pair"),
    (dict(detector=8), "`detector` must be >= 16"),
    (dict(crystals=-1), "`crystals` must be >= 0"),
    (dict(crystals=2.5), "`crystals` must be a whole number"),
    (dict(seed=-1), "`seed` must be >= 0"),
    (dict(shape="cone"), "`shape` must be one of"),
    (dict(saturate="12bit"), "`saturate` must be one of"),
    (dict(size_range=(0.3, 0.1)), "min <= max"),
    (dict(size_range=0.1), "`size_range` must be a pair"),
    (dict(dose=0), "`dose` must be > 0"),
    (dict(dose=1e30), "`dose` must be <= 1000000000000"),
    (dict(groups=0), "`groups` must be >= 1"),
    (dict(scatter_fraction=1.5), "`scatter_fraction` must be <= 0.9"),
    (dict(colour="red"), "unknown parameter 'colour'"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ParameterError, match=match):
        simulate_array(**{**dict(scan=8, detector=32, crystals=2), **kwargs})


def test_bad_input_store_args(tmp_path):
    with pytest.raises(ParameterError, match="`chunks` must be >= 1"):
        simulate(tmp_path / "a.zarr", chunks=(0, 3), progress=False, **SMALL)
    with pytest.raises(ParameterError, match="`workers` must be >= 1"):
        simulate(tmp_path / "a.zarr", workers=0, progress=False, **SMALL)
    assert not (tmp_path / "a.zarr").exists()


def test_params_dataclass_frozen_and_defaults():
    p = SimParams()
    with pytest.raises(Exception):
        p.dose = 1.0  # type: ignore[misc]
    assert p.shape == "cube" and p.saturate == "none"
