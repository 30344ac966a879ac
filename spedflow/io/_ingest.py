"""Stream a microscope file into a chunked, checksummed Zarr v3 input store.

The source is read lazily (:func:`open_source`) in blocks that are exactly the
destination's write units (a chunk, or a shard when sharding), and each dask task
reads one block, writes it and drops it: memory stays at a few blocks per worker
thread whatever the size of the file.

Resumable and atomic: everything is written under ``DEST.partial``. Next to the data,
``DEST.partial/_ingest/source.json`` records what is being ingested (path, size,
mtime, shape, dtype, chunking) and ``_ingest/done/<i>.<j>`` marks each finished write
unit, created only after its data is written. A second run with the same source and
settings skips the marked units; a different source (or settings) starts afresh.
Only a complete store, its ``complete`` attribute written last, is renamed to DEST.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import dask
import numpy as np
import zarr

from .._version import __version__
from ..config import CALIBRATION_TEXT, check_range
from ..errors import ParameterError
from ._progress import ProgressBar
from ._readers import open_source
from ._store import (DATA, TARGET_CHUNK_BYTES, atomic_store, check_destination, create_array,
                     creation_stamp, nav_chunks)

__all__ = ["ingest"]

_STATE = "_ingest"
_READER_KEYS = {"shape", "dtype", "offset", "array", "signal_axes", "scan"}

#: Test hook: called as ``_on_batch_done(n_units_done_this_run)`` after each batch.
_on_batch_done: Callable[[int], None] | None = None


def ingest(src: str | os.PathLike, dest: str | os.PathLike, *, overwrite: bool = False,
           chunk_bytes: int = TARGET_CHUNK_BYTES, shards=None, scan_step=None,
           reciprocal_scale=None, progress: bool = True, **reader_kwargs) -> Path:
    """Copy a 4D-STEM data set into a Zarr v3 input store, block by block.

    Parameters
    ----------
    src : str or path-like
        Any source :func:`spedflow.io.open_source` reads.
    dest : str or path-like
        The store to create (a directory, conventionally ``*.zarr``).
    overwrite : bool
        Replace an existing ``dest`` (only once the new store is complete).
    chunk_bytes : int
        Target uncompressed bytes per chunk; chunks hold whole patterns and are
        square-ish in the scan (:func:`spedflow.io.nav_chunks`). The default 16 MiB
        amortises per-chunk overhead while keeping a chunk per thread cheap in memory.
    shards : sequence of int, optional
        Shard shape: ``(sy, sx)`` or ``(sy, sx, ky, kx)``, multiples of the chunk
        shape in the scan, whole patterns. Fewer, larger files for big data sets;
        each shard is then written by one task.
    scan_step, reciprocal_scale : float, (value, units), {"value", "units"} or "value units", optional
        Override the file's calibration. A bare number is taken in nm (scan step)
        and 1/nm (reciprocal scale). A file's detector calibration in units that are
        not an inverse length, an angle or pixels (an ASTAR blockfile's is in cm) is
        not a reciprocal-space scale: it is left unset, with a warning.
    progress : bool
        Draw a one-line progress bar on stderr.
    **reader_kwargs
        ``shape``, ``dtype``, ``offset``, ``array``, ``signal_axes``, ``scan`` for
        :func:`open_source`. ``scan=(Y, X)`` is the scan shape of a stack of patterns
        (n, ky, kx), which is refused without it unless n is prime (a line scan).

    Returns
    -------
    pathlib.Path
        ``dest``. Its ``data`` array has the source's values and dtype (native byte
        order; float16 as float32), shape (scan_y, scan_x, ky, kx); attrs ``spedflow`` as
        in docs/DESIGN.md.

    Raises
    ------
    StoreExistsError
        ``dest`` exists and not ``overwrite``.
    InputError, ParameterError
        From reading the source or for bad arguments, before anything is written.
    """
    unknown = sorted(set(reader_kwargs) - _READER_KEYS)
    if unknown:
        raise ParameterError(f"unknown ingest option {unknown[0]!r}; known: "
                             f"{', '.join(sorted(_READER_KEYS))}")
    check_range("chunk_bytes", chunk_bytes, low=1, integer=True)
    dest = Path(dest).expanduser().absolute()
    srcp = Path(src).expanduser().absolute()
    check_destination(dest, overwrite, sources=[srcp], replaces="input")
    cal = {"scan_step": _parse_calibration("scan_step", scan_step, "nm"),
           "reciprocal_scale": _parse_calibration("reciprocal_scale", reciprocal_scale, "1/nm")}

    with warnings.catch_warnings():  # the shape and dtype, for the chunking: warned below
        warnings.simplefilter("ignore")
        data, meta = open_source(srcp, **reader_kwargs)
    chunks = nav_chunks(data.shape, _stored_dtype(data.dtype), int(chunk_bytes))
    shards = _check_shards(shards, chunks, data.shape)
    unit = shards or chunks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data, meta = open_source(srcp, chunks=unit, **reader_kwargs)
    for w in caught:  # a file's unusable axis scale does not matter where one is given
        given = {"scan axis": "scan_step", "detector axis": "reciprocal_scale"}
        if any(f"{axis} scale" in str(w.message) and cal[key] is not None for axis, key in given.items()):
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    native = _stored_dtype(data.dtype)
    if cal["reciprocal_scale"] is None:
        meta["reciprocal_scale"] = _reciprocal_from_file(meta["reciprocal_scale"], meta["source"])
    for k, v in cal.items():
        if v is not None:
            meta[k] = v

    signature = {"source": meta["source"], **_fingerprint(Path(meta["source"])),
                 "shape": list(data.shape), "dtype": native.str, "chunks": list(chunks),
                 "shards": list(shards) if shards else None, "reader": _jsonable(reader_kwargs)}
    attrs = {"kind": "input", "version": __version__, "source": meta["source"],
             "format": meta["format"], "original_shape": meta["original_shape"],
             "original_dtype": meta["original_dtype"], "scan_step": meta["scan_step"],
             "reciprocal_scale": meta["reciprocal_scale"], "created": creation_stamp(),
             "complete": False}
    for k in ("dataset", "original_source"):
        if k in meta:
            attrs[k] = meta[k]

    grid = tuple(math.ceil(s / u) for s, u in zip(data.shape[:2], unit[:2]))
    unit_bytes = math.prod(unit) * native.itemsize
    with atomic_store(dest, overwrite=overwrite, keep_partial=True, replaces="input") as tmp:
        done = _prepare_partial(tmp, signature, data.shape, native, chunks, shards, attrs)
        todo = [idx for idx in np.ndindex(*grid) if idx not in done]
        bar = ProgressBar(math.prod(grid), unit_bytes, label=f"ingest {dest.name} ",
                          enabled=progress).start(len(done))
        blocks = data.to_delayed()
        per_batch = 4 * _n_threads()
        written = 0
        # per detector pixel, the patterns written in this run where it is NaN or infinite
        nonfinite, n_patterns = np.zeros(data.shape[2:], np.int64), 0
        try:
            for b in range(0, len(todo), per_batch):
                batch = todo[b:b + per_batch]
                regions = [_region(i, j, unit, data.shape) for i, j in batch]
                tasks = [dask.delayed(_write_unit, pure=False)(
                    blocks[i, j, 0, 0], str(tmp), r, native.str,
                    str(tmp / _STATE / "done" / f"{i}.{j}")) for (i, j), r in zip(batch, regions)]
                n_patterns += sum((r[0].stop - r[0].start) * (r[1].stop - r[1].start)
                                  for r in regions)
                for counts in dask.compute(*tasks):
                    if isinstance(counts, np.ndarray):
                        nonfinite += counts
                written += len(batch)
                bar.update(len(batch))
                if _on_batch_done is not None:
                    _on_batch_done(written)
        finally:
            bar.close()
        _warn_nonfinite(nonfinite, n_patterns, dest)
        group = zarr.open_group(str(tmp), mode="r+")
        group.attrs["spedflow"] = {**attrs, "complete": True}
        shutil.rmtree(tmp / _STATE)
    return dest


# --------------------------------------------------------------------------- pieces

def _write_unit(block: np.ndarray, store: str, region: tuple, dtype: str, marker: str):
    """Write one block (one task), then mark it done. Returns, for float data, the
    number of the block's patterns in which each detector pixel is NaN or infinite
    ((ky, kx) int64), else 1."""
    arr = zarr.open_array(store, path=DATA, mode="r+")
    block = np.ascontiguousarray(block, dtype=np.dtype(dtype))
    arr[region] = block
    with open(marker, "w"):
        pass
    if block.dtype.kind not in "fc":
        return 1
    return np.count_nonzero(~np.isfinite(block), axis=(0, 1)).astype(np.int64)


def _warn_nonfinite(nonfinite: np.ndarray, n_patterns: int, dest: Path) -> None:
    """Warn when some patterns hold NaN or infinite values at pixels that are not
    NaN in every pattern (those ``segment`` repairs as bad pixels): it refuses them."""
    some = (nonfinite > 0) & (nonfinite < n_patterns)
    if not some.any():
        return
    ky, kx = np.argwhere(some)[0]
    warnings.warn(f"{str(dest)!r}: NaN or infinite values at {int(some.sum())} detector pixels in "
                  f"some patterns only (pixel ({ky}, {kx}) in {int(nonfinite[ky, kx])} of "
                  f"{n_patterns}), which `spedflow segment` refuses: replace them (e.g. "
                  f"numpy.nan_to_num) and write the store with spedflow.from_array",
                  RuntimeWarning, stacklevel=3)


def _region(i: int, j: int, unit, shape) -> tuple[slice, ...]:
    return (slice(i * unit[0], min((i + 1) * unit[0], shape[0])),
            slice(j * unit[1], min((j + 1) * unit[1], shape[1])), slice(None), slice(None))


def _prepare_partial(tmp: Path, signature: dict, shape, dtype, chunks, shards, attrs) -> set:
    """Reuse a matching partial store (return its finished units) or start one."""
    state = tmp / _STATE
    if tmp.exists():
        try:
            old = json.loads((state / "source.json").read_text())
        except (OSError, ValueError):
            old = None
        if old == signature:
            done = set()
            for f in (state / "done").iterdir():
                i, _, j = f.name.partition(".")
                done.add((int(i), int(j)))
            return done
        warnings.warn(f"{str(tmp)!r} is an unfinished ingest of a different source or with other "
                      "settings; starting afresh", RuntimeWarning, stacklevel=3)
        shutil.rmtree(tmp)
    group = zarr.open_group(str(tmp), mode="w")
    create_array(group, DATA, shape, dtype, chunks, shards=shards)
    group.attrs["spedflow"] = attrs
    (state / "done").mkdir(parents=True)
    # written last: a partial store without it is not resumable and is discarded
    (state / "source.json").write_text(json.dumps(signature))
    return set()


def _fingerprint(path: Path) -> dict:
    """Size and modification time of the source (summed over a directory store)."""
    if path.is_file():
        st = path.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    size, mtime = 0, 0
    for root, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
    return {"size": size, "mtime_ns": mtime}


def _check_shards(shards, chunks, shape):
    if shards is None:
        return None
    try:
        s = tuple(int(v) for v in shards)
    except (TypeError, ValueError):
        raise ParameterError(f"`shards` must be 2 or 4 integers (got {shards!r})") from None
    if len(s) == 2:
        s = s + tuple(shape[2:])
    if len(s) != 4 or tuple(s[2:]) != tuple(shape[2:]) or min(s) < 1 \
            or s[0] % chunks[0] or s[1] % chunks[1]:
        raise ParameterError(f"`shards` must be (sy, sx) multiples of the chunk shape "
                             f"{tuple(chunks[:2])} with whole {tuple(shape[2:])} patterns (got {shards!r})")
    return s


def _reciprocal_from_file(cal: dict, source: str) -> dict:
    """The file's detector calibration, or unset (with a warning) when its units are
    not those of a reciprocal-space scale: rosettasciio reports an ASTAR blockfile's
    in cm, a length, which would label the report's k axes in cm."""
    units = cal.get("units")
    if cal.get("value") is None or units is None or _known_units(units, reciprocal=True):
        return cal
    kind = "a length" if _known_units(units, reciprocal=False) else "neither an inverse length nor an angle"
    warnings.warn(f"{source!r}: the file's detector calibration ({cal['value']:g} {units} per pixel) is not "
                  f"a reciprocal-space scale ({units} is {kind}); left unset: give it with --reciprocal-scale "
                  f"VALUE:UNITS (`reciprocal_scale=` in Python), e.g. 0.032:1/A", RuntimeWarning, stacklevel=3)
    return {"value": None, "units": None}


