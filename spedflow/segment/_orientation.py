"""Joining NMF components of one crystal by the positions of their spots.

A crystal's orientation fixes where its reflections fall on the detector; its thickness
and bending change how bright they are (dynamical diffraction, Pendelloesung fringes),
not where they are. NMF then needs several components for one crystal whose thickness
varies across it: their patterns share spot *positions* but differ in relative spot
*intensities* (pattern correlation as low as 0.04), and their loadings split the crystal
between them (complementary: loading correlation negative). The correlation merge of
:func:`~spedflow.segment.merge_components` keeps such components apart; this module
joins them when

1. their spot sets coincide: each component's spot weight (local maxima of its factor
   outside the beam, intensity-weighted) lies, for at least ``spot_match`` of it, within
   a spot radius of a spot of the other, in both directions; and
2. their loading supports touch or overlap (a crystal is one connected region), and
3. neither lies *on top* of the other: a component lying (``nested_cover``) inside
   another one's support where the two loadings sum to ``nested_gain`` times their sum
   over the rest of it is a second crystal of the same orientation over the first (the
   benchmark layout's overlapping pair: summed ratio 1.8-2.5), not a thickness
   component, which trades area with the other (ratio 1.0-1.5 measured); and
4. (with ``lattice_significance``) their spots lie on one lattice: neither holds a
   second lattice beside the other's spots, nor lies mostly off the other's clear
   lattice (:func:`orientation_links`).

Crystals of different orientations share few spot positions (a twin shares one
systematic row: about a third); crystals of one orientation apart in the scan do not
touch.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._lattice import off_lattice, second_lattice

__all__ = ["factor_spots", "azimuthal_residual", "spot_match", "orientation_links", "join_groups",
           "drop_spanning_parts", "drop_duplicate_segments", "covered_by_others"]

#: Position scatter of a component's spot (a local maximum on the pixel grid), px.
SPOT_TOLERANCE = 1.0


def factor_spots(factor: np.ndarray, mask: np.ndarray, *, radius: float, min_g: float = 0.0,
                 noise_k: float = 5.0, rel: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Significant spots of one component pattern.

    The azimuthal median about the detector centre (where alignment puts the beam) is
    subtracted (diffuse scattering, film); a spot is a local maximum over a
    ``(2 ceil(radius) + 1)`` window, outside ``mask`` and at least ``min_g`` from the
    centre, standing ``noise_k`` robust noise levels (MAD of the residual) and ``rel``
    of the strongest spot above that background.

    Returns
    -------
    positions : (n, 2) float64 (ky, kx) of the spots; heights : (n,) float64 above the
    background; lit : (m, 2) float64, every local maximum above ``noise_k`` noise levels
    (without the ``rel`` floor): what another component's spots are matched against.
    """
    keep = ~np.asarray(mask, bool)
    ky, kx = keep.shape
    yy, xx = np.indices(keep.shape)
    dist = np.hypot(yy - ky // 2, xx - kx // 2)
    res = azimuthal_residual(factor, mask)
    if not keep.any():
        return np.zeros((0, 2)), np.zeros(0), np.zeros((0, 2))
    r = res[keep]
    noise = 1.4826 * float(np.median(np.abs(r - np.median(r))))
    size = 2 * int(np.ceil(radius)) + 1
    peak = (res == ndimage.maximum_filter(res, size=size, mode="constant")) & keep & (res > 0)
    peak &= dist >= min_g
    if not peak.any():
        return np.zeros((0, 2)), np.zeros(0), np.zeros((0, 2))
    lit = peak & (res > noise_k * noise)
    peak &= res > max(noise_k * noise, rel * float(res[peak].max()))
    return np.argwhere(peak).astype(np.float64), res[peak], np.argwhere(lit).astype(np.float64)


def azimuthal_residual(pattern: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``pattern`` minus its median on each 1-px ring about the detector centre (where
    alignment puts the beam), outside ``mask``; 0 on ``mask``: float64, what
    :func:`factor_spots` finds spots on."""
    f = np.asarray(pattern, np.float64)
    keep = ~np.asarray(mask, bool)
    ky, kx = f.shape
    yy, xx = np.indices(f.shape)
    rb = np.rint(np.hypot(yy - ky // 2, xx - kx // 2)).astype(np.intp)
    vals, bins = f[keep], rb[keep]
    order = np.lexsort((vals, bins))
    vals, bins = vals[order], bins[order]
    starts = np.searchsorted(bins, np.arange(rb.max() + 1))
    ends = np.searchsorted(bins, np.arange(rb.max() + 1), side="right")
    med = np.zeros(rb.max() + 1)
    filled = ends > starts
    med[filled] = [np.median(vals[s:e]) for s, e in zip(starts[filled], ends[filled])]
    return np.where(keep, f - med[rb], 0.0)


def spot_match(pos_a: np.ndarray, h_a: np.ndarray, pos_b: np.ndarray, radius: float) -> float:
    """Fraction of a's spot weight lying within ``radius`` of one of b's spots (0 if a has none)."""
    if len(pos_a) == 0 or len(pos_b) == 0 or h_a.sum() <= 0:
        return 0.0
    d = np.hypot(pos_a[:, None, 0] - pos_b[None, :, 0], pos_a[:, None, 1] - pos_b[None, :, 1])
    return float(h_a[d.min(axis=1) <= radius].sum() / h_a.sum())


#: Index of the ``lit`` maxima in :func:`factor_spots`' result.
LIT = 2


def orientation_links(factors: np.ndarray, loadings: np.ndarray, *, mask: np.ndarray,
                      radius: float, min_g: float, spot_threshold: float,
                      support_level: float, nested_cover: float, nested_gain: float,
                      lattice_significance: float = 0.0):
    """Pairs of components of one orientation whose supports touch and are not nested.

    With ``lattice_significance`` > 0, a pair is not linked when either component's
    spots off the other's reciprocal lattice lie on a lattice of their own at that
    significance (:func:`~spedflow.segment._lattice.second_lattice`): a component of a
    small crystal lying on a larger one carries the larger one's spots too, and
    matches them, but it holds a second crystal. Nor when most of either one's spots
    lie off a clear lattice of the other's (:func:`~spedflow.segment._lattice.off_lattice`):
    NMF leaves each of two touching crystals' components a weak copy of the other's
    spots (cross-talk), so their spots match both ways, and a crystal showing too few
    reflections for a cell of its own was joined to its neighbour (a foreign
    simulator's set lost a crystal of two independent reflections that way). This
    holds while the copies stay under :func:`factor_spots`' floor (``rel``, 5 % of a
    component's strongest spot); stronger copies count among each one's own spots,
    and such a pair is joined as before.

    Returns
    -------
    links : (E, E) bool, symmetric; match : (E, E) float, the smaller of the two
    directional spot matches (:func:`spot_match`).
    """
    e = len(factors)
    spots = [factor_spots(f, mask, radius=radius, min_g=min_g) for f in factors]
    match = np.eye(e)
    for i in range(e):
        for j in range(i + 1, e):
            m = min(spot_match(*spots[i][:2], spots[j][LIT], radius), spot_match(*spots[j][:2], spots[i][LIT], radius))
            match[i, j] = match[j, i] = m
    peak = loadings.reshape(e, -1).max(axis=1)
    sup = loadings > support_level * np.maximum(peak, 1e-30)[:, None, None]
    grown = [ndimage.binary_dilation(s) for s in sup]
    centre = np.array([factors.shape[1] // 2, factors.shape[2] // 2], np.float64)
    links = np.zeros((e, e), bool)
    for i in range(e):
        for j in range(i + 1, e):
            if match[i, j] < spot_threshold or not (grown[i] & sup[j]).any():
                continue
            small, large = (i, j) if sup[i].sum() <= sup[j].sum() else (j, i)
            if _on_top(loadings[small] / max(peak[small], 1e-30), loadings[large] / max(peak[large], 1e-30),
                       sup[small], sup[large], nested_cover, nested_gain):
                continue
            if lattice_significance > 0 and any(
                    second_lattice(spots[p][0] - centre, spots[q][0] - centre,
                                   tolerance=SPOT_TOLERANCE, significance=lattice_significance)
                    or off_lattice(spots[p][0] - centre, spots[q][0] - centre,
                                   tolerance=SPOT_TOLERANCE, significance=lattice_significance)
                    for p, q in ((i, j), (j, i))):
                continue
            links[i, j] = links[j, i] = True
    return links, match


def join_groups(groups, links: np.ndarray, match: np.ndarray, guard: float):
    """Join groups (index arrays into the components) that a link connects, single
    linkage over links, each join allowed only if every pair of components across the
    two groups has a spot match of at least ``guard`` (no chain through a mixed
    component). Groups ordered by smallest member."""
    groups = [np.asarray(g) for g in groups]
    changed = True
    while changed:
        changed = False
        best = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                ga, gb = groups[a], groups[b]
                if not links[np.ix_(ga, gb)].any():
                    continue
                if match[np.ix_(ga, gb)].min() < guard:
                    continue
                s = match[np.ix_(ga, gb)][links[np.ix_(ga, gb)]].max()
                if best is None or s > best[0]:
                    best = (s, a, b)
        if best is not None:
            _, a, b = best
            groups[a] = np.sort(np.concatenate([groups[a], groups[b]]))
            del groups[b]
            changed = True
    return sorted(groups, key=lambda g: g[0])


def _on_top(w_small, w_large, s_small, s_large, cover: float, gain: float) -> bool:
    """Whether the smaller component lies on top of the larger one: at least ``cover`` of
    its support inside the larger's, and the two loadings summed there at least ``gain``
    times their sum over the rest of the larger's support. Thickness components of one
    crystal share its area (where one rises the other falls: the sum stays near one
    component's level); a second crystal over the first adds to it (the sum doubles)."""
    n = int(s_small.sum())
    rest = s_large & ~s_small
    if n == 0 or not rest.any() or (s_small & s_large).sum() < cover * n:
        return False
    total = w_small + w_large
    return bool(total[s_small].mean() >= gain * total[rest].mean())



#: :func:`drop_spanning_parts`: a component with parts inside the segments of this many
#: other components spans crystals. Two is not enough: NMF may model a small crystal
#: lying on one crystal together with a band of another (seen on a nested, bent set),
#: and the small crystal's segment, inside the first, is a crystal.
_SPANNED = 3


def drop_spanning_parts(maps: np.ndarray, source: np.ndarray, patterns: np.ndarray, *,
                        mask: np.ndarray, radius: float, min_g: float, containment: float,
                        match: float) -> np.ndarray:
    """Which segments to keep: not the parts of a component that spans crystals.

    A component whose loading covers parts of several crystals (the thick or thin band
    that wedge-shaped crystals share: their intensities vary alike with thickness,
    and one component models it in all of them) is cut by the watershed into one
    segment per crystal, each inside that crystal's own segment, and its pattern holds
    those crystals' spots. Its segments lying at least ``containment`` inside a segment
    of another component are dropped (what they cover is covered) when they lie inside
    segments of ``_SPANNED`` (three) or more other components and at least ``match`` of
    its pattern's spot weight lies on those components' spots (:func:`spot_match`).
    A crystal inside another (its component's only segment), and crystals of one
    orientation inside several others (precipitates: their spots are their own) are
    kept.

    Parameters
    ----------
    maps : (S, Y, X) array
        Segment maps, 0 outside each segment.
    source : (S,) int array
        The (merged) component of each segment.
    patterns : (S, ky, kx) array
        Each segment's pattern (its component's).
    mask, radius, min_g
        As for :func:`factor_spots`.
    containment : float
        Above 1 keeps every segment.
    match : float

    Returns
    -------
    (S,) bool
    """
    from scipy import sparse
    n = len(maps)
    keep = np.ones(n, bool)
    if n < _SPANNED + 1 or containment > 1:
        return keep
    source = np.asarray(source)
    flat = sparse.csr_matrix(np.asarray(maps).reshape(n, -1) > 0, dtype=np.float64)
    area = np.asarray(flat.sum(axis=1)).ravel()
    inter = (flat @ flat.T).toarray()
    inside = (inter >= containment * area[:, None]) & (source[:, None] != source[None, :])
    spots = {}

    def spots_of(i):
        if i not in spots:
            spots[i] = factor_spots(patterns[i], mask, radius=radius, min_g=min_g)
        return spots[i]

    for c in np.unique(source):
        parts = np.flatnonzero((source == c) & inside.any(axis=1))
        containers = {int(np.argmax(np.where(inside[p], inter[p], -1))) for p in parts}
        if len({int(source[b]) for b in containers}) < _SPANNED:
            continue
        pos, heights, _ = spots_of(int(parts[0]))
        theirs = np.concatenate([spots_of(b)[LIT] for b in containers])
        if spot_match(pos, heights, theirs, radius) >= match:
            keep[parts] = False
    return keep


#: :func:`drop_duplicate_segments`: a segment whose area shows less than this fraction of
#: the intensity its component predicts at the component's own reflections is cross-talk.
_MIN_SHOWN = 0.5


def drop_duplicate_segments(maps: np.ndarray, source: np.ndarray, region_pattern, factors,
                            loadings, groups, *, mask: np.ndarray, radius: float, min_g: float,
                            containment: float, min_size: int) -> tuple[np.ndarray, list]:
    """Which segments to keep: not a segment where the data do not show its component.

    NMF's components are not orthogonal: a component whose pattern shares reflections
    with a crystal it does not model takes a small loading over that crystal
    (cross-talk of the factorisation), and the watershed of its map cuts that into a
    segment lying on a crystal that has a segment of its own. The model then claims
    the component's *own* reflections there too, which the data do not show; where the
    component's crystal is (alone, or lying on another crystal), they show at the
    intensity the model gives them.

    Segments are visited from the smallest up. A segment lying at least ``containment``
    inside the union of the (still kept) segments of other components is tested: its
    component's own reflections are the spots (:func:`factor_spots`) of the pattern the
    model predicts over its area (its group's factors, each times its mean loading
    there) lying farther than ``radius`` from every local maximum of the data's mean
    pattern over the rest of those segments; the data's mean pattern over the segment,
    background-subtracted as :func:`factor_spots` does and summed over a disc of
    ``radius / 2`` at those spots, must reach ``_MIN_SHOWN`` (half) of the prediction.
    A segment without own reflections, or whose rest has fewer than ``min_size``
    positions, is kept.

    ``region_pattern`` maps a (Y * X,) bool region to the data's mean pattern there (ky,
    kx), in the units of ``factors`` (E, ky, kx) times ``loadings`` (E, Y, X); ``groups``
    holds each merged component's indices into them. Returns the (S,) bool kept and,
    per segment tested, ``(segment, containers, n_own, shown, dropped)``.
    """
    n = len(maps)
    keep = np.ones(n, bool)
    notes = []
    if n < 2 or containment > 1:  # (the loop tests each segment's cover itself)
        return keep, notes
    source = np.asarray(source)
    sup = np.asarray(maps).reshape(n, -1) > 0
    area = sup.sum(axis=1)
    rd = max(1.0, radius / 2)
    h = int(np.ceil(rd))
    disc = (np.hypot(*np.mgrid[-h:h + 1, -h:h + 1]) <= rd).astype(np.float64)
    flat_l = np.asarray(loadings).reshape(len(loadings), -1)
    for s in np.argsort(area, kind="stable"):
        others = [k for k in np.flatnonzero(keep)
                  if source[k] != source[s] and (sup[k] & sup[s]).any()]
        if not others:
            continue
        union = sup[others].any(axis=0)
        if (union & sup[s]).sum() < containment * area[s]:
            continue
        rest = union & ~sup[s]
        if rest.sum() < min_size:
            continue
        lit = factor_spots(region_pattern(rest), mask, radius=radius, min_g=min_g)[LIT]
        pred = sum(float(flat_l[k][sup[s]].mean()) * np.asarray(factors[k], np.float64)
                   for k in groups[source[s]])
        pos = factor_spots(pred, mask, radius=radius, min_g=min_g)[0]
        if len(pos) and len(lit):
            d = np.hypot(pos[:, None, 0] - lit[None, :, 0], pos[:, None, 1] - lit[None, :, 1])
            pos = pos[d.min(axis=1) > radius]
        if not len(pos):
            continue
        iy, ix = pos[:, 0].astype(np.intp), pos[:, 1].astype(np.intp)
        expect = ndimage.convolve(azimuthal_residual(pred, mask), disc, mode="constant")[iy, ix].sum()
        seen = ndimage.convolve(azimuthal_residual(region_pattern(sup[s]), mask), disc,
                                mode="constant")[iy, ix].sum()
        if expect <= 0:
            continue
        shown = float(seen / expect)
        drop = shown < _MIN_SHOWN
        keep[s] = not drop
        notes.append((int(s), [int(k) for k in others], int(len(pos)), shown, bool(drop)))
    return keep, notes


def covered_by_others(maps: np.ndarray, source: np.ndarray, containment: float) -> np.ndarray:
    """(S,) bool: which segments lie at least ``containment`` inside the union of the
    segments of other components (``source``: each segment's component group)."""
    n = len(maps)
    if n < 2 or containment > 1:
        return np.zeros(n, bool)
    source = np.asarray(source)
    sup = np.asarray(maps).reshape(n, -1) > 0
    out = np.zeros(n, bool)
    for s in range(n):
        others = sup[source != source[s]]
        if len(others):
            inside = (others.any(axis=0) & sup[s]).sum()
            out[s] = inside >= containment * sup[s].sum() and inside > 0
    return out
