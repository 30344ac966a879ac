"""The public Python API (``import spedflow``): stores as xarray, one-call workflows,
configuration, stage-by-stage runs through the exported functions, interop.

All runs use dask's synchronous scheduler (``local=True`` runs in-process) and small
simulated stores; the NMF workflow runs on a 16 x 16 scan with a fixed, small E.
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

import spedflow
from spedflow.errors import InputError, ParameterError

RESULT_DIMS = {
    "segments/maps": ("segment", "scan_y", "scan_x"),
    "segments/patterns": ("segment", "ky", "kx"),
    "beam/centres": ("scan_y", "scan_x", "yx"),
    "beam/fitted": ("scan_y", "scan_x", "yx"),
}
VDF_DIMS = {**RESULT_DIMS, "vdf/images": ("vector", "scan_y", "scan_x"),
            "vectors": ("vector", "g"), "peaks": ("peak", "column")}
NMF_DIMS = {**RESULT_DIMS, "nmf/factors": ("component", "ky", "kx"),
            "nmf/loadings": ("component", "scan_y", "scan_x"),
            "nmf/beam_mask": ("ky", "kx"), "nmf/edge_mask": ("ky", "kx")}


@pytest.fixture(autouse=True)
def _synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


@pytest.fixture(scope="module")
def vdf_result(sim_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("api_vdf") / "vdf.zarr"
    with dask.config.set(scheduler="synchronous"):
        return spedflow.segment(sim_store, method="vdf", out=out, local=True, progress=False)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from spedflow.simulate import simulate
    path = tmp_path_factory.mktemp("api_tiny") / "tiny.zarr"
    return simulate(path, scan=(16, 16), detector=32, crystals=3, seed=2, progress=False)


# ---------------------------------------------------------------------------- open_store

def test_open_store_is_lazy_calibrated_xarray(sim_store):
    x = spedflow.open_store(sim_store)
    assert isinstance(x, xr.DataArray)
    assert x.dims == ("scan_y", "scan_x", "ky", "kx")
    assert isinstance(x.data, da.Array)
    raw = zarr.open_group(str(sim_store), mode="r")["data"]
    assert x.shape == raw.shape and x.dtype == raw.dtype
    # every chunk holds whole patterns
    assert x.data.chunks[2:] == ((raw.shape[2],), (raw.shape[3],))
    meta = x.attrs["spedflow"]
    step, rec = meta["scan_step"], meta["reciprocal_scale"]
    for dim in ("scan_y", "scan_x"):
        np.testing.assert_allclose(np.diff(x[dim].values), step["value"])
        assert x[dim].values[0] == 0
        assert x[dim].attrs["units"] == step["units"]
    for dim in ("ky", "kx"):
        n = x.sizes[dim]
        np.testing.assert_allclose(np.diff(x[dim].values), rec["value"])
        assert x[dim].values[n // 2] == pytest.approx(0.0, abs=1e-12)  # beam centre
        assert x[dim].attrs["units"] == rec["units"]
    np.testing.assert_array_equal(x[3:5, 7, :, :].values, raw[3:5, 7])


# ------------------------------------------------------------------------ one-call runs

def _check_dims(res, expected, scan, detector):
    for name, dims in expected.items():
        assert name in res, f"result lacks {name!r}"
        arr = res[name]
        assert isinstance(arr, xr.DataArray) and isinstance(arr.data, da.Array), name
        assert arr.dims == dims, name
        for dim, n in zip(("scan_y", "scan_x"), scan):
            if dim in arr.dims:
                assert arr.sizes[dim] == n, (name, dim)
        for dim, n in zip(("ky", "kx"), detector):
            if dim in arr.dims:
                assert arr.sizes[dim] == n, (name, dim)
    assert res["segments/maps"].sizes["segment"] == res["segments/patterns"].sizes["segment"]


def test_segment_vdf_result_layout(vdf_result, sim_store):
    res = spedflow.open_result(vdf_result)
    shape = spedflow.open_store(sim_store).shape
    _check_dims(res, VDF_DIMS, shape[:2], shape[2:])
    attrs = res["attrs"]
    assert attrs["kind"] == "result" and attrs["method"] == "vdf" and attrs["nav_binning"] == 1
    assert res["peaks"].sizes["column"] == 5
    assert res["vdf/images"].sizes["vector"] == res["vectors"].sizes["vector"] == attrs["counts"]["vectors"]
    assert res["segments/maps"].sizes["segment"] == attrs["counts"]["segments"] > 0
    # the run's parameters are the defaults, written back in full
    assert spedflow.load_config("vdf", attrs["params"]) == spedflow.load_config("vdf")
    maps = res["segments/maps"].values
    assert np.isfinite(maps).all() and (maps >= 0).all()


def test_result_arrays_have_the_scans_and_detectors_calibration(vdf_result, sim_store, tmp_path):
    """Scan axes in the input's scan step times the result's navigation binning, detector
    axes in its reciprocal scale centred on the beam: the store's own coordinates."""
    x = spedflow.open_store(sim_store)
    res = spedflow.open_result(vdf_result)
    for name in ("segments/maps", "vdf/images", "beam/centres"):
        for dim in ("scan_y", "scan_x"):
            np.testing.assert_allclose(res[name][dim].values, x[dim].values)
            assert res[name][dim].attrs == x[dim].attrs
    for dim in ("ky", "kx"):
        np.testing.assert_allclose(res["segments/patterns"][dim].values, x[dim].values)
        assert res["segments/patterns"][dim].attrs == x[dim].attrs
    # a result binned 2x: every scan pixel two steps wide
    binned = tmp_path / "binned.zarr"
    shutil.copytree(vdf_result, binned)
    g = zarr.open_group(str(binned), mode="r+")
    g.attrs["spedflow"] = {**g.attrs["spedflow"], "nav_binning": 2}
    step = x.attrs["spedflow"]["scan_step"]["value"]
    scan_x = spedflow.open_result(binned)["segments/maps"]["scan_x"].values
    np.testing.assert_allclose(np.diff(scan_x), 2 * step)
    assert scan_x[0] == pytest.approx(0.5 * step)  # the centre of raw positions 0 and 1