def _stored_dtype(dtype) -> np.dtype:
    """The type a store holds data of ``dtype`` in: native byte order, and float16 as
    float32 (half precision overflows in the sums of a few patterns)."""
    native = np.dtype(dtype).newbyteorder("=")
    return np.dtype(np.float32) if native == np.float16 else native


def _parse_calibration(name: str, value, default_units: str) -> dict | None:
    """None, number, (value, units), {"value", "units"} or "value units" -> dict."""
    if value is None:
        return None
    units = default_units
    if isinstance(value, str):  # "12.8 nm", "12.8:nm", "12.8nm" (as the command takes it)
        m = CALIBRATION_TEXT.fullmatch(value)
        if not m:
            raise ParameterError(f"`{name}` must look like '12.8 nm' (got {value!r})")
        value, units = float(m.group(1)), (m.group(2) or default_units)
    elif isinstance(value, dict):
        if set(value) != {"value", "units"}:
            raise ParameterError(f"`{name}` must have keys value and units (got {sorted(value)})")
        value, units = value["value"], value["units"]
    elif isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ParameterError(f"`{name}` must be (value, units) (got {value!r})")
        value, units = value
    check_range(name, value, low=0, low_open=True)  # finite, > 0
    if not isinstance(units, str) or not units:
        raise ParameterError(f"`{name}` units must be a non-empty string (got {units!r})")
    if not _known_units(units, reciprocal=name == "reciprocal_scale"):
        kind = "an inverse length or an angle (1/nm, 1/A, mrad)" if name == "reciprocal_scale" \
            else "a length (nm, A, pm, um)"
        raise ParameterError(f"`{name}` units {units!r} are not {kind}")
    return {"value": float(value), "units": units}


