"""Pure NumPy kernels of the SPED simulator: thickness, pattern rendering, noise.

No dask, no zarr. Every function works on one block of probe positions (a chunk)
and is vectorised over it; the only per-pattern loop is the noise draw (one
generator per probe position, so the noise does not depend on the chunking).

Coordinates
-----------
* Scan: probe position ``(y, x)`` in scan pixels (pixel indices); crystal
  centres and sizes are in the same unit, so projected thickness is in scan
  pixels (multiply by the scan step for nm).
* Detector: pixel ``k`` covers ``[k - 0.5, k + 0.5)``; a feature "at" ``(ky, kx)``
  is centred on that pixel's centre, so an aligned beam at ``(Ky // 2, Kx // 2)``
  has its centre of mass exactly there.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf, erfc

__all__ = ["ray_lengths", "crystal_thickness", "film_thickness", "beam_centres",
           "spot_image", "spot_images", "radial_table", "radial_images", "radial_norms", "expected_counts",
           "poisson_by_position"]

_SHIFT_QUANTUM = 0.1  # detector px: beam positions are rendered on this grid (error <= 0.05 px)


# --------------------------------------------------------------------------- thickness
def ray_lengths(points: np.ndarray, centre: np.ndarray, rotation: np.ndarray,
                half: np.ndarray, kind: str) -> np.ndarray:
    """Length of the vertical ray (along the beam, lab z) through one solid.

    Parameters
    ----------
    points : (P, 2) float array
        Probe positions ``(y, x)``, scan pixels.
    centre : (2,) float array
        Projected centre of the solid ``(y, x)``, scan pixels.
    rotation : (3, 3) float array
        Columns are the solid's body axes in the lab frame ``(y, x, z)``.
    half : (3,) float array
        Half edge lengths of the box (``kind="box"``) or ``half[0]`` = radius
        (``kind="sphere"``), scan pixels.
    kind : {"box", "sphere"}

    Returns
    -------
    (P,) float64 array
        Projected thickness (chord length), scan pixels; 0 outside the solid.
    """
    d = np.asarray(points, float) - np.asarray(centre, float)
    if kind == "sphere":
        return 2.0 * np.sqrt(np.maximum(half[0] ** 2 - (d ** 2).sum(axis=1), 0.0))
    # Exact ray/box slab intersection in the body frame. Ray: o + s * e_z (lab).
    origin = np.concatenate([d, np.zeros((len(d), 1))], axis=1) @ rotation  # (P, 3) body
    direction = rotation[2]  # lab z expressed in body coordinates, (3,)
    with np.errstate(divide="ignore", invalid="ignore"):
        parallel = np.abs(direction) < 1e-12
        inv = np.where(parallel, 0.0, 1.0 / np.where(parallel, 1.0, direction))
        t1 = (-half - origin) * inv
        t2 = (half - origin) * inv
    lo = np.minimum(t1, t2)
    hi = np.maximum(t1, t2)
    # Axes parallel to the slab: inside the slab for all s, or never.
    inside = np.abs(origin) <= half
    lo = np.where(parallel, np.where(inside, -np.inf, np.inf), lo)
    hi = np.where(parallel, np.where(inside, np.inf, -np.inf), hi)
    return np.maximum(hi.min(axis=1) - lo.max(axis=1), 0.0)


def crystal_thickness(crystals: list[dict], ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Projected thickness of every crystal on a grid of probe positions.

    Parameters
    ----------
    crystals : list of C dicts
        With keys ``centre`` (2,), ``rotation`` (3, 3), ``half`` (3,), ``solid``
        ("box" or "sphere"); see :func:`ray_lengths`.
    ys, xs : 1-D int arrays
        Scan rows and columns of the block.

    Returns
    -------
    (C, len(ys), len(xs)) float32 array
        Thickness in scan pixels.
    """
    yy, xx = np.meshgrid(np.asarray(ys, float), np.asarray(xs, float), indexing="ij")
    pts = np.stack([yy.ravel(), xx.ravel()], axis=1)
    out = np.zeros((len(crystals), len(ys), len(xs)), np.float32)
    for i, c in enumerate(crystals):  # C is small; each call is vectorised over positions
        reach = float(np.linalg.norm(c["half"])) + 1.0
        near = (np.abs(pts - c["centre"]) <= reach).all(axis=1)
        if near.any():
            vals = np.zeros(len(pts))
            vals[near] = ray_lengths(pts[near], c["centre"], c["rotation"], c["half"], c["solid"])
            out[i] = vals.reshape(len(ys), len(xs))
    return out


