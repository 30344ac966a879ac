"""A fourth SPED simulator: real crystal structures at random 3-D orientations, kinematic.

Independent of spedflow.simulate, benchmarks/foreign_sim.py and benchmarks/third_sim.py
(those give every crystal a 2-D lattice of spots). Here each crystal is a real structure
rotated at random in 3-D, as diffsims / pyxem simulate them, so most crystals show only a
few reflections (one systematic row, 2-6 spots), a few near a zone axis show many, and
intensities follow structure factors:

  * phases: MgO (rock salt Fm-3m, a = 4.212 A; Mg 0,0,0 + fcc, O 1/2,0,0 + fcc) and, in
    one set, wurtzite ZnO (P6_3mc, a = 3.25, c = 5.21 A, u = 0.382); any cell through
    ``PHASES``. F(hkl) = sum_j f_j(g) exp(-B_j g^2/4) exp(2 pi i hkl.x_j), with electron
    atomic scattering factors in the parametrisation of Lobato & Van Dyck (2014), Acta
    Cryst. A70, 636: f(g) = sum_i a_i (2 + b_i g^2) / (1 + b_i g^2)^2, g = 1/d in A^-1,
    five (a_i, b_i) per element (``LOBATO``; the values tabulated in diffsims 0.7,
    diffsims/utils/lobato_scattering_params.py). Debye-Waller B = 0.3 A^2 (MgO), 0.5 (ZnO).
  * 200 kV electrons (lambda = 0.02508 A); Ewald sphere through the origin, centre tilted
    by the precession angle phi (0.7-1.5 deg) at 180 azimuths; excitation error
    s_g = |g - c(theta)| - 1/lambda; a column of thickness t scatters
    |F|^2 t^2 sinc^2(t s_g) (kinematic shape factor of a slab), averaged over the
    precession circle. Spots sit at the projection g_xy (precession descanned).
  * orientation: a uniform random rotation (random unit quaternion) per crystal; per set
    one or two crystals within 2 deg of a low-index zone axis ([001], [011], [111], or
    ZnO [0001]); in most sets two crystals of one orientation overlapping by 15-50 % of
    the smaller one's area (the paper's case), one group.
  * crystals: MgO cubes / truncated octahedra ({100} + {111} half-spaces, faces jittered),
    ZnO hexagonal prisms, 8-40 nm, rotated with the lattice; the thickness along the beam
    at each scan position is the exact chord through the convex polyhedron; scan steps
    2-4 nm; the per-column intensities are blurred by a Gaussian probe of 1.2 scan steps
    (soft edges); overlaps add intensities.
  * patterns: Gaussian spots (sigma 1.2-2 px) at ``calib`` 0.0095-0.015 A^-1/px (MgO 200 at
    32-50 px from the beam), a direct beam disc of radius 3-5 px (40-150x the MgO 200 spot of
    a 20 nm column at Bragg), diffuse background ~ 1/(k^2 + k0^2) scaled by mass thickness
    plus a flat floor, a linear + quadratic descan of 2-4 px over the scan, Poisson noise;
    detectors: counting (uint16) or an 8-bit camera (gain, dark level, read noise, clipped
    at 255 -- the beam saturates).

Truth per crystal: masks = projected thickness > 0 at the scan pixel centres (crystals are
at least 4 scan steps across), patterns = its spots at its mean thickness about
(Ky//2, Kx//2), no beam or noise, summing to 1; groups = orientation id. CASE_meta.json
lists per crystal the quaternion (w, x, y, z; g_lab = R(q) g_crystal; orix: the
inverse), zone axis and tilt
from it (or null), the number of reflections above 5 % and 20 % of its strongest (at mean
thickness, inside the detector), the expected counts of its strongest spot, and
``visible``: at least two reflections with signal-to-noise N / sqrt(N + B) >= 3 over the
background B under the spot (a crystal that is not visible stays in the truth). Pure
kinematic theory with ~1 deg precession excites few reflections of rock salt at a random
orientation: only about one randomly oriented MgO crystal in five is visible here.

Validation against diffsims 0.7 (benchmarks/spikes/kinematic_vs_diffsims.py, run in a
throwaway venv with diffsims, orix and diffpy.structure; not a dependency): |F|^2 of all 64
MgO reflections to 1 A^-1 equal diffsims' (Lobato, B = 0) to 1e-6; no mixed-parity
reflection; F^2(111) = 3.65 << F^2(200) = 132.7 A^2. With the same sinc^2 relrod (t = 20 nm,
1 deg precession) and diffsims' ``Rotation.from_matrix(R.T)`` for this module's R, at
[001], [011] and two random orientations: spot positions agree to 1e-10 A^-1, the
reflections above 5 % are the same (12, 10, 2, 2), relative intensities agree within
4e-4.

As a module (``bench_foreign.py --simulator kinematic``): ``simulate(name, out, **SETS[name])``
then ``build(name, out)``. As a script::

    python benchmarks/kinematic_sim.py OUT_DIR CASE [CASE ...] | all

writes OUT_DIR/CASE.zarr (ingested with spedflow.ingest) with truth/masks, truth/patterns,
truth/groups and truth/beam_centres; OUT_DIR/CASE_meta.json. ~10-60 s per set.
"""
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

