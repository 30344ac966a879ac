"""Score a segmentation against the ground truth of a simulated store.

A segment is predicted where its map is > 0. Truth masks are binned to the
result's navigation resolution (a binned pixel belongs to a crystal when more
than half of its area does), every truth crystal is compared with every
segment by intersection over union (IoU), and truth and segments are paired
one-to-one by the Hungarian assignment maximising the total IoU. A pair counts
as a match when its IoU reaches ``iou_threshold``. Patterns of matched pairs
are compared by the Pearson correlation outside a central disc (the truth
patterns hold no direct beam).
"""

from __future__ import annotations

import logging

import math
from pathlib import Path

import numpy as np
import zarr
from scipy.optimize import linear_sum_assignment

from .config import check_range
from .errors import InputError, ParameterError

__all__ = ["score_segmentation", "evaluate", "format_evaluation", "bin_masks"]


def _binning(nav_binning) -> tuple[int, int]:
    if isinstance(nav_binning, (list, tuple)):
        if len(nav_binning) != 2:
            raise ParameterError(f"`nav_binning` must be an integer or a pair (got {nav_binning!r})")
        by, bx = nav_binning
    else:
        by = bx = nav_binning
    for v in (by, bx):
        check_range("nav_binning", v, low=1, integer=True)
    return int(by), int(bx)