def test_open_result_refuses_an_input_store_and_segment_a_result(vdf_result, sim_store, tmp_path):
    with pytest.raises(InputError, match="is not a spedflow result .*spedflow.open_store"):
        spedflow.open_result(sim_store)
    with pytest.raises(InputError, match="is a result of `spedflow segment`, not an input store: "
                                         "give the store of the data"):
        spedflow.segment(vdf_result, method="vdf", out=tmp_path / "again.zarr", local=True,
                         progress=False)
    assert not (tmp_path / "again.zarr").exists()


def test_segment_nmf_result_layout(tiny_store, tmp_path):
    overrides = {"nmf": {"n_components": 3, "max_epochs": 30}, "scree": {"n_components": 8}}
    out = spedflow.segment(tiny_store, method="nmf", out=tmp_path / "nmf.zarr", local=True,
                           overrides=overrides, progress=False)
    res = spedflow.open_result(out)
    _check_dims(res, NMF_DIMS, (16, 16), (32, 32))
    attrs = res["attrs"]
    assert attrs["method"] == "nmf" and attrs["n_components"] == 3
    e = 3 + len(attrs["residual_components"])  # the global components, then the residual search's
    assert res["nmf/factors"].sizes["component"] == res["nmf/loadings"].sizes["component"] == e
    assert attrs["params"]["nmf"]["n_components"] == 3
    assert (res["nmf/factors"].values >= 0).all() and (res["nmf/loadings"].values >= 0).all()


def test_segment_nmf_without_residual_search(tiny_store, tmp_path):
    overrides = {"nmf": {"n_components": 3, "max_epochs": 30}, "scree": {"n_components": 8},
                 "residual": {"enabled": False}}
    res = spedflow.open_result(spedflow.segment(tiny_store, method="nmf", out=tmp_path / "n.zarr",
                                                local=True, overrides=overrides, progress=False))
    assert res["attrs"]["residual_search"] == {"enabled": False}
    assert res["attrs"]["residual_components"] == []
    assert res["nmf/factors"].sizes["component"] == 3


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(method="pca"), ParameterError, "method"),
    (dict(overrides={"peaks": {"treshold": 3}}), ParameterError, "treshold"),
    (dict(config=42), ParameterError, "config"),
])
def test_segment_bad_input(sim_store, tmp_path, kwargs, exc, match):
    out = tmp_path / "r.zarr"
    with pytest.raises(exc, match=match):
        spedflow.segment(sim_store, out=out, local=True, progress=False, **kwargs)
    assert not out.exists()


