"""Figures of a segmentation result, after Bergh et al. 2020 (Figs. 3-6).

Each ``fig_*`` function takes NumPy arrays and returns a
:class:`matplotlib.figure.Figure` built without pyplot (no global state; the Agg
canvas is attached explicitly), so figures can be made from worker threads and
never pop up windows.

Conventions shared by all figures:

- patterns are shown with a power-law (gamma 0.5) intensity scale so weak
  reflections stay visible next to strong ones, and with axes in calibrated
  reciprocal units centred on the direct beam at ``(Ky//2, Kx//2)`` when the
  calibration is known;
- segment ``i`` has the same colour (:func:`segment_colours`) in every figure;
- maps carry a scale bar when the scan step is known.
"""

from __future__ import annotations

import colorsys
import io

import matplotlib

matplotlib.use("Agg", force=False)  # no display; harmless if a backend is already set

import numpy as np
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap, LogNorm, PowerNorm, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Patch, Rectangle

from ._load import Calibration, nice_length

__all__ = [
    "segment_colours", "fig_overview", "fig_scree", "fig_nmf_components", "fig_segments",
    "fig_vectors", "fig_beam", "fig_differences", "figure_png", "thumbnail_png",
]

GAMMA = 0.5
MAX_PANELS = 48      # segments/components drawn per grid figure
GRID_COLUMNS = 8
_OUTLINE = [patheffects.withStroke(linewidth=2.5, foreground="black")]


# --------------------------------------------------------------------------- helpers

def segment_colours(n: int) -> np.ndarray:
    """``(n, 4)`` RGBA colours, distinct and stable: segment ``i`` keeps its colour.

    tab10 then tab20 qualitative colours; beyond 20, hues spaced by the golden
    angle so neighbouring indices stay far apart.
    """
    from matplotlib import colormaps
    if n <= 10:
        return colormaps["tab10"](np.arange(n) % 10)
    if n <= 20:
        return colormaps["tab20"](np.arange(n))
    out = np.ones((n, 4))
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        out[i, :3] = colorsys.hsv_to_rgb(h, 0.75 if i % 2 else 0.95, 1.0 if i % 3 else 0.8)
    return out


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure, *, dpi: int = 100) -> bytes:
    """Render a figure to PNG bytes with the Agg canvas."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def thumbnail_png(pattern: np.ndarray, *, size: int = 64) -> bytes:
    """A small gamma-scaled PNG of one pattern (no axes), about ``size`` px wide."""
    from matplotlib import colormaps
    from matplotlib.image import imsave
    p = np.nan_to_num(np.asarray(pattern, np.float64))
    p = np.clip(p, 0, None)
    top = p.max()
    img = (p / top) ** GAMMA if top > 0 else p
    step = max(1, int(np.ceil(max(img.shape) / (2 * size))))  # keep files small
    img = img[::step, ::step]
    rgba = colormaps["magma"](img)
    rep = max(1, size // max(img.shape))
    if rep > 1:
        rgba = np.repeat(np.repeat(rgba, rep, 0), rep, 1)
    buf = io.BytesIO()
    imsave(buf, rgba, format="png")
    return buf.getvalue()


def _pattern_extent(shape, cal: Calibration):
    ky, kx = shape
    s = cal.k_scale or 1.0
    cy, cx = ky // 2, kx // 2
    return ((-cx - 0.5) * s, (kx - cx - 0.5) * s, (ky - cy - 0.5) * s, (-cy - 0.5) * s)


def _map_extent(shape, cal: Calibration):
    y, x = shape
    s = cal.scan_step or 1.0
    return (0, x * s, y * s, 0)


def _pattern_norm(p: np.ndarray) -> PowerNorm:
    finite = p[np.isfinite(p)]
    top = float(finite.max()) if finite.size else 1.0
    return PowerNorm(GAMMA, vmin=0.0, vmax=top if top > 0 else 1.0)


def _show_pattern(ax, p, cal: Calibration, *, cmap="magma", axes=True, colorbar=False):
    im = ax.imshow(p, cmap=cmap, norm=_pattern_norm(p), extent=_pattern_extent(p.shape, cal),
                   interpolation="nearest")
    if axes:
        ax.set_xlabel(f"k$_x$ ({_t(cal.k_label)})")
        ax.set_ylabel(f"k$_y$ ({_t(cal.k_label)})")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if colorbar:
        ax.figure.colorbar(im, ax=ax, shrink=0.8, label="intensity (gamma 0.5 scale)")
    return im


def _scalebar(ax, shape, cal: Calibration, *, colour="white"):
    """A 1-2-5 scale bar in the lower-left corner of a map drawn with _map_extent."""
    if not cal.scan_step:
        return
    y, x = shape
    width = x * cal.scan_step
    length = nice_length(width)
    height = y * cal.scan_step
    x0, y0 = 0.05 * width, 0.93 * height
    ax.add_patch(Rectangle((x0, y0), length, 0.025 * height, color=colour, lw=0))
    label = f"{length:g} {_t(cal.scan_units)}"
    ax.text(x0 + length / 2, y0 - 0.02 * height, label, color=colour, ha="center", va="bottom",
            fontsize=7, path_effects=_OUTLINE if colour == "white" else None)


def _map_axes(ax, shape, cal: Calibration, *, axes: bool):
    if axes:
        ax.set_xlabel(f"x ({_t(cal.scan_label)})")
        ax.set_ylabel(f"y ({_t(cal.scan_label)})")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        _scalebar(ax, shape, cal)


def _colour_cmap(colour) -> LinearSegmentedColormap:
    """Black to the segment's colour: a map reads as 'this segment', at a glance."""
    return LinearSegmentedColormap.from_list("seg", [(0, 0, 0), tuple(colour[:3])])