WAVELENGTH = 0.02508  # A, 200 kV

#: Lobato & Van Dyck (2014) electron scattering factor coefficients (a_i [A], b_i [A^2])
LOBATO = {
    'Mg': ((4.855010477, 5.946392738), (-2.662209065, 4.171303125), (0.4780012361, 0.3982698082), (-0.07023070647, 0.1618861858), (0.003989058281, 0.01953450564)),
    'O': ((29.94740452, 1.302839879), (-77.61012663, 1.157941053), (99.88177646, 1.009885493), (-51.21270055, 0.9433279714), (0.008196189544, 0.04331976113)),
    'Zn': ((2.466371105, 4.910280785), (-61.46785413, 0.9678985203), (62.01769452, 0.9512838348), (0.01641601739, 0.02696009677), (0.0001724871176, 0.00234109611)),
    'Au': ((1.675934671, 5.522310932), (3.00486603, 1.38007223), (0.5953400132, 0.1622292377), (0.01171631866, 0.009018148904), (4.296782976e-05, 0.0003792776675)),
}

_FCC = [(0, 0, 0), (0, .5, .5), (.5, 0, .5), (.5, .5, 0)]
_U = 0.382
PHASES = {
    "MgO": dict(cell=(4.212, 4.212, 4.212, 90, 90, 90), B=0.3, shape="cubic",
                atoms=[("Mg", p) for p in _FCC] + [("O", ((p[0] + .5) % 1, p[1], p[2])) for p in _FCC],
                zones={"001": (0, 0, 1), "011": (0, 1, 1), "111": (1, 1, 1)}),
    "ZnO": dict(cell=(3.25, 3.25, 5.21, 90, 90, 120), B=0.5, shape="hex",
                atoms=[("Zn", (1 / 3, 2 / 3, 0)), ("Zn", (2 / 3, 1 / 3, .5)),
                       ("O", (1 / 3, 2 / 3, _U)), ("O", (2 / 3, 1 / 3, .5 + _U))],
                zones={"0001": (0, 0, 1), "2-1-10": (1, 0, 0)}),   # [uvw] in the 3-index basis
    "Au": dict(cell=(4.078, 4.078, 4.078, 90, 90, 90), B=0.6, shape="cubic",
               atoms=[("Au", p) for p in _FCC], zones={"001": (0, 0, 1), "011": (0, 1, 1)}),
}


# ------------------------------------------------------------------ crystallography
def lattice(cell):
    """Direct (rows a1, a2, a3) and reciprocal (rows b1, b2, b3, no 2 pi) matrices, A."""
    a, b, c, al, be, ga = cell
    al, be, ga = np.radians([al, be, ga])
    a1 = [a, 0, 0]
    a2 = [b * np.cos(ga), b * np.sin(ga), 0]
    cx = c * np.cos(be)
    cy = c * (np.cos(al) - np.cos(be) * np.cos(ga)) / np.sin(ga)
    a3 = [cx, cy, np.sqrt(c ** 2 - cx ** 2 - cy ** 2)]
    A = np.array([a1, a2, a3])
    return A, np.linalg.inv(A).T


def scattering_factor(el, g):
    """Lobato electron scattering factor (A) at |g| = 1/d (A^-1)."""
    g2 = np.asarray(g, float) ** 2
    return sum(a * (2 + b * g2) / (1 + b * g2) ** 2 for a, b in LOBATO[el])