@pytest.mark.parametrize("kwargs, match", [
    (dict(local=True, n_workers=2), r"runs in this process, and n_workers \(--workers\) is for"),
    (dict(local=True, scheduler="tcp://127.0.0.1:1"), r"scheduler \(--scheduler\) is for a"),
    (dict(local=True, threads_per_worker=1, memory_limit="2GB"),
     r"threads_per_worker \(--threads\), memory_limit \(--memory-limit\) are for a cluster"),
    (dict(local=True, tls_cert="c.pem"), r"a TLS file \(--tls-\*\) is for a cluster"),
    (dict(tls_cert="c.pem"), r"TLS certificates were given without a scheduler address"),
])
def test_segment_refuses_contradicting_places_to_run(sim_store, tmp_path, kwargs, match,
                                                     monkeypatch):
    """Arguments for a cluster with ``local=True`` (--no-cluster), or TLS files without a
    scheduler on data small enough to run in this process, were ignored: refused, before
    anything is read or written, here and in live mode."""
    from spedflow.workflows.live import watch
    monkeypatch.delenv("SPEDFLOW_SCHEDULER", raising=False)
    out = tmp_path / "r.zarr"
    with pytest.raises(ParameterError, match=match):
        spedflow.segment(sim_store, out=out, progress=False, **kwargs)
    with pytest.raises(ParameterError, match=match):
        watch(sim_store, out=out, progress=False, timeout=1, **kwargs)
    assert not out.exists() and not Path(str(out) + ".cache").exists()


@pytest.mark.parametrize("where", ["store", "out"])
def test_segment_given_an_array_for_a_path(sim_store, tmp_path, where):
    """An array where a store's path belongs: one line saying so, not a file-name error
    quoting the array's repr."""
    data = np.zeros((4, 4, 8, 8), np.uint16)
    kw = dict(store=sim_store, out=tmp_path / "r.zarr")
    kw[where] = data
    with pytest.raises(ParameterError, match=r"by its path.*\(got a numpy.ndarray\)") as info:
        spedflow.segment(kw.pop("store"), local=True, progress=False, **kw)
    assert "\n" not in str(info.value) and "[[" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_segment_refuses_existing_result(vdf_result, sim_store):
    with pytest.raises(FileExistsError, match="exists"):
        spedflow.segment(sim_store, method="vdf", out=vdf_result, local=True, progress=False)


# ---------------------------------------------------------------------------- load_config

