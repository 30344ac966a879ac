"""The VDF-imaging segmentation workflow (Bergh et al. 2020, Fig. 1), stage by stage.

Two passes over the data. (1) The beam centre of every pattern and, in the same task,
the peaks of the pattern aligned by that measured centre and background-subtracted;
once the descan is fitted (it needs every centre), each peak moves by the difference
between measured and fitted centre (a fraction of a pixel, except at outliers), which
is where it lies in the finally aligned pattern. (2) VDF images of all unique vectors
at once, on the aligned patterns. The beam radius, which sets the DoG and LoG scales,
is measured on a few chunks before pass 1. Everything after pass 2 works on the small
per-position images. Each stage is cached under a key of its inputs and parameters.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import dask
import dask.array as da
import numpy as np
from scipy import sparse

from .. import cluster
from .._heap import return_free_heap
from ..errors import InputError
from ..io import create_array
from ..peaks import PeakParams, VectorParams
from ..preprocess import PreprocessParams
from ..segment import VDFMergeParams, WatershedParams
from ..vdf import VDFParams
from ._cache import StageCache, load_block, slab_chunks
from ._common import (GAIN_ERROR, Plan, Rows, Timer, binned, dose_normalisation,
                      measured_counts, note_detector_binning, resolved_bad_pixels, run_blocks,
                      total, with_bad_pixels, with_detector_binning, write_result)

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


def _beam_peaks_block(block, offset, *, beam, sigmas, params, counts=None, clip=None):
    """Pass 1 on one chunk: beam centres and annular sums (:func:`_common._beam_block`),
    and the peaks of the patterns aligned by those centres and background-subtracted
    (:func:`spedflow.peaks.recentre_table` moves them to the fitted descan's frame
    later), with the sum of those patterns (the mean the spot size is measured on).

    Peaks are found on aligned, not raw, patterns because the sub-pixel shift is part
    of what the finder's noise model was set on: bilinear interpolation halves the
    pixel variance of counting noise on average, and on raw low-dose patterns the
    same threshold passes ~6x more noise peaks (measured on the 64 x 64 benchmark set).

    With ``counts = (gain, read_var)`` (``peaks.noise = "counting"``) the peaks are
    found instead on the patterns aligned by whole pixels, minus their ring
    background, against the counting-noise unit (:func:`spedflow.peaks.noise.find_peaks_counting`),
    and their positions moved by the sub-pixel rest of the shift; ``dog_sum`` is then
    the sum of those residuals.

    With ``clip`` (the value at which the glare about the beam is clipped) the radius
    of that plateau in every pattern is measured too (``glare``,
    :func:`spedflow.preprocess.kernels.saturated_radius`).
    """
    from ..peaks.kernels import FILL_EDGE_SCALES, drop_fill_edge, sorted_table
    from ..peaks.lazy import flat_peaks, scan_table
    from ..peaks.noise import counting_peaks_by_slab
    from ..preprocess import kernels as pk
    from ._common import _beam_block, pattern_sum
    frames = np.asarray(block, dtype=np.float32)
    out = _beam_block(frames, offset, **beam)
    cy, cx, ky, kx = frames.shape
    flat = frames.reshape(-1, ky, kx)
    found = _found_at(out["centres"], (ky, kx)).reshape(-1, 2)
    # slab by slab, so the background-subtracted patterns are never a chunk-sized array
    # (a fresh 33 MB array per chunk costs its page faults and evicts the cache)
    tables, dog_sum = [], np.zeros((ky, kx))
    if counts is None:
        for s in range(0, len(flat), _SLAB):
            clean = pk.shift_and_subtract(flat[s:s + _SLAB], found[s:s + _SLAB], *sigmas)
            t = flat_peaks(clean, params)
            t[:, 0] += s
            tables.append(t)
            dog_sum += pattern_sum(clean)
    else:  # the patterns of one ring model together (ring_offset_bins)
        for _, t, clean in counting_peaks_by_slab(flat, found, params, counts, _SLAB):
            tables.append(t)
            dog_sum += pattern_sum(clean)
    table = sorted_table(tables)
    if counts is None:  # peaks at the zero fill's step of a detector edge shifted in (the
        # counting path copies the edge into the fill and drops the peaks there itself)
        table = drop_fill_edge(table, found, (ky, kx), FILL_EDGE_SCALES * params.max_sigma)
    out["table"] = scan_table(table, cx, offset)
    out["dog_sum"] = dog_sum
    if clip is not None:
        out["glare"] = pk.saturated_radius(flat, found, top=clip).reshape(cy, cx).astype(np.float32)
    return out


#: Patterns shifted, background-subtracted and searched for peaks at a time in pass 1.
_SLAB = 64


def noise_model(plan, prep, pk, cache, sample=None):
    """The peak finder's noise model: ``(pk, counts)``, ``counts`` as :func:`counts_of`.

    With ``peaks.noise = "counting"`` and no ``peaks.gain`` the detector's gain is
    measured on the data. Where the data cannot tell it (its relative standard error
    above 0.1: a camera on which nothing but the beam varies, such as an 8-bit camera
    sitting at its dark level), a counting unit built on the guess would move the
    threshold by the guess's error (on a simulated 8-bit camera the gain came out 2.4x
    too high and VDF found 1 of 4 visible crystals, 2 with the true gain), so the peak
    finder falls back to each pattern's own robust noise level (``peaks.noise =
    "pattern"``, which needs no calibration; 2 of 4 there) and says so.
    """
    counts = counts_of(plan, prep, pk, cache, sample)
    if counts is None or counts[-1] <= GAIN_ERROR:
        return pk, counts if counts is None else counts[:-1]
    log.warning("the detector's gain is poorly determined by this data (%.3g data units per "
                "count, relative error %s): few pixels but the beam's vary enough to measure it "
                "on. The peak threshold is measured against each pattern's own noise level "
                "instead (peaks.noise = \"pattern\"); if the camera's gain is known, give it as "
                "peaks.gain to use counting statistics", counts[0],
                f"{counts[-1]:.0%}" if counts[-1] < 10 else "over 1000 %")
    return dataclasses.replace(pk, noise="pattern"), None


def counts_of(plan, prep, pk, cache, sample=None):
    """``(gain, read_var, ..., error)`` of the counting-noise model (None for ``noise =
    "pattern"``): given, or measured on a few chunks (cached; live mode measures it on
    the blocks ``sample``), with the LoG noise factors per scale
    (:func:`spedflow.peaks.noise.log_noise_factors`), where the detector's point spread
    correlates its pixels' noise. Binning sums ``nav_binning**2`` patterns: the gain and
    the factors stay, the read-out variance adds up (so does a given one over the
    ``detector_binning**2`` pixels of a binned one; a measured one is measured binned).
    The last item is the gain's relative standard error (0 where it is given)."""
    from ..peaks.kernels import log_sigmas
    from ..peaks.noise import log_noise_factors
    from ._common import noise_sample
    if pk.noise != "counting":
        return None
    pixels = plan.detector_binning ** 2  # a given read-out variance is per raw pixel
    error = 0.0
    if pk.gain is not None and pk.read_variance is not None:
        gain, read_var = float(pk.gain), float(pk.read_variance) * pixels
    elif pk.gain is not None:  # the intercept (read-out noise, a dark level) measured
        gain = float(pk.gain)
        try:
            read_var = measured_counts(plan, cache, sample, gain=gain)[1]
        except InputError:  # too few neighbouring positions: nothing to go by
            read_var = 0.0
    else:
        try:
            gain, read_var, error = measured_counts(plan, cache, sample, return_error=True)
        except InputError as e:
            raise InputError(f"{e}; give the detector's data units per electron and read-out "
                             "variance as peaks.gain and peaks.read_variance (1 and 0 for a "
                             "counting detector) to go on") from None
        read_var = read_var if pk.read_variance is None else float(pk.read_variance) * pixels
        if not error <= GAIN_ERROR:  # (NaN too) no unit is built on it (see noise_model)
            return gain, read_var, error
    # the LoG noise of a detector whose point spread correlates neighbouring pixels
    sigmas = [float(x) for x in log_sigmas(pk.min_sigma, pk.max_sigma, pk.num_sigma)]
    st = cache.stage("noise_factors", plan.identity, "v1", sigmas, gain, read_var)
    if not st.complete:
        st.save_attrs(factors=list(log_noise_factors(noise_sample(plan, sample), sigmas, gain, read_var)))
        st.mark_complete()
    factors = tuple(st.attrs()["factors"])
    counts = (gain, read_var * prep.nav_binning ** 2)
    return counts + ((factors,) if factors else ()) + (error,)


