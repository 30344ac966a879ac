"""Both workflows end to end on simulated data with known truth: the result contract,
segmentation quality with default parameters, and robustness to other data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import spedflow
from spedflow import cluster
from spedflow.evaluate import evaluate


@pytest.fixture(scope="module")
def results(tmp_path_factory, sim_store, sim_mgo_like):
    d = tmp_path_factory.mktemp("wf")
    out = {}
    for name, store, methods in (("small", sim_store, ("vdf", "nmf")), ("mgo", sim_mgo_like, ("vdf",))):
        for m in methods:
            out[name, m] = (spedflow.segment(store, method=m, out=d / f"{name}-{m}.zarr", local=True,
                                             progress=False), store)
    return out


@pytest.mark.parametrize("key", [("small", "vdf"), ("small", "nmf"), ("mgo", "vdf")])
def test_result_contract(results, key):
    path, store = results[key]
    g = zarr.open_group(str(path), mode="r")
    attrs = g.attrs["spedflow"]
    assert attrs["kind"] == "result" and attrs["method"] == key[1]
    assert attrs["nav_binning"] == 1 and "params" in attrs and "timings" in attrs
    ny, nx, ky, kx = zarr.open_group(str(store), mode="r")["data"].shape
    maps, pats = g["segments/maps"][:], g["segments/patterns"][:]
    assert maps.shape[1:] == (ny, nx) and pats.shape == (len(maps), ky, kx)
    assert maps.dtype == np.float32 and pats.dtype == np.float32
    assert (maps >= 0).all() and all(m.max() > 0 for m in maps)
    if key[1] == "vdf":
        v = g["vectors"][:]
        assert v.ndim == 2 and v.shape[1] == 2
        assert g["vdf/images"].shape == (len(v), ny, nx)
        assert g["peaks"].shape[1] == 5
        assert attrs["resolved"]["glare_radius"] == 0  # no clipped beam: no glare
        # a steady beam: the totals spread by counting noise only, nothing normalised
        assert g["overview/total_counts"].shape == (ny, nx)
        assert attrs["resolved"]["vdf_dose_normalized"] is False
        assert attrs["resolved"]["dose_spread"] < 0.01
        # virtual patterns: spots at the member vectors, relative to the centre
        table = g["vdf/segment_vectors"][:]
        for s in range(len(maps)):
            for gy, gx in np.rint(v[table[table[:, 0] == s, 1]]).astype(int)[:3]:
                assert pats[s, ky // 2 + gy, kx // 2 + gx] > 0
    else:
        assert attrs["resolved"]["nmf_dose_normalized"] is False
        assert g["overview/total_counts"].shape == (ny, nx)
        e = attrs["n_components"] + len(attrs["residual_components"])  # global + residual search
        assert g["nmf/factors"].shape == (e, ky, kx) and g["nmf/loadings"].shape == (e, ny, nx)
        assert len(attrs["components_set_aside"]) >= 1  # the film/vacuum support
        assert "noise floor" in attrs["n_components_reason"]
        # the detector edge the alignment shifts zeros into is left out of the fit
        from spedflow.decompose import edge_mask
        edge = g["nmf/edge_mask"][:]
        np.testing.assert_array_equal(edge, edge_mask((ky, kx), g["beam/fitted"][:]) & ~g["nmf/beam_mask"][:])
        assert edge.any() and (g["nmf/factors"][:][:, edge] == 0).all()
    # the beam-centre map and the descan model used
    assert g["beam/centres"].shape == (ny, nx, 2) and g["beam/fitted"].shape == (ny, nx, 2)
    truth = zarr.open_group(str(store), mode="r")["truth/beam_centres"][:]
    assert np.abs(g["beam/fitted"][:] - truth).max() < 0.25


# Quality with default parameters (issue targets: VDF recall >= 0.8, precision >= 0.7;
# NMF recall >= 0.9, precision >= 0.8). The bounds below are what spedflow reaches on
# these sets; where they are below the targets the closing note says why (the
# same-orientation overlapping pair cannot be told apart by either method; the weak
# off-axis crystal over a strong one is still lost in sets where its spots are too
# faint to pass the peak threshold in most of its patterns; on "mgo" it is found; on
# "small" the VDF workflow also keeps a partial segment of one crystal since the gain fit
# became unbiased: on counts it no longer comes out a few % high, 6 of 7 segments match).
QUALITY = {
    ("small", "vdf"): (0.75, 0.85),
    ("small", "nmf"): (0.85, 0.9),
    ("mgo", "vdf"): (0.85, 0.9),
}


@pytest.mark.parametrize("key", sorted(QUALITY))
def test_quality_against_truth(results, key):
    path, store = results[key]
    scores = evaluate(path, store)
    recall, precision = QUALITY[key]
    assert scores["recall"] >= recall, scores
    assert scores["precision"] >= precision, scores
    assert scores["mean_iou"] >= 0.75


@pytest.mark.parametrize("options", [
    dict(scan=(40, 40), detector=96, crystals=6, seed=5, shape="sphere", saturate="8bit"),
    dict(scan=(32, 48), detector=128, crystals=5, seed=7, shape="rod"),
])
def test_vdf_on_other_data(tmp_path, options):
    """Other shapes, detector sizes, 8-bit saturation, a non-square scan: defaults still work."""
    store = spedflow.simulate(tmp_path / "s.zarr", progress=False, **options)
    res = spedflow.segment(store, method="vdf", out=tmp_path / "r.zarr", local=True, progress=False)
    scores = evaluate(res, store)
    assert scores["recall"] >= 0.5, scores
    assert scores["precision"] >= 0.5, scores


def test_images_and_loadings_are_divided_by_a_flickering_beams_dose(tmp_path):
    """A beam current that flickers from one scan line to the next (a cold field-emission
    gun): every other line at 60 % of the dose, by binomial thinning of the simulated
    counts (still Poisson). The VDF images are divided by each pattern's total: the odd
    lines' share of the image intensity is the even lines', not 60 % of it (which
    ``vdf.normalize = false`` keeps, from the same pass 1); so are NMF's loading maps."""
    store = spedflow.simulate(tmp_path / "s.zarr", progress=False, scan=(24, 24), detector=64,
                              crystals=4, seed=2)
    data = zarr.open_group(str(store), mode="r+")["data"]
    a = data[:]
    f = np.broadcast_to(np.where(np.arange(24) % 2, 0.6, 1.0)[:, None, None, None], a.shape)
    data[:] = np.random.default_rng(0).binomial(a.astype(np.int64), f).astype(a.dtype)

    def odd_over_even(res):
        g = zarr.open_group(str(res), mode="r")
        im = g["vdf/images"][:].sum(0)
        return im[1::2].sum() / im[0::2].sum(), g.attrs["spedflow"]["resolved"]

    res = spedflow.segment(store, method="vdf", out=tmp_path / "r.zarr", local=True, progress=False)
    ratio, resolved = odd_over_even(res)
    assert resolved["vdf_dose_normalized"] is True and resolved["dose_spread"] > 0.15
    assert ratio == pytest.approx(1.0, abs=0.06)
    totals = zarr.open_group(str(res), mode="r")["overview/total_counts"][:]
    np.testing.assert_allclose(totals, data[:].sum(axis=(2, 3)), rtol=1e-5)
    off = spedflow.segment(store, method="vdf", out=tmp_path / "off.zarr", local=True,
                           progress=False, overrides={"vdf": {"normalize": False}})
    ratio, resolved = odd_over_even(off)
    assert resolved["vdf_dose_normalized"] is False and ratio == pytest.approx(0.6, abs=0.06)
    # NMF: the loading maps of the kept components, divided likewise
    res = spedflow.segment(store, method="nmf", out=tmp_path / "n.zarr", local=True, progress=False)
    g = zarr.open_group(str(res), mode="r")
    assert g.attrs["spedflow"]["resolved"]["nmf_dose_normalized"] is True
    w = g["nmf/loadings"][:][g.attrs["spedflow"]["components_kept"]].sum(0)
    assert w[1::2].sum() / w[0::2].sum() == pytest.approx(1.0, abs=0.06)


