"""Readers, ingest and store_info: exact round trips, refused inputs, resumability."""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from pathlib import Path

import dask
import dask.array as da
import h5py
import numpy as np
import pytest
import zarr

from spedflow.errors import InputError, ParameterError, StoreExistsError
from spedflow.io import (format_info, ingest, open_input, open_source, store_info,
                         verify_store)
from spedflow.io import _ingest


@pytest.fixture(autouse=True)
def _synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


def _data(shape=(5, 7, 6, 8), dtype="<u2", seed=0):
    rng = np.random.default_rng(seed)
    return rng.poisson(4.0, shape).astype(dtype)


def _tree_digest(path: Path) -> str:
    """Hash of every file's relative path and bytes under ``path``."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _check_store(store: Path, expected: np.ndarray):
    arr, meta = open_input(store)
    out = arr[...]
    assert out.shape == expected.shape
    assert out.dtype == expected.dtype.newbyteorder("=")
    assert out.dtype.byteorder in ("=", "|", "<")
    np.testing.assert_array_equal(out, expected)
    assert meta["kind"] == "input" and meta["complete"] is True
    assert verify_store(store) == []
    return meta


# --------------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype", ["<u2", ">u2", "u1", "<f4", ">i4"])
@pytest.mark.parametrize("fortran", [False, True])
def test_npy_round_trip(tmp_path, dtype, fortran):
    x = _data(dtype=dtype)
    np.save(tmp_path / "x.npy", np.asfortranarray(x) if fortran else x)
    out = ingest(tmp_path / "x.npy", tmp_path / "x.zarr", chunk_bytes=3 * 6 * 8 * 2, progress=False)
    meta = _check_store(out, x)
    assert meta["original_dtype"] == np.dtype(dtype).str
    assert meta["original_shape"] == list(x.shape)
    assert meta["format"] == "npy" and meta["source"] == str((tmp_path / "x.npy").resolve())


@pytest.mark.parametrize("chunks", [(5, 7, 6, 8), (1, 1, 6, 8), (2, 3, 6, 8), (4, 5, 6, 8)])
def test_lazy_reader_equals_array_for_chunkings(tmp_path, chunks):
    x = _data(dtype=">u2")
    np.save(tmp_path / "x.npy", x)
    x.tofile(tmp_path / "x.raw")
    for kw, f in (({}, "x.npy"), ({"shape": x.shape, "dtype": ">u2"}, "x.raw")):
        arr, _ = open_source(tmp_path / f, chunks=chunks, **kw)
        assert arr.chunks == da.core.normalize_chunks(chunks, x.shape)
        np.testing.assert_array_equal(arr.compute(), x)
        assert arr.dtype == np.dtype(">u2")


def test_memmap_graph_does_not_embed_data(tmp_path):
    x = _data(shape=(16, 16, 32, 32))
    np.save(tmp_path / "x.npy", x)
    arr, _ = open_source(tmp_path / "x.npy", chunks=(4, 4, 32, 32))
    assert len(pickle.dumps(dict(arr.__dask_graph__()))) < x.nbytes / 10


@pytest.mark.parametrize("dtype,offset", [("<u2", 0), (">u2", 0), (">u2", 512), ("<f4", 37)])
def test_raw_round_trip(tmp_path, dtype, offset):
    x = _data(dtype=dtype)
    with open(tmp_path / "x.raw", "wb") as fh:
        fh.write(b"\xab" * offset)
        fh.write(x.tobytes())
    out = ingest(tmp_path / "x.raw", tmp_path / "x.zarr", shape=x.shape, dtype=dtype,
                 offset=offset, progress=False, chunk_bytes=2 * 6 * 8 * 4)
    _check_store(out, x)


def test_raw_other_extension_with_shape(tmp_path):
    x = _data(dtype="u1")
    x.tofile(tmp_path / "scan.frames")
    arr, meta = open_source(tmp_path / "scan.frames", shape=x.shape, dtype="u1")
    np.testing.assert_array_equal(arr.compute(), x)
    assert meta["format"] == "raw"


@pytest.mark.parametrize("data, stored, given, warns", [
    ("counts", ">u2", "<u2", True),    # a Merlin-like big-endian file read as little-endian
    ("counts", ">u2", ">u2", False),
    ("counts", "<u2", "<u2", False),
    ("counts", "<u2", ">u2", True),
    ("counts", ">i4", "<i4", True),
    ("ccd", "<u2", "<u2", False),      # an offset of ~1000 and read-out noise: no pattern
    ("counts", "u1", "u1", False),     # one byte has no order
])
def test_raw_in_the_wrong_byte_order_is_warned_about(tmp_path, data, stored, given, warns):
    rng = np.random.default_rng(1)
    shape = (6, 8, 24, 24)
    x = rng.poisson(2.0, shape) if data == "counts" else rng.normal(1000, 30, shape)
    x.astype(stored).tofile(tmp_path / "x.raw")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        open_source(tmp_path / "x.raw", shape=shape, dtype=given)
    said = [str(w.message) for w in seen if "byte order" in str(w.message)]
    assert bool(said) == warns, said
    if warns:  # names the byte order to give instead
        assert repr(np.dtype(given).newbyteorder("S").str) in said[0]


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_source_round_trip(tmp_path, zarr_format):
    x = _data(dtype=">u2" if zarr_format == 2 else "<u2")
    z = zarr.open_array(str(tmp_path / "src.zarr"), mode="w", shape=x.shape, chunks=(2, 3, 6, 8),
                        dtype=x.dtype, zarr_format=zarr_format)
    z[...] = x
    out = ingest(tmp_path / "src.zarr", tmp_path / "x.zarr", progress=False)
    _check_store(out, x)


def test_spedflow_store_as_source_keeps_calibration(tmp_path):
    x = _data()
    np.save(tmp_path / "x.npy", x)
    first = ingest(tmp_path / "x.npy", tmp_path / "a.zarr", scan_step="12.8 nm",
                   reciprocal_scale=(0.02, "1/nm"), progress=False)
    second = ingest(first, tmp_path / "b.zarr", chunk_bytes=6 * 8 * 2, progress=False)
    meta = _check_store(second, x)
    assert meta["scan_step"] == {"value": 12.8, "units": "nm"}
    assert meta["reciprocal_scale"] == {"value": 0.02, "units": "1/nm"}
    assert meta["original_source"] == str((tmp_path / "x.npy").resolve())


def _signal_dict(x, scales=(5.0, 5.0, 0.01, 0.01), units=("nm", "nm", "1/nm", "1/nm")):
    axes = [dict(name=n, size=s, scale=sc, offset=0.0, units=u, navigate=nv)
            for n, s, sc, u, nv in zip(("y", "x", "ky", "kx"), x.shape, scales, units,
                                       (True, True, False, False))]
    return dict(data=x, axes=axes, metadata={"General": {"title": "t"}, "Signal": {"signal_type": ""}},
                original_metadata={}, tmp_parameters={}, attributes={"_lazy": False},
                learning_results={}, models={}, package_info={"name": "", "version": ""})


def test_hspy_round_trip(tmp_path):
    hspy = pytest.importorskip("rsciio.hspy")
    x = _data()
    hspy.file_writer(str(tmp_path / "x.hspy"), _signal_dict(x))
    out = ingest(tmp_path / "x.hspy", tmp_path / "x.zarr", progress=False)
    meta = _check_store(out, x)
    assert meta["scan_step"] == {"value": 5.0, "units": "nm"}
    assert meta["reciprocal_scale"] == {"value": 0.01, "units": "1/nm"}


def test_hspy_zero_or_negative_scales(tmp_path):
    """A scan step of 0 is no calibration (it read "scan step 0 nm"): left unset with one
    warning naming the option; a negative detector scale is an axis running the other
    way, its step the magnitude."""
    hspy = pytest.importorskip("rsciio.hspy")
    x = _data()
    hspy.file_writer(str(tmp_path / "x.hspy"), _signal_dict(x, scales=(0.0, 0.0, 0.01, -0.01)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meta = _check_store(ingest(tmp_path / "x.hspy", tmp_path / "x.zarr", progress=False), x)
    ours = [str(w.message) for w in caught if "is not a step" in str(w.message)]
    assert meta["scan_step"] == {"value": None, "units": None}
    assert meta["reciprocal_scale"] == {"value": 0.01, "units": "1/nm"}
    assert len(ours) == 1 and "scale 0 is not a step" in ours[0] and "--scan-step" in ours[0], ours
    with warnings.catch_warnings(record=True) as caught:  # a step given: nothing to warn about
        warnings.simplefilter("always")
        meta = _check_store(ingest(tmp_path / "x.hspy", tmp_path / "y.zarr", scan_step=2.0,
                                   progress=False), x)
    assert not [w for w in caught if "is not a step" in str(w.message)]
    assert meta["scan_step"] == {"value": 2.0, "units": "nm"}
    # one scan axis without a step, the other with one: that one, silently
    hspy.file_writer(str(tmp_path / "m.hspy"), _signal_dict(x, scales=(0.0, 3.0, 0.01, 0.01)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meta = _check_store(ingest(tmp_path / "m.hspy", tmp_path / "m.zarr", progress=False), x)
    assert meta["scan_step"] == {"value": 3.0, "units": "nm"}
    assert not [w for w in caught if "is not a step" in str(w.message) or "different" in str(w.message)]


def test_hspy_signal_axes_first(tmp_path):
    """Signal axes marked by navigate=False are moved last, whatever their position."""
    hspy = pytest.importorskip("rsciio.hspy")
    x = _data()
    stored = np.ascontiguousarray(np.moveaxis(x, (2, 3), (0, 1)))  # (ky, kx, y, x)
    sig = _signal_dict(stored)
    for ax, nav in zip(sig["axes"], (False, False, True, True)):
        ax["navigate"] = nav
    hspy.file_writer(str(tmp_path / "x.hspy"), sig)
    arr, _ = open_source(tmp_path / "x.hspy")
    np.testing.assert_array_equal(arr.compute(), x)


def test_zspy_round_trip(tmp_path):
    zspy = pytest.importorskip("rsciio.zspy")
    x = _data()
    try:
        zspy.file_writer(str(tmp_path / "x.zspy"), _signal_dict(x))
    except Exception as exc:  # rosettasciio's writer still uses zarr-2 store classes
        pytest.skip(f"rosettasciio cannot write .zspy with zarr {zarr.__version__}: {exc}")
    out = ingest(tmp_path / "x.zspy", tmp_path / "x.zarr", progress=False)
    _check_store(out, x)


def test_emd_ncem_round_trip(tmp_path):
    """NCEM EMD stores the array reversed (dim1 = fastest axis); rosettasciio undoes it."""
    x = _data()
    with h5py.File(tmp_path / "x.emd", "w") as f:
        f.attrs["version_major"], f.attrs["version_minor"] = 0, 2
        g = f.create_group("data/scan")
        g.attrs["emd_group_type"] = 1
        g.create_dataset("data", data=x.T)
        dims = [("y", "nm", 2.0), ("x", "nm", 2.0), ("ky", "1/nm", 0.1), ("kx", "1/nm", 0.1)][::-1]
        for i, (name, units, step) in enumerate(dims):
            d = g.create_dataset(f"dim{i + 1}", data=np.arange(x.T.shape[i]) * step)
            d.attrs["name"], d.attrs["units"] = name, units
    out = ingest(tmp_path / "x.emd", tmp_path / "x.zarr", progress=False)
    meta = _check_store(out, x)
    assert meta["scan_step"] == {"value": 2.0, "units": "nm"}
    assert meta["reciprocal_scale"]["value"] == pytest.approx(0.1)


def test_zarr_group_lists_its_nested_arrays(tmp_path):
    """A Zarr group without `data`: the arrays of 2+ dimensions it holds, at any depth,
    are named by their paths, which --array then takes."""
    import zarr
    x = _data()
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_group("scan").create_array("frames", shape=x.shape, dtype=x.dtype)[:] = x
    g.create_array("flat", shape=(3,), dtype="u2")
    with pytest.raises(InputError, match=r"--array \(`array=` in Python\), one of \['scan/frames'\]"):
        open_source(tmp_path / "g.zarr")
    _check_store(ingest(tmp_path / "g.zarr", tmp_path / "o.zarr", array="scan/frames", progress=False), x)
    zarr.open_group(str(tmp_path / "e.zarr"), mode="w").create_array("flat", shape=(3,), dtype="u2")
    with pytest.raises(InputError, match="holds no array of two or more dimensions"):
        open_source(tmp_path / "e.zarr")


def test_hdf5_named_dataset_and_fpd_layout(tmp_path):
    x = _data(dtype=">u2")
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f.create_dataset("entry/frames", data=x, chunks=(1, 2, 6, 8), compression="gzip")
        f.create_dataset("entry/other", data=np.zeros((3, 3)))
    with pytest.raises(InputError, match=r"--array \(`array=` in Python\), one of \['entry/frames', 'entry/other'\]"):
        open_source(tmp_path / "g.h5")
    out = ingest(tmp_path / "g.h5", tmp_path / "g.zarr", array="entry/frames", progress=False)
    _check_store(out, x)

    with h5py.File(tmp_path / "fpd.hdf5", "w") as f:
        f.create_dataset("fpd_expt/fpd_data/data", data=x[:, :, None], chunks=(1, 1, 1, 6, 8))
    for chunks in [(1, 1, 6, 8), (2, 3, 6, 8), (5, 7, 6, 8)]:
        arr, meta = open_source(tmp_path / "fpd.hdf5", chunks=chunks)
        assert meta["original_shape"] == [5, 7, 1, 6, 8]
        np.testing.assert_array_equal(arr.compute(), x)
    _check_store(ingest(tmp_path / "fpd.hdf5", tmp_path / "fpd.zarr", progress=False), x)


def test_dimensionality_normalised(tmp_path):
    x = _data()
    np.save(tmp_path / "one.npy", x[0, 0])
    with pytest.warns(RuntimeWarning, match="single"):
        arr, _ = open_source(tmp_path / "one.npy")
    assert arr.shape == (1, 1, 6, 8)
    np.testing.assert_array_equal(arr.compute()[0, 0], x[0, 0])
    np.save(tmp_path / "line.npy", x[0])
    arr, _ = open_source(tmp_path / "line.npy")
    assert arr.shape == (1, 7, 6, 8)
    np.testing.assert_array_equal(arr.compute()[0], x[0])
    np.save(tmp_path / "five.npy", x[:, None])
    arr, _ = open_source(tmp_path / "five.npy")
    assert arr.shape == x.shape
    np.testing.assert_array_equal(arr.compute(), x)


@pytest.mark.parametrize("units,kept", [("1/nm", True), ("nm-1", True), ("mrad", True), ("cm", False),
                                        ("um", False), ("eV", False)])
def test_detector_calibration_in_other_units_left_unset(tmp_path, units, kept):
    """A detector 'calibration' in a length (ASTAR's cm) labelled the report's k axes in cm."""
    hspy = pytest.importorskip("rsciio.hspy")
    x = _data()
    hspy.file_writer(str(tmp_path / "x.hspy"), _signal_dict(x, units=("nm", "nm", units, units)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meta = _check_store(ingest(tmp_path / "x.hspy", tmp_path / "x.zarr", progress=False), x)
    ours = [str(w.message) for w in caught if "detector calibration" in str(w.message)]
    assert meta["scan_step"] == {"value": 5.0, "units": "nm"}
    if kept:
        assert meta["reciprocal_scale"] == {"value": 0.01, "units": units} and not ours
    else:
        assert meta["reciprocal_scale"] == {"value": None, "units": None}
        assert len(ours) == 1 and f"(0.01 {units} per pixel) is not a reciprocal-space scale" in ours[0]
        assert "--reciprocal-scale" in ours[0] and "\n" not in ours[0]
    with warnings.catch_warnings(record=True) as caught:  # an override silences it
        warnings.simplefilter("always")
        meta = _check_store(ingest(tmp_path / "x.hspy", tmp_path / "y.zarr", reciprocal_scale=0.02,
                                   progress=False), x)
    assert not [w for w in caught if "detector calibration" in str(w.message)]
    assert meta["reciprocal_scale"] == {"value": 0.02, "units": "1/nm"}


def _stacks(tmp: Path, x: np.ndarray) -> list[tuple[Path, dict, np.ndarray]]:
    """The (n, ky, kx) stack ``x`` in every reader that can give a 3-D array:
    (path, reader keywords, the patterns it should give in order)."""
    np.save(tmp / "c.npy", x)
    np.save(tmp / "f.npy", np.asfortranarray(x))
    x.tofile(tmp / "s.raw")
    zarr.save_array(str(tmp / "s.zarr"), x)
    with h5py.File(tmp / "s.h5", "w") as f:
        f.create_dataset("frames", data=x, chunks=(5, 6, 8))
    with h5py.File(tmp / "fpd.hdf5", "w") as f:  # 5-D with singleton navigation axes
        f.create_dataset("fpd_expt/fpd_data/data", data=x[None, :, None])
    _write_mib(tmp / "s.mib", x, declared=len(x))  # rosettasciio gives a stack (equal timestamps)
    return [(tmp / "c.npy", {}, x), (tmp / "f.npy", {}, x),
            (tmp / "s.raw", dict(shape=x.shape, dtype=x.dtype), x), (tmp / "s.zarr", {}, x),
            (tmp / "s.h5", dict(array="frames"), x), (tmp / "fpd.hdf5", {}, x),
            (tmp / "s.mib", {}, x[:, ::-1])]  # rosettasciio flips the rows of Merlin frames


def test_stack_without_scan_shape_refused(tmp_path):
    """A stack of 12 patterns was read silently as a 1 x 12 line scan."""
    for path, kw, _ in _stacks(tmp_path, _data((12, 6, 8))):
        with pytest.raises(InputError, match=r"is a stack of 12 patterns \(shape \(12, 6, 8\)\) with no scan "
                           r"shape; give the scan shape Y,X \(--scan, or `scan=` in Python\) with Y\*X = 12, "
                           r"e\.g\. 3,4 \(1,12 for a line scan\)") as info:
            open_source(path, **kw)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
        with pytest.raises(InputError, match="give the scan shape"):
            ingest(path, tmp_path / "x.zarr", progress=False, **kw)
        assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "x.zarr.partial").exists()


@pytest.mark.parametrize("scan", [(3, 4), (1, 12), (12, 1), [6, 2], (np.int64(2), np.int64(6))])
def test_stack_with_scan_shape(tmp_path, scan):
    x = _data((12, 6, 8))
    for path, kw, expected in _stacks(tmp_path, x):
        want = expected.reshape(tuple(int(v) for v in scan) + x.shape[1:])
        for chunks in (None, (1, 1, 6, 8), (2, 1, 6, 8), want.shape):
            arr, meta = open_source(path, scan=scan, chunks=chunks, **kw)
            assert meta["original_shape"][-2:] == [6, 8]
            np.testing.assert_array_equal(arr.compute(), want)
    out = ingest(tmp_path / "c.npy", tmp_path / "c.zarr", scan=scan, chunk_bytes=3 * 6 * 8 * 2, progress=False)
    _check_store(out, x.reshape(want.shape))


def test_scan_shape_rerasters_and_is_checked(tmp_path):
    x = _data((2, 6, 6, 8))
    np.save(tmp_path / "x.npy", x)
    with pytest.warns(RuntimeWarning, match=r"has a 2 x 6 scan; the scan shape given, 3 x 4, "
                                            "re-rasters its patterns row by row"):
        arr, _ = open_source(tmp_path / "x.npy", scan=(3, 4))  # a scan recorded with the wrong shape
    np.testing.assert_array_equal(arr.compute(), x.reshape(3, 4, 6, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file's own scan shape, or a stack's: no warning
        assert open_source(tmp_path / "x.npy", scan=(2, 6))[0].shape == (2, 6, 6, 8)
        np.save(tmp_path / "stack.npy", x.reshape(12, 6, 8))
        assert open_source(tmp_path / "stack.npy", scan=(3, 4))[0].shape == (3, 4, 6, 8)
    np.save(tmp_path / "prime.npy", x.reshape(12, 6, 8)[:11])
    assert open_source(tmp_path / "prime.npy")[0].shape == (1, 11, 6, 8)  # only a line is possible
    np.save(tmp_path / "one.npy", x[:1, 0])
    with pytest.warns(RuntimeWarning, match="single"):
        assert open_source(tmp_path / "one.npy")[0].shape == (1, 1, 6, 8)
    assert open_source(tmp_path / "one.npy", scan=(1, 1))[0].shape == (1, 1, 6, 8)
    with pytest.raises(ParameterError, match=r"^`scan` 5 x 3 is 15 positions, but '.*x\.npy' holds 12 "
                       r"patterns \(shape \(2, 6, 6, 8\)\)$"):
        open_source(tmp_path / "x.npy", scan=(5, 3))
    for bad in [(0, 12), (12,), (2, 3, 2), (2.0, 6), ("3", "4"), "3,4", (True, 12), 12, (-3, -4)]:
        with pytest.raises(ParameterError, match="`scan` must be two positive integers"):
            open_source(tmp_path / "x.npy", scan=bad)
    with pytest.raises(ParameterError, match="`scan` 5 x 3"):
        ingest(tmp_path / "x.npy", tmp_path / "x.zarr", scan=(5, 3), progress=False)
    assert not (tmp_path / "x.zarr").exists()


def test_cli_ingest_scan_shape(tmp_path, capsys):
    from spedflow.cli import main
    x = _data((12, 6, 8))
    np.save(tmp_path / "s.npy", x)
    assert main(["ingest", str(tmp_path / "s.npy"), str(tmp_path / "s.zarr")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("spedflow: error:") and "--scan" in err
    assert not (tmp_path / "s.zarr").exists()
    assert main(["ingest", str(tmp_path / "s.npy"), str(tmp_path / "s.zarr"), "--scan", "5,3"]) == 2
    assert "is 15 positions" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "s.npy"), str(tmp_path / "s.zarr"), "--scan", "3,4"]) == 0
    _check_store(tmp_path / "s.zarr", x.reshape(3, 4, 6, 8))


def test_calibration_override_and_info(tmp_path):
    x = _data()
    np.save(tmp_path / "x.npy", x)
    out = ingest(tmp_path / "x.npy", tmp_path / "x.zarr", scan_step=3.5,
                 reciprocal_scale={"value": 0.05, "units": "1/A"}, progress=False)
    info = store_info(out)
    assert info["scan_step"] == {"value": 3.5, "units": "nm"}
    assert info["reciprocal_scale"] == {"value": 0.05, "units": "1/A"}
    d = info["data"]
    assert d["shape"] == list(x.shape) and d["dtype"] == "uint16" and d["shards"] is None
    assert d["nbytes"] == x.nbytes
    assert d["stored_bytes"] == sum(p.stat().st_size for p in (out / "data").rglob("*") if p.is_file())
    assert d["ratio"] == pytest.approx(x.nbytes / d["stored_bytes"])
    assert info["truth"] is False and info["complete"] is True and info["kind"] == "input"
    text = format_info(info)
    assert "3.5 nm" in text and "uint16" in text and str(tuple(x.shape)) in text


def test_shards(tmp_path):
    x = _data(shape=(9, 10, 6, 8))
    np.save(tmp_path / "x.npy", x)
    out = ingest(tmp_path / "x.npy", tmp_path / "x.zarr", chunk_bytes=4 * 6 * 8 * 2,
                 shards=(4, 4), progress=False)
    _check_store(out, x)
    info = store_info(out)["data"]
    assert info["chunks"] == [2, 2, 6, 8] and info["shards"] == [4, 4, 6, 8]


def test_progress_bar_draws_one_line(tmp_path, capsys):
    x = _data()
    np.save(tmp_path / "x.npy", x)
    ingest(tmp_path / "x.npy", tmp_path / "x.zarr", chunk_bytes=6 * 8 * 2 * 6, progress=True)
    err = capsys.readouterr().err
    lines = err.splitlines()  # not a tty: a line per tenth of the chunks, then the end
    assert 1 <= len(lines) <= 10 and "\r" not in err and "chunks" in err and "MB/s" in err
    import re
    done, total = re.search(r"(\d+)/(\d+) chunks", lines[-1]).groups()
    assert done == total
    ingest(tmp_path / "x.npy", tmp_path / "y.zarr", progress=False)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------- bad input

def _write_npy_header(path: Path, header: dict, payload: bytes = b""):
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(payload)


def _bad_cases(tmp: Path):
    x = _data()
    np.save(tmp / "ok.npy", x)
    x.tofile(tmp / "ok.raw")
    (tmp / "short.raw").write_bytes(x.tobytes()[:-10])
    np.save(tmp / "c.npy", x.astype(np.complex64))
    np.save(tmp / "b.npy", x > 2)
    np.save(tmp / "s.npy", np.array(["ab", "cd"]))
    np.save(tmp / "rec.npy", np.zeros(4, dtype=[("a", "u1"), ("b", "f4")]))
    np.save(tmp / "empty.npy", np.zeros((0, 3, 6, 8), "u2"))
    np.save(tmp / "six.npy", np.zeros((2, 2, 2, 2, 3, 3), "u1"))
    np.save(tmp / "vec.npy", np.zeros(7, "u1"))
    _write_npy_header(tmp / "trunc.npy", {"descr": "<u2", "fortran_order": False, "shape": (5, 7, 6, 8)},
                      x.tobytes()[:100])
    _write_npy_header(tmp / "huge.npy", {"descr": "|u1", "fortran_order": False,
                                         "shape": (10**5, 10**5, 10**3, 100)})
    (tmp / "junk.npy").write_bytes(b"not a numpy file at all")
    (tmp / "x.xyz").write_bytes(b"1234")
    (tmp / "plain_dir").mkdir()
    (tmp / "bad.h5").write_bytes(b"\x00" * 64)
    return [
        (InputError, dict(path=tmp / "missing.npy"), "does not exist"),
        (InputError, dict(path=tmp / "x.xyz"), r"unknown file type '\.xyz'; supported: .*\.npy"),
        (InputError, dict(path=tmp / "plain_dir"), "not a Zarr store"),
        (InputError, dict(path=tmp / "short.raw", shape=x.shape, dtype="<u2"),
         f"needs {x.nbytes} bytes, but the file has {x.nbytes - 10} bytes"),
        (InputError, dict(path=tmp / "ok.raw", shape=(5, 7, 6, 9), dtype="<u2"), "needs .* bytes, but the file has"),
        (InputError, dict(path=tmp / "ok.raw", shape=x.shape, dtype="<u2", offset=2), "after a 2-byte header"),
        (ParameterError, dict(path=tmp / "ok.raw"), "needs `shape` and `dtype`"),
        (ParameterError, dict(path=tmp / "ok.raw", shape=x.shape, dtype="nonsense"), "not a NumPy dtype"),
        (ParameterError, dict(path=tmp / "ok.raw", shape="abc", dtype="u2"), "`shape` must be"),
        (ParameterError, dict(path=tmp / "ok.raw", shape=x.shape, dtype="u2", offset=-1), "`offset`"),
        (InputError, dict(path=tmp / "ok.raw", shape=x.shape, dtype="O"), "only integer or float"),
        (ParameterError, dict(path=tmp / "ok.npy", shape=x.shape), "apply to raw binary only"),
        (InputError, dict(path=tmp / "c.npy"), "dtype '<c8'; only integer or float"),
        (InputError, dict(path=tmp / "b.npy"), "only integer or float"),
        (InputError, dict(path=tmp / "s.npy"), "only integer or float"),
        (InputError, dict(path=tmp / "rec.npy"), "only integer or float"),
        (InputError, dict(path=tmp / "empty.npy"), "is empty"),
        (InputError, dict(path=tmp / "six.npy"), "4 non-singleton navigation axes"),
        (InputError, dict(path=tmp / "vec.npy"), "is 1-D"),
        (InputError, dict(path=tmp / "trunc.npy"), "the file has .* bytes"),
        (InputError, dict(path=tmp / "huge.npy"), "declares 1e\\+15 elements"),
        (InputError, dict(path=tmp / "junk.npy"), "not a valid .npy file"),
        (InputError, dict(path=tmp / "bad.h5"), "not a readable HDF5"),
        (ParameterError, dict(path=tmp / "ok.npy", signal_axes=(1, 1)), "`signal_axes`"),
        (ParameterError, dict(path=tmp / "ok.npy", chunks=(1, 2)), "`chunks`"),
    ]


def test_bad_inputs(tmp_path):
    for exc, kwargs, match in _bad_cases(tmp_path):
        kw = dict(kwargs)
        path = kw.pop("path")
        with pytest.raises(exc, match=match):
            open_source(path, **kw)


def test_bad_inputs_are_one_line(tmp_path):
    for exc, kwargs, _ in _bad_cases(tmp_path):
        kw = dict(kwargs)
        with pytest.raises(exc) as info:
            open_source(kw.pop("path"), **kw)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(chunk_bytes=0), "`chunk_bytes` must be >= 1"),
    (dict(chunk_bytes=2.5), "whole number"),
    (dict(shards=(3, 3)), "`shards` must be"),
    (dict(shards=(2, 2, 5, 5)), "`shards` must be"),
    (dict(scan_step=-1.0), "`scan_step` must be > 0"),
    (dict(scan_step="fast"), "`scan_step` must look like"),
    (dict(reciprocal_scale=(1.0,)), "`reciprocal_scale` must be \\(value, units\\)"),
    (dict(reciprocal_scale={"value": 1.0}), "keys value and units"),
    (dict(scan_step="3.03 furlongs"), "are not a length"),
    (dict(reciprocal_scale=(0.03, "nm")), "are not an inverse length"),
    (dict(bogus=1), "unknown ingest option 'bogus'"),
])
def test_bad_ingest_arguments(tmp_path, kwargs, match):
    x = _data()
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(ParameterError, match=match):
        ingest(tmp_path / "x.npy", tmp_path / "x.zarr", chunk_bytes=kwargs.pop("chunk_bytes", 2 * 6 * 8 * 2),
               progress=False, **kwargs)
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "x.zarr.partial").exists()


def test_destination_exists_is_untouched(tmp_path):
    x = _data()
    np.save(tmp_path / "x.npy", x)
    dest = tmp_path / "x.zarr"
    dest.mkdir()
    (dest / "precious.txt").write_text("keep me")
    before = _tree_digest(dest)
    with pytest.raises(StoreExistsError, match="exists; pass --overwrite"):
        ingest(tmp_path / "x.npy", dest, progress=False)
    assert _tree_digest(dest) == before
    # --overwrite replaces only a spedflow input store, never another folder
    with pytest.raises(StoreExistsError, match="not a spedflow input store \\(it is a folder\\)"):
        ingest(tmp_path / "x.npy", dest, overwrite=True, progress=False)
    assert _tree_digest(dest) == before
    # overwriting an input store with a source that fails: untouched, no partial left behind
    store = ingest(tmp_path / "x.npy", tmp_path / "y.zarr", progress=False)
    before = _tree_digest(store)
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(InputError):
        ingest(tmp_path / "bad.npy", store, overwrite=True, progress=False)
    assert _tree_digest(store) == before
    assert not (tmp_path / "y.zarr.partial").exists()
    # a real overwrite replaces it
    _check_store(ingest(tmp_path / "x.npy", store, overwrite=True, progress=False), x)


def test_source_equals_destination_refused(tmp_path):
    x = _data()
    np.save(tmp_path / "x.npy", x)
    store = ingest(tmp_path / "x.npy", tmp_path / "x.zarr", progress=False)
    before = _tree_digest(store)
    with pytest.raises(ParameterError, match="must not be"):
        ingest(store, store, overwrite=True, progress=False)
    assert _tree_digest(store) == before


class _Trap:
    """Unpickling this object would create ``self.path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickled_npy_is_never_unpickled(tmp_path):
    canary = tmp_path / "pwned"
    np.save(tmp_path / "evil.npy", np.array([_Trap(canary), 1], dtype=object), allow_pickle=True)
    assert not canary.exists()
    with pytest.raises(InputError, match="dtype '\\|O'; only integer or float"):
        open_source(tmp_path / "evil.npy")
    with pytest.raises(InputError):
        ingest(tmp_path / "evil.npy", tmp_path / "e.zarr", progress=False)
    assert not canary.exists()
    assert not (tmp_path / "e.zarr").exists()


def test_huge_header_refused_before_allocation(tmp_path):
    """A header claiming 10^15 elements fails on the header alone (no memmap, no array)."""
    _write_npy_header(tmp_path / "huge.npy", {"descr": "<u2", "fortran_order": False,
                                              "shape": (10**5, 10**5, 10**3, 100)})
    with pytest.raises(InputError, match="declares 1e\\+15 elements"):
        ingest(tmp_path / "huge.npy", tmp_path / "h.zarr", progress=False)
    # plausible count but more bytes than the file has
    _write_npy_header(tmp_path / "big.npy", {"descr": "<u2", "fortran_order": False,
                                             "shape": (1000, 1000, 256, 256)})
    with pytest.raises(InputError, match="= 131072000\\d+ bytes with the header, but the file has"):
        open_source(tmp_path / "big.npy")


def _write_mib(path: Path, frames: np.ndarray, declared: int | None) -> bytes:
    """A Merlin .mib of 12-bit frames (384-byte header each, big-endian) and, unless
    ``declared`` is None, a .hdr declaring that many frames."""
    out = bytearray()
    for i, f in enumerate(frames):
        head = (f"MQ1,{i + 1:06d},00384,01,{f.shape[1]:04d},{f.shape[0]:04d},U16,   1x1,01,"
                f"2021-05-07 18:51:10.{i:06d},0.100000,0,0,0,4.000000E+1,5.110000E+2,0,0,0,0,0,0,"
                f"3RX,068,MQ1A,2021-05-07T16:51:10.{i:06d}000Z,100000000ns,12,")
        out += head.encode().ljust(384, b"\0") + f.astype(">u2").tobytes()
    path.write_bytes(bytes(out))
    if declared is not None:
        path.with_suffix(".hdr").write_text(f"HDR,\t\nFrames in Acquisition (Number):\t{declared}\n"
                                            "Frames per Trigger (Number):\t1\nEnd\t\n")
    return bytes(out)


def test_truncated_mib_refused(tmp_path):
    """A cut .mib was read as the scan its complete frames make (rosettasciio shrinks the
    scan), or failed inside rosettasciio (ZeroDivisionError) with no complete frame."""
    x = _data((5, 6, 8))
    frame = 384 + 6 * 8 * 2
    data = _write_mib(tmp_path / "full.mib", x, declared=5)
    arr, meta = open_source(tmp_path / "full.mib")  # rosettasciio flips the frames' rows
    np.testing.assert_array_equal(arr.compute().reshape(x.shape)[:, ::-1], x)
    for cut, declared, match in [
            (3 * frame, 5, "t.hdr declares 5 frames but the file holds 3 "),
            (3 * frame + 100, 5, "t.hdr declares 5 frames but the file holds 3 "),
            (frame - 1, 1, "t.hdr declares 1 frames but the file holds 0 "),
            (3 * frame + 100, None, "holds 3 complete 6 x 8 frames of 480 bytes and 100 bytes of another"),
            (frame - 1, None, "holds 0 complete 6 x 8 frames"),
            (50, None, "holds 0 complete"),
            (2, None, "not a Merlin .mib file")]:
        for f in tmp_path.glob("t.*"):
            f.unlink()
        (tmp_path / "t.mib").write_bytes(data[:cut])
        if declared is not None:
            (tmp_path / "t.hdr").write_text(f"Frames in Acquisition (Number):\t{declared}\n")
        with pytest.raises(InputError, match=f"'{tmp_path / 't.mib'}' (is truncated: )?.*{match}") as info:
            open_source(tmp_path / "t.mib")
        assert "\n" not in str(info.value)
        with pytest.raises(InputError, match=match):
            ingest(tmp_path / "t.mib", tmp_path / "t.zarr", progress=False)
        assert not (tmp_path / "t.zarr").exists()


# --------------------------------------------------------------------- resume

class _Interrupt(Exception):
    pass


def test_interrupted_ingest_resumes(tmp_path, monkeypatch):
    x = _data(shape=(12, 10, 6, 8))
    np.save(tmp_path / "x.npy", x)
    dest = tmp_path / "x.zarr"
    kw = dict(chunk_bytes=2 * 2 * 6 * 8 * 2, progress=False)  # 6 x 5 = 30 chunks of 2 x 2

    def stop(n_done):
        if n_done >= 8:
            raise _Interrupt

    writes = []
    real = _ingest._write_unit

    def counting(block, store, region, dtype, marker):
        writes.append((region[0].start, region[1].start))
        return real(block, store, region, dtype, marker)

    monkeypatch.setattr(_ingest, "_write_unit", counting)
    monkeypatch.setattr(_ingest, "_on_batch_done", stop)
    monkeypatch.setattr(_ingest, "_n_threads", lambda: 1)  # batches of 4 chunks
    with pytest.raises(_Interrupt):
        ingest(tmp_path / "x.npy", dest, **kw)
    assert not dest.exists()
    partial = tmp_path / "x.zarr.partial"
    done_first = {tuple(map(int, f.name.split("."))) for f in (partial / "_ingest" / "done").iterdir()}
    assert len(done_first) == len(writes) == 8
    assert zarr.open_group(str(partial))["data"].attrs is not None
    assert zarr.open_group(str(partial)).attrs["spedflow"]["complete"] is False

    writes.clear()
    monkeypatch.setattr(_ingest, "_on_batch_done", None)
    out = ingest(tmp_path / "x.npy", dest, **kw)
    assert len(writes) == 30 - 8
    assert not {(r // 2, c // 2) for r, c in writes} & done_first
    _check_store(out, x)
    assert not partial.exists() and not (out / "_ingest").exists()


def test_resume_with_changed_source_starts_afresh(tmp_path, monkeypatch):
    x = _data(shape=(8, 8, 6, 8))
    np.save(tmp_path / "x.npy", x)
    dest = tmp_path / "x.zarr"
    kw = dict(chunk_bytes=2 * 2 * 6 * 8 * 2, progress=False)

    def stop(n_done):
        raise _Interrupt

    monkeypatch.setattr(_ingest, "_on_batch_done", stop)
    monkeypatch.setattr(_ingest, "_n_threads", lambda: 1)
    with pytest.raises(_Interrupt):
        ingest(tmp_path / "x.npy", dest, **kw)
    y = x + 1
    np.save(tmp_path / "x.npy", y)  # same size, new content and mtime
    os.utime(tmp_path / "x.npy", ns=(1, 1))
    monkeypatch.setattr(_ingest, "_on_batch_done", None)
    with pytest.warns(RuntimeWarning, match="different source"):
        out = ingest(tmp_path / "x.npy", dest, **kw)
    _check_store(out, y)


def test_n_threads_positive():
    assert _ingest._n_threads() >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(_ingest._n_threads(), int)


def test_ingest_warns_of_nan_in_some_patterns_only(tmp_path):
    """NaN in a dropped frame is warned about at ingest (segment refuses it); a detector
    pixel NaN in every pattern (a bad pixel, which segment repairs) and integer data are
    not."""
    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, (6, 5, 8, 8)).astype(np.float32)
    clean = x.copy()
    clean[..., 2, 3] = np.nan                  # a dead pixel, NaN in every pattern
    np.save(tmp_path / "clean.npy", clean)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ingest(tmp_path / "clean.npy", tmp_path / "clean.zarr", progress=False)
        np.save(tmp_path / "int.npy", x.astype(np.uint16))
        ingest(tmp_path / "int.npy", tmp_path / "int.zarr", progress=False)
    dropped = clean.copy()
    dropped[4, 1] = np.nan                     # a dropped frame
    np.save(tmp_path / "dropped.npy", dropped)
    small = dict(chunk_bytes=2 * 2 * 8 * 8 * 4, progress=False)  # several chunks summed
    with pytest.warns(RuntimeWarning, match=r"NaN or infinite values at 63 detector pixels in "
                      r"some patterns only \(pixel \(0, 0\) in 1 of 30\)"):
        out = ingest(tmp_path / "dropped.npy", tmp_path / "dropped.zarr", **small)
    _check_store(out, dropped)
