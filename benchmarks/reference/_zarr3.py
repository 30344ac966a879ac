"""Just enough Zarr v3 to read a spedflow input store and write a result store.

The reference environment holds pyxem 0.21, which pins ``zarr<3``; zarr 2 cannot read
Zarr v3 stores. This module reads and writes the v3 format directly (``zarr.json``
metadata, chunk files under ``c/``) with numcodecs, for the codecs spedflow uses:
``bytes`` (either endianness), ``blosc``, ``zstd``, ``gzip``, ``crc32c`` (checked when
the ``crc32c`` module or numcodecs' CRC32C is available, otherwise stripped) and
``sharding_indexed`` (shards written by ``spedflow ingest --shards``). Arrays are
written uncompressed-to-Blosc-zstd without a checksum, which zarr 3 reads as usual.

Local paths only; no dependency on spedflow or zarr.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

__all__ = ["read_group_attrs", "read_array", "write_group", "write_array"]

_DTYPES = {"bool": "|b1", "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2",
           "int32": "i4", "uint32": "u4", "int64": "i8", "uint64": "u8",
           "float32": "f4", "float64": "f8"}


def _meta(path: Path) -> dict:
    f = path / "zarr.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path} is not a Zarr v3 node (no zarr.json)")
    return json.loads(f.read_text())


def read_group_attrs(path) -> dict:
    """Attributes of the Zarr v3 group at ``path``."""
    meta = _meta(Path(path))
    if meta.get("node_type") != "group":
        raise ValueError(f"{path} is not a Zarr v3 group")
    return meta.get("attributes", {})


def _crc32c(data: bytes) -> int | None:
    try:
        import crc32c  # type: ignore[import-not-found]
        return crc32c.crc32c(data)
    except ImportError:
        pass
    try:
        from numcodecs.checksum32 import CRC32C
        return int(np.frombuffer(CRC32C().encode(np.frombuffer(data, np.uint8))[-4:], "<u4")[0])
    except Exception:  # noqa: BLE001 - no implementation: strip without checking
        return None


def _decode_bytes(buf: bytes, codecs: list[dict]) -> bytes:
    """Undo the bytes-to-bytes codecs (applied in reverse order)."""
    import numcodecs
    for c in reversed(codecs):
        name, conf = c["name"], c.get("configuration", {})
        if name == "crc32c":
            payload, stored = buf[:-4], int(np.frombuffer(buf[-4:], "<u4")[0])
            got = _crc32c(payload)
            if got is not None and got != stored:
                raise ValueError("CRC32C mismatch: corrupted chunk")
            buf = payload
        elif name == "blosc":
            buf = numcodecs.Blosc().decode(buf)
        elif name == "zstd":
            buf = numcodecs.Zstd().decode(buf)
        elif name == "gzip":
            buf = numcodecs.GZip().decode(buf)
        else:
            raise NotImplementedError(f"Zarr v3 codec {name!r} is not supported here")
        buf = bytes(buf)
    return buf


def _decode_chunk(buf: bytes, codecs: list[dict], shape, dtype: np.dtype, fill) -> np.ndarray:
    """Decode one stored chunk (array-to-bytes codec + bytes-to-bytes codecs)."""
    a2b = [i for i, c in enumerate(codecs) if c["name"] in ("bytes", "sharding_indexed")]
    if len(a2b) != 1 or any(c["name"] == "transpose" for c in codecs):
        raise NotImplementedError(f"unsupported codec chain {[c['name'] for c in codecs]}")
    i = a2b[0]
    c = codecs[i]
    if c["name"] == "sharding_indexed":
        return _decode_shard(buf, c["configuration"], shape, dtype, fill)
    raw = _decode_bytes(buf, codecs[i + 1:])
    endian = c.get("configuration", {}).get("endian", "little")
    dt = dtype.newbyteorder("<" if endian == "little" else ">") if dtype.itemsize > 1 else dtype
    return np.frombuffer(raw, dt).reshape(shape).astype(dtype, copy=False)


def _decode_shard(buf: bytes, conf: dict, shape, dtype, fill) -> np.ndarray:
    inner = tuple(conf["chunk_shape"])
    grid = tuple(math.ceil(s / c) for s, c in zip(shape, inner))
    n = int(np.prod(grid))
    index_codecs = conf.get("index_codecs", [{"name": "bytes", "configuration": {"endian": "little"}}])
    index_bytes = 16 * n + (4 if any(c["name"] == "crc32c" for c in index_codecs) else 0)
    where = conf.get("index_location", "end")
    ib = buf[-index_bytes:] if where == "end" else buf[:index_bytes]
    index = _decode_chunk(ib, index_codecs, grid + (2,), np.dtype("u8"), 0)
    out = np.full(shape, fill, dtype)
    for idx in np.ndindex(*grid):
        off, nb = (int(v) for v in index[idx])
        if off == 2**64 - 1 and nb == 2**64 - 1:
            continue
        block = _decode_chunk(buf[off:off + nb], conf["codecs"], inner, dtype, fill)
        sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, inner, shape))
        out[sl] = block[tuple(slice(0, s.stop - s.start) for s in sl)]
    return out


def read_array(path, *, nav_slice: tuple[slice, slice] | None = None) -> np.ndarray:
    """Read a whole Zarr v3 array (or a crop of its first two axes) into memory.

    Parameters
    ----------
    path : str or Path
        Array directory (holding ``zarr.json``).
    nav_slice : (slice, slice), optional
        Crop of the first two axes (step 1); only the chunks it touches are read.
    """
    path = Path(path)
    meta = _meta(path)
    if meta.get("node_type") != "array":
        raise ValueError(f"{path} is not a Zarr v3 array")
    dtype = np.dtype(_DTYPES.get(meta["data_type"], meta["data_type"]))
    shape = tuple(meta["shape"])
    chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    enc = meta.get("chunk_key_encoding", {"name": "default"})
    sep = enc.get("configuration", {}).get("separator", "/" if enc["name"] == "default" else ".")
    fill = meta.get("fill_value", 0) or 0
    sel = [slice(0, s) for s in shape]
    if nav_slice is not None:
        sel[:2] = [slice(*s.indices(n)[:2]) for s, n in zip(nav_slice, shape[:2])]
    out_shape = tuple(s.stop - s.start for s in sel)
    out = np.full(out_shape, fill, dtype)
    ranges = [range(s.start // c, math.ceil(s.stop / c)) if s.stop > s.start else range(0)
              for s, c in zip(sel, chunks)]
    for idx in np.ndindex(*(len(r) for r in ranges)):
        cidx = tuple(r[i] for r, i in zip(ranges, idx))
        key = sep.join(str(i) for i in cidx)
        key = ("c" + sep + key) if enc["name"] == "default" else key
        f = path / key
        if not f.exists():
            continue
        block = _decode_chunk(f.read_bytes(), meta["codecs"], chunks, dtype, fill)
        src, dst = [], []
        for ci, c, s, n in zip(cidx, chunks, sel, shape):
            lo, hi = max(ci * c, s.start), min((ci + 1) * c, s.stop, n)
            src.append(slice(lo - ci * c, hi - ci * c))
            dst.append(slice(lo - s.start, hi - s.start))
        out[tuple(dst)] = block[tuple(src)]
    return out


def write_group(path, attrs: dict | None = None) -> Path:
    """Create (or overwrite the metadata of) a Zarr v3 group at ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "zarr.json").write_text(json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": attrs or {}}, indent=2))
    return path


def write_array(path, data: np.ndarray, *, attrs: dict | None = None) -> None:
    """Write ``data`` as a Zarr v3 array of one chunk per leading index (Blosc zstd).

    Intermediate directories get group metadata, as zarr does.
    """
    import numcodecs
    path = Path(path)
    data = np.ascontiguousarray(data)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    name = {v: k for k, v in _DTYPES.items()}.get(data.dtype.str.lstrip("<|>").replace("b1", "b1"))
    name = "bool" if data.dtype == bool else np.dtype(data.dtype).name if name is None else name
    if path.exists():
        shutil.rmtree(path)
    parent = path.parent
    while not (parent / "zarr.json").exists():
        write_group(parent)
        parent = parent.parent
    path.mkdir(parents=True)
    chunks = (1,) + data.shape[1:] if data.ndim >= 2 and data.shape[0] > 0 else data.shape or (1,)
    chunks = tuple(max(int(c), 1) for c in chunks)
    typesize = data.dtype.itemsize
    meta = {
        "zarr_format": 3, "node_type": "array", "shape": list(data.shape), "data_type": name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": False if data.dtype == bool else 0,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                   {"name": "blosc", "configuration": {"typesize": typesize, "cname": "zstd",
                                                       "clevel": 1, "shuffle": "shuffle",
                                                       "blocksize": 0}}],
        "attributes": attrs or {}, "storage_transformers": [],
    }
    (path / "zarr.json").write_text(json.dumps(meta, indent=2))
    codec = numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE)
    grid = [math.ceil(s / c) for s, c in zip(data.shape, chunks)]
    for idx in np.ndindex(*grid):
        sl = tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, chunks))
        block = np.zeros(chunks, data.dtype)
        part = data[sl]
        block[tuple(slice(0, s) for s in part.shape)] = part
        f = path.joinpath("c", *(str(i) for i in idx))
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        tmp.write_bytes(codec.encode(block.tobytes()))
        os.replace(tmp, f)