def _found_at(centres, detector_shape) -> np.ndarray:
    """The centres pass 1 aligns by: the measured ones, the detector centre where none was found."""
    ky, kx = detector_shape
    return np.where(np.isfinite(centres), centres, np.array([ky // 2, kx // 2], np.float64))


def beam_radius_of(plan, prep, cache) -> tuple[float, float | None]:
    """The direct-beam radius, given or measured on a few chunks, and the value at which
    a glare about the beam is clipped (None if none, or if the radius is given; see
    :func:`spedflow.workflows._common.beam_scales`). Cached."""
    from ._common import collected_warnings, replay_warnings, sample_beam_scales
    if prep.beam_radius is not None:
        return float(prep.beam_radius), None
    st = cache.stage("radius", plan.identity, {"nav_binning": prep.nav_binning}, "v2")
    if not st.complete:
        with collected_warnings() as notes:
            radius, clip = sample_beam_scales(plan)
        st.save_attrs(radius=radius, clip=clip, warnings=notes)
        st.mark_complete()
    else:  # a rerun from the cache still says what was measured about the data
        replay_warnings(st)
    a = st.attrs()
    return float(a["radius"]), a["clip"]


def scan_stage_of(cache, plan, prep, pk, counts, clip=None):
    """Pass 1's cache entry. Its blocks depend on the radius, the DoG and the LoG
    parameters, the noise model and the clipped value, not on the descan model (the
    peaks are found before the descan fit)."""
    return cache.stage("beam_peaks", plan.identity,
                       {"nav_binning": prep.nav_binning, "beam_radius": prep.beam_radius,
                        "dog": [prep.dog_sigma_low, prep.dog_sigma_high], "counts": counts,
                        "clip": clip},
                       dataclasses.asdict(pk), "totals")  # blocks with each pattern's total


def pass1_kwargs(plan, prep, pk, counts, clip=None) -> dict:
    """Keyword arguments of :func:`_beam_peaks_block` (the batch run and live mode must
    use the same ones: live mode writes the blocks the batch run then reuses)."""
    from ._common import beam_block_kwargs
    return dict(beam=beam_block_kwargs(plan, prep, annular=True),
                sigmas=(prep.dog_sigma_low, prep.dog_sigma_high), params=pk,
                counts=None if counts is None else tuple(counts), clip=clip)


def peaks_stage_of(cache, scan, prep, vp):
    """The finalize of pass 1: descan fit, peaks in the aligned frame, their histogram."""
    return cache.stage("peaks", "v5", scan.key, {"descan": prep.descan, "align": prep.align},
                       vp.oversample)


def _beam_peaks_stage(plan, data, prep, pk, vp, cache, timer, counts, clip=None):
    """Pass 1 and its finalize; returns the beam information, the peak histogram (of
    aligned positions), the mean background-subtracted pattern, pass 1's stage, the
    largest radius of a clipped glare (0 without ``clip``) and the number of peaks in
    the aligned peak table."""
    from ._common import BeamInfo, assemble, collected_warnings, finish_beam, replay_warnings
    ny, nx, ky, kx = data.shape
    scan = scan_stage_of(cache, plan, prep, pk, counts, clip)
    st = peaks_stage_of(cache, scan, prep, vp)
    if not st.complete:
        with timer("beam_peaks"):
            paths = run_blocks(scan, data, _beam_peaks_block, label="beam centres and peaks",
                               n_patterns=ny * nx, **pass1_kwargs(plan, prep, pk, counts, clip))
            scan.mark_complete()
            with collected_warnings() as notes:
                measured, used, prof, mean, descan = finish_beam(paths, data, prep)
            # float32, as stored: the histogram and the result's peak table then
            # move every peak by exactly the same amount
            measured, used = measured.astype(np.float32), np.asarray(used, np.float32)
            hist, n_peaks = _over_tables(paths, measured, used, (ky, kx), pk.exclude_border,
                                         _histogram_of, (ky, kx), vp.oversample,
                                         label="peak histogram")
            st.save("measured", measured)
            st.save("used", used)
            st.save("annular", prof)
            st.save("totals", assemble(paths, "total", (ny, nx), data.chunks[:2]))
            st.save("mean_pattern", mean.astype(np.float32))
            st.save("hist", hist)
            st.save("mean_dog", total(paths, "dog_sum") / (ny * nx))
            glare = 0.0 if clip is None else max(
                float(load_block(p, ["glare"])["glare"].max(initial=0)) for p in paths)
            st.save_attrs(descan=descan, warnings=notes, glare=glare, n_peaks=n_peaks)
            st.mark_complete()
    else:
        replay_warnings(st)
    beam = BeamInfo(st.load("measured"), st.load("used"), float(prep.beam_radius), None,
                    st.load("mean_pattern"), st.attrs().get("descan", {}), st.key,
                    annular=st.load("annular"), totals=st.load("totals"))
    a = st.attrs()
    return (beam, st.load("hist"), st.load("mean_dog"), scan, float(a.get("glare", 0.0)),
            int(a["n_peaks"]))


def run_vdf(plan: Plan, cfg: VDFConfig, cache: StageCache) -> Path:
    from ..peaks import resolve as resolve_peaks
    from ..peaks import drop_ring_vectors, position_scatter, spot_radius, unique_vectors
    from ..peaks.vectors import resolve as resolve_vectors
    from ..preprocess import lazy as pre
    from ..preprocess import resolve as resolve_pre
    from ..segment import (AreaReflections, SpotOffsets, drop_radial_pairs, drop_rims,
                           drop_shared_reflections, fold_fragments, member_positions,
                           merge_vdf_segments, pattern_sigma, segments_from_labels,
                           split_overlapping, virtual_patterns, watershed_stack)
    from ..segment._merge import noise_corrected
    from ..segment._watershed import resolved_watershed
    from ..segment._overlap import note_cuts
    from ..vdf import lazy as vdfl
    from ..vdf import resolve as resolve_vdf

    timer = Timer()
    as_read = plan  # the clipping test reads values as stored (before line gains)
    plan = with_bad_pixels(plan, cfg.preprocess, cache)
    plan = with_detector_binning(plan, cfg.preprocess)
    r, clip = beam_radius_of(plan, cfg.preprocess, cache)
    note_detector_binning(plan, r)
    prep = resolve_pre(cfg.preprocess, r)
    pk = resolve_peaks(cfg.peaks, r, detector_shape=plan.detector_shape)
    vp = resolve_vectors(cfg.vectors, r)
    data = binned(plan, prep)
    ky, kx = data.shape[2:]
    ny, nx = data.shape[:2]

    # pass 1: beam centres and the peaks of every pattern; the descan fit, and the
    # mergeable histogram of the peaks' aligned positions
    pk, counts = noise_model(plan, prep, pk, cache)
    if counts is not None:
        if counts[1] >= 0:
            log.info("detector: %.3g data units per count, read-out variance %.3g", *counts[:2])
        else:  # the intercept of the variance line: a dark level outweighs the read-out noise
            log.info("detector: %.3g data units per count, a dark level of at least %.3g "
                     "units left in the data (variance %.3g at a reading of 0)", counts[0],
                     -counts[1] / counts[0], counts[1])
        if len(counts) > 2:
            log.info("detector: its point spread correlates neighbouring pixels' noise; the "
                     "peak finder's noise variance is %s times that of independent pixels",
                     " / ".join(f"{f:.3g}" for f in counts[2]))
    cluster.ready()  # the sample's stages ran while a local cluster started
    beam, hist, mean_dog, st_scan, glare, n_peaks = _beam_peaks_stage(
        plan, data, prep, pk, vp, cache, timer, counts, clip)

    return_free_heap()  # what pass 1's finalize freed

    def past_the_beam(vp, spot):
        """``vp`` with the default beam exclusion: the beam keeps its own size; a clipped
        glare holds no diffraction, and the peak finder takes the steps of its moving
        edge for spots out to about two spot radii beyond it."""
        if cfg.vectors.beam_exclusion_radius is not None:
            return vp
        return dataclasses.replace(vp, beam_exclusion_radius=max(2.0 * r, glare + 2.0 * spot))

    vp = past_the_beam(vp, r)

    # unique vectors (finalize of the histogram reduction): a first pass with the beam
    # radius as length scale, then the spots' own size is measured at those vectors
    # and the vectors found again with it (spots can be sharper than the beam disc)
    with timer("vectors"):
        first = unique_vectors(hist, detector_shape=(ky, kx), oversample=vp.oversample, params=vp)
        hwhm, s_r = spot_radius(mean_dog, first, r)
        vp = past_the_beam(resolve_vectors(cfg.vectors, s_r), s_r)
        if cfg.vectors.scatter is None:  # how far the peaks of one reflection scatter
            scatter = position_scatter(hist, first, oversample=vp.oversample,
                                       radius=vp.cluster_radius)
            if np.isfinite(scatter):
                vp = dataclasses.replace(vp, scatter=scatter)
        vectors = unique_vectors(hist, detector_shape=(ky, kx), oversample=vp.oversample, params=vp)
        n_found = len(vectors)
        vectors, _ = drop_ring_vectors(hist, vectors, oversample=vp.oversample,
                                       radius=vp.cluster_radius, min_patterns=vp.min_patterns)
        vd = resolve_vdf(cfg.vdf, s_r)
    if n_found > len(vectors):
        log.info("%d vectors on circularly symmetric rings (film) dropped", n_found - len(vectors))
    log.info("spot HWHM %.2f px (beam radius %.2f px): VDF disc radius %.2f px", hwhm, r, vd.radius)
    if len(vectors):  # a disc reaching the direct beam images the bright field, not a spot
        reach = float(np.hypot(*np.asarray(vectors, np.float64).T).min()) - r
        if vd.radius > reach:
            log.warning("vdf.radius = %.3g px reaches the direct beam from the nearest vector "
                        "(%.1f px from the beam centre, the beam %.2f px in radius): those VDF "
                        "images hold the bright field; keep the radius under %.1f px",
                        vd.radius, reach + r, r, max(reach, 0.0))
    if glare > 0:
        log.info("clipped glare up to %.1f px from the beam: vectors within %.1f px of it left out "
                 "(vectors.beam_exclusion_radius)", glare, vp.beam_exclusion_radius)
    paths = sorted((st_scan.path / "blocks").glob("*.npz"))  # pass 1's peaks, per chunk
    # (a noise line of negative intercept is a dark level left in the data: -v / g per
    # reading, taken out of the totals as NMF takes it out of the data)
    dose, spread, normalised = dose_normalisation(
        beam, vd.normalize, as_read, cache, gain=None if counts is None else counts[0],
        read_var=0.0 if counts is None else max(counts[1], 0.0),
        dark=0.0 if counts is None else max(-counts[1], 0.0) / counts[0], what="VDF images",
        param="vdf.normalize")
    if len(vectors):
        log.info("found %d unique diffraction vectors", len(vectors))
        # pass 2: VDF images of all vectors in one pass
        # (pass 2 uses the noise line only: not the LoG factors, counts[2])
        st_vdf = cache.stage("vdf", plan.identity, dataclasses.asdict(prep),
                             None if counts is None else counts[:2], vectors,
                             {k: v for k, v in dataclasses.asdict(vd).items() if k != "normalize"},
                             {"dose_normalised": normalised})  # the rule resolved
        if not st_vdf.complete:
            with timer("vdf"):
                if prep.align:  # one task per chunk: preprocess a slab, integrate its discs
                    images = vdfl.preprocessed_vdf_images(data, beam.used, prep, vectors, vd.radius,
                                                          counts=counts[:2] if counts else None,
                                                          subpixel=vd.subpixel)
                else:
                    images = vdfl.vdf_images(pre.preprocess(data, beam.used, prep), vectors,
                                             vd.radius, subpixel=vd.subpixel)
                # the workers write the stack, one image per stored chunk (what the watershed
                # and the merging read); the pass's blocks hold all vectors of a patch of the
                # scan, so they are regrouped in the workers' memory into slabs of whole
                # images first. Nothing of the stack comes to the client.
                target = create_array(st_vdf.group(), "images", images.shape, np.float32,
                                      chunks=(1, ny, nx), overwrite=True)
                images = images.astype(np.float32)
                if normalised:  # each pattern's VDF sums over its dose (vdf.normalize)
                    images = images * (1.0 / dose).astype(np.float32)[None]
                cluster.store(images.rechunk(slab_chunks(images)), target, label="VDF images",
                              n_patterns=ny * nx)
                st_vdf.mark_complete()
        # from here on the image stack stays on disk: the client reads an image when it needs it
        images = st_vdf.group("r")["images"]
        image_snr = _images_snr(images, cfg.watershed.threshold)
        ws = resolved_watershed(cfg.watershed, image_snr)  # the automatic snr_floor
        _note_noisy_images(image_snr, ws, auto=cfg.watershed.snr_floor is None)

        # watershed of every VDF image, each image a task that reads its image from the
        # stage cache and writes its labels there: shipping the stack inside the graph puts
        # all of it on every worker (215 MB for 205 vectors on a 512 x 512 scan), and
        # gathering the labels would hold a second stack here
        st_ws = cache.stage("watershed", st_vdf.key, dataclasses.asdict(ws))
        with timer("watershed"):
            if not st_ws.complete:
                stack = da.from_zarr(images).rechunk((1, ny, nx))
                target = create_array(st_ws.group(), "labels", stack.shape, np.int32,
                                      chunks=(1, ny, nx), overwrite=True)
                cluster.store(watershed_stack(stack, ws), target, label="watershed")
                st_ws.mark_complete()
            labels = st_ws.group("r")["labels"]
            segments, source = segments_from_labels(images, labels, sparse=True)
            return_free_heap()
        log.info("%d VDF image segments", segments.shape[0])

        corrected = noise_corrected(cfg.merge, image_snr)
        if corrected and cfg.merge.noise_corrected == "auto":
            log.info("segment correlations corrected for the images' pixel noise (median "
                     "signal-to-noise ratio %.2f; merge.noise_corrected)", image_snr)
        with timer("merge"):
            merged = merge_vdf_segments(segments, source, vectors, cfg.merge, scan_shape=(ny, nx),
                                        image_snr=image_snr)
            n_groups = len(merged.summed)
            merged = drop_radial_pairs(merged, images, cfg.merge, radius=vd.radius)
            n_ring = n_groups - len(merged.summed)
            merged = drop_shared_reflections(merged, images, cfg.merge)
            n_shared = n_groups - n_ring - len(merged.summed)
            n_merged = len(merged.summed)
            # the lattice rules of the folding look at the spots, from the peak table: where
            # those lighting each group's segments are (a segment can be lit by its
            # crystal's reflection off its vector's centre), and which reflections show in
            # each group's area
            measured = seen_in = lit = None
            if cfg.merge.lattice_significance > 0 and len(merged.summed) > 1:
                spots = SpotOffsets(segments, source, vectors, scan_shape=(ny, nx),
                                    search_radius=2.0 * vd.radius)
                areas = None
                if cfg.merge.area_reflections > 0:
                    masks = sparse.csr_matrix(merged.summed.reshape(len(merged.summed), -1))
                    areas = AreaReflections(masks, vectors, scan_shape=(ny, nx),
                                            radius=vp.cluster_radius)
                # one read of the peak tables feeds both, in parts on the workers
                sums = _over_tables(paths, beam.measured, beam.used, (ky, kx), pk.exclude_border,
                                    _feed_group, [spots, areas], (ny, nx), (ky, kx),
                                    label="spots of the segments")
                (offsets, weights), seen_in = [None if a is None else a.absorb(s).result()
                                               for a, s in zip([spots, areas], sums)]
                measured, lit = member_positions(merged.members, merged.segment_members, source,
                                                 vectors, offsets, weights, return_weights=True)
            merged = fold_fragments(merged, images, cfg.merge, measured=measured, seen_in=seen_in,
                                    lit=lit)
            n_folded = n_merged - len(merged.summed)
            # the shared reflections again, of the folded crystals: a crystal whose fragments
            # each had fewer vectors than the union of it and its twin (their shared
            # reflections' group) now has more, and the union goes
            n_before = len(merged.summed)
            merged = drop_shared_reflections(merged, images, cfg.merge)
            n_shared += n_before - len(merged.summed)
            n_merged -= n_before - len(merged.summed)
            # after the folding, which may give a crystal the vectors its rim shows
            merged = drop_rims(merged, cfg.merge)
            n_rims = n_merged - n_folded - len(merged.summed)
            # two crystals of one orientation overlapping: one group, cut where it shows
            n_before = len(merged.summed)
            merged = split_overlapping(merged, cfg.merge)
            n_split = len(merged.summed) - n_before
            sigma = pattern_sigma(cfg.merge, s_r)
            patterns = virtual_patterns(vectors, merged.members, merged.intensities, (ky, kx), sigma)
            table, inten = merged.membership_table()
    else:  # no vectors: a result all the same (empty), and why, as NMF does
        if n_found:  # every vector found lay on an even ring
            log.warning("no crystal found: the %s found lie%s on rings of peaks as even as an "
                        "amorphous film's (none stands out of its |g| by vectors.min_patterns = "
                        "%d patterns and 5 sigma): the data may hold no crystals, or so many of "
                        "one phase that their spots fill their rings (the NMF workflow does not "
                        "need vectors)", "diffraction vector" if n_found == 1 else
                        f"{n_found} diffraction vectors", "s" if n_found == 1 else "",
                        vp.min_patterns)
        else:
            log.warning("no crystal found: no diffraction vector, a place on the detector with "
                        "peaks in vectors.min_patterns = %d patterns or more: the data may hold no "
                        "crystals, or their spots lie under the peak threshold (peaks.threshold; "
                        "see `spedflow params vdf`, section [peaks])", vp.min_patterns)
        images = np.zeros((0, ny, nx), np.float32)
        image_snr = None
        ws = resolved_watershed(cfg.watershed, None)  # no images: the rule as given, else off
        corrected = noise_corrected(cfg.merge, None)
        labels = np.zeros((0, ny, nx), np.int32)
        segments = sparse.csr_matrix((0, ny * nx), dtype=np.float32)
        merged = merge_vdf_segments(segments, np.zeros(0, np.int64), vectors, cfg.merge,
                                    scan_shape=(ny, nx))
        n_ring = n_shared = n_folded = n_rims = n_split = 0
        sigma = pattern_sigma(cfg.merge, s_r)
        patterns = np.zeros((0, ky, kx), np.float32)
        table, inten = merged.membership_table()
    if n_ring:
        log.info("%d Friedel-pair groups dropped: no brighter than the other vectors on their ring "
                 "(merge.friedel_ring_contrast)", n_ring)
    if n_shared:
        log.info("%d groups dropped as reflections shared with better-supported crystals, "
                 "their vectors given to those crystals (merge.shared_coverage)", n_shared)
    if n_rims:
        log.info("%d groups dropped as the rims of crystals with more vectors, their vectors "
                 "all those crystals' (merge.rim_width)", n_rims)
    note_cuts(n_split)
    log.info("%d crystals after correlation merging (%d fragments folded into larger crystals)",
             len(merged.summed), n_folded)
    if not len(merged.summed) and len(vectors):  # say why, not only "wrote"
        if not segments.shape[0]:
            log.warning("no crystal found: no VDF image held a region of at least "
                        "watershed.min_size = %d scan positions above its threshold (a scan "
                        "smaller than its crystals, or no crystals)", cfg.watershed.min_size)
        else:
            log.warning("no crystal found: none of the %d VDF image segments was shared by "
                        "merge.vector_threshold = %d vectors (a crystal shows at least that "
                        "many reflections)", segments.shape[0], cfg.merge.vector_threshold)

    return_free_heap()
    # streamed block by block into the result (5.96 M peaks, 119 MB, on a 512 x 512 scan)
    peaks_table = Rows(_aligned_tables(paths, beam.measured, beam.used, (ky, kx),
                                       pk.exclude_border), 5, np.float32)
    arrays = {
        "segments/maps": merged.summed.astype(np.float32),
        "segments/patterns": patterns.astype(np.float32),
        "vectors": vectors.astype(np.float32),
        # copied from the stage cache as they are stored there: one image per chunk
        "vdf/images": images,
        "vdf/labels": labels,
        "vdf/segment_vectors": table,
        "vdf/segment_intensities": inten,
        "peaks": peaks_table,
        "beam/centres": beam.measured.astype(np.float32),
        "beam/fitted": beam.used.astype(np.float32),
        "overview/annular_vdf": beam.annular_image(),
        "overview/total_counts": beam.totals.astype(np.float32),
        "overview/mean_pattern": beam.mean_pattern,
        "overview/peak_histogram": hist.astype(np.float32),
    }
    attrs = {
        "resolved": {"beam_radius": r, "glare_radius": glare, "spot_hwhm": hwhm, "spot_radius": s_r, "preprocess": dataclasses.asdict(prep),
                     "peaks": dataclasses.asdict(pk), "vectors": dataclasses.asdict(vp),
                     "vdf": dataclasses.asdict(vd), "pattern_sigma": sigma,
                     "vdf_image_snr": image_snr,
                     "merge_noise_corrected": corrected,
                     "dose_spread": spread if np.isfinite(spread) else None,
                     "vdf_dose_normalized": normalised,
                     "watershed_snr_floor": ws.snr_floor,
                     "bad_pixels": resolved_bad_pixels(plan),
                     "line_gains": plan.identity.get("line_gains", {}),
                     "gain": None if counts is None else counts[0],
                     # per raw pattern and pixel, as the parameter (binning adds it up)
                     "read_variance": None if counts is None
                     else counts[1] / prep.nav_binning ** 2 / plan.detector_binning ** 2,
                     # per LoG scale; empty: the pixels' noise is independent
                     "log_noise_factors": None if counts is None else list(counts[2:3] and counts[2])},
        "descan": beam.descan,
        "counts": {"patterns": int(ny * nx), "peaks": n_peaks, "vectors": int(len(vectors)),
                   "vdf_segments": int(segments.shape[0]), "groups": int(merged.n_groups),
                   "fragments_folded": int(n_folded),
                   "friedel_ring_dropped": int(n_ring),
                   "shared_dropped": int(n_shared),
                   "rims_dropped": int(n_rims), "overlaps_cut": int(n_split),
                   "segments": int(len(merged.summed))},
    }
    return write_result(plan, "vdf", cfg, arrays, attrs, timer)


#: At most this many VDF images, evenly spread over the stack, are measured for
#: :func:`_note_noisy_images` (a 512 x 512 image takes ~20 ms).
_SNR_SAMPLE = 32


def _images_snr(images, threshold: str) -> float | None:
    """The median pixel signal-to-noise ratio of up to ``_SNR_SAMPLE`` of the VDF
    ``images`` (a Zarr array, read image by image; None if there are none), their
    masks by the watershed's ``threshold`` method."""
    from ..segment._watershed import image_snr
    n = images.shape[0]
    if n == 0:
        return None
    picks = np.unique(np.linspace(0, n - 1, min(n, _SNR_SAMPLE)).round().astype(int))
    snr = float(np.median([image_snr(images[int(i)], threshold) for i in picks]))
    return snr if math.isfinite(snr) else None


def _note_noisy_images(snr: float | None, ws, *, auto: bool) -> None:
    """Say what the VDF images' median pixel signal-to-noise ratio ``snr`` means: under
    :data:`~spedflow.segment._watershed.NOISY_IMAGES` with the watershed's noise rule
    off (``ws``, resolved), what to try; with the rule switched on automatically, that
    it is (``auto``)."""
    from ..segment._watershed import NOISY_IMAGES
    if snr is None:
        return
    if snr < NOISY_IMAGES and ws.snr_floor == 0 and ws.smooth is None:
        log.warning("the VDF images are noisy (median pixel signal-to-noise ratio %.2f): as "
                    "at low dose, the watershed may cut crystals into pieces. Try --set "
                    "watershed.snr_floor=2 (smooths the noisiest images) or --method nmf "
                    "(pools every pattern)", snr)
    elif auto and ws.snr_floor > 0 and ws.smooth is None:  # the rule acts only then
        log.warning("the VDF images are mostly noise (median pixel signal-to-noise ratio "
                    "%.2f): each is smoothed until its crystals hold together "
                    "(watershed.snr_floor = %g; --method nmf pools every pattern)", snr,
                    ws.snr_floor)


def _aligned_tables(paths, measured, used, detector_shape, border, *, found_at=None):
    """Each block's peak table moved to the frame of the fitted descan, one block at a
    time (``found_at``: :func:`_found_at` of ``measured``, if already at hand)."""
    from ..peaks import recentre_table
    found_at = _found_at(measured, detector_shape) if found_at is None else found_at
    for p in paths:
        yield recentre_table(load_block(p, ["table"])["table"], used, detector_shape,
                             found_at=found_at, exclude_border=border)


#: Blocks of peak tables one task of :func:`_over_tables` reads: a grouping set by the
#: data alone, so that the parts add up in the same order on any cluster.
_TABLE_GROUP = 8


def _over_tables(paths, measured, used, detector_shape, border, part, *args, label: str):
    """``part(tables, *args)`` on the aligned peak tables (:func:`_aligned_tables`) of
    each group of :data:`_TABLE_GROUP` blocks, one task per group, and the parts added
    up (:func:`_add`) in a fixed binary tree: the sum over every table.

    The client used to read every table itself, one after the other: 2 s of a 256 x 256
    run (its histogram and the merge's spots), and growing with the scan while the
    workers waited. Now it holds the sum only."""
    found_at = _found_at(measured, detector_shape)
    shared = [used, found_at, *args]
    used, found_at, *args = cluster.scattered(shared) or shared
    parts = [dask.delayed(_part_of_group, pure=False)(  # (one empty group without paths)
        paths[i:i + _TABLE_GROUP], used, found_at, detector_shape, border, part, *args)
        for i in range(0, max(len(paths), 1), _TABLE_GROUP)]
    while len(parts) > 1:
        parts = [dask.delayed(_add, pure=False)(*parts[i:i + 2]) if i + 1 < len(parts)
                 else parts[i] for i in range(0, len(parts), 2)]
    return cluster.compute(parts[0], label=label)[0]


def _part_of_group(paths, used, found_at, detector_shape, border, part, *args):
    """One task of :func:`_over_tables`."""
    tables = _aligned_tables(paths, None, used, detector_shape, border, found_at=found_at)
    return part(tables, *args)


def _add(a, b):
    """The sum of two parts of :func:`_over_tables`: arrays and numbers added,
    sequences item by item, None kept."""
    if a is None:
        return b
    if isinstance(a, (list, tuple)):
        return type(a)(_add(x, y) for x, y in zip(a, b))
    return a + b


def _histogram_of(tables, detector_shape, oversample):
    """A part of pass 1's peak histogram (of aligned positions) and its number of peaks."""
    from ..peaks import peak_histogram
    hist = np.zeros((detector_shape[0] * oversample, detector_shape[1] * oversample))
    n = 0
    for table in tables:
        hist += peak_histogram(table, detector_shape, oversample=oversample)
        n += len(table)
    return hist, n


def _feed_group(tables, accumulators, scan_shape, detector_shape):
    """A part of the merge's read of the peak tables: the sums of zeroed copies of the
    ``accumulators`` (None kept), fed (:func:`~spedflow.segment.feed_peak_tables`), for
    the accumulators to :meth:`~spedflow.segment.SpotOffsets.absorb`."""
    from ..segment import feed_peak_tables
    parts = [None if a is None else a.zeroed() for a in accumulators]
    feed_peak_tables(tables, parts, scan_shape=scan_shape, detector_shape=detector_shape)
    return [None if a is None else a.sums() for a in parts]