def reflection_table(phase, gmax, B=None):
    """All reflections of ``phase`` with 0 < |g| <= gmax and |F|^2 > 1e-6 of the largest:
    hkl (n, 3) int, g (n, 3) Cartesian crystal frame (A^-1), |F|^2 (n,) in A^2."""
    ph = PHASES[phase]
    A, Bm = lattice(ph["cell"])
    n = int(np.ceil(gmax * np.linalg.norm(A, axis=1).max())) + 1
    r = np.arange(-n, n + 1)
    hkl = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    g = hkl @ Bm
    gl = np.linalg.norm(g, axis=1)
    ok = (gl > 0) & (gl <= gmax)
    hkl, g, gl = hkl[ok], g[ok], gl[ok]
    Bdw = ph["B"] if B is None else B
    F = np.zeros(len(hkl), complex)
    for el, x in ph["atoms"]:
        F += scattering_factor(el, gl) * np.exp(-Bdw * gl ** 2 / 4) * np.exp(2j * np.pi * hkl @ np.asarray(x))
    F2 = np.abs(F) ** 2
    keep = F2 > 1e-6 * F2.max()
    return hkl[keep], g[keep], F2[keep]


def quat_to_matrix(q):
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def matrix_to_quat(R):
    w = np.sqrt(max(1 + np.trace(R), 1e-12)) / 2
    if w > 1e-3:
        q = np.array([w, (R[2, 1] - R[1, 2]) / (4 * w), (R[0, 2] - R[2, 0]) / (4 * w), (R[1, 0] - R[0, 1]) / (4 * w)])
    else:   # near 180 deg
        i = int(np.argmax(np.diag(R)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = np.sqrt(max(1 + R[i, i] - R[j, j] - R[k, k], 1e-12)) * 2
        q = np.zeros(4)
        q[0] = (R[k, j] - R[j, k]) / s
        q[1 + i] = s / 4
        q[1 + j] = (R[j, i] + R[i, j]) / s
        q[1 + k] = (R[k, i] + R[i, k]) / s
    return q / np.linalg.norm(q)


def axis_angle(axis, ang):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(ang) * K + (1 - np.cos(ang)) * K @ K


def random_rotation(rng):
    q = rng.normal(size=4)
    return quat_to_matrix(q / np.linalg.norm(q))


def zone_rotation(rng, phase, zone, max_tilt_deg=2.0):
    """A rotation putting crystal direction [uvw] along the beam (lab z), random about the
    beam, then tilted by up to ``max_tilt_deg`` about a random in-plane axis."""
    A, _ = lattice(PHASES[phase]["cell"])
    d = np.asarray(PHASES[phase]["zones"][zone], float) @ A
    d /= np.linalg.norm(d)
    z = np.array([0, 0, 1.0])
    ax = np.cross(d, z)
    R0 = np.eye(3) if np.linalg.norm(ax) < 1e-9 else axis_angle(ax, np.arccos(np.clip(d @ z, -1, 1)))
    R = axis_angle(z, rng.uniform(0, 2 * np.pi)) @ R0
    tilt = np.radians(rng.uniform(0.0, max_tilt_deg))
    a = rng.uniform(0, 2 * np.pi)
    return axis_angle([np.cos(a), np.sin(a), 0], tilt) @ R, float(np.degrees(tilt))


def precession_intensity(g_lab, F2, t_ang, prec_deg, n_az=180):
    """Precession-averaged kinematic intensity |F|^2 t^2 sinc^2(t s) (A^4 units).

    g_lab (n, 3) A^-1, F2 (n,), t_ang (m,) thicknesses in A -> (n, m)."""
    K = 1 / WAVELENGTH
    ph = np.radians(prec_deg)
    th = np.linspace(0, 2 * np.pi, n_az, endpoint=False)
    c = K * np.stack([np.sin(ph) * np.cos(th), np.sin(ph) * np.sin(th), np.full_like(th, np.cos(ph))], 1)
    s = np.linalg.norm(g_lab[:, None, :] - c[None], axis=2) - K          # (n, az)
    t = np.asarray(t_ang, float)
    out = np.empty((len(g_lab), len(t)))
    for j, tt in enumerate(t):
        out[:, j] = (tt ** 2 * np.sinc(tt * s) ** 2).mean(1)
    return F2[:, None] * out


# ------------------------------------------------------------------ shapes
def crystal_faces(rng, phase, size_nm):
    """Half-spaces n.r <= d (crystal Cartesian frame, nm) of a convex crystal."""
    L = size_nm / 2
    if PHASES[phase]["shape"] == "cubic":
        N = [np.array(v, float) for v in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))]
        d = [L * rng.uniform(0.85, 1.15) for _ in N]
        if rng.random() < 0.5:   # truncated octahedron
            f = rng.uniform(0.7, 0.95)
            for sx in (1, -1):
                for sy in (1, -1):
                    for sz in (1, -1):
                        N.append(np.array([sx, sy, sz]) / np.sqrt(3))
                        d.append(f * L * np.sqrt(3))
    else:                          # hexagonal prism, c along z
        N = [np.array([np.cos(a), np.sin(a), 0]) for a in np.radians(30 + 60 * np.arange(6))]
        d = [L * rng.uniform(0.85, 1.15)] * 6
        N += [np.array([0, 0, 1.0]), np.array([0, 0, -1.0])]
        h = L * rng.uniform(0.7, 1.4)
        d += [h, h]
    return np.array(N), np.array(d)