def film_thickness(film: dict, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Relative thickness of the holey carbon film (0 in holes, about 1 elsewhere).

    Parameters
    ----------
    film : dict
        ``holes`` (H, 3) rows ``(y, x, radius)`` in scan pixels; ``modes`` (M, 4)
        rows ``(ky, kx, phase, amplitude)`` of a smooth cosine thickness variation
        (wave vectors in radians per scan pixel).
    ys, xs : 1-D arrays
        Scan rows and columns.

    Returns
    -------
    (len(ys), len(xs)) float32 array
    """
    yy, xx = np.meshgrid(np.asarray(ys, float), np.asarray(xs, float), indexing="ij")
    t = np.ones_like(yy)
    for ky, kx, phase, amp in np.asarray(film["modes"], float).reshape(-1, 4):
        t += amp * np.cos(ky * yy + kx * xx + phase)
    for hy, hx, r in np.asarray(film["holes"], float).reshape(-1, 3):
        t[(yy - hy) ** 2 + (xx - hx) ** 2 < r * r] = 0.0
    return np.maximum(t, 0.0).astype(np.float32)


def beam_centres(descan: dict, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Beam centre ``(ky, kx)`` in detector pixels at each probe position.

    The descan model is a quadratic polynomial in the normalised scan
    coordinates ``u = y / (Y - 1) - 1/2``, ``v = x / (X - 1) - 1/2``:
    ``c = c0 + c1 u + c2 v + c3 u^2 + c4 u v + c5 v^2`` for each of ky, kx.

    Returns
    -------
    (len(ys), len(xs), 2) float64 array
    """
    Y, X = descan["scan"]
    u = np.asarray(ys, float)[:, None] / max(Y - 1, 1) - 0.5
    v = np.asarray(xs, float)[None, :] / max(X - 1, 1) - 0.5
    terms = np.broadcast_arrays(np.ones(()), u, v, u * u, u * v, v * v)
    out = np.empty(u.shape[:1] + v.shape[1:] + (2,))
    for axis, key in enumerate(("ky", "kx")):
        out[..., axis] = sum(c * t for c, t in zip(descan[key], terms))
    return out


# --------------------------------------------------------------------------- rendering
def _pixel_gaussian(centres: np.ndarray, sigma: float, n: int) -> np.ndarray:
    """(S, n): a unit-area 1-D Gaussian integrated over each pixel."""
    edges = np.arange(n + 1, dtype=float) - 0.5
    cdf = 0.5 * erf((edges[None, :] - np.asarray(centres, float)[:, None]) / (np.sqrt(2.0) * sigma))
    return np.diff(cdf, axis=1)


def spot_image(spots: np.ndarray, weights: np.ndarray, centre, sigma: float,
               shape: tuple[int, int]) -> np.ndarray:
    """Gaussian diffraction spots, each integrated over the pixel area.

    Parameters
    ----------
    spots : (S, 2) float array
        Spot positions ``(gy, gx)`` relative to the beam, detector pixels.
    weights : (S,) float array
        Integrated intensity of each spot.
    centre : (2,) floats
        Beam position ``(ky, kx)``, detector pixels.
    sigma : float
        Spot width (Gaussian standard deviation), detector pixels.
    shape : (Ky, Kx)

    Returns
    -------
    (Ky, Kx) float64 array
        Sums to ``weights.sum()`` when every spot lies well inside the detector.
    """
    spots = np.asarray(spots, float).reshape(-1, 2)
    gy = _pixel_gaussian(spots[:, 0] + centre[0], sigma, shape[0])
    gx = _pixel_gaussian(spots[:, 1] + centre[1], sigma, shape[1])
    return (gy * np.asarray(weights, float)[:, None]).T @ gx


def spot_images(spots: np.ndarray, weights: np.ndarray, group: np.ndarray, n_groups: int,
                centre, sigma: float, shape: tuple[int, int]) -> np.ndarray:
    """Spot images of several groups at once, each spot rendered only near its centre.

    Same values as :func:`spot_image` (pixel-integrated Gaussians) truncated at
    ``4 sigma + 1`` px from the spot centre (the neglected tail is < 1e-4 of
    a spot), accumulated with one ``bincount``: cost ~ spots x (8 sigma)^2
    instead of spots x Ky x Kx.

    Parameters
    ----------
    spots : (S, 2) float array
        ``(gy, gx)`` relative to the beam, detector px.
    weights : (S,) float array
    group : (S,) int array
        Group index of each spot, in ``[0, n_groups)``.
    n_groups : int
    centre : (2,) floats
        Beam position ``(ky, kx)``, detector px.
    sigma : float
        Spot width, detector px.
    shape : (Ky, Kx)

    Returns
    -------
    (n_groups, Ky, Kx) float64 array
    """
    Ky, Kx = shape
    r = int(np.ceil(4 * sigma)) + 1
    off = np.arange(-r, r + 1)
    mu = np.asarray(spots, float).reshape(-1, 2) + np.asarray(centre, float)
    base = np.round(mu).astype(np.int64)
    iy = base[:, 0, None] + off  # (S, 2r+1)
    ix = base[:, 1, None] + off
    s2 = np.sqrt(2.0) * sigma
    vy = 0.5 * (erf((iy + 0.5 - mu[:, 0, None]) / s2) - erf((iy - 0.5 - mu[:, 0, None]) / s2))
    vx = 0.5 * (erf((ix + 0.5 - mu[:, 1, None]) / s2) - erf((ix - 0.5 - mu[:, 1, None]) / s2))
    vy *= ((iy >= 0) & (iy < Ky)) * np.asarray(weights, float)[:, None]
    vx *= (ix >= 0) & (ix < Kx)
    vals = vy[:, :, None] * vx[:, None, :]
    flat = (np.asarray(group, np.int64)[:, None, None] * Ky + np.clip(iy, 0, Ky - 1)[:, :, None]) * Kx \
        + np.clip(ix, 0, Kx - 1)[:, None, :]
    out = np.bincount(flat.ravel(), weights=vals.ravel(), minlength=n_groups * Ky * Kx)
    return out.reshape(n_groups, Ky, Kx)


def radial_table(optics: dict, centre_lo, centre_hi, shape: tuple[int, int]) -> dict:
    """Pixel-integrated beam, glare and film images for every quantised beam position.

    The three radial profiles are sampled once on a grid of pitch
    ``_SHIFT_QUANTUM`` px (relative to the beam) and box-summed over one pixel,
    so the image for any beam centre that is a multiple of the quantum is a
    strided slice (:func:`radial_images`): pixel integration at 0.1 px
    resolution without re-evaluating the profiles.

    Parameters
    ----------
    optics : dict
        ``beam_radius``, ``edge`` (disc edge blur), ``glare_width`` (halo
        half-width), ``rings`` (R, 3) rows ``(radius, width, weight)``,
        ``diffuse_length``, ``diffuse_weight`` and ``norms`` (3,) from
        :func:`radial_norms`; lengths in detector px.
    centre_lo, centre_hi : (2,) floats
        Range of beam centres ``(ky, kx)`` that will be asked for, px.
    shape : (Ky, Kx)

    Returns
    -------
    dict with ``box`` (3, ny, nx) float32, ``lo`` (2,) and ``f`` (samples per px).
    """
    f = int(round(1 / _SHIFT_QUANTUM))
    lo = np.floor(-np.asarray(centre_hi, float)) - 1.0  # offset k - c of the first pixel edge
    hi = np.asarray(shape, float) + 1.0 - np.floor(np.asarray(centre_lo, float))
    n = np.round((hi - lo) * f).astype(int)
    ty = lo[0] + (np.arange(n[0]) + 0.5) / f
    tx = lo[1] + (np.arange(n[1]) + 0.5) / f
    prof = _radial_profiles(optics, np.hypot(ty[:, None], tx[None, :]))
    cs = np.zeros((3, n[0] + 1, n[1] + 1))
    cs[:, 1:, 1:] = prof.cumsum(axis=1).cumsum(axis=2)
    box = cs[:, f:, f:] - cs[:, :-f, f:] - cs[:, f:, :-f] + cs[:, :-f, :-f]
    box /= f * f * np.asarray(optics["norms"], float)[:, None, None]
    return {"box": box.astype(np.float32), "lo": lo, "f": f}


def radial_images(table: dict, centre, shape: tuple[int, int]) -> np.ndarray:
    """Direct beam disc, camera glare halo and amorphous film scattering at ``centre``.

    Each image is a radial profile about the beam integrated over the pixel
    area and normalised to sum 1 when centred on an infinite detector (so
    intensity falling off the detector is lost, as on a real camera).

    Parameters
    ----------
    table : dict
        From :func:`radial_table`.
    centre : (2,) floats
        Beam position ``(ky, kx)``, detector px; rounded to the 0.1 px grid.
    shape : (Ky, Kx)

    Returns
    -------
    (3, Ky, Kx) float32 array: beam, glare, film.
    """
    f = table["f"]
    start = np.round((-np.asarray(centre, float) - 0.5 - table["lo"]) * f).astype(int)
    if (start < 0).any():
        raise ValueError(f"beam centre {tuple(centre)} outside the rendered range")
    out = table["box"][:, start[0]::f, start[1]::f][:, :shape[0], :shape[1]]
    if out.shape[1:] != tuple(shape):
        raise ValueError(f"beam centre {tuple(centre)} outside the rendered range")
    return out


def _radial_profiles(optics: dict, r: np.ndarray) -> np.ndarray:
    beam = 0.5 * erfc((r - optics["beam_radius"]) / (np.sqrt(2.0) * optics["edge"]))
    glare = (1.0 + (r / optics["glare_width"]) ** 2) ** -1.5
    film = optics["diffuse_weight"] * np.exp(-r / optics["diffuse_length"])
    for radius, width, weight in np.asarray(optics["rings"], float).reshape(-1, 3):
        film = film + weight * np.exp(-0.5 * ((r - radius) / width) ** 2)
    return np.stack([beam, glare, film])


def radial_norms(optics: dict) -> np.ndarray:
    """Integrals over the infinite plane of the three unnormalised radial profiles."""
    rings = np.asarray(optics["rings"], float).reshape(-1, 3)
    reach = 40.0 * max(optics["glare_width"], optics["diffuse_length"],
                       *(rings[:, 0] + 5 * rings[:, 1]))
    r = np.linspace(0.0, reach, 40_001)
    prof = _radial_profiles(optics, r)
    norms = np.trapezoid(prof * 2 * np.pi * r, r, axis=1)
    # The glare tail ~ r^-3 converges; add its analytic remainder beyond `reach`.
    norms[1] += 2 * np.pi * optics["glare_width"] ** 3 / reach
    return norms


def expected_counts(scene: dict, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Noise-free mean counts of every pattern in a block of the scan.

    Pattern model (fractions of the incident dose ``D`` per pattern)::

        I = D * [ T * ((1 - g) * beam + g * glare) + f_film * film
                  + sum_c kappa * power_c * t_c * spots_c ]
        T = max(1 - f_film - sum_c kappa * power_c * t_c, 0)

    where ``t_c`` is the projected thickness of crystal ``c`` (scan px), so
    whatever the crystals and the film scatter leaves the direct beam. All
    images are centred on the local beam position (descan), rendered on a
    0.1 px grid of positions and combined by one matrix product per position.

    Parameters
    ----------
    scene : dict
        Made by :func:`spedflow.simulate._scene.make_scene`.
    ys, xs : 1-D int arrays
        Scan rows and columns of the block.

    Returns
    -------
    (len(ys), len(xs), Ky, Kx) float32 array
    """
    Ky, Kx = scene["detector"]
    ny, nx = len(ys), len(xs)
    thick = crystal_thickness(scene["crystals"], ys, xs).reshape(len(scene["crystals"]), ny * nx)
    film = film_thickness(scene["film"], ys, xs).ravel()
    groups = scene["groups"]
    G = len(groups)
    # Scattered fraction per group (crystals of one orientation share one image).
    member = np.zeros((G, len(scene["crystals"])))
    for i, c in enumerate(scene["crystals"]):
        member[c["group"], i] = scene["kappa"] * groups[c["group"]]["power"]
    scattered = (member @ thick).T if len(scene["crystals"]) else np.zeros((ny * nx, G))
    f_film = scene["film_scatter"] * film
    transmitted = np.maximum(1.0 - f_film - scattered.sum(axis=1), 0.0)
    g = scene["glare"]
    coef = np.concatenate([scattered, (transmitted * (1 - g))[:, None],
                           (transmitted * g)[:, None], f_film[:, None]], axis=1)
    coef *= scene["dose"]
    # Quantise the beam positions; render each distinct one once.
    centres = beam_centres(scene["descan"], ys, xs).reshape(-1, 2)
    q = np.round(centres / _SHIFT_QUANTUM).astype(np.int64)
    uniq, inverse = np.unique(q, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    spots = np.concatenate([grp["spots"] for grp in groups]) if G else np.zeros((0, 2))
    weights = np.concatenate([grp["weights"] for grp in groups]) if G else np.zeros(0)
    owner = np.repeat(np.arange(G), [len(grp["spots"]) for grp in groups])
    out = np.empty((ny * nx, Ky * Kx), np.float32)
    basis = np.empty((G + 3, Ky, Kx), np.float32)
    for j, qc in enumerate(uniq):
        basis[:G] = spot_images(spots, weights, owner, G, qc * _SHIFT_QUANTUM,
                                scene["spot_sigma"], (Ky, Kx))
        basis[G:] = radial_images(scene["radial_table"], qc * _SHIFT_QUANTUM, (Ky, Kx))
        sel = np.flatnonzero(inverse == j)
        out[sel] = coef[sel] @ basis.reshape(G + 3, -1)
    np.maximum(out, 0.0, out=out)
    return out.reshape(ny, nx, Ky, Kx)


# --------------------------------------------------------------------------- noise
def poisson_by_position(expected: np.ndarray, seed: int, ys: np.ndarray, xs: np.ndarray,
                        dtype=np.uint16) -> np.ndarray:
    """Poisson counts, each pattern drawn from a generator seeded by its position.

    Seeding from ``(seed, y, x)`` makes the noise independent of how the scan
    is chunked. The loop is over patterns, but each draw is a whole pattern
    (``Ky * Kx`` values); generator set-up costs about 3 % of the draw.
    Counts above the largest value of ``dtype`` are clipped to it (detector
    saturation: 255 for an 8-bit camera).

    Parameters
    ----------
    expected : (ny, nx, Ky, Kx) float array
        Mean counts.
    seed : int
    ys, xs : 1-D int arrays
        Global scan rows and columns of the block.
    dtype : unsigned integer dtype

    Returns
    -------
    (ny, nx, Ky, Kx) array of ``dtype``
    """
    top = np.iinfo(dtype).max
    out = np.empty(expected.shape, dtype)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            rng = np.random.default_rng([int(seed), 0x5EED, int(y), int(x)])
            out[i, j] = np.minimum(rng.poisson(expected[i, j]), top)
    return out
