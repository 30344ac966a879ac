"""A registry of public SPED / 4D-STEM data sets, and a verified, resumable download.

``fetch(name)`` downloads a registered file with a progress bar into a cache
directory (``$SPEDFLOW_DATA`` or ``~/.cache/spedflow``), resuming a partial download
with an HTTP Range request, checks its checksum, and then ingests it into a Zarr
store with the calibration recorded here. A file whose checksum does not match is
never used and never left under its final name.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

__all__ = ["Dataset", "REGISTRY", "download", "fetch", "format_registry"]

_PYXEM = "https://zenodo.org/records/15490547/files/"


@dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    doi: str
    filename: str
    url: str | None
    checksum: str | None  # "md5:..." or "sha256:..."; None: record on first download
    size_bytes: int | None = None
    shape: tuple | None = None
    licence: str = ""
    scan_step: dict | None = None
    reciprocal_scale: dict | None = None
    params: dict = field(default_factory=dict)  # overrides for `spedflow segment --set`


REGISTRY: dict[str, Dataset] = {d.name: d for d in [
    Dataset(
        "mgo_nano", "Partly overlapping MgO nanocrystals, SPED (ASTAR, 200 kV) - the data of "
        "Bergh et al. (2020), converted (pyxem example data)",
        "10.5281/zenodo.15490547", "mgo_nano.zspy", _PYXEM + "mgo_nano.zspy",
        "md5:38a03c23cec147a9cffab9ea349cd15a", shape=(105, 105, 144, 144), licence="CC BY 4.0",
        scan_step={"value": 3.03, "units": "nm"},
        reciprocal_scale={"value": 0.03246, "units": "1/A"},
        params={"preprocess": {"nav_binning": 1}}),
    Dataset(
        "mgo_bergh2019", "Bergh (2019): SPED data of partly overlapping magnesium oxide nanoparticles "
        "(the original Zenodo record of the paper; 144x144 patterns). The record's file name and "
        "checksum are recorded on first download: pass --url to the file you want.",
        "10.5281/zenodo.3382874", "mgo_bergh2019.hspy", None, None, licence="CC BY 4.0",
        scan_step={"value": 3.03, "units": "nm"},
        reciprocal_scale={"value": 0.03246, "units": "1/A"}),
    Dataset(
        "pdnip_glass", "PdNiP metallic glass, (128, 128 | 128, 128) (pyxem example data)",
        "10.5281/zenodo.15490547", "PdNiP.zspy", _PYXEM + "PdNiP.zspy",
        "md5:b16375d23eda3da60ea2ff36cc11c5bd", shape=(128, 128, 128, 128), licence="CC BY 4.0"),
    Dataset(
        "zrnb_precipitate", "ZrNb precipitate, (128, 128 | 128, 128) (pyxem example data)",
        "10.5281/zenodo.15490547", "ZrNbPercipitate.zspy", _PYXEM + "ZrNbPercipitate.zspy",
        "md5:7012a2bdf564f4fb25299af05412723f", shape=(128, 128, 128, 128), licence="CC BY 4.0"),
    Dataset(
        "sped_ag", "SPED of a polycrystalline Ag film (pyxem example data)",
        "10.5281/zenodo.15490547", "SPED-Ag.zspy", _PYXEM + "SPED-Ag.zspy",
        "md5:8556346543fc19f0ef9bdc0f4a6619b5", licence="see the record"),
    Dataset(
        "py4dstem_ws2", "Polycrystalline WS2, 4D-STEM (py4DSTEM tutorial data; distributed from a "
        "cloud drive without a published checksum: pass --url, the checksum is printed on first "
        "download for you to record)",
        "", "polycrystal_2D_WS2.h5", None, None, licence="see py4DSTEM tutorials"),
]}


def format_registry() -> str:
    lines = [f"{'name':18s} {'file':24s} {'checksum':10s} description"]
    for d in REGISTRY.values():
        lines.append(f"{d.name:18s} {d.filename:24s} {'yes' if d.checksum else 'first use':10s} {d.description}")
    return "\n".join(lines)


def _hasher(checksum: str | None):
    algo = (checksum or "sha256:").split(":", 1)[0]
    if algo not in ("md5", "sha256", "sha1"):
        raise InputError(f"unsupported checksum algorithm {algo!r} (use md5: or sha256:)")
    return algo, hashlib.new(algo)


def _file_hash(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**22), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, *, checksum: str | None, progress: bool = True,
             timeout: float = 30.0, retries: int = 3) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), then verify ``checksum``.

    Raises InputError for a network failure after ``retries`` attempts or a checksum
    mismatch (the bad file is deleted). Returns ``dest``.
    """
    dest = Path(dest)
    algo, _ = _hasher(checksum)
    if dest.exists():
        if checksum is None or f"{algo}:{_file_hash(dest, algo)}" == checksum:
            return dest
        dest.unlink()  # a stale or corrupt copy: fetch again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error = None
    for attempt in range(retries):
        have = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                if have and resp.status != 206:  # server ignored the range: start over
                    have = 0
                total = resp.headers.get("Content-Length")
                total = int(total) + have if total is not None else None
                with open(part, "ab" if have else "wb") as fh:
                    done, t0 = have, time.monotonic()
                    while True:
                        try:
                            block = resp.read(2**16)
                        except http.client.IncompleteRead as exc:  # keep what arrived
                            fh.write(exc.partial)
                            raise
                        if not block:
                            break
                        fh.write(block)
                        done += len(block)
                        if progress:
                            _bar(dest.name, done, total, t0, have)
                if total is not None and done < total:
                    raise urllib.error.URLError(f"connection closed after {done} of {total} bytes")
            if progress:
                print(file=sys.stderr)
            break
        except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as exc:
            last_error = exc
            if progress:
                print(file=sys.stderr)
            time.sleep(min(2.0, 0.2 * (attempt + 1)))
    else:
        raise InputError(f"download of {url} failed after {retries} attempts: {last_error}; "
                         f"rerun to resume from {part.stat().st_size if part.exists() else 0} bytes")
    got = f"{algo}:{_file_hash(part, algo)}"
    if checksum is not None and got != checksum:
        part.unlink()
        raise InputError(f"checksum mismatch for {dest.name}: expected {checksum}, got {got}; "
                         "the file was deleted")
    if checksum is None:
        print(f"spedflow: {dest.name} has checksum {got}; record it in the registry", file=sys.stderr)
    os.replace(part, dest)
    return dest


