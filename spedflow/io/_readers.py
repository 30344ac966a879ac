"""Lazy readers: any supported microscope file -> (scan_y, scan_x, ky, kx) dask array.

``open_source`` picks a reader from the file extension (or from the directory layout
for Zarr stores), reads nothing but headers, and returns a dask array whose tasks
each read one block from disk. Every size a header declares is checked against the
file before anything is allocated, and nothing is ever unpickled.

Supported sources
-----------------
========================  ====================================================
``.npy``                  NumPy file (header parsed without unpickling)
``.raw .bin .dat``        headerless binary; needs ``shape`` and ``dtype``
``.zarr`` or a directory  Zarr v2/v3 array or group (``array=`` or ``data``)
``.blo``                  NanoMegas ASTAR blockfile (rosettasciio)
``.mib``                  Quantum Detectors Merlin (rosettasciio, with .hdr)
``.hspy``                 HyperSpy HDF5 (rosettasciio)
``.zspy``                 HyperSpy Zarr (rosettasciio)
``.emd``                  EMD, NCEM or Velox flavour (rosettasciio)
``.hdf5 .h5``             fpd HDF5 (``fpd_expt/fpd_data/data``) or any HDF5
                          dataset named with ``array=``
========================  ====================================================
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from ..errors import InputError, ParameterError
from ._store import TARGET_CHUNK_BYTES, nav_chunks

__all__ = ["open_source", "SUPPORTED_EXTENSIONS", "MAX_ELEMENTS"]

#: Readers by file extension (lower case).
SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".npy": "npy", ".raw": "raw", ".bin": "raw", ".dat": "raw", ".zarr": "zarr",
    ".blo": "blockfile", ".mib": "quantumdetector", ".hspy": "hspy", ".zspy": "zspy",
    ".emd": "emd", ".hdf5": "hdf5", ".h5": "hdf5",
}

#: Largest number of elements a source may declare. 10^14 elements is 100 TB even at
#: one byte each, ~20x a 4096 x 4096 scan of 512 x 512 patterns (4.4e12): anything
#: larger is a corrupt or malicious header, refused before any allocation.
MAX_ELEMENTS = 10**14

FPD_DATASET = "fpd_expt/fpd_data/data"
_BLOCKFILE_FRAME_HEADER = 6  # bytes before every pattern: AA 55 + uint32 frame number


# --------------------------------------------------------------------------- helpers

def _check_dtype(dtype, where: str) -> np.dtype:
    """Only plain integer/unsigned/float data: no objects, records, strings, bools."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise ParameterError(f"`dtype` {dtype!r} is not a NumPy dtype ({exc})") from None
    if dt.hasobject or dt.kind not in "iuf" or dt.fields is not None or dt.subdtype is not None:
        raise InputError(f"{where} has dtype {dt.str!r}; only integer or float data can be ingested")
    return dt


