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

import dask
import dask.array as da
import numpy as np

from .. import cluster
from ..errors import InputError
from ..peaks import PeakParams
from ..peaks.vectors import VectorParams
from ..preprocess import PreprocessParams
from ..segment import VDFMergeParams, WatershedParams
from ..vdf import VDFParams
from ._cache import StageCache, load_block, save_block
from ._common import Plan, Timer, annular_image, beam_stage, binned, write_result

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


def _tree_sum(items: list):
    """Pairwise sum of delayed values: bounded memory on the client and the workers."""
    items = list(items)
    add = dask.delayed(np.add, pure=True)
    while len(items) > 1:
        items = [add(items[i], items[i + 1]) if i + 1 < len(items) else items[i]
                 for i in range(0, len(items), 2)]
    return items[0]


def _peaks_task(block, offset, params, det_shape, oversample, path):
    from ..peaks import peaks_block
    from ..peaks.vectors import peak_histogram
    table = peaks_block(block, offset, params)
    hist = peak_histogram(table, det_shape, oversample=oversample)
    save_block(Path(path), table=table.astype(np.float32), hist=hist)
    return hist


def run_vdf(plan: Plan, cfg: VDFConfig, cache: StageCache) -> Path:
    from ..peaks import resolve as resolve_peaks
    from ..peaks.vectors import resolve as resolve_vectors, unique_vectors
    from ..preprocess import lazy as pre
    from ..preprocess import resolve as resolve_pre
    from ..segment import (merge_vdf_segments, pattern_sigma, segments_from_labels,
                           virtual_patterns, watershed_stack)
    from ..vdf import lazy as vdfl
    from ..vdf import resolve as resolve_vdf

    timer = Timer()
    beam = beam_stage(plan, cfg.preprocess, cache, timer)
    r = beam.radius
    prep = resolve_pre(cfg.preprocess, r)
    pk = resolve_peaks(cfg.peaks, r)
    vp = resolve_vectors(cfg.vectors, r)
    vd = resolve_vdf(cfg.vdf, r)
    data = binned(plan, prep)
    ky, kx = data.shape[2:]
    ny, nx = data.shape[:2]
    aligned = pre.preprocess(data, beam.used, prep)

    # pass 2: peaks of every pattern, and the mergeable histogram of their positions
    st_peaks = cache.stage("peaks", plan.identity, dataclasses.asdict(prep), dataclasses.asdict(pk),
                           vp.oversample)
    blocks = aligned.to_delayed()
    offsets = [np.cumsum((0,) + c[:-1]) for c in aligned.chunks[:2]]
    if not st_peaks.complete:
        with timer("peaks"):
            todo, done = [], []
            for i in range(blocks.shape[0]):
                for j in range(blocks.shape[1]):
                    path = st_peaks.block_path((i, j))
                    if path.exists():
                        done.append(path)
                        continue
                    todo.append(dask.delayed(_peaks_task, pure=True)(
                        blocks[i, j, 0, 0], (int(offsets[0][i]), int(offsets[1][j])), pk,
                        (ky, kx), vp.oversample, str(path)))
            if done:
                log.info("peaks: reusing %d of %d finished blocks", len(done), len(done) + len(todo))
            hist = np.zeros((ky * vp.oversample, kx * vp.oversample))
            if todo:
                hist = hist + cluster.compute(_tree_sum(todo), label="peaks",
                                              n_patterns=ny * nx * len(todo) // max(1, blocks.shape[0] * blocks.shape[1]))[0]
            for path in done:
                hist += load_block(path)["hist"]
            st_peaks.save("hist", hist)
            st_peaks.mark_complete()
    hist = st_peaks.load("hist")

    # unique vectors (finalize of the histogram reduction)
    with timer("vectors"):
        vectors = unique_vectors(hist, detector_shape=(ky, kx), params=vp, beam_radius=r)
    if len(vectors) == 0:
        raise InputError("no diffraction vectors were found: the data may hold no crystals, or the "
                         "peak threshold is too high (see `spedflow params vdf`, section [peaks])")
    log.info("found %d unique diffraction vectors", len(vectors))

    # pass 3: VDF images of all vectors in one pass
    st_vdf = cache.stage("vdf", plan.identity, dataclasses.asdict(prep), vectors, dataclasses.asdict(vd))
    if not st_vdf.complete:
        with timer("vdf"):
            images = vdfl.vdf_images(aligned, vectors, vd.radius)
            (images,) = cluster.compute(images, label="VDF images", n_patterns=ny * nx)
            st_vdf.save("images", images.astype(np.float32))
            st_vdf.mark_complete()
    images = st_vdf.load("images")

    # watershed of every VDF image, each image a task
    with timer("watershed"):
        labels = watershed_stack(da.from_array(images, chunks=(1, ny, nx)), cfg.watershed)
        (labels,) = cluster.compute(labels, label="watershed")
        segments, source = segments_from_labels(images, labels)
    log.info("%d VDF image segments", len(segments))

    with timer("merge"):
        merged = merge_vdf_segments(segments, source, vectors, cfg.merge)
        sigma = pattern_sigma(cfg.merge, r)
        patterns = virtual_patterns(vectors, merged.members, merged.intensities, (ky, kx), sigma)
        table, inten = merged.membership_table()
    log.info("%d crystals after correlation merging", len(merged.summed))

    peaks_table = _gather_peaks(st_peaks)
    arrays = {
        "segments/maps": merged.summed.astype(np.float32),
        "segments/patterns": patterns.astype(np.float32),
        "vectors": vectors.astype(np.float32),
        "vdf/images": images,
        "vdf/labels": labels.astype(np.int32),
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
        "resolved": {"beam_radius": r, "preprocess": dataclasses.asdict(prep),
                     "peaks": dataclasses.asdict(pk), "vectors": dataclasses.asdict(vp),
                     "vdf": dataclasses.asdict(vd), "pattern_sigma": sigma},
        "descan": beam.descan,
        "counts": {"patterns": int(ny * nx), "peaks": int(len(peaks_table)), "vectors": int(len(vectors)),
                   "vdf_segments": int(len(segments)), "groups": int(merged.n_groups),
                   "segments": int(len(merged.summed))},
    }
    return write_result(plan, "vdf", cfg, arrays, attrs, timer)


def _gather_peaks(stage) -> np.ndarray:
    """Concatenate the per-block peak tables (they are small: ~20 B per peak)."""
    paths = sorted((stage.path / "blocks").glob("*.npz"))
    tables = [load_block(p)["table"] for p in paths]
    return np.concatenate(tables) if tables else np.zeros((0, 5), np.float32)
