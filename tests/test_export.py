"""Exports round-trip: npy, ImageJ TIFF and HyperSpy .hspy read back equal."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from spedflow.errors import InputError, ParameterError
from spedflow.export import export_result
from test_report import make_fake_input, make_fake_result


@pytest.fixture
def result(tmp_path):
    return make_fake_result(tmp_path / "r.zarr", "vdf")


def _truth(path):
    g = zarr.open_group(str(path), mode="r")
    return np.asarray(g["segments/maps"][...]), np.asarray(g["segments/patterns"][...])


def test_export_all_formats_round_trip(tmp_path, result):
    import tifffile
    from rsciio.hspy import file_reader
    files = export_result(result, tmp_path / "out")
    names = sorted(p.name for p in files)
    assert names == sorted(f"segment_{k}.{e}" for k in ("maps", "patterns")
                           for e in ("npy", "tif", "hspy"))
    assert all(p.exists() for p in files)
    maps, patterns = _truth(result)
    for kind, want in (("maps", maps), ("patterns", patterns)):
        got = np.load(tmp_path / "out" / f"segment_{kind}.npy", allow_pickle=False)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)

        with tifffile.TiffFile(tmp_path / "out" / f"segment_{kind}.tif") as tf:
            assert tf.is_imagej
            np.testing.assert_array_equal(tf.asarray(), want)
            assert tf.imagej_metadata["images"] == want.shape[0]
            xres = tf.pages[0].tags["XResolution"].value
            scale = 3.0 * 2 if kind == "maps" else 0.03  # scan step x nav_binning; 1/Å per px
            assert xres[1] / xres[0] == pytest.approx(scale, rel=1e-4)
            assert tf.imagej_metadata["unit"] == ("nm" if kind == "maps" else "1/A")

        sig = file_reader(str(tmp_path / "out" / f"segment_{kind}.hspy"))[0]
        np.testing.assert_array_equal(sig["data"], want)
        axes = sig["axes"]
        assert [a["name"] for a in axes] == (["segment", "y", "x"] if kind == "maps"
                                             else ["segment", "ky", "kx"])
        assert [bool(a["navigate"]) for a in axes] == [True, False, False]
        assert [int(a["size"]) for a in axes] == list(want.shape)
        if kind == "patterns":
            ky = axes[1]
            assert sig["metadata"]["Signal"]["signal_type"] == "electron_diffraction"
            # the direct beam (Ky//2) sits at k = 0
            assert ky["offset"] + (want.shape[1] // 2) * ky["scale"] == pytest.approx(0.0)
            assert ky["units"] == "1/Å"
        else:
            assert axes[1]["scale"] == pytest.approx(6.0) and axes[1]["units"] == "nm"
        assert sig["original_metadata"]["spedflow"]["method"] == "vdf"


@pytest.mark.parametrize("formats,expected", [
    (("npy",), {"segment_maps.npy", "segment_patterns.npy"}),
    ("tiff", {"segment_maps.tif", "segment_patterns.tif"}),
    (["hspy", "tif"], {"segment_maps.hspy", "segment_patterns.hspy",
                       "segment_maps.tif", "segment_patterns.tif"}),
])
def test_export_selected_formats(tmp_path, result, formats, expected):
    files = export_result(result, tmp_path / "out", formats=formats)
    assert {p.name for p in files} == expected
    assert {p.name for p in (tmp_path / "out").iterdir()} == expected


def test_export_without_calibration_uses_pixels(tmp_path):
    from rsciio.hspy import file_reader
    res = make_fake_result(tmp_path / "r.zarr", "nmf",
                           attrs={"scan_step": None, "reciprocal_scale": None,
                                  "input_meta": None})
    export_result(res, tmp_path / "out", formats=("hspy", "tiff"))
    sig = file_reader(str(tmp_path / "out" / "segment_patterns.hspy"))[0]
    assert sig["axes"][1]["units"] == "px" and sig["axes"][1]["scale"] == 1.0


def test_export_only_maps_when_patterns_missing(tmp_path):
    res = make_fake_result(tmp_path / "r.zarr", "vdf", drop=("segments/patterns",))
    files = export_result(res, tmp_path / "out", formats=("npy",))
    assert [p.name for p in files] == ["segment_maps.npy"]


@pytest.mark.parametrize("setup,formats,exc,match", [
    ("result", ("png",), ParameterError, "formats"),
    ("result", (), ParameterError, "at least one"),
    ("result", 3, ParameterError, "formats"),
    ("none", ("npy",), InputError, "does not exist"),
    ("input", ("npy",), InputError, "not a spedflow result"),
    ("empty", ("npy",), InputError, "no segments"),
    ("file_out", ("npy",), InputError, "not a directory"),
])
def test_export_bad_inputs(tmp_path, setup, formats, exc, match):
    path, out = tmp_path / "r.zarr", tmp_path / "out"
    if setup in ("result", "file_out"):
        make_fake_result(path)
    elif setup == "input":
        make_fake_input(path)
    elif setup == "empty":
        make_fake_result(path, drop=("segments/maps", "segments/patterns"))
    if setup == "file_out":
        out.write_text("x")
    with pytest.raises(exc, match=match):
        export_result(path, out, formats=formats)


def test_a_damaged_result_is_not_half_exported(tmp_path):
    """A result whose patterns cannot be read (a flipped byte in a chunk) is an error, and
    nothing is written; the report may draw what it can, an export may not."""
    res = make_fake_result(tmp_path / "r.zarr", "vdf")
    chunk = next(p for p in sorted((res / "segments" / "patterns").rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="segments/patterns could not be read"):
        export_result(res, tmp_path / "out", formats=("npy",))
    assert not (tmp_path / "out").exists()


def test_an_earlier_export_of_a_kind_this_result_lacks_is_removed(tmp_path):
    """Exporting into a folder that holds another result's export: no file of the other
    result is left to pass for this one's."""
    full = make_fake_result(tmp_path / "full.zarr", "vdf")
    maps_only = make_fake_result(tmp_path / "maps.zarr", "vdf", drop=("segments/patterns",))
    export_result(full, tmp_path / "out", formats=("npy",))
    assert (tmp_path / "out" / "segment_patterns.npy").exists()
    export_result(maps_only, tmp_path / "out", formats=("npy",))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["segment_maps.npy"]


def test_a_result_without_segments_is_refused_before_writing(tmp_path):
    """A run that found no crystals writes (0, ...) stacks; TIFF and .hspy writers fail
    on those half-way, so nothing may be written."""
    res = make_fake_result(tmp_path / "r.zarr", "vdf")
    g = zarr.open_group(str(res), mode="r+")
    for name, shape in [("segments/maps", (0, 12, 14)), ("segments/patterns", (0, 32, 32))]:
        g.create_array(name, shape=shape, chunks=(1,) + shape[1:], dtype="float32",
                       overwrite=True)
    for formats in [("npy",), ("tiff",), ("hspy",)]:
        with pytest.raises(InputError, match="holds no segments"):
            export_result(res, tmp_path / "out", formats=formats)
    assert not (tmp_path / "out").exists()