def test_a_cameras_dark_level_is_taken_out_of_the_dose(tmp_path):
    """The same flicker read by a camera that adds a dark level of 4 units to every
    pixel (64 x 64 of them: ~16,000 units per pattern, over half of what the beam
    brings): the VDF workflow measures the level from the noise line and takes it out
    of the totals before dividing by them; with the level left in, the totals would
    spread by about a third as much and the odd lines keep most of their deficit."""
    store = spedflow.simulate(tmp_path / "s.zarr", progress=False, scan=(24, 24), detector=64,
                              crystals=4, seed=2)
    data = zarr.open_group(str(store), mode="r+")["data"]
    a = data[:]
    f = np.broadcast_to(np.where(np.arange(24) % 2, 0.6, 1.0)[:, None, None, None], a.shape)
    data[:] = (np.random.default_rng(0).binomial(a.astype(np.int64), f) + 4).astype(a.dtype)
    res = spedflow.segment(store, method="vdf", out=tmp_path / "r.zarr", local=True, progress=False)
    g = zarr.open_group(str(res), mode="r")
    resolved = g.attrs["spedflow"]["resolved"]
    assert resolved["vdf_dose_normalized"] is True and resolved["dose_spread"] > 0.15
    im = g["vdf/images"][:].sum(0)
    assert im[1::2].sum() / im[0::2].sum() == pytest.approx(1.0, abs=0.06)


