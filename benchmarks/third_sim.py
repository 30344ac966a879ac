"""A third SPED simulator, independent of spedflow.simulate and benchmarks/foreign_sim.py.

Physics the other two leave out:
  * bent grains: in-plane rotation gradient (spots drift 1-3 px) + tilt gradient
    (excitation error s_g = c|g|^2 - g.tau moves the Laue circle; I ~ 1/(1+(s/s0)^2))
  * thickness: two-beam Pendelloesung I_g ~ sin^2(pi t s_eff)/(s_eff^2 xi^2), wedge grains
  * twins: mirror bicrystals sharing one systematic row of reflections
  * dense Voronoi aggregates of small (3-6 px) grains
  * small grains of the same phase at another orientation (10-60 degrees) lying inside
    larger ones in projection, flat or bent ("nested", "nestbent"): distinct crystals
    that folding the parts of one crystal must not fold
  * detectors: Medipix-like 256x256 with a 2-px-wide cross of double-area pixels (spatial
    compression + doubled counts), or CCD 144x144 float with dark offset 20 + read noise 3
  * inelastic diffuse background ~ 1/(k^2 + k0^2) scaled by local mass thickness
  * time-ordered slowly wandering descan (smoothed random walk in raster order), ~5 px p-p
Spot shape: pseudo-Voigt (Gaussian core + Lorentzian tails). One Python loop over the
scan positions: ~5 s for a 56 x 56 set.

As a module (``bench_foreign.py --simulator third``): ``simulate(name, out, **SETS[name])``
then ``build(name, out)``. As a script::

    python benchmarks/third_sim.py OUT_DIR CASE [CASE ...] | all

writes OUT_DIR/CASE.zarr (ingested with spedflow.ingest) with truth/masks, truth/patterns,
truth/groups and truth/beam_centres; OUT_DIR/CASE_meta.json.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage


# ------------------------------------------------------------------ lattices
def make_lattice(rng, kmax, a_len=None, hexagonal=False, theta=None):
    """Return reciprocal lattice vectors a, b (ky, kx) in px."""
    a_len = a_len if a_len is not None else rng.uniform(11, 20)
    theta = rng.uniform(0, np.pi) if theta is None else theta
    if hexagonal:
        b_len, gamma = a_len, np.radians(60)
    else:
        b_len, gamma = a_len * rng.uniform(0.9, 1.5), np.radians(rng.uniform(60, 120))
    a = a_len * np.array([np.sin(theta), np.cos(theta)])
    b = b_len * np.array([np.sin(theta + gamma), np.cos(theta + gamma)])
    return a, b


def reflections(a, b, kmax, nmax=10):
    hk = np.array([(h, k) for h in range(-nmax, nmax + 1) for k in range(-nmax, nmax + 1) if (h, k) != (0, 0)])
    g = hk @ np.stack([a, b])
    ok = np.hypot(*g.T) < kmax
    return g[ok], hk[ok]


def mirror(vecs, axis):
    """Mirror (ky,kx) vectors across the line along `axis`."""
    u = axis / np.linalg.norm(axis)
    return 2 * (vecs @ u)[..., None] * u - vecs


# ------------------------------------------------------------------ intensity physics
def spot_intensity(g, t_nm, tau, xi0, c_ewald, s0):
    """Dynamical-ish two-beam intensity with excitation error from tilt tau.

    g: (n,2) px; t_nm thickness; tau (2,) tilt vector (px^-1-ish units);
    xi0 extinction distance scale (nm) per reflection (n,); c_ewald curvature.
    Precession: average over a few excitation errors around s (width s0).
    """
    gl2 = (g ** 2).sum(1)
    s = c_ewald * gl2 - g @ tau                        # excitation error (1/nm units, ad hoc)
    out = np.zeros(len(g))
    # precession: average over a circle of tilts -> s + s0*cos(phi)*|g|/gref
    for ph in np.linspace(0, 2 * np.pi, 8, endpoint=False):
        sp = s + s0 * np.cos(ph) * np.sqrt(gl2) / 20.0
        seff = np.sqrt(sp ** 2 + 1.0 / xi0 ** 2)
        out += np.sin(np.pi * t_nm * seff) ** 2 / (seff * xi0) ** 2
    return out / 8


def render(img, centres, weights, sig, eta=0.25, gam=None):
    """Pseudo-Voigt spots; img is a 2-D float array."""
    Ky, Kx = img.shape
    gam = gam or 1.2 * sig
    h = int(np.ceil(4 * sig + 3))
    oy, ox = np.mgrid[-h:h + 1, -h:h + 1]
    for (cy, cx), w in zip(centres, weights):
        if w <= 0:
            continue
        iy, ix = int(round(cy)), int(round(cx))
        y0, x0 = iy - h, ix - h
        if iy + h < 0 or ix + h < 0 or y0 >= Ky or x0 >= Kx:
            continue
        r2 = (iy + oy - cy) ** 2 + (ix + ox - cx) ** 2
        v = (1 - eta) * np.exp(-0.5 * r2 / sig ** 2) / (2 * np.pi * sig ** 2) \
            + eta * gam / (2 * np.pi * (r2 + gam ** 2) ** 1.5)
        v *= w
        sy0, sx0 = max(0, -y0), max(0, -x0)
        sy1 = v.shape[0] - max(0, y0 + v.shape[0] - Ky)
        sx1 = v.shape[1] - max(0, x0 + v.shape[1] - Kx)
        img[max(0, y0):y0 + v.shape[0], max(0, x0):x0 + v.shape[1]] += v[sy0:sy1, sx0:sx1]


# ------------------------------------------------------------------ descan (time ordered)
def wandering_descan(rng, Y, X, p2p, c0, row_jitter=0.25):
    n = Y * X
    walk = np.cumsum(rng.normal(size=(n, 2)), axis=0)
    walk = ndimage.gaussian_filter1d(walk, sigma=n / 12, axis=0, mode="nearest")
    walk -= walk.mean(0)
    span = (walk.max(0) - walk.min(0)).max()
    walk *= p2p / span
    walk = walk.reshape(Y, X, 2)
    walk += rng.normal(scale=row_jitter, size=(Y, 1, 2))   # line-sync jitter
    return c0 + walk


# ------------------------------------------------------------------ detectors
def medipix_bin(phys):
    """phys: (..., 258, 258) -> (..., 256, 256); pixels 127,128 on each axis are 2 px wide."""
    edges = np.r_[np.arange(0, 128), 129, np.arange(131, 258)]   # start of each of 256 pixels
    a = np.add.reduceat(phys, edges, axis=-2)
    return np.add.reduceat(a, edges, axis=-1)


# ------------------------------------------------------------------ scene
class Grain:
    def __init__(self, mask, g, tau_field, rot_field, t_field, xi, amp, group):
        self.mask, self.g, self.tau, self.rot, self.t, self.xi, self.amp, self.group = \
            mask, g, tau_field, rot_field, t_field, xi, amp, group


def ellipse_mask(Y, X, cy, cx, a, b, th):
    yy, xx = np.mgrid[0:Y, 0:X].astype(float)
    u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
    v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
    return (u / a) ** 2 + (v / b) ** 2 <= 1


def linear_field(mask, lo, hi, direction):
    """Field varying linearly from lo to hi across the mask along direction (angle)."""
    Y, X = mask.shape
    yy, xx = np.mgrid[0:Y, 0:X].astype(float)
    p = xx * np.cos(direction) + yy * np.sin(direction)
    pm = p[mask]
    f = (p - pm.min()) / max(pm.max() - pm.min(), 1e-9)
    return lo + (hi - lo) * np.clip(f, 0, 1)


def build_grains(case, rng, Y, X, kmax):
    """Return list of Grain for each case."""
    grains = []
    yy, xx = np.mgrid[0:Y, 0:X]

    def new(mask, g, group, *, bend=0.0, tilt=0.0, t=(40, 40), amp=1.0, xi=None, rot0=0.0):
        d1, d2 = rng.uniform(0, 2 * np.pi, 2)
        rot = linear_field(mask, -bend / 2, bend / 2, d1) + rot0
        tmag = linear_field(mask, -tilt / 2, tilt / 2, d1)
        tdir = np.array([np.sin(d2), np.cos(d2)])
        tau = tmag[..., None] * tdir
        tf = linear_field(mask, t[0], t[1], rng.uniform(0, 2 * np.pi))
        if xi is None:
            gl = np.hypot(*g.T)
            xi = 25.0 * (gl / 12.0) ** 0.8 * rng.uniform(0.8, 1.3, len(g))
        grains.append(Grain(mask, g, tau, rot, tf, xi, amp, group))

    def nonoverlapping_ellipses(n, rmin, rmax, max_ov=0.15):
        ms = []
        for _ in range(n):
            for _ in range(500):
                a = rng.uniform(rmin, rmax)
                m = ellipse_mask(Y, X, rng.uniform(0.1 * Y, 0.9 * Y), rng.uniform(0.1 * X, 0.9 * X),
                                 a, a * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi))
                if m.sum() < 20:
                    continue
                if ms and max((m & mm).sum() / m.sum() for mm in ms) > max_ov:
                    continue
                ms.append(m)
                break
        return ms

    if case.startswith("bent"):
        # 8 grains, strong rotation gradient (~3 deg over grain -> 1-3 px at |g|~40) + tilt gradient
        for i, m in enumerate(nonoverlapping_ellipses(8, 0.12 * Y, 0.2 * Y)):
            a, b = make_lattice(rng, kmax)
            g, _ = reflections(a, b, kmax)
            new(m, g, i, bend=np.radians(rng.uniform(2.5, 4.5)), tilt=rng.uniform(0.003, 0.006), t=(40, 40))
    elif case.startswith("wedge"):
        # 8 grains, thickness 5 -> 120 nm across (several Pendelloesung fringes)
        for i, m in enumerate(nonoverlapping_ellipses(8, 0.12 * Y, 0.2 * Y)):
            a, b = make_lattice(rng, kmax)
            g, _ = reflections(a, b, kmax)
            new(m, g, i, t=(5, rng.uniform(90, 140)))
    elif case.startswith("twin"):
        # 3 mirror bicrystals (halves share the row n*a) + 3 single grains
        gi = 0
        ms = nonoverlapping_ellipses(6, 0.13 * Y, 0.2 * Y, max_ov=0.0)
        for k, m in enumerate(ms):
            a, b = make_lattice(rng, kmax)
            if k < 3:
                # Sigma3-like: b.u = |a|/6 -> the mirror image coincides with A on every 3rd
                # row parallel to a (the shared systematic rows), differs elsewhere
                al = np.linalg.norm(a); u = a / al; w = np.array([-u[1], u[0]])
                b = (al / 6) * u + al * rng.uniform(0.8, 1.2) * w
            g, _ = reflections(a, b, kmax)
            if k < 3:
                # split along a random line through the centroid
                cy, cx = np.argwhere(m).mean(0)
                ang = rng.uniform(0, np.pi)
                side = ((yy - cy) * np.cos(ang) - (xx - cx) * np.sin(ang)) > 0
                gt = mirror(g, a)
                new(m & side, g, gi, t=(35, 50)); gi += 1
                new(m & ~side, gt, gi, t=(35, 50)); gi += 1
            else:
                new(m, g, gi, t=(35, 50)); gi += 1
    elif case.startswith("dense"):
        # Voronoi aggregate of ~30 grains, 3-6 px across, in a disc; some grains share
        # orientation with a non-neighbour only
        cy, cx, R = Y / 2, X / 2, 0.36 * min(Y, X)
        inside = np.hypot(yy - cy, xx - cx) < R
        n = 30
        seeds = []
        while len(seeds) < n:
            p = rng.uniform([cy - R, cx - R], [cy + R, cx + R])
            if np.hypot(*(p - [cy, cx])) < R - 1:
                seeds.append(p)
        seeds = np.array(seeds)
        d = np.hypot(yy[..., None] - seeds[:, 0], xx[..., None] - seeds[:, 1])
        lab = d.argmin(-1)
        for i in range(n):
            m = inside & (lab == i)
            if m.sum() < 4:
                continue
            a, b = make_lattice(rng, kmax)
            g, _ = reflections(a, b, kmax)
            new(m, g, i, t=(30, 50), amp=rng.uniform(0.6, 1.0))
    elif case.startswith("nest"):
        # 6 grains (bent ones for "nestbent"), each with a small grain of the SAME phase at
        # another orientation (10-60 deg) lying inside it in projection: distinct crystals
        # that lattice-based fragment folding must not fold
        bent = case.startswith("nestbent")
        for i, m in enumerate(nonoverlapping_ellipses(6, 0.15 * Y, 0.22 * Y, max_ov=0.0)):
            a, b = make_lattice(rng, kmax)
            g, _ = reflections(a, b, kmax)
            if bent:
                new(m, g, 2 * i, bend=np.radians(rng.uniform(2.5, 4.5)), tilt=rng.uniform(0.003, 0.006), t=(40, 40))
            else:
                new(m, g, 2 * i, t=(40, 40))
            cy, cx = np.argwhere(m).mean(0)
            r = rng.uniform(0.05, 0.08) * Y
            inner = ellipse_mask(Y, X, cy + rng.uniform(-2, 2), cx + rng.uniform(-2, 2), r, r * rng.uniform(0.7, 1), rng.uniform(0, np.pi)) & m
            ang = np.radians(rng.uniform(10, 60)) * rng.choice([-1, 1])
            R = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
            ga, _ = reflections(R @ a, R @ b, kmax)
            new(inner, ga, 2 * i + 1, t=(30, 30), amp=0.8)
    elif case.startswith("control"):
        # control: uniform thickness, no bending -> every reflection constant across a grain
        for i, m in enumerate(nonoverlapping_ellipses(8, 0.12 * Y, 0.2 * Y)):
            a, b = make_lattice(rng, kmax)
            g, _ = reflections(a, b, kmax)
            new(m, g, i, t=(40, 40))
    elif case.startswith(("medipix", "ccd", "drift", "plain")):
        # ordinary 8 grains (mild bending/wedge) to isolate detector / descan effects
        for i, m in enumerate(nonoverlapping_ellipses(8, 0.12 * Y, 0.2 * Y)):
            a, b = make_lattice(rng, kmax)
            g, _ = reflections(a, b, kmax)
            new(m, g, i, t=(35, 50))
    else:
        raise ValueError(case)
    return grains


SETS = {
    # name: scan, det kind, det size, descan p2p, dose (electrons/pattern), seed
    "control": dict(scan=(56, 56), det="counting", K=128, p2p=1.0, dose=2e4, seed=10),
    "plain":   dict(scan=(56, 56), det="counting", K=128, p2p=1.0, dose=2e4, seed=10),
    "bent":    dict(scan=(56, 56), det="counting", K=128, p2p=1.0, dose=2e4, seed=11),
    "wedge":   dict(scan=(56, 56), det="counting", K=128, p2p=1.0, dose=2e4, seed=12),
    "twin":    dict(scan=(56, 56), det="counting", K=128, p2p=1.0, dose=2e4, seed=13),
    "dense":   dict(scan=(48, 48), det="counting", K=128, p2p=1.0, dose=2e4, seed=14),
    "medipix": dict(scan=(48, 48), det="medipix", K=256, p2p=1.5, dose=2e4, seed=15),
    "ccd":     dict(scan=(56, 56), det="ccd", K=144, p2p=1.0, dose=2e4, seed=16),
    "nested":  dict(scan=(56, 56), det="counting", K=128, p2p=1.0, dose=2e4, seed=21),
    "nested2": dict(scan=(56, 56), det="counting", K=128, p2p=1.0, dose=2e4, seed=22),
    "nestbent": dict(scan=(56, 56), det="counting", K=128, p2p=1.0, dose=2e4, seed=23),
    "nestbent2": dict(scan=(56, 56), det="counting", K=128, p2p=1.0, dose=2e4, seed=24),
    "drift":   dict(scan=(56, 56), det="counting", K=128, p2p=5.0, dose=2e4, seed=17),
}


def simulate(case, out, **cfg):
    """Simulate set ``case`` (its grains are built by its name) with ``cfg`` (a row of
    ``SETS``) into OUT/CASE.npy and the truth files beside it."""
    rng = np.random.default_rng(cfg["seed"])
    Y, X = cfg["scan"]
    K = cfg["K"]
    phys = K + 2 if cfg["det"] == "medipix" else K    # physical pixel grid
    scale = K / 128.0
    kmax = 0.42 * K                                    # detector px of the largest |g|
    sig = 1.1 * scale
    beam_r = 3.0 * scale
    grains = build_grains(case, rng, Y, X, kmax / scale)
    for gr in grains:                                  # lattices drawn in 128-px units
        gr.g = gr.g * scale
    c_ewald = 2e-5 / scale ** 2
    s0 = 0.01
    c0 = np.array([phys / 2 + rng.uniform(-3, 3), phys / 2 + rng.uniform(-3, 3)]) if cfg["det"] != "medipix" \
        else np.array([phys / 2 - 0.5 + rng.uniform(-3, 3), phys / 2 - 0.5 + rng.uniform(-3, 3)])
    centres = wandering_descan(rng, Y, X, cfg["p2p"] * scale, c0)
    # film: amorphous carbon, smooth thickness with a hole
    yy, xx = np.mgrid[0:Y, 0:X]
    film = 1.0 + 0.3 * np.sin(2 * np.pi * yy / Y * rng.uniform(0.5, 1.5)) * np.cos(2 * np.pi * xx / X)
    hy, hx = rng.uniform(0, Y), rng.uniform(0, X)
    film *= np.hypot(yy - hy, xx - hx) > 0.12 * min(Y, X)
    ky, kx = np.mgrid[0:phys, 0:phys].astype(float)
    k0 = 4.0 * scale
    dose = cfg["dose"]
    dtype = np.float32 if cfg["det"] == "ccd" else np.uint16
    arr = np.lib.format.open_memmap(Path(out) / f"{case}.npy", mode="w+", dtype=dtype, shape=(Y, X, K, K))
    # truth accumulation: mean intensity and mean spot position per grain
    acc_w = [np.zeros(len(gr.g)) for gr in grains]
    acc_p = [np.zeros((len(gr.g), 2)) for gr in grains]
    acc_n = [0 for gr in grains]
    bragg_frac = 0.25
    for y in range(Y):
        for x in range(X):
            cy, cx = centres[y, x]
            img = np.zeros((phys, phys))
            tot_scat = 0.0
            mass = film[y, x] * 0.3
            for gi, gr in enumerate(grains):
                if not gr.mask[y, x]:
                    continue
                th = gr.rot[y, x]
                R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
                gpos = gr.g @ R.T
                I = spot_intensity(gr.g / scale, gr.t[y, x], gr.tau[y, x], gr.xi, c_ewald * scale ** 2, s0)
                I *= np.exp(-(np.hypot(*gr.g.T) / (0.35 * K)) ** 2)   # Debye-Waller / form factor
                w = dose * bragg_frac * gr.amp * I / 6.0
                tot_scat += w.sum()
                render(img, gpos + (cy, cx), w, sig)
                acc_w[gi] += w
                acc_p[gi] += gpos * w[:, None]
                acc_n[gi] += 1
                mass += gr.t[y, x] / 40.0
            # direct beam: flat disc with soft edge, loses what was scattered
            r = np.hypot(ky - cy, kx - cx)
            inel = dose * 0.15 * min(mass, 3) / 3
            beam = max(dose - tot_scat - inel, 0.1 * dose)
            disc = 0.5 * (1 - np.tanh((r - beam_r) / 0.6))
            img += beam * disc / disc.sum()
            # inelastic/diffuse: ~ 1/(k^2+k0^2), normalised to `inel` counts over the detector
            diff = 1.0 / (r ** 2 + k0 ** 2)
            img += inel * diff / diff.sum()
            # amorphous ring of the film
            ring = np.exp(-0.5 * ((r - 0.3 * K) / (0.05 * K)) ** 2)
            img += dose * 0.03 * film[y, x] * ring / ring.sum()
            cnt = rng.poisson(img).astype(np.float64)
            if cfg["det"] == "medipix":
                cnt = medipix_bin(cnt)
                arr[y, x] = np.minimum(cnt, 65535)
            elif cfg["det"] == "ccd":
                arr[y, x] = (cnt + 20.0 + rng.normal(scale=3.0, size=cnt.shape)).astype(np.float32)
            else:
                arr[y, x] = np.minimum(cnt, 65535)
    arr.flush()
    del arr
    # truth patterns: mean spots (intensity-weighted mean position) about the beam at (K//2, K//2)
    tp = np.zeros((len(grains), K, K), np.float32)
    for gi, gr in enumerate(grains):
        n = max(acc_n[gi], 1)
        w = acc_w[gi] / n
        pos = acc_p[gi] / np.maximum(acc_w[gi], 1e-12)[:, None]
        im = np.zeros((K, K))
        render(im, pos + (K // 2, K // 2), w, sig)
        tp[gi] = im / max(im.sum(), 1e-12)
    masks = np.array([gr.mask for gr in grains])
    groups = np.array([gr.group for gr in grains], np.int32)
    meta = dict(case=case, **{k: v for k, v in cfg.items()}, n_grains=len(grains),
                mask_px=masks.sum((1, 2)).tolist(), n_spots=[len(gr.g) for gr in grains],
                c0=c0.tolist(), centre_range=(centres.max((0, 1)) - centres.min((0, 1))).tolist())
    np.save(Path(out) / f"{case}_masks.npy", masks)
    np.save(Path(out) / f"{case}_patterns.npy", tp)
    np.save(Path(out) / f"{case}_groups.npy", groups)
    np.save(Path(out) / f"{case}_centres.npy", centres.astype(np.float32))
    np.save(Path(out) / f"{case}_rot.npy", np.array([gr.rot for gr in grains]))
    np.save(Path(out) / f"{case}_thick.npy", np.array([gr.t * gr.mask for gr in grains]))
    (Path(out) / f"{case}_meta.json").write_text(json.dumps(meta, indent=1, default=float))
    return meta


def build(case, out):
    import zarr
    import spedflow
    out = Path(out)
    store = out / f"{case}.zarr"
    spedflow.ingest(out / f"{case}.npy", store, overwrite=True, progress=False)
    root = zarr.open_group(str(store), mode="r+")
    truth = root.require_group("truth")
    truth.create_array("masks", data=np.load(out / f"{case}_masks.npy"), overwrite=True)
    truth.create_array("patterns", data=np.load(out / f"{case}_patterns.npy"), overwrite=True)
    truth.create_array("groups", data=np.load(out / f"{case}_groups.npy"), overwrite=True)
    truth.create_array("beam_centres", data=np.load(out / f"{case}_centres.npy"), overwrite=True)
    (out / f"{case}.npy").unlink()
    return store


def main(argv, sets, simulate, build, summary) -> None:
    """``python SIM.py OUT all|NAME ...``: simulate and ingest the named sets of ``sets``
    into OUT, a line each (its time and ``summary(meta)``). Shared with kinematic_sim."""
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    names = list(sets) if argv[2] == "all" else argv[2:]
    for n in names:
        t0 = time.time()
        meta = simulate(n, out, **sets[n])
        build(n, out)
        print(n, f"{time.time() - t0:.0f}s", summary(meta), flush=True)


if __name__ == "__main__":
    main(sys.argv, SETS, simulate, build, lambda meta: json.dumps(
        {k: meta[k] for k in ("n_grains", "mask_px", "n_spots", "centre_range")}))
