"""Parameters of the segmentation stages: watershed, VDF merging, NMF merging.

Every default is argued in the field's documentation; ``None`` means "derive from
the data" as documented per field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import check_auto_switch, check_range
from ..errors import ParameterError

__all__ = ["WatershedParams", "VDFMergeParams", "NMFMergeParams", "THRESHOLD_METHODS",
           "pattern_sigma"]

THRESHOLD_METHODS = ("li", "otsu")


@dataclass(frozen=True)
class WatershedParams:
    """Marker-controlled watershed of one image (a VDF image or an NMF loading map).

    Attributes
    ----------
    threshold : {"li", "otsu"}
        Automatic threshold that makes the foreground mask (``image > t``). Li's
        minimum cross-entropy threshold (the paper's choice) sits lower than Otsu's
        on images with a small bright foreground, which keeps the faint rims of thin
        crystals.
    smooth : float or None
        Width (scan pixels) of a Gaussian applied to the image before the threshold
        mask and the Sobel elevation; 0: none (the paper). ``None`` (default): a
        twentieth of the largest inscribed radius of the image's mask for crystals over
        ~40 scan pixels across, ramping down to none at ~20 px across and below
        (``segment._watershed.auto_smooth_width``: no step at which two images of one
        crystal could be treated differently). Counting
        noise punches holes and one-pixel bridges into a crystal's mask wherever its
        signal is within a few noise levels of the threshold; each makes necks that
        cut the crystal apart, and their number grows with the crystal's area in scan
        pixels (hundreds of pieces per VDF image on a 512 x 512 scan of the
        ten-crystal simulation without it). Segment intensities are always taken from
        the unsmoothed image.
    snr_floor : float or None
        For low-dose data. With ``smooth`` None, an image whose pixel signal-to-noise
        ratio is below this is smoothed by the Gaussian that lifts it to 5 (Rose's
        criterion), but by no more than a sixth of the largest inscribed radius of its
        crystals; the wider of that and the size-based width is used, and from
        ``0.75 * snr_floor`` up to ``snr_floor`` the width ramps down to none
        (``segment._watershed.noise_smooth_width``). The ratio
        (``segment._watershed.image_snr``) is the mean of the threshold mask minus the
        mean outside it, over the noise of the mask's interior (second differences,
        which a thickness gradient does not enter). 0 switches the rule off.
        ``None`` (default): the VDF workflow uses 2 where its images' median pixel
        signal-to-noise ratio is under 1 (:data:`~spedflow.segment._watershed.NOISE_BOUND`:
        noise above signal, every crystal's mask in pieces; on the benchmark sets only
        at 300 counts per pattern, which it took from 11 to 16 of 40 crystals), 0
        otherwise; elsewhere (NMF's loading maps, ``watershed_image``) None is 0.
        At a ratio of 2 a crystal's typical pixel lies one noise level above a
        threshold midway between crystal and background, so about one pixel in six of
        each class falls on the wrong side, and the watershed cuts crystals into pieces
        too small to correlate; 2 is the value to try at a few hundred to a few
        thousand counts per pattern. It is not used above a median ratio of 1 because
        it costs small grains at full dose, whose few pixels it measures as noisier
        than they are (benchmarks/README.md, session 31).
    min_distance : float or None
        Markers closer than this (scan pixels) are one crystal. ``None`` (default)
        derives it per pair of markers from the mask itself: two markers are merged
        when their distance is smaller than the radius of the smaller of their
        maximal inscribed discs (the distance-transform value at the marker), i.e.
        when the centre of one crystal's core lies inside the other's core. This
        scales with crystal size, unlike the reference's fixed 5.5 px.
    neck_ratio : float
        Two maxima of the mask's distance transform are kept as separate crystals
        only if the neck joining them is narrower than ``neck_ratio`` times the
        inscribed radius of the smaller one (and at least one pixel narrower).
        Default ``sqrt(3)/2``: two equal discs are split exactly when each centre
        lies outside the other disc (centre distance > radius), so an elongated
        crystal (a ridge, no neck) or a rough edge is never cut, while two crystals
        touching or overlapping by less than a radius are.
    min_size : int
        Segments smaller than this (scan pixels) are dropped. 10: a crystal must
        span at least ~3x3 probe positions to be told from a noise blob.
    marker_radius : float
        Each marker is grown to a disc of this radius (scan pixels) before flooding,
        so a single noisy pixel cannot decide the segment (paper's value 2).
    exclude_border : int
        Crystals whose marker lies within this many pixels of the image edge are
        dropped (their region is still flooded, so it cannot leak into neighbours).
        0 keeps everything.
    min_intensity : float
        Segments whose maximum is below ``min_intensity * scale`` are dropped, where
        ``scale`` is the maximum of the whole image stack (``watershed_stack``) or
        of the image (``watershed_image`` without ``intensity_scale``). Relative, so
        binning or a different detector gain does not change its meaning (the
        reference's absolute 10000 gave no segments after binning). 0 keeps all.
    min_snr : float
        Segments whose maximum is below ``min_snr`` times the noise of their image are
        dropped; the noise is the robust standard deviation of the whole image
        (1.4826 x its median absolute deviation), or of the background outside the
        threshold mask where that covers 40 % of the image or more, which would
        inflate the whole image's (``background_noise`` in segment/_watershed.py).
        0 keeps all (the VDF default: the vector and correlation thresholds sort out
        noise there). The NMF workflow uses 10:
        a spare component fits noise, and the watershed of its loading map finds a
        scatter of small blobs a few noise levels high, while a crystal's segment
        stands tens to thousands of noise levels above its background.
    """

    threshold: str = "li"
    smooth: float | None = None
    snr_floor: float | None = None
    min_distance: float | None = None
    neck_ratio: float = math.sqrt(3.0) / 2.0
    min_size: int = 10
    marker_radius: float = 2.0
    exclude_border: int = 0
    min_intensity: float = 0.0
    min_snr: float = 0.0

    def __post_init__(self):
        if self.threshold not in THRESHOLD_METHODS:
            raise ParameterError(f"`threshold` must be one of {', '.join(THRESHOLD_METHODS)} "
                                 f"(got {self.threshold!r})")
        check_range("smooth", self.smooth, low=0, high=50, allow_none=True)
        check_range("snr_floor", self.snr_floor, low=0, high=100, allow_none=True)
        check_range("min_distance", self.min_distance, low=0, allow_none=True)
        check_range("neck_ratio", self.neck_ratio, low=0, high=1, low_open=True)
        check_range("min_size", self.min_size, low=1, integer=True)
        check_range("marker_radius", self.marker_radius, low=0)
        check_range("exclude_border", self.exclude_border, low=0, integer=True)
        check_range("min_intensity", self.min_intensity, low=0, high=1)
        check_range("min_snr", self.min_snr, low=0)


@dataclass(frozen=True)
class VDFMergeParams:
    """Correlation merging of VDF image segments into crystals (paper, Fig. 1C).

    Attributes
    ----------
    corr_threshold : float
        Segments are one crystal when the zero-shift Pearson correlation of their
        images exceeds this for EVERY pair in the group (complete linkage). 0.7 as
        in the paper: segments are zero outside their masks, so the correlation is
        mostly their overlap; 0.7 needs roughly 70 % mutual overlap of equal masks.
    noise_corrected : bool or "auto"
        Compare ``corr_threshold`` with the correlation the segments' signals would
        have without their pixel noise: the measured one divided by
        ``sqrt(rel_a rel_b)``, each segment's reliability measured on the differences
        of its neighbouring positions (:func:`~spedflow.segment._merge.segment_reliability`;
        at most a factor 2). At low dose the noise alone holds the segments of one
        crystal under 0.7 (a median of 0.51 at 1,000 counts per pattern). Default
        "auto": on where the VDF images are noise-dominated (their median pixel
        signal-to-noise ratio under 2, the workflow's low-dose warning), off
        otherwise. Always on, it also joined segments of a weak reflection of one
        crystal with a neighbour's at full dose (two crystals of one orientation
        became one); false is the paper's.
    vector_threshold : int
        A group needs at least this many DISTINCT diffraction vectors, otherwise it
        is discarded as noise. Default 4: a crystal on (or near) a zone axis shows at
        least two independent reciprocal vectors and their Friedel mates (+-g1,
        +-g2); one Friedel pair alone is a 1-D set of planes or an artefact. (The
        reference used 5.) Two segments of the same vector count once. A group
        with fewer vectors is kept all the same when it holds a Friedel pair (see
        ``friedel_tolerance``).
    friedel_tolerance : float
        Two vectors ``g1``, ``g2`` with ``|g1 + g2|`` at most this (detector px) are a
        Friedel pair. By Friedel's law (nearly exact under precession) a crystal's
        reflections come in pairs ``g, -g``, so a group whose segments show the same
        region in the VDF images of both members of a pair is a crystal even with
        only two vectors (an off-axis crystal exciting a single systematic row, the
        paper's P2), while noise has no reason to respect the symmetry. Default
        1.0 px: twice the typical sub-pixel position scatter of a vector. 0
        disables the rule (the paper's behaviour).
    segment_threshold : float
        Fraction (0, 1] of the group's distinct vectors whose segment must be
        non-zero at a scan position for it to belong to the summed segment ("at
        least ceil(fraction * n)", minimum 1). Default 0.5, a majority vote: noise
        in a minority of VDF images does not grow the crystal, and the rule means
        the same for a group of 4 or of 40 vectors (the reference's absolute 4 did
        not).
    pattern_sigma : float or None
        Gaussian width (detector pixels) of the spots of the virtual diffraction
        patterns. ``None``: derived from the measured spot radius ``r`` as
        ``r / sqrt(2)`` (the LoG blob relation radius = sqrt(2) sigma), see
        :func:`pattern_sigma`.
    fragment_containment : float
        Fragment folding (:func:`~spedflow.segment.fold_fragments`): a summed segment
        lying at least this fraction inside a larger one is a candidate fragment of
        it. Default 0.8. Set above 1 to disable folding.
    fragment_contrast : float
        A candidate fragment is folded in when the *whole* VDF images of its vectors,
        relative to the larger segment's, are at most this many times brighter on the
        fragment than on the rest of the larger segment: its vectors light up all of
        that crystal (thickness scales all of a crystal's reflections alike), and the
        watershed only cut part of it in their images. A second crystal inside the
        first (the weak crystal over a strong one) is bright in its own vectors on its
        own part only and stays. Default 2.
    coincident_iou : float
        A candidate fragment whose mask and the larger segment's coincide (intersection
        over union at least this) is folded in whatever its images' profiles. Two
        groups on one mask are one crystal whose reflections vary unlike each other
        across it (thickness fringes, bending: dynamical diffraction, which precession
        damps but does not remove), so that neither the correlation of their segments
        nor the contrast test joins them. A second crystal of the same projected
        outline could not be told apart by its mask in any case. Default 0.8: the
        masks of one crystal's groups differ by about a pixel along its edge (0.8 is
        a one-pixel rim on a crystal ~20 pixels across). Set above 1 to disable.
    friedel_ring_contrast : float
        A group kept by the Friedel rule alone (fewer than ``vector_threshold``
        vectors) must stand out from the ring it lies on
        (:func:`~spedflow.segment.drop_radial_pairs`): the on/off-mask contrast of the
        pair's VDF images must be at least this many times the median contrast, on
        the same mask, of the other vectors at the same ``|g|``. A radially symmetric
        background (the glare of a clipped beam, the film's diffuse rings) is
        centrosymmetric too and lights every vector on its ring alike (ratio ~1);
        Bragg scattering is local in azimuth (ratios >= 10 on the simulated sets).
        Default 2. 0 disables the test.
    lattice_bend : float
        Fragment folding by lattice (:func:`~spedflow.segment.fold_fragments`, rule 4):
        the largest misorientation, in degrees, between parts of one crystal. A bent
        crystal's parts excite different reflections, and a part's vectors sit within
        ``friedel_tolerance + |g| sin(lattice_bend)`` of the points of the whole
        crystal's reciprocal lattice. Default 3: the bending of the thin crystals
        SPED looks at is a few degrees over a grain; a grain boundary of less is
        a sub-grain, which this merges.
    lattice_significance : float
        Rule 4 applies when a different crystal's vectors would lie on the lattice as
        often as the candidate fragment's with at most this probability: a binomial
        test, the chance per vector being the larger of the tolerance disc's area over
        the cell's and the chance of a crystal of the same phase at another orientation
        (:func:`~spedflow.segment._lattice._chance`).
        Default 1e-3. On fine lattices (large cells in real space, long vectors)
        nothing is significant and nothing folds. 0 disables rule 4.
    shared_coverage : float
        A group whose mask is the union of two or more crystals with more vectors, each
        lying at least this fraction inside it or lit up all over by its vectors (and
        together covering ``fragment_containment`` of it), is their shared reflections, not a crystal
        (:func:`~spedflow.segment.drop_shared_reflections`); a Friedel-only group needs
        one such crystal, if its images also follow that crystal's everywhere.
        Default 0.5: most of each crystal. Set above 1 to disable.
    area_reflections : float
        Fragment folding, rule 5 (:func:`~spedflow.segment.fold_fragments`): the
        reflections seen in a segment's area are those found (by the peak finder) at
        this fraction of its scan positions or more. A crystal's reflections show at
        most positions it covers (thickness fringes and bending dim some of them over
        parts); a neighbour's spots reach into its edge only, and noise peaks land on
        a vector's position at random. Default 0.3. 0 disables rule 5.
    adjacent_gap : int
        Fragment folding, rule 6 (:func:`~spedflow.segment.fold_fragments`): two groups
        whose masks come within this many scan positions of each other, side by side
        rather than one inside the other, are parts of one crystal when each one's
        reflections (rule 5's test) lie on the other's lattice: the halves of a bent
        crystal, each lit by other reflections of it. Default 2 (a watershed cut
        line and a pixel of either edge). 0 disables rule 6.
    adjacent_shared : float
        Rule 6 folds two groups only when at most this fraction of the smaller one's
        vectors are also the other's. A bent crystal's halves are each lit by
        reflections of their own besides those they share; two crystals of one
        orientation side by side are lit by the same reflections, and the watershed
        cut every one of those images between them. Default 0.8: a bent crystal's
        halves shared 0.50-0.68 of their vectors on the third simulator's bent sets,
        two rods of one orientation side by side 0.97. 1 folds whatever the groups
        share.
    rim_width : int
        A group all of whose vectors belong to a group with more vectors, and which
        lies at least three quarters within this many scan positions of that group's
        mask, is that crystal's rim, not a crystal (:func:`~spedflow.segment.drop_rims`):
        a few of its reflections lit by the probe's tail beyond its edge, or by
        thickness fringes at its thin edge, with nothing of their own. Default 3 (a
        probe of about a scan step and the watershed's edge). 0 disables it.
    overlap_contrast : float
        A final segment whose outline has exactly two notches (at least 2 scan
        positions deep) and which is at least this many times as bright along the chord
        joining them as on both sides of it is two crystals of one orientation
        overlapping, their intensities adding where they overlap, and is cut along that
        chord (:func:`~spedflow.segment.overlap_cut`). Default 1.5: such unions showed
        1.6-2.1 on the benchmark suites, single crystals with two notches at most 1.03,
        and a union of two crystals of different orientations along a bright thickness
        fringe 1.3-1.5. 0 disables.
    """

    corr_threshold: float = 0.7
    noise_corrected: bool | str = "auto"
    vector_threshold: int = 4
    friedel_tolerance: float = 1.0
    segment_threshold: float = 0.5
    pattern_sigma: float | None = None
    fragment_containment: float = 0.8
    fragment_contrast: float = 2.0
    coincident_iou: float = 0.8
    friedel_ring_contrast: float = 2.0
    shared_coverage: float = 0.5
    lattice_bend: float = 3.0
    lattice_significance: float = 1e-3
    area_reflections: float = 0.3
    adjacent_gap: int = 2
    adjacent_shared: float = 0.8
    rim_width: int = 3
    overlap_contrast: float = 1.5

    def __post_init__(self):
        _check_overlap_contrast(self.overlap_contrast)
        check_range("area_reflections", self.area_reflections, low=0, high=1)
        check_range("adjacent_gap", self.adjacent_gap, low=0, integer=True)
        check_range("adjacent_shared", self.adjacent_shared, low=0, high=1)
        check_range("rim_width", self.rim_width, low=0, integer=True)
        check_range("corr_threshold", self.corr_threshold, low=-1, high=1, high_open=True)
        check_auto_switch("noise_corrected", self.noise_corrected)
        check_range("friedel_ring_contrast", self.friedel_ring_contrast, low=0)
        check_range("fragment_containment", self.fragment_containment, low=0, low_open=True)
        check_range("fragment_contrast", self.fragment_contrast, low=1)
        check_range("coincident_iou", self.coincident_iou, low=0, low_open=True)
        check_range("shared_coverage", self.shared_coverage, low=0, low_open=True)
        check_range("lattice_bend", self.lattice_bend, low=0, high=45)
        check_range("lattice_significance", self.lattice_significance, low=0, high=0.1)
        check_range("vector_threshold", self.vector_threshold, low=1, integer=True)
        check_range("friedel_tolerance", self.friedel_tolerance, low=0)
        check_range("segment_threshold", self.segment_threshold, low=0, high=1, low_open=True)
        check_range("pattern_sigma", self.pattern_sigma, low=0, low_open=True, allow_none=True)


@dataclass(frozen=True)
class NMFMergeParams:
    """Correlation merging of NMF components (paper, Fig. 2B).

    Attributes
    ----------
    pattern_threshold : float
        Pearson correlation of the component patterns that every pair in a group
        must exceed. 0.45 (paper): components of one crystal share their spots but
        differ in relative intensities (thickness, bending), so the bar is moderate.
    loading_threshold : float
        Pearson correlation of the loading maps every pair must exceed. 0.3
        (paper): NMF splits one crystal into parts that are partly complementary in
        space, so their loadings overlap only partly.

    spot_match : float
        Groups whose components' spot sets coincide are one crystal whose thickness or
        bending varies (:mod:`spedflow.segment._orientation`): the smaller of the two
        directional, intensity-weighted fractions of one factor's spots found within a
        spot radius of the other's must reach it, with the loading supports touching
        and neither lying on top of the other. 0.5: over the benchmark sets of three
        simulators (one with thickness fringes), the 10th percentile of pairs of one
        crystal and the 97th of neighbouring crystals (0.4 joins distinct crystals of
        the foreign sets). 0 disables.
    spot_guard : float
        Two groups are joined only if every pair of components across them matches at
        least this well (no chain through a component mixing two crystals). 0.3: above
        the median of neighbouring distinct crystals (a twin shares a third of its spots).
    support_level : float
        A loading's support: where it exceeds this fraction of its maximum.
    on_top_cover, on_top_gain : float
        A component with at least ``on_top_cover`` of its support inside another's,
        where the two loadings sum to at least ``on_top_gain`` times their sum over the
        rest of the other's support, lies on top of it (a second crystal of the same
        orientation) and is not joined to it: thickness components share a crystal's
        area (summed ratio 1.0-1.5 measured), overlapping crystals add (1.8-2.5).
    fold_containment : float
        After the watershed, a segment lying at least this fraction inside a segment of
        another component is dropped when its own component has such segments inside
        three or more crystals' segments
        (:func:`~spedflow.segment._orientation.drop_spanning_parts`): a component of
        the thickness band that wedge-shaped crystals share, cut into one part per
        crystal. Default 0.8 (as ``VDFMergeParams.fragment_containment``). Above 1
        disables.
    lattice_significance : float
        Nor is a component joined by its spots to another when its spots off the
        other's reciprocal lattice lie on a lattice of their own, beyond chance at this
        probability (:func:`~spedflow.segment._lattice.second_lattice`): a component of
        a small crystal lying on a larger one carries the larger one's spots too (they
        shine where it is) beside its own; nor when fewer than half of its spots lie
        on the other's lattice, where that lattice is this clear
        (:func:`~spedflow.segment._lattice.off_lattice`). Default 1e-3; 0 disables.
    overlap_contrast : float
        A final segment that is two crystals of one orientation overlapping, told by two
        notches of its outline and a lens between them this many times as bright as
        either side, is cut in two, as in the VDF workflow (there, the full description:
        ``VDFMergeParams.overlap_contrast``). Default 1.5; 0 disables.
    """

    pattern_threshold: float = 0.45
    loading_threshold: float = 0.3
    spot_match: float = 0.5
    spot_guard: float = 0.3
    support_level: float = 0.3
    on_top_cover: float = 0.8
    on_top_gain: float = 1.7
    lattice_significance: float = 1e-3
    fold_containment: float = 0.8
    overlap_contrast: float = 1.5

    def __post_init__(self):
        _check_overlap_contrast(self.overlap_contrast)
        check_range("pattern_threshold", self.pattern_threshold, low=-1, high=1, high_open=True)
        check_range("loading_threshold", self.loading_threshold, low=-1, high=1, high_open=True)
        for name in ("spot_match", "spot_guard", "on_top_cover"):
            check_range(name, getattr(self, name), low=0, high=1)
        check_range("support_level", self.support_level, low=0, high=1, low_open=True, high_open=True)
        check_range("on_top_gain", self.on_top_gain, low=1)
        check_range("fold_containment", self.fold_containment, low=0, low_open=True)
        check_range("lattice_significance", self.lattice_significance, low=0, high=0.1)


def _check_overlap_contrast(value) -> None:
    check_range("overlap_contrast", value, low=0)
    if 0 < value < 1:
        raise ParameterError(f"`overlap_contrast` must be 0 (off) or at least 1: a lens dimmer "
                             f"than its sides is no overlap (got {value})")


def pattern_sigma(params: VDFMergeParams, spot_radius: float) -> float:
    """Resolve ``params.pattern_sigma``: given, or ``spot_radius / sqrt(2)``.

    Parameters
    ----------
    params : VDFMergeParams
    spot_radius : float
        Measured diffraction spot radius, detector pixels.

    Returns
    -------
    float
        Gaussian sigma in detector pixels.
    """
    if params.pattern_sigma is not None:
        return float(params.pattern_sigma)
    check_range("spot_radius", spot_radius, low=0, low_open=True)
    return float(spot_radius) / math.sqrt(2.0)
