"""An independent 4D-SPED simulator (NumPy only), for judging spedflow's defaults on data
its own simulator did not make (``benchmarks/bench_foreign.py``).

Conventions deliberately differ from spedflow.simulate:
  * spots are flat-top discs with a soft (tanh) edge, radius 2-6 px (precession)
  * beam nominal centre is NOT at (Ky//2, Kx//2); descan drift linear+quadratic
  * direct beam 20-200x brighter than the strongest spot, diffuse halo + amorphous ring
  * crystals: random star polygons / ellipses / elongated grains, thickness-weighted
  * Poisson noise; optional 8-bit clipping (uint8), uint16 or float32 output

Writes NAME.npy (Y, X, Ky, Kx) and the truth arrays into a folder; :func:`build` ingests
the npy with :func:`spedflow.ingest` and adds truth/masks, truth/patterns and truth/groups
(each crystal its own orientation) to the store, which ``spedflow evaluate`` reads.

Written by a team member as a stress test, deliberately unlike ``spedflow.simulate``;
kept as it was run (only the output folder became an argument).

Usage: python benchmarks/foreign_sim.py OUT_DIR NAME... | all
"""
import json
import sys
from pathlib import Path

import numpy as np


def disc(d, r, soft):
    """Flat-top disc with soft edge, 1 at centre."""
    return 0.5 * (1.0 - np.tanh((d - r) / soft))