def thickness_map(N, d, R, centre, Y, X, step_nm):
    """Chord length (A) along the beam through the rotated polyhedron at each scan pixel."""
    Nl = N @ R.T
    yy, xx = np.mgrid[0:Y, 0:X].astype(float)
    py, px = (yy - centre[0]) * step_nm, (xx - centre[1]) * step_nm
    zmin = np.full((Y, X), -np.inf)
    zmax = np.full((Y, X), np.inf)
    inside = np.ones((Y, X), bool)
    for n, di in zip(Nl, d):
        b = di - (n[0] * px + n[1] * py)
        if n[2] > 1e-9:
            zmax = np.minimum(zmax, b / n[2])
        elif n[2] < -1e-9:
            zmin = np.maximum(zmin, b / n[2])
        else:
            inside &= b >= 0
    t = np.where(inside, np.clip(zmax - zmin, 0, None), 0.0)
    return np.nan_to_num(t, posinf=0, neginf=0) * 10.0


# ------------------------------------------------------------------ scene
def build_crystals(cfg, rng):
    """Return a list of dicts: phase, R, zone, tilt, group, t (Y, X) thickness in A."""
    Y, X = cfg["scan"]
    step = cfg["step_nm"]
    lo, hi = cfg["size_nm"]
    phases = cfg.get("phases", ["MgO"])
    crystals, occupied = [], np.zeros((Y, X), int)
    zones = list(cfg.get("zones", []))
    group = 0

    def place(phase, R, size, zone, tilt, grp, near=None, max_ov=0.15):
        for attempt in range(400):
            N, d = crystal_faces(rng, phase, size)
            if near is not None:   # overlap a given crystal partly (checked below)
                cy, cx = near["centre"]
                a = rng.uniform(0, 2 * np.pi)
                r = 0.5 * (near["size"] + size) / step * rng.uniform(0.45, 0.8)
                c = (cy + r * np.sin(a), cx + r * np.cos(a))
            elif crystals and rng.random() < 0.4:   # touching a random earlier crystal
                o = crystals[rng.integers(len(crystals))]
                a = rng.uniform(0, 2 * np.pi)
                r = 0.5 * (o["size"] + size) / step * rng.uniform(0.85, 1.05)
                c = (o["centre"][0] + r * np.sin(a), o["centre"][1] + r * np.cos(a))
            else:
                m = 0.5 * size / step + 1
                c = (rng.uniform(m, Y - m), rng.uniform(m, X - m))
            t = thickness_map(N, d, R, c, Y, X, step)
            mask = t > 0
            if mask.sum() < 12:
                continue
            ys, xs = np.nonzero(mask)
            if np.ptp(ys) + 1 < 4 or np.ptp(xs) + 1 < 4 or ys.min() == 0 or xs.min() == 0 \
                    or ys.max() == Y - 1 or xs.max() == X - 1:
                continue
            if near is not None:
                # the paper's case: a partial overlap, 15-50 % of the smaller crystal (a
                # crystal of one orientation lying wholly inside another is a thicker
                # patch of it to any method: nothing in the patterns tells them apart)
                other = near["t"] > 0
                frac = (other & mask).sum() / min(other.sum(), mask.sum())
                if not 0.15 <= frac <= 0.5:
                    continue
            if near is None and (occupied[mask] > 0).mean() > max_ov:
                continue
            if near is None and crystals and max(((o["t"] > 0) & mask).sum() / (o["t"] > 0).sum()
                                                 for o in crystals) > max_ov:
                continue
            occupied[mask] += 1
            crystals.append(dict(phase=phase, R=R, zone=zone, tilt=tilt, group=grp, t=t,
                                 centre=c, size=size))
            return crystals[-1]
        return None

    for i in range(cfg["n"]):
        phase = phases[i % len(phases)]
        size = rng.uniform(lo, hi)
        zone, tilt = None, None
        if zones:
            z = zones[0]
            zp, zn = z.split(":") if ":" in z else ("MgO", z)
            if zp == phase:
                zones.pop(0)
                R, tilt = zone_rotation(rng, phase, zn)
                zone = zn
            else:
                R = random_rotation(rng)
        else:
            R = random_rotation(rng)
        c = place(phase, R, size, zone, tilt, group, max_ov=cfg.get("max_overlap", 0.15))
        if c is not None and cfg.get("pair") and i == 0:
            # the paper's case: a second crystal of the same orientation overlapping it
            place(phase, R, rng.uniform(lo, hi), zone, tilt, group, near=c)
        group += 1
    return crystals


