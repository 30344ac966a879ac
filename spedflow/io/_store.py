"""Zarr v3 stores: the chunk policy, the codecs, atomic writes and verification.

An *input store* (written by ``ingest`` or ``simulate``) is a Zarr v3 group::

    STORE.zarr/
      data            (scan_y, scan_x, ky, kx)   whole patterns in every chunk
      truth/          (simulated stores only) masks, patterns, groups
      attrs["spedflow"] = {"kind": "input", "version", "source", "original_shape",
                           "original_dtype", "scan_step": {"value", "units"},
                           "reciprocal_scale": {"value", "units"}, ...}

Every array spedflow writes uses Blosc (zstd, bit-shuffle) followed by a CRC32C
checksum codec, so a flipped byte in any chunk is detected when it is read
(``verify_store``).
"""

from __future__ import annotations

import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from ..errors import InputError, ParameterError, StoreExistsError

__all__ = [
    "DATA", "TARGET_CHUNK_BYTES", "compressors", "nav_chunks", "create_array",
    "open_input", "read_meta", "atomic_store", "check_destination", "check_side_directory",
    "creation_stamp", "verify_store",
    "is_local", "path_exists",
]

DATA = "data"
TARGET_CHUNK_BYTES = 16 * 2**20  # 16 MiB of uncompressed data per chunk


def compressors(dtype=None, *, cname: str = "zstd", clevel: int = 1):
    """Blosc with bit-shuffle, then a CRC32C checksum of the stored bytes.

    zstd level 1: on counting-noise diffraction data the Poisson noise sets the
    entropy, so higher levels barely help (level 3: 2 % smaller) but encode ~1.7x
    slower, and encoding is what limits ingest throughput.
    """
    return [BloscCodec(cname=cname, clevel=clevel, shuffle=BloscShuffle.bitshuffle),
            Crc32cCodec()]