def _check_shape(shape, where: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ParameterError(f"`shape` must be a sequence of integers (got {shape!r})") from None
    if any(s < 0 for s in shape):
        raise InputError(f"{where} has a negative dimension in shape {shape}")
    n = math.prod(shape)
    if n == 0:
        raise InputError(f"{where} is empty (shape {shape})")
    if n > MAX_ELEMENTS:
        raise InputError(f"{where} declares {n:.3g} elements (shape {shape}), more than the "
                         f"{MAX_ELEMENTS:.0e} any real acquisition has; refusing it")
    return shape


def _calibration(scale, units) -> dict:
    """{value, units}; an axis without units (rosettasciio's default 1.0, '') is
    uncalibrated: {value: None, units: None}."""
    units = "" if units is None else str(units)
    if not units or units.startswith("<undefined"):
        return {"value": None, "units": None}
    try:
        value = abs(float(scale))  # a negative scale is an axis running the other way
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value == 0:  # no step: uncalibrated (warned by the caller)
        return {"value": None, "units": None, "unusable": scale}
    return {"value": value, "units": units}


def _no_array(problem: str, found: list, kind: str) -> str:
    """The one-line message for a file without the array asked for: the arrays of two or
    more dimensions it holds (``found``, paths), to give with --array."""
    return f"{problem}; " + (f"give its path with --array (`array=` in Python), one of {found[:20]}"
                             if found else f"it holds no {kind} of two or more dimensions")


def _chunks_for(shape4: tuple[int, ...], dtype, chunks) -> tuple[int, ...]:
    return tuple(chunks) if chunks is not None else nav_chunks(shape4, dtype, TARGET_CHUNK_BYTES)


def _to_4d(arr: da.Array, signal_axes, where: str, scan=None) -> da.Array:
    """Move the detector axes last and make the array (scan_y, scan_x, ky, kx).

    With ``scan`` (Y, X): the patterns, in C order, reshaped to a Y x X scan (Y*X must
    be their number). Without: 2-D -> (1, 1, ky, kx) with a warning; 3-D (n, ky, kx)
    -> (1, n, ky, kx) only when n is prime (a line is the only scan it can be), else
    refused; N-D > 4 -> singleton navigation axes dropped, error if more than 2 remain.
    """
    nd = arr.ndim
    if signal_axes is not None:
        try:
            sig = tuple(int(a) % nd for a in signal_axes)
        except (TypeError, ValueError, ZeroDivisionError):
            raise ParameterError(f"`signal_axes` must be two axis indices (got {signal_axes!r})") from None
        if len(sig) != 2 or sig[0] == sig[1]:
            raise ParameterError(f"`signal_axes` must be two different axis indices (got {signal_axes!r})")
        if sig != (nd - 2, nd - 1):
            arr = da.moveaxis(arr, sig, (nd - 2, nd - 1))
    if nd < 2:
        raise InputError(f"{where} is {nd}-D (shape {arr.shape}); expected diffraction patterns "
                         "(scan_y, scan_x, ky, kx)")
    if scan is not None:
        n = math.prod(arr.shape[:-2])
        if scan[0] * scan[1] != n:
            raise ParameterError(f"`scan` {scan[0]} x {scan[1]} is {scan[0] * scan[1]} positions, but {where} "
                                 f"holds {n} patterns (shape {arr.shape})")
        nav = tuple(s for s in arr.shape[:-2] if s != 1)
        if len(nav) == 2 and nav != tuple(scan):  # a scan the file has: re-rastered
            warnings.warn(f"{where} has a {nav[0]} x {nav[1]} scan; the scan shape given, {scan[0]} x {scan[1]}, "
                          "re-rasters its patterns row by row (right only if the file's scan shape "
                          "was recorded wrongly)", RuntimeWarning, stacklevel=3)
        return arr.reshape(tuple(scan) + arr.shape[-2:])
    if nd == 2 or (nd == 3 and arr.shape[0] == 1):
        warnings.warn(f"{where} holds a single {arr.shape[-2:]} pattern; treating it as a 1 x 1 scan",
                      RuntimeWarning, stacklevel=3)
        return arr.reshape((1, 1) + arr.shape[-2:])
    if nd == 3:
        n = arr.shape[0]
        y = _squarest_factor(n)
        if y > 1:
            raise InputError(f"{where} is a stack of {n} patterns (shape {arr.shape}) with no scan shape; "
                             f"give the scan shape Y,X (--scan, or `scan=` in Python) with Y*X = {n}, "
                             f"e.g. {y},{n // y} (1,{n} for a line scan)")
        return arr[None]
    if nd > 4:
        nav = arr.shape[:-2]
        keep = [i for i, s in enumerate(nav) if s != 1]
        if len(keep) > 2:
            raise InputError(f"{where} has shape {arr.shape}: {len(keep)} non-singleton navigation "
                             "axes, at most 2 (scan_y, scan_x) are supported")
        arr = arr.reshape(tuple(nav[i] for i in keep) + arr.shape[-2:])
        return _to_4d(arr, None, where)
    return arr


def _squarest_factor(n: int) -> int:
    """The largest divisor of ``n`` not above its square root (1 when n is prime)."""
    for y in range(math.isqrt(n), 1, -1):
        if n % y == 0:
            return y
    return 1


def _check_scan(scan) -> tuple[int, int] | None:
    if scan is None:
        return None
    try:
        y, x = scan
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in (y, x))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ParameterError(f"`scan` must be two positive integers (Y, X) (got {scan!r})")
    return int(y), int(x)


class _BlockReader:
    """A tiny, picklable array-like that reads the requested block of a flat file.

    Each dask task opens its own memory map, copies out
    its block and closes it again, so the graph holds only a path and a shape and
    works on a distributed cluster. ``da.from_array(np.memmap)`` would instead
    embed (and copy) the whole map in the graph.
    """

    def __init__(self, path: str, shape, dtype, *, offset: int = 0, order: str = "C"):
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        self.offset, self.order = int(offset), order
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset,
                       shape=self.shape, order=self.order)
        try:
            return np.array(mm[key])
        finally:
            del mm