SETS = {
    # name: scan, scan step (nm), crystal sizes (nm), number of crystals, phases, zone axes
    # of the first crystals, detector (kind, size, A^-1 per px), dose (counts of a MgO 200 spot
    # of a 20 nm column at Bragg), beam/spot ratio, precession angle, descan p2p (px), seed
    "mgo128": dict(scan=(56, 56), step_nm=3.0, size_nm=(14, 36), n=10, zones=["001", "011"], pair=True,
                   det="counting", K=128, calib=0.015, sigma=1.3, beam_r=3.5, spot_dose=150,
                   beam_ratio=60, prec_deg=1.0, p2p=3.0, seed=101),
    "astar144": dict(scan=(64, 64), step_nm=3.0, size_nm=(14, 36), n=12, zones=["011", "111"], pair=True,
                     det="8bit", K=144, calib=0.014, sigma=1.5, beam_r=4.0, spot_dose=150, gain=1.5,
                     dark=12, read=1.5, beam_ratio=100, prec_deg=0.8, p2p=3.5, seed=102),
    "count256": dict(scan=(48, 48), step_nm=4.0, size_nm=(18, 40), n=10, zones=["111", "001"], pair=False,
                     det="counting", K=256, calib=0.0095, sigma=2.0, beam_r=5.0, spot_dose=300,
                     beam_ratio=150, prec_deg=1.5, p2p=4.0, seed=103),
    "lowdose": dict(scan=(56, 56), step_nm=3.0, size_nm=(14, 36), n=10, zones=["011", "001"], pair=True,
                    det="counting", K=128, calib=0.015, sigma=1.3, beam_r=3.5, spot_dose=8,
                    beam_ratio=40, prec_deg=1.0, p2p=2.5, seed=104),
    "twophase": dict(scan=(60, 60), step_nm=3.0, size_nm=(14, 34), n=12, phases=["MgO", "ZnO"],
                     zones=["001", "ZnO:0001"], pair=True, det="counting", K=144, calib=0.014,
                     sigma=1.4, beam_r=4.0, spot_dose=120, beam_ratio=80, prec_deg=1.0, p2p=3.0, seed=105),
    "dense": dict(scan=(64, 64), step_nm=2.0, size_nm=(8, 16), n=20, zones=["001", "111"], pair=True,
                  max_overlap=0.25, det="counting", K=128, calib=0.015, sigma=1.2, beam_r=3.0,
                  spot_dose=150, beam_ratio=60, prec_deg=1.0, p2p=2.0, seed=106),
}


def descan(rng, Y, X, p2p, c0):
    u = (np.arange(Y)[:, None] / max(Y - 1, 1) - 0.5) * np.ones((1, X))
    v = (np.arange(X)[None, :] / max(X - 1, 1) - 0.5) * np.ones((Y, 1))
    out = []
    for _ in range(2):
        a = rng.normal(size=5)
        f = a[0] * u + a[1] * v + a[2] * u * u + a[3] * v * v + a[4] * u * v
        out.append(f)
    d = np.stack(out, -1)
    d -= d.mean((0, 1))
    d *= p2p / max((d.max((0, 1)) - d.min((0, 1))).max(), 1e-9)
    return c0 + d


