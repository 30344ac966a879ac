"""The VDF-imaging segmentation workflow (Bergh et al. 2020, Fig. 1), stage by stage.

Passes over the data: (1) beam centres, (2) peaks and their position histogram,
(3) VDF images of all unique vectors at once. Everything after works on the small
per-position images. Each stage is cached under a key of its inputs and parameters.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np

from .. import cluster
from ..errors import InputError
from ..peaks import PeakParams, VectorParams
from ..preprocess import PreprocessParams
from ..segment import VDFMergeParams, WatershedParams
from ..vdf import VDFParams
from ._cache import StageCache, load_block
from ._common import (Plan, Timer, annular_image, beam_stage, binned, run_blocks, total,
                      write_result)

log = logging.getLogger("spedflow")

__all__ = ["VDFConfig", "run_vdf"]


@dataclass(frozen=True)
class VDFConfig:
    """All parameters of the VDF workflow; each section is one stage's dataclass."""

    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    peaks: PeakParams = field(default_factory=PeakParams)
    vectors: VectorParams = field(default_factory=VectorParams)
    vdf: VDFParams = field(default_factory=VDFParams)
    watershed: WatershedParams = field(default_factory=WatershedParams)
    merge: VDFMergeParams = field(default_factory=VDFMergeParams)


def _peaks_block(block, offset, *, params, det_shape, oversample):
    from ..peaks import peaks_block
    from ..peaks.vectors import peak_histogram
    table = peaks_block(block, offset, params)
    return {"table": table.astype(np.float32),
            "hist": peak_histogram(table, det_shape, oversample=oversample),
            "dog_sum": np.asarray(block).sum(axis=(0, 1), dtype=np.float64)}


def peaks_stage_of(cache, beam, prep, pk, vp):
    """The peaks stage's cache entry: keyed on the beam stage (which fixes the centres)."""
    return cache.stage("peaks", "v2", beam.key, dataclasses.asdict(prep), dataclasses.asdict(pk),
                       vp.oversample)