def _grid(n_items: int, rows_per_item: int, *, panel: float = 1.6, columns: int = GRID_COLUMNS):
    """A figure with ``n_items`` column-blocks of ``rows_per_item`` panels each."""
    ncol = max(1, min(columns, n_items))
    nblock = -(-n_items // ncol)
    fig = _new_figure(ncol * panel + 0.3, nblock * rows_per_item * panel + 0.6)
    axs = fig.subplots(nblock * rows_per_item, ncol, squeeze=False)
    for ax in axs.ravel():
        ax.set_axis_off()

    def axes_for(i):
        b, c = divmod(i, ncol)
        return [axs[b * rows_per_item + r, c] for r in range(rows_per_item)]
    return fig, axes_for


def _limit(n: int) -> tuple[int, str]:
    if n > MAX_PANELS:
        return MAX_PANELS, f" (first {MAX_PANELS} of {n} shown)"
    return n, ""


def _centroids(weights: np.ndarray) -> np.ndarray:
    """Intensity-weighted centroid (y, x) of each (S, Y, X) map, in pixel units."""
    w = np.clip(weights, 0, None).astype(np.float64)
    tot = w.sum(axis=(1, 2))
    yy = np.arange(w.shape[1])[None, :, None]
    xx = np.arange(w.shape[2])[None, None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = (w * yy).sum(axis=(1, 2)) / tot
        cx = (w * xx).sum(axis=(1, 2)) / tot
    return np.stack([cy, cx], axis=1)


# --------------------------------------------------------------------------- figures

def fig_overview(annular: np.ndarray | None, maps: np.ndarray, cal: Calibration, *,
                 background_title: str = "annular VDF") -> Figure:
    """Segments over the overview image (paper Fig. 3A) and a colour label map.

    Parameters
    ----------
    annular : (Y, X) array or None
        Annular virtual dark-field image; ``None`` draws the outlines on the sum of the
        max-normalised segment maps instead.
    maps : (S, Y, X) array
        Segment maps, exactly 0 outside each segment.
    cal : Calibration

    Returns
    -------
    Figure
        Left: the overview in grey with each segment outlined in its colour and
        labelled at its centroid. Right: each segment's map blended in its colour
        (brightness = map / its max); pixels in two or more segments are hatched on
        both panels.
    """
    maps = np.nan_to_num(np.asarray(maps, np.float64))
    s, ny, nx = maps.shape
    colours = segment_colours(s)
    peak = maps.reshape(s, -1).max(axis=1) if s else np.zeros(0)
    weights = maps / np.where(peak > 0, peak, 1.0)[:, None, None]
    masks = maps > 0
    overlap = masks.sum(axis=0) >= 2
    if annular is None:
        annular = weights.sum(axis=0) if s else np.zeros((ny, nx))
        background_title = "sum of normalised segment maps"

    aspect = nx / max(ny, 1)
    fig = _new_figure(2 * 4.6 * min(max(aspect, 0.6), 1.8) + 1.0, 4.8)
    ax0, ax1 = fig.subplots(1, 2)
    ext = _map_extent((ny, nx), cal)
    step = cal.scan_step or 1.0
    yc = (np.arange(ny) + 0.5) * step
    xc = (np.arange(nx) + 0.5) * step

    im = ax0.imshow(annular, cmap="gray", extent=ext, interpolation="nearest")
    fig.colorbar(im, ax=ax0, shrink=0.8, label="intensity (counts)")
    for i in range(s):
        if masks[i].any() and not masks[i].all():
            ax0.contour(xc, yc, masks[i].astype(float), levels=[0.5], colors=[colours[i]],
                        linewidths=1.3)
    rgb = np.einsum("syx,sc->yxc", weights, colours[:, :3])
    total = weights.sum(axis=0)
    rgb /= np.maximum(total, 1.0)[..., None]
    ax1.imshow(np.clip(rgb, 0, 1), extent=ext, interpolation="nearest")
    cen = _centroids(weights)
    for ax in (ax0, ax1):
        if overlap.any():
            with matplotlib.rc_context({"hatch.color": "white", "hatch.linewidth": 0.6}):
                ax.contourf(xc, yc, overlap.astype(float), levels=[0.5, 1.5], colors="none",
                            hatches=["////"])
        for i in range(s):
            if np.all(np.isfinite(cen[i])):
                ax.text((cen[i, 1] + 0.5) * step, (cen[i, 0] + 0.5) * step, f"S{i}",
                        color=colours[i], fontsize=8, ha="center", va="center",
                        fontweight="bold", path_effects=_OUTLINE)
        ax.set_xlim(ext[0], ext[1])
        ax.set_ylim(ext[2], ext[3])
        _map_axes(ax, (ny, nx), cal, axes=True)
    ax0.set_title(f"{background_title} with {s} segments outlined")
    ax1.set_title("segments (brightness = map / its max)")
    if overlap.any():
        ax1.legend(handles=[Patch(facecolor="black", edgecolor="white", hatch="////",
                                  label=f"overlap ({int(overlap.sum())} px in ≥2 segments)")],
                   loc="upper right", fontsize=7, framealpha=0.8)
    return fig


def fig_scree(ratio: np.ndarray, n_components: int | None, reason: str | None = None) -> Figure:
    """Scree plot of the SVD explained variance ratio with the chosen E marked (Fig. 5A).

    Parameters
    ----------
    ratio : (K,) array
        Fraction of the total variance explained by each singular component.
    n_components : int or None
        The number of NMF components chosen (E); components ``0..E-1`` are highlighted.
    reason : str, optional
        Why E was chosen (shown under the title).
    """
    r = np.asarray(ratio, np.float64)
    k = np.arange(r.size)
    fig = _new_figure(7.0, 4.2)
    ax = fig.subplots()
    pos = r > 0
    chosen = k < (n_components or 0)
    ax.semilogy(k[pos], r[pos], "-", color="0.75", lw=1, zorder=1)
    ax.semilogy(k[pos & ~chosen], r[pos & ~chosen], "o", color="0.55", ms=4, label="not used")
    if n_components:
        ax.semilogy(k[pos & chosen], r[pos & chosen], "o", color="tab:red", ms=5,
                    label=f"used for NMF (E = {n_components})")
        ax.axvline(n_components - 0.5, color="tab:red", ls="--", lw=1)
        if 0 < n_components <= r.size and r[n_components - 1] > 0:
            ax.axhline(r[n_components - 1], color="tab:red", ls=":", lw=0.8)
    ax.set_xlabel("component index")
    ax.set_ylabel("fraction of total variance")
    ax.set_title("SVD scree plot (mean-centred data)")
    if reason:
        ax.text(0.99, 0.97, _wrap(f"E: {reason}", 70), transform=ax.transAxes, ha="right",
                va="top", fontsize=8, bbox=dict(facecolor="white", alpha=0.85, edgecolor="0.8"))
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    return fig


def fig_nmf_components(factors: np.ndarray, loadings: np.ndarray | None, cal: Calibration,
                       set_aside: dict[int, str] | None = None) -> Figure:
    """NMF component patterns over their loading maps, set-aside ones marked (Fig. 5B).

    Parameters
    ----------
    factors : (E, Ky, Kx) array
        Component patterns.
    loadings : (E, Y, X) array or None
        Loading maps (drawn under each pattern when given).
    set_aside : dict, optional
        ``{component index: reason}`` of components left out of segmentation
        (background, amorphous film, ...): framed and titled in red with the reason.
    """
    set_aside = set_aside or {}
    e = factors.shape[0]
    shown, suffix = _limit(e)
    rows = 2 if loadings is not None else 1
    fig, axes_for = _grid(shown, rows, panel=1.75)
    for i in range(shown):
        axs = axes_for(i)
        aside = i in set_aside
        colour = "tab:red" if aside else "black"
        _show_pattern(axs[0], factors[i], cal, axes=False)
        axs[0].set_axis_on()
        axs[0].set_title(f"#{i}" + (" set aside" if aside else ""), fontsize=8, color=colour)
        if rows == 2:
            axs[1].set_axis_on()
            axs[1].imshow(loadings[i], cmap="viridis", extent=_map_extent(loadings[i].shape, cal),
                          interpolation="nearest")
            _map_axes(axs[1], loadings[i].shape, cal, axes=False)
            if aside and set_aside[i]:
                axs[1].set_xlabel(_wrap(set_aside[i], 22), fontsize=6.5, color=colour)
        for ax in axs:
            for sp in ax.spines.values():
                sp.set_edgecolor(colour)
                sp.set_linewidth(2.0 if aside else 0.5)
    what = "patterns (top, gamma 0.5) and loading maps (bottom)" if rows == 2 else "patterns"
    _suptitle(fig, f"NMF components: {what}; set-aside components in red{suffix}", fontsize=10)
    return fig


def fig_segments(maps: np.ndarray, patterns: np.ndarray, cal: Calibration, *,
                 title: str, vectors: np.ndarray | None = None,
                 membership: np.ndarray | None = None,
                 aperture_radius: float | None = None) -> Figure:
    """Each segment's map above its pattern, in the segment's colour (Figs. 4A-B, 6A).

    Parameters
    ----------
    maps : (S, Y, X) array
    patterns : (S, Ky, Kx) array
        Beam at ``(Ky//2, Kx//2)``.
    vectors : (N, 2) array, optional
        Unique diffraction vectors (gy, gx) relative to the beam, detector pixels.
    membership : (S, N) bool array, optional
        Which vectors belong to which segment: circled on its pattern.
    aperture_radius : float, optional
        Radius of the circles, detector px: the virtual aperture when known, else 4 % of
        the detector width.
    """
    s = min(maps.shape[0], patterns.shape[0])
    shown, suffix = _limit(s)
    colours = segment_colours(maps.shape[0])
    fig, axes_for = _grid(shown, 2, panel=1.75)
    ky, kx = patterns.shape[1:]
    scale = cal.k_scale or 1.0
    radius = (aperture_radius or max(1.5, 0.04 * min(ky, kx))) * scale
    for i in range(shown):
        a_map, a_pat = axes_for(i)
        a_map.set_axis_on()
        a_pat.set_axis_on()
        a_map.imshow(maps[i], cmap=_colour_cmap(colours[i]), vmin=0,
                     extent=_map_extent(maps[i].shape, cal), interpolation="nearest")
        _map_axes(a_map, maps[i].shape, cal, axes=False)
        a_map.set_title(f"S{i}", fontsize=9, color=colours[i], fontweight="bold")
        _show_pattern(a_pat, patterns[i], cal, axes=False)
        if vectors is not None and membership is not None and i < membership.shape[0]:
            for gy, gx in vectors[membership[i]] * scale:
                a_pat.add_patch(Circle((gx, gy), radius, fill=False, lw=1.0,
                                       edgecolor="cyan"))
        for ax in (a_map, a_pat):
            for sp in ax.spines.values():
                sp.set_edgecolor(colours[i])
                sp.set_linewidth(1.5)
    _suptitle(fig, f"{title}{suffix}", fontsize=10)
    return fig


def fig_vectors(cal: Calibration, *, pattern: np.ndarray | None, vectors: np.ndarray | None,
                peak_histogram: np.ndarray | None, pattern_title: str = "mean pattern",
                aperture_radius: float | None = None) -> Figure:
    """Unique diffraction vectors on the mean pattern, and where peaks were found.

    Parameters
    ----------
    pattern : (Ky, Kx) array or None
        Mean (or max) aligned pattern; the vectors are circled on it.
    vectors : (N, 2) array or None
        Unique vectors (gy, gx) relative to the beam, detector pixels.
    peak_histogram : (Ky, Kx) int array or None
        Number of peaks found at each detector pixel over the whole scan.
    aperture_radius : float, optional
        Circle radius, detector px (the virtual aperture when known).
    """
    panels = [p for p in ((pattern, "pattern"), (peak_histogram, "hist")) if p[0] is not None]
    fig = _new_figure(5.2 * len(panels) + 0.4, 4.8)
    axs = np.atleast_1d(fig.subplots(1, len(panels)))
    scale = cal.k_scale or 1.0
    for ax, (arr, kind) in zip(axs, panels):
        if kind == "pattern":
            _show_pattern(ax, arr, cal, colorbar=True)
            ax.set_title(f"{pattern_title}" + (f" with {len(vectors)} unique vectors"
                                                if vectors is not None else ""))
        else:
            h = np.asarray(arr, np.float64)
            masked = np.ma.masked_less_equal(h, 0)
            im = ax.imshow(masked, cmap="viridis", extent=_pattern_extent(h.shape, cal),
                           norm=LogNorm(vmin=1, vmax=max(2.0, h.max())), interpolation="nearest")
            ax.set_facecolor("black")
            fig.colorbar(im, ax=ax, shrink=0.8, label="peaks found per detector pixel")
            ax.set_title(f"positions of all {int(h.sum())} peaks found")
            ax.set_xlabel(f"k$_x$ ({_t(cal.k_label)})")
            ax.set_ylabel(f"k$_y$ ({_t(cal.k_label)})")
        if vectors is not None and len(vectors):
            shape = arr.shape
            r = (aperture_radius or max(1.5, 0.04 * min(shape))) * scale
            for gy, gx in np.asarray(vectors, np.float64) * scale:
                ax.add_patch(Circle((gx, gy), r, fill=False, lw=0.9, edgecolor="cyan"))
    return fig


def fig_beam(centres: np.ndarray, fitted: np.ndarray | None, cal: Calibration) -> Figure:
    """Measured direct-beam position over the scan (descan), and the fit residual.

    Parameters
    ----------
    centres : (Y, X, 2) array
        Measured beam centre (ky, kx), detector pixels, per binned scan position.
    fitted : (Y, X, 2) array or None
        The smooth descan model used for alignment.

    Returns
    -------
    Figure
        ky and kx shift relative to the median centre (diverging colours, symmetric), and
        when ``fitted`` is given the distance |measured - fitted| in pixels.
    """
    c = np.asarray(centres, np.float64)
    med = np.nanmedian(c.reshape(-1, 2), axis=0)
    d = c - med
    panels = [(d[..., 0], f"k$_y$ - {med[0]:.2f} (px)", "RdBu_r"),
              (d[..., 1], f"k$_x$ - {med[1]:.2f} (px)", "RdBu_r")]
    if fitted is not None and fitted.shape == c.shape:
        res = np.hypot(*(c - fitted).transpose(2, 0, 1))
        panels.append((res, "|measured - fitted| (px)", "magma"))
    fig = _new_figure(4.3 * len(panels), 3.9)
    axs = np.atleast_1d(fig.subplots(1, len(panels)))
    ext = _map_extent(c.shape[:2], cal)
    for ax, (img, label, cmap) in zip(axs, panels):
        finite = img[np.isfinite(img)]
        if cmap == "RdBu_r":
            lim = float(np.abs(finite).max()) if finite.size else 1.0
            norm = TwoSlopeNorm(0.0, -lim - 1e-6, lim + 1e-6)
            im = ax.imshow(img, cmap=cmap, norm=norm, extent=ext, interpolation="nearest")
        else:
            im = ax.imshow(img, cmap=cmap, vmin=0, extent=ext, interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8, label="detector px")
        ax.set_title(label, fontsize=10)
        _map_axes(ax, img.shape, cal, axes=True)
    fig.suptitle("direct-beam position over the scan (descan)", fontsize=11)
    return fig


def fig_dose(totals: np.ndarray, cal: Calibration, *, normalised: bool | None = None) -> Figure:
    """Each pattern's total counts over the scan, relative to the median: the dose where
    the detector clips nothing (a beam current that flickered or drifted shows as lines
    or a gradient), and a histogram of it.

    Parameters
    ----------
    totals : (Y, X) array
        ``overview/total_counts``.
    normalised : bool or None
        Whether the images or loading maps were divided by it (said in the title).
    """
    t = np.asarray(totals, np.float64)
    ok = np.isfinite(t) & (t > 0)
    rel = t / np.median(t[ok]) if ok.any() else np.ones_like(t)
    fig = _new_figure(8.6, 3.9)
    ax0, ax1 = fig.subplots(1, 2)
    im = ax0.imshow(rel, cmap="viridis", extent=_map_extent(t.shape, cal), interpolation="nearest")
    fig.colorbar(im, ax=ax0, shrink=0.8, label="total / median")
    _map_axes(ax0, t.shape, cal, axes=True)
    ax1.hist(rel[ok].ravel(), bins=min(100, max(10, int(ok.sum() ** 0.5))), color="0.3")
    ax1.set_xlabel("total / median")
    ax1.set_ylabel("patterns")
    what = {True: " (divided out)", False: " (not divided out)", None: ""}[normalised]
    fig.suptitle("each pattern's total counts: the dose" + what, fontsize=11)
    return fig


def fig_differences(data: np.ndarray, patterns: np.ndarray, positions: np.ndarray,
                    cal: Calibration, *, beam_radius: float, label: str) -> Figure:
    """Data pattern, segment pattern and their normalised difference (Figs. 4D, 6B).

    Parameters
    ----------
    data : (S, Ky, Kx) array
        Aligned data pattern at each segment's brightest scan position.
    patterns : (S, Ky, Kx) array
        The segment patterns.
    positions : (S, 2) int array
        Binned scan position (y, x) of each data pattern, for the titles.
    beam_radius : float
        Radius (detector px) of the direct-beam disc excluded from the normalisation
        and greyed out: the segment patterns carry no direct beam.
    label : str
        What the segment patterns are ("virtual pattern", "component pattern").

    Notes
    -----
    Both patterns are divided by their maximum outside the beam disc, so the difference
    lies in [-1, 1]: red where the data have more intensity than the segment pattern.
    """
    s = data.shape[0]
    shown, suffix = _limit(s)
    colours = segment_colours(patterns.shape[0])
    ky, kx = data.shape[1:]
    yy, xx = np.ogrid[:ky, :kx]
    beam = (yy - ky // 2) ** 2 + (xx - kx // 2) ** 2 <= beam_radius ** 2
    d = normalise_outside(data[:shown], beam)
    p = normalise_outside(patterns[:shown], beam)
    diff = d - p
    diff[:, beam] = np.nan
    fig, axes_for = _grid(shown, 3, panel=1.75)
    ext = _pattern_extent((ky, kx), cal)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.6")
    pcmap = matplotlib.colormaps["magma"].with_extremes(bad="0.6")
    last = None
    for i in range(shown):
        a0, a1, a2 = axes_for(i)
        for ax in (a0, a1, a2):
            ax.set_axis_on()
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_edgecolor(colours[i])
                sp.set_linewidth(1.5)
        a0.imshow(np.where(beam, np.nan, d[i]), cmap=pcmap, norm=PowerNorm(GAMMA, 0, 1),
                  extent=ext, interpolation="nearest")
        a0.set_title(f"S{i} data @ ({positions[i, 0]}, {positions[i, 1]})", fontsize=7,
                     color=colours[i])
        a1.imshow(np.where(beam, np.nan, p[i]), cmap=pcmap, norm=PowerNorm(GAMMA, 0, 1),
                  extent=ext, interpolation="nearest")
        a1.set_title(label, fontsize=7)
        last = a2.imshow(diff[i], cmap=cmap, vmin=-1, vmax=1, extent=ext,
                         interpolation="nearest")
        a2.set_title("data − pattern", fontsize=7)
    if last is not None:
        fig.colorbar(last, ax=fig.axes, shrink=0.5, location="right",
                     label="normalised difference")
    fig.suptitle(_wrap("data at each segment's brightest position vs its pattern, both "
                       f"background-subtracted and normalised to their max outside the beam (grey){suffix}",
                       max(40, 16 * min(shown, GRID_COLUMNS))), fontsize=9)
    return fig


def normalise_outside(stack: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """Divide each (Ky, Kx) frame of ``stack`` by its max outside ``exclude`` (>=0 part)."""
    a = np.clip(np.nan_to_num(np.asarray(stack, np.float64)), 0, None)
    top = np.where(exclude, 0.0, a).reshape(a.shape[0], -1).max(axis=1)
    return a / np.where(top > 0, top, 1.0)[:, None, None]


def _t(text) -> str:
    """A store string made safe for matplotlib text (``$`` would start mathtext)."""
    return str(text).replace("$", r"\$")


def _suptitle(fig: Figure, text: str, *, fontsize: float) -> None:
    """A figure title wrapped to the figure's width (a one-segment grid is ~2 inches
    wide: a long title on one line was cut at both ends)."""
    chars = max(12, int(fig.get_figwidth() * 120 / fontsize))  # ~0.6 em per character
    fig.suptitle(_wrap(text, chars), fontsize=fontsize)


def _wrap(text: str, width: int) -> str:
    """Wrap text and escape ``$`` so store strings never reach mathtext."""
    import textwrap
    text = str(text).replace("$", r"\$")
    return "\n".join(textwrap.wrap(text, width)) or text
