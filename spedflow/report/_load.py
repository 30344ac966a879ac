"""Read a result store defensively for the report and the exports.

Every optional array may be missing (an older result, an interrupted stage, another
method): a missing or malformed array becomes ``None`` plus a note saying why, never an
exception. Only a path that is not a spedflow result store at all is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..errors import InputError
from ..io import read_meta

__all__ = ["Calibration", "ResultView", "load_result", "set_aside_components"]


@dataclass(frozen=True)
class Calibration:
    """Pixel sizes of the result's grids.

    ``scan_step`` is the size of one *binned* scan pixel (``scan_units``); ``k_scale``
    the size of one detector pixel of the result patterns (``k_units``). ``None`` when
    the attributes do not say, in which case figures use pixels.
    """

    scan_step: float | None = None
    scan_units: str = "px"
    k_scale: float | None = None
    k_units: str = "px"

    @property
    def scan_label(self) -> str:
        return self.scan_units if self.scan_step else "scan px"

    @property
    def k_label(self) -> str:
        return self.k_units if self.k_scale else "px"


class _Notes(list):
    """The notes of a read: what the report says it left out, and (``damaged``) which of
    them are damage to the store rather than something absent."""

    def __init__(self):
        super().__init__()
        self.damaged: list[str] = []

    def damage(self, text: str) -> None:
        self.append(text)
        self.damaged.append(text)


@dataclass
class ResultView:
    """What a result store holds, as NumPy arrays (``None`` when absent)."""

    path: Path
    meta: dict
    method: str
    maps: np.ndarray | None = None            # (S, Y, X) float32
    patterns: np.ndarray | None = None        # (S, Ky, Kx) float32
    annular: np.ndarray | None = None         # (Y, X)
    totals: np.ndarray | None = None          # (Y, X) each pattern's total counts
    mean_pattern: np.ndarray | None = None    # (Ky, Kx)
    beam_centres: np.ndarray | None = None    # (Y, X, 2)
    beam_fitted: np.ndarray | None = None     # (Y, X, 2)
    vectors: np.ndarray | None = None         # (N, 2) relative to the beam
    n_peaks: int | None = None
    peak_histogram: np.ndarray | None = None  # (Ky, Kx) counts of peak positions
    segment_vectors: np.ndarray | None = None  # (K, 2) int (segment, vector) rows, or (S, N) bool
    segment_intensities: np.ndarray | None = None  # (K,) or (S, N)
    segment_component: np.ndarray | None = None  # (S,) NMF component each segment came from
    factors: np.ndarray | None = None         # (E, Ky, Kx)
    loadings: np.ndarray | None = None        # (E, Y, X)
    explained_variance_ratio: np.ndarray | None = None
    n_components: int | None = None
    n_components_reason: str | None = None
    set_aside: dict[int, str] = field(default_factory=dict)
    evaluation: dict | None = None
    calibration: Calibration = field(default_factory=Calibration)
    notes: list[str] = field(default_factory=list)

    @property
    def damage(self) -> list[str]:
        """What is wrong with the store, as opposed to merely absent: arrays present but
        unreadable or of the wrong shape, and a missing ``segments/maps`` or
        ``segments/patterns`` (every result has them, empty when nothing was found)."""
        out = list(getattr(self.notes, "damaged", []))
        for name, arr in (("segments/maps", self.maps), ("segments/patterns", self.patterns)):
            if arr is None and not any(n.startswith(name + " ") for n in out):
                out.append(f"{name} is missing")
        return out

    @property
    def n_segments(self) -> int:
        for a in (self.maps, self.patterns):
            if a is not None:
                return int(a.shape[0])
        return 0

    @property
    def pattern_shape(self) -> tuple[int, int] | None:
        for a in (self.patterns, self.factors, self.mean_pattern):
            if a is not None:
                return tuple(a.shape[-2:])
        return None

    @property
    def scan_shape(self) -> tuple[int, int] | None:
        for a in (self.maps, self.annular, self.loadings):
            if a is not None:
                return tuple(a.shape[-2:])
        return None


def _open(path) -> tuple[zarr.Group, dict]:
    meta = read_meta(path)  # InputError for a missing or unreadable store
    if meta.get("kind") != "result":
        raise InputError(f"{str(path)!r} is not a spedflow result store "
                         f"(attrs spedflow.kind = {meta.get('kind')!r}, expected 'result')")
    return zarr.open_group(str(path), mode="r"), meta


def _array(group: zarr.Group, name: str, ndim: int | tuple[int, ...], notes: _Notes):
    """``group[name]`` as NumPy if present with the expected ndim, else None (+ note)."""
    try:
        node = group[name]
    except KeyError:
        return None
    if not isinstance(node, zarr.Array):
        notes.damage(f"{name} is a group, not an array: ignored")
        return None
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if node.ndim not in ndims:
        notes.damage(f"{name} has shape {node.shape}, expected {ndims[0]} dimensions: ignored")
        return None
    if 0 in node.shape:
        return np.zeros(node.shape, node.dtype)
    try:
        return np.asarray(node[...])
    except Exception as exc:  # a corrupted chunk must not stop the whole report
        notes.damage(f"{name} could not be read ({type(exc).__name__}: {exc}): ignored")
        return None


def _first(mappings, keys, default=None):
    for m in mappings:
        if not isinstance(m, dict):
            continue
        for k in keys:
            if m.get(k) is not None:
                return m[k]
    return default


def set_aside_components(raw: Any) -> dict[int, str]:
    """Normalise the several ways of listing set-aside components to ``{index: reason}``.

    Accepts a list of ints, a ``{index: reason}`` mapping (keys may be strings), or a
    list of ``{"component"|"index": i, "reason": str}`` records.
    """
    out: dict[int, str] = {}
    if raw is None:
        return out
    if isinstance(raw, dict):
        items = raw.items()
    else:
        items = []
        for r in raw if isinstance(raw, (list, tuple)) else [raw]:
            if isinstance(r, dict):
                items.append((_first([r], ("component", "index", "id")), r.get("reason", "")))
            else:
                items.append((r, ""))
    for k, reason in items:
        try:
            out[int(k)] = "" if reason is None else str(reason)
        except (TypeError, ValueError):
            continue
    return out


def _pair(v, default=1) -> tuple[int, int]:
    if v is None:
        return (default, default)
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def _calibration(meta: dict, input_meta: dict, pattern_shape, input_shape) -> Calibration:
    inp = meta.get("input") if isinstance(meta.get("input"), dict) else {}
    inp_meta = meta.get("input_meta") if isinstance(meta.get("input_meta"), dict) else {}
    sources = [meta, inp, inp_meta, input_meta]
    scan = _first(sources, ("scan_step",))
    recip = _first(sources, ("reciprocal_scale",))
    cal = {}
    nav_bin = _pair(meta.get("nav_binning"))
    if isinstance(scan, dict) and isinstance(scan.get("value"), (int, float)) and scan["value"] > 0:
        cal["scan_step"] = float(scan["value"]) * nav_bin[0]
        cal["scan_units"] = str(scan.get("units") or "")
    if isinstance(recip, dict) and isinstance(recip.get("value"), (int, float)) and recip["value"] > 0:
        # the result patterns may be binned on the detector as well: derive the factor
        # from the input and result detector sizes when both are known, else from params
        factor = 1.0
        if "detector_binning" in meta and recip is meta.get("reciprocal_scale"):
            pass  # the result's own scale, written per binned pixel (spedflow >= 0.16)
        elif input_shape is not None and pattern_shape is not None and pattern_shape[0] > 0:
            factor = input_shape[-2] / pattern_shape[0]
        else:
            pre = (meta.get("params") or {}).get("preprocess") or {}
            factor = float(_pair(_first([pre], ("sig_binning", "detector_binning")))[0])
        cal["k_scale"] = float(recip["value"]) * factor
        cal["k_units"] = str(recip.get("units") or "")
    return Calibration(**cal)


def input_store_path(meta: dict, result_path) -> str | None:
    """The input store recorded in the result attrs, if it exists on this machine.

    A run records the path it was given, which may be relative to the directory it ran
    in. A relative path is looked for relative to the result's folder, then to the
    current directory; any path, then by its name beside the result (``spedflow
    demo`` writes both into one folder, which may have moved). The result itself is
    never taken for its input."""
    inp = meta.get("input")
    cand = inp if isinstance(inp, str) else (_first([inp], ("path", "store", "url")) if isinstance(inp, dict) else None)
    if not isinstance(cand, str) or not cand:
        return None
    p = Path(cand)
    here = Path(result_path).parent
    tries = [p] if p.is_absolute() else [here / p, p]
    if p.name not in ("", ".", ".."):
        tries.append(here / p.name)
    own = Path(result_path).resolve()
    for q in tries:
        if q.exists() and q.resolve() != own:
            return str(q)
    return None


def _peak_table(group: zarr.Group, notes: _Notes):
    """The ``peaks`` array, or None: absent, or not an (M, >= 5) array (damage, noted)."""
    if "peaks" not in group:
        return None
    peaks = group["peaks"]
    if not isinstance(peaks, zarr.Array) or peaks.ndim != 2 or peaks.shape[1] < 5:
        notes.damage(f"peaks has shape {getattr(peaks, 'shape', '?')}, expected (M, 5): ignored")
        return None
    return peaks


def _peak_histogram(group: zarr.Group, shape, notes: _Notes) -> tuple[int | None, np.ndarray | None]:
    """Count peak positions per detector pixel, reading the table in slabs."""
    peaks = _peak_table(group, notes)
    if peaks is None:
        return None, None
    m = int(peaks.shape[0])
    if shape is None:
        return m, None
    ky, kx = shape
    hist = np.zeros(ky * kx, np.int64)
    step = max(1, min(m, 2_000_000))
    for start in range(0, m, step):
        try:
            slab = np.asarray(peaks[start:start + step, 2:4])
        except Exception as exc:  # a corrupted chunk must not stop the whole report
            notes.damage(f"peaks could not be read ({type(exc).__name__}: {exc}): ignored")
            return m, None
        iy = np.rint(slab[:, 0]).astype(np.int64)
        ix = np.rint(slab[:, 1]).astype(np.int64)
        ok = (iy >= 0) & (iy < ky) & (ix >= 0) & (ix < kx)
        hist += np.bincount(iy[ok] * kx + ix[ok], minlength=ky * kx)
    return m, hist.reshape(ky, kx)


def load_result(path, *, store_path=None, segments_only: bool = False) -> ResultView:
    """Read everything the report needs from a result store.

    Parameters
    ----------
    path : str or Path
        The result store (``spedflow segment --out``).
    store_path : str or Path, optional
        The input store; used only for calibration when the result attrs lack it.
    segments_only : bool
        Read only ``segments/maps`` and ``segments/patterns`` (and the attrs).

    Raises
    ------
    InputError
        ``path`` is missing or not a spedflow result store.
    """
    g, meta = _open(path)
    notes = _Notes()
    method = str(meta.get("method", "unknown"))
    v = ResultView(path=Path(path), meta=meta, method=method, notes=notes)
    v.maps = _array(g, "segments/maps", 3, notes)
    v.patterns = _array(g, "segments/patterns", 3, notes)
    if not segments_only:
        v.annular = _array(g, "overview/annular_vdf", 2, notes)
        v.totals = _array(g, "overview/total_counts", 2, notes)
        v.mean_pattern = _array(g, "overview/mean_pattern", 2, notes)
        v.beam_centres = _array(g, "beam/centres", 3, notes)
        v.beam_fitted = _array(g, "beam/fitted", 3, notes)
        v.vectors = _array(g, "vectors", 2, notes)
        v.segment_vectors = _array(g, "vdf/segment_vectors", (1, 2), notes)
        v.segment_intensities = _array(g, "vdf/segment_intensities", (1, 2), notes)
        v.factors = _array(g, "nmf/factors", 3, notes)
        v.loadings = _array(g, "nmf/loadings", 3, notes)
        v.explained_variance_ratio = _array(g, "scree/explained_variance_ratio", 1, notes)
        v.segment_component = _array(g, "segments/component", 1, notes)
        hist = _array(g, "overview/peak_histogram", 2, notes)
        if hist is not None and v.pattern_shape is not None and hist.shape == v.pattern_shape:
            v.peak_histogram = hist
            table = _peak_table(g, notes)
            v.n_peaks = int(table.shape[0]) if table is not None else int(round(float(hist.sum())))
        else:
            v.n_peaks, v.peak_histogram = _peak_histogram(g, v.pattern_shape, notes)

        if v.maps is not None and v.patterns is not None and v.maps.shape[0] != v.patterns.shape[0]:
            notes.damage(f"segments/maps has {v.maps.shape[0]} segments but segments/patterns "
                         f"{v.patterns.shape[0]}: per-segment figures use the first "
                         f"{min(v.maps.shape[0], v.patterns.shape[0])}")
        if v.vectors is not None and v.vectors.shape[-1] != 2:
            notes.damage(f"vectors has shape {v.vectors.shape}, expected (N, 2): ignored")
            v.vectors = None
        for name in ("beam_centres", "beam_fitted"):
            a = getattr(v, name)
            if a is not None and a.shape[-1] != 2:
                notes.damage(f"beam/{name[5:]} has shape {a.shape}, expected (Y, X, 2): ignored")
                setattr(v, name, None)

        # NMF bookkeeping may sit in the top-level attrs, a nested "nmf" dict or the group attrs
        try:
            nmf_attrs = dict(g["nmf"].attrs) if "nmf" in g else {}
        except Exception:
            nmf_attrs = {}
        nmf_attrs = {**nmf_attrs, **dict(nmf_attrs.get("spedflow", {}) or {})}
        sources = [meta.get("nmf") if isinstance(meta.get("nmf"), dict) else {}, meta, nmf_attrs]
        n = _first(sources, ("n_components", "E", "chosen_n_components"))
        if isinstance(n, (int, float)) and not isinstance(n, bool):
            v.n_components = int(n)
        elif v.factors is not None:
            v.n_components = int(v.factors.shape[0])
        reason = _first(sources, ("n_components_reason", "reason", "why"))
        v.n_components_reason = None if reason is None else str(reason)
        v.set_aside = set_aside_components(_first(
            sources, ("components_set_aside", "set_aside", "set_aside_components",
                      "background_components", "discarded")))

        ev = meta.get("evaluation")
        v.evaluation = dict(ev) if isinstance(ev, dict) else None

    input_meta, input_shape = {}, None
    sp = store_path or input_store_path(meta, path)
    if sp is not None:
        try:  # only attrs and the shape of data are read here
            sg = zarr.open_group(str(sp), mode="r")
            input_meta = dict(sg.attrs.get("spedflow", {}))
            if "data" in sg:
                input_shape = tuple(sg["data"].shape)
        except Exception as exc:
            notes.append(f"input store {str(sp)!r} could not be opened ({type(exc).__name__}): "
                         "calibration from the result attrs only")
    if input_shape is None:
        inp = meta.get("input") if isinstance(meta.get("input"), dict) else {}
        shp = _first([inp], ("shape",))
        if isinstance(shp, (list, tuple)) and len(shp) == 4:
            input_shape = tuple(int(s) for s in shp)
    v.calibration = _calibration(meta, input_meta, v.pattern_shape, input_shape)
    return v


def find_param(params, *words: str) -> float | None:
    """The largest positive number in nested ``params`` whose key contains all ``words``.

    Used to pick up e.g. the virtual aperture radius (``"aperture", "radius"``) whatever
    stage section and exact key name the workflow used.
    """
    best = None
    stack = [params]
    while stack:
        d = stack.pop()
        if not isinstance(d, dict):
            continue
        for k, v in d.items():
            if isinstance(v, dict):
                stack.append(v)
            elif (all(w in str(k) for w in words) and isinstance(v, (int, float))
                  and not isinstance(v, bool) and v > 0):
                best = max(best or 0.0, float(v))
    return best


def nice_length(span: float) -> float:
    """A 1-2-5 round number near a fifth of ``span`` (for scale bars)."""
    if not span > 0 or not math.isfinite(span):
        return 1.0
    target = span / 5
    exp = 10 ** math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * exp <= target:
            return m * exp
    return exp
