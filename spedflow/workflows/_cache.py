"""The stage cache: intermediate products keyed by their inputs and parameters.

Each stage of a workflow writes its products into ``<cache>/<stage>-<key>/``, where the
key is a hash of everything the stage depends on (the input store's identity, the
parameters of this and all earlier stages). A stage is complete when its directory
holds the marker file ``COMPLETE``, written last. Every key includes a fingerprint of
spedflow's own source (:func:`code_fingerprint`), so products of other code, an edited
or upgraded install, are never reused. An interrupted run restarted with the
same command finds the completed stages and reuses them; a stage whose per-block work
was interrupted reuses the blocks already written. Changing a late-stage parameter
changes only that stage's key and the keys of the stages after it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import zarr

try:
    import fcntl
except ImportError:  # Windows: no locks, no pruning
    fcntl = None

from .._version import __version__
from ..io import create_array

__all__ = ["StageCache", "Stage", "stage_key"]


def stage_key(*parts) -> str:
    """A short stable hash of JSON-able parts (dicts are key-sorted) and of the code."""
    blob = json.dumps([code_fingerprint(), *parts], sort_keys=True, default=_json_default)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """The version and a hash of every ``.py`` file of the installed spedflow package
    (~1 MB, a few ms once per process). The version alone let a cache written by
    edited code of the same version be reused (a development checkout, a patched
    install); the source is what the products depend on."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(__version__.encode())
    try:
        for f in sorted(root.rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    except OSError:  # unreadable source (a frozen install): the version alone
        return __version__
    return f"{__version__}+{h.hexdigest()[:16]}"


def _json_default(o):
    if isinstance(o, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(o).tobytes()).hexdigest()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot hash {type(o).__name__}")


class Stage:
    """One stage's directory in the cache."""

    def __init__(self, root: Path, name: str, key: str):
        self.name = name
        self.key = key
        self.path = root / f"{name}-{key}"

    @property
    def complete(self) -> bool:
        return (self.path / "COMPLETE").exists()

    def group(self, mode: str = "a") -> zarr.Group:
        self.path.mkdir(parents=True, exist_ok=True)
        return zarr.open_group(str(self.path / "products.zarr"), mode=mode)

    # small numpy products, stored as checksummed zarr arrays
    def save(self, name: str, array, chunks=None) -> None:
        array = np.asarray(array)
        g = self.group()
        arr = create_array(g, name, array.shape, array.dtype,
                           chunks=slab_chunks(array) if chunks is None else chunks, overwrite=True)
        write_slabs(arr, array)

    def load(self, name: str) -> np.ndarray:
        return self.group("r")[name][...]

    def save_attrs(self, **attrs) -> None:
        self.group().attrs.update(json.loads(json.dumps(attrs, default=_json_default)))

    def attrs(self) -> dict:
        return dict(self.group("r").attrs)

    # per-block products, so an interrupted pass resumes block by block
    def block_path(self, index) -> Path:
        return self.path / "blocks" / ("_".join(str(int(i)) for i in index) + ".npz")

    def mark_complete(self) -> None:
        """Write the marker, holding the fingerprint of the code that made the stage
        (:meth:`StageCache.prune_stale` removes stages no other run of this code can reuse)."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "COMPLETE").write_text(code_fingerprint() + "\n")


def write_slabs(arr, array: np.ndarray, slab_bytes: int = 32 * 2**20) -> None:
    """``arr[...] = array``, whole chunk rows ~``slab_bytes`` at a time: zarr holds all it
    encodes in one call (322 MB for a 255 MB image stack written at once)."""
    if array.ndim == 0 or array.size == 0:
        if array.size:
            arr[...] = array
        return
    rows = arr.chunks[0] * max(1, slab_bytes // max(1, array[:arr.chunks[0]].nbytes))
    for s in range(0, array.shape[0], rows):
        arr[s:s + rows] = array[s:s + rows]


def slab_chunks(array, chunk_bytes: int = 16 * 2**20):
    """Chunks of at most ~``chunk_bytes``, split along the first axis, for ``array``
    (anything with ``shape`` and ``dtype``: NumPy, zarr, dask; nothing is read)."""
    shape = tuple(int(s) for s in array.shape)
    if len(shape) == 0 or 0 in shape:
        return tuple(max(1, s) for s in shape) or None
    per_row = max(1, math.prod(shape[1:]) * np.dtype(array.dtype).itemsize)
    rows = max(1, min(shape[0], chunk_bytes // per_row))
    return (rows, *shape[1:])


def save_block(path: Path, **arrays) -> None:
    """Write one block's products atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def load_block(path: Path, names=None) -> dict:
    """One block's products (only ``names``, if given: an npz reads arrays on demand)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in (z.files if names is None else names)}


class StageCache:
    """The cache directory of one run (default: ``<result>.cache`` beside the result)."""

    def __init__(self, root):
        self.root = Path(root)

    def stage(self, name: str, *key_parts) -> Stage:
        return Stage(self.root, name, stage_key(name, *key_parts))

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    @contextlib.contextmanager
    def in_use(self):
        """Hold the cache while a run uses it.

        - One run at a time writes it (``<cache>/.writer``, exclusive): a second run on
          the same cache (the same result, or the same ``--cache``) waits for the first
          to end, says so, and then reuses what it wrote. Two runs that computed one
          stage at once overwrote each other's arrays and left a stage marked complete
          without its watershed labels, which every later run then failed on.
        - A shared lock (``<cache>/.lock``): a run of other code that finishes meanwhile
          skips its :meth:`prune_stale`, and deletes nothing this one reads.

        Without ``fcntl`` (Windows) or where the folder cannot be written, no locks, and
        :meth:`prune_stale` then prunes nothing. Yields whether it waited for another run.
        Live mode (``spedflow watch``) holds them while it writes its blocks."""
        fh = _lock_file(self.root)  # the shared lock first: no prune while this run waits
        writer = None
        waited = False
        try:
            if fh is not None:
                fcntl.flock(fh, fcntl.LOCK_SH)
            writer = _lock_file(self.root, ".writer")
            if writer is not None:
                try:
                    fcntl.flock(writer, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    logging.getLogger("spedflow").warning(
                        "another spedflow run is using the stage cache %s (the same result, or "
                        "the same --cache): waiting for it to end, then reusing what it wrote",
                        self.root)
                    fcntl.flock(writer, fcntl.LOCK_EX)
                    waited = True
            yield waited
        finally:
            for f in (writer, fh):
                if f is not None:
                    f.close()  # releases its lock

    def prune_stale(self) -> tuple[int, int]:
        """Remove the complete stages written by other spedflow code (another version, an
        edited checkout): every key holds the code's fingerprint, so no run of this code
        can reuse them, and without pruning each upgrade would leave a cache as large as
        the data (the NMF's normalised matrix) behind. Incomplete stages are kept (an
        interrupted run of this code resumes them). Only when no run holds the cache
        (:meth:`in_use`): another run, of the other code, may be reading those stages.
        Returns (stages removed, bytes freed).
        """
        fh = _lock_file(self.root)
        if fh is None:
            return 0, 0
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # another run is using the cache: leave it alone
                return 0, 0
            return self._prune(code_fingerprint())
        finally:
            fh.close()

    def _prune(self, mine: str) -> tuple[int, int]:
        removed = freed = 0
        for d in self.root.iterdir():
            marker = d / "COMPLETE"
            if not (d.is_dir() and _STAGE_DIR.fullmatch(d.name) and marker.is_file()):
                continue
            try:
                if marker.read_text().strip() == mine:
                    continue
                size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            except OSError:
                continue
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed, freed = removed + 1, freed + size
        return removed, freed


#: A stage's directory name: ``<stage>-<16 hex digits of its key>``.
_STAGE_DIR = re.compile(r"[a-z0-9_]+-[0-9a-f]{16}")


def _lock_file(root: Path, name: str = ".lock"):
    """``<root>/<name>`` opened for locking, or None (no ``fcntl``, or not writable)."""
    if fcntl is None:
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        return open(root / name, "a+b")
    except OSError:
        return None
