"""Live mode: follow a store that an acquisition is still writing.

``watch`` polls the store; every chunk that has landed (its file exists and reads
back with a valid checksum) goes through the per-chunk stages at once: beam centre,
radial profiles, and, for the VDF workflow, alignment, background removal, peak
finding and the vector histogram; for the NMF workflow alignment and the Poisson
statistics. Their products go into the same stage cache the batch run uses, under
the same keys, so when the scan is complete the final ``segment`` run finds them
and only does what needs the whole scan (unique vectors, VDF images, scree, NMF,
watershed, merging).

The direct-beam radius must be fixed before the scan is complete, so live mode
measures it, the bad pixels and the detector's noise (unless the configuration gives
them) on the first chunks that land, once they hold as many patterns as the batch
run's sample, 512 (256 MB of float32 on detectors over 362 x 362 pixels): one chunk of
128 x 128 uint16 patterns at the default 16 MB, four of 256 x 256. The VDF workflow's
pass 1 (beam centres and peaks) needs nothing else: its peaks move to the fitted
descan's frame at the end. The NMF workflow's Poisson statistics need the
alignment centres: live mode computes them when each pattern's own measured centre
is used (``descan = "none"``); with a descan fit they are computed at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import InputError
from ._cache import StageCache, save_block

log = logging.getLogger("spedflow")

__all__ = ["watch", "landed_chunks"]


def landed_chunks(arr) -> set[tuple[int, int]]:
    """Navigation chunk indices whose stored object exists in ``arr``'s store."""
    import asyncio

    cy, cx = (arr.shards or arr.chunks)[:2]
    grid = (math.ceil(arr.shape[0] / cy), math.ceil(arr.shape[1] / cx))
    store = arr.store
    prefix = arr.path

    async def _keys():
        return [k async for k in store.list_prefix(f"{prefix}/c/")]

    keys = asyncio.run(_keys())
    out = set()
    for k in keys:
        parts = k.split("/")
        try:
            i, j = int(parts[-4]), int(parts[-3])
        except (ValueError, IndexError):
            continue
        if i < grid[0] and j < grid[1]:
            out.add((i, j))
    return out


def _wait_for_store(store, deadline, progress=True):
    import zarr
    told = False
    while True:
        try:
            g = zarr.open_group(str(store), mode="r")
            if "data" in g:
                return g
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise InputError(f"store {str(store)!r} did not appear (no `data` array) before the timeout")
        if progress and not told:
            print(f"watch: waiting for {str(store)!r} to appear (Ctrl-C to stop; --timeout sets "
                  "how long)", file=sys.stderr, flush=True)
            told = True
        time.sleep(0.2)