# --------------------------------------------------------------- crystals (real space)
def crystal_shape(rng, kind, Y, X, size):
    """Returns (mask, thickness in [0,1]) on the scan grid."""
    cy, cx = rng.uniform(0.12 * Y, 0.88 * Y), rng.uniform(0.12 * X, 0.88 * X)
    yy, xx = np.mgrid[0:Y, 0:X].astype(float)
    dy, dx = yy - cy, xx - cx
    if kind == "ellipse" or kind == "elongated":
        a = size / 2
        b = a * (rng.uniform(0.6, 1.0) if kind == "ellipse" else rng.uniform(0.2, 0.35))
        if kind == "elongated":
            a *= 1.6
        th = rng.uniform(0, np.pi)
        u = dx * np.cos(th) + dy * np.sin(th)
        v = -dx * np.sin(th) + dy * np.cos(th)
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    else:  # random star polygon, 5-9 vertices
        n = rng.integers(5, 10)
        ang = np.sort((np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * np.pi / n + rng.uniform(0, 2 * np.pi)) % (2 * np.pi)
        ang = np.sort(ang)
        rad = size / 2 * rng.uniform(0.6, 1.1, n)
        vx, vy = rad * np.cos(ang), rad * np.sin(ang)
        theta = np.arctan2(dy, dx) % (2 * np.pi)
        r = np.hypot(dx, dy)
        # segment index: vertex i..i+1 containing theta
        idx = (np.searchsorted(ang, theta) - 1) % n
        j = (idx + 1) % n
        x1, y1, x2, y2 = vx[idx], vy[idx], vx[j], vy[j]
        # intersection of ray (cos t, sin t)*s with line through p1, p2
        ux, uy = np.cos(theta), np.sin(theta)
        ex, ey = x2 - x1, y2 - y1
        den = ux * ey - uy * ex
        s = (x1 * ey - y1 * ex) / np.where(np.abs(den) < 1e-9, 1e-9, den)
        rho = np.where(s > 0, r / np.maximum(s, 1e-6), np.inf)
    mask = rho <= 1.0
    thick = np.where(mask, 0.35 + 0.65 * np.sqrt(np.clip(1 - rho ** 2, 0, 1)), 0.0)
    return mask, thick


# --------------------------------------------------------------- lattices (reciprocal)
def lattice(rng, Ky, Kx, spot_r, friedel_only, nmin=6, nmax=20):
    half = min(Ky, Kx) / 2
    gmax = half - spot_r - 3
    for _ in range(200):
        a_len = rng.uniform(max(4 * spot_r + 2, 0.12 * half), 0.45 * half)
        t = rng.uniform(0, 2 * np.pi)
        a = a_len * np.array([np.sin(t), np.cos(t)])  # (ky, kx)
        if friedel_only:
            ns = np.arange(-3, 4)
            ns = ns[ns != 0]
            g = ns[:, None] * a[None, :]
            g = g[np.hypot(*g.T) < gmax]
            if len(g) >= 2:
                return g, np.ones(len(g))
            continue
        b_len = a_len * rng.uniform(0.8, 1.6)
        t2 = t + rng.uniform(np.radians(55), np.radians(125))
        b = b_len * np.array([np.sin(t2), np.cos(t2)])
        hk = np.array([(h, k) for h in range(-8, 9) for k in range(-8, 9) if (h, k) != (0, 0)])
        g = hk @ np.stack([a, b])
        gl = np.hypot(*g.T)
        # also stay inside the (possibly non-square) detector
        ok = (gl < gmax) & (np.abs(g[:, 0]) < Ky / 2 - spot_r - 3) & (np.abs(g[:, 1]) < Kx / 2 - spot_r - 3)
        g, hk = g[ok], hk[ok]
        if nmin <= len(g):
            order = np.argsort(np.hypot(*g.T))
            keep = order[:nmax]
            # keep Friedel-symmetric set: include -g of each kept spot
            g = g[keep]
            return g, np.ones(len(g))
    raise RuntimeError("could not draw a lattice")


def spot_weights(rng, g, half):
    gl = np.hypot(*g.T)
    w = np.exp(-(gl / (0.55 * half)) ** 2) * rng.uniform(0.4, 1.0, len(g))
    return w / w.max()


# --------------------------------------------------------------- render
def render_spots(img, centres, weights, r, soft):
    Ky, Kx = img.shape
    h = int(np.ceil(r + 3 * soft + 1))
    oy, ox = np.mgrid[-h:h + 1, -h:h + 1]
    for (cy, cx), w in zip(centres, weights):
        iy, ix = int(round(cy)), int(round(cx))
        y0, y1, x0, x1 = iy - h, iy + h + 1, ix - h, ix + h + 1
        if y1 <= 0 or x1 <= 0 or y0 >= Ky or x0 >= Kx:
            continue
        d = np.hypot(iy + oy - cy, ix + ox - cx)
        v = w * disc(d, r, soft)
        sy0, sx0 = max(0, -y0), max(0, -x0)
        sy1, sx1 = v.shape[0] - max(0, y1 - Ky), v.shape[1] - max(0, x1 - Kx)
        img[max(0, y0):min(Ky, y1), max(0, x0):min(Kx, x1)] += v[sy0:sy1, sx0:sx1]


def simulate(name, *, scan=(50, 50), det=(64, 64), n_cryst=6, shapes="mixed", size=(0.2, 0.4),
             spot_r=3.0, beam_r=None, soft=0.8, peak=100.0, beam_ratio=50.0,
             halo=0.02, halo_w=None, ring=0.05, ring_r=0.6, ring_w=None,
             drift=2.0, drift_kind="quadratic", friedel_frac=0.25, clip8=False,
             dtype="uint16", strength=(0.5, 1.0), force_overlap=True, seed=0, out=Path(".")):
    OUT = Path(out)
    rng = np.random.default_rng(seed)
    Y, X = scan
    Ky, Kx = det
    half = min(Ky, Kx) / 2
    beam_r = spot_r if beam_r is None else beam_r
    halo_w = halo_w or 0.25 * half
    ring_w = ring_w or 0.06 * half
    # crystals
    kinds = ["poly", "ellipse", "elongated"]
    masks, thicks, lat, wts, amps, frs = [], [], [], [], [], []
    for i in range(n_cryst):
        kind = shapes if shapes != "mixed" else kinds[rng.integers(0, 3)]
        sz = rng.uniform(*size) * min(Y, X)
        for _ in range(200):
            m, t = crystal_shape(rng, kind, Y, X, sz)
            if m.sum() < 25:
                continue
            # at most ~50 % of any crystal hidden under earlier ones; force one overlap
            if masks:
                ov = [np.logical_and(m, mm).sum() / min(m.sum(), mm.sum()) for mm in masks]
                if max(ov) > 0.5:
                    continue
                if force_overlap and i == 1 and max(ov) < 0.15:
                    continue
            break
        fr = rng.random() < friedel_frac
        g, _ = lattice(rng, Ky, Kx, spot_r, fr)
        frs.append(bool(fr))
        masks.append(m)
        thicks.append(t)
        lat.append(g)
        wts.append(spot_weights(rng, g, half))
        amps.append(rng.uniform(*strength))
    masks = np.array(masks)
    # nominal beam centre: off detector centre by a few px (spedflow must find it)
    c0 = np.array([Ky / 2 + rng.uniform(-4, 4), Kx / 2 + rng.uniform(-4, 4)])
    # descan drift field
    yy, xx = np.mgrid[0:Y, 0:X]
    u, v = yy / max(Y - 1, 1) - 0.5, xx / max(X - 1, 1) - 0.5
    dirs = rng.normal(size=(4, 2))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    shift = u[..., None] * dirs[0] + v[..., None] * dirs[1]
    if drift_kind == "quadratic":
        shift = shift + 2 * (u ** 2)[..., None] * dirs[2] + 2 * (u * v)[..., None] * dirs[3]
    shift = shift - shift.mean(axis=(0, 1))
    span = np.abs(shift).max()
    shift = shift * (drift / 2 / span if span > 0 else 0)  # largest wander ~ drift/2 from mean
    centres = c0 + shift
    # film (amorphous ring) thickness: smooth field with a hole
    fy, fx = rng.uniform(0, Y), rng.uniform(0, X)
    film = 0.6 + 0.4 * np.cos(2 * np.pi * (u * rng.uniform(0.3, 1) + v * rng.uniform(0.3, 1)))
    film *= np.hypot(yy - fy, xx - fx) > 0.12 * min(Y, X)
    kyy, kxx = np.mgrid[0:Ky, 0:Kx].astype(float)
    out_dtype = np.uint8 if clip8 else np.dtype(dtype)
    OUT.mkdir(parents=True, exist_ok=True)
    arr = np.lib.format.open_memmap(OUT / f"{name}.npy", mode="w+", dtype=out_dtype, shape=(Y, X, Ky, Kx))
    beam_peak = beam_ratio * peak
    for y in range(Y):
        for x in range(X):
            cy, cx = centres[y, x]
            r = np.hypot(kyy - cy, kxx - cx)
            tot_t = sum(amps[i] * thicks[i][y, x] for i in range(n_cryst))
            img = beam_peak * (1 - 0.3 * min(tot_t, 1.0)) * disc(r, beam_r, soft)
            img += beam_peak * halo * np.exp(-r / halo_w)
            img += peak * ring * film[y, x] * np.exp(-0.5 * ((r - ring_r * half) / ring_w) ** 2)
            img += peak * ring * 0.3 * film[y, x] * np.exp(-r / (0.5 * half))  # amorphous diffuse
            for i in range(n_cryst):
                t = thicks[i][y, x]
                if t > 0:
                    render_spots(img, lat[i] + (cy, cx), peak * amps[i] * t * wts[i], spot_r, soft)
            cnt = rng.poisson(img).astype(np.float64)
            if clip8:
                cnt = np.minimum(cnt, 255)
            elif out_dtype == np.uint16:
                cnt = np.minimum(cnt, 65535)
            arr[y, x] = cnt.astype(out_dtype)
    arr.flush()
    del arr
    # truth patterns: spots about (Ky//2, Kx//2), no beam
    tp = np.zeros((n_cryst, Ky, Kx), np.float32)
    for i in range(n_cryst):
        im = np.zeros((Ky, Kx))
        render_spots(im, lat[i] + (Ky // 2, Kx // 2), wts[i], spot_r, soft)
        tp[i] = im / im.sum()
    np.save(OUT / f"{name}_masks.npy", masks)
    np.save(OUT / f"{name}_patterns.npy", tp)
    meta = dict(scan=scan, det=det, n_cryst=n_cryst, shapes=shapes, spot_r=spot_r, beam_r=beam_r,
                soft=soft, peak=peak, beam_ratio=beam_ratio, halo=halo, ring=ring, drift=drift,
                drift_kind=drift_kind, friedel_frac=friedel_frac, clip8=clip8, dtype=str(out_dtype),
                c0=c0.tolist(), n_spots=[len(g) for g in lat], amps=amps,
                friedel=frs,
                mask_px=masks.sum(axis=(1, 2)).tolist(), seed=seed)
    (OUT / f"{name}_meta.json").write_text(json.dumps(meta, indent=1, default=float))
    return meta


def build(name, out):
    """Ingest the npy with ``spedflow.ingest`` and add the truth group."""
    import zarr

    import spedflow
    OUT = Path(out)
    store = OUT / f"{name}.zarr"
    spedflow.ingest(OUT / f"{name}.npy", store, overwrite=True, progress=False)
    root = zarr.open_group(str(store), mode="r+")
    truth = root.require_group("truth")
    m = np.load(OUT / f"{name}_masks.npy")
    p = np.load(OUT / f"{name}_patterns.npy")
    truth.create_array("masks", data=m, overwrite=True)
    truth.create_array("patterns", data=p, overwrite=True)
    truth.create_array("groups", data=np.arange(len(m), dtype=np.int32), overwrite=True)
    (OUT / f"{name}.npy").unlink()
    return store


SETS = {
    # name: kwargs
    "s01_d64_poly": dict(scan=(50, 50), det=(64, 64), n_cryst=6, shapes="poly", spot_r=2, peak=100, beam_ratio=50, drift=2, drift_kind="linear", seed=1),
    "s02_d100_ell_lowdose": dict(scan=(60, 60), det=(100, 100), n_cryst=8, shapes="ellipse", spot_r=3, peak=20, beam_ratio=100, drift=3, seed=2),
    "s03_d144_mixed_hidose": dict(scan=(64, 64), det=(144, 144), n_cryst=10, shapes="mixed", spot_r=4, peak=1000, beam_ratio=20, drift=4, seed=3),
    "s04_d120x128_elong": dict(scan=(56, 72), det=(120, 128), n_cryst=8, shapes="elongated", spot_r=3, peak=50, beam_ratio=200, drift=3, size=(0.3, 0.5), seed=4),
    "s05_d256_r6": dict(scan=(40, 40), det=(256, 256), n_cryst=5, shapes="mixed", spot_r=6, peak=100, beam_ratio=30, drift=5, seed=5),
    "s06_d144_8bit": dict(scan=(64, 64), det=(144, 144), n_cryst=8, shapes="poly", spot_r=3, peak=60, beam_ratio=100, clip8=True, drift=3, seed=6),
    "s07_d100_dose5": dict(scan=(80, 80), det=(100, 100), n_cryst=12, shapes="mixed", spot_r=3, peak=5, beam_ratio=100, drift=2, size=(0.15, 0.3), seed=7),
    "s08_d64_friedel_ring": dict(scan=(48, 48), det=(64, 64), n_cryst=6, shapes="mixed", spot_r=2, peak=30, beam_ratio=60, friedel_frac=0.6, ring=0.3, drift=2, seed=8),
    "s09_d128x120_halo_mismatch": dict(scan=(60, 60), det=(128, 120), n_cryst=8, shapes="mixed", spot_r=2, beam_r=4, peak=200, beam_ratio=80, halo=0.1, drift=6, seed=9),
    "s10_d144_bigspot_float": dict(scan=(48, 48), det=(144, 144), n_cryst=4, shapes="ellipse", spot_r=5, beam_r=3, peak=300, beam_ratio=40, size=(0.4, 0.6), dtype="float32", seed=10),
}

if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    names = list(SETS) if sys.argv[2] == "all" else sys.argv[2:]
    for n in names:
        meta = simulate(n, out=out_dir, **SETS[n])
        build(n, out_dir)
        print(n, json.dumps({k: meta[k] for k in ("n_spots", "mask_px", "c0")}))
