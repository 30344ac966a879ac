"""The simulated specimen and microscope: parameters and the random scene.

A *scene* is a plain dict (picklable, JSON-able after ``scene_attrs``) holding
everything the kernels need: crystals (shape, position, 3-D orientation,
orientation group), each group's spot pattern, the holey carbon film, the descan
model and the optics. It is drawn once from ``seed``; the patterns are then
rendered block by block from it, so the data do not depend on the chunking.

Lengths scale with the set: crystal sizes with the scan, everything in
reciprocal space (lattice spacing, spot width, beam radius, descan, ring radii)
with the detector, taking the paper's 1-1.5 px spots and 2-4 px beam on a
128 px detector as the reference; the optics' sizes (spot width, beam radius, descan)
no finer than on a 32 px detector (a smaller one's beam would be one bright pixel).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..config import check_range
from ..errors import ParameterError
from . import _kernels as K

__all__ = ["SimParams", "make_scene", "scene_attrs", "SHAPES", "SATURATE"]

SHAPES = ("cube", "sphere", "rod", "mixed")
SATURATE = ("none", "8bit")
_REF_DETECTOR = 128.0  # detector width at which the px values below are quoted
_MIN_OPTICS_DETECTOR = 32  # smaller detectors keep the optics' sizes of this one


@dataclasses.dataclass(frozen=True)
class SimParams:
    """Options of :func:`spedflow.simulate.simulate` (all keyword, all validated).

    Attributes
    ----------
    shape : {"cube", "sphere", "rod", "mixed"}
        Crystal shape; "mixed" draws one of the others per orientation group.
        MgO smoke particles are cubes.
    size_range : (float, float)
        Crystal size (cube edge, sphere diameter, rod length) as fractions of the
        smaller scan side: 8-25 %, so ~10 crystals cover a sizeable part of the
        scan with some overlap, as in the paper's Fig. 3.
    groups : int or None
        Number of distinct orientations. None: ``ceil(0.7 * crystals)`` (the
        paper's 9 particles showed 6 orientations).
    paper_like : bool
        Place two same-orientation crystals overlapping, and a small, weak
        off-axis crystal overlapping a large crystal of another orientation
        (the paper's P3/P4 and P2/P1). Needs at least 4 crystals.
    off_axis_fraction : float
        Fraction of the other groups that are off any zone axis and show only a
        systematic row of spots (plus one Friedel pair).
    lattice_range : (float, float)
        Shortest reciprocal lattice spacing, fractions of the detector width:
        7-15 % (MgO {200} at 0.47/A is ~10 % of a 144 px detector at 0.032/A/px).
    spot_sigma : float or None
        Gaussian width of a spot, detector px. None: 1.2 px per 128 px of
        detector, at least 0.3 px (precession integrates the spot to about the probe's
        convergence disc, ~1-1.5 px at 128 px).
    beam_radius : float or None
        Radius of the direct-beam disc (convergence), detector px. None: 3 px
        per 128 px, at least 0.75 px.
    descan : float or None
        Largest wander of the beam over the scan from its position at the scan
        centre (smooth linear + quadratic), detector px. None: 3 px per 128 px,
        at least 0.75 px.
    scatter_fraction : float
        Fraction of the incident beam scattered into Bragg spots by the
        strongest crystal at its thickest point (kinematic-like, 0.3).
    film_scatter : float
        Fraction scattered by the amorphous carbon film of nominal thickness
        into its diffuse rings (0.1, a few-nm film).
    holes : int
        Number of (circular) holes in the carbon film.
    glare : float
        Fraction of the direct beam spread by the camera into a broad halo.
    dose : float or None
        Incident counts per pattern, at most 1e12. None: 3e4 (uint16 data, no clipping); with
        ``saturate="8bit"`` the dose at which the vacuum beam peak reaches
        4 x 255 counts, so the beam saturates while spots do not.
    saturate : {"none", "8bit"}
        "8bit" clips counts to 255 and stores uint8 (the ASTAR optical camera).
    mask_fraction : float
        A crystal's truth mask is where its projected thickness exceeds this
        fraction of its maximum (0.05: excludes only the grazing corners).
    scan_step : float
        Scan step in nm, metadata only (the paper: 3.03 nm).
    reciprocal_scale : float or None
        Detector calibration in 1/A per px, metadata only. None: the paper's
        0.0325/A/px scaled from 144 px to the detector size.
    hot_pixels, dead_pixels : int
        Detector defects at random pixels, the same in every pattern: a hot pixel
        reads 4 x the vacuum beam's peak (clipped to the data type), a dead one 0.
        Drawn from their own random stream: the rest of the data is the same as
        without them.
    """

    shape: str = "cube"
    size_range: tuple[float, float] = (0.08, 0.25)
    groups: int | None = None
    paper_like: bool = True
    off_axis_fraction: float = 0.3
    lattice_range: tuple[float, float] = (0.07, 0.15)
    spot_sigma: float | None = None
    beam_radius: float | None = None
    descan: float | None = None
    scatter_fraction: float = 0.3
    film_scatter: float = 0.1
    holes: int = 2
    glare: float = 0.05
    dose: float | None = None
    saturate: str = "none"
    mask_fraction: float = 0.05
    scan_step: float = 3.03
    reciprocal_scale: float | None = None
    hot_pixels: int = 0
    dead_pixels: int = 0

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ParameterError(f"`shape` must be one of {', '.join(SHAPES)} (got {self.shape!r})")
        if self.saturate not in SATURATE:
            raise ParameterError(f"`saturate` must be one of {', '.join(SATURATE)} (got {self.saturate!r})")
        for name, bounds, lo, hi in (("size_range", self.size_range, 0.0, 1.0),
                                     ("lattice_range", self.lattice_range, 0.0, 0.5)):
            if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
                raise ParameterError(f"`{name}` must be a pair (min, max) (got {bounds!r})")
            for v in bounds:
                check_range(name, v, low=lo, high=hi, low_open=True)
            if bounds[0] > bounds[1]:
                raise ParameterError(f"`{name}` must be (min, max) with min <= max (got {tuple(bounds)!r})")
        check_range("groups", self.groups, low=1, integer=True, allow_none=True)
        if not isinstance(self.paper_like, bool):
            raise ParameterError(f"`paper_like` must be true or false (got {self.paper_like!r})")
        check_range("off_axis_fraction", self.off_axis_fraction, low=0, high=1)
        check_range("spot_sigma", self.spot_sigma, low=0.3, allow_none=True)
        check_range("beam_radius", self.beam_radius, low=0.5, allow_none=True)
        check_range("descan", self.descan, low=0, allow_none=True)
        check_range("scatter_fraction", self.scatter_fraction, low=0, high=0.9, low_open=True)
        check_range("film_scatter", self.film_scatter, low=0, high=0.5)
        check_range("holes", self.holes, low=0, integer=True)
        check_range("glare", self.glare, low=0, high=1, high_open=True)
        # 1e12 electrons per pattern is ~10^5 times a nanoampere beam's in a millisecond
        # (and numpy's Poisson sampler stops near 1e18)
        check_range("dose", self.dose, low=0, low_open=True, high=1e12, allow_none=True)
        check_range("mask_fraction", self.mask_fraction, low=0, high=1, low_open=True, high_open=True)
        check_range("scan_step", self.scan_step, low=0, low_open=True)
        check_range("reciprocal_scale", self.reciprocal_scale, low=0, low_open=True, allow_none=True)
        check_range("hot_pixels", self.hot_pixels, low=0, integer=True)
        check_range("dead_pixels", self.dead_pixels, low=0, integer=True)


# --------------------------------------------------------------------------- helpers
def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform random rotation (normalised Gaussian quaternion); columns = body axes."""
    w, x, y, z = rng.normal(size=4)
    n = math.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _solid(shape: str, size: float) -> tuple[str, np.ndarray]:
    """(kind, half sizes) of a crystal of the given shape and size (scan px)."""
    if shape == "sphere":
        return "sphere", np.array([size / 2, size / 2, size / 2])
    if shape == "rod":
        return "box", np.array([size / 2, size / 6, size / 6])
    return "box", np.array([size / 2] * 3)


def _spot_pattern(rng, det: tuple[int, int], spacing: float, off_axis: bool,
                  sigma: float, reach: float) -> dict:
    """Spots (gy, gx) relative to the beam and kinematic-like weights of one orientation.

    A 2-D reciprocal lattice of shortest spacing ``spacing`` px; zone-axis
    groups light every lattice point on the detector, off-axis groups only the
    systematic row through the beam plus one Friedel pair. Weights are
    random |F|^2-like values, equal for g and -g (Friedel; precession makes
    intensities nearly kinematic), times a Gaussian envelope of width 0.25 of
    the detector (Debye-Waller / form factor fall-off).
    """
    theta = rng.uniform(0, np.pi)
    gamma = np.deg2rad(rng.uniform(60, 90))
    a1 = spacing * np.array([np.sin(theta), np.cos(theta)])
    a2 = spacing * rng.uniform(1.0, 1.6) * np.array([np.sin(theta + gamma), np.cos(theta + gamma)])
    half = np.array(det, float) / 2 + reach  # spots that can reach the detector
    nmax = int(np.ceil(np.hypot(*half) / spacing)) + 1
    n1, n2 = np.meshgrid(np.arange(-nmax, nmax + 1), np.arange(-nmax, nmax + 1), indexing="ij")
    n1, n2 = n1.ravel(), n2.ravel()
    g = n1[:, None] * a1 + n2[:, None] * a2
    inside = (np.abs(g) <= half - 2 * sigma).all(axis=1) & ((n1 != 0) | (n2 != 0))
    # One structure-factor draw per Friedel pair: key on the canonical (n1, n2).
    canon = np.where((n1 > 0) | ((n1 == 0) & (n2 > 0)), 1, -1)
    key = (canon * n1 + nmax) * (2 * nmax + 1) + (canon * n2 + nmax)
    f2 = rng.uniform(0.1, 1.0, size=(2 * nmax + 1) ** 2) ** 2
    env = np.exp(-0.5 * (np.hypot(g[:, 0], g[:, 1]) / (0.25 * min(det))) ** 2)
    w = f2[key] * env
    full = w[inside].sum()
    if off_axis:  # the systematic row and one Friedel pair of the next row
        m = int(rng.integers(-2, 3))
        inside &= (n2 == 0) | ((n1 == m) & (n2 == 1)) | ((n1 == -m) & (n2 == -1))
    w, g = w[inside], g[inside]
    # Scattering power relative to a crystal at this zone axis exciting every
    # reflection of the lattice: 1 on axis, the excited fraction off axis.
    power = float(w.sum() / full * rng.uniform(0.7, 1.0))
    return {"spots": g, "weights": w / w.sum(), "power": power,
            "off_axis": bool(off_axis), "basis": np.stack([a1, a2])}


def _place(rng, scan, radius, others, *, near=None, overlap=None, tries=300):
    """A centre for a crystal of projected radius ``radius`` (scan px).

    With ``near=(centre, r)`` the crystal overlaps that one: its centre is at
    ``overlap * (r + radius)`` from it. Otherwise the centre is drawn to keep
    ``0.85 (r_i + r_j)`` from the others (slight corner contact allowed); the
    best of ``tries`` draws is kept if none satisfies that.
    """
    Y, X = scan
    lo = np.array([min(radius * 0.8, (Y - 1) / 2), min(radius * 0.8, (X - 1) / 2)])
    hi = np.array([Y - 1, X - 1]) - lo
    best, best_score = None, -np.inf
    for _ in range(tries):
        if near is not None:
            ang = rng.uniform(0, 2 * np.pi)
            c = near[0] + overlap * (near[1] + radius) * np.array([np.sin(ang), np.cos(ang)])
            if ((c < lo) | (c > hi)).any():
                continue
        else:
            c = rng.uniform(lo, hi)
        score = min((np.hypot(*(c - oc)) / (0.85 * (orad + radius)) for oc, orad in others
                     if near is None or not np.allclose(oc, near[0])), default=np.inf)
        if score >= 1:
            return c
        if score > best_score:
            best, best_score = c, score
    if best is None:  # `near` could not be honoured inside the scan: place it anywhere
        best = rng.uniform(lo, hi)
    return best


# --------------------------------------------------------------------------- scene
def make_scene(scan: tuple[int, int], detector: tuple[int, int], crystals: int, seed: int,
               params: SimParams) -> dict:
    """Draw the specimen and optics for one simulation (see module docstring)."""
    rng = np.random.default_rng([int(seed), 0x5CE4E])
    Y, X = scan
    Ky, Kx = detector
    # the optics' sizes scale with the detector, as a camera length would, but no finer
    # than on a 32 px detector: a beam of under 0.75 px would be one bright pixel
    kscale = max(min(Ky, Kx), _MIN_OPTICS_DETECTOR) / _REF_DETECTOR
    smin = min(Y, X)
    sigma = params.spot_sigma if params.spot_sigma is not None else 1.2 * kscale
    beam_r = params.beam_radius if params.beam_radius is not None else 3.0 * kscale
    wander = params.descan if params.descan is not None else 3.0 * kscale
    C = int(crystals)
    paper = params.paper_like and C >= 4
    n_groups = params.groups if params.groups is not None else max(1, math.ceil(0.7 * C))
    n_groups = min(n_groups, C) if C else 0
    if paper:
        n_groups = max(n_groups, 3)

    # Orientation groups: group 0 = the overlapping same-orientation pair,
    # group 1 = the weak off-axis crystal, group 2 = the strong crystal under it.
    groups = []
    for gi in range(n_groups):
        if paper and gi < 3:
            off = gi == 1
        else:
            off = rng.uniform() < params.off_axis_fraction
        spacing = rng.uniform(*params.lattice_range) * min(Ky, Kx)
        grp = _spot_pattern(rng, (Ky, Kx), spacing, off, sigma, wander + 3 * sigma)
        grp["rotation"] = _random_rotation(rng)
        grp["shape"] = params.shape if params.shape != "mixed" else str(
            rng.choice(["cube", "sphere", "rod"]))
        groups.append(grp)

    # Crystal -> group assignment.
    if paper:
        assign = [0, 0, 1, 2] + list(range(3, n_groups))
    else:
        assign = list(range(n_groups))
    while len(assign) < C:
        assign.append(int(rng.integers(n_groups)))
    assign = assign[:C]
    if not paper:
        rng.shuffle(assign)

    lo_s, hi_s = params.size_range
    sizes = rng.uniform(lo_s, hi_s, size=C) * smin
    if paper:
        sizes[0] = sizes[1] = (lo_s + 0.7 * (hi_s - lo_s)) * smin
        sizes[2] = lo_s * smin
        sizes[3] = hi_s * smin
    sizes = np.maximum(sizes, 2.0)

    # Placement: the deliberate overlaps first (the pair 0-1, then the strong
    # crystal 3 and the weak crystal 2 over it), the others avoiding them.
    order = [0, 1, 3, 2] + list(range(4, C)) if paper else list(range(C))
    partner = {1: (0, 0.65), 2: (3, 0.35)} if paper else {}
    centres: dict[int, np.ndarray] = {}
    for i in order:
        near = overlap = None
        if i in partner:
            j, overlap = partner[i]
            near = (centres[j], sizes[j] / 2)
        others = [(centres[j], sizes[j] / 2) for j in centres]
        centres[i] = _place(rng, (Y, X), sizes[i] / 2, others, near=near, overlap=overlap)
    crystal_list = []
    for i in range(C):
        grp = groups[assign[i]]
        kind, half = _solid(grp["shape"], sizes[i])
        crystal_list.append({"centre": centres[i], "rotation": grp["rotation"], "half": half,
                             "solid": kind, "group": assign[i], "shape": grp["shape"],
                             "size": float(sizes[i])})

    # Largest projected thickness of each crystal, on the scan's pixel grid.
    for c in crystal_list:
        reach = float(np.linalg.norm(c["half"])) + 1
        ys = np.arange(max(0, int(c["centre"][0] - reach)), min(Y, int(c["centre"][0] + reach) + 1))
        xs = np.arange(max(0, int(c["centre"][1] - reach)), min(X, int(c["centre"][1] + reach) + 1))
        t = K.crystal_thickness([c], ys, xs) if len(ys) and len(xs) else np.zeros(1)
        c["thickness_max"] = float(t.max())
    strength = [groups[c["group"]]["power"] * c["thickness_max"] for c in crystal_list]
    kappa = params.scatter_fraction / max(max(strength, default=0.0), 1e-12)

    # Holey carbon film: smooth +-20 % thickness variation, circular holes.
    modes = []
    for _ in range(3):
        wl = rng.uniform(0.5, 2.0) * smin
        ang = rng.uniform(0, np.pi)
        modes.append([2 * np.pi / wl * np.sin(ang), 2 * np.pi / wl * np.cos(ang),
                      rng.uniform(0, 2 * np.pi), 0.07])
    holes = [[rng.uniform(0, Y - 1), rng.uniform(0, X - 1), rng.uniform(0.15, 0.35) * smin]
             for _ in range(params.holes)]

    # Descan: quadratic in normalised scan coordinates, scaled to `wander` px.
    centre0 = np.array([Ky // 2, Kx // 2], float) + rng.uniform(-0.5, 0.5, size=2)
    coefs = rng.normal(size=(2, 5)) * np.array([1.0, 1.0, 0.5, 0.5, 0.5])
    uu, vv = np.meshgrid(np.linspace(-0.5, 0.5, 9), np.linspace(-0.5, 0.5, 9), indexing="ij")
    terms = np.stack([uu, vv, uu * uu, uu * vv, vv * vv])
    disp = np.hypot(*np.tensordot(coefs, terms, axes=(1, 0)))
    coefs *= wander / disp.max() if disp.max() > 0 else 0.0
    descan = {"scan": [Y, X], "ky": [float(centre0[0]), *map(float, coefs[0])],
              "kx": [float(centre0[1]), *map(float, coefs[1])]}

    optics = {"beam_radius": beam_r, "edge": 0.5 * kscale, "glare_width": 6.0 * kscale,
              # amorphous carbon halos at ~0.48 and ~0.85 /A: 11 % and 19 % of the detector
              "rings": [[0.11 * min(Ky, Kx), 0.02 * min(Ky, Kx), 1.0],
                        [0.19 * min(Ky, Kx), 0.03 * min(Ky, Kx), 0.5]],
              "diffuse_length": 0.08 * min(Ky, Kx), "diffuse_weight": 1.0}
    optics["norms"] = K.radial_norms(optics)
    reach = 1.2 * wander + 1.0  # the quadratic may exceed its 9 x 9 grid maximum slightly
    table = K.radial_table(optics, centre0 - reach, centre0 + reach, (Ky, Kx))
    glare = params.glare
    if params.dose is not None:
        dose = float(params.dose)
    elif params.saturate == "8bit":
        peak = (1 - glare) / optics["norms"][0] + glare / optics["norms"][1]
        dose = 4 * 255 / peak
    else:
        dose = 3e4
    # detector defects, from a stream of their own (the scene is the same without them)
    n_bad = params.hot_pixels + params.dead_pixels
    if n_bad > Ky * Kx:
        raise ParameterError(f"{n_bad} hot and dead pixels do not fit a {Ky} x {Kx} detector")
    flat = np.random.default_rng([int(seed), 0xBAD]).choice(Ky * Kx, n_bad, replace=False)
    bad = np.stack(np.unravel_index(flat, (Ky, Kx)), axis=1).astype(np.int64)
    vacuum_peak = dose * ((1 - glare) / optics["norms"][0] + glare / optics["norms"][1])
    defects = {"hot": bad[:params.hot_pixels], "dead": bad[params.hot_pixels:],
               "hot_level": 4.0 * vacuum_peak}
    return {"scan": (Y, X), "detector": (Ky, Kx), "seed": int(seed), "crystals": crystal_list,
            "groups": groups, "kappa": kappa, "spot_sigma": sigma, "film": {
                "modes": np.array(modes).reshape(-1, 4), "holes": np.array(holes).reshape(-1, 3)},
            "film_scatter": params.film_scatter, "glare": glare, "descan": descan,
            "optics": optics, "radial_table": table, "dose": dose, "saturate": params.saturate,
            "mask_fraction": params.mask_fraction, "paper_like": paper, "defects": defects}


def scene_attrs(scene: dict) -> dict:
    """JSON-able description of the scene for the ``truth`` group's attributes."""
    groups = scene["groups"]
    crystals = []
    for i, c in enumerate(scene["crystals"]):
        grp = groups[c["group"]]
        crystals.append({
            "index": i, "group": int(c["group"]), "shape": c["shape"],
            "centre": [float(v) for v in c["centre"]], "size": c["size"],
            "thickness_max": c["thickness_max"], "n_spots": int(len(grp["spots"])),
            "off_axis": grp["off_axis"],
            "scattered_fraction_max": float(scene["kappa"] * grp["power"] * c["thickness_max"]),
        })
    return {
        "crystals": crystals,
        "pattern_normalisation": "each truth pattern sums to 1 (fraction of that crystal's "
                                 "Bragg-scattered intensity); beam at (Ky//2, Kx//2), no direct beam",
        "thickness_units": "scan px",
        "descan": {"model": "c = c0 + c1*u + c2*v + c3*u^2 + c4*u*v + c5*v^2, "
                            "u = y/(Y-1) - 1/2, v = x/(X-1) - 1/2, c in detector px",
                   "ky": scene["descan"]["ky"], "kx": scene["descan"]["kx"]},
        "spot_sigma": float(scene["spot_sigma"]),
        "beam_radius": float(scene["optics"]["beam_radius"]),
        "dose": float(scene["dose"]), "kappa": float(scene["kappa"]),
        "glare": float(scene["glare"]), "film_scatter": float(scene["film_scatter"]),
        "film_holes": scene["film"]["holes"].tolist(),
        "saturate": scene["saturate"], "mask_fraction": float(scene["mask_fraction"]),
        "seed": scene["seed"], "paper_like": bool(scene["paper_like"]),
        "hot_pixels": scene["defects"]["hot"].tolist(),
        "dead_pixels": scene["defects"]["dead"].tolist(),
    }
