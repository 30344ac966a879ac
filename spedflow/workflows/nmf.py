"""The NMF segmentation workflow (Bergh et al. 2020, Fig. 2), stage by stage.

Passes: (1) beam centres; (2) Poisson statistics of the aligned, beam-masked data;
(3) a streamed randomised SVD for the scree and the automatic rank; (4) an
out-of-core NMF, one pass per epoch. Then the small factor / loading arrays are
classified (crystal or background), merged by correlation and watershed-segmented.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
from scipy import sparse

from .. import cluster
from ..decompose import NMFParams, ResidualParams, ScreeParams
from ..errors import InputError
from ..preprocess import PreprocessParams
from ..segment import NMFMergeParams, WatershedParams
from ._cache import StageCache
from ._common import (Plan, Timer, annular_image, assemble, beam_stage, binned, count_unit,
                      dark_level, dose_normalisation, known_counts, note_detector_binning,
                      resolved_bad_pixels, run_blocks, total, with_bad_pixels,
                      with_detector_binning, write_result)

log = logging.getLogger("spedflow")

__all__ = ["NMFConfig", "run_nmf"]


@dataclass(frozen=True)
class NMFConfig:
    """All parameters of the NMF workflow; each section is one stage's dataclass."""

    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    scree: ScreeParams = field(default_factory=ScreeParams)
    nmf: NMFParams = field(default_factory=NMFParams)
    # weak crystals below the global noise edge: a search of the NMF residual
    residual: ResidualParams = field(default_factory=ResidualParams)
    merge: NMFMergeParams = field(default_factory=NMFMergeParams)
    # loading maps: segments must stand out of the map's noise (see WatershedParams.min_snr)
    watershed: WatershedParams = field(default_factory=lambda: WatershedParams(min_snr=10.0))


#: NMFParams fields used only to judge the components (set aside as background or noise).
_JUDGING = ("min_spot_fraction", "max_coverage", "crystal_spot_fraction", "min_coherence")


