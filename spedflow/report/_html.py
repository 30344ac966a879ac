"""One self-contained HTML page of a result: figures embedded as base64 PNG.

No external resources, no JavaScript. Every string that comes from the store (attrs,
parameters, reasons, evaluation keys) passes through :func:`html.escape`: a result
store may come from someone else.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import _figures as F
from ._differences import (beam_radius, brightest_positions, data_patterns_at,
                           subtract_radial_median)
from ._load import ResultView, find_param, input_store_path, load_result

__all__ = ["write_report"]

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1320px;color:#222;line-height:1.4;padding:0 16px}
h1{font-size:1.6em;margin-bottom:0.2em} h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:1.6em}
table{border-collapse:collapse;margin:8px 0;font-size:0.9em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:middle}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:12px 0 24px 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:0.9em;color:#444;max-width:1100px}
.swatch{display:inline-block;width:14px;height:14px;border:1px solid #555;vertical-align:middle}
.note{color:#8a4b00} .muted{color:#777} code{background:#f5f5f5;padding:0 3px}
.cols{display:flex;flex-wrap:wrap;gap:32px}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        txt = ", ".join(_fmt(x) for x in v[:12])
        return f"[{txt}{', …' if len(v) > 12 else ''}]"
    if isinstance(v, dict):
        return json.dumps(v, default=str)[:300]
    return str(v)


def _flatten(d, prefix="") -> list[tuple[str, object]]:
    rows = []
    for k, v in (d or {}).items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            rows += _flatten(v, key)
        else:
            rows.append((key, v))
    return rows


def _parameter_rows(params: dict, resolved: dict) -> list[tuple[str, object, object]]:
    """``(parameter, as set, used)`` rows: every parameter the run was given (a value
    left to the data shows as "auto"), with the value it used (the resolved one, e.g.
    the beam radius measured and the scales derived from it), then the quantities
    measured on the data that are not parameters (the beam radius, the detector gain)."""
    given = dict(_flatten(params))
    used = {k: v for k, v in _flatten(resolved) if k != "bad_pixels"}
    sections = {k.split(".")[0] for k in given}
    keys = list(given) + [k for k in used if k not in given and k.split(".")[0] in sections]
    def used_value(k):  # a value measured for a section's parameter is recorded at the top
        v = used.get(k, given.get(k))
        return used.get(k.split(".")[-1]) if v is None else v
    rows = [(k, given.get(k, "auto"), used_value(k)) for k in keys]
    rows += [(f"measured: {k}", "", v) for k, v in used.items() if "." not in k]
    return rows


def _table(rows, header=None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for c in row:
            if isinstance(c, _Raw):
                cells.append(f"<td>{c.html}</td>")
            elif isinstance(c, (int, float, np.integer, np.floating)) and not isinstance(c, bool):
                cells.append(f"<td class='num'>{_e(_fmt(c))}</td>")
            else:
                cells.append(f"<td>{_e(_fmt(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


class _Raw:
    """Trusted HTML made here (never from the store)."""

    def __init__(self, html_text: str):
        self.html = html_text


def _img_tag(png: bytes, alt: str, **style) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    st = ";".join(f"{k.replace('_', '-')}:{v}" for k, v in style.items())
    return f"<img src='data:image/png;base64,{b64}' alt='{_e(alt)}'" + (f" style='{st}'" if st else "") + ">"


class _Report:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.figures: list[tuple[str, str, str, bytes]] = []  # name, title, caption, png
        self.notes: list[str] = []

    def add(self, name: str, title: str, caption: str, make):
        """Render one figure; a failure becomes a note, not a broken report."""
        try:
            fig = make()
        except Exception as exc:  # one bad array must not lose the other figures
            self.notes.append(f"figure '{title}' could not be drawn ({type(exc).__name__}: {exc})")
            return
        png = F.figure_png(fig)
        (self.out_dir / f"{name}.png").write_bytes(png)
        self.figures.append((name, title, caption, png))

    def skip(self, title: str, why: str):
        self.notes.append(f"figure '{title}' skipped: {why}")


def _membership(v: ResultView) -> np.ndarray | None:
    """(S, N) bool membership of vectors in segments, from any stored form.

    The result stores ``vdf/segment_vectors`` as (K, 2) int rows ``(segment, vector)``;
    a dense (S, N) bool matrix or an (N,) int segment label per vector are read too.
    """
    m = v.segment_vectors
    if m is None or v.vectors is None:
        return None
    n, s = len(v.vectors), v.n_segments
    if m.ndim == 2 and m.dtype != bool and np.issubdtype(m.dtype, np.integer) and m.shape[1] == 2:
        ok = (m[:, 0] >= 0) & (m[:, 0] < s) & (m[:, 1] >= 0) & (m[:, 1] < n)
        out = np.zeros((s, n), bool)
        out[m[ok, 0], m[ok, 1]] = True
        return out
    if m.ndim == 2 and m.shape == (s, n):
        return m != 0
    if m.ndim == 1 and m.shape[0] == n and np.issubdtype(m.dtype, np.integer):
        return m[None, :] == np.arange(s)[:, None]
    return None


def _vector_counts(v: ResultView) -> np.ndarray | None:
    mem = _membership(v)
    return None if mem is None else mem.sum(axis=1)


def _radius(v: ResultView, *words: str) -> float | None:
    """A radius from the resolved values (preferred) or the parameters."""
    return (find_param(v.meta.get("resolved"), *words)
            or find_param(v.meta.get("params"), *words))


def _evaluation(v: ResultView, store_path, notes) -> dict | None:
    if v.evaluation is not None:
        return v.evaluation
    if store_path is None:
        return None
    try:
        import zarr
        g = zarr.open_group(str(store_path), mode="r")
        if "truth" not in g:
            return None
    except Exception:
        return None
    try:
        from .. import evaluate as ev
    except ImportError:
        return None
    try:
        if hasattr(ev, "evaluate"):
            return dict(ev.evaluate(str(v.path), str(store_path)))
        if hasattr(ev, "score_segmentation"):
            return dict(ev.score_segmentation(str(v.path), str(store_path)))
    except Exception as exc:  # the report still shows everything else
        notes.append(f"evaluation against the truth failed ({type(exc).__name__}: {exc})")
    return None


def _make_figures(v: ResultView, rep: _Report, store_path) -> None:
    cal = v.calibration
    s = v.n_segments
    nmf = v.method == "nmf"
    aperture = _radius(v, "aperture", "radius")
    if aperture is None and isinstance(v.meta.get("resolved"), dict):
        aperture = find_param(v.meta["resolved"].get("vdf"), "radius")

    title = "Segments over the annular VDF image (cf. Fig. 3A)"
    if v.maps is not None and s:
        bg = "annular VDF" if v.annular is not None else None
        rep.add("overview", title,
                "Left: annular virtual dark-field image with every segment outlined in its own "
                "colour (the colours are the same in every figure and in the segment table). "
                "Right: every segment map blended in its colour, brightness = map / its maximum. "
                "Hatched: scan pixels that belong to two or more segments (overlapping crystals)."
                + ("" if bg else " No annular VDF image was stored: the background is the sum "
                   "of the normalised segment maps."),
                lambda: F.fig_overview(v.annular, v.maps, cal))
    else:
        rep.skip(title, "no segments/maps (or zero segments)")

    if nmf:
        title = "Scree plot (cf. Fig. 5A)"
        if v.explained_variance_ratio is not None and v.explained_variance_ratio.size:
            rep.add("scree", title,
                    "Fraction of the total variance explained by each SVD component of the "
                    "mean-centred data (log scale). Red: the E components used for NMF; the "
                    "dashed line separates them from the rest.",
                    lambda: F.fig_scree(v.explained_variance_ratio, v.n_components,
                                        v.n_components_reason))
        else:
            rep.skip(title, "no scree/explained_variance_ratio")
        title = "NMF components (cf. Fig. 5B)"
        if v.factors is not None:
            loadings = v.loadings if (v.loadings is not None
                                      and v.loadings.shape[0] == v.factors.shape[0]) else None
            rep.add("nmf_components", title,
                    "Component patterns (gamma 0.5 intensity scale) over their loading maps, "
                    "each panel scaled to its own maximum. Components framed in red were set "
                    "aside before segmentation (background, amorphous film, ...), with the reason "
                    "under the loading map.",
                    lambda: F.fig_nmf_components(v.factors, loadings, cal, v.set_aside))
        else:
            rep.skip(title, "no nmf/factors")

    title = ("Loading-map segments and their component patterns (cf. Fig. 6A)" if nmf else
             "Summed VDF segments and their virtual diffraction patterns (cf. Fig. 4A-B)")
    if v.maps is not None and v.patterns is not None and s:
        mem = None if nmf else _membership(v)
        rep.add("segments", title,
                "Top: each segment's map (black to the segment's colour, each scaled to its own "
                "maximum). Bottom: its pattern (gamma 0.5 intensity scale, direct beam at the "
                "centre)" + (", with the segment's diffraction vectors circled." if mem is not None
                             else "."),
                lambda: F.fig_segments(v.maps, v.patterns, cal,
                                       title="segment maps (top) and patterns (bottom)",
                                       vectors=v.vectors if mem is not None else None,
                                       membership=mem, aperture_radius=aperture))
    else:
        rep.skip(title, "segments/maps or segments/patterns missing")

    if not nmf:
        title = "Diffraction vectors"
        pattern, ptitle = v.mean_pattern, "mean pattern"
        if pattern is None and v.patterns is not None and s:
            pattern, ptitle = v.patterns.max(axis=0), "max of the segment patterns"
        if v.vectors is not None or v.peak_histogram is not None:
            rep.add("vectors", title,
                    "Unique diffraction vectors (cyan circles) on the "
                    f"{ptitle}, and how often a peak was found at each detector pixel over the "
                    "whole scan (log colour scale): clusters of peaks become the unique vectors.",
                    lambda: F.fig_vectors(cal, pattern=pattern, vectors=v.vectors,
                                          peak_histogram=v.peak_histogram,
                                          pattern_title=ptitle, aperture_radius=aperture))
        else:
            rep.skip(title, "no vectors and no peaks")

    title = "Direct-beam position (descan)"
    if v.beam_centres is not None:
        rep.add("beam", title,
                "Measured direct-beam centre relative to its median over the scan, in detector "
                "pixels; with the fitted descan model, the distance between measurement and "
                "fit (large values: a badly measured or unusual pattern).",
                lambda: F.fig_beam(v.beam_centres, v.beam_fitted, cal))
    else:
        rep.skip(title, "no beam/centres")

    title = "Dose: each pattern's total counts"
    if v.totals is not None:
        resolved = v.meta.get("resolved") if isinstance(v.meta.get("resolved"), dict) else {}
        normalised = resolved.get("vdf_dose_normalized", resolved.get("nmf_dose_normalized"))
        spread = resolved.get("dose_spread")
        rep.add("dose", title,
                "Each pattern's total counts over the median: where the detector clips nothing "
                "and no beam stop is in, the incident dose. A beam current that flickered or "
                "drifted during the scan shows as lines, speckle or a gradient; crystals show "
                "faintly where they scatter past the detector's edge."
                + (f" Spread beyond counting noise: {100 * spread:.1f} %." if spread is not None
                   else "")
                + (" The VDF images / loading maps were divided by it (normalize)."
                   if normalised else ""),
                lambda: F.fig_dose(v.totals, cal, normalised=normalised))
    else:
        rep.skip(title, "no overview/total_counts (a result of spedflow before 0.28)")

    title = "Difference patterns (cf. Figs. 4D, 6B)"
    if store_path is None:
        rep.skip(title, "no input store given (store_path) or found at the result's input path")
    elif v.maps is None or v.patterns is None or not s:
        rep.skip(title, "no segments")
    else:
        try:
            from ..io import open_input
            data, _ = open_input(store_path)
        except InputError as exc:
            rep.skip(title, f"input store unusable: {exc}")
            return
        n = min(v.maps.shape[0], v.patterns.shape[0], F.MAX_PANELS)
        pos = brightest_positions(v.maps[:n])
        label = "component pattern" if nmf else "virtual pattern"

        def make():
            d = data_patterns_at(v, data, pos)
            r = beam_radius(d, {"params": v.meta.get("params"), "resolved": v.meta.get("resolved")})
            return F.fig_differences(subtract_radial_median(d),
                                     subtract_radial_median(v.patterns[:n]), pos, cal,
                                     beam_radius=r, label=label)
        rep.add("differences", title,
                "For each segment: the data pattern at the segment's brightest scan position "
                "(raw data summed over the binning square and aligned with the beam model), the "
                f"segment's {label}, and data − pattern. Both have their azimuthally symmetric "
                "background (the median of each ring around the beam: film, diffuse scattering) "
                "removed and are divided by their maximum outside the direct-beam disc (grey). Red: intensity the segment pattern misses; "
                "blue: intensity it has that the data do not.", make)


def _segment_rows(v: ResultView) -> list:
    s = v.n_segments
    colours = F.segment_colours(s)
    counts = _vector_counts(v)
    cal = v.calibration
    rows = []
    for i in range(s):
        c = colours[i]
        hexc = "#%02x%02x%02x" % tuple(int(round(255 * x)) for x in c[:3])
        row = [_Raw(f"<span class='swatch' style='background:{hexc}'></span> S{i}")]
        if v.maps is not None and i < v.maps.shape[0]:
            m = v.maps[i]
            area = int((m > 0).sum())
            row.append(area)
            if cal.scan_step:
                row.append(area * cal.scan_step ** 2)
            row.append(float(np.nanmax(m)) if m.size else 0.0)
            yx = np.unravel_index(int(np.nan_to_num(m).argmax()), m.shape)
            row.append(f"({yx[0]}, {yx[1]})")
        else:
            row += ["–"] * (4 if cal.scan_step else 3)
        if counts is not None:
            row.append(int(counts[i]) if i < len(counts) else "–")
        comp = v.segment_component
        if comp is not None:
            row.append(f"#{int(comp[i])}" if i < len(comp) else "–")
        if v.patterns is not None and i < v.patterns.shape[0]:
            row.append(_Raw(_img_tag(F.thumbnail_png(v.patterns[i]), f"pattern of segment {i}")))
        else:
            row.append("–")
        rows.append(row)
    return rows


def _segment_header(v: ResultView) -> list[str]:
    h = ["segment", "area (scan px)"]
    if v.calibration.scan_step:
        h.append(f"area ({v.calibration.scan_units}²)")
    h += ["peak intensity", "brightest at (y, x)"]
    if _vector_counts(v) is not None:
        h.append("vectors")
    if v.segment_component is not None:
        h.append("from component")
    h.append("pattern")
    return h


def write_report(result_path, out_dir, *, store_path=None, strict: bool = False) -> Path:
    """Write PNG figures and one self-contained HTML page describing a result.

    Parameters
    ----------
    result_path : str or Path
        Result store written by ``spedflow segment`` (Zarr v3, attrs ``kind: result``).
    out_dir : str or Path
        Directory for ``report.html`` and the PNG figures; created if needed. Files of an
        earlier report there are replaced.
    store_path : str or Path, optional
        The input store. Used for the difference patterns (a few patterns are read) and,
        when it holds ``truth/``, for the evaluation. Default: the input path recorded in
        the result attrs, if it exists.
    strict : bool
        Raise :class:`InputError` (after writing the report) if the result is damaged:
        an array present but unreadable or of the wrong shape, or ``segments/maps`` or
        ``segments/patterns`` missing. ``spedflow report`` sets it, so a damaged result
        does not pass for a whole one.

    Returns
    -------
    Path
        The HTML file.

    Raises
    ------
    InputError
        ``result_path`` is not a spedflow result store, or ``out_dir`` is a file; with
        ``strict``, the result is damaged (the report is written first).

    Notes
    -----
    Figures whose arrays are missing are skipped and listed under "Notes"; nothing in
    the store is trusted: attribute strings are HTML-escaped.
    """
    from ..io import check_side_directory
    out = Path(out_dir)
    if store_path is not None and not Path(str(store_path)).exists():
        raise InputError(f"`store_path` {str(store_path)!r} does not exist")
    v = load_result(result_path, store_path=store_path)
    if store_path is None:
        store_path = input_store_path(v.meta, result_path)
    check_side_directory(out, what="`out_dir`", sources=[result_path, store_path])
    out.mkdir(parents=True, exist_ok=True)

    rep = _Report(out)
    rep.notes.extend(v.notes)
    _make_figures(v, rep, store_path)
    evaluation = _evaluation(v, store_path, rep.notes)
    page = _page(v, rep, evaluation, store_path)
    target = out / "report.html"
    tmp = out / ".report.html.partial"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    damage = v.damage
    if strict and damage:
        more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
        first = damage[0].removesuffix(": ignored")
        raise InputError(f"result {str(result_path)!r} is damaged: {first}{more}; the report "
                         f"{str(target)!r} shows what could be read (`spedflow info --verify` "
                         f"names damaged chunks)")
    return target


def _page(v: ResultView, rep: _Report, evaluation, store_path) -> str:
    m = v.meta
    cal = v.calibration
    name = v.path.name
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>spedflow report: {_e(name)}</title><style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>spedflow result: {_e(name)}</h1>")
    method_txt = {"vdf": "VDF imaging-based segmentation", "nmf": "NMF-based segmentation"}
    parts.append(f"<p>{_e(method_txt.get(v.method, 'method ' + v.method))} after Bergh et al. "
                 f"(2020). spedflow {_e(m.get('version', '?'))}; report written "
                 f"{_e(datetime.datetime.now().isoformat(timespec='seconds'))}.</p>")

    # ---- summary
    scan = v.scan_shape
    rows = [("method", v.method), ("input", m.get("input", "?"))]
    if store_path is not None:
        rows.append(("input store used here", str(store_path)))
    rows.append(("navigation binning", m.get("nav_binning", "?")))
    if m.get("detector_binning", 1) != 1:
        rows.append(("detector binning", m.get("detector_binning")))
    if scan:
        rows.append(("scan (binned)", f"{scan[0]} × {scan[1]}"))
        rows.append(("patterns (binned)", scan[0] * scan[1]))
    if v.pattern_shape:
        rows.append(("pattern size (px)", f"{v.pattern_shape[0]} × {v.pattern_shape[1]}"))
    if cal.scan_step:
        rows.append(("scan step (binned)", f"{_fmt(cal.scan_step)} {cal.scan_units}"))
    if cal.k_scale:
        rows.append(("detector pixel", f"{_fmt(cal.k_scale)} {cal.k_units}"))
    if v.n_peaks is not None:
        rows.append(("peaks found", v.n_peaks))
    if v.vectors is not None:
        rows.append(("unique vectors", len(v.vectors)))
    if v.factors is not None:
        rows.append(("NMF components (E)", v.n_components if v.n_components else v.factors.shape[0]))
        if v.n_components_reason:
            rows.append(("why this E", v.n_components_reason))
        if v.set_aside:
            rows.append(("set aside", "; ".join(f"#{k}: {r}" if r else f"#{k}"
                                                 for k, r in sorted(v.set_aside.items()))))
    groups = m.get("merge_groups")
    if isinstance(groups, list) and any(isinstance(g, list) and len(g) > 1 for g in groups):
        rows.append(("components merged", "; ".join(
            " + ".join(f"#{x}" for x in g) for g in groups if isinstance(g, list) and len(g) > 1)))
    counts = m.get("counts")
    if isinstance(counts, dict):
        for k, x in counts.items():
            if k not in ("patterns", "segments") and isinstance(x, (int, float)):
                rows.append((f"count: {k}", x))
    rows.append(("segments", v.n_segments))
    parts.append("<div class='cols'><div><h2>Summary</h2>" + _table(rows) + "</div>")

    # ---- timings
    t = m.get("timings")
    if isinstance(t, dict) and t:
        vals = {k: x for k, x in t.items() if isinstance(x, (int, float)) and not isinstance(x, bool)}
        total = sum(vals.values())
        trows = [(k, x, f"{100 * x / total:.1f} %" if total > 0 else "–") for k, x in vals.items()]
        trows.append((_Raw("<b>total</b>"), total, ""))
        parts.append("<div><h2>Timings (s)</h2>" + _table(trows, ["stage", "seconds", "share"])
                     + "</div>")
    parts.append("</div>")

    # ---- evaluation
    if evaluation:
        erows = [(k, x) for k, x in _flatten(evaluation)]
        parts.append("<h2>Evaluation against the simulated truth</h2>" + _table(erows, ["score", "value"]))

    # ---- figures
    parts.append("<h2>Figures</h2>")
    for fname, title, caption, png in rep.figures:
        parts.append(f"<figure id='{_e(fname)}'><h3>{_e(title)}</h3>{_img_tag(png, title)}"
                     f"<figcaption>{_e(caption)} <span class='muted'>({_e(fname)}.png)</span>"
                     f"</figcaption></figure>")

    # ---- segments
    if v.n_segments:
        parts.append("<h2>Segments</h2>")
        parts.append(_table(_segment_rows(v), _segment_header(v)))

    # ---- parameters
    params = m.get("params")
    if isinstance(params, dict) and params:
        resolved = m.get("resolved") if isinstance(m.get("resolved"), dict) else {}
        parts.append("<h2>Parameters</h2>")
        rows = _parameter_rows(params, resolved)
        bad = resolved.get("bad_pixels")
        if isinstance(bad, list) and bad:  # what "auto" found
            shown = ", ".join(f"({p[0]}, {p[1]})" for p in bad[:20]) + (" ..." if len(bad) > 20 else "")
            rows.append(("detector pixels repaired (ky, kx)", "", f"{len(bad)}: {shown}"))
        parts.append(_table(rows, ["parameter", "as set", "used"]))

    if rep.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li class='note'>{_e(n)}</li>" for n in rep.notes)
                     + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
