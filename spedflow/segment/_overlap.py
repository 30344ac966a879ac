"""Two crystals of one orientation overlapping, found in one segment and cut in two.

Crystals of one orientation light the same reflections, so their VDF images (and NMF
loading maps) are one image, and where two of them overlap the watershed gives one
segment for both (the paper's P3 / P4). Two things still tell such a segment from one
crystal:

- its outline: the union of two convex crystals has two notches where their outlines
  cross, and nothing else (a crystal in projection is convex);
- its intensity: where the two overlap, the beam crosses both, and their intensities
  add: the lens between the notches is brighter than the crystal on either side of it.

:func:`overlap_cut` cuts a segment along the chord joining its two notches when both hold.
Each part is then one crystal, less the half of the lens on the other's side. On every
cached VDF and NMF result of the benchmark suites (four simulators, 98 results each) it
cut the five such unions whose notches were at least 2 scan positions deep, and nothing
else: the unions had a contrast of 1.6-2.1, single crystals with two notches 0.7-1.03,
and a union of two crystals of different orientations along a bright thickness fringe
(a duplicate segment already) 1.3-1.5 (session 33, benchmarks/README.md). Unions whose notches the probe's blur and the
threshold fill in (1-1.4 positions deep, most of them) stay one segment.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

#: A notch counts when it reaches this many scan positions into the convex hull ...
NOTCH_DEPTH = 2.0
#: ... and this fraction of the square root of the segment's area (larger segments'
#: pixelated outlines have deeper random dents).
NOTCH_FRACTION = 0.08
#: Each part must hold at least this fraction of the segment.
MIN_PART = 0.15
#: The lens: within this many positions of the chord; the sides: beyond LENS_GAP.
LENS_HALF_WIDTH = 1.5
LENS_GAP = 3.0
#: The map's pixel signal-to-noise ratio (:func:`~spedflow.segment._watershed.image_snr`)
#: must reach Rose's criterion: on a noisier map the notches and the lens are the noise's
#: (two low-dose maps of single crystals were cut at 1.7 and 2.7; the unions measured
#: 12-24).
MIN_SNR = 5.0


def overlap_cut(image: np.ndarray, contrast: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The two parts of a segment that is two convex crystals overlapping, or None.

    Parameters
    ----------
    image : (Y, X) array
        The segment's map (its intensity; the segment is where it is > 0).
    contrast : float
        How many times the median intensity within ``LENS_HALF_WIDTH`` of the chord
        between the two notches must exceed the median intensity on each side (beyond
        ``LENS_GAP`` of it). 0 never cuts.

    Returns
    -------
    (part_a, part_b) bool arrays, or None
        The segment's positions on either side of the chord, when its outline has
        exactly two notches at least ``max(NOTCH_DEPTH, NOTCH_FRACTION * sqrt(area))``
        deep (the convex hull's distance to its edge at the notch's deepest point), each
        side holds ``MIN_PART`` of it, the lens is ``contrast`` times as bright and the
        map's signal-to-noise ratio is at least ``MIN_SNR``.
    """
    from skimage.morphology import convex_hull_image
    image = np.asarray(image, np.float64)
    seg = image > 0
    area = int(seg.sum())
    if contrast <= 0 or area < 20:
        return None
    box = ndimage.find_objects(seg.astype(np.int8))[0]  # the segment's box, 1 position wider
    box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
    origin = np.array([box[0].start, box[1].start])
    local = image[box]
    # a hole in the map (a zero reading, a NaN) is no notch: notches are the hull's
    # deficits open to its edge
    filled = ndimage.binary_fill_holes(local > 0)
    hull = convex_hull_image(filled)
    notches, n = ndimage.label(hull & ~filled)
    if n < 2:
        return None
    depth = ndimage.distance_transform_edt(np.pad(hull, 1))[1:-1, 1:-1]
    rim = hull & ~ndimage.binary_erosion(hull, border_value=0)
    deep = max(NOTCH_DEPTH, NOTCH_FRACTION * np.sqrt(area))
    labels = np.arange(1, n + 1)
    at = ndimage.maximum_position(depth, notches, labels)
    most = ndimage.maximum(depth, notches, labels)
    open_ = ndimage.maximum(rim, notches, labels)
    points = [np.array(p, np.float64) + origin for p, d, o in zip(at, most, open_)
              if d >= deep and o]
    if len(points) != 2:
        return None
    chord = points[1] - points[0]
    length = float(np.hypot(*chord))
    if length == 0:
        return None
    yy, xx = np.nonzero(seg)
    side = (chord[0] * (xx - points[0][1]) - chord[1] * (yy - points[0][0])) / length
    a, b = side >= 0, side < 0  # (positions on the chord go to the first part)
    if a.sum() < MIN_PART * area or b.sum() < MIN_PART * area:
        return None
    values = image[yy, xx]
    lens, left, right = (np.abs(side) <= LENS_HALF_WIDTH), side > LENS_GAP, side < -LENS_GAP
    if not (lens.any() and left.any() and right.any()):
        return None
    flank = max(np.median(values[left]), np.median(values[right]))
    if not np.median(values[lens]) >= contrast * flank:
        return None
    from ._watershed import image_snr
    if not image_snr(np.nan_to_num(image)) >= MIN_SNR:
        return None
    parts = np.zeros((2,) + seg.shape, bool)
    parts[0][yy[a], xx[a]] = True
    parts[1][yy[b], xx[b]] = True
    return parts[0], parts[1]


def split_overlaps(maps: np.ndarray, contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """Every map of ``maps`` (S, Y, X) that :func:`overlap_cut` cuts, replaced by its two
    parts (the map on each), in place and in order.

    Returns
    -------
    new_maps : (S', Y, X) array of ``maps``' dtype
    origin : (S',) int64 array
        The index into ``maps`` each new map comes from.
    """
    maps = np.asarray(maps)
    out, origin = [], []
    for i, m in enumerate(maps):
        cut = overlap_cut(m, contrast)
        parts = [m] if cut is None else [np.where(part, m, 0).astype(maps.dtype) for part in cut]
        out += parts
        origin += [i] * len(parts)
    new = np.stack(out) if out else maps[:0].copy()
    return new, np.asarray(origin, np.int64)


def note_cuts(n: int) -> None:
    """Say how many segments :func:`split_overlaps` cut (both workflows say it alike)."""
    if n:
        logging.getLogger("spedflow").info(
            "%d segment%s cut in two: crystals of one orientation overlapping (the lens "
            "between two notches of the outline brighter than either side; "
            "merge.overlap_contrast)", n, "s" if n > 1 else "")
