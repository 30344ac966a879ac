"""Stages both workflows share: the run plan, the beam pass, the result writer.

The workflow layer is the only place that computes, persists or writes; the stage
modules it calls only build lazy graphs or run NumPy kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import dask
import dask.array as da
import numpy as np
import zarr

from .. import cluster
from .._version import __version__
from ..config import params_to_dict
from ..errors import InputError, ParameterError
from ..io import atomic_store, check_destination, create_array, open_input
from ..io._store import local_path
from ._cache import StageCache, slab_chunks, write_slabs

log = logging.getLogger("spedflow")

__all__ = ["Plan", "prepare_run", "beam_stage", "BeamInfo", "radial_profiles", "write_result",
           "Timer"]


@dataclass
class Plan:
    """What a run reads and writes, validated before anything is computed."""

    store: str
    out: Path
    array: object  # zarr.Array
    meta: dict
    overwrite: bool
    identity: dict = field(default_factory=dict)
    #: (m, 2) detector pixels ``data()`` and ``sample_blocks()`` repair (:func:`with_bad_pixels`)
    bad_pixels: np.ndarray | None = None
    #: ``(row_gains (ky,), column_gains (kx,))`` of the detector's line defects, divided
    #: out by ``data()`` and ``sample_blocks()`` after the bad-pixel repair (:func:`with_bad_pixels`)
    line_gains: tuple | None = None
    #: detector pixels summed per side by ``data()`` and ``sample_blocks()``, after the
    #: repair (:func:`with_detector_binning`)
    detector_binning: int = 1

    @property
    def detector_shape(self) -> tuple[int, int]:
        """The patterns' shape as the run sees them (binned)."""
        ky, kx = (int(k) for k in self.array.shape[2:])
        return ky // self.detector_binning, kx // self.detector_binning

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.array.shape)) * self.array.dtype.itemsize

    @property
    def n_patterns(self) -> int:
        return int(self.array.shape[0] * self.array.shape[1])

    def data(self) -> da.Array:
        """The raw data as a dask array with the store's chunks (whole patterns), its
        bad pixels repaired."""
        from ..preprocess import lazy as pre
        data = da.from_zarr(self.array)
        if self.bad_pixels is not None and len(self.bad_pixels):
            data = pre.repair_pixels(data, self.bad_pixels)
        if self.line_gains is not None:
            data = pre.flat_field(data, *self.line_gains)
        if self.detector_binning > 1:
            data = pre.bin_detector(data, self.detector_binning)
        return data

    def sample_blocks(self):
        """:func:`spedflow.peaks.lazy.sample_blocks` of the raw data, bad pixels repaired
        (and the detector binned, as ``data()``)."""
        from ..peaks.lazy import sample_blocks
        from ..preprocess.kernels import bin_detector, flat_field, repair_pixels
        for block in sample_blocks(self.array):
            if self.bad_pixels is not None:
                block = repair_pixels(block, self.bad_pixels)
            if self.line_gains is not None:
                block = flat_field(block, *self.line_gains)
            yield block if self.detector_binning == 1 else bin_detector(block, self.detector_binning)


def prepare_run(store, out, *, overwrite: bool = False) -> Plan:
    """Open and check the input, refuse an existing result; compute nothing big."""
    arr, meta = open_input(store)
    check_whole_patterns(arr, store)
    check_destination(out, overwrite, sources=[store], replaces="result")
    masked = _sample_check(arr, store)
    plan = Plan(str(store), Path(out), arr, meta, overwrite, store_identity(store, arr, meta))
    return _with_pixels(plan, masked)


def check_whole_patterns(arr, store) -> None:
    """One-line InputError unless each chunk of ``arr`` holds whole patterns (every pass
    hands a kernel the patterns of a chunk; a store chunked across the detector comes
    from another tool)."""
    if tuple(arr.chunks[2:]) != tuple(arr.shape[2:]):
        raise InputError(f"store {str(store)!r}: its chunks ({', '.join(map(str, arr.chunks))}) split "
                         "the patterns, and every pass reads whole patterns; re-chunk it with "
                         f"`spedflow ingest {store} NEW.zarr`")


def store_identity(store, arr, meta: dict) -> dict:
    """What identifies an input store's data in the cache keys (stable while it is written).

    Besides the path, shape, dtype and chunks: the mark spedflow writes into every new
    input store (``created``, :func:`spedflow.io.creation_stamp`) and, for a local store,
    the modification time of its ``data`` array's metadata, so that a store written
    again at the same path (another simulation, a re-ingest with another byte order)
    never reuses the stages of the old data. Chunks landing in a store being written
    touch neither. Not the store's ``source`` attribute: an acquisition writing the store
    may set its attributes after live mode has planned its first chunk, and the final
    run then missed the live blocks (seen under load)."""
    local = local_path(store)
    meta_file = local / "data" / "zarr.json" if local is not None else None
    return {"store": str(Path(str(store)).resolve()) if local is not None else str(store),
            "shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(arr.chunks),
            "created": meta.get("created"),
            "data_written": meta_file.stat().st_mtime_ns if meta_file and meta_file.is_file() else None}