def run_nmf(plan: Plan, cfg: NMFConfig, cache: StageCache) -> Path:
    from ..decompose import (beam_mask, choose_n_components, classify_components, edge_mask,
                             loading_coverage, nmf, scree, spatial_coherence, undo_normalisation)
    from ..decompose._scree import min_block_rows
    from ..errors import ParameterError
    from ..preprocess import lazy as pre
    from ..preprocess import resolve as resolve_pre
    from ..segment import merge_components, segments_from_labels, watershed_stack

    timer = Timer()
    as_read = plan  # the clipping test reads values as stored (before line gains)
    plan = with_bad_pixels(plan, cfg.preprocess, cache)
    plan = with_detector_binning(plan, cfg.preprocess)
    cluster.ready()  # the bad-pixel sample ran while a local cluster started
    beam = beam_stage(plan, cfg.preprocess, cache, timer)
    r = beam.radius
    note_detector_binning(plan, r)
    prep = resolve_pre(cfg.preprocess, r)
    data = binned(plan, prep)
    ny, nx, ky, kx = data.shape
    dark = dark_level(plan, prep, cache, cfg.nmf.dark_level)
    if dark > 0:
        log.info("NMF: a dark level of %.3g units subtracted from every reading", dark)
        data = data.astype(np.float32) - np.float32(dark)
    # counts cannot be negative: clip before the Poisson statistics (a dark-subtracted
    # camera's patterns can hold small negative values)
    aligned = pre.align(data, beam.used).map_blocks(np.maximum, 0, dtype=np.float32)
    mask = beam_mask((ky, kx), cfg.nmf.beam_mask_radius, beam_radius=r)
    # the decomposition also leaves out the detector's edge where alignment shifted the
    # zero fill in for more than a few patterns (a band that moves with the descan would
    # take components of its own); the Poisson statistics keep the beam mask only, the
    # key live mode computes them under (their row sums then include the band's counts)
    edge = edge_mask((ky, kx), beam.used) & ~mask
    cut = mask | edge
    n_pix = int((~cut).sum())
    _check_edge(edge, mask, n_pix, beam.used, (ky, kx))
    if cfg.nmf.n_components is not None and cfg.nmf.n_components > min(ny * nx, n_pix):
        raise ParameterError(f"`n_components` ({cfg.nmf.n_components}) exceeds what the data allows: "
                             f"min(patterns {ny * nx}, unmasked pixels {n_pix})")

    st_stats = poisson_stage_of(cache, beam, prep, mask, dark)
    if not st_stats.complete:
        with timer("poisson"):
            paths = run_blocks(st_stats, aligned, poisson_block, label="Poisson statistics",
                               n_patterns=ny * nx, mask=mask)
            st_stats.save("row_sums", assemble(paths, "row_sums", (ny, nx), aligned.chunks[:2]))
            st_stats.save("col_sums", total(paths, "col_sums"))
            st_stats.save_attrs(n_negative=int(total(paths, "n_negative")))
            st_stats.mark_complete()
    # the camera's units per count: the normalised matrix is then in counts (unit noise
    # variance) whatever the units, and so are the NMF's start and the residual's limit
    unit = count_unit(plan, cache, given=cfg.nmf.gain)
    stats = _load_stats(st_stats)._replace(unit=unit)
    if dark > 0 and not np.any(stats.row_sums > 0):
        binned_note = (" of the binned patterns" if prep.nav_binning > 1 or plan.detector_binning > 1
                       else "")
        raise InputError(f"nothing is left of the data once the dark level ({dark:.4g} units per "
                         f"reading{binned_note}) is "
                         f"subtracted: every reading is at or below it; lower nmf.dark_level "
                         f"(or leave it unset to measure it)")

    # The normalised matrix is read once per SVD pass and once per NMF epoch: write it
    # to the cache once, as (Y, X, P) blocks aligned with the data's chunks, so later
    # passes only read and decompress. The decompositions see its rows block by block
    # (block-major order); `order` maps those rows back to raster order.
    st_matrix = cache.stage("matrix", st_stats.key, edge, *([{"unit": unit}] if unit != 1 else []))
    target = st_matrix.path / "matrix.zarr"
    if not st_matrix.complete:
        with timer("matrix"):
            blocks3 = _normalised_blocks(aligned, stats, cut)
            import zarr
            from ..io import create_array
            z = create_array(zarr.open_group(str(target), mode="w"), "x", blocks3.shape,
                             np.float32, chunks=tuple(c[0] for c in blocks3.chunks))
            cluster.store(blocks3, z, label="normalise", n_patterns=ny * nx)
            st_matrix.mark_complete()
    matrix, order = _block_major(target)
    # Scree and NMF make many passes over the matrix: where it fits comfortably in the
    # memory of the machine (or of the cluster's workers), hold it there, in large
    # chunks, instead of re-reading it from disk on every pass.
    if matrix.nbytes <= cluster.memory_budget(0.25):
        # chunks small against one worker: each pass of the scree makes a centred, a
        # sign-flipped and float64 copies of its chunk, ~10x the chunk (128 MB chunks
        # peaked at 2.5 GB in-process on a 64 x 64 scan, 32 MB chunks at 1.2 GB)
        chunk_bytes = min(32 * 2**20, cluster.worker_memory()[1] // 16)
        rows = max(1, int(chunk_bytes // (4 * matrix.shape[1])))
        # but rows enough for the scree's products not to outgrow their block (on a
        # large detector 32 MB is a few patterns; the scree would rechunk every pass)
        rows = max(rows, min_block_rows(cfg.scree.n_components + cfg.scree.n_oversamples))
        (matrix,) = cluster.persist_with_progress(matrix.rechunk({0: rows}), label="load matrix",
                                                  n_patterns=ny * nx)
        log.info("the normalised matrix (%.0f MB) is held in memory", matrix.nbytes / 2**20)
    st_scree = cache.stage("scree", st_matrix.key, dataclasses.asdict(cfg.scree))
    if not st_scree.complete:
        with timer("scree"):
            k = min(cfg.scree.n_components, min(matrix.shape) - 1)
            sc = scree(matrix, k, n_power_iter=cfg.scree.n_power_iter,
                       n_oversamples=cfg.scree.n_oversamples, seed=cfg.scree.seed,
                       noise_draws=cfg.scree.noise_draws)
            st_scree.save("evr", sc.explained_variance_ratio)
            st_scree.save("singular_values", sc.singular_values)
            st_scree.save_attrs(total_variance=sc.total_variance, shape=list(sc.shape),
                                noise_edge=sc.noise_edge, noise_edges=list(sc.noise_edges))
            st_scree.mark_complete()
    evr = st_scree.load("evr")
    if cfg.nmf.n_components is None:
        sa = st_scree.attrs()
        n_svd, why = choose_n_components(evr, noise_edge=sa.get("noise_edge"), shape=tuple(sa["shape"]),
                                         max_components=cfg.nmf.max_components)
        n_comp = min(cfg.nmf.max_components, int(np.ceil(n_svd * (1 + cfg.nmf.extra_components))),
                     min(matrix.shape))
        why = f"{why}; NMF gets {n_comp} (extra_components = {cfg.nmf.extra_components:.2f})"
        if n_svd >= min(cfg.nmf.max_components, evr.size):  # the rank is a limit, not measured
            log.warning("the scree's signal reaches its limit (%d components; nmf.max_components = "
                        "%d, scree.n_components = %d): the scan may hold more crystals than NMF "
                        "gets components, and one component then models parts of several; "
                        "raise both (e.g. --set nmf.max_components=%d --set scree.n_components=%d)",
                        n_svd, cfg.nmf.max_components, cfg.scree.n_components,
                        2 * cfg.nmf.max_components,
                        max(2 * cfg.scree.n_components, 2 * cfg.nmf.max_components + 10))
    else:
        n_comp, why = int(cfg.nmf.n_components), "set by the user"
    log.info("NMF with %d components (%s)", n_comp, why)

    # the thresholds that judge the components after the factorisation are not part of
    # its key: changing one re-runs the judging (every run does), not the NMF
    # (the dark level subtracted is in the Poisson statistics' key, which the matrix's
    # holds; so is the count unit, given or measured)
    factorisation = {k: v for k, v in dataclasses.asdict(cfg.nmf).items()
                     if k not in _JUDGING and k not in ("dark_level", "gain", "normalize")}
    st_nmf = cache.stage("nmf", st_matrix.key, factorisation, n_comp)
    if not st_nmf.complete:
        with timer("nmf"):
            h, w, info = nmf(matrix, n_comp, cfg.nmf)
            if isinstance(w, da.Array):
                (w,) = cluster.compute(w, label="NMF loadings")
            st_nmf.save("factors", np.asarray(h, np.float32))
            st_nmf.save("loadings", np.asarray(w, np.float32))
            st_nmf.save_attrs(info=info)
            st_nmf.mark_complete()
    h, w = st_nmf.load("factors"), st_nmf.load("loadings")
    w_raster = np.empty_like(w)
    w_raster[order] = w
    nmf_info = st_nmf.attrs().get("info", {})
    n_global = len(h)
    residual_info = {"enabled": cfg.residual.enabled}
    if cfg.residual.enabled:
        # the screen's count threshold is in counts; the model times its scales, in data units
        st_res = cache.stage("residual", st_nmf.key, dataclasses.asdict(cfg.residual))
        if not st_res.complete:
            with timer("residual"):
                h2, w2, sel, h2s, residual_info = residual_search(target, h, w_raster, stats, cut,
                                                                  cfg.residual, (ny, nx), unit)
                st_res.save("factors", np.asarray(h2, np.float32))
                st_res.save("loadings", np.asarray(w2, np.float32))
                st_res.save("pixels", np.asarray(sel, np.int64))
                st_res.save("kept_factors", np.asarray(h2s, np.float32))
                st_res.save_attrs(info=residual_info)
                st_res.mark_complete()
        h2, w2 = st_res.load("factors"), st_res.load("loadings")
        res_sel, res_h2s = st_res.load("pixels"), st_res.load("kept_factors")
        residual_info = st_res.attrs().get("info", {})
        h_global = h
        if len(h2):
            h = np.concatenate([h, h2], axis=0)
            w_raster = np.concatenate([w_raster, w2], axis=1)
        log.info("residual search: %d new components (%s)", len(h2), residual_info.get("why", ""))
    factors, loadings = undo_normalisation(h, w_raster, stats, cut)
    factors = factors.reshape(-1, ky, kx)
    loadings = loadings.reshape(-1, ny, nx)
    # a beam current that varied during the scan scales each pattern's loadings with it
    # (only with a gain given or measured: count_unit's fallback of 1 is no noise scale)
    gain, read_var = known_counts(plan, cache, given=cfg.nmf.gain)
    dose, spread, normalised = dose_normalisation(beam, cfg.nmf.normalize, as_read, cache,
                                                  gain=gain,
                                                  read_var=read_var * prep.nav_binning ** 2,
                                                  dark=dark,
                                                  what="loading maps", param="nmf.normalize")
    data_loadings = loadings  # in the data's units, as the normalised matrix holds them
    if normalised:
        loadings = loadings / dose.astype(loadings.dtype)[None]

    with timer("classify"):
        verdicts = classify_components(factors, loadings, beam_radius=r, mask=cut,
                                       min_spot_fraction=cfg.nmf.min_spot_fraction,
                                       max_coverage=cfg.nmf.max_coverage,
                                       crystal_spot_fraction=cfg.nmf.crystal_spot_fraction)
        keep = np.array([v[0] for v in verdicts], bool)
        reasons = [v[1] for v in verdicts]
        _warn_of_large_crystals(reasons, cfg)
        # a component present at fewer positions than the smallest crystal the
        # watershed keeps is noise fitted by a spare component, not a crystal
        support = np.rint(loading_coverage(loadings, 0.1) * loadings[0].size).astype(int)
        for i in np.flatnonzero(keep & (support < cfg.watershed.min_size)):
            keep[i] = False
            reasons[i] = (f"present (above its pedestal) at {int(support[i])} positions, fewer "
                          f"than the smallest crystal (watershed.min_size = {cfg.watershed.min_size})")
        # a crystal spans neighbouring positions; a spare component fitted to counting
        # noise lights scattered ones
        judged = np.flatnonzero(keep) if cfg.nmf.min_coherence > 0 else np.zeros(0, int)
        for i, c in zip(judged, spatial_coherence(loadings[judged])):  # the kept ones only
            if c < cfg.nmf.min_coherence:
                keep[i] = False
                reasons[i] = (f"loading map mostly pixel-to-pixel noise (spatial coherence "
                              f"{c:.2f} < nmf.min_coherence = {cfg.nmf.min_coherence:g}): "
                              f"noise fitted by a spare component, not a crystal")
        # a residual component lying where a kept global crystal is and on its spots, or
        # whose pattern is that crystal's, is a correction of that crystal's model
        # (shape, thickness), not another crystal: kept, it would duplicate its segment
        if len(factors) > n_global and keep[:n_global].any():
            _set_aside_corrections(keep, reasons, n_global, h_global, w_raster, res_sel, res_h2s,
                                   loadings, cfg.watershed)
            from ..segment._merge import correlation_matrix
            fp = factors.reshape(len(factors), -1)[:, ~cut.ravel()]
            corr = correlation_matrix(fp)
            glob_kept = np.flatnonzero(keep[:n_global])
            for i in range(n_global, len(factors)):
                if keep[i]:
                    j = glob_kept[np.argmax(corr[i, glob_kept])]
                    if corr[i, j] > cfg.merge.pattern_threshold:
                        keep[i] = False
                        reasons[i] = (f"residual component with the pattern of component {int(j)} "
                                      f"(correlation {corr[i, j]:.2f} > merge.pattern_threshold): a "
                                      f"correction of that crystal, not another one")
    set_aside = [{"component": int(i), "reason": reasons[i]} for i in np.flatnonzero(~keep)]
    log.info("%d of %d components kept as crystals", int(keep.sum()), len(keep))

    with timer("merge"):
        if keep.any():
            mf, ml, groups = merge_components(factors[keep], loadings[keep],
                                              pattern_threshold=cfg.merge.pattern_threshold,
                                              loading_threshold=cfg.merge.loading_threshold,
                                              pattern_mask=~cut)
            if cfg.merge.spot_match > 0 and len(groups) > 1:
                mf, ml, groups = _join_by_spots(factors[keep], loadings[keep], groups, cut, mask, r,
                                                cfg.merge)
        else:
            mf, ml, groups = np.zeros((0, ky, kx), np.float32), np.zeros((0, ny, nx), np.float32), []
    kept_index = np.flatnonzero(keep)
    groups_orig = [[int(kept_index[i]) for i in g] for g in groups]

    with timer("watershed"):
        if len(ml):
            labels = watershed_stack(da.from_array(ml.astype(np.float32), chunks=(1, ny, nx)),
                                     cfg.watershed)
            (labels,) = cluster.compute(labels, label="watershed")
            seg_maps, source = segments_from_labels(ml, labels)
        else:
            labels = np.zeros((0, ny, nx), np.int32)
            seg_maps, source = np.zeros((0, ny, nx), np.float32), np.zeros(0, int)
    seg_patterns = mf[source] if len(source) else np.zeros((0, ky, kx), np.float32)
    n_seg = len(seg_maps)
    if n_seg > 2:  # the parts of a component spanning crystals (a shared thickness band)
        from ..segment._orientation import drop_spanning_parts
        kept = np.flatnonzero(drop_spanning_parts(
            seg_maps, source, seg_patterns, mask=cut, radius=r,
            min_g=2 * float(np.sqrt(mask.sum() / np.pi)),
            containment=cfg.merge.fold_containment, match=cfg.merge.spot_match))
        for i in np.setdiff1d(np.arange(n_seg), kept):  # their regions leave the labels too
            labels[source[i]][seg_maps[i] > 0] = 0
        seg_maps, seg_patterns, source = seg_maps[kept], seg_patterns[kept], source[kept]
        if len(kept) < n_seg:
            log.info("%d segments dropped: parts of a component that spans several crystals, "
                     "each inside one's segment (merge.fold_containment)", n_seg - len(kept))
    n_dup = 0
    if len(seg_maps) > 1 and cfg.merge.fold_containment <= 1:  # cross-talk parts on other crystals
        seg_maps, seg_patterns, source, n_dup = _drop_duplicates(
            seg_maps, seg_patterns, source, labels, matrix, order, stats, cut, mask, r, cfg,
            factors[keep], data_loadings[keep], groups)  # compared with the data's means
    n_cut = 0
    if len(seg_maps) and cfg.merge.overlap_contrast > 0:  # crystals of one orientation overlapping
        from ..segment._overlap import note_cuts, split_overlaps
        seg_maps, origin = split_overlaps(seg_maps, cfg.merge.overlap_contrast)
        n_cut = len(origin) - len(seg_patterns)
        note_cuts(n_cut)
        seg_patterns, source = seg_patterns[origin], np.asarray(source)[origin]
    log.info("%d segments", len(seg_maps))
    if not len(seg_maps):  # say why, not only "wrote"
        from ..decompose._background import SUPPORT_REASON
        spotty = [d["component"] for d in set_aside if d["reason"].startswith(SUPPORT_REASON)]
        log.warning("no crystal found: %s", (
            "every NMF component was set aside (`spedflow report` of the result lists each one's "
            "reason)" + (f"; component {spotty[0]} has sharp spots but covers more than "
                         f"nmf.max_coverage = {cfg.nmf.max_coverage:.2f} of the scan: if one crystal "
                         f"fills most of the scan, raise it (e.g. --set nmf.max_coverage=0.9)"
                         if spotty else "")) if not keep.any() else
                    "no loading map held a region of at least watershed.min_size = "
                    f"{cfg.watershed.min_size} scan positions")

    arrays = {
        "segments/maps": seg_maps.astype(np.float32),
        "segments/patterns": np.asarray(seg_patterns, np.float32),
        "segments/component": np.asarray(source, np.int32),
        "nmf/factors": factors.astype(np.float32),
        "nmf/loadings": loadings.astype(np.float32),
        "nmf/merged_factors": np.asarray(mf, np.float32),
        "nmf/merged_loadings": np.asarray(ml, np.float32),
        "nmf/labels": labels.astype(np.int32),
        "nmf/beam_mask": mask,
        "nmf/edge_mask": edge,
        "scree/explained_variance_ratio": evr.astype(np.float64),
        "beam/centres": beam.measured.astype(np.float32),
        "beam/fitted": beam.used.astype(np.float32),
        "overview/annular_vdf": annular_image(beam.profiles, 2 * r, beam.profiles.shape[-1]),
        "overview/total_counts": beam.totals.astype(np.float32),
        "overview/mean_pattern": beam.mean_pattern,
    }
    attrs = {
        "n_components": n_comp, "n_components_reason": why,
        "components_kept": [int(i) for i in kept_index],
        "components_set_aside": set_aside, "merge_groups": groups_orig,
        "nmf_info": nmf_info, "residual_search": residual_info,
        "residual_components": list(range(n_global, len(factors))),
        "resolved": {"beam_radius": r, "preprocess": dataclasses.asdict(prep),
                     "bad_pixels": resolved_bad_pixels(plan),
                     "line_gains": plan.identity.get("line_gains", {}),
                     "beam_mask_radius": float(np.sqrt(mask.sum() / np.pi)),
                     # data units per detector count the normalisation took out: nmf.gain,
                     # or measured (1 where these data cannot tell it: taken as counts)
                     "count_unit": unit,
                     "dose_spread": spread if np.isfinite(spread) else None,
                     "nmf_dose_normalized": normalised,
                     # per raw pattern and pixel, as the parameter (binning adds it up)
                     "dark_level": dark / prep.nav_binning ** 2 / plan.detector_binning ** 2},
        "descan": beam.descan,
        "counts": {"patterns": int(ny * nx), "components": n_comp, "kept": int(keep.sum()),
                   "residual_components": int(len(factors) - n_global),
                   "merged": int(len(mf)),
                   "spanning_parts_dropped": int(n_seg - (len(seg_maps) - n_cut) - n_dup),
                   "duplicates_dropped": int(n_dup), "overlaps_cut": int(n_cut),
                   "segments": int(len(seg_maps))},
    }
    return write_result(plan, "nmf", cfg, arrays, attrs, timer)


def _drop_duplicates(seg_maps, seg_patterns, source, labels, matrix, order, stats, cut, mask, r, cfg,
                     factors, loadings, groups):
    """Drop segments whose area shows no crystal beyond the other components' segments
    covering it (:func:`spedflow.segment._orientation.drop_duplicate_segments`), from
    the data's mean patterns over regions (one pass over the normalised matrix, summing
    the positions covered by each combination of segments)."""
    from ..decompose import scale_factors
    from ..segment._orientation import covered_by_others, drop_duplicate_segments
    n = len(seg_maps)
    sup = seg_maps.reshape(n, -1) > 0
    # a segment can only be dropped when others' segments cover it: skip the pass if none is
    if not covered_by_others(seg_maps, source, cfg.merge.fold_containment).any():
        return seg_maps, seg_patterns, source, 0
    a, b = scale_factors(stats)
    region_pattern = region_means(matrix, order, np.asarray(a, np.float64).ravel(),
                                  np.asarray(b, np.float64)[~cut], cut, sup)
    keep, notes = drop_duplicate_segments(
        seg_maps, source, region_pattern, factors, loadings, groups, mask=cut, radius=r,
        min_g=2 * float(np.sqrt(mask.sum() / np.pi)), containment=cfg.merge.fold_containment,
        min_size=cfg.watershed.min_size)
    for s, containers, n_own, shown, dropped in notes:
        log.debug("segment %d (component group %d, %d positions) inside segments %s: its area "
                  "shows %.2f of the intensity the model gives its %d own reflections%s", s,
                  int(source[s]), int(sup[s].sum()), containers, shown, n_own,
                  ": dropped (cross-talk)" if dropped else "")
        if dropped:  # their regions leave the labels too
            labels[source[s]][seg_maps[s] > 0] = 0
    kept = np.flatnonzero(keep)
    if len(kept) < n:
        log.info("%d segments dropped: a component's weak part on other components' crystals, "
                 "where the data do not show its own reflections (cross-talk of the factorisation)",
                 n - len(kept))
    return seg_maps[kept], seg_patterns[kept], source[kept], n - len(kept)


def region_means(matrix, order: np.ndarray, row_scale: np.ndarray, col_scale: np.ndarray,
                 cut: np.ndarray, sup: np.ndarray):
    """The data's mean pattern over unions of segments, from one pass over the matrix.

    ``matrix`` (N, P) dask array of rows ``order`` (raster indices) holds the patterns'
    pixels outside ``cut`` divided by ``row_scale`` (per raster position) and
    ``col_scale`` (per kept pixel); ``sup`` (S, N) the segments' supports over the
    raster. The positions are grouped by which segments cover them (an "atom" per
    pattern of cover) and each atom's rows summed, in a tree of tasks no larger than
    two blocks' sums. Returns ``region_pattern(region)``: the (ky, kx) mean, 0 on
    ``cut``, over the covered positions of a (N,) bool region (a union of segments).
    """
    import dask
    covered = sup.any(axis=0)
    atom = np.full(sup.shape[1], -1, np.int64)
    _, atom[covered] = np.unique(sup[:, covered].T, axis=0, return_inverse=True)
    n_atoms = int(atom.max()) + 1
    atom_b, a_b = atom[order], row_scale[order]  # block-major, as the matrix's rows

    def sums(block, k0):  # per atom, the sum of its rows (times their scales)
        ids, w = atom_b[k0:k0 + block.shape[0]], a_b[k0:k0 + block.shape[0]]
        on = np.flatnonzero(ids >= 0)
        pick = sparse.csr_matrix((w[on], (ids[on], on)), shape=(n_atoms, block.shape[0]))
        return np.asarray(pick @ np.asarray(block, np.float64))

    if len(matrix.chunks[1]) > 1:  # whole rows per block
        matrix = matrix.rechunk({1: -1})
    starts = np.concatenate([[0], np.cumsum(matrix.chunks[0])[:-1]])
    parts = [dask.delayed(sums)(blk, int(k0)) for blk, k0 in zip(matrix.to_delayed().ravel(), starts)]
    while len(parts) > 1:
        parts = [dask.delayed(np.add)(*parts[i:i + 2]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    (tot,) = cluster.compute(parts[0], label="segment patterns", n_patterns=int(sup.shape[1]))
    tot = np.asarray(tot) * col_scale[None]
    count = np.bincount(atom[covered], minlength=n_atoms)

    def region_pattern(region):
        ids = np.unique(atom[region & covered])
        out = np.zeros(cut.shape)
        out[~cut] = tot[ids].sum(axis=0) / max(int(count[ids].sum()), 1)
        return out

    return region_pattern


def _join_by_spots(factors, loadings, groups, cut, mask, r, params):
    """Join merge groups of one crystal by their spot positions
    (:func:`spedflow.segment._orientation.orientation_links`), summed as
    :func:`~spedflow.segment.merge_components` sums its groups."""
    from ..segment._merge import summed_groups
    from ..segment._orientation import join_groups, orientation_links
    links, match = orientation_links(
        factors, loadings, mask=cut, radius=r, min_g=2 * float(np.sqrt(mask.sum() / np.pi)),
        spot_threshold=params.spot_match, support_level=params.support_level,
        nested_cover=params.on_top_cover, nested_gain=params.on_top_gain,
        lattice_significance=params.lattice_significance)
    joined = join_groups(groups, links, match, params.spot_guard)
    if len(joined) < len(groups):
        log.info("%d merge groups joined into %d by their spot positions", len(groups), len(joined))
    return summed_groups(factors, loadings, joined)


#: Fewest detector pixels NMF is run on (left by the beam mask and the edge band).
_MIN_PIXELS = 64


def _check_edge(edge, mask, n_pix, centres, shape) -> None:
    """Say how much of the detector the edge band takes (:func:`~spedflow.decompose.edge_mask`);
    refuse, in one line, a run it leaves too few pixels for."""
    from ..decompose._poisson import EDGE_FRACTION
    ky, kx = shape
    c = np.asarray(centres, np.float64).reshape(-1, 2)
    span = np.nanpercentile(c, [1, 99], axis=0) - np.array([ky // 2, kx // 2])
    where = (f"beam centres {span[0, 0]:+.1f} to {span[1, 0]:+.1f} px (ky), {span[0, 1]:+.1f} "
             f"to {span[1, 1]:+.1f} px (kx) from the detector centre")
    if n_pix < _MIN_PIXELS:
        beam, edges = int(mask.sum()), int(edge.sum())
        if beam >= edges:
            fix = ("lower nmf.beam_mask_radius, or use a larger detector" if ky * kx > 2 * _MIN_PIXELS
                   else f"the {ky} x {kx} px detector is too small for NMF")
        else:
            fix = ("check the beam centres (a beam stop or an empty pattern taken for the beam?), "
                   "or run with preprocess.align = false")
        raise InputError(
            f"NMF would have only {n_pix} of the {ky * kx} detector pixels (it needs {_MIN_PIXELS}): "
            f"the beam mask (nmf.beam_mask_radius) takes {beam}, and {edges} at the edges are "
            f"shifted off the detector by the alignment in more than {100 * EDGE_FRACTION:.0f}% of "
            f"the patterns ({where}); {fix}")
    if edge.any():
        share = edge.sum() / edge.size
        (log.warning if share > 0.25 else log.info)(
            "NMF leaves out %d detector pixels (%.0f%%) at the edges, off the detector after "
            "alignment in more than %.0f%% of the patterns (%s)", int(edge.sum()), 100 * share,
            100 * EDGE_FRACTION, where)


def _set_aside_corrections(keep, reasons, n_global, h, w_raster, sel, h2s, host_maps, params):
    """Set aside residual components that correct a kept global crystal (in place).

    A residual component lying where a kept crystal's segments are *and* on that
    crystal's spots (:func:`spedflow.decompose._residual.is_correction`) is a misfit of
    its model, which the crystal's own segment already covers; kept, it would duplicate
    the segment. Where the host is, is where the watershed (``params``) of its loading
    map ``host_maps[e]`` puts segments: a global component can also reach, weaker, over
    a second crystal that shares some of its spots (one of similar orientation) without
    a segment there, and a residual component that is that second crystal is kept.
    Normalised units: ``w_raster`` (N, E + k) all loadings, ``h`` (E, P) the global
    factors, ``sel`` the kept pixels, ``h2s`` (k, P') the new patterns on them.
    """
    from ..decompose import _residual as R
    from ..segment import watershed_image
    glob_kept = np.flatnonzero(keep[:n_global])
    where = {int(e): (watershed_image(host_maps[e], params) > 0).ravel() for e in glob_kept}
    for i in range(n_global, len(keep)):
        if not keep[i]:
            continue
        j = i - n_global
        for e in glob_kept:
            fit, overlap, spots = R.is_correction(w_raster[:, i], h2s[j], w_raster[:, e] * where[int(e)],
                                                  h[e, sel] / max(float(h[e].max()), 1e-12))
            if fit:
                keep[i] = False
                reasons[i] = (f"residual component lying where component {int(e)}'s segments are "
                              f"({overlap:.0%} of its positions) and on its spots ({spots:.0%} of its pattern): a "
                              f"correction of that crystal, not another one")
                break


def residual_search(path, h, w_raster, stats, mask, params, scan_shape, unit=1.0):
    """New components from the NMF residual (see :mod:`spedflow.decompose._residual`).

    Three passes over the stored normalised matrix: the pixel screen, the residual on
    the kept pixels, the new components' full patterns. ``unit``: data units per
    detector count (the matrix undone by its scales is in data units;
    ``params.min_counts`` is in counts). Returns normalised factors (k, P), raster
    loadings (N, k) and a dict describing the search.
    """
    import dask
    import zarr
    from ..decompose import scale_factors
    from ..decompose import _residual as R

    ny, nx = scan_shape
    z = zarr.open_array(str(path), path="x", mode="r")
    p = z.shape[-1]
    a, b = scale_factors(stats)
    b = b[~mask]
    e = h.shape[0]
    w3 = w_raster.reshape(ny, nx, e)
    a2d = np.asarray(a).reshape(ny, nx)
    hw = params.window // 2
    cy, cx = z.chunks[:2]
    blocks = [(y0, min(y0 + cy, ny), x0, min(x0 + cx, nx))
              for y0 in range(0, ny, cy) for x0 in range(0, nx, cx)]
    # every task reads its own block of the matrix; it gets only its slice of the
    # per-position maps, and the factors as one shared key (not a copy per task)
    store = str(path)
    h_d, b_d = dask.delayed(h, pure=True), dask.delayed(b, pure=True)
    parts = [dask.delayed(_screen_task, pure=True)(
        store, blk, hw, _padded(w3, *blk, hw), h_d, _padded(a2d, *blk, hw), b_d,
        params.window, params.min_counts * unit) for blk in blocks]
    (scr,) = cluster.compute(dask.delayed(R.merge_screens)(*parts), label="residual screen",
                             n_patterns=ny * nx)
    c = scr["rr"] / scr["vv"] if scr["vv"] > 0 else 1.0
    zmax = scr["score"] / np.sqrt(max(c, _TINY_C))
    thr = R.screen_threshold(ny * nx * p, params.alpha)
    sel = np.flatnonzero(zmax > thr)
    # the sub-matrix (positions x kept pixels) is held on the client: keep the most
    # significant pixels within a fixed budget (a weak crystal needs tens of them)
    cap = int(min(params.max_pixels, max(2, _SUBMATRIX_BYTES // (4 * ny * nx))))
    if len(sel) > cap:
        sel = np.sort(sel[np.argsort(zmax[sel])[::-1][:cap]])
    info = {"noise_factor": float(c), "count_unit": float(unit), "threshold": thr,
            "n_pixels": int(len(sel)),
            "pixel_cap": cap, "max_z": float(np.max(zmax)) if zmax.size else 0.0}
    empty = (np.zeros((0, p), np.float32), np.zeros((ny * nx, 0), np.float32),
             np.asarray(sel, np.int64), np.zeros((0, len(sel)), np.float32))
    if len(sel) < 2:
        info["why"] = f"{len(sel)} pixels above z = {thr:.2f}"
        return (*empty, info)

    parts = cluster.compute(*[dask.delayed(_rows_task, pure=True)(
        store, blk, w3[blk[0]:blk[1], blk[2]:blk[3]], h_d, sel) for blk in blocks],
        label="residual rows", n_patterns=ny * nx)
    # N x P' float32 held in memory, at most _SUBMATRIX_BYTES: the rank test, the HALS
    # and the loadings' noise need all of it at once. Keeping more pixels on very large
    # scans would need a streamed (randomised) SVD and block-wise HALS updates, which
    # this code does not do.
    rs = np.zeros((ny, nx, len(sel)), np.float32)
    for (y0, y1, x0, x1), part in zip(blocks, parts):
        rs[y0:y1, x0:x1] = part.reshape(y1 - y0, x1 - x0, -1)
    rs = rs.reshape(ny * nx, len(sel))
    from scipy import ndimage
    pix = np.flatnonzero(~mask.ravel())[sel]
    on = np.zeros(mask.size, bool)
    on[pix] = True
    clusters = ndimage.label(on.reshape(mask.shape), structure=np.ones((3, 3)))[0].ravel()[pix]
    k, s, null = R.shift_null_rank(rs, (ny, nx), clusters, max_rank=params.max_components)
    info.update(rank=k, singular_values=[float(v) for v in s[:k + 3]], null_edge=null)
    if k == 0:
        info["why"] = (f"{len(sel)} pixels above z = {thr:.2f}; no singular value of their residual "
                       f"above the shifted-image null")
        return (*empty, info)
    w2, h2s = R.residual_nmf(rs, k)
    w2 = R.significant_loadings(rs, h2s, (ny, nx), params.window, params.alpha)
    w2, n_pieces, n_dropped = _friedel_pieces(rs, w2, h, w_raster, a, b, sel, c, pix, clusters,
                                              mask, (ny, nx), params)
    info.update(pieces=n_pieces, pieces_without_friedel_pair=n_dropped)
    alive = w2.any(axis=0)          # a component all of whose pieces failed is dropped
    k_rank, (w2, h2s, k) = k, (w2[:, alive], h2s[alive], int(alive.sum()))
    if not k:
        info["why"] = (f"{len(sel)} pixels above z = {thr:.2f}; {k_rank} residual components, none with "
                       f"a significant loading showing a Friedel pair")
        return (*empty, info)
    w2_3 = w2.reshape(ny, nx, k)

    a2 = cluster.compute(dask.delayed(sum)([dask.delayed(_patterns_task, pure=True)(
        store, blk, w3[blk[0]:blk[1], blk[2]:blk[3]], h_d, w2_3[blk[0]:blk[1], blk[2]:blk[3]])
        for blk in blocks]), label="residual patterns", n_patterns=ny * nx)[0]
    h0 = np.zeros((k, p))
    h0[:, sel] = h2s
    h2 = R.fit_patterns(a2, w2.T @ w2, h0)
    info["why"] = (f"{len(sel)} pixels above z = {thr:.2f}, {k_rank} residual components above the "
                   f"shifted-image null, {k} with a piece showing a Friedel pair")
    return (h2.astype(np.float32), w2.astype(np.float32), np.asarray(sel, np.int64),
            h2s.astype(np.float32), info)


def _padded(arr, y0, y1, x0, x1, halo):
    """``arr[y0 - halo:y1 + halo, x0 - halo:x1 + halo]``, zero outside the scan."""
    ny, nx = arr.shape[:2]
    lo_y, lo_x = max(y0 - halo, 0), max(x0 - halo, 0)
    hi_y, hi_x = min(y1 + halo, ny), min(x1 + halo, nx)
    part = np.asarray(arr[lo_y:hi_y, lo_x:hi_x])
    pad = ((lo_y - (y0 - halo), (y1 + halo) - hi_y), (lo_x - (x0 - halo), (x1 + halo) - hi_x))
    return np.pad(part, pad + ((0, 0),) * (part.ndim - 2))


def _matrix(store):
    import zarr
    return zarr.open_array(store, path="x", mode="r")


def _screen_task(store, blk, halo, w_pad, h, a_pad, b, window, min_counts):
    from ..decompose import _residual as R
    return R.residual_screen_block(_padded(_matrix(store), *blk, halo), w_pad, h, a_pad, b,
                                   window=window, min_counts=min_counts)


def _rows_task(store, blk, w_blk, h, sel):
    from ..decompose import _residual as R
    y0, y1, x0, x1 = blk
    return R.residual_rows_block(_matrix(store)[y0:y1, x0:x1], w_blk, h, sel)


def _patterns_task(store, blk, w_blk, h, w2_blk):
    from ..decompose import _residual as R
    y0, y1, x0, x1 = blk
    return R.residual_patterns_block(_matrix(store)[y0:y1, x0:x1], w_blk, h, w2_blk)


def _friedel_pieces(rs, w2, h, w_raster, a, b, sel, c, pix, clusters, mask, scan_shape, params):
    """Zero the pieces of the new loadings that show no Friedel pair of significant spots.

    Every connected piece (8-connectivity) of a component's significant loading
    would seed its own segment, so each must stand on its own: its residual summed
    over its positions, per cluster of kept pixels, z-scored with the model's
    Poisson variance ``c (W H) / (a b)`` (computed here from the factors, on the
    piece's rows only), must hold a Friedel pair (:func:`has_friedel_pair`) at the
    Bonferroni level over clusters x pieces. Returns the loadings, the number of
    pieces and the number dropped.
    """
    from scipy import ndimage
    from ..decompose import _residual as R
    ny, nx = scan_shape
    ky, kx = mask.shape
    coords = np.stack(np.divmod(pix, kx), axis=1).astype(np.float64)
    centre = np.array([ky // 2, kx // 2], np.float64)  # where alignment put the beam
    pieces = []
    for j in range(w2.shape[1]):
        lab, n = ndimage.label(w2[:, j].reshape(ny, nx) > 0, structure=np.ones((3, 3), bool))
        pieces += [(j, np.flatnonzero(lab.ravel() == q)) for q in range(1, n + 1)]
    if not pieces:
        return w2, 0, 0
    zthr = R.screen_threshold(len(np.unique(clusters)) * len(pieces), params.alpha)
    a_flat, hs = np.asarray(a, np.float64).ravel(), np.asarray(h, np.float64)[:, sel]
    out, dropped = w2.copy(), 0
    for j, rows in pieces:
        model = np.maximum(np.asarray(w_raster, np.float64)[rows] @ hs, 0)
        ab = a_flat[rows, None] * b[sel]
        v = c * np.divide(model, ab, out=np.zeros_like(model), where=ab > 0)
        if not R.has_friedel_pair(rs[rows].sum(axis=0, dtype=np.float64), v.sum(axis=0), clusters,
                                  coords, centre, zthr, params.friedel_tolerance):
            out[rows, j] = 0
            dropped += 1
    return out, len(pieces), dropped


_TINY_C = 1e-12
#: Client memory for the residual sub-matrix (float32; the NMF of it makes float64
#: copies): 512 pixels up to 256 x 256 positions, 128 at 512 x 512, 32 at 1024 x 1024.
_SUBMATRIX_BYTES = 128 * 2**20


def poisson_stage_of(cache, beam, prep, mask, dark: float = 0.0):
    """The Poisson statistics' cache entry: keyed on the beam stage, the mask, the
    descan model the beam stage chose (with no beam seen the patterns are not aligned:
    ``finish_beam``; live mode, which aligns each chunk as it lands, keys on the model
    of a beam seen, "none") and the dark level subtracted (when there is one)."""
    return cache.stage("poisson", "v3", beam.key, dataclasses.asdict(prep), mask,
                       beam.descan.get("model"), *([{"dark_level": dark}] if dark else []))


def poisson_block(block, offset, *, mask):
    """Per-block Poisson statistics (row sums of this block, column sums, negatives)."""
    from ..decompose import poisson_partial
    st = poisson_partial(np.asarray(block), mask)
    return {"row_sums": np.asarray(st.row_sums, np.float64), "col_sums": np.asarray(st.col_sums, np.float64),
            "n_negative": np.asarray(st.n_negative)}


def _normalised_blocks(aligned: da.Array, stats, mask: np.ndarray) -> da.Array:
    """(Y, X, P) Poisson-normalised, masked patterns with regular nav chunks."""
    from ..decompose import normalise_block, scale_factors
    a, b = scale_factors(stats)
    keep = ~mask
    cy, cx = aligned.chunks[0][0], aligned.chunks[1][0]
    aligned = aligned.rechunk((cy, cx) + aligned.shape[2:])
    a_d = da.from_array(a.astype(np.float32), chunks=(cy, cx))
    n_pix = int(keep.sum())
    return da.map_blocks(normalise_block, aligned, a_d[:, :, None, None], b=b, keep=keep,
                         dtype=np.float32, drop_axis=3,
                         chunks=(aligned.chunks[0], aligned.chunks[1], (n_pix,)),
                         meta=np.empty((0, 0, 0), np.float32)).astype(np.float32)


def _block_major(path):
    """The stored (Y, X, P) matrix as (N, P) rows, block by block, and their raster index."""
    import zarr
    x = da.from_zarr(zarr.open_array(str(path), path="x", mode="r"))
    ny, nx, p = x.shape
    raster = np.arange(ny * nx).reshape(ny, nx)
    rows, order = [], []
    y0 = 0
    for i, cy in enumerate(x.chunks[0]):
        x0 = 0
        for j, cx in enumerate(x.chunks[1]):
            rows.append(x.blocks[i, j].reshape(cy * cx, p))
            order.append(raster[y0:y0 + cy, x0:x0 + cx].ravel())
            x0 += cx
        y0 += cy
    return da.concatenate(rows, axis=0), np.concatenate(order)


def _load_stats(stage):
    from ..decompose import PoissonStats
    a = stage.attrs()
    fields = {f: a[f] for f in PoissonStats._fields if f not in ("row_sums", "col_sums") and f in a}
    return PoissonStats(row_sums=stage.load("row_sums"), col_sums=stage.load("col_sums"), **fields)


def _warn_of_large_crystals(reasons, cfg) -> None:
    """Say when components with clear spots were set aside for their coverage
    (``nmf.max_coverage``). A component whose spots hold at least
    ``nmf.crystal_spot_fraction`` of its energy is kept however large; one with clear
    spots under that, over more than a third of the scan, may be a large crystal (or a
    pair of one orientation) with much of the film mixed in, and would be lost without
    a word."""
    from ..decompose._background import SUPPORT_REASON
    spotty = [i for i, why in enumerate(reasons) if why.startswith(SUPPORT_REASON)]
    if not spotty:
        return
    names = ", ".join(map(str, spotty))
    which = (f"components {names} have sharp spots but cover" if len(spotty) > 1 else
             f"component {names} has sharp spots but covers")
    log.warning("NMF %s more than nmf.max_coverage = %.2f of the scan and %s set aside as "
                "support; if crystals here are that large, run --method vdf (or raise "
                "nmf.max_coverage)", which, cfg.nmf.max_coverage,
                "were" if len(spotty) > 1 else "was")