def _memmap_array(path: Path, shape, dtype, offset: int, order: str, signal_axes, chunks,
                  where: str, scan=None) -> da.Array:
    """dask array over a flat binary region, one memmap read per block."""
    shape = tuple(shape)
    if (signal_axes is None or tuple(int(a) % len(shape) for a in signal_axes) == (len(shape) - 2, len(shape) - 1)) \
            and (order == "C" or scan is None):
        # singleton axes (and, in C order, a reshape of the scan) do not change the memory
        # layout: map the 4-D view directly, chunked as the destination wants (no rechunk,
        # no read amplification)
        view = tuple(_to_4d(da.empty(shape, dtype=np.uint8, chunks=-1), None, where, scan).shape)
        shape, signal_axes = view, None
        blocks = _chunks_for(view, dtype, chunks)
    else:
        blocks = "auto"
    st = path.stat()
    reader = _BlockReader(str(path), shape, dtype, offset=offset, order=order)
    name = "read-" + tokenize(str(path), st.st_size, st.st_mtime_ns, shape, np.dtype(dtype).str, offset, order)
    arr = da.from_array(reader, chunks=blocks, name=name, lock=False, asarray=False,
                        meta=np.empty((0,) * len(shape), dtype))
    return _to_4d(arr, signal_axes, where, scan)


# --------------------------------------------------------------------------- readers