def test_a_clipped_beams_totals_are_not_taken_for_the_dose(tmp_path, caplog):
    """The same flicker on a camera that clips the beam (every pattern's beam core at
    one value): the totals still spread with the flicker, but no longer measure the
    dose (the clipped beam's counts are lost, and a clipped camera's totals follow the
    crystals even under a steady beam). Not normalised, and the log says why."""
    import logging
    store = spedflow.simulate(tmp_path / "s.zarr", progress=False, scan=(24, 24), detector=64,
                              crystals=4, seed=2)
    data = zarr.open_group(str(store), mode="r+")["data"]
    a = data[:]
    f = np.broadcast_to(np.where(np.arange(24) % 2, 0.6, 1.0)[:, None, None, None], a.shape)
    thinned = np.random.default_rng(0).binomial(a.astype(np.int64), f)
    data[:] = np.minimum(thinned, a.max() // 4).astype(a.dtype)
    caplog.set_level(logging.INFO, logger="spedflow")
    res = spedflow.segment(store, method="vdf", out=tmp_path / "r.zarr", local=True, progress=False)
    resolved = zarr.open_group(str(res), mode="r").attrs["spedflow"]["resolved"]
    assert resolved["dose_spread"] > 0.1 and resolved["vdf_dose_normalized"] is False
    assert "the beam is clipped" in caplog.text


def test_vdf_keeps_two_rods_of_one_orientation_side_by_side_apart(tmp_path):
    """Two rods of one orientation lying 1 px apart (crystals 0 and 1 of this scene) light
    the same reflections: two crystals, each matched, not folded into one as the halves
    of a bent crystal (``merge.adjacent_shared``; 0.19.0 gave one segment over both)."""
    from scipy import ndimage as ndi
    store = spedflow.simulate(tmp_path / "s.zarr", progress=False, scan=(64, 64), detector=64,
                              shape="rod", seed=13)
    truth = zarr.open_group(str(store), mode="r")["truth"]
    masks, groups = truth["masks"][:], truth["groups"][:]
    # the scene this test is about: one orientation, apart, within rule 6's 2 positions
    assert groups[0] == groups[1] and not (masks[0] & masks[1]).any()
    assert (ndi.binary_dilation(masks[0], iterations=2) & masks[1]).any()
    res = spedflow.segment(store, method="vdf", out=tmp_path / "r.zarr", local=True, progress=False)
    scores = evaluate(res, store)
    matched = {c["truth"]: c["iou"] for c in scores["per_crystal"] if c["segment"] is not None}
    assert matched.get(0, 0) >= 0.8 and matched.get(1, 0) >= 0.8, scores["per_crystal"][:2]
    assert scores["precision"] >= 0.9, scores

def test_nmf_does_not_depend_on_the_cameras_units(tmp_path):
    """The same counts read by cameras of 1 and 1000 units per count: one result, the
    patterns in each camera's units. (0.20.0 lost a crystal at 1000: the NMF's start
    fills its zeros with the normalised matrix's mean, which scaled with the units while
    the rest of the start scaled with their square root, and the residual search's count
    limit was in data units.)"""
    store = spedflow.simulate(tmp_path / "s.zarr", progress=False, scan=(48, 48), detector=64,
                              crystals=6, shape="mixed", seed=5)
    counts = zarr.open_group(str(store), mode="r")["data"][:].astype(np.float32)
    runs = []
    for unit in (1, 1000):
        src = spedflow.from_array(counts * np.float32(unit), tmp_path / f"u{unit}.zarr", progress=False)
        res = spedflow.segment(src, method="nmf", out=tmp_path / f"u{unit}.nmf.zarr", local=True,
                               progress=False)
        runs.append(zarr.open_group(str(res), mode="r"))
    (g1, g2) = runs
    a1, a2 = g1.attrs["spedflow"], g2.attrs["spedflow"]
    assert a2["resolved"]["count_unit"] == pytest.approx(1000 * a1["resolved"]["count_unit"], rel=1e-3)
    assert a2["merge_groups"] == a1["merge_groups"] and a2["nmf_info"]["n_epochs"] == a1["nmf_info"]["n_epochs"]
    m1, m2 = g1["segments/maps"][:], g2["segments/maps"][:]
    assert len(m1) >= 4 and m1.shape == m2.shape
    np.testing.assert_array_equal(m1 > 0, m2 > 0)
    np.testing.assert_allclose(g2["segments/patterns"][:], 1000 * g1["segments/patterns"][:],
                               rtol=1e-3, atol=1e-3 * float(g2["segments/patterns"][:].max()))
    # a camera whose gain the data cannot tell: given, it is used as it is
    res = spedflow.segment(tmp_path / "u1000.zarr", method="nmf", out=tmp_path / "given.zarr",
                           local=True, progress=False, overrides={"nmf": {"gain": 1000.0}})
    g3 = zarr.open_group(str(res), mode="r")
    assert g3.attrs["spedflow"]["resolved"]["count_unit"] == 1000.0
    np.testing.assert_array_equal(g3["segments/maps"][:] > 0, m1 > 0)


def test_binned_run_scores_in_binned_coordinates(tmp_path, sim_store):
    res = spedflow.segment(sim_store, method="vdf", out=tmp_path / "b.zarr", local=True, progress=False,
                           overrides={"preprocess": {"nav_binning": 2}})
    g = zarr.open_group(str(res), mode="r")
    assert g.attrs["spedflow"]["nav_binning"] == 2
    assert g["segments/maps"].shape[1:] == (24, 24)
    assert evaluate(res, sim_store)["recall"] >= 0.5


@pytest.mark.parametrize("method", ["vdf", "nmf"])
def test_detector_binned_run_matches_the_unbinned_one(tmp_path, method):
    """A 128 x 128 px detector summed 2 x 2: the crystals found are those of the run on
    every pixel (the spots span several pixels); patterns, vectors and the reciprocal
    scale are in binned pixels, and the binned run measured its noise binned."""
    store = spedflow.simulate(tmp_path / "s.zarr", progress=False, scan=(40, 40), detector=128,
                              crystals=6, seed=4)
    runs = {}
    for b in (1, 2):
        res = spedflow.segment(store, method=method, out=tmp_path / f"r{b}.zarr", local=True,
                               progress=False, overrides={"preprocess.detector_binning": b})
        runs[b] = zarr.open_group(str(res), mode="r"), evaluate(res, store)
    (g1, s1), (g2, s2) = runs[1], runs[2]
    assert g2.attrs["spedflow"]["detector_binning"] == 2
    assert g2["segments/patterns"].shape[1:] == (64, 64)
    scale1, scale2 = (g.attrs["spedflow"]["reciprocal_scale"]["value"] for g in (g1, g2))
    assert scale2 == pytest.approx(2 * scale1)
    from spedflow.report._load import load_result  # the report and export read it as is
    assert load_result(tmp_path / "r2.zarr").calibration.k_scale == pytest.approx(scale2)
    assert s1["recall"] >= 0.75, s1
    assert s2["recall"] >= s1["recall"] and s2["precision"] >= s1["precision"] - 0.2, (s1, s2)
    if method == "vdf":  # the vectors of the binned run, scaled back, are the full run's
        v1, v2 = g1["vectors"][:], g2["vectors"][:] * 2
        d = np.hypot(*(v1[:, None] - v2[None]).T)
        assert np.median(d.min(axis=0)) < 1.5
        gain1, gain2 = (g.attrs["spedflow"]["resolved"]["gain"] for g in (g1, g2))
        assert gain2 == pytest.approx(gain1, rel=0.1)  # counts stay counts


def test_suggested_detector_binning_keeps_the_beam_and_the_detector_resolved():
    from spedflow.workflows._common import suggested_detector_binning
    assert suggested_detector_binning((128, 128), 20.0) == 1  # a small detector stays
    assert suggested_detector_binning((256, 256), 7.9) == 1  # the beam would be < 4 px
    assert suggested_detector_binning((256, 256), 8.0) == 2
    assert suggested_detector_binning((1024, 1024), 24.0) == 6 - 2  # 6 does not divide 1024
    assert suggested_detector_binning((1024, 1024), 100.0) == 8  # >= 128 px a side
    assert suggested_detector_binning((512, 384), 30.0) == 2  # 3 does not divide 512
    assert suggested_detector_binning((384, 384), 30.0) == 3


@pytest.fixture(scope="module")
def paper_like(tmp_path_factory):
    """The paper's layout at 10 crystals (the demo set): truth crystal 2 is the weak
    off-axis crystal (~1 % of the dose) lying wholly inside the strong crystal 3."""
    path = tmp_path_factory.mktemp("paper") / "demo.zarr"
    return spedflow.simulate(path, progress=False, scan=(64, 64), detector=128, crystals=10, seed=0)


@pytest.mark.parametrize("method", ["vdf", "nmf"])
def test_two_overlapping_crystals_of_one_orientation_are_both_found(paper_like, tmp_path, method):
    """The paper's P3 / P4: truth crystals 0 and 1 share an orientation and overlap by
    ~40 %; their images are one image, and the watershed gave one segment for both. Its
    outline's two notches and the brighter lens between them cut it in two (both
    workflows; before, one of the two was always missed)."""
    res = spedflow.segment(paper_like, method=method, out=tmp_path / "r.zarr", local=True,
                           progress=False, cache=tmp_path / "cache")
    scores = evaluate(res, paper_like)
    assert scores["groups"][0] == scores["groups"][1]
    pair = [d for d in scores["per_crystal"] if d["truth"] in (0, 1)]
    assert all(d["segment"] is not None for d in pair), pair
    assert pair[0]["segment"] != pair[1]["segment"]
    off = spedflow.segment(paper_like, method=method, out=tmp_path / "off.zarr", local=True,
                           progress=False, overrides={"merge": {"overlap_contrast": 0}},
                           cache=tmp_path / "cache")  # (the earlier stages reused)
    assert sum(d["segment"] is not None for d in evaluate(off, paper_like)["per_crystal"]
               if d["truth"] in (0, 1)) == 1


@pytest.mark.parametrize("seed", [1, 3])
def test_nmf_finds_crystals_over_half_of_the_scan(tmp_path, seed):
    """Three crystals 45-70 % of a 40 x 40 scan's side across, one or two of them
    covering about half of it. Their components cover more than ``nmf.max_coverage``, and their spots hold
    most of their patterns (``nmf.crystal_spot_fraction``): all three are found. With
    the coverage rule alone they were set aside as support (one found); with the whole
    map's deviation as the watershed's noise the wedge over half of its loading map was
    dropped by ``min_snr`` (two found)."""
    store = spedflow.simulate(tmp_path / "big.zarr", progress=False, scan=(40, 40), detector=64,
                              crystals=3, seed=seed, size_range=(0.45, 0.7))
    res = spedflow.segment(store, method="nmf", out=tmp_path / "r.zarr", local=True,
                           progress=False, cache=tmp_path / "cache")
    scores = evaluate(res, store)
    assert scores["recall"] == 1 and scores["precision"] == 1, scores
    strict = spedflow.segment(store, method="nmf", out=tmp_path / "s.zarr", local=True,
                              progress=False, overrides={"nmf": {"crystal_spot_fraction": 1.0}},
                              cache=tmp_path / "cache")
    assert evaluate(strict, store)["recall"] <= 1 / 3


def test_nmf_finds_the_weak_crystal(paper_like, tmp_path):
    """Below the global noise edge, found by the residual search (issue #4's target)."""
    res = spedflow.segment(paper_like, method="nmf", out=tmp_path / "n.zarr", local=True,
                           progress=False)
    scores = evaluate(res, paper_like)
    assert scores["recall"] >= 0.9 and scores["precision"] >= 0.8, scores
    weak = next(d for d in scores["per_crystal"] if d["truth"] == 2)
    assert weak["segment"] is not None, weak
    attrs = zarr.open_group(str(res), mode="r").attrs["spedflow"]
    assert attrs["residual_search"]["rank"] >= 1


@pytest.mark.parametrize("key", [("small", "vdf"), ("small", "nmf")])
def test_info_says_what_a_result_found(results, key):
    """``spedflow info`` on a result: its segment count, the NMF rank and why, each
    component set aside with its reason, and the time of each stage."""
    from spedflow.io import format_info, store_info
    path, _ = results[key]
    attrs = zarr.open_group(str(path), mode="r").attrs["spedflow"]
    text = format_info(store_info(path))
    n = zarr.open_group(str(path), mode="r")["segments/maps"].shape[0]
    assert f"method     {key[1]}: {n} segments in 2304 patterns" in text
    assert "computed   " in text and all(f"{k} {v:.1f}" in text for k, v in attrs["timings"].items())
    if key[1] == "nmf":
        assert f"rank       {attrs['n_components_reason']}" in text
        extra = len(attrs["residual_components"])  # the residual search's count too
        assert (f"({attrs['counts']['components']} components"
                + (f" + {extra} from the residual search" if extra else "") + ", ") in text
        for item in attrs["components_set_aside"]:
            assert f" component {item['component']}: {item['reason']}" in text
    else:
        assert f"({attrs['counts']['vectors']} vectors, {attrs['counts']['peaks']} peaks)" in text


@pytest.mark.parametrize("odd", [
    {"components_set_aside": {"3": "noise"}, "timings": {"a": "x"}, "counts": [1, 2]},
    {"components_set_aside": ["noise"], "timings": [1.0], "counts": None, "n_components_reason": 3},
    {"method": None},
    {"method": "nmf", "residual_components": 2},
])
def test_info_describes_results_with_unexpected_attributes(odd):
    """Attributes written by hand or by another version: described as far as they can be."""
    from spedflow.io import format_info
    text = format_info({"path": "r.zarr", "kind": "result", "arrays": [],
                        "result": {"method": "nmf", **odd}})
    assert "method     " in text and "component 3" not in text and "computed" not in text


def test_nmf_sets_aside_incoherent_loadings_and_min_coherence_0_keeps_them(results, tmp_path):
    """The spatial-coherence rule is applied with its threshold as given: at 0 it is
    off; raised past half of the components the default keeps, it sets aside those
    less coherent than that, and says so."""
    def by_coherence(attrs):
        return {d["component"] for d in attrs["components_set_aside"] if "coherence" in d["reason"]}

    path, store = results["small", "nmf"]
    base = zarr.open_group(str(path), mode="r")
    coherence = spedflow.decompose.spatial_coherence(base["nmf/loadings"][:])
    a = base.attrs["spedflow"]
    candidates = set(a["components_kept"]) | by_coherence(a)  # what the other rules keep
    assert all(coherence[i] >= 0.5 for i in a["components_kept"])  # the default's rule
    # a threshold between two components' coherences: the run has something to set aside
    c = np.sort([coherence[i] for i in candidates])
    assert len(c) >= 2 and c[0] < c[-1], c
    middle = float(c[len(c) // 2 - 1] + c[len(c) // 2]) / 2
    for value in (0.0, middle):
        res = spedflow.segment(store, method="nmf", out=tmp_path / f"c{value}.zarr", local=True,
                               progress=False, overrides={"nmf": {"min_coherence": value}})
        attrs = zarr.open_group(str(res), mode="r").attrs["spedflow"]
        said = by_coherence(attrs)
        below = {i for i in range(len(coherence)) if value > 0 and coherence[i] < value}
        # (a component a later rule sets aside may be set aside by this one first)
        assert candidates & below <= said <= below, (value, said)
        assert bool(said) == (value > 0)  # the raised threshold did set something aside
        assert set(attrs["components_kept"]) == candidates - said


def test_nmf_judging_thresholds_reuse_the_cached_factorisation(tmp_path, sim_store):
    """Changing a threshold that only judges the components (nmf.min_coherence) re-runs
    the judging, not the NMF; changing the factorisation's seed does re-run it."""
    cache = tmp_path / "cache"
    stale = cache / "nmf-0123456789abcdef"  # a complete stage of an older spedflow
    stale.mkdir(parents=True)
    (stale / "COMPLETE").write_text("ok\n")
    for i, nmf in enumerate(({}, {"min_coherence": 0.9}, {"seed": 1})):
        spedflow.segment(sim_store, method="nmf", out=tmp_path / f"r{i}.zarr", cache=cache,
                         local=True, progress=False, overrides={"nmf": nmf} if nmf else None)
        stages = sorted(p.name for p in cache.iterdir() if p.name.startswith("nmf-"))
        assert len(stages) == (1 if i < 2 else 2), (nmf, stages)  # the stale one pruned
        assert not stale.exists()


def test_vdf_defaults_on_a_clipped_high_dose_beam(tmp_path):
    """An 8-bit camera at high dose (~30 counts per pixel) clips the direct beam and its
    glare: the half-maximum radius then measured the glare (8.5 px for a 1.5 px beam)
    and the workflow found no vectors at all. The spots' own size is used instead."""
    store = spedflow.simulate(tmp_path / "dense.zarr", scan=(32, 32), detector=64, crystals=6,
                              seed=2, dose=1_000_000, saturate="8bit", progress=False)
    out = tmp_path / "vdf.zarr"
    # from the command line with -q (a scripted run): the warning about the data still shows
    argv = [sys.executable, "-m", "spedflow", "segment", str(store), "--method", "vdf", "--out",
            str(out), "-q", "--workers", "1", "--threads", "1"]
    for extra in ([], ["--overwrite"]):  # the rerun takes the radius from the stage cache
        run = subprocess.run(argv + extra, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        assert "the direct beam is clipped" in run.stderr, run.stderr
    attrs = zarr.open_group(str(out), mode="r").attrs["spedflow"]
    assert attrs["resolved"]["beam_radius"] < 3.0
    # the clipped glare is measured in every pattern, and no vector lies on it
    res = attrs["resolved"]
    assert res["glare_radius"] > 2 * res["beam_radius"]
    assert res["vectors"]["beam_exclusion_radius"] >= res["glare_radius"] + 2 * res["spot_radius"]
    g = np.hypot(*zarr.open_group(str(out), mode="r")["vectors"][:].T)
    assert g.min() >= res["vectors"]["beam_exclusion_radius"]
    score = evaluate(out, store)
    assert score["recall"] >= 0.6 and score["precision"] >= 0.6, score


def test_pass1_slabs_give_the_peaks_of_the_whole_chunk(tmp_path):
    """Pass 1 shifts, subtracts and searches a chunk 64 patterns at a time: its table
    (pattern indices offset per slab, then scan coordinates) equals the peaks of the
    whole chunk's background-subtracted patterns, on a chunk of 132 patterns."""
    from spedflow.peaks import PeakParams, peaks_block
    from spedflow.peaks import resolve as resolve_peaks
    from spedflow.preprocess import PreprocessParams, kernels
    from spedflow.preprocess import resolve as resolve_pre
    from spedflow.workflows import vdf as V
    store = spedflow.simulate(tmp_path / "s.zarr", scan=(12, 11), detector=64, crystals=4,
                              seed=3, progress=False)
    block = np.asarray(spedflow.open_store(store).data, np.float32)
    assert block.shape[0] * block.shape[1] > 2 * V._SLAB
    r = 1.5
    prep = resolve_pre(PreprocessParams(), r)
    pk = resolve_peaks(PeakParams(), r, detector_shape=(64, 64))
    n_bins = int(np.ceil(np.hypot(64, 64) / 2))
    out = V._beam_peaks_block(block, (5, 7), params=pk,
                              sigmas=(prep.dog_sigma_low, prep.dog_sigma_high),
                              beam=dict(beam_radius=r, reference=None, n_bins=n_bins,
                                        max_radius=16, annulus=(2 * r, n_bins)))
    clean = kernels.shift_and_subtract(block, V._found_at(out["centres"], (64, 64)),
                                       prep.dog_sigma_low, prep.dog_sigma_high)
    ref = peaks_block(clean, (5, 7), pk)
    assert len(ref) > 100
    # less the peaks at the zero fill's step where a detector edge was shifted in
    from spedflow.peaks.kernels import FILL_EDGE_SCALES, drop_fill_edge
    flat = np.column_stack([(ref[:, 0] - 5) * block.shape[1] + ref[:, 1] - 7, ref[:, 2:4],
                            np.arange(len(ref))])  # [pattern, ky, kx, row]
    kept = drop_fill_edge(flat, V._found_at(out["centres"], (64, 64)).reshape(-1, 2), (64, 64),
                          FILL_EDGE_SCALES * pk.max_sigma)
    assert len(kept) < len(ref)  # (this set has some)
    ref = ref[kept[:, 3].astype(int)]
    np.testing.assert_array_equal(out["table"], ref)
    np.testing.assert_allclose(out["dog_sum"], clean.sum(axis=(0, 1), dtype=np.float64),
                               rtol=1e-5)


def test_nmf_rank_at_its_limit_is_a_warning(tmp_path, sim_store, caplog):
    """More crystals above the noise than nmf.max_components: the automatic rank is the
    limit, not a measurement, and the run says so with the two parameters to raise. At
    the defaults (a rank under the limit) it does not."""
    import logging
    for cap, warned in ((2, True), (30, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="spedflow"):
            spedflow.segment(sim_store, method="nmf", out=tmp_path / f"r{cap}.zarr", local=True,
                             progress=False, overrides={"nmf": {"max_components": cap}})
        hits = [r.message for r in caplog.records if "reaches its limit" in r.message]
        assert bool(hits) is warned, [r.message for r in caplog.records]
        if warned:
            assert "nmf.max_components = 2" in hits[0] and "--set nmf.max_components=4" in hits[0]


def test_data_stored_detector_first_are_warned_about(tmp_path, caplog):
    """A set written (ky, kx, scan_y, scan_x) and read scan-first holds real-space images
    where the patterns should be: its mean "pattern" is flat, with no direct beam, and
    the run says which axes to move. The same data the right way round: no warning."""
    import logging
    store = spedflow.simulate(tmp_path / "s.zarr", progress=False, scan=(40, 40), detector=48,
                              crystals=4, seed=2)
    data = zarr.open_group(str(store), mode="r")["data"][:]
    swapped = spedflow.from_array(np.ascontiguousarray(np.moveaxis(data, (2, 3), (0, 1))),
                                  tmp_path / "t.zarr", progress=False)
    for src, warned in ((swapped, True), (store, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="spedflow"):
            spedflow.segment(src, method="nmf", out=tmp_path / f"{src.stem}.nmf.zarr", local=True,
                             progress=False)
        hits = [r.message for r in caplog.records if "mean pattern is flat" in r.message]
        assert bool(hits) is warned, [r.message for r in caplog.records]
        if warned:
            assert "(scan_y, scan_x, ky, kx)" in hits[0] and "numpy.moveaxis" in hits[0]


def test_a_vdf_disc_reaching_the_direct_beam_is_warned_about(tmp_path, sim_store, caplog):
    """A VDF radius reaching from the nearest vector into the direct beam images the bright
    field there (a radius of 20 px on a 64 px detector); the defaults never do."""
    import logging
    for radius, warned in ((20.0, True), (None, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="spedflow"):
            res = spedflow.segment(sim_store, method="vdf", out=tmp_path / f"r{radius}.zarr",
                                   local=True, progress=False,
                                   overrides={"vdf": {"radius": radius}} if radius else None)
        hits = [r.message for r in caplog.records if "reaches the direct beam" in r.message]
        assert bool(hits) is warned, [r.message for r in caplog.records]
        if warned:
            a = zarr.open_group(str(res), mode="r").attrs["spedflow"]["resolved"]
            reach = np.hypot(*zarr.open_group(str(res), mode="r")["vectors"][:].T).min()
            assert f"keep the radius under {reach - a['beam_radius']:.1f} px" in hits[0]


@pytest.fixture(scope="module")
def low_dose_store(tmp_path_factory):
    """300 counts per pattern (the simulator's default is 30,000)."""
    from spedflow.simulate import simulate
    return simulate(tmp_path_factory.mktemp("lowdose") / "d300.zarr", scan=(40, 40), detector=64,
                    crystals=6, seed=3, dose=300, progress=False)


@pytest.mark.parametrize("which, overrides, warned", [
    ("low", None, True),
    ("low", {"watershed": {"snr_floor": 2.0}}, False),  # the advice taken: said no more
    ("full", None, False),
])
def test_noisy_vdf_images_are_pointed_out(tmp_path, sim_store, low_dose_store, which, overrides,
                                          warned, caplog):
    """At 300 counts per pattern the VDF images' median pixel signal-to-noise ratio
    (recorded as ``resolved.vdf_image_snr``, measured by ``image_snr`` on a sample) is
    under 2 and the run says what to try; at full dose it is well over 2 and it does not."""
    import logging

    from spedflow.segment._watershed import image_snr
    store = low_dose_store if which == "low" else sim_store
    with caplog.at_level(logging.WARNING, logger="spedflow"):
        res = spedflow.segment(store, method="vdf", out=tmp_path / "r.zarr", local=True,
                               progress=False, overrides=overrides)
    g = zarr.open_group(str(res), mode="r")
    snr = g.attrs["spedflow"]["resolved"]["vdf_image_snr"]
    images = g["vdf/images"][:]
    if len(images) <= 32:  # the sample is every image: the median of image_snr over them
        assert snr == pytest.approx(float(np.median([image_snr(im) for im in images])))
    assert (snr < 2.0) is (which == "low")
    # the merge's noise correction ("auto") follows the same measure; the watershed's
    # noise rule stays off over a ratio of 1 unless given
    assert g.attrs["spedflow"]["resolved"]["merge_noise_corrected"] is (which == "low")
    assert g.attrs["spedflow"]["resolved"]["watershed_snr_floor"] == (
        2.0 if overrides else 0.0)
    hits = [r.message for r in caplog.records if "VDF images are noisy" in r.message]
    assert bool(hits) is warned
    if warned:
        assert f"ratio {snr:.2f}" in hits[0] and "watershed.snr_floor=2" in hits[0]


def test_images_mostly_noise_switch_the_noise_rule_on(tmp_path, caplog):
    """At 100 counts per pattern the VDF images' median pixel signal-to-noise ratio is
    under 1: the default watershed.snr_floor (None) becomes 2, as given explicitly (the
    same segments), the merge corrects for the noise, and the run says so."""
    import logging

    from spedflow.simulate import simulate
    store = simulate(tmp_path / "d100.zarr", scan=(40, 40), detector=64, crystals=6, seed=3,
                     dose=100, progress=False)
    with caplog.at_level(logging.WARNING, logger="spedflow"):
        auto = spedflow.segment(store, method="vdf", out=tmp_path / "auto.zarr", local=True,
                                progress=False)
    given = spedflow.segment(store, method="vdf", out=tmp_path / "given.zarr", local=True,
                             progress=False, overrides={"watershed": {"snr_floor": 2.0}})
    a, g = (zarr.open_group(str(r), mode="r") for r in (auto, given))
    res = a.attrs["spedflow"]["resolved"]
    assert res["vdf_image_snr"] < 1.0
    assert res["watershed_snr_floor"] == 2.0 and res["merge_noise_corrected"] is True
    np.testing.assert_array_equal(a["segments/maps"][:], g["segments/maps"][:])
    assert any("mostly noise" in r.message and "snr_floor = 2" in r.message for r in caplog.records)


@pytest.mark.parametrize("max_coverage, warned", [(0.08, True), (None, False)])
def test_crystals_set_aside_for_their_coverage_are_named(tmp_path, sim_store, max_coverage,
                                                         warned, caplog):
    """NMF components with clear spots set aside as support for covering more than
    ``nmf.max_coverage`` of the scan (crystals larger than the workflow assumes) are named
    in a warning even when other crystals are found; none at the defaults here. (Their
    spots dominate their patterns: ``crystal_spot_fraction`` = 1 lets the coverage rule
    judge them.)"""
    import logging

    from spedflow.decompose._background import SUPPORT_REASON
    overrides = ({"nmf": {"max_coverage": max_coverage, "crystal_spot_fraction": 1.0}}
                 if max_coverage else None)
    with caplog.at_level(logging.WARNING, logger="spedflow"):
        res = spedflow.segment(sim_store, method="nmf", out=tmp_path / "r.zarr", local=True,
                               progress=False, overrides=overrides)
    a = zarr.open_group(str(res), mode="r").attrs["spedflow"]
    aside = [d["component"] for d in a["components_set_aside"]
             if d["reason"].startswith(SUPPORT_REASON)]
    hits = [r.message for r in caplog.records if "have sharp spots" in r.message
            or "has sharp spots" in r.message]
    assert bool(hits) is warned and bool(aside) is warned
    if warned:
        assert spedflow.open_result(res)["segments/maps"].shape[0] > 0  # others were found
        assert f"components {', '.join(map(str, aside))} have sharp spots" in hits[0]


@pytest.mark.parametrize("method, reason, overrides", [
    ("vdf", "watershed.min_size = 1000", {"watershed": {"min_size": 1000}}),
    # no vector at all: an empty result too, not an error (an amorphous region of a batch)
    ("vdf", "no diffraction vector, a place on the detector with peaks in "
            "vectors.min_patterns = 10 patterns", {"peaks": {"threshold": 1e6}}),
    ("nmf", "every NMF component was set aside", {"watershed": {"min_size": 1000}}),
    # crystals' components taken for the support: the warning names the parameter
    ("nmf", "covers more than nmf.max_coverage = 0.01 of the scan: if one crystal fills most of "
            "the scan, raise it", {"nmf": {"max_coverage": 0.01, "crystal_spot_fraction": 1.0}}),
])
def test_a_run_without_crystals_says_why(tmp_path, sim_store, method, reason, overrides, caplog):
    """A run that finds no crystal writes its (empty) result and warns with the reason,
    rather than printing only 'wrote'."""
    import logging
    with caplog.at_level(logging.WARNING, logger="spedflow"):
        res = spedflow.segment(sim_store, method=method, out=tmp_path / "r.zarr", local=True,
                               progress=False, overrides=overrides)
    assert spedflow.open_result(res)["segments/maps"].shape[0] == 0
    assert any("no crystal found" in r.message and reason in r.message for r in caplog.records), \
        [r.message for r in caplog.records]
    assert sum("no crystal found" in r.message for r in caplog.records) == 1


def test_vectors_all_on_an_even_ring_are_named_as_such(tmp_path, caplog):
    """Amorphous speckle (15 random speckles per pattern on a ring of |g| = 14 px): the
    peak histogram's ring holds local maxima that are vectors by the local test, none
    standing out of its ring. The warning says they were found and dropped as a film's,
    not that there was no vector."""
    import logging
    rng = np.random.default_rng(0)
    k = 48
    yy, xx = np.mgrid[:k, :k]
    base = 1000 / (1 + np.exp((np.hypot(yy - 24, xx - 24) - 3) / 0.5)) + 0.05
    data = np.empty((24, 24, k, k))
    for i in np.ndindex(24, 24):
        a, g = rng.uniform(0, 2 * np.pi, 15), 14 + rng.normal(0, 0.5, 15)
        cy, cx = 24 + g * np.sin(a), 24 + g * np.cos(a)
        speckle = 80 * np.exp(-((yy[None] - cy[:, None, None]) ** 2
                                + (xx[None] - cx[:, None, None]) ** 2) / 2).sum(0)
        data[i] = base + speckle
    store = spedflow.from_array(rng.poisson(data).astype(np.uint16), tmp_path / "film.zarr")
    with caplog.at_level(logging.WARNING, logger="spedflow"):
        res = spedflow.segment(store, method="vdf", out=tmp_path / "r.zarr", local=True,
                               progress=False)
    counts = zarr.open_group(str(res), mode="r").attrs["spedflow"]["counts"]
    assert counts["vectors"] == 0 and counts["segments"] == 0
    hits = [r.message for r in caplog.records if "no crystal found" in r.message]
    assert len(hits) == 1 and "diffraction vectors found lie on rings of peaks" in hits[0], hits


@pytest.mark.parametrize("group", [1, 3, 1000])
def test_reductions_over_the_peak_tables_equal_one_read(results, monkeypatch, group):
    """The peak histogram summed in parts over groups of blocks (any group size, the
    parts added in a tree) equals one read of every table, and the result's."""
    from spedflow.peaks import peak_histogram
    from spedflow.workflows import vdf as V
    path, _ = results["mgo", "vdf"]
    g = zarr.open_group(str(path), mode="r")
    resolved = g.attrs["spedflow"]["resolved"]
    border, o = resolved["peaks"]["exclude_border"], resolved["vectors"]["oversample"]
    paths = sorted(Path(str(path) + ".cache").glob("beam_peaks-*/blocks/*.npz"))
    assert len(paths) > 3
    measured, used = g["beam/centres"][...], g["beam/fitted"][...]
    det = tuple(g["segments/patterns"].shape[1:])
    want, n = 0, 0
    for t in V._aligned_tables(paths, measured, used, det, border):
        want = want + peak_histogram(t, det, oversample=o)
        n += len(t)
    monkeypatch.setattr(V, "_TABLE_GROUP", group)
    with cluster.local_scheduler():
        hist, count = V._over_tables(paths, measured, used, det, border, V._histogram_of, det, o,
                                     label="peak histogram")
        empty, none = V._over_tables([], measured, used, det, border, V._histogram_of, det, o,
                                     label="peak histogram")
    assert count == n == g["peaks"].shape[0] and n > 0
    np.testing.assert_array_equal(hist, want)
    np.testing.assert_array_equal(hist.astype(np.float32), g["overview/peak_histogram"][...])
    assert none == 0 and not empty.any() and empty.shape == want.shape