def watch(store, *, method: str = "vdf", out, config=None, overrides=None, poll: float = 1.0,
          timeout: float = 3600.0, overwrite: bool = False, progress: bool = True, cache=None,
          **segment_kwargs) -> Path:
    """Process ``store`` while it is being written; finalise when it is complete.

    Parameters
    ----------
    store : path of a spedflow input store being written (its ``data`` array created
        with the full shape first; ``attrs["spedflow"]["complete"]`` set true last,
        or every chunk present).
    method, out, config, overrides, overwrite : as :func:`spedflow.segment`.
    poll : seconds between looks at the store.
    timeout : give up when no new chunk lands for this many seconds.

    Returns
    -------
    Path of the result store.
    """
    from ..api import _check_where, load_config, segment
    from ..io import check_destination, check_side_directory
    from ._common import Plan, check_whole_patterns, store_identity, validate

    # the final run: in this process unless told where (checked now, not after the session)
    where = {"client", "scheduler", "n_workers", "threads_per_worker", "memory_limit",
             "tls_ca_file", "tls_cert", "tls_key", "local"}
    given = {k for k, v in segment_kwargs.items() if v is not None}
    segment_kwargs = ({} if where & given else {"local": True}) | segment_kwargs
    _check_where(*(segment_kwargs.get(k) for k in ("client", "local", "scheduler", "n_workers",
                                                   "threads_per_worker", "memory_limit")),
                 tuple(segment_kwargs.get(k) for k in ("tls_ca_file", "tls_cert", "tls_key")))
    check_destination(out, overwrite, sources=[store], replaces="result")
    if cache is not None:
        check_side_directory(cache, what="the stage cache", sources=[store, out])
    cfg = load_config(method, config, overrides)
    from ..api import nested_overrides
    descan_given = "descan" in nested_overrides(overrides).get("preprocess", {})
    if config is None and not descan_given and method == "nmf":  # per-chunk alignment needs no descan fit
        cfg = dataclasses.replace(cfg, preprocess=dataclasses.replace(cfg.preprocess, descan="none"))
    group = _wait_for_store(store, time.monotonic() + timeout, progress)
    arr = group["data"]
    if arr.ndim != 4:
        raise InputError(f"{str(store)!r}/data must be 4-D (scan_y, scan_x, ky, kx); got shape {arr.shape}")
    check_whole_patterns(arr, store)
    meta = dict(group.attrs.get("spedflow", {}))
    ny, nx, ky, kx = arr.shape
    cy, cx = (arr.shards or arr.chunks)[:2]  # the unit a writer completes at once
    grid = (math.ceil(ny / cy), math.ceil(nx / cx))
    per_block = cfg.preprocess.nav_binning == 1 and cfg.preprocess.detector_binning == 1
    if not per_block:
        log.warning("live mode processes chunks as they land only without navigation or detector "
                    "binning; everything is computed when the scan is complete")
    cache = StageCache(cache if cache is not None else Path(str(out) + ".cache"))
    plan = Plan(str(store), Path(out), arr, meta, overwrite, store_identity(store, arr, meta))
    validate(plan, cfg)  # parameters against the data's shape, before any chunk is processed

    # the blocks go into the cache under its writer's lock, as a batch run's do (a batch
    # run on the same result waits; the final run below takes the lock itself)
    with cache.in_use():
        done: set = set()
        waiting: list = []  # landed chunks held back until the sample to start from is complete
        tried = 0  # waiting[:tried] were a sample without a beam
        state: dict = {}
        last_new = time.monotonic()
        t0 = time.monotonic()
        while True:
            new = sorted(landed_chunks(arr) - done)
            for i, j in new:
                sl = (slice(i * cy, (i + 1) * cy), slice(j * cx, (j + 1) * cx))
                try:
                    block = np.asarray(arr[sl])
                except Exception:  # still being written (checksum does not match yet)
                    continue
                done.add((i, j))
                last_new = time.monotonic()
                if not per_block:
                    continue
                if "beam_radius" not in state:
                    waiting.append((i, j))
                    # a sample that showed no beam (blanked at the start of a scan) is not
                    # tried again: the next one is made of the chunks landed since
                    sample = _live_sample(arr, waiting[tried:], (cy, cx), len(done) == grid[0] * grid[1])
                    if sample is None:
                        continue
                    if not _begin(plan, cfg, cache, state, method, sample):
                        tried = len(waiting)
                        continue
                    for a, b in waiting[:-1]:  # the chunks held back, read again
                        _process_block(np.asarray(arr[a * cy:(a + 1) * cy, b * cx:(b + 1) * cx]),
                                       (a, b), (a * cy, b * cx), cfg, state, method)
                    waiting.clear()
                _process_block(block, (i, j), (i * cy, j * cx), cfg, state, method)
            if progress and new:
                rate = len(done) * cy * cx / max(time.monotonic() - t0, 1e-9)
                extra = f", {state['n_vectors']} vectors so far" if "n_vectors" in state else ""
                print(f"\rwatch: {len(done)}/{grid[0] * grid[1]} chunks, {rate:.0f} patterns/s{extra}   ",
                      end="", file=sys.stderr, flush=True)
            import zarr
            group = zarr.open_group(str(store), mode="r")  # re-read the attributes
            complete = bool(dict(group.attrs.get("spedflow", {})).get("complete"))
            if len(done) == grid[0] * grid[1] and (complete or not new):
                break
            if time.monotonic() - last_new > timeout:
                raise InputError(f"no new chunk landed in {timeout:.0f} s ({len(done)} of "
                                 f"{grid[0] * grid[1]} present); the acquisition seems to have stopped")
            time.sleep(poll)
        if progress:
            print(file=sys.stderr)
    if "plan" in state:  # the pixels repaired live (found, given and NaN ones): the same keys
        bad = state["plan"].bad_pixels
        cfg = dataclasses.replace(cfg, preprocess=dataclasses.replace(
            cfg.preprocess, bad_pixels="none" if bad is None else bad.tolist()))
    if "beam_radius" in state and cfg.preprocess.beam_radius is None:
        cfg = dataclasses.replace(cfg, preprocess=dataclasses.replace(cfg.preprocess,
                                                                      beam_radius=state["beam_radius"]))
    return segment(store, method=method, out=out, config=cfg, cache=cache.root, overwrite=overwrite,
                   progress=progress, **segment_kwargs)