def _chunk_mtimes(folder: Path) -> dict | None:
    """``{path relative to folder: mtime_ns}`` of every file under a local array's folder
    but its metadata (its chunk or shard files); None when it cannot be read whole (a
    file vanishing under a writer, no permission)."""
    out = {}
    todo = [folder]
    try:
        while todo:
            with os.scandir(todo.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        todo.append(e.path)
                    elif e.name != "zarr.json":
                        out[os.path.relpath(e.path, folder)] = e.stat().st_mtime_ns
    except OSError:
        return None
    return out


def note_rewrites(plan: "Plan", cache: StageCache) -> "Plan":
    """The plan, its identity marking data rewritten in place since the cache last saw them.

    Chunks written into an existing array change neither its shape nor its metadata,
    so :func:`store_identity` alone keys a rerun on cleaned data to the old data's
    stages. The cache keeps, per input store (its whole identity: a store simulated or
    ingested again at the same path starts afresh), the modification time of each chunk
    file a run saw; a file changed, added or gone since starts a new generation of the
    data, and the stages are computed again. A book that cannot be read, or files that
    cannot be listed, also start one: reuse is only safe where nothing changed. Live
    mode keeps no book, so the final run after it, the first to keep one, reuses its
    blocks. Local stores only."""
    import hashlib
    import uuid
    local = local_path(plan.store)
    if local is None or not (local / "data").is_dir():
        return plan
    files = _chunk_mtimes(local / "data")
    key = hashlib.sha1(json.dumps(plan.identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    book = cache.root / f"data_files-{key}.json"
    generation, old = 0, None
    if book.exists():
        try:
            old = json.loads(book.read_text())
            generation = int(old["generation"])  # 0, or the time the data were last found changed
            changed = None if files is None else sum(
                1 for k in set(old["files"]) | set(files) if old["files"].get(k) != files.get(k))
        except (OSError, ValueError, KeyError, TypeError):
            old, changed = None, None
        if old is None or changed is None or changed:
            # a new generation, one no earlier run can have had (a lost book's neither)
            generation = time.time_ns()
            what = ("the record of its chunk files is unreadable" if old is None else
                    "its chunk files cannot all be listed" if changed is None else
                    f"{changed} of its chunk files changed")
            log.warning("%s: %s since its stages in %s were computed; they are computed again",
                        plan.store, what, cache.root)
    if files is not None:
        try:
            cache.root.mkdir(parents=True, exist_ok=True)
            tmp = book.with_name(f"{book.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps({"identity": plan.identity, "generation": generation,
                                       "files": files}, default=str))
            os.replace(tmp, book)
        except OSError:  # a read-only cache: nothing to keep for the next run
            pass
    if not generation:
        return plan
    return dataclasses.replace(plan, identity={**plan.identity, "data_generation": generation})


#: The smallest side (px) of a binned detector :func:`validate` accepts.
_MIN_BINNED_SIDE = 32


def _factors(a: int, b: int, least: int) -> str:
    """The binning factors that divide both ``a`` and ``b`` and leave at least ``least``
    of the smaller, listed ("none" if there is none)."""
    g = math.gcd(a, b)
    return ", ".join(str(k) for k in range(2, g + 1) if g % k == 0 and min(a, b) // k >= least) \
        or "none"


def validate(plan: "Plan", cfg) -> None:
    """Check parameters against the data's shape before anything is computed; every
    problem found is named, in one line (a small scan can break several limits)."""
    ny, nx, raw_ky, raw_kx = plan.array.shape
    b = cfg.preprocess.nav_binning
    if b > min(ny, nx):
        raise ParameterError(f"`preprocess.nav_binning` = {b} is larger than the scan "
                             f"({ny}, {nx}): binned, no scan position would be left")
    if ny % b or nx % b:
        raise ParameterError(f"`preprocess.nav_binning` = {b} does not divide the scan shape "
                             f"({ny}, {nx}); factors that do and leave 8 x 8 positions or more: "
                             f"{_factors(ny, nx, 8)}; or crop the scan (in "
                             f"Python: spedflow.from_array(spedflow.open_store(STORE)[:{ny - ny % b}, "
                             f":{nx - nx % b}], NEW_STORE))")
    d = cfg.preprocess.detector_binning
    if raw_ky % d or raw_kx % d:
        raise ParameterError(f"`preprocess.detector_binning` = {d} does not divide the detector "
                             f"shape ({raw_ky}, {raw_kx}); factors that do and leave "
                             f"{_MIN_BINNED_SIDE} px or more a side: "
                             f"{_factors(raw_ky, raw_kx, _MIN_BINNED_SIDE)}")
    ky, kx = raw_ky // d, raw_kx // d
    problems = []
    if d > 1 and min(ky, kx) < _MIN_BINNED_SIDE:
        problems.append(f"`preprocess.detector_binning` = {d} leaves {ky} x {kx} px patterns; "
                        f"keep at least {_MIN_BINNED_SIDE} px a side (a spot and the beam "
                        "need a few pixels each)")
    # lengths on the detector must fit inside it (a disc wider than the detector makes
    # masks of every pixel for every vector: gigabytes, and no image), lengths on the
    # scan inside the scan
    half_k, scan_side = min(ky, kx) / 2, max(ny // b, nx // b)
    for section, name, limit, where in (
            ("preprocess", "beam_radius", half_k, "detector"), ("peaks", "min_sigma", half_k, "detector"),
            ("peaks", "max_sigma", half_k, "detector"), ("vectors", "cluster_radius", half_k, "detector"),
            ("vectors", "beam_exclusion_radius", half_k, "detector"),
            ("vectors", "edge_margin", half_k, "detector"), ("vdf", "radius", half_k, "detector"),
            ("nmf", "beam_mask_radius", half_k, "detector"), ("watershed", "marker_radius", scan_side, "scan")):
        value = getattr(getattr(cfg, section, None), name, None)
        if value is not None and value >= limit:
            shape = (f"{ky} x {kx} px detector" + (f" (binned by {d})" if d > 1 else "")
                     if where == "detector" else
                     f"{ny // b} x {nx // b} scan" + (f" (binned by {b})" if b > 1 else ""))
            bound = "half its smaller side" if where == "detector" else "its larger side"
            problems.append(f"`{section}.{name}` = {value:g} px does not fit the {shape}: "
                            f"it must be < {limit:g} ({bound})")
    bad = cfg.preprocess.bad_pixels
    if not isinstance(bad, str):
        from ..preprocess.kernels import pixels_off_detector
        off = pixels_off_detector(bad, (raw_ky, raw_kx))
        if len(off):
            problems.append(f"`preprocess.bad_pixels`: pixel {off[0].tolist()} lies off the "
                            f"{raw_ky} x {raw_kx} px detector ([ky, kx] from 0, unbinned)")
    n_patterns = (ny // b) * (nx // b)
    min_patterns = getattr(getattr(cfg, "vectors", None), "min_patterns", None)
    if min_patterns is not None and min_patterns > n_patterns:
        problems.append(f"`vectors.min_patterns` = {min_patterns} exceeds the number of "
                        f"patterns ({n_patterns}): no vector could be found; lower it "
                        f"(e.g. --set vectors.min_patterns={min(2, n_patterns)})")
    min_size = getattr(getattr(cfg, "watershed", None), "min_size", None)
    if min_size is not None and min_size > n_patterns:
        problems.append(f"`watershed.min_size` = {min_size} exceeds the number of scan positions "
                        f"({n_patterns}): no segment could be kept; lower it "
                        f"(e.g. --set watershed.min_size={n_patterns})")
    pk = getattr(cfg, "peaks", None)
    if pk is not None and pk.noise == "counting" and pk.gain is None and max(ny, nx) < 3:
        problems.append(f"the {ny} x {nx} scan has no three neighbouring positions in a row or "
                        "column to measure the detector's counting noise on; give the data units "
                        "per electron and read-out variance as peaks.gain and peaks.read_variance "
                        "(1 and 0 for a counting detector)")
    if getattr(cfg, "nmf", None) is not None and n_patterns < 2:
        problems.append(f"the NMF workflow needs at least 2 patterns (the scan holds {n_patterns})")
    n_comp = getattr(getattr(cfg, "nmf", None), "n_components", None)
    if n_comp is not None and n_comp > min(n_patterns, ky * kx):
        problems.append(f"`nmf.n_components` = {n_comp} exceeds what the data allows: "
                        f"min(patterns {n_patterns}, detector pixels {ky * kx})")
    if problems:
        raise ParameterError("; ".join(problems))


#: Negative values down to this fraction of the brightest value are read-out noise about
#: zero (a camera whose dark level was subtracted); deeper ones are not intensities.
NEGATIVE_NOISE_FRACTION = 0.5


#: Detector pixels that are NaN in every sampled pattern (a mask some tools write) are
#: repaired as bad pixels, up to this fraction of the detector.
MAX_MASKED_FRACTION = 0.01


def _sample_check(arr, store) -> np.ndarray:
    """Refuse all-zero or NaN data, and values far below zero, before any computation:
    read up to 5 chunks. Returns the (m, 2) detector pixels that are NaN or infinite in
    every sampled pattern (a mask some tools write for dead pixels; the run repairs
    them as bad pixels): non-finite values elsewhere, or on more than
    :data:`MAX_MASKED_FRACTION` of the detector, are refused.

    Negative values are accepted where read-out noise about zero explains them (a CCD
    or a camera whose dark level was subtracted: about half the dark pixels read below
    zero, by a few noise widths): the workflows' noise model measures the read-out
    variance, and NMF clips its aligned patterns at 0. Values below minus half the
    brightest are refused: they are not intensities (a signed type wrapped, data of
    inverted sign)."""
    grid = [int(np.ceil(s / c)) for s, c in zip(arr.shape[:2], arr.chunks[:2])]
    picks = {(0, 0), (grid[0] - 1, grid[1] - 1), (grid[0] // 2, grid[1] // 2),
             (0, grid[1] - 1), (grid[0] - 1, 0)}
    any_signal = False
    lowest, highest, where = 0.0, 0.0, None
    masks = []  # per chunk, two (ky, kx) masks: one chunk in memory at a time
    for i, j in sorted(picks):
        block = arr[i * arr.chunks[0]:(i + 1) * arr.chunks[0], j * arr.chunks[1]:(j + 1) * arr.chunks[1]]
        masks.append(nonfinite_masks(block))
        if np.issubdtype(block.dtype, np.floating):
            block = np.where(np.isfinite(block), block, 0)  # masked pixels judged below
        if block.size:
            lo, hi = float(block.min()), float(block.max())
            if lo < lowest:
                lowest, where = lo, (i, j)
            highest = max(highest, hi)
        any_signal |= bool(np.any(block))
    masked = masked_pixels(masks, store)
    if not any_signal:
        raise InputError(f"store {store!r} holds only zeros in the chunks sampled; "
                         "is it the right data set?")
    if lowest < 0 and -lowest > NEGATIVE_NOISE_FRACTION * highest:
        raise InputError(f"store {store!r} holds values down to {lowest:.4g} (chunk "
                         f"{where[0]},{where[1]}) against a brightest {highest:.4g}: not "
                         "intensities or read-out noise about zero: a signed type wrapped (a raw "
                         "file: ingest it again with the right --dtype), or data with a background "
                         "subtracted or of inverted sign (give the recorded counts)")
    return masked


def nonfinite_masks(block) -> tuple[np.ndarray, np.ndarray]:
    """(ky, kx) masks of the detector pixels NaN or infinite in every pattern of
    ``block`` (..., ky, kx) and in some pattern of it, for :func:`masked_pixels`."""
    b = np.asarray(block)
    bad = (~np.isfinite(b) if np.issubdtype(b.dtype, np.floating)
           else np.zeros(b.shape, bool)).reshape((-1,) + b.shape[-2:])
    return bad.all(axis=0), bad.any(axis=0)


def masked_pixels(masks, store) -> np.ndarray:
    """The (m, 2) detector pixels NaN or infinite in every pattern, from the
    :func:`nonfinite_masks` of each sampled block; InputError for non-finite values
    anywhere else, or on more than :data:`MAX_MASKED_FRACTION` of the detector."""
    always, sometimes = None, None
    for a, s in masks:
        always = a if always is None else always & a
        sometimes = s if sometimes is None else sometimes | s
    if sometimes is None or not sometimes.any():
        return np.zeros((0, 2), np.int64)
    if (sometimes & ~always).any():
        raise InputError(f"store {store!r} contains NaN or infinite values in some patterns (pixels "
                         "NaN in every pattern are repaired as bad pixels); replace them, e.g. with "
                         "numpy.nan_to_num, and write a new store with spedflow.from_array")
    if always.mean() > MAX_MASKED_FRACTION:
        raise InputError(f"store {store!r} is NaN in every pattern on {100 * always.mean():.1f} % "
                         f"of the detector (at most {100 * MAX_MASKED_FRACTION:g} % is repaired as "
                         "bad pixels); crop or re-ingest the data")
    return np.argwhere(always)


class Timer:
    """Per-stage wall times, recorded into the result's attributes."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name):
        timer = self

        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()
                log.info("stage %s ...", name)

            def __exit__(self, *exc):
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.t0
                log.info("stage %s done in %.2f s", name, timer.times[name])
        return _T()


# --- the beam pass -----------------------------------------------------------------

def _rounded_centres(centres, ky: int, kx: int) -> tuple[np.ndarray, np.ndarray]:
    """Beam centres rounded to whole pixels on the detector (NaN: the detector centre)."""
    c = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    c = np.where(np.isfinite(c), c, [ky // 2, kx // 2])
    return (np.clip(np.rint(c[:, 0]).astype(np.int64), 0, ky - 1),
            np.clip(np.rint(c[:, 1]).astype(np.int64), 0, kx - 1))


def radial_profiles(frames: np.ndarray, centres: np.ndarray, n_bins: int) -> np.ndarray:
    """Azimuthal sums of each pattern around its own centre, 1-px rings.

    The centre is rounded to the nearest pixel (these profiles feed the annular
    overview image, where half a pixel on a ring boundary does not matter), so every
    pattern reads its ring indices from one precomputed distance map: one bincount
    per pattern.

    Parameters
    ----------
    frames : (..., ky, kx) array
    centres : (..., 2) array of (ky, kx) beam centres, detector pixels (NaN: the
        detector centre)
    n_bins : int
        Rings 0 .. n_bins-1 (pixels farther out are ignored).

    Returns
    -------
    (..., n_bins) float32: summed intensity in each ring.
    """
    lead = frames.shape[:-2]
    ky, kx = frames.shape[-2:]
    f = np.asarray(frames).reshape(-1, ky * kx)
    cy, cx = _rounded_centres(centres, ky, kx)
    yy, xx = np.mgrid[-(ky - 1):ky, -(kx - 1):kx]
    ring = np.minimum(np.hypot(yy, xx), n_bins).astype(np.int64)
    out = np.empty((f.shape[0], n_bins), np.float32)
    for k in range(f.shape[0]):
        oy, ox = ky - 1 - cy[k], kx - 1 - cx[k]
        idx = ring[oy:oy + ky, ox:ox + kx].ravel()
        out[k] = np.bincount(idx, weights=f[k], minlength=n_bins + 1)[:n_bins]
    return out.reshape(*lead, n_bins)


def annular_sums(frames: np.ndarray, centres: np.ndarray, inner: float, outer: float) -> np.ndarray:
    """Annular VDF intensity of each pattern around its own centre, in one step.

    Equals ``annular_image(radial_profiles(frames, centres, n), inner, outer)`` for
    ``n >= ceil(outer)``: the pixels whose ring (distance to the rounded centre,
    floored) lies in ``floor(inner) <= ring < ceil(outer)``. Patterns with the same
    rounded centre (the descan varies slowly) share one mask, so each group is one
    matrix-vector product instead of a bincount per pattern.

    Returns
    -------
    (...) float32
    """
    lead = frames.shape[:-2]
    ky, kx = frames.shape[-2:]
    f = np.asarray(frames, dtype=np.float32).reshape(-1, ky * kx)
    cy, cx = _rounded_centres(centres, ky, kx)
    lo, hi = int(np.floor(inner)), int(np.ceil(outer))
    yy, xx = np.mgrid[-(ky - 1):ky, -(kx - 1):kx]
    ring = np.hypot(yy, xx).astype(np.int64)
    inside = ((ring >= lo) & (ring < hi)).astype(np.float32)
    out = np.empty(f.shape[0], np.float32)
    keys, group = np.unique(cy * kx + cx, return_inverse=True)
    group = group.ravel()
    for g, key in enumerate(keys):
        rows = np.nonzero(group == g)[0]
        oy, ox = ky - 1 - key // kx, kx - 1 - key % kx
        mask = np.ascontiguousarray(inside[oy:oy + ky, ox:ox + kx]).ravel()
        out[rows] = (f if len(rows) == len(f) else f[rows]) @ mask
    return out.reshape(lead)


@dataclass
class BeamInfo:
    measured: np.ndarray      # (Y', X', 2) beam centre found in each pattern
    used: np.ndarray          # (Y', X', 2) centres used for alignment (fitted descan)
    radius: float             # direct-beam disc radius, detector pixels
    profiles: np.ndarray      # (Y', X', R) radial profiles around the measured centre, or None
    mean_pattern: np.ndarray  # (ky, kx) mean of the (binned, unaligned) patterns
    descan: dict              # fit statistics
    key: str = ""             # the beam stage's cache key: later stages depend on it
    annular: np.ndarray | None = None  # (Y', X') annular VDF image (when no profiles)
    totals: np.ndarray | None = None   # (Y', X') each pattern's total (data units)

    def annular_image(self) -> np.ndarray:
        """The annular VDF overview: rings from twice the beam radius outwards."""
        if self.annular is not None:
            return self.annular
        return annular_image(self.profiles, 2 * self.radius, self.profiles.shape[-1])


def beam_clipped(plan: Plan, cache) -> bool:
    """Whether the direct beam is clipped (saturated) in the patterns of ``plan``'s
    sample (:func:`~spedflow.preprocess.kernels.beam_saturated`). Cached. Give the plan
    as read, before :func:`with_bad_pixels`: a line-gain correction through the beam
    (a Medipix cross) moves the clipped value on its lines."""
    st = cache.stage("clipped", plan.identity)
    if not st.complete:
        from ..preprocess import kernels as pk
        frames = stacked_frames(list(plan.sample_blocks()))
        st.save_attrs(clipped=bool(pk.beam_saturated(frames, _sample_centres(frames))))
        st.mark_complete()
    return bool(st.attrs()["clipped"])


def dose_normalisation(beam: BeamInfo, normalize, plan: Plan, cache, *, gain: float | None,
                       read_var: float = 0.0, dark: float = 0.0, what: str, param: str):
    """Each pattern's dose relative to the scan (its total over the median), the spread
    of the doses beyond counting noise, and whether ``what`` is divided by them
    (``normalize`` resolved, :func:`spedflow.vdf.dose_normalised`; whether the beam is
    clipped is looked at, on ``plan``'s sample as read (:func:`beam_clipped`), only
    where that decides). ``dark``: a dark level per reading left in the data (its share
    of each total is taken out first)."""
    from ..vdf import dose_normalised, dose_spread, dose_varies
    ky, kx = beam.mean_pattern.shape
    dose, spread, noise = dose_spread(beam.totals - dark * ky * kx, gain, read_var, ky * kx)
    seen = beam_level(beam.mean_pattern, beam.measured) >= NO_BEAM_LEVEL
    normalised = dose_normalised(normalize, spread, noise, clipped=False, beam_seen=seen)
    # the sample is read for the clipping test only where it decides
    clipped = normalize == "auto" and normalised and beam_clipped(plan, cache)
    normalised = normalised and not clipped
    if dose_varies(spread, noise):
        if normalised:
            log.info("the patterns' total counts vary by %.1f %% beyond counting noise (beam "
                     "current): %s divided by each pattern's dose (%s)", 100 * spread, what, param)
        else:
            why = ("the beam is clipped, its total is no measure of the dose" if clipped
                   else "no direct beam is seen (a beam stop?)" if not seen else f"{param} = false")
            log.info("the patterns' total counts vary by %.1f %% beyond counting noise; %s not "
                     "normalised: %s", 100 * spread, what, why)
    return dose, spread, normalised


def with_detector_binning(plan: Plan, prep) -> Plan:
    """``plan`` reading its patterns binned by ``prep.detector_binning`` (after the
    bad-pixel repair: call it after :func:`with_bad_pixels`); the cache keys of every
    later stage name the factor."""
    d = int(prep.detector_binning)
    if d == 1:
        return plan
    return dataclasses.replace(plan, detector_binning=d,
                               identity={**plan.identity, "detector_binning": d})


#: :func:`suggested_detector_binning` keeps at least this beam radius (px) and this
#: detector side (px) after binning.
_SUGGEST_MIN_RADIUS, _SUGGEST_MIN_SIDE = 4.0, 128


def suggested_detector_binning(detector_shape, radius: float) -> int:
    """The largest factor dividing both detector sides that leaves the beam (and so the
    spots) at least ``_SUGGEST_MIN_RADIUS`` px in radius and the detector at least
    ``_SUGGEST_MIN_SIDE`` px a side; 1 when none does."""
    ky, kx = (int(k) for k in detector_shape)
    best = 1
    for d in range(2, min(ky, kx) // _SUGGEST_MIN_SIDE + 1):
        if ky % d == 0 and kx % d == 0 and radius / d >= _SUGGEST_MIN_RADIUS:
            best = d
    return best


def note_detector_binning(plan: Plan, radius: float) -> None:
    """Say when the patterns are sampled far finer than the beam needs (an unbinned run
    on a large detector): the factor that would do the same work k^2 times faster."""
    if plan.detector_binning != 1 or not np.isfinite(radius):
        return
    d = suggested_detector_binning(plan.detector_shape, radius)
    if d > 1:
        ky, kx = plan.detector_shape
        log.warning("the beam's radius is %.1f px on a %d x %d px detector: --set "
                 "preprocess.detector_binning=%d would do the same work on %dx fewer pixels",
                 radius, ky, kx, d, d * d)


def binned(plan: Plan, prep) -> da.Array:
    """The raw data binned in navigation space (float32 sums) as the first lazy step."""
    from ..preprocess import lazy as pre
    data = plan.data()
    if prep.nav_binning == 1:
        return data
    return pre.bin_nav(data, prep.nav_binning)


def run_blocks(stage, data: da.Array, fn, *, label: str, n_patterns: int, **kwargs) -> list:
    """Run ``fn(block, offset, **kwargs) -> dict of arrays`` on every block not yet done.

    Each block's products are saved to ``stage.block_path((i, j))`` by the task itself,
    so an interrupted pass resumes block by block and nothing accumulates on the
    client. Returns the list of block paths in raster order.
    """
    blocks = data.to_delayed()
    offsets = [np.cumsum((0,) + c[:-1]) for c in data.chunks[:2]]
    for part in (stage.path / "blocks").glob("*.npz.tmp*"):  # of a run ended mid-write
        try:
            part.unlink(missing_ok=True)
        except OSError:  # still open elsewhere (Windows): left
            pass
    paths, todo = [], []
    for i in range(blocks.shape[0]):
        for j in range(blocks.shape[1]):
            path = stage.block_path((i, j))
            paths.append(path)
            if not path.exists():
                todo.append(dask.delayed(_block_task, pure=True)(
                    blocks[i, j, 0, 0], (int(offsets[0][i]), int(offsets[1][j])), fn, str(path),
                    kwargs))
    if len(todo) < len(paths):
        log.info("%s: reusing %d of %d finished blocks", label, len(paths) - len(todo), len(paths))
        if todo and cluster.progress_enabled() and not log.isEnabledFor(logging.INFO):
            # an interrupted run resumed: said beside the progress bar (-v logs it above)
            print(f"{label}: resuming, {len(paths) - len(todo)} of {len(paths)} blocks finished "
                  "before", file=sys.stderr)
    if todo:
        cluster.compute(*todo, label=label, n_patterns=n_patterns * len(todo) // len(paths))
    return paths


def _block_task(block, offset, fn, path, kwargs):
    from threadpoolctl import threadpool_limits

    from .._heap import reusing_heap
    from ._cache import save_block
    # one BLAS thread per task, as in-process runs use: the peak finder's matrix products
    # then give the same bits on any worker, and workers whose BLAS was not pinned (a
    # bare `dask worker` here ran OpenBLAS with every core) do not oversubscribe the cores;
    # batch temporaries reused from the heap (spedflow._heap)
    with threadpool_limits(limits=1, user_api="blas"), reusing_heap():
        save_block(Path(path), **fn(block, offset, **kwargs))
    return 1


def assemble(paths, name: str, shape, grid_chunks) -> np.ndarray:
    """Stitch a per-position product (Y, X, ...) from the block files."""
    from ._cache import load_block
    out = None
    offsets = [np.cumsum((0,) + tuple(c[:-1])) for c in grid_chunks]
    k = 0
    for i in range(len(grid_chunks[0])):
        for j in range(len(grid_chunks[1])):
            part = load_block(paths[k], [name])[name]
            k += 1
            if out is None:
                out = np.empty(tuple(shape) + part.shape[2:], part.dtype)
            y0, x0 = offsets[0][i], offsets[1][j]
            out[y0:y0 + part.shape[0], x0:x0 + part.shape[1]] = part
    return out


def total(paths, name: str):
    """Sum a mergeable per-block partial over all blocks."""
    from ._cache import load_block
    acc = None
    for p in paths:
        part = load_block(p, [name])[name]
        acc = part.astype(np.float64) if acc is None else acc + part
    return acc


#: Patterns that go into the beam-radius profile: about this many, evenly spread.
_PROFILE_PATTERNS = 1024


def _beam_block(block, offset, *, beam_radius, reference, n_bins, max_radius, profile_stride=1,
                annulus=None, detector_binning=1):
    """The beam pass on one chunk: centres, the sampled beam profile, the pattern sum,
    each pattern's total, and the radial profiles (or, if ``annulus = (inner, outer)``
    is known already, just the annular VDF intensity they would give)."""
    from ..preprocess import kernels as pk
    frames = np.asarray(block, dtype=np.float32)
    total_ = pattern_sum(frames)
    if not np.isfinite(total_).all():
        _refuse_nonfinite(frames, offset, detector_binning)
    c = pk.beam_centres(frames, beam_radius, reference=reference)
    # the radius needs an average profile only: every profile_stride-th position in
    # each scan direction (global indices, so the result does not depend on chunking)
    s = int(profile_stride)
    ys = np.nonzero((offset[0] + np.arange(frames.shape[0])) % s == 0)[0]
    xs = np.nonzero((offset[1] + np.arange(frames.shape[1])) % s == 0)[0]
    sample = np.ix_(ys, xs)
    out = {"centres": c.astype(np.float32),
           "beam_profile": pk.beam_profile(frames[sample], c[sample], max_radius),
           "sum": total_,
           # each pattern's total: the incident dose where nothing is clipped or blocked
           "total": pattern_totals(frames)}
    if annulus is None:
        out["profiles"] = radial_profiles(frames, c, n_bins)
    else:
        out["annular"] = annular_sums(frames, c, *annulus)
    return out


def _refuse_nonfinite(frames: np.ndarray, offset, detector_binning: int = 1) -> None:
    """InputError naming the first pattern of a block (scan_y, scan_x, ky, kx) with a
    NaN or infinite value. The check before a run reads 5 chunks
    (:func:`_sample_check`); this catches the rest in pass 1, where each block's
    pattern sum costs nothing extra, instead of a NaN VDF image failing at the end.
    With ``detector_binning`` d > 1 the block holds binned patterns: the message names
    the raw detector's d x d pixels."""
    y, x, ky, kx = (int(v) for v in np.argwhere(~np.isfinite(frames))[0])
    d = int(detector_binning)
    where = (f"detector pixel ({ky}, {kx})" if d == 1 else
             f"raw detector pixels ({ky * d}..{ky * d + d - 1}, {kx * d}..{kx * d + d - 1})")
    raise InputError(f"the data hold NaN or infinite values, first at scan position "
                     f"({offset[0] + y}, {offset[1] + x}), {where} (the check "
                     "before the run reads 5 chunks); clean or re-ingest the data first")


def pattern_totals(frames: np.ndarray) -> np.ndarray:
    """(..., ) float64 total of each pattern of a block (..., ky, kx): one BLAS
    matrix-vector product in float32 (~2e-7 relative; 0.6 ms for 506 patterns of
    128 x 128, where ``sum(dtype=float64)`` took 4.5)."""
    ky, kx = frames.shape[-2:]
    f = np.asarray(frames, dtype=np.float32).reshape(-1, ky * kx)
    return (f @ np.ones(ky * kx, np.float32)).astype(np.float64).reshape(frames.shape[:-2])


def pattern_sum(frames: np.ndarray) -> np.ndarray:
    """(ky, kx) float64 sum of a block's patterns (one BLAS product; float32 partial
    sums over the block, ~1e-6 relative, then float64 across blocks)."""
    ky, kx = frames.shape[-2:]
    f = np.asarray(frames, dtype=np.float32).reshape(-1, ky * kx)
    return (np.ones(len(f), np.float32) @ f).astype(np.float64).reshape(ky, kx)


def beam_stage_of(plan: Plan, prep, cache: StageCache):
    """The beam stage's cache entry (shared by the batch run and live mode)."""
    return cache.stage("beam", plan.identity, {"nav_binning": prep.nav_binning,
                                               "descan": prep.descan, "align": prep.align,
                                               "beam_radius": prep.beam_radius},
                       "totals")  # with each pattern's total


def beam_block_kwargs(plan: Plan, prep, *, annular: bool = False) -> dict:
    """Keyword arguments of :func:`_beam_block` for this plan. ``annular``: with the
    radius known (``prep.beam_radius`` set), the blocks hold the annular VDF image
    (rings from twice the radius out) instead of whole radial profiles."""
    ny, nx = plan.array.shape[:2]
    ky, kx = plan.detector_shape
    b = prep.nav_binning
    n = -(-ny // b) * -(-nx // b)
    n_bins = int(np.ceil(np.hypot(ky, kx) / 2))
    if annular and not prep.beam_radius:
        raise ParameterError("the annular image needs the beam radius first (prep.beam_radius)")
    return dict(beam_radius=prep.beam_radius,
                reference=None if prep.beam_radius else _sample_mean(plan, prep),
                n_bins=n_bins, max_radius=min(ky, kx) / 4,
                profile_stride=max(1, int(np.sqrt(n / _PROFILE_PATTERNS))),
                annulus=(2 * float(prep.beam_radius), n_bins) if annular else None,
                detector_binning=plan.detector_binning)


def beam_stage(plan: Plan, prep, cache: StageCache, timer: Timer) -> BeamInfo:
    """Pass 1: the beam centre of every pattern, its radius, radial profiles, mean pattern."""
    from ..preprocess import kernels as pk
    stage = beam_stage_of(plan, prep, cache)
    data = binned(plan, prep)
    ny, nx, ky, kx = data.shape
    if not stage.complete:
        with timer("beam"):
            # with no radius given, a reference pattern from a few chunks sets the
            # provisional one (no extra pass over the data)
            paths = run_blocks(stage, data, _beam_block, label="beam centres",
                               n_patterns=ny * nx, **beam_block_kwargs(plan, prep))
            with collected_warnings() as notes:
                measured, used, prof, mean, descan = finish_beam(paths, data, prep)
            radius = (float(prep.beam_radius) if prep.beam_radius
                      else pk.radius_from_profile(total(paths, "beam_profile"), default=np.nan))
            if not np.isfinite(radius):
                raise InputError("could not measure the direct-beam radius; set preprocess.beam_radius")
            if not prep.beam_radius:  # a measured one (a given one is the user's to choose)
                _check_measured_radius(radius)
            stage.save("measured", measured.astype(np.float32))
            stage.save("used", np.asarray(used, np.float32))
            stage.save("profiles", prof)
            stage.save("mean_pattern", mean.astype(np.float32))
            stage.save("totals", assemble(paths, "total", (ny, nx), data.chunks[:2]))
            stage.save_attrs(radius=radius, descan=descan, warnings=notes)
            stage.mark_complete()
    else:
        replay_warnings(stage)
    a = stage.attrs()
    return BeamInfo(stage.load("measured"), stage.load("used"), float(a["radius"]),
                    stage.load("profiles"), stage.load("mean_pattern"), a.get("descan", {}),
                    stage.key, totals=stage.load("totals"))


def finish_beam(paths, data: da.Array, prep):
    """Finalize of a beam pass: stitch the centres and profiles, fit the descan.

    Returns ``(measured, used, profiles, mean_pattern, descan)``; ``used`` are the
    centres the alignment uses (the fitted descan, or the detector centre when
    ``prep.align`` is False); ``profiles`` are the annular VDF image instead if the
    blocks hold that (``_beam_block(annulus=...)``).
    """
    from ..preprocess import kernels as pk
    ny, nx, ky, kx = data.shape
    measured = assemble(paths, "centres", (ny, nx), data.chunks[:2])
    with np.load(paths[0]) as first:
        name = "profiles" if "profiles" in first.files else "annular"
    prof = assemble(paths, name, (ny, nx), data.chunks[:2])
    mean = total(paths, "sum") / (ny * nx)
    if not np.isfinite(measured).any():
        raise InputError("no direct beam was found in any pattern; is this diffraction data?")
    level = beam_level(mean, measured)
    if prep.align and level < NO_BEAM_LEVEL:
        log.warning("no direct beam where the beam finder settled (the mean pattern there is "
                    "%.0f %% of its brightest; a beam stop?): the patterns are not aligned, as "
                    "with preprocess.align = false", 100 * level)
    contrast = beam_contrast(mean, measured)
    if level >= NO_BEAM_LEVEL and contrast < FLAT_PATTERN:
        log.warning("the mean pattern is flat: where the beam finder settled it is %.2f times its "
                    "average, where a direct beam is 8 to thousands of times. Are the axes in "
                    "the order (scan_y, scan_x, ky, kx)? Data written detector-first (ky, kx, "
                    "scan_y, scan_x) read that way are images, not patterns: move the axes "
                    "(numpy.moveaxis(data, (0, 1), (2, 3))) and ingest again", contrast)
    if not prep.align or level < NO_BEAM_LEVEL:
        used = np.broadcast_to(np.array([ky // 2, kx // 2], float), measured.shape).copy()
        descan = {"model": "none (align = false)" if not prep.align else
                  f"none (no direct beam seen: {level:.3f} of the brightest)"}
    else:
        found = found_fraction(measured)
        used, fit = pk.centres_for_alignment(measured, prep.descan)
        descan = {"model": prep.descan, "centres_found": round(found, 4)}
        if fit is not None:
            jitter = centre_scatter(measured)
            descan.update(order=fit.order, residual_rms=fit.residual_rms,
                          noise_scale=fit.scale, outliers=fit.n_outliers,
                          coefficients=fit.coefficients.tolist(),
                          centre_scatter=jitter if np.isfinite(jitter) else None)
            misfit = descan_misfit(fit.scale, jitter, prep.descan)
            if misfit:
                log.warning("%s", misfit)
    return measured, used, prof, mean, descan


def descan_misfit(scale: float, jitter: float, model: str) -> str | None:
    """The warning for a descan fit whose robust residual scale ``scale`` exceeds
    :data:`DESCAN_MISFIT` times the centres' own scatter ``jitter``
    (:func:`centre_scatter`) and :data:`DESCAN_MISFIT_PX`; None otherwise."""
    if not (np.isfinite(jitter) and scale > max(DESCAN_MISFIT * jitter, DESCAN_MISFIT_PX)):
        return None
    return (f"the {model} descan fit misses the measured beam centres by {scale:.2f} px, "
            f"{scale / max(jitter, 1e-9):.0f}x their scatter from one scan position to the next "
            f"({jitter:.3f} px): the beam moves in a way the model does not follow (drift during "
            "the scan?); if the centres are reliable, preprocess.descan = \"none\" aligns each "
            "pattern on its own")


#: The descan fit's robust residual scale above this many times the centres' own scatter
#: (:func:`centre_scatter`), and above :data:`DESCAN_MISFIT_PX`, is warned about: the
#: beam moves in a way the smooth model does not follow.
DESCAN_MISFIT = 3.0
#: ... and above this many pixels: a misfit under half a pixel does not move a spot
#: out of its vector's cluster or VDF disc.
DESCAN_MISFIT_PX = 0.5


def centre_scatter(measured: np.ndarray) -> float:
    """Per-component noise of measured beam centres (Y, X, 2), pixels, from second
    differences ``c[x-1] - 2 c[x] + c[x+1]`` along the fast scan axis: taken a few
    dwell times apart, and blind to any locally linear change, so the descan's
    gradient and slow drift hardly enter. With noise sigma per component their norm
    is Rayleigh distributed with scale sqrt(6) sigma; the median is robust to
    mis-found centres. NaN with fewer than 3 columns or no finite triple."""
    from ..preprocess.kernels import _RAYLEIGH_MEDIAN
    m = np.asarray(measured, np.float64)
    if m.ndim != 3 or m.shape[1] < 3:
        return float("nan")
    d = np.linalg.norm(m[:, :-2] - 2 * m[:, 1:-1] + m[:, 2:], axis=-1)
    d = d[np.isfinite(d)]
    return float(np.median(d) / (np.sqrt(6.0) * _RAYLEIGH_MEDIAN)) if d.size else float("nan")


#: The mean pattern at the measured beam centres below this fraction of its brightest
#: (3 x 3 means): no beam there (0 with a beam stop; 0.98-1.0 on every benchmark set,
#: clipped beams included, and on the real detector files with a beam).
NO_BEAM_LEVEL = 0.1


def _box_at_beam(mean: np.ndarray, measured: np.ndarray):
    """The mean pattern's 3 x 3 means (``box``) and their value at the median measured
    beam centre: ``(value, box)``, or None where no centre was measured."""
    from scipy import ndimage as ndi
    m = np.asarray(measured, float).reshape(-1, 2)
    m = m[np.isfinite(m).all(axis=1)]
    if len(m) == 0:
        return None
    box = ndi.uniform_filter(np.asarray(mean, np.float64), 3, mode="nearest")
    iy, ix = (int(np.clip(round(v), 0, n - 1)) for v, n in zip(np.median(m, axis=0), box.shape))
    return float(box[iy, ix]), box


def beam_level(mean: np.ndarray, measured: np.ndarray) -> float:
    """The mean pattern's level (3 x 3 pixels) at the median measured beam centre, as a
    fraction of its brightest 3 x 3 pixels. The direct beam is the brightest thing a
    diffraction pattern holds (the glare of a clipped one the flattest): about 1 where
    the finder found it. Where the beam is stopped, the finder settles somewhere dark."""
    at = _box_at_beam(mean, measured)
    if at is None:
        return 0.0
    value, box = at
    top = float(box.max())  # 3 x 3 means: one bright pixel (a hot one missed) is not the brightest
    return value / top if top > 0 else 0.0


#: The mean pattern at the beam centre (3 x 3 means) below this many times the mean
#: pattern's average is flat, no direct beam: 8.4 to thousands on every benchmark set
#: (8-bit cameras and CCDs with a dark level the lowest), 1.0 on a data set stored with
#: its axes detector-first, whose "patterns" are real-space images.
FLAT_PATTERN = 2.0


def beam_contrast(mean: np.ndarray, measured: np.ndarray) -> float:
    """The mean pattern's 3 x 3 mean at the median measured beam centre over the mean
    pattern's average (NaN where the average is not positive or no centre was found)."""
    average = float(np.mean(mean, dtype=np.float64)) if np.size(mean) else 0.0
    at = _box_at_beam(mean, measured)
    return at[0] / average if at is not None and average > 0 else float("nan")


#: Below this fraction of patterns with a measured beam centre, the descan fit is
#: extrapolated over most of the scan and a warning says so.
MIN_CENTRES_FOUND = 0.5


def found_fraction(measured: np.ndarray) -> float:
    """Fraction of patterns whose beam centre was measured; warns below
    :data:`MIN_CENTRES_FOUND` (the descan fit then extrapolates from the rest, and a
    wrong beam radius is the usual cause)."""
    ok = np.isfinite(measured).all(axis=-1)
    frac = float(ok.mean())
    if frac < MIN_CENTRES_FOUND:
        log.warning("the beam centre was found in only %.0f %% of the patterns: the descan is "
                    "extrapolated over the rest (check preprocess.beam_radius)", 100 * frac)
    elif not ok.all():
        log.info("no beam centre found in %d of %d patterns (empty or dropped frames, a beam off "
                 "the detector?): NaN in the result's beam/centres; the descan fit aligns them",
                 int((~ok).sum()), ok.size)
    return frac


def _sample_mean(plan: Plan, prep) -> np.ndarray:
    """Mean pattern of the sample blocks spread over the scan (:meth:`Plan.sample_blocks`)."""
    total, n = 0.0, 0
    for block in plan.sample_blocks():
        total = total + block.sum(axis=(0, 1))
        n += block.shape[0] * block.shape[1]
    return (total / n).astype(np.float32)


@contextlib.contextmanager
def collected_warnings():
    """The messages of the warnings logged (``spedflow`` logger) inside the block, as a
    list filled as they come: a stage that caches its result keeps them with it, so a
    rerun from the cache still shows them."""
    notes: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            notes.append(record.getMessage())

    handler = _Collect(logging.WARNING)
    level = log.level
    log.addHandler(handler)
    # collected under -qq too (the handlers that print keep their own level)
    log.setLevel(min(log.getEffectiveLevel(), logging.WARNING))
    try:
        yield notes
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def replay_warnings(stage) -> None:
    """Log again the warnings a cached stage recorded (:func:`collected_warnings`)."""
    for note in stage.attrs().get("warnings", []):
        log.warning("%s", note)


#: Patterns of each sampled chunk the bad-pixel search looks at (at most about this many).
_BAD_PIXEL_SAMPLE = 200
#: ... and into how many contiguous parts each chunk's sample is split for the line-defect test.
_LINE_PARTS = 4


def _with_pixels(plan: Plan, pixels) -> Plan:
    """``plan`` repairing ``pixels`` (m, 2) too, in order, named in ``plan.identity``."""
    bad = np.asarray(pixels, np.int64).reshape(-1, 2)
    if plan.bad_pixels is not None:
        bad = np.concatenate([plan.bad_pixels, bad])
    if len(bad) == 0:
        return plan
    bad = np.unique(bad, axis=0)  # sorted by (ky, kx), distinct
    return dataclasses.replace(plan, bad_pixels=bad,
                               identity={**plan.identity, "bad_pixels": bad.tolist()})


def with_bad_pixels(plan: Plan, prep, cache) -> Plan:
    """``plan`` with the detector's bad pixels set (``preprocess.bad_pixels``): given, or
    found on the chunks the beam radius is measured on (cached), besides the pixels
    that are NaN in every pattern (:func:`prepare_run`; repaired even with "none").
    Everything the run reads through the plan is then repaired, and the cache keys of
    every later stage (``plan.identity``) name the pixels."""
    from ..preprocess.kernels import bad_pixel_counts, bad_pixels_from, line_gains, repair_pixels
    spec = prep.bad_pixels
    if spec == "none":
        return plan
    if spec == "auto":
        st = cache.stage("pixels", plan.identity, "v2")
        if not st.complete:
            counts, parts = None, []
            for block in plan.sample_blocks():
                # ~200 patterns of each chunk sampled: plenty for a test of persistence
                flat = block.reshape((-1,) + block.shape[-2:])
                sub = flat[::max(1, len(flat) // _BAD_PIXEL_SAMPLE)]
                c = bad_pixel_counts(sub)
                counts = c if counts is None else {k: counts[k] + c[k] for k in c}
                # mean patterns of contiguous runs of scan positions: a line defect's
                # gain is the same in each (:func:`~spedflow.preprocess.kernels.line_gains`)
                parts += [p.mean(0, dtype=np.float64) for p in np.array_split(sub, _LINE_PARTS)
                          if len(p)]
            hot, dead = bad_pixels_from(counts)
            # line defects, on the sample's mean pattern with every bad pixel repaired
            known = np.concatenate([hot, dead] + ([] if plan.bad_pixels is None
                                                  else [plan.bad_pixels]))
            mean = counts["sum"] / max(int(counts["n"]), 1)
            if len(known):
                mean = repair_pixels(mean, known)
                parts = [repair_pixels(p, known) for p in parts]
            rows, cols = line_gains(mean, parts)
            st.save_attrs(hot=hot.tolist(), dead=dead.tolist(), row_gains=rows.tolist(),
                          column_gains=cols.tolist())
            st.mark_complete()
        a = st.attrs()
        hot, dead = (np.asarray(a[k], np.int64).reshape(-1, 2) for k in ("hot", "dead"))
        if len(hot) or len(dead):
            log.info("%d hot and %d dead detector pixels found: each replaced by the mean of "
                     "its neighbours (preprocess.bad_pixels)", len(hot), len(dead))
        bad = np.concatenate([hot, dead])
        plan = _with_line_gains(plan, np.asarray(a["row_gains"]), np.asarray(a["column_gains"]))
    else:
        bad = np.asarray(spec, np.int64).reshape(-1, 2)
    return _with_pixels(plan, bad)


def _with_line_gains(plan: Plan, rows: np.ndarray, cols: np.ndarray) -> Plan:
    """``plan`` dividing out the line gains ``rows`` (ky,) and ``cols`` (kx,) if any
    differ from 1, named in ``plan.identity``."""
    if (rows == 1).all() and (cols == 1).all():
        return plan
    gains = {}
    for name, g in (("rows", rows), ("columns", cols)):
        i = np.flatnonzero(g != 1)
        gains[name] = {str(int(k)): float(g[k]) for k in i}
        if len(i):
            log.info("detector %s %s collect %s x their neighbours' signal (line defects): "
                     "divided out (preprocess.bad_pixels)", name, i.tolist(),
                     ", ".join(f"{v:.2f}" for v in g[i]))
    return dataclasses.replace(plan, line_gains=(rows, cols),
                               identity={**plan.identity, "line_gains": gains})


def noise_sample(plan: Plan, sample=None):
    """The blocks the detector's noise is measured on: a few chunks of the data, read one
    at a time (:meth:`Plan.sample_blocks`), or live mode's, ``sample`` (a list of blocks)."""
    if sample is not None and not isinstance(sample, list):
        raise TypeError(f"`sample` must be a list of 4-D blocks (got {type(sample).__name__})")
    return plan.sample_blocks() if sample is None else sample


def measured_counts(plan: Plan, cache, sample=None, gain=None, *,
                    return_error: bool = False) -> tuple:
    """``(gain, read_var)`` of the detector's noise line per raw pattern
    (:func:`spedflow.peaks.noise.count_scale`), measured on :func:`noise_sample` and
    cached; with ``gain``, its intercept only (the gain held). ``return_error``: a third
    item, the gain's relative standard error (0 with ``gain`` given; the VDF peak
    finder's noise unit follows the gain, the NMF workflow's dark level, the line's
    crossing of 0, hardly does)."""
    from ..peaks.noise import count_scale
    # v2: negative intercepts (a dark level)
    st = cache.stage("counts", plan.identity, "v2", *(() if gain is None else (float(gain),)))
    if not st.complete:
        gain, read_var, error = count_scale(noise_sample(plan, sample), gain=gain,
                                            return_error=True)
        st.save_attrs(gain=gain, read_var=read_var, relative_error=min(error, 1e3))  # (no inf in JSON)
        st.mark_complete()
    a = st.attrs()
    out = (float(a["gain"]), float(a["read_var"]))
    # (entries of older code hold no error: taken as measured well)
    return out + (float(a.get("relative_error", 0.0)),) if return_error else out


#: Above this relative standard error a measured gain is not used: the VDF peak finder
#: does not build its counting-noise unit on it (:func:`spedflow.workflows.vdf.noise_model`),
#: and the NMF residual search counts in data units (:func:`count_unit`). It is at most
#: 0.045 on every simulated detector with spots or a beam tail to measure on.
GAIN_ERROR = 0.1


def known_counts(plan: Plan, cache, sample=None, given=None) -> tuple[float | None, float]:
    """``(gain, read_var)``: ``given`` (no read-out variance), else the noise line of
    :func:`measured_counts` where its gain is well determined; ``(None, 0)`` where the
    data cannot tell it (too few scan positions, or a relative error above
    ``GAIN_ERROR``). The read-out variance is at least 0 (a negative intercept is a
    dark level, :func:`dark_level`)."""
    if given is not None:
        return float(given), 0.0
    try:
        gain, read_var, error = measured_counts(plan, cache, sample, return_error=True)
    except InputError:
        return None, 0.0
    if not (error <= GAIN_ERROR and gain > 0):
        return None, 0.0
    return float(gain), max(float(read_var), 0.0)


def count_unit(plan: Plan, cache, sample=None, given=None) -> float:
    """Data units per detector count: the gain of :func:`known_counts`, or 1 where the
    data cannot tell it. Binning sums counts and leaves the gain as it is."""
    gain = known_counts(plan, cache, sample, given)[0]
    return 1.0 if gain is None else gain


def dark_level(plan: Plan, prep, cache, given=None, sample=None) -> float:
    """Dark level to subtract from the (binned) patterns before NMF's Poisson scaling.

    ``given`` (data units per raw pattern), else measured: a camera whose dark level was
    not subtracted has a noise line ``g z + v`` of negative intercept
    (:func:`measured_counts`), and ``-v / g`` is the level to subtract. It is the dark
    level less ``read-out variance / g``, so that what is left has the variance of
    counts, its mean (in units of ``g``): the assumption of the Poisson scaling, which
    the raw readings miss by the whole dark level. (A simulated CCD with a dark level of
    20 counts: NMF recall / precision 0.88 / 0.54 with it, 1.00 / 1.00 without.) 0 for
    counting detectors and dark-subtracted cameras (a non-negative intercept), and where
    the scan is too small to measure the noise on. Binning sums ``nav_binning**2``
    patterns and ``detector_binning**2`` pixels, and their levels (a measured level is
    measured binned)."""
    if given is None:
        try:
            gain, read_var = measured_counts(plan, cache, sample)
        except InputError as e:  # too few neighbouring positions: nothing to go by
            log.warning("no dark level measured (%s); taken as 0: set nmf.dark_level if the "
                        "camera's dark level was not subtracted", e)
            return 0.0
        level = -read_var / gain if read_var < 0 else 0.0  # per binned detector pixel
    else:
        level = float(given) * plan.detector_binning ** 2  # given per raw pixel
    return level * prep.nav_binning ** 2


def resolved_bad_pixels(plan: Plan) -> list:
    """The repaired pixels as the result's attributes record them."""
    return [] if plan.bad_pixels is None else plan.bad_pixels.tolist()


def sample_beam_radius(plan: Plan) -> float:
    """Direct-beam radius measured on the sample blocks spread over the scan.

    The beam's size is set by the probe's convergence angle, the same at every scan
    position, so a sample of a few thousand patterns measures it as well as the whole
    scan does, and passes that need it (the DoG and LoG scales derive from it) can run
    in the same pass as the beam centres. Navigation binning sums patterns and leaves
    the detector as it is, so the raw chunks are used. See :func:`radius_of_frames`.
    """
    return sample_beam_scales(plan)[0]


def stacked_frames(blocks: list) -> np.ndarray:
    """The patterns of ``blocks`` (a list of (..., ky, kx) arrays, emptied) as one
    (n, ky, kx) float32 array, each block released once copied."""
    ky, kx = blocks[0].shape[-2:]
    frames = np.empty((sum(b.size // (ky * kx) for b in blocks), ky, kx), np.float32)
    n = 0
    while blocks:
        b = blocks.pop(0).reshape(-1, ky, kx)
        frames[n:n + len(b)] = b
        n += len(b)
    return frames


def sample_beam_scales(plan: Plan) -> tuple[float, float | None]:
    """:func:`sample_beam_radius`, and the clipped value of :func:`beam_scales`."""
    radius, clip = beam_scales(stacked_frames(list(plan.sample_blocks())))
    if not np.isfinite(radius):
        raise InputError("could not measure the direct-beam radius on the chunks sampled; "
                         "set preprocess.beam_radius")
    _check_measured_radius(radius)
    return radius, clip


#: A measured beam half-maximum radius below this is one bright pixel (~0.5 px), not a
#: beam: a Gaussian beam of width 0.6 px, the narrowest a detector resolves, measures 0.71.
_MIN_MEASURED_RADIUS = 0.6


def _check_measured_radius(radius: float) -> None:
    """A measured beam radius of about one pixel is not a beam: say what to do."""
    if radius < _MIN_MEASURED_RADIUS:
        raise InputError(f"the direct beam measured {radius:.2f} px in radius, less than any "
                         "beam: a hot pixel bright in every pattern (name it in "
                         "preprocess.bad_pixels if \"auto\" missed it), a beam stop over the "
                         "beam, or patterns with too few counts to show the beam; set "
                         "preprocess.beam_radius (in px) to go on")


#: A clipped beam's half-maximum radius this many times the spots' radius measures glare.
_GLARE_FACTOR = 2.0


def radius_of_frames(frames: np.ndarray) -> float:
    """The length scale of a data set's spots, from a sample of its patterns (n, ky, kx):
    the first of :func:`beam_scales`."""
    return beam_scales(frames)[0]


def beam_scales(frames: np.ndarray) -> tuple[float, float | None]:
    """The length scale of a data set's spots, and the value at which a glare about the
    beam is clipped, from a sample of its patterns (n, ky, kx).

    The beam pass's estimator: centres found with a provisional radius from the
    sample's mean pattern, then the half-maximum radius of the summed radial profile
    around them. A clipped beam (an 8-bit camera at high dose: its core flat at the
    largest value, :func:`~spedflow.preprocess.kernels.beam_saturated`) spreads the
    half maximum out into the glare (18 px for a 3 px beam in a simulation at ~30
    counts per pixel, where the VDF workflow then found no vectors at all). Under
    precession the spots are discs of about the beam's size, so a half-maximum radius
    more than twice the Bragg spots' own (:func:`~spedflow.preprocess.kernels.spot_scale`)
    measures the glare, and the spots' radius is used instead. (At ~9 counts per pixel
    the half maximum overstated the 3 px beam less, 4.8 px, and the workflow did better
    with it, recall / precision 0.90 / 0.75, than with the spots' 2.7 px, 0.90 / 0.53.)

    The clipped value (the sample's largest) is returned in that case, None otherwise:
    the VDF workflow measures the plateau at that value about the beam in every
    pattern (:func:`~spedflow.preprocess.kernels.saturated_radius`). The plateau holds
    no diffraction information, and its edge, which moves with the thickness of the
    film and crystals, is a ring of steps the peak finder takes for spots (on the 8-bit
    set at ~30 counts per pixel, plateaus of 7-24 px made a third of the segments).

    Returns
    -------
    (radius, clip): radius NaN if no beam was found; clip a float or None.
    """
    from ..preprocess import kernels as pk
    ky, kx = frames.shape[-2:]
    c = _sample_centres(frames)
    radius = pk.radius_from_profile(pk.beam_profile(frames, c, min(ky, kx) / 4), default=np.nan)
    if np.isfinite(radius) and pk.beam_saturated(frames, c):
        spots = pk.spot_scale(frames, c, exclude=radius)
        if np.isfinite(spots) and radius > _GLARE_FACTOR * spots:
            log.warning("the direct beam is clipped (saturated): its half-maximum radius %.2f px "
                        "overstates it; using the diffraction spots' radius %.2f px instead (set "
                        "preprocess.beam_radius to choose)", radius, spots)
            return float(spots), float(frames.max())
        log.warning("the direct beam is clipped (saturated at %g) in the patterns sampled: its "
                    "centre comes from the plateau's edge, and intensities at the beam are not "
                    "measured", float(frames.max()))
    return float(radius), None


def _sample_centres(frames: np.ndarray) -> np.ndarray:
    """The beam centres of a sample's patterns (n, ky, kx), found with a provisional
    radius from the sample's mean pattern (as pass 1 does before the radius is known)."""
    from ..preprocess import kernels as pk
    mean = frames.mean(0, dtype=np.float64).astype(np.float32)
    return pk.beam_centres(frames, None, reference=mean)


def annular_image(profiles: np.ndarray, inner: float, outer: float) -> np.ndarray:
    """Annular VDF image (Y, X) from radial profiles: rings inner <= r < outer."""
    lo, hi = int(np.floor(inner)), int(np.ceil(outer))
    return profiles[..., lo:hi].sum(axis=-1).astype(np.float32)


# --- writing the result ----------------------------------------------------------------

def write_result(plan: Plan, method: str, cfg, arrays: dict, attrs: dict, timer: Timer) -> Path:
    """Write the result store atomically: ``OUT.partial`` then rename.

    ``arrays`` maps paths (``"segments/maps"``) to NumPy arrays, dask arrays
    (streamed chunk by chunk), :class:`Rows` (a table streamed part by part) or zarr
    arrays (a stage's stack, copied as stored: :func:`_copy_stored`).
    """
    with atomic_store(plan.out, overwrite=plan.overwrite, sources=[plan.store], replaces="result") as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        for name, value in arrays.items():
            parent, _, leaf = name.rpartition("/")
            grp = root.require_group(parent) if parent else root
            if isinstance(value, Rows):
                _write_rows(grp, leaf, value)
            elif isinstance(value, zarr.Array):
                _copy_stored(value, grp, leaf)
            elif isinstance(value, da.Array):
                chunks = tuple(c[0] for c in value.chunks) if value.size else None
                arr = create_array(grp, leaf, value.shape, value.dtype, chunks=chunks)
                if value.size:  # from the workers, chunk by chunk (regular chunks: one
                    # task per stored chunk)
                    cluster.store(value.rechunk(chunks), arr, label=f"write {name}")
            else:
                value = np.asarray(value)
                arr = create_array(grp, leaf, value.shape, value.dtype,
                                   chunks=slab_chunks(value))
                write_slabs(arr, value)
        meta = {
            "kind": "result", "method": method, "version": __version__,
            "input": plan.store, "input_meta": plan.meta,
            "nav_binning": int(cfg.preprocess.nav_binning),
            "detector_binning": int(plan.detector_binning),
            "params": params_to_dict(cfg), "timings": timer.times,
            "scan_step": plan.meta.get("scan_step"),
            "reciprocal_scale": _binned_scale(plan.meta.get("reciprocal_scale"), plan.detector_binning),
            **attrs,
        }
        root.attrs["spedflow"] = json.loads(json.dumps(meta, default=_jsonable))
    return plan.out


def _binned_scale(scale, factor: int):
    """The input's ``reciprocal_scale`` per binned detector pixel."""
    if factor == 1 or not isinstance(scale, dict) or not isinstance(scale.get("value"), (int, float)):
        return scale
    return {**scale, "value": float(scale["value"]) * factor}


def _copy_stored(source, group, name: str) -> None:
    """Put the zarr array ``source`` into ``group`` as ``name``, with its chunks.

    Both on local disk (a stage's stack going into the result): its files are copied,
    metadata and encoded chunks as they are, nothing decoded or re-encoded (a 256 x 256
    scan's 237 VDF images and labels are 47 MB of files; decoded, rechunked and encoded
    again by the workers they took 1.4 s).
    Copies, not links: the result stays whole when the cache is cleared or rewritten.
    Otherwise the workers stream it chunk by chunk.
    """
    from zarr.storage import LocalStore
    if isinstance(source.store, LocalStore) and isinstance(group.store, LocalStore):
        shutil.copytree(Path(source.store.root) / source.path,
                        Path(group.store.root) / group.path / name)
        return
    arr = create_array(group, name, source.shape, source.dtype, chunks=source.chunks)
    if source.size:
        cluster.store(da.from_zarr(source), arr, label=f"write {name}")


@dataclass
class Rows:
    """A table of ``ncols`` columns given as an iterable of (n_i, ncols) parts, written
    to the result part by part (a large scan's peak table is never whole in memory)."""

    parts: Iterable
    ncols: int
    dtype: object = np.float32


def _write_rows(group, name: str, rows: Rows, chunk_bytes: int = 16 * 2**20) -> None:
    """Write ``rows`` in whole chunks of ~``chunk_bytes`` (a part that ends inside a
    chunk waits in a buffer for the next: appending to a chunk would rewrite it)."""
    dtype = np.dtype(rows.dtype)
    chunk = max(1, chunk_bytes // (rows.ncols * dtype.itemsize))
    arr = create_array(group, name, (0, rows.ncols), dtype, chunks=(chunk, rows.ncols))
    buf, held = [], 0

    def flush(table):
        n = arr.shape[0]
        arr.resize((n + len(table), rows.ncols))
        arr[n:n + len(table)] = table

    for part in rows.parts:
        part = np.asarray(part, dtype=dtype).reshape(-1, rows.ncols)
        buf.append(part)
        held += len(part)
        if held >= chunk:
            table = np.concatenate(buf)
            whole = (held // chunk) * chunk
            flush(table[:whole])
            buf, held = [table[whole:]], held - whole
    if held:
        flush(np.concatenate(buf))


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")