def _bar(name, done, total, t0, start):
    rate = (done - start) / max(time.monotonic() - t0, 1e-6) / 2**20
    if total:
        frac = done / total
        n = int(30 * frac)
        text = f"\r{name}: [{'#' * n}{' ' * (30 - n)}] {frac:5.1%} {done / 2**20:.1f}/{total / 2**20:.1f} MB {rate:.1f} MB/s"
    else:
        text = f"\r{name}: {done / 2**20:.1f} MB {rate:.1f} MB/s"
    print(text, end="", file=sys.stderr, flush=True)


def data_dir(cache_dir=None) -> Path:
    return Path(cache_dir or os.environ.get("SPEDFLOW_DATA") or Path.home() / ".cache" / "spedflow")


def fetch(name: str, *, dest=None, cache_dir=None, url: str | None = None, overwrite: bool = False,
          progress: bool = True, ingest: bool = True) -> Path:
    """Download a registered data set (verified) and ingest it into ``dest`` (Zarr)."""
    if name not in REGISTRY:
        raise InputError(f"unknown data set {name!r}; known: {', '.join(REGISTRY)}")
    d = REGISTRY[name]
    src_url = url or d.url
    if src_url is None:
        raise InputError(f"data set {name!r} has no fixed download address; pass --url")
    local = download(src_url, data_dir(cache_dir) / d.filename, checksum=d.checksum, progress=progress)
    if not ingest:
        return local
    from .io import ingest as _ingest
    dest = Path(dest or f"{name}.zarr")
    _ingest(local, dest, overwrite=overwrite, scan_step=d.scan_step,
            reciprocal_scale=d.reciprocal_scale, progress=progress)
    return dest