def _live_sample(arr, landed, chunks, last):
    """The blocks live mode measures the beam radius, the bad pixels and the detector's
    noise on, or None while too few patterns have landed.

    The batch run measures them on about 512 patterns, fewer of a large detector
    (:func:`spedflow.peaks.lazy.sample_size`), and the counting noise needs neighbouring
    positions along a row. One chunk is the sample where it holds that many patterns;
    smaller chunks (a large detector's hold a few) wait until the runs of adjacent
    landed chunks along their chunk rows, each read as one block, hold as many (or the
    scan is complete); no sample is assembled before."""
    from ..peaks.lazy import sample_size
    cy, cx = chunks
    ny, nx = arr.shape[:2]
    rows: dict = {}
    for i, j in landed:
        rows.setdefault(i, []).append(j)
    runs = []  # (chunk row, first chunk column, last + 1)
    for i, cols in sorted(rows.items()):
        cols = sorted(cols)
        start = cols[0]
        for j, after in zip(cols, cols[1:] + [None]):
            if after != j + 1:
                runs.append((i, start, j + 1))
                start = after
    size = sum((min(ny, (i + 1) * cy) - i * cy) * (min(nx, b * cx) - a * cx) for i, a, b in runs)
    if size < sample_size(arr.shape[2:]) and not last:
        return None
    return [np.asarray(arr[i * cy:(i + 1) * cy, a * cx:b * cx]) for i, a, b in runs]


def _begin(plan, cfg, cache, state, method, blocks) -> bool:
    """Fix the bad pixels, the beam radius and the noise on ``blocks`` (the sample, a
    list, emptied as it is copied into one float32 array; with bad pixels, a repaired
    copy of it too, repaired in float32 where the batch run repairs in the data's dtype:
    only the measurements see the difference, by the rounding of a few pixels); False if
    they show no beam (live mode then waits for more chunks)."""
    from ..preprocess.kernels import repair_pixels
    from ._common import stacked_frames
    ky, kx = blocks[0].shape[-2:]
    shapes = [b.shape[:2] for b in blocks]
    flat = stacked_frames(blocks)
    plan = _with_bad_pixels(plan, cfg, flat)
    if plan.bad_pixels is not None:
        flat = repair_pixels(flat, plan.bad_pixels)
    r0 = cfg.preprocess.beam_radius
    if r0 is None:  # the batch run's estimator, on the sample
        from ._common import _check_measured_radius, radius_of_frames
        r0 = radius_of_frames(flat)
        if not np.isfinite(r0):
            return False
        _check_measured_radius(r0)
    sample, n = [], 0
    for sy, sx in shapes:
        sample.append(flat[n:n + sy * sx].reshape(sy, sx, ky, kx))
        n += sy * sx
    state["plan"] = plan
    _start(plan, cfg, cache, state, method, float(r0), (ky, kx), sample=sample)
    return True