def run_vdf(plan: Plan, cfg: VDFConfig, cache: StageCache) -> Path:
    from ..peaks import resolve as resolve_peaks
    from ..peaks import drop_ring_vectors, spot_radius, unique_vectors
    from ..peaks.vectors import resolve as resolve_vectors
    from ..preprocess import lazy as pre
    from ..preprocess import resolve as resolve_pre
    from ..segment import (fold_fragments, merge_vdf_segments, pattern_sigma, segments_from_labels,
                           virtual_patterns, watershed_stack)
    from ..vdf import lazy as vdfl
    from ..vdf import resolve as resolve_vdf

    timer = Timer()
    beam = beam_stage(plan, cfg.preprocess, cache, timer)
    r = beam.radius
    prep = resolve_pre(cfg.preprocess, r)
    pk = resolve_peaks(cfg.peaks, r, detector_shape=tuple(plan.array.shape[2:]))
    vp = resolve_vectors(cfg.vectors, r)
    data = binned(plan, prep)
    ky, kx = data.shape[2:]
    ny, nx = data.shape[:2]
    aligned = pre.preprocess(data, beam.used, prep)

    # pass 2: peaks of every pattern, and the mergeable histogram of their positions
    st_peaks = peaks_stage_of(cache, beam, prep, pk, vp)
    if not st_peaks.complete:
        with timer("peaks"):
            paths = run_blocks(st_peaks, aligned, _peaks_block, label="peaks", n_patterns=ny * nx,
                               params=pk, det_shape=(ky, kx), oversample=vp.oversample)
            st_peaks.save("hist", total(paths, "hist"))
            st_peaks.save("mean_pattern", total(paths, "dog_sum") / (ny * nx))
            st_peaks.mark_complete()
    hist = st_peaks.load("hist")
    mean_dog = st_peaks.load("mean_pattern")

    # unique vectors (finalize of the histogram reduction): a first pass with the beam
    # radius as length scale, then the spots' own size is measured at those vectors
    # and the vectors found again with it (spots can be sharper than the beam disc)
    with timer("vectors"):
        first = unique_vectors(hist, detector_shape=(ky, kx), oversample=vp.oversample, params=vp)
        hwhm, s_r = spot_radius(mean_dog, first, r)
        vp = resolve_vectors(cfg.vectors, s_r)
        if cfg.vectors.beam_exclusion_radius is None:  # the beam keeps its own size
            vp = dataclasses.replace(vp, beam_exclusion_radius=2.0 * r)
        vectors = unique_vectors(hist, detector_shape=(ky, kx), oversample=vp.oversample, params=vp)
        n_found = len(vectors)
        vectors, _ = drop_ring_vectors(hist, vectors, oversample=vp.oversample,
                                       radius=vp.cluster_radius, min_patterns=vp.min_patterns)
        vd = resolve_vdf(cfg.vdf, s_r)
    if n_found > len(vectors):
        log.info("%d vectors on circularly symmetric rings (film) dropped", n_found - len(vectors))
    log.info("spot HWHM %.2f px (beam radius %.2f px): VDF disc radius %.2f px", hwhm, r, vd.radius)
    if len(vectors) == 0:
        raise InputError("no diffraction vectors were found: the data may hold no crystals, or the "
                         "peak threshold is too high (see `spedflow params vdf`, section [peaks])")
    log.info("found %d unique diffraction vectors", len(vectors))

    # pass 3: VDF images of all vectors in one pass
    st_vdf = cache.stage("vdf", plan.identity, dataclasses.asdict(prep), vectors, dataclasses.asdict(vd))
    if not st_vdf.complete:
        with timer("vdf"):
            images = vdfl.vdf_images(aligned, vectors, vd.radius, subpixel=vd.subpixel)
            (images,) = cluster.compute(images, label="VDF images", n_patterns=ny * nx)
            st_vdf.save("images", images.astype(np.float32))
            st_vdf.mark_complete()
    images = st_vdf.load("images")

    # watershed of every VDF image, each image a task
    with timer("watershed"):
        # each task reads its image from the stage cache: shipping the stack inside the
        # graph puts all of it on every worker (215 MB for 205 vectors on a 512 x 512 scan)
        stack = da.from_zarr(st_vdf.group("r")["images"]).rechunk((1, ny, nx))
        labels = watershed_stack(stack, cfg.watershed)
        (labels,) = cluster.compute(labels, label="watershed")
        segments, source = segments_from_labels(images, labels, sparse=True)
    log.info("%d VDF image segments", segments.shape[0])

    with timer("merge"):
        merged = merge_vdf_segments(segments, source, vectors, cfg.merge, scan_shape=(ny, nx))
        n_merged = len(merged.summed)
        merged = fold_fragments(merged, images, cfg.merge)
        sigma = pattern_sigma(cfg.merge, s_r)
        patterns = virtual_patterns(vectors, merged.members, merged.intensities, (ky, kx), sigma)
        table, inten = merged.membership_table()
    log.info("%d crystals after correlation merging (%d fragments folded into larger crystals)",
             len(merged.summed), n_merged - len(merged.summed))

    peaks_table = _gather_peaks(st_peaks)
    arrays = {
        "segments/maps": merged.summed.astype(np.float32),
        "segments/patterns": patterns.astype(np.float32),
        "vectors": vectors.astype(np.float32),
        "vdf/images": images,
        "vdf/labels": labels.astype(np.int32, copy=False),
        "vdf/segment_vectors": table,
        "vdf/segment_intensities": inten,
        "peaks": peaks_table,
        "beam/centres": beam.measured.astype(np.float32),
        "beam/fitted": beam.used.astype(np.float32),
        "overview/annular_vdf": annular_image(beam.profiles, 2 * r, beam.profiles.shape[-1]),
        "overview/mean_pattern": beam.mean_pattern,
        "overview/peak_histogram": hist.astype(np.float32),
    }
    attrs = {
        "resolved": {"beam_radius": r, "spot_hwhm": hwhm, "spot_radius": s_r, "preprocess": dataclasses.asdict(prep),
                     "peaks": dataclasses.asdict(pk), "vectors": dataclasses.asdict(vp),
                     "vdf": dataclasses.asdict(vd), "pattern_sigma": sigma},
        "descan": beam.descan,
        "counts": {"patterns": int(ny * nx), "peaks": int(len(peaks_table)), "vectors": int(len(vectors)),
                   "vdf_segments": int(segments.shape[0]), "groups": int(merged.n_groups),
                   "fragments_folded": int(n_merged - len(merged.summed)),
                   "segments": int(len(merged.summed))},
    }
    return write_result(plan, "vdf", cfg, arrays, attrs, timer)


def _gather_peaks(stage) -> np.ndarray:
    """Concatenate the per-block peak tables (they are small: ~20 B per peak)."""
    paths = sorted((stage.path / "blocks").glob("*.npz"))
    sizes = []
    for p in paths:  # two reads of small files instead of a second copy of the table
        with np.load(p, allow_pickle=False) as z:
            sizes.append(z["table"].shape[0])
    out = np.empty((sum(sizes), 5), np.float32)
    start = 0
    for p, n in zip(paths, sizes):
        out[start:start + n] = load_block(p)["table"]
        start += n
    return out
