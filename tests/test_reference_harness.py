"""Static checks of the reference-implementation harness (benchmarks/reference/).

pyxem is never imported here: the scripts run in their own venv. These tests only
check that the scripts compile and that the small Zarr v3 codec they use to read
spedflow stores (zarr<3 in the pyxem venv) equals zarr 3 on real stores.
"""

import importlib.util
import py_compile
from pathlib import Path

import numpy as np
import pytest
import zarr

from spedflow.io import create_array

REF = Path(__file__).resolve().parents[1] / "benchmarks" / "reference"


@pytest.mark.parametrize("name", ["setup_env.py", "run_reference.py", "_zarr3.py"])
def test_scripts_compile(name):
    py_compile.compile(str(REF / name), doraise=True)


@pytest.fixture(scope="module")
def zarr3():
    spec = importlib.util.spec_from_file_location("_ref_zarr3", REF / "_zarr3.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("chunks,shards", [((3, 4, 8, 6), None), ((7, 9, 8, 6), None),
                                           ((2, 3, 8, 6), (4, 6, 8, 6))])
def test_read_equals_zarr(tmp_path, zarr3, chunks, shards):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5000, (7, 9, 8, 6)).astype(np.uint16)
    g = zarr.open_group(tmp_path / "s.zarr", mode="w")
    g.attrs["spedflow"] = {"kind": "input"}
    create_array(g, "data", a.shape, a.dtype, chunks=chunks, shards=shards)[:] = a
    assert zarr3.read_group_attrs(tmp_path / "s.zarr")["spedflow"]["kind"] == "input"
    np.testing.assert_array_equal(zarr3.read_array(tmp_path / "s.zarr" / "data"), a)
    crop = (slice(2, 6), slice(1, 8))
    np.testing.assert_array_equal(zarr3.read_array(tmp_path / "s.zarr" / "data", nav_slice=crop),
                                  a[crop])


@pytest.mark.parametrize("shape,dtype", [((3, 5, 4), np.float32), ((0, 5, 4), np.float32),
                                         ((6, 2), np.float64), ((4,), np.int32)])
def test_written_arrays_read_by_zarr(tmp_path, zarr3, shape, dtype):
    a = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    zarr3.write_group(tmp_path / "r.zarr", {"spedflow": {"kind": "result"}})
    zarr3.write_array(tmp_path / "r.zarr" / "segments" / "maps", a)
    g = zarr.open_group(tmp_path / "r.zarr", mode="r")
    assert g.attrs["spedflow"]["kind"] == "result"
    np.testing.assert_array_equal(g["segments/maps"][...], a)


def test_corrupted_chunk_detected(tmp_path, zarr3):
    a = np.arange(2 * 2 * 4 * 4, dtype=np.uint16).reshape(2, 2, 4, 4)
    g = zarr.open_group(tmp_path / "s.zarr", mode="w")
    create_array(g, "data", a.shape, a.dtype, chunks=a.shape)[:] = a
    f = next(p for p in (tmp_path / "s.zarr" / "data").rglob("*") if p.is_file()
             and p.name != "zarr.json")
    buf = bytearray(f.read_bytes())
    buf[-1] ^= 0xFF                                    # flip the stored checksum
    f.write_bytes(bytes(buf))
    try:
        zarr3.read_array(tmp_path / "s.zarr" / "data")
    except ValueError as exc:
        assert "CRC32C" in str(exc)
    else:  # no CRC32C implementation available: the checksum is stripped unchecked
        assert zarr3._crc32c(b"x") is None