def _gauss_rows(pos, n, sigma):
    """(len(pos), n) normalised 1-D Gaussian profiles centred at ``pos``."""
    k = np.arange(n)
    G = np.exp(-0.5 * ((k[None, :] - np.asarray(pos)[:, None]) / sigma) ** 2)
    return G / (np.sqrt(2 * np.pi) * sigma)


def render_spots(K, pos, w, sigma):
    """Sum of Gaussian spots (integral w) at pos (n, 2) (ky, kx) on a K x K image."""
    if len(w) == 0:
        return np.zeros((K, K))
    return (_gauss_rows(pos[:, 0], K, sigma) * w[:, None]).T @ _gauss_rows(pos[:, 1], K, sigma)


def simulate(case, out, **cfg):
    """Simulate set ``case`` with ``cfg`` (a row of ``SETS``) into OUT/CASE.npy and the
    truth files beside it."""
    rng = np.random.default_rng(cfg["seed"])
    Y, X = cfg["scan"]
    K, calib, sig = cfg["K"], cfg["calib"], cfg["sigma"]
    crystals = build_crystals(cfg, rng)
    gmax = (K / 2 - 3) * calib * np.sqrt(2)
    # reference: MgO 200 exactly at Bragg in a 20 nm column, precession-averaged
    h, g, F2 = reflection_table("MgO", 0.5)
    i200 = np.nonzero((h == [2, 0, 0]).all(1))[0]
    ref = precession_intensity(np.array([[0.475, 0, 0.0]]), F2[i200], [200.0], cfg["prec_deg"])[0, 0]
    scale = cfg["spot_dose"] / ref           # counts per intensity unit
    probe = 1.2
    tables = {}
    all_pos, all_field, owner = [], [], []
    for ci, c in enumerate(crystals):
        if c["phase"] not in tables:
            tables[c["phase"]] = reflection_table(c["phase"], gmax)
        hkl, gc, F2 = tables[c["phase"]]
        gl = gc @ c["R"].T
        pos = gl[:, [1, 0]] / calib                                    # (ky, kx) px from the beam
        on = (np.abs(pos) < K / 2 - 3).all(1)
        hkl, gl, F2, pos = hkl[on], gl[on], F2[on], pos[on]
        tmax = c["t"].max()
        tt = np.linspace(0, tmax * 1.001 + 1, 64)
        table = precession_intensity(gl, F2, tt, cfg["prec_deg"]) * scale   # counts (n, 64)
        tm = c["t"][c["t"] > 0].mean()
        I_mean = np.array([np.interp(tm, tt, row) for row in table])
        keep = I_mean > 0.005 * I_mean.max()
        c.update(hkl=hkl[keep], pos=pos[keep], I_mean=I_mean[keep], t_mean=float(tm))
        # per-column intensities -> probe-blurred fields
        fi = np.interp(c["t"].ravel(), tt, np.arange(len(tt)))
        i0 = np.clip(fi.astype(int), 0, len(tt) - 2)
        fr = fi - i0
        tab = table[keep]
        fld = (tab[:, i0] * (1 - fr) + tab[:, i0 + 1] * fr).reshape(-1, Y, X)
        fld[:, c["t"] == 0] = 0
        fld = ndimage.gaussian_filter(fld, (0, probe, probe), mode="constant")
        all_pos.append(c["pos"]); all_field.append(fld); owner += [ci] * len(fld)
    pos = np.concatenate(all_pos)
    field = np.concatenate(all_field).reshape(len(pos), -1)
    tsum = ndimage.gaussian_filter(sum(c["t"] for c in crystals), probe, mode="constant")
    # beam centres
    c0 = np.array([K / 2 + rng.uniform(-2, 2), K / 2 + rng.uniform(-2, 2)])
    centres = descan(rng, Y, X, cfg["p2p"], c0)
    ky, kx = np.mgrid[0:K, 0:K].astype(float)
    beam = cfg["beam_ratio"] * cfg["spot_dose"]
    k0 = 6.0 * K / 128
    bg_peak = 0.04 * cfg["spot_dose"] / (2 * np.pi * sig ** 2)   # counts/px at k=0, 20 nm
    floor = 0.01 * bg_peak + 0.02
    det = cfg["det"]
    dtype = np.uint8 if det == "8bit" else np.uint16
    arr = np.lib.format.open_memmap(Path(out) / f"{case}.npy", mode="w+", dtype=dtype, shape=(Y, X, K, K))
    for y in range(Y):
        for x in range(X):
            cy, cx = centres[y, x]
            w = field[:, y * X + x]
            sel = w > 1e-3
            img = render_spots(K, pos[sel] + (cy, cx), w[sel], sig)
            r2 = (ky - cy) ** 2 + (kx - cx) ** 2
            disc = 0.5 * (1 - np.tanh((np.sqrt(r2) - cfg["beam_r"]) / 0.7))
            img += beam * disc / disc.sum()
            img += bg_peak * (0.3 + tsum[y, x] / 200.0) * k0 ** 2 / (r2 + k0 ** 2) + floor
            cnt = rng.poisson(img).astype(np.float64)
            if det == "8bit":
                v = cnt * cfg["gain"] + cfg["dark"] + rng.normal(scale=cfg["read"], size=cnt.shape)
                arr[y, x] = np.clip(np.round(v), 0, 255).astype(np.uint8)
            else:
                arr[y, x] = np.minimum(cnt, 65535)
    arr.flush()
    del arr
    # truth
    tp = np.zeros((len(crystals), K, K), np.float32)
    info = []
    for ci, c in enumerate(crystals):
        im = render_spots(K, c["pos"] + (K // 2, K // 2), c["I_mean"], sig)
        tp[ci] = im / max(im.sum(), 1e-12)
        I = c["I_mean"]
        rr2 = (c["pos"] ** 2).sum(1)
        # background under a spot (2-sigma disc) at mean thickness; dark noise in electrons
        B = np.pi * (2 * sig) ** 2 * (bg_peak * (0.3 + c["t_mean"] / 200.0) * k0 ** 2 / (rr2 + k0 ** 2) + floor)
        if det == "8bit":
            B = B + np.pi * (2 * sig) ** 2 * (cfg["read"] / cfg["gain"]) ** 2
        snr = I / np.sqrt(I + B)
        mx = I.max() if len(I) else 0.0
        info.append(dict(phase=c["phase"], group=int(c["group"]), quaternion=matrix_to_quat(c["R"]).round(6).tolist(),
                         zone=c["zone"], zone_tilt_deg=None if c["tilt"] is None else round(c["tilt"], 2),
                         size_nm=round(c["size"], 1), mean_thickness_nm=round(c["t_mean"] / 10, 1),
                         mask_px=int((c["t"] > 0).sum()),
                         n_refl_5=int((I >= 0.05 * mx).sum()), n_refl_20=int((I >= 0.2 * mx).sum()),
                         n_refl_snr3=int((snr >= 3).sum()), strongest_counts=round(float(mx), 1),
                         strongest_hkl=c["hkl"][np.argmax(I)].tolist() if len(I) else None,
                         visible=bool((snr >= 3).sum() >= 2)))
    masks = np.array([c["t"] > 0 for c in crystals])
    groups = np.array([c["group"] for c in crystals], np.int32)
    meta = dict(case=case, **cfg, n_crystals=len(crystals), crystals=info,
                c0=c0.tolist(), centre_range=(centres.max((0, 1)) - centres.min((0, 1))).tolist())
    np.save(Path(out) / f"{case}_masks.npy", masks)
    np.save(Path(out) / f"{case}_patterns.npy", tp)
    np.save(Path(out) / f"{case}_groups.npy", groups)
    np.save(Path(out) / f"{case}_centres.npy", centres.astype(np.float32))
    np.save(Path(out) / f"{case}_thick.npy", np.array([c["t"] for c in crystals], np.float32))
    (Path(out) / f"{case}_meta.json").write_text(json.dumps(meta, indent=1, default=float))
    return meta


def build(case, out):
    """Ingest OUT/CASE.npy and write the truth beside it (as third_sim does)."""
    from third_sim import build as third_build
    return third_build(case, out)


def _summary(meta) -> str:
    cr = meta["crystals"]
    return " ".join(str(x) for x in (
        meta["n_crystals"], "crystals;", "refl>5%:", [c["n_refl_5"] for c in cr],
        "refl>20%:", [c["n_refl_20"] for c in cr], "visible:", sum(c["visible"] for c in cr),
        "groups:", [c["group"] for c in cr]))


if __name__ == "__main__":
    from third_sim import main
    main(sys.argv, SETS, simulate, build, _summary)