def bin_masks(masks: np.ndarray, out_shape: tuple[int, int], nav_binning=1) -> np.ndarray:
    """Bin boolean masks: a binned pixel is set where more than half its area is.

    Parameters
    ----------
    masks : (C, Y, X) bool array
    out_shape : (Y', X')
        Result resolution: ``Y // b`` (trailing rows cropped) or
        ``ceil(Y / b)`` (a partial last block, judged on its own area).
    nav_binning : int or (int, int)

    Returns
    -------
    (C, Y', X') bool array
    """
    by, bx = _binning(nav_binning)
    masks = np.asarray(masks, bool)
    C, Y, X = masks.shape
    oy, ox = (int(s) for s in out_shape)
    for name, n, b, o in (("Y", Y, by, oy), ("X", X, bx, ox)):
        if o not in (n // b, math.ceil(n / b)):
            raise InputError(f"result scan size {o} along {name} does not match the truth's {n} "
                             f"binned by {b} (expected "
                             + (f"{n // b}" if n % b == 0 else f"{n // b} or {math.ceil(n / b)}")
                             + "): was it made from another store?")
    if (by, bx) == (1, 1):
        return masks.copy()
    pad = np.zeros((C, oy * by, ox * bx), bool)
    valid = np.zeros((oy * by, ox * bx), bool)
    h, w = min(Y, oy * by), min(X, ox * bx)
    pad[:, :h, :w] = masks[:, :h, :w]
    valid[:h, :w] = True
    count = pad.reshape(C, oy, by, ox, bx).sum(axis=(2, 4))
    area = valid.reshape(oy, by, ox, bx).sum(axis=(1, 3))
    return 2 * count > area


def _bin_patterns(patterns: np.ndarray, out_shape) -> np.ndarray:
    """Sum-bin truth patterns to the result's detector size (integer factors only)."""
    Ky, Kx = patterns.shape[1:]
    oy, ox = (int(s) for s in out_shape)
    if (Ky, Kx) == (oy, ox):
        return patterns
    if oy == 0 or ox == 0 or Ky % oy or Kx % ox:
        raise InputError(f"result patterns are {oy}x{ox} px but the truth's are {Ky}x{Kx}: "
                         "not an integer detector binning")
    fy, fx = Ky // oy, Kx // ox
    return patterns.reshape(len(patterns), oy, fy, ox, fx).sum(axis=(2, 4))


def _exclusion_radius(truth_patterns: np.ndarray) -> float:
    """Largest central disc in which no truth pattern exceeds 1 % of its maximum.

    The truth holds only Bragg spots, so this disc contains none of the truth's
    signal; excluding it removes the direct beam and glare of the result
    patterns from the comparison without losing a truth spot.
    """
    C, Ky, Kx = truth_patterns.shape
    if C == 0:
        return 0.0
    peak = truth_patterns.reshape(C, Ky * Kx).max(axis=1)
    rel = truth_patterns / np.where(peak > 0, peak, 1.0)[:, None, None]
    signal = (rel > 0.01).any(axis=0)
    if not signal.any():
        return 0.0
    ky, kx = np.indices((Ky, Kx))
    r = np.hypot(ky - Ky // 2, kx - Kx // 2)
    return float(r[signal].min())


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def score_segmentation(maps: np.ndarray, patterns: np.ndarray, truth_masks: np.ndarray,
                       truth_patterns: np.ndarray, *, nav_binning: int | tuple[int, int] = 1,
                       iou_threshold: float = 0.5, exclude_radius: float | None = None) -> dict:
    """Compare segments with the simulated truth.

    Parameters
    ----------
    maps : (S, Y', X') float array
        Segment maps; a segment is where its map is > 0.
    patterns : (S, Ky', Kx') float array
        Segment patterns, beam at (Ky' // 2, Kx' // 2).
    truth_masks : (C, Y, X) bool array
        Truth crystal masks at full scan resolution.
    truth_patterns : (C, Ky, Kx) float array
        Truth crystal patterns (no direct beam). Summed in blocks when the
        result is detector-binned by an integer factor.
    nav_binning : int or (int, int)
        Navigation binning of the result (``Y' = Y // b`` or ``ceil(Y / b)``).
    iou_threshold : float
        Smallest IoU of a matched pair, in (0, 1]. 0.5 makes a match unique:
        two disjoint segments cannot both reach it against one crystal.
    exclude_radius : float or None
        Radius (result detector px) of the central disc left out of the pattern
        correlation. None: the largest disc about the beam in which no truth
        pattern exceeds 1 % of its maximum.

    Returns
    -------
    dict
        ``n_truth``, ``n_segments``, ``n_matched``, ``recall`` (matched / truth),
        ``precision`` (matched / segments), ``mean_iou`` (matched pairs),
        ``mean_best_iou`` (best IoU of each truth crystal, averaged),
        ``mean_correlation`` (matched pairs), ``iou`` (C, S) list of lists,
        ``per_crystal`` list of dicts ``{truth, segment, iou, best_iou,
        correlation}`` (segment and correlation None when unmatched),
        ``unmatched_segments``, ``areas`` (each crystal's scan positions at the
        result's binning), and the settings used. Every ratio is 0 (never
        NaN) when its denominator is 0.
    """
    maps = np.asarray(maps)
    patterns = np.asarray(patterns)
    truth_masks = np.asarray(truth_masks)
    truth_patterns = np.asarray(truth_patterns, float)
    for name, arr in (("maps", maps), ("patterns", patterns), ("truth_masks", truth_masks),
                      ("truth_patterns", truth_patterns)):
        if arr.ndim != 3:
            raise InputError(f"`{name}` must be 3-D; got shape {arr.shape}")
    if len(maps) != len(patterns):
        raise InputError(f"`maps` has {len(maps)} segments but `patterns` has {len(patterns)}")
    if len(truth_masks) != len(truth_patterns):
        raise InputError(f"`truth_masks` has {len(truth_masks)} crystals but `truth_patterns` "
                         f"has {len(truth_patterns)}")
    check_range("iou_threshold", iou_threshold, low=0, high=1, low_open=True)
    check_range("exclude_radius", exclude_radius, low=0, allow_none=True)
    binning = _binning(nav_binning)
    truth = bin_masks(truth_masks, maps.shape[1:], binning)
    tpat = _bin_patterns(truth_patterns, patterns.shape[1:])
    if exclude_radius is None:
        exclude_radius = _exclusion_radius(tpat)

    C, S = len(truth), len(maps)
    n_pix = truth.shape[1] * truth.shape[2]
    t = truth.reshape(C, n_pix).astype(np.float64)
    p = (maps > 0).reshape(S, n_pix).astype(np.float64)
    inter = t @ p.T
    union = t.sum(axis=1)[:, None] + p.sum(axis=1)[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)

    Ky, Kx = patterns.shape[1:]
    ky, kx = np.indices((Ky, Kx))
    keep = (np.hypot(ky - Ky // 2, kx - Kx // 2) >= exclude_radius).ravel()

    rows, cols = linear_sum_assignment(-iou) if C and S else (np.zeros(0, int), np.zeros(0, int))
    assigned = dict(zip(rows.tolist(), cols.tolist()))
    per, matched_iou, matched_corr = [], [], []
    for c in range(C):
        s = assigned.get(c)
        ok = s is not None and iou[c, s] >= iou_threshold
        corr = _pearson(tpat[c].ravel()[keep], np.asarray(patterns[s], float).ravel()[keep]) if ok else None
        per.append({"truth": c, "segment": int(s) if ok else None,
                    "iou": float(iou[c, s]) if ok else 0.0,
                    "best_iou": float(iou[c].max()) if S else 0.0, "correlation": corr})
        if ok:
            matched_iou.append(float(iou[c, s]))
            matched_corr.append(corr)
    n_matched = len(matched_iou)
    matched_segments = {d["segment"] for d in per if d["segment"] is not None}

    def ratio(a, b):
        return float(a / b) if b else 0.0

    return {
        "n_truth": C, "n_segments": S, "n_matched": n_matched,
        "recall": ratio(n_matched, C), "precision": ratio(n_matched, S),
        "mean_iou": ratio(sum(matched_iou), n_matched),
        "mean_best_iou": ratio(float(iou.max(axis=1).sum()) if S else 0.0, C),
        "mean_correlation": ratio(sum(matched_corr), n_matched),
        "per_crystal": per,
        "unmatched_segments": [s for s in range(S) if s not in matched_segments],
        "iou": iou.tolist(),
        "areas": t.sum(axis=1).astype(int).tolist(),
        "iou_threshold": float(iou_threshold), "nav_binning": list(binning),
        "exclude_radius": float(exclude_radius),
    }


def _open(path, what: str) -> zarr.Group:
    p = Path(str(path))
    if "://" not in str(path) and not p.exists():
        raise InputError(f"{what} {str(path)!r} does not exist")
    try:
        return zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a non-store
        raise InputError(f"{what} {str(path)!r} is not a readable Zarr store "
                         f"({type(exc).__name__}: {exc})") from None


def _array(group: zarr.Group, name: str, where: str, hint: str) -> np.ndarray:
    try:
        arr = group[name]
    except KeyError:
        raise InputError(f"{where} has no {name!r}; {hint}") from None
    if not isinstance(arr, zarr.Array):
        raise InputError(f"{where}/{name} is a group, not an array")
    return arr[...]


def evaluate(result_path, store_path=None, *, iou_threshold: float = 0.5) -> dict:
    """Score a result store against the truth in the simulated input store.

    Parameters
    ----------
    result_path : path
        Result store with ``segments/maps`` (S, Y', X'), ``segments/patterns``
        (S, Ky', Kx') and attrs ``spedflow.nav_binning``.
    store_path : path, optional
        Input store made by ``spedflow simulate`` (has ``truth/masks`` and
        ``truth/patterns``). Default: the input the result records, if it exists.
    iou_threshold : float
        See :func:`score_segmentation`.

    Returns
    -------
    dict
        :func:`score_segmentation`'s scores plus ``result``, ``store``, ``groups`` (the
        truth orientation group of each crystal), ``method`` (the result's workflow)
        and ``min_size`` (the result's ``watershed.min_size``).

    Raises
    ------
    InputError
        A missing store or array, a store without truth, disagreeing shapes.
    """
    check_range("iou_threshold", iou_threshold, low=0, high=1, low_open=True)
    res = _open(result_path, "result")
    kind = dict(res.attrs.get("spedflow", {})).get("kind")
    if kind is not None and kind != "result" and "segments" not in res and store_path is None:
        raise InputError(f"{str(result_path)!r} is an input store, not a result: give the result "
                         "of `spedflow segment` first, then the simulated store (RESULT [STORE])")
    if store_path is None:
        from .report._load import input_store_path
        store_path = input_store_path(dict(res.attrs.get("spedflow", {})), result_path)
        if store_path is None:
            raise InputError(f"result {str(result_path)!r} does not record an input store that "
                             "exists here; give the simulated store it was made from")
    store = _open(store_path, "store")
    if "truth" not in store:
        swapped = "truth" in res and dict(store.attrs.get("spedflow", {})).get("kind") == "result"
        raise InputError(f"store {str(store_path)!r} has no truth/ group; only stores made by "
                         "`spedflow simulate` can be evaluated" + (
                             f" (it is a result, and {str(result_path)!r} the simulated store: "
                             "the arguments are the other way round, RESULT then STORE)"
                             if swapped else ""))
    rwhere, twhere = str(result_path), f"{store_path}/truth"
    maps = _array(res, "segments/maps", rwhere, "is it a spedflow result store?")
    patterns = _array(res, "segments/patterns", rwhere, "is it a spedflow result store?")
    truth = store["truth"]
    masks = _array(truth, "masks", twhere, "the truth is incomplete")
    tpat = _array(truth, "patterns", twhere, "the truth is incomplete")
    groups = _array(truth, "groups", twhere, "the truth is incomplete") if "groups" in truth else None
    meta = dict(res.attrs.get("spedflow", {}))
    made = (meta.get("input_meta") or {}).get("created")
    have = dict(store.attrs.get("spedflow", {})).get("created")
    if made and have and made != have:
        logging.getLogger("spedflow").warning(
            "result %s was made from another store than %s (created %s, not %s): the scores "
            "compare it with data it was not made from", rwhere, store_path, made, have)
    nav = meta.get("nav_binning", 1)
    if nav is None:
        nav = 1
    try:
        nav = _binning(nav)
    except ParameterError as exc:
        raise InputError(f"result {rwhere!r} attrs: {exc}") from None
    scores = score_segmentation(maps, patterns, masks, tpat, nav_binning=nav,
                                iou_threshold=iou_threshold)
    scores["result"] = str(result_path)
    scores["store"] = str(store_path)
    scores["groups"] = groups.tolist() if groups is not None else None
    scores["method"] = meta.get("method")
    # what a reader needs to see why a crystal was missed (format_evaluation's notes)
    scores["min_size"] = ((meta.get("params") or {}).get("watershed") or {}).get("min_size")
    return scores


def format_evaluation(scores: dict) -> str:
    """A short text table of :func:`evaluate`'s or :func:`score_segmentation`'s scores."""
    lines = []
    if scores.get("result"):
        method = f"{scores['method'].upper()} result" if scores.get("method") else "result"
        lines.append(f"{method} {scores['result']} against the truth of {scores['store']}")
    lines += [
        f"truth crystals {scores['n_truth']}, segments {scores['n_segments']}, "
        f"matched {scores['n_matched']} (IoU >= {scores['iou_threshold']:g})",
        f"recall {scores['recall']:.3f}  precision {scores['precision']:.3f}  "
        f"mean IoU {scores['mean_iou']:.3f}  mean best IoU {scores['mean_best_iou']:.3f}  "
        f"mean pattern correlation {scores['mean_correlation']:.3f}",
        "",
        f"{'crystal':>7} {'group':>5} {'segment':>7} {'IoU':>6} {'best IoU':>8} {'corr':>6}",
    ]
    groups = scores.get("groups") or [None] * scores["n_truth"]
    for row, g in zip(scores["per_crystal"], groups):
        seg = "-" if row["segment"] is None else str(row["segment"])
        corr = "-" if row["correlation"] is None else f"{row['correlation']:.3f}"
        lines.append(f"{row['truth']:>7} {'-' if g is None else g:>5} {seg:>7} "
                     f"{row['iou']:>6.3f} {row['best_iou']:>8.3f} {corr:>6}")
    if scores.get("unmatched_segments"):
        lines.append(f"unmatched segments: {', '.join(map(str, scores['unmatched_segments']))}")
    if any(g is not None for g in groups):
        lines.append("group: the truth's orientation; crystals of one group share their "
                     "diffraction spots")
    lines += _miss_notes(scores, groups)
    return "\n".join(lines)


def _miss_notes(scores: dict, groups: list) -> list[str]:
    """One line per crystal without a match that says what may explain it: smaller than
    the watershed's smallest segment, or of one orientation with a matched crystal (the
    VDF images and the NMF components of one orientation are one)."""
    rows, areas, min_size = scores["per_crystal"], scores.get("areas"), scores.get("min_size")
    matched = {r["truth"] for r in rows if r["segment"] is not None}
    notes = []
    for r, g in zip(rows, groups):
        if r["segment"] is not None:
            continue
        c = r["truth"]
        if areas is not None and min_size is not None and areas[c] < min_size:
            notes.append(f"crystal {c}: {areas[c]} scan positions, under watershed.min_size = "
                         f"{min_size}")
        elif g is not None:
            twins = [t for t, h in zip((q["truth"] for q in rows), groups) if h == g and t in matched]
            if twins:
                notes.append(f"crystal {c}: of one orientation with crystal {twins[0]}, which is "
                             "matched; their diffraction spots are the same, so one segment may "
                             "cover both")
    return notes