def test_load_config_sources_agree(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[peaks]\nthreshold = 6.5\n\n[merge]\ncorr_threshold = 0.8\n")
    from_toml = spedflow.load_config("vdf", toml)
    from_str = spedflow.load_config("vdf", str(toml))
    from_dict = spedflow.load_config("vdf", {"peaks": {"threshold": 6.5}, "merge": {"corr_threshold": 0.8}})
    from_cfg = spedflow.load_config("vdf", from_dict)
    assert from_toml == from_str == from_dict == from_cfg
    assert from_toml.peaks.threshold == 6.5 and from_toml.merge.corr_threshold == 0.8
    # everything else keeps its default
    default = spedflow.load_config("vdf")
    assert from_toml.preprocess == default.preprocess and from_toml.vdf == default.vdf
    assert dataclasses.replace(from_toml.peaks, threshold=default.peaks.threshold) == default.peaks


def test_load_config_overrides_win(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[preprocess]\nnav_binning = 2\ndescan = \"plane\"\n")
    cfg = spedflow.load_config("vdf", toml, overrides={"preprocess": {"nav_binning": 3}})
    assert cfg.preprocess.nav_binning == 3 and cfg.preprocess.descan == "plane"
    cfg = spedflow.load_config("nmf", overrides={"nmf": {"n_components": 4}})
    assert cfg.nmf.n_components == 4
    # dotted names, as --set takes them, mixed with tables
    cfg = spedflow.load_config("vdf", toml, overrides={"preprocess.nav_binning": 3,
                                                       "peaks": {"threshold": 6.0}})
    assert (cfg.preprocess.nav_binning, cfg.preprocess.descan, cfg.peaks.threshold) == (3, "plane", 6.0)


@pytest.mark.parametrize("method", ["vdf", "nmf"])
def test_every_parameter_is_explained_in_the_defaults_file(method):
    """`spedflow params` puts a comment over every parameter: the first sentence of its
    description in the parameter class's docstring."""
    import dataclasses
    from spedflow.workflows import config_class, parameter_summaries
    text = spedflow.default_config_toml(method)
    cfg = config_class(method)()
    for section in dataclasses.fields(cfg):
        cls = type(getattr(cfg, section.name))
        about = parameter_summaries(cls)
        for f in dataclasses.fields(cls):
            assert f.name in about and len(about[f.name]) > 10, (cls.__name__, f.name)
            first_words = " ".join(about[f.name].split()[:4])
            assert first_words in " ".join(line.lstrip("# ") for line in text.splitlines()), f.name
    if method == "vdf":  # parameters described together (min_sigma, max_sigma): said once
        assert text.count("# Smallest and largest Gaussian scale of the LoG") == 1


def test_parameter_summaries_reads_numpy_docstrings():
    from spedflow.workflows import parameter_summaries

    class P:
        """Things.

        Parameters
        ----------
        a, b : float
            Two of them, px (see :func:`spedflow.peaks.noise.count_scale`). More
            about them.
        c : {"x", "y"}
            One of ``x`` or ``y``.
        """
    assert parameter_summaries(P) == {"a": "Two of them, px (see count_scale).",
                                      "b": "Two of them, px (see count_scale).",
                                      "c": "One of x or y."}


@pytest.mark.parametrize("method", ["vdf", "nmf"])
def test_default_config_toml_round_trip(tmp_path, method):
    path = tmp_path / f"{method}.toml"
    path.write_text(spedflow.default_config_toml(method))
    assert spedflow.load_config(method, path) == spedflow.load_config(method)


@pytest.mark.parametrize("args, kwargs, match", [
    (("vdf", {"peaks": {"treshold": 5}}), {}, "unknown parameter 'treshold'"),
    (("vdf", {"peeks": {}}), {}, "unknown section 'peeks'"),
    # a parameter above every [section] header: where it belongs
    (("vdf", {"threshold": 3}), {},
     r"`threshold` lies outside any \[section\]; it is a parameter of \[peaks\], \[watershed\]"),
    (("vdf", {"bogus": 3}), {}, r"`bogus` lies outside any \[section\]; the sections are merge"),
    (("nmf",), {"overrides": {"nmf": {"n_component": 3}}}, "unknown parameter 'n_component'"),
    (("vdf", {"peaks": {"threshold": "high"}}), {}, "threshold"),
    (("vdf", {"peaks": {"num_sigma": 2.5}}), {}, "num_sigma"),
    (("vdf", {"preprocess": {"align": "yes"}}), {}, "align"),
    (("vdf", {"peaks": 3}), {}, "peaks"),
    (("vdf",), {"overrides": {"peaks": 3}}, "peaks"),
    (("vdf",), {"overrides": {"peaks.treshold": 3}}, "unknown parameter 'treshold'"),
    (("vdf", 42), {}, "config"),
    (("vdf", "/nonexistent/run.toml"), {}, "does not exist"),
    (("pca",), {}, "method"),
])
def test_load_config_bad_input(args, kwargs, match):
    with pytest.raises(ParameterError, match=match):
        spedflow.load_config(*args, **kwargs)


def test_load_config_bad_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[peaks\nthreshold = \n")
    with pytest.raises(ParameterError, match="not valid TOML"):
        spedflow.load_config("vdf", bad)
    # a byte-order mark, as Windows editors write, is read past
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[peaks]\nthreshold = 5\n")
    assert spedflow.load_config("vdf", bom).peaks.threshold == 5


# ------------------------------------------------------------- stage by stage == one call

def _spot_radius():
    """The spot-size measurement the VDF workflow uses (wherever it is exported)."""
    for module in ("spedflow.peaks", "spedflow.vdf", "spedflow.workflows.vdf"):
        fn = getattr(importlib.import_module(module), "spot_radius", None)
        if fn is not None:
            return fn
    return None


def _mean_residual(data, centres, params, counts):
    """Mean over the scan of the patterns aligned by whole pixels minus their ring
    background (drawn about each beam to a third of a pixel): what the workflow
    measures the spots' size on."""
    from spedflow.peaks.noise import counting_peaks_by_slab
    ky, kx = data.shape[2:]
    frames = np.asarray(data, np.float32).reshape(-1, ky, kx)
    total = sum(r.sum(0, dtype=np.float64) for _, _, r in
                counting_peaks_by_slab(frames, centres.reshape(-1, 2), params, counts))
    return total / len(frames)


def test_stage_by_stage_reproduces_vdf_workflow(sim_store, vdf_result):
    """Every stage of the VDF workflow is reachable through the public functions."""
    from spedflow import peaks, preprocess, vdf
    from spedflow.segment import (drop_radial_pairs, drop_shared_reflections, fold_fragments,
                                  merge_vdf_segments, segments_from_labels, watershed_stack)

    cfg = spedflow.load_config("vdf")
    data = spedflow.open_store(sim_store).data
    ny, nx, ky, kx = data.shape
    provisional = preprocess.beam_centres(data).compute()
    r = float(preprocess.estimate_beam_radius(data, provisional).compute())
    # the workflow's pass 1: centres with the radius (stored as float32), and the peaks
    # of the patterns aligned by them, moved to the fitted descan's frame afterwards
    centres = preprocess.beam_centres(data, r).compute().astype(np.float32).astype(np.float64)
    found_at = np.where(np.isfinite(centres), centres, [ky // 2, kx // 2])
    used, _ = preprocess.centres_for_alignment(centres, cfg.preprocess.descan)
    used = used.astype(np.float32).astype(np.float64)
    prep = preprocess.resolve(cfg.preprocess, r)
    pk = peaks.resolve(cfg.peaks, r, detector_shape=(ky, kx))
    assert pk.noise == "counting"
    counts = peaks.measure_counts(data)  # the detector's gain and read-out noise
    table = peaks.recentre_table(
        np.concatenate(dask.compute(*peaks.find_peaks_counting(data, found_at, pk, counts))),
        used, (ky, kx), found_at=found_at, exclude_border=pk.exclude_border)
    vp = peaks.vectors.resolve(cfg.vectors, r)
    hist = peaks.peak_histogram(table, (ky, kx), oversample=vp.oversample)
    vectors = peaks.unique_vectors(hist, detector_shape=(ky, kx), params=vp)
    spot_r = r
    spot_radius = _spot_radius()
    if spot_radius is not None:  # second pass with the measured spot size
        _, spot_r = spot_radius(_mean_residual(data, found_at, pk, counts), vectors, r)
        vp = dataclasses.replace(peaks.vectors.resolve(cfg.vectors, spot_r),
                                 beam_exclusion_radius=2.0 * r)
        # smoothed by how far the peaks of one reflection scatter, measured
        scatter = peaks.position_scatter(hist, vectors, oversample=vp.oversample,
                                         radius=vp.cluster_radius)
        vp = dataclasses.replace(vp, scatter=scatter)
        vectors = peaks.unique_vectors(hist, detector_shape=(ky, kx), params=vp)
    # vectors that do not stand out of their ring (film) are dropped
    vectors, _ = peaks.drop_ring_vectors(hist, vectors, oversample=vp.oversample,
                                         radius=vp.cluster_radius, min_patterns=vp.min_patterns)

    res = spedflow.open_result(vdf_result)
    attrs = res["attrs"]
    assert attrs["resolved"]["beam_radius"] == pytest.approx(r, rel=1e-6)
    np.testing.assert_allclose(res["beam/fitted"].values, used, atol=1e-4)
    # (the centres here differ from the workflow's by < 1e-4 px, see below: a pattern
    # whose shift to the centre lies that close to a half pixel is aligned one pixel
    # differently, which can move a marginal peak across the threshold)
    assert abs(len(table) - attrs["counts"]["peaks"]) <= max(2, 1e-4 * len(table))
    assert res["peaks"].values.shape == (attrs["counts"]["peaks"], 5)  # streamed, all of it
    ref = res["vectors"].values
    assert abs(len(vectors) - len(ref)) <= 1
    if len(vectors) == len(ref):  # the same vectors (their order can swap on near ties)
        order = lambda v: v[np.lexsort(np.round(v, 1).T[::-1])]  # noqa: E731
        np.testing.assert_allclose(order(vectors), order(ref), atol=1e-3)

    # VDF images, watershed and merging on the same vectors give the same crystals
    # (the stored ones, in their order)
    vectors = ref.astype(np.float64)
    vd = vdf.resolve(cfg.vdf, spot_r)
    # pass 2 on the workflow's own centres (the ones here come from the whole data's
    # mean pattern, the workflow's from a sample of chunks: < 1e-4 px apart, which moves
    # pixels across the DoG's G_low > G_high edge, many of them next to the beam)
    fitted = res["beam/fitted"].values.astype(np.float64)
    processed = preprocess.preprocess(data, fitted, prep, counts=counts)
    images = vdf.vdf_images(processed, vectors, vd.radius, subpixel=vd.subpixel).compute()
    stored = res["vdf/images"].values
    np.testing.assert_allclose(images, stored, rtol=1e-4, atol=1e-4 * float(np.abs(stored).max()))

    # watershed and merging of the stored VDF images give the stored crystals
    labels = watershed_stack(da.from_array(stored, chunks=(1, ny, nx)), cfg.watershed).compute()
    np.testing.assert_array_equal(labels, res["vdf/labels"].values)
    segments, source = segments_from_labels(stored, labels)
    merged = merge_vdf_segments(segments, source, vectors, cfg.merge)
    merged = drop_radial_pairs(merged, stored, cfg.merge, radius=vd.radius)
    merged = drop_shared_reflections(merged, stored, cfg.merge)
    # the folding's lattice rules look at the spots, from the stored peak table
    from scipy import sparse
    from spedflow.segment import area_reflections, member_positions, spot_offsets
    table = [res["peaks"].values]
    offsets, weights = spot_offsets(segments, source, vectors, table, detector_shape=(ky, kx),
                                    scan_shape=(ny, nx), search_radius=2.0 * vd.radius)
    measured = member_positions(merged.members, merged.segment_members, source, vectors,
                                offsets, weights)
    masks = sparse.csr_matrix(merged.summed.reshape(len(merged.summed), -1))
    seen_in = area_reflections(masks, vectors, table, scan_shape=(ny, nx), detector_shape=(ky, kx),
                               radius=attrs["resolved"]["vectors"]["cluster_radius"])
    merged = fold_fragments(merged, stored, cfg.merge, measured=measured, seen_in=seen_in)
    assert len(merged.summed) == attrs["counts"]["segments"]
    np.testing.assert_allclose(merged.summed, res["segments/maps"].values, rtol=1e-5,
                               atol=1e-6 * float(merged.summed.max()))


# ------------------------------------------------------------------------------- interop

@pytest.mark.parametrize("as_dask", [False, True])
def test_from_array_round_trip(tmp_path, as_dask):
    from spedflow.simulate import simulate_array
    arr, _ = simulate_array(scan=(9, 11), detector=24, crystals=2, seed=3)
    src = da.from_array(arr, chunks=(4, 5, 24, 24)) if as_dask else arr
    path = spedflow.from_array(src, tmp_path / "a.zarr", scan_step=(2.5, "nm"),
                               reciprocal_scale=0.05, progress=False)
    x = spedflow.open_store(path)
    assert x.dims == ("scan_y", "scan_x", "ky", "kx") and x.dtype == arr.dtype
    np.testing.assert_array_equal(x.values, arr)
    np.testing.assert_allclose(np.diff(x.scan_x.values), 2.5)
    assert x.scan_x.attrs["units"] == "nm"
    np.testing.assert_allclose(np.diff(x.ky.values), 0.05)
    assert x.ky.attrs["units"] == "1/nm"
    assert x.attrs["spedflow"]["complete"] is True


def test_a_crop_of_a_store_keeps_its_calibration(sim_store, tmp_path):
    """``from_array(open_store(S)[...])``, the crop the binning error suggests: the part's
    patterns, the store's scan step and detector scale, read lazily."""
    x = spedflow.open_store(sim_store)
    part = spedflow.from_array(x[:20, 4:28], tmp_path / "crop.zarr", progress=False)
    y = spedflow.open_store(part)
    np.testing.assert_array_equal(y.values, x[:20, 4:28].values)
    for name in ("scan_step", "reciprocal_scale"):
        assert y.attrs["spedflow"][name] == x.attrs["spedflow"][name]
    assert y.attrs["spedflow"]["source"].startswith("a part of ")
    # a crop with a stride: its step is that many of the store's
    step, scale = (x.attrs["spedflow"][k]["value"] for k in ("scan_step", "reciprocal_scale"))
    assert step and scale  # the simulated store is calibrated
    for crop, f_scan, f_det in [(x[::2, ::2], 2, 1), (x[1:, :, ::2, ::2], 1, 2),
                                (x[::-3, ::3], 3, 1)]:
        y = spedflow.open_store(spedflow.from_array(crop, tmp_path / "s.zarr", overwrite=True,
                                                    progress=False))
        assert y.attrs["spedflow"]["scan_step"]["value"] == pytest.approx(f_scan * step, rel=1e-12)
        assert y.attrs["spedflow"]["reciprocal_scale"]["value"] == pytest.approx(f_det * scale,
                                                                                 rel=1e-12)
        np.testing.assert_allclose(np.diff(y.scan_x.values), f_scan * step)
    # one step cannot describe axes cropped unlike each other, or uneven positions
    with pytest.raises(ParameterError, match="cropped with different steps"):
        spedflow.from_array(x[::2, ::3], tmp_path / "u.zarr", progress=False)
    with pytest.raises(ParameterError, match="not evenly spaced"):
        spedflow.from_array(x[[0, 1, 5]], tmp_path / "u.zarr", progress=False)
    with pytest.raises(ParameterError, match="repeats scan_y positions"):
        spedflow.from_array(x[[0, 0]], tmp_path / "u.zarr", progress=False)
    assert not (tmp_path / "u.zarr").exists()


@pytest.mark.parametrize("text", ["2.5 nm", "2.5:nm", "2.5nm", (2.5, "nm"),
                                  {"value": 2.5, "units": "nm"}])
def test_from_array_takes_the_calibrations_ingest_takes(tmp_path, text, capsys):
    arr = np.ones((2, 2, 4, 4), np.uint16)
    y = spedflow.open_store(spedflow.from_array(arr, tmp_path / "a.zarr", scan_step=text,
                                                reciprocal_scale="0.03:1/A", progress=False))
    assert "write store" not in capsys.readouterr().err  # progress=False: no bar
    assert y.attrs["spedflow"]["scan_step"] == {"value": 2.5, "units": "nm"}
    assert y.attrs["spedflow"]["reciprocal_scale"] == {"value": 0.03, "units": "1/A"}


def test_from_array_of_a_signal_without_calibration(tmp_path):
    """A HyperSpy signal (here its attributes only: HyperSpy is optional) whose axes are
    uncalibrated ("<undefined>" units, scale 1) or run backwards (a negative scale)."""
    from types import SimpleNamespace as NS
    arr = np.ones((2, 3, 4, 4), np.uint16)

    def signal(nav, sig):
        axes = NS(navigation_dimension=2, signal_dimension=2,
                  navigation_axes=[NS(scale=nav[0], units=nav[1])] * 2,
                  signal_axes=[NS(scale=sig[0], units=sig[1])] * 2)
        return NS(axes_manager=axes, data=arr, metadata=NS(General=NS(title="t")))

    y = spedflow.open_store(spedflow.from_array(signal((1.0, "<undefined>"), (1.0, "")),
                                                tmp_path / "a.zarr", progress=False))
    assert y.attrs["spedflow"]["scan_step"] == {"value": 1.0, "units": "px"}
    assert y.attrs["spedflow"]["reciprocal_scale"] == {"value": 1.0, "units": "px"}
    y = spedflow.open_store(spedflow.from_array(signal((-2.5, "nm"), (0.03, "1/nm")),
                                                tmp_path / "b.zarr", progress=False))
    assert y.attrs["spedflow"]["scan_step"] == {"value": 2.5, "units": "nm"}
    assert y.attrs["spedflow"]["reciprocal_scale"] == {"value": 0.03, "units": "1/nm"}


@pytest.mark.parametrize("kw, match", [
    (dict(scan_step=-3), "must be > 0"), (dict(scan_step=0), "must be > 0"),
    (dict(scan_step="3 parsecs"), "are not a length"),
    (dict(reciprocal_scale="big"), "must look like"),
])
def test_from_array_refuses_a_bad_calibration(tmp_path, kw, match):
    with pytest.raises(ParameterError, match=match):
        spedflow.from_array(np.ones((2, 2, 4, 4), np.uint16), tmp_path / "a.zarr",
                            progress=False, **kw)
    assert not (tmp_path / "a.zarr").exists()


@pytest.mark.parametrize("data, exc, match", [
    (np.ones((4, 4, 8)), InputError, "4-D"),
    (np.ones((0, 4, 8, 8)), InputError, "empty"),
    (np.ones((2, 2, 4, 4), dtype=complex), InputError, "dtype"),
    ([[1, 2], [3, 4]], ParameterError, "data"),
])
def test_from_array_bad_input(tmp_path, data, exc, match):
    with pytest.raises(exc, match=match):
        spedflow.from_array(data, tmp_path / "bad.zarr", progress=False)
    assert not (tmp_path / "bad.zarr").exists()


def test_from_array_refuses_existing(tmp_path):
    arr = np.ones((2, 2, 4, 4), np.uint16)
    path = spedflow.from_array(arr, tmp_path / "a.zarr", progress=False)
    with pytest.raises(FileExistsError, match="exists"):
        spedflow.from_array(arr, path, progress=False)
    spedflow.from_array(2 * arr, path, overwrite=True, progress=False)
    np.testing.assert_array_equal(spedflow.open_store(path).values, 2 * arr)


def test_to_hyperspy(sim_store, vdf_result):
    pytest.importorskip("hyperspy.api")
    sig = spedflow.to_hyperspy(sim_store)
    x = spedflow.open_store(sim_store)
    assert sig._lazy
    assert sig.data.shape == x.shape
    nav, sg = sig.axes_manager.navigation_axes, sig.axes_manager.signal_axes
    # HyperSpy lists navigation axes x first; both scan axes share the step
    assert nav[0].scale == pytest.approx(x.attrs["spedflow"]["scan_step"]["value"])
    assert sg[0].scale == pytest.approx(x.attrs["spedflow"]["reciprocal_scale"]["value"])
    np.testing.assert_allclose(sg[0].offset, x.kx.values[0])
    np.testing.assert_array_equal(np.asarray(sig.inav[5, 3].data), x[3, 5].values)

    maps = spedflow.to_hyperspy(vdf_result, "segment_maps", lazy=False)
    ref = spedflow.open_result(vdf_result)["segments/maps"].values
    np.testing.assert_array_equal(maps.data, ref)
    assert maps.axes_manager.navigation_shape == (ref.shape[0],)
    back = spedflow.from_array(spedflow.to_hyperspy(sim_store), sim_store.parent / "hs_back.zarr",
                               progress=False)
    np.testing.assert_array_equal(spedflow.open_store(back).values, x.values)
    with pytest.raises(ParameterError, match="what"):
        spedflow.to_hyperspy(vdf_result, "nonsense")
    with pytest.raises(InputError, match="nmf/factors"):
        spedflow.to_hyperspy(vdf_result, "nmf_factors")


# ---------------------------------------------------------------------- the names exported

@pytest.mark.parametrize("name", ["simulate", "evaluate",
                                  "open_store", "open_result", "segment", "load_config", "write_report", "from_array", "to_hyperspy",
                                  "default_config_toml", "ingest", "export_result"])
def test_public_functions_stay_functions(name):
    """``spedflow.<name>`` is the function even after its submodule was imported."""
    for module in ("spedflow.simulate", "spedflow.evaluate", "spedflow.export", "spedflow.io"):
        importlib.import_module(module)
    obj = getattr(spedflow, name)
    assert callable(obj) and not isinstance(obj, type(spedflow)), f"spedflow.{name} is {obj!r}"


def test_stage_packages_exported():
    for pkg, names in {
        "preprocess": ["bin_nav", "beam_centres", "estimate_beam_radius", "centres_for_alignment",
                       "resolve", "preprocess", "align"],
        "peaks": ["find_peaks", "peaks_block", "peak_histogram", "unique_vectors", "VectorParams",
                  "PeakParams", "resolve", "position_scatter"],
        "vdf": ["vdf_images", "preprocessed_vdf_images", "annular_vdf", "VDFParams", "resolve"],
        "decompose": ["poisson_statistics", "normalised_matrix", "scree", "choose_n_components",
                      "nmf", "undo_normalisation", "beam_mask", "classify_components"],
        "segment_": ["watershed_image", "watershed_stack", "segments_from_labels",
                     "merge_vdf_segments", "drop_radial_pairs", "drop_shared_reflections",
                     "fold_fragments", "virtual_patterns",
                     "merge_components"],
    }.items():
        mod = getattr(spedflow, pkg)
        for n in names:
            assert callable(getattr(mod, n, None)), f"spedflow.{pkg}.{n}"


def test_errors_name_the_file_only_when_it_is_the_files(tmp_path):
    """A bad value from --set is not blamed on the config file; one in the file is;
    a section of the other workflow is named as such (with the file it came from)."""
    from spedflow.api import nested_overrides
    ok, bad = tmp_path / "ok.toml", tmp_path / "bad.toml"
    ok.write_text("[peaks]\nnum_sigma = 2\n")
    bad.write_text("[peaks]\nnum_sigma = 0\n")
    with pytest.raises(ParameterError) as e:
        spedflow.load_config("vdf", ok, {"peaks.threshold": -1})
    assert "ok.toml" not in str(e.value) and "[peaks] `threshold`" in str(e.value)
    with pytest.raises(ParameterError, match=r"bad.toml: \[peaks\] `num_sigma`"):
        spedflow.load_config("vdf", bad)
    nmf_file = tmp_path / "nmf.toml"
    nmf_file.write_text(spedflow.default_config_toml("nmf"))
    with pytest.raises(ParameterError, match=r"nmf.toml: section \[\w+\] belongs to the nmf workflow"):
        spedflow.load_config("vdf", nmf_file)
    # watch reads the descan setting through the same normalisation
    assert nested_overrides({"preprocess.descan": "quadratic", "preprocess": {"nav_binning": 2}}) \
        == {"preprocess": {"descan": "quadratic", "nav_binning": 2}}