def _read_npy(path: Path, *, chunks, signal_axes, scan=None, **_):
    where = f"{str(path)!r}"
    size = path.stat().st_size
    with path.open("rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:  # (3, 0): utf-8 header, same literal-only parser
                shape, fortran, dtype = np.lib.format._read_array_header(fh, version)
        except ValueError as exc:
            raise InputError(f"{where} is not a valid .npy file ({exc})") from None
        offset = fh.tell()
    dtype = _check_dtype(dtype, where)
    shape = _check_shape(shape, where)
    expected = offset + math.prod(shape) * dtype.itemsize
    if size != expected:
        raise InputError(f"{where}: header declares shape {shape} {dtype.str} = {expected} bytes "
                         f"with the header, but the file has {size} bytes")
    arr = _memmap_array(path, shape, dtype, offset, "F" if fortran else "C", signal_axes, chunks, where, scan)
    return arr, {"original_shape": list(shape), "original_dtype": dtype.str}


def _read_raw(path: Path, *, shape=None, dtype=None, offset=0, chunks, signal_axes, scan=None, **_):
    where = f"{str(path)!r}"
    if shape is None or dtype is None:
        raise ParameterError(f"raw binary {where} needs `shape` and `dtype`: the array's shape in "
                             "the file and its element type, e.g. 256,256,128,128 and '<u2' "
                             "(little-endian 16-bit)")
    try:
        dtype_ = np.dtype(dtype)
    except TypeError:
        raise ParameterError(f"`dtype` {dtype!r} is not a NumPy dtype") from None
    dtype = _check_dtype(dtype_, "`dtype`")
    shape = _check_shape(shape, "`shape`")
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
        raise ParameterError(f"`offset` must be a whole number of bytes >= 0 (got {offset!r})")
    size = path.stat().st_size
    expected = int(offset) + math.prod(shape) * dtype.itemsize
    if size != expected:
        raise InputError(f"{where}: shape {shape} of {dtype.str} after a {offset}-byte header needs "
                         f"{expected} bytes, but the file has {size} bytes")
    arr = _memmap_array(path, shape, dtype, int(offset), "C", signal_axes, chunks, where, scan)
    _warn_if_byte_swapped(path, shape, dtype, int(offset), where)
    return arr, {"original_shape": list(shape), "original_dtype": dtype.str}


#: Share of a raw file's nonzero sample values with a zero low byte above which the
#: byte order given is probably the wrong one (a right one gives ~1/256 of them).
_SWAPPED_SHARE = 0.5


def _warn_if_byte_swapped(path: Path, shape, dtype: np.dtype, offset: int, where: str) -> None:
    """Warn if multi-byte integer data look read in the wrong byte order.

    A counting detector's values are mostly small. Read with the bytes swapped, a
    value v < 256 becomes 256 v: the nonzero values are then nearly all multiples of
    256, where in the right order about 1 in 256 of them are (any camera, offsets and
    gains included). Judged on up to 2**19 values from the middle of the file (the
    first patterns of a scan can be dark or the beam blanked).
    """
    if dtype.kind not in "iu" or dtype.itemsize < 2:
        return
    n = math.prod(shape)
    take = min(n, 2 ** 19)
    start = (n - take) // 2
    values = _BlockReader(str(path), (n,), dtype, offset=offset)[start:start + take]
    nonzero = values[values != 0]
    if nonzero.size < 1000:
        return
    native = nonzero.astype(nonzero.dtype.newbyteorder("="))  # the values as given
    share = float(np.mean(native % 256 == 0))
    if share > _SWAPPED_SHARE:
        other = dtype.newbyteorder("S").str
        warnings.warn(f"{where}: {share:.0%} of the nonzero values are multiples of 256, as small "
                      f"counts read in the wrong byte order are; if the file is "
                      f"{'big' if other.startswith('>') else 'little'}-endian, give dtype "
                      f"{other!r}", UserWarning, stacklevel=2)


def _read_zarr(path: Path, *, array=None, chunks, signal_axes, scan=None, **_):
    import zarr
    where = f"{str(path)!r}"
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise InputError(f"{where} is not a readable Zarr store ({type(exc).__name__}: {exc})") from None
    meta: dict[str, Any] = {}
    if isinstance(node, zarr.Group):
        meta = dict(node.attrs.get("spedflow", {}))
        name = array or "data"
        if name not in node or not isinstance(node[name], zarr.Array):
            names = sorted(n for n, a in node.members(max_depth=None)
                           if isinstance(a, zarr.Array) and a.ndim >= 2)
            raise InputError(_no_array(f"Zarr group {where} has no array {name!r}", names, "array"))
        node, where = node[name], f"{where}/{name}"
    dtype = _check_dtype(node.dtype, where)
    _check_shape(node.shape, where)
    arr = _to_4d(da.from_zarr(node), signal_axes, where, scan)
    out = {"original_shape": list(node.shape), "original_dtype": dtype.str}
    for k in ("scan_step", "reciprocal_scale"):
        if isinstance(meta.get(k), dict):
            out[k] = dict(meta[k])
    if meta.get("source"):
        out["original_source"] = meta["source"]
    return arr, out


def _check_blockfile(path: Path) -> None:
    """Refuse a blockfile whose header promises more patterns than the file holds."""
    where = f"{str(path)!r}"
    size = path.stat().st_size
    head = struct.Struct("<6sHIIIHHHH")
    with path.open("rb") as fh:
        raw = fh.read(head.size)
    if len(raw) < head.size:
        raise InputError(f"{where} is too short ({size} bytes) to be an ASTAR blockfile")
    ident, _magic, off1, off2, _unk, dp, _rot, nx, ny = head.unpack(raw)
    if ident != b"IMGBLO":
        raise InputError(f"{where} is not an ASTAR blockfile (no IMGBLO signature)")
    if 0 in (dp, nx, ny):
        raise InputError(f"{where}: blockfile header declares an empty scan or pattern "
                         f"(NY={ny}, NX={nx}, DP_SZ={dp})")
    need = off2 + ny * nx * (_BLOCKFILE_FRAME_HEADER + dp * dp)
    if off2 < off1 + nx * ny or need > size:
        raise InputError(f"{where} is truncated or corrupt: its header declares {ny} x {nx} patterns of "
                         f"{dp} x {dp} bytes ending at byte {need}, but the file has {size} bytes")


_MIB_ITEMSIZE = {"U01": 1, "U08": 1, "U16": 2, "U32": 4}  # R64 (raw) is left to rosettasciio
_MIB_FRAMES_KEY = "Frames in Acquisition (Number)"


def _check_mib(path: Path) -> None:
    """Refuse a Merlin .mib that ends inside a frame or holds fewer frames than its
    .hdr declares (rosettasciio would read the complete frames as a smaller scan, or
    divide by zero when not one frame is complete)."""
    where = f"{str(path)!r}"
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(768)
    head = raw[:384].decode("ascii", errors="replace").split(",")
    try:
        if head[0] != "MQ1":
            raise ValueError
        head_size, nx, ny = int(head[2]), int(head[4]), int(head[5])
        kind = head[6]
    except (ValueError, IndexError):
        raise InputError(f"{where} is not a Merlin .mib file (no MQ1 frame header at its start)") from None
    if kind not in _MIB_ITEMSIZE:
        return
    if min(head_size, nx, ny) < 1:
        raise InputError(f"{where}: Merlin frame header declares an empty frame "
                         f"({ny} x {nx} pixels after {head_size} header bytes)")
    frame = head_size + nx * ny * _MIB_ITEMSIZE[kind]
    held, rest = divmod(size, frame)
    hdr = path.with_suffix(".hdr")
    declared = _mib_declared_frames(hdr)
    if declared and held < declared:
        raise InputError(f"{where} is truncated: {hdr.name} declares {declared} frames but the file "
                         f"holds {held} ({size} bytes of {frame}-byte {ny} x {nx} frames)")
    if held == 0 or rest:
        raise InputError(f"{where} is truncated: it holds {held} complete {ny} x {nx} frames of "
                         f"{frame} bytes and {rest} bytes of another ({size} bytes)")


def _mib_declared_frames(hdr: Path) -> int | None:
    """The frame count a Merlin .hdr declares; None without a readable count (or 0:
    an acquisition of no fixed length)."""
    try:
        with hdr.open("rb") as fh:
            text = fh.read(1 << 16).decode("ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("\t")
        if key.strip().rstrip(":").strip() == _MIB_FRAMES_KEY:
            try:
                return int(value.strip()) or None
            except ValueError:
                return None
    return None


def _pick_signal(signals: list, where: str) -> dict:
    """The largest (most elements) signal rosettasciio returned."""
    cands = [s for s in signals if getattr(s.get("data"), "ndim", 0) >= 2]
    if not cands:
        raise InputError(f"{where} holds no image or diffraction data")
    return max(cands, key=lambda s: math.prod(s["data"].shape))


def _read_rsciio(path: Path, *, fmt: str, chunks, signal_axes, array=None, scan=None, **_):
    import importlib
    where = f"{str(path)!r}"
    if fmt == "blockfile":
        _check_blockfile(path)
    elif fmt == "quantumdetector":
        _check_mib(path)
    mod = importlib.import_module(f"rsciio.{fmt}")
    kwargs: dict[str, Any] = {"lazy": True}
    if fmt == "zspy":
        kwargs["mode"] = "r"  # rosettasciio opens lazily in r+ otherwise
    if fmt == "emd" and array is not None:
        kwargs["dataset_path"] = array
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            signals = mod.file_reader(str(path), **kwargs)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read {where} as {fmt} ({type(exc).__name__}: {exc})") from None
    sig = _pick_signal(list(signals), where)
    data = sig["data"]
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks="auto")
    dtype = _check_dtype(data.dtype, where)
    _check_shape(data.shape, where)
    axes = sorted(sig.get("axes", []), key=lambda a: a.get("index_in_array", 0))
    if signal_axes is None and len(axes) == data.ndim:
        sig_idx = tuple(i for i, a in enumerate(axes) if not a.get("navigate", True))
        if len(sig_idx) == 2:
            signal_axes = sig_idx
    meta: dict[str, Any] = {"original_shape": list(data.shape), "original_dtype": dtype.str}
    if len(axes) == data.ndim:
        sig_ax = signal_axes if signal_axes is not None else (data.ndim - 2, data.ndim - 1)
        sig_ax = tuple(int(a) % data.ndim for a in sig_ax)
        nav = [a for i, a in enumerate(axes) if i not in sig_ax]
        det = [axes[i] for i in sig_ax]
        if nav:
            meta["scan_step"] = _axes_calibration(nav, "scan", where)
        meta["reciprocal_scale"] = _axes_calibration(det, "detector", where)
    return _to_4d(data, signal_axes, where, scan), meta


def _axes_calibration(axes: list[dict], what: str, where: str) -> dict:
    """One {value, units} for a set of axes (the fastest one); warn if they differ."""
    cals = [_calibration(a.get("scale", 1.0), a.get("units")) for a in axes if a.get("size", 2) > 1]
    if not cals:
        cals = [_calibration(axes[-1].get("scale", 1.0), axes[-1].get("units"))]
    bad = [c.pop("unusable") for c in cals if "unusable" in c]
    usable = [c for c in cals if c["value"] is not None]
    if bad and usable:  # another axis has a step: that one is used
        cals = usable
    elif bad:
        shown = f"{float(bad[0]):g}" if isinstance(bad[0], (int, float, np.number)) else repr(bad[0])
        warnings.warn(f"{where}: {what} axis scale {shown} is not a step; left unset (give it "
                      f"with --{'scan-step' if what == 'scan' else 'reciprocal-scale'} VALUE:UNITS)",
                      RuntimeWarning, stacklevel=4)
    first = cals[-1]
    for c in cals[:-1]:
        if c["units"] != first["units"] or (c["value"] is not None and first["value"] is not None
                                             and not math.isclose(c["value"], first["value"], rel_tol=1e-6)):
            warnings.warn(f"{where}: {what} axes have different calibrations {cals}; using {first}",
                          RuntimeWarning, stacklevel=4)
            break
    return first


def _read_hdf5(path: Path, *, array=None, chunks, signal_axes, scan=None, **_):
    import h5py
    where = f"{str(path)!r}"
    try:
        fh = h5py.File(str(path), "r")
    except OSError as exc:
        raise InputError(f"{where} is not a readable HDF5 file ({exc})") from None
    with fh:
        if array is None and "Experiments" in fh:  # a HyperSpy file with another extension
            return None
        name = array or (FPD_DATASET if FPD_DATASET in fh else None)
        if name is None or name not in fh or not isinstance(fh[name], h5py.Dataset):
            found: list[str] = []
            fh.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) and o.ndim >= 2 else None)
            what = f"no dataset {name!r}" if name else "no fpd dataset"
            raise InputError(_no_array(f"HDF5 file {where} has {what}", found, "dataset"))
        ds = fh[name]
        dtype = _check_dtype(ds.dtype, f"{where}/{name}")
        shape = _check_shape(ds.shape, f"{where}/{name}")
    view = shape
    if len(shape) > 4:  # drop singleton navigation axes inside the reader (fpd: 5-D)
        nav = [s for s in shape[:-2] if s != 1]
        view = tuple(nav) + shape[-2:]
    st = path.stat()
    reader = _H5Reader(str(path), name, shape, view, dtype)
    tmp = da.empty(view, dtype=np.uint8, chunks=-1)
    view4 = _to_4d(tmp, signal_axes, f"{where}/{name}", scan).shape
    blocks = _chunks_for(view4, dtype, chunks) if len(view) == 4 and signal_axes is None else "auto"
    arr = da.from_array(reader, chunks=blocks, lock=False, asarray=False,
                        name="read-" + tokenize(str(path), st.st_size, st.st_mtime_ns, name),
                        meta=np.empty((0,) * len(view), dtype))
    arr = _to_4d(arr, signal_axes, f"{where}/{name}", scan)
    return arr, {"original_shape": list(shape), "original_dtype": dtype.str, "dataset": name}