_LENGTHS = {"m", "cm", "mm", "um", "µm", "μm", "nm", "a", "å", "pm", "px", "pixel", "pixels"}


def _known_units(units: str, *, reciprocal: bool) -> bool:
    """Whether ``units`` name a length (or, ``reciprocal``, an inverse length, an angle,
    or pixels) in one of the usual spellings: ``nm``, ``1/nm``, ``nm^-1``, ``nm-1``, ``Å⁻¹``."""
    u = units.strip().lower().replace(" ", "")
    if not reciprocal:
        return u in _LENGTHS
    if u in ("mrad", "rad", "px", "pixel", "pixels"):
        return True
    if u.startswith("1/") and u[2:] in _LENGTHS:
        return True
    for suffix in ("^-1", "-1", "⁻¹", "**-1"):
        if u.endswith(suffix) and u[:-len(suffix)] in _LENGTHS:
            return True
    return False


def _jsonable(d: dict) -> dict:
    out: dict[str, Any] = {}
    for k, v in sorted(d.items()):
        if isinstance(v, (tuple, list)):
            v = [int(x) if isinstance(x, (int, np.integer)) else x for x in v]
        elif v is not None and not isinstance(v, (int, float, str, bool)):
            v = str(np.dtype(v).str) if k == "dtype" else str(v)
        out[k] = v
    return out


def _n_threads() -> int:
    """Threads that will run tasks: the distributed client's, else the local pool's."""
    try:
        from distributed import default_client
        return max(1, sum(default_client().nthreads().values()))
    except (ImportError, ValueError):
        pass
    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
