"""Ingest of small files recorded on real detectors (see ../shared/data/real/MANIFEST.md).

Each file is ingested and compared value for value with what rosettasciio (or h5py)
reads directly. Skipped where the shared data directory is absent.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import dask
import h5py
import numpy as np
import pytest

from spedflow.errors import InputError
from spedflow.io import ingest, open_input, open_source, verify_store

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"real detector files not found at {REAL}")


@pytest.fixture(autouse=True)
def _synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


def _rsciio(path: Path, module: str) -> np.ndarray:
    import importlib
    mod = importlib.import_module(f"rsciio.{module}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(mod.file_reader(str(path), lazy=False)[0]["data"])


CASES = [
    # file, reader, expected 4-D shape, expected source dtype
    ("astar_blo/test1.blo", "blockfile", (3, 2, 144, 144), "|u1"),
    ("merlin_mib/001_4x2_6bit.mib", "quantumdetector", (2, 4, 256, 256), "|u1"),
    ("merlin_mib/002_merlin_test_roi_sig256x128_nav4x2_hot_pixel_52x_39y.mib", "quantumdetector",
     (2, 4, 128, 256), ">u2"),
    ("single_patterns/test_CL30cm.mib", "quantumdetector", (1, 1, 256, 256), ">u4"),
]


@pytest.mark.parametrize("name,module,shape,dtype", CASES, ids=[c[0].split("/")[-1] for c in CASES])
def test_real_file_ingests_exactly(tmp_path, name, module, shape, dtype):
    src = REAL / name
    if not src.exists():
        pytest.skip(f"{src} absent")
    expected = _rsciio(src, module).reshape(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the single-pattern warning
        out = ingest(src, tmp_path / "x.zarr", progress=False)
    arr, meta = open_input(out)
    assert arr.shape == shape
    assert meta["original_dtype"] == dtype
    assert arr.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(arr[...], expected)
    assert verify_store(out) == []


def test_astar_calibration(tmp_path):
    """rosettasciio reports the blockfile's diffraction scale in cm, a length: ingest
    leaves it unset with a warning (it had labelled the report's k axes in cm)."""
    src = REAL / "astar_blo" / "test1.blo"
    if not src.exists():
        pytest.skip(f"{src} absent")
    _, meta = open_source(src)
    assert meta["scan_step"] == {"value": pytest.approx(12.8), "units": "nm"}
    assert meta["reciprocal_scale"]["units"] == "cm"  # as the file reports it
    with pytest.warns(RuntimeWarning, match=r"test1\.blo': the file's detector calibration \(0\.0160617 cm per "
                      r"pixel\) is not a reciprocal-space scale \(cm is a length\); left unset: give it with "
                      r"--reciprocal-scale"):
        out = ingest(src, tmp_path / "x.zarr", progress=False)
    _, meta = open_input(out)
    assert meta["reciprocal_scale"] == {"value": None, "units": None}
    assert meta["scan_step"]["value"] == pytest.approx(12.8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ingest(src, tmp_path / "y.zarr", reciprocal_scale=(0.0322, "1/nm"), progress=False)
    _, meta = open_input(out)
    assert meta["reciprocal_scale"] == {"value": 0.0322, "units": "1/nm"}
    assert meta["scan_step"]["value"] == pytest.approx(12.8)


def test_merlin_hot_pixel_and_non_square_detector(tmp_path):
    src = REAL / "merlin_mib" / "002_merlin_test_roi_sig256x128_nav4x2_hot_pixel_52x_39y.mib"
    if not src.exists():
        pytest.skip(f"{src} absent")
    arr, _ = open_input(ingest(src, tmp_path / "x.zarr", progress=False))
    frames = arr[...]
    assert frames.shape[2:] == (128, 256)
    ky, kx = np.unravel_index(np.argmax(frames.sum(axis=(0, 1))), frames.shape[2:])
    # the file name counts y from the bottom edge; like rosettasciio, we keep row 0 at the top
    assert (kx, frames.shape[2] - 1 - ky) == (52, 39)
    total = np.sort(frames.sum(axis=(0, 1), dtype=np.int64).ravel())
    assert total[-1] > 5 * total[-2]  # one hot pixel stands out of nearly empty frames


def test_fpd_hdf5_squeezed(tmp_path):
    src = REAL / "fpd_hdf5" / "fpd_file_test.hdf5"
    if not src.exists():
        pytest.skip(f"{src} absent")
    with h5py.File(src, "r") as f:
        expected = f["fpd_expt/fpd_data/data"][...]
    assert expected.shape == (2, 2, 1, 256, 256)
    out = ingest(src, tmp_path / "x.zarr", progress=False)
    arr, meta = open_input(out)
    assert arr.shape == (2, 2, 256, 256) and meta["original_dtype"] == ">u2"
    np.testing.assert_array_equal(arr[...], expected[:, :, 0])


def test_truncated_blockfile_refused(tmp_path):
    src = REAL / "astar_blo" / "test1.blo"
    if not src.exists():
        pytest.skip(f"{src} absent")
    data = src.read_bytes()
    for cut in (len(data) - 1, len(data) - 144 * 144, 300, 10):
        bad = tmp_path / f"cut{cut}.blo"
        bad.write_bytes(data[:cut])
        with pytest.raises(InputError, match="truncated|too short"):
            open_source(bad)
        with pytest.raises(InputError):
            ingest(bad, tmp_path / f"cut{cut}.zarr", progress=False)
        assert not (tmp_path / f"cut{cut}.zarr").exists()


@pytest.mark.parametrize("name,frames", [("merlin_mib/001_4x2_6bit.mib", 8),
                                         ("single_patterns/test_CL30cm.mib", 1)])
def test_truncated_mib_refused(tmp_path, name, frames):
    """A cut .mib was read as a smaller scan (4 of 8 frames: 2 x 2), or failed with a
    ZeroDivisionError inside rosettasciio when not one frame was left."""
    src = REAL / name
    if not src.exists():
        pytest.skip(f"{src} absent")
    data = src.read_bytes()
    frame = len(data) // frames
    for cut in (300000, len(data) - frame, len(data) - 1, frame - 1, 100, 3):
        if cut >= len(data):
            continue
        bad = tmp_path / f"cut{cut}.mib"
        bad.write_bytes(data[:cut])
        (tmp_path / f"cut{cut}.hdr").write_bytes(src.with_suffix(".hdr").read_bytes())
        held = cut // frame
        match = (f"'{bad}' is truncated: cut{cut}.hdr declares {frames} frames but the file holds {held} "
                 if cut >= 384 else "is truncated|not a Merlin .mib")
        with pytest.raises(InputError, match=match) as info:
            open_source(bad)
        assert "\n" not in str(info.value)
        with pytest.raises(InputError, match=match):
            ingest(bad, tmp_path / f"cut{cut}.zarr", progress=False)
        assert not (tmp_path / f"cut{cut}.zarr").exists()