class _H5Reader:
    """Picklable block reader of one HDF5 dataset, singleton navigation axes dropped."""

    def __init__(self, path: str, dataset: str, full_shape, shape, dtype):
        self.path, self.dataset = path, dataset
        self.full_shape, self.shape, self.dtype = tuple(full_shape), tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        import h5py
        key = key if isinstance(key, tuple) else (key,)
        if self.full_shape != self.shape:
            nav_full = self.full_shape[:-2]
            it = iter(key)
            key = tuple(0 if s == 1 else next(it) for s in nav_full) + tuple(it)
        with h5py.File(self.path, "r") as fh:
            return fh[self.dataset][key]


_READERS = {"npy": _read_npy, "raw": _read_raw, "zarr": _read_zarr, "hdf5": _read_hdf5}


def _format_of(path: Path, shape) -> str:
    if path.is_dir():
        if any((path / m).exists() for m in ("zarr.json", ".zarray", ".zgroup")) or path.suffix.lower() == ".zarr":
            return "zarr"
        if path.suffix.lower() == ".zspy":
            return "zspy"
        raise InputError(f"{str(path)!r} is a directory but not a Zarr store")
    ext = path.suffix.lower()
    if ext in SUPPORTED_EXTENSIONS:
        return SUPPORTED_EXTENSIONS[ext]
    if shape is not None:
        return "raw"
    raise InputError(f"{str(path)!r}: unknown file type {ext or '(no extension)'!r}; supported: "
                     f"{', '.join(sorted(SUPPORTED_EXTENSIONS))} (or give `shape` and `dtype` for raw binary)")