def _process_block(block, index, offset, cfg, state, method):
    """The per-chunk stages of one landed chunk, written where the batch run looks."""
    from ..preprocess import kernels as pk
    from ._cache import load_block

    plan = state["plan"]
    if plan.bad_pixels is not None:  # in the data's dtype, as the batch run repairs
        block = pk.repair_pixels(block, plan.bad_pixels)
    frames = np.asarray(block, np.float32)
    if method == "vdf":
        from .vdf import _beam_peaks_block
        path = state["scan"].block_path(index)
        if path.exists():
            return
        prod = _beam_peaks_block(frames, offset, **state["scan_kwargs"])
        save_block(path, **prod)
        # progress: the vectors seen so far (peaks in the frame of the measured centres)
        from ..peaks import peak_histogram, unique_vectors
        vp = state["vp"]
        state["hist"] = state["hist"] + peak_histogram(prod["table"], frames.shape[-2:],
                                                       oversample=vp.oversample)
        state["n_vectors"] = len(unique_vectors(np.asarray(state["hist"], float),
                                                detector_shape=frames.shape[-2:],
                                                oversample=vp.oversample, params=vp))
        return
    from ._common import _beam_block
    path = state["beam"].block_path(index)
    if path.exists():
        centres = load_block(path, ["centres"])["centres"]
    else:
        prod = _beam_block(frames, offset, **state["beam_kwargs"])
        save_block(path, **prod)
        centres = prod["centres"]
    if state["prep"].descan != "none" or not state["prep"].align:
        return  # the alignment centres are only known at the end
    used = np.where(np.isfinite(centres), centres,
                    np.array([frames.shape[-2] // 2, frames.shape[-1] // 2], np.float32))
    from .nmf import poisson_block
    if state["dark"]:  # as the batch run: subtracted before the alignment
        frames = frames.astype(np.float32) - np.float32(state["dark"])
    aligned = np.maximum(pk.shift_patterns(frames, used.astype(np.float64)), 0)
    stage = state["poisson"]
    if not stage.block_path(index).exists():
        save_block(stage.block_path(index), **poisson_block(aligned, offset, mask=state["mask"]))


def _with_bad_pixels(plan, cfg, frames):
    """``plan`` with the bad pixels of ``preprocess.bad_pixels``; "auto" finds them on
    ``frames`` (live mode's sample, :func:`_live_sample`), where the batch run looks at
    its own sample: the batch run is then given this list, so that both use the same
    pixels and the same cache keys."""
    from ..preprocess.kernels import find_bad_pixels, repair_pixels
    from ._common import _with_pixels, masked_pixels, nonfinite_masks, with_bad_pixels
    flat = frames.reshape((-1,) + frames.shape[-2:])
    # pixels NaN in every pattern are repaired in any case, as the batch run does
    plan = _with_pixels(plan, masked_pixels([nonfinite_masks(flat)], plan.store))
    spec = cfg.preprocess.bad_pixels
    if spec == "auto":
        seen = flat if plan.bad_pixels is None else repair_pixels(flat, plan.bad_pixels)
        hot, dead = find_bad_pixels(seen)
        spec = [tuple(p) for p in np.concatenate([hot, dead]).tolist()]
    prep = dataclasses.replace(cfg.preprocess, bad_pixels="none" if not spec else spec)
    return with_bad_pixels(plan, prep, None)


def _start(plan, cfg, cache, state, method, r0, detector_shape, sample=None):
    """Fix what every chunk's stages need, once the beam radius is known."""
    from ..preprocess import resolve as resolve_pre
    from ._common import beam_block_kwargs, beam_stage_of
    state["beam_radius"] = r0
    # the bad pixels as the final run will be given them (the cache keys must match)
    bad = plan.bad_pixels
    prep = dataclasses.replace(cfg.preprocess, beam_radius=r0, bad_pixels="none" if bad is None
                               else [tuple(p) for p in bad.tolist()])
    state["prep"] = prep
    resolved = resolve_pre(prep, r0)
    if method == "vdf":
        # the same cache entry and arguments as the batch run's pass 1
        from ..peaks import resolve as resolve_peaks
        from ..peaks.vectors import resolve as resolve_vectors
        from .vdf import noise_model, pass1_kwargs, scan_stage_of
        pk_params = resolve_peaks(cfg.peaks, r0, detector_shape=detector_shape)
        state["vp"] = resolve_vectors(cfg.vectors, r0)
        pk_params, counts = noise_model(plan, resolved, pk_params, cache, sample=sample)
        state["scan"] = scan_stage_of(cache, plan, resolved, pk_params, counts)
        state["scan_kwargs"] = pass1_kwargs(plan, resolved, pk_params, counts)
        state["hist"] = 0.0
    else:
        from ..decompose import beam_mask
        from ._common import dark_level
        from .nmf import poisson_stage_of
        state["dark"] = dark_level(plan, resolved, cache, cfg.nmf.dark_level, sample=sample)
        state["beam"] = beam_stage_of(plan, prep, cache)
        state["beam_kwargs"] = beam_block_kwargs(plan, prep)
        mask = beam_mask(detector_shape, cfg.nmf.beam_mask_radius, beam_radius=r0)
        state["mask"] = mask
        # the model the final run records when it sees the beam (chunks are aligned on
        # their measured centres here only then: ``_process_block``)
        model = prep.descan if prep.align else "none (align = false)"
        state["poisson"] = poisson_stage_of(cache, _Key(state["beam"].key, model), resolved, mask,
                                            state["dark"])


class _Key:
    """Stands in for a BeamInfo where only its cache key and descan model are needed."""

    def __init__(self, key, model):
        self.key = key
        self.descan = {"model": model}