def nav_chunks(shape, dtype, target_bytes: int = TARGET_CHUNK_BYTES) -> tuple[int, ...]:
    """Chunk shape for a (scan_y, scan_x, ky, kx) array: whole patterns, ~target bytes.

    Chunks are square-ish in navigation space (good for both row- and
    block-wise access) and never split a pattern.
    """
    sy, sx, ky, kx = (int(s) for s in shape)
    per_pattern = ky * kx * np.dtype(dtype).itemsize
    n = max(1, target_bytes // per_pattern)
    cy = max(1, min(sy, int(math.isqrt(n))))
    cx = max(1, min(sx, n // cy))
    if cx == sx:  # whole rows fit: use the spare budget for more rows
        cy = max(1, min(sy, n // sx))
    return (cy, cx, ky, kx)


def create_array(group: zarr.Group, name: str, shape, dtype, chunks=None, *,
                 shards=None, attrs: dict | None = None, fill_value=0, overwrite=False):
    """Create a checksummed, compressed array in ``group``."""
    chunks = tuple(chunks) if chunks is not None else tuple(max(1, s) for s in shape)
    arr = group.create_array(
        name, shape=tuple(int(s) for s in shape), chunks=chunks, shards=shards,
        dtype=np.dtype(dtype), compressors=compressors(dtype), fill_value=fill_value,
        overwrite=overwrite)
    if attrs:
        arr.attrs.update(attrs)
    return arr


def path_text(path) -> str:
    """``path`` (a str or path-like: a file, a folder or a URL) as text; anything else,
    such as an array passed where its store's path belongs, is refused in one line."""
    if isinstance(path, str):
        return path
    if isinstance(path, os.PathLike):
        return str(os.fspath(path))
    kind = f"{type(path).__module__.split('.')[0]}.{type(path).__name__}"
    hint = (": write the array to a store first, spedflow.from_array(array, 'data.zarr'), and pass "
            "that path" if hasattr(path, "shape") else "")
    raise ParameterError(f"a store or file must be given by its path, a str or pathlib.Path "
                         f"(got a {kind}){hint}")


def is_local(path) -> bool:
    text = path_text(path)
    return "://" not in text or text.startswith("file://")


def local_path(path) -> Path | None:
    """The file-system path of a local ``path`` (``file://`` stripped); None for a URL."""
    return Path(path_text(path).removeprefix("file://")) if is_local(path) else None


def path_exists(path) -> bool:
    if is_local(path):
        return local_path(path).exists()
    import fsspec
    fs, p = fsspec.core.url_to_fs(str(path))
    return fs.exists(p)


def check_destination(path, overwrite: bool, *, sources=(), replaces: str | None = None) -> None:
    """Refuse a destination that would lose data; never delete here.

    Parameters
    ----------
    path : the store to be written.
    overwrite : an existing ``path`` may be replaced (else it is refused).
    sources : paths being read (the input store): ``path`` must not be one of them,
        contain one or lie inside one (replacing it would delete the data being read).
    replaces : ``"result"`` or ``"input"``: with ``overwrite``, an existing ``path`` is
        replaced only if it is a spedflow store of that kind, never another folder or
        file that happens to be there (a project directory, a raw scan).
    """
    local = local_path(path)
    if local is not None:
        dest = local.expanduser().absolute().resolve()
        for src in sources:
            if local_path(src) is None:
                continue
            s = local_path(src).expanduser().absolute().resolve()
            if dest == s or dest in s.parents or s in dest.parents:
                raise ParameterError(f"destination {str(path)!r} must not be (or contain, or "
                                     f"lie inside) the input {str(src)!r}")
    if not path_exists(path):
        return
    if not overwrite:
        raise StoreExistsError(f"destination {str(path)!r} exists; pass --overwrite (overwrite=True in Python) to replace it")
    if replaces is not None and local is not None:
        kind = _spedflow_kind(local)
        if kind != replaces:
            what = "a file" if local.is_file() else \
                (f"a spedflow {kind} store" if kind else "a folder")
            raise StoreExistsError(f"destination {str(path)!r} exists and is not a spedflow {replaces} "
                                   f"store (it is {what}): not replacing it (choose another "
                                   f"destination or remove it yourself)")


def check_side_directory(path, *, what: str, sources=()) -> None:
    """Refuse a folder spedflow writes next to its stores (a stage cache, a report, an
    export) where writing into it would touch data: a file; one of the stores being
    read or written (``sources``) or a folder inside one; a spedflow store, or a folder
    inside one. A folder that holds stores is fine (what is written there has names of
    its own; the only things a stage cache ever deletes are folders named as its stages,
    ``<stage>-<16 hex digits>`` holding a ``COMPLETE`` marker of other spedflow code).
    Remote paths are not checked. ``what``: how
    the user gave it (``"--cache"``)."""
    local = local_path(path)
    if local is None:
        return
    dest = local.expanduser().absolute().resolve()
    if dest.exists() and not dest.is_dir():
        raise InputError(f"{what} {str(path)!r} exists and is not a directory")
    for src in sources:
        if src is None or local_path(src) is None:
            continue
        s = local_path(src).expanduser().absolute().resolve()
        if dest == s or s in dest.parents:
            raise ParameterError(f"{what} {str(path)!r} must not be (or lie inside) the store "
                                 f"{str(src)!r}")
    for folder in (dest, *dest.parents):
        kind = _spedflow_kind(folder) if folder.is_dir() else None
        if kind is not None:
            where = "is" if folder == dest else f"lies inside {str(folder)!r},"
            raise ParameterError(f"{what} {str(path)!r} {where} a spedflow {kind} store; choose "
                                 "another folder")


def _spedflow_kind(path: Path) -> str | None:
    """``attrs["spedflow"]["kind"]`` of the Zarr group at ``path`` (None: not one)."""
    if not (path / "zarr.json").is_file():
        return None
    try:
        meta = zarr.open_group(str(path), mode="r").attrs.get("spedflow", {})
    except Exception:  # unreadable metadata: not something spedflow wrote
        return None
    return meta.get("kind") if isinstance(meta, dict) else None


def creation_stamp() -> str:
    """A unique mark for a newly written input store (UTC time and a random id): the
    stage cache keys on it, so a store written again at the same path, with other
    data, never reuses the stages of the old one."""
    import datetime
    import uuid
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{now}-{uuid.uuid4().hex[:12]}"


@contextmanager
def atomic_store(path, *, overwrite: bool = False, partial_suffix: str = ".partial",
                 keep_partial: bool = False, sources=(), replaces: str | None = None):
    """Write a store under a temporary name and rename it into place when done.

    Yields the temporary path. On success an existing ``path`` (allowed only with
    ``overwrite``, and with ``sources`` and ``replaces`` as for
    :func:`check_destination`) is replaced. On failure the temporary store is removed
    unless ``keep_partial`` (used by resumable ingest), so a crash never leaves
    something at ``path`` that looks finished.
    """
    path = Path(path)
    check_destination(path, overwrite, sources=sources, replaces=replaces)
    tmp = path.with_name(path.name + partial_suffix)
    if tmp.exists() and not keep_partial:
        shutil.rmtree(tmp)
    try:
        yield tmp
    except BaseException:
        if not keep_partial and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _open_group(path, mode="r"):
    local = local_path(path)
    if local is not None and not local.exists():
        raise InputError(f"store {str(path)!r} does not exist")
    if local is not None and local.is_file():  # a Zarr store is a folder
        raise InputError(f"{str(path)!r} is a file, not a Zarr store: convert it first with "
                         f"`spedflow ingest {str(path)} STORE.zarr`")
    try:
        return zarr.open_group(str(path), mode=mode)
    except zarr.errors.ContainsArrayError:
        raise InputError(f"{str(path)!r} is a bare Zarr array, not a spedflow store: convert it "
                         f"with `spedflow ingest {str(path)} STORE.zarr`") from None
    except Exception as exc:  # zarr raises several types for a non-store
        raise InputError(f"{str(path)!r} is not a readable Zarr store ({type(exc).__name__}: {exc})") from None


def read_meta(path) -> dict:
    """The ``spedflow`` attributes of a store (empty dict if none)."""
    g = _open_group(path)
    return dict(g.attrs.get("spedflow", {}))


def open_input(path, *, array: str = DATA):
    """Open an input store's 4-D data as a zarr array, checking what it holds.

    Returns ``(zarr.Array, meta dict)``. Raises InputError with one line for a
    missing store, a store without ``data``, wrong dimensionality or dtype.
    """
    g = _open_group(path)
    if array not in g:
        meta = dict(g.attrs.get("spedflow", {}))
        if meta.get("kind") == "result":
            made = meta.get("input") if isinstance(meta.get("input"), str) else None
            raise InputError(f"{str(path)!r} is a result of `spedflow segment`, not an input store: "
                             "give the store of the data" + (f" ({made})" if made else ""))
        raise InputError(f"store {str(path)!r} has no array {array!r}; is it a spedflow store "
                         "(made by `spedflow ingest` or `spedflow simulate`)?")
    arr = g[array]
    if not isinstance(arr, zarr.Array):
        raise InputError(f"{str(path)!r}/{array} is a group, not an array")
    check_4d(arr, f"{str(path)!r}/{array}")
    return arr, dict(g.attrs.get("spedflow", {}))


def check_lazy_patterns(data, name: str = "`data`") -> None:
    """One-line InputError unless ``data`` is a 4-D dask array with whole patterns per chunk."""
    import dask.array as da
    if not isinstance(data, da.Array):
        raise InputError(f"{name} must be a dask array (got {type(data).__name__})")
    if data.ndim != 4:
        raise InputError(f"{name} must be 4-D (scan_y, scan_x, ky, kx); got shape {data.shape}")
    if len(data.chunks[2]) != 1 or len(data.chunks[3]) != 1:
        raise InputError(f"{name} chunks must hold whole patterns; got detector chunks "
                         f"{data.chunks[2]} x {data.chunks[3]}")


def check_4d(arr, name: str) -> None:
    """One-line InputError unless ``arr`` is a non-empty, numeric (Y, X, KY, KX) array."""
    if arr.ndim != 4:
        raise InputError(f"{name} must be 4-D (scan_y, scan_x, ky, kx); got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{name} has non-numeric dtype {arr.dtype}")
    if 0 in arr.shape:
        raise InputError(f"{name} is empty (shape {arr.shape})")


def verify_store(path, *, progress=None) -> list[str]:
    """Read every chunk of every array; return the chunks that fail their checksum.

    Each entry is ``"<array path> chunk (i, j, ...): <reason>"``. An empty list
    means every chunk read back and matched its CRC32C.
    """
    g = _open_group(path)
    bad: list[str] = []
    arrays = list(g.arrays()) + [(f"{gname}/{n}", a) for gname, sub in g.groups()
                                 for n, a in _walk_arrays(sub)]
    for name, arr in arrays:
        grid = [range(math.ceil(s / c)) for s, c in zip(arr.shape, arr.chunks)]
        for idx in np.ndindex(*[len(r) for r in grid]):
            sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, arr.chunks, arr.shape))
            try:
                arr[sl]
            except Exception as exc:
                bad.append(f"{name} chunk {idx}: {exc}")
        if progress is not None:
            progress(name)
    return bad


def _walk_arrays(group):
    for n, a in group.arrays():
        yield n, a
    for gname, sub in group.groups():
        for n, a in _walk_arrays(sub):
            yield f"{gname}/{n}", a