def open_source(path: str | os.PathLike, *, shape=None, dtype=None, offset: int = 0,
                array: str | None = None, signal_axes=None, scan=None,
                chunks=None) -> tuple[da.Array, dict]:
    """Open a microscope file lazily as a (scan_y, scan_x, ky, kx) dask array.

    Parameters
    ----------
    path : str or path-like
        The file (or Zarr directory). The reader is chosen by extension, see the
        module docstring; a file with an unknown extension is read as raw binary
        when ``shape`` is given.
    shape : sequence of int, optional
        Raw binary only: the array shape in the file (C order).
    dtype : str or numpy.dtype, optional
        Raw binary only: element type including byte order, e.g. ``'>u2'``.
    offset : int
        Raw binary only: bytes of header to skip.
    array : str, optional
        Array in a Zarr group (default ``data``) or dataset in an HDF5/EMD file.
    signal_axes : pair of int, optional
        Axes of the file's array that are the detector (ky, kx). Default: the axes
        the format marks as signal axes, else the last two.
    scan : (int, int), optional
        The scan shape (Y, X): the file's patterns, in C order (row by row), become a
        Y x X scan. Y*X must equal their number. Needed for a stack of patterns
        (n, ky, kx) unless n is prime (a 1 x n line scan); also re-rasters a file whose
        scan shape was recorded wrongly.
    chunks : 4-tuple of int, optional
        Chunks of the returned array; default whole patterns, about
        ``TARGET_CHUNK_BYTES`` per chunk (:func:`spedflow.io.nav_chunks`).

    Returns
    -------
    data : (scan_y, scan_x, ky, kx) dask.array.Array
        In the file's dtype and byte order. A single pattern becomes a 1 x 1 scan (with
        a warning); a stack of n patterns is refused without ``scan`` unless n is prime
        (then a 1 x n line scan); singleton navigation axes of >4-D files are dropped.
    meta : dict
        ``source`` (absolute path), ``format``, ``original_shape``, ``original_dtype``,
        and where the file gives them ``scan_step`` / ``reciprocal_scale`` as
        ``{"value", "units"}`` (``value`` None when the file is uncalibrated; units
        as the file reports them, e.g. cm for ASTAR diffraction scales, which
        :func:`spedflow.io.ingest` leaves unset with a warning).

    Raises
    ------
    InputError
        Missing or unreadable file, unknown type, a header that promises more bytes
        than the file holds or an absurd size, non-numeric data, bad dimensionality.
    ParameterError
        Bad ``shape``/``dtype``/``offset``/``signal_axes``/``scan``, or a ``scan`` whose
        Y*X is not the number of patterns.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"source {str(path)!r} does not exist")
    p = p.resolve()
    if chunks is not None:
        chunks = tuple(int(c) for c in chunks)
        if len(chunks) != 4 or min(chunks) < 1:
            raise ParameterError(f"`chunks` must be 4 positive integers (got {chunks!r})")
    scan = _check_scan(scan)
    fmt = _format_of(p, shape)
    if fmt != "raw" and (shape is not None or dtype is not None or offset):
        raise ParameterError(f"`shape`, `dtype` and `offset` apply to raw binary only, not {fmt} ({p.name})")
    kw = dict(shape=shape, dtype=dtype, offset=offset, array=array, signal_axes=signal_axes, scan=scan,
              chunks=chunks)
    out = None
    if fmt in _READERS:
        out = _READERS[fmt](p, **kw)
        if out is None and fmt == "hdf5":
            fmt = "hspy"
    if out is None:
        out = _read_rsciio(p, fmt=fmt, **kw)
    arr, meta = out
    if arr.ndim != 4 or 0 in arr.shape:
        raise InputError(f"{str(p)!r} gives shape {arr.shape}; expected 4-D (scan_y, scan_x, ky, kx)")
    want = da.core.normalize_chunks(_chunks_for(arr.shape, arr.dtype, chunks), arr.shape)
    if arr.chunks != want:
        arr = arr.rechunk(want)
    meta.setdefault("scan_step", {"value": None, "units": None})
    meta.setdefault("reciprocal_scale", {"value": None, "units": None})
    meta.update(source=str(p), format=fmt)
    return arr, meta
