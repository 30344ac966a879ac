"""Shared setup: the benchmark's chunks, parameters and the operators both versions use
(copied from /tmp/prof/prof.py)."""
from pathlib import Path
import os

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "work" / "numba_cache"))

from pathlib import Path

import numpy as np
import zarr

from spedflow.vdf.kernels import disc_masks, _padded_columns
from spedflow.preprocess.kernels import _wrap_blur_factors, _circulant_band
from spedflow.peaks.noise import ring_model

work = Path(__file__).resolve().parents[2] / "work" / "passes"  # made by benchmarks/bench_passes.py
store = work / "sim_64x64_128.zarr"
result = work / "sim_64x64_128_vdf.zarr"


def load():
    res = zarr.open_group(str(result), mode="r")
    resolved = res.attrs["spedflow"]["resolved"]
    prep = resolved["preprocess"]
    data = zarr.open_group(str(store), mode="r")["data"]
    cy, cx = data.chunks[:2]
    ny, nx, ky, kx = data.shape
    corners = [(y, x) for y in range(0, ny, cy) for x in range(0, nx, cx)]
    blocks = [np.asarray(data[y:y + cy, x:x + cx]) for y, x in corners]
    vectors = np.asarray(res["vectors"][:], np.float64)
    fitted = np.asarray(res["beam/fitted"][:], np.float64)
    centres = [fitted[y:y + b.shape[0], x:x + b.shape[1]] for (y, x), b in zip(corners, blocks)]
    masks = disc_masks(vectors, resolved["vdf"]["radius"], (ky, kx), subpixel=resolved["vdf"]["subpixel"])
    counts = (resolved["gain"], resolved["read_variance"])
    P = dict(sigma_low=float(prep["dog_sigma_low"]), sigma_high=float(prep["dog_sigma_high"]),
             counts=counts)

    # operators for the numba kernels (the same objects the NumPy code builds)
    rings = ring_model((ky, kx))
    m_low, fac = _wrap_blur_factors(ky, P["sigma_low"])
    assert fac is None and ky == kx
    h = _circulant_band(ky, P["sigma_low"])[0]
    klow = np.ascontiguousarray(m_low[:h + 1, 0], dtype=np.float32)  # kernel[0..h]
    A, B = _wrap_blur_factors(ky, P["sigma_high"])
    assert B is not None
    idx, w = _padded_columns(masks)
    ops = dict(
        ring=np.ascontiguousarray(rings.ring.reshape(ky, kx)),
        j0=np.ascontiguousarray(rings.j0.reshape(ky, kx)),
        j1=np.ascontiguousarray(rings.j1.reshape(ky, kx)),
        f=np.ascontiguousarray(rings.f.reshape(ky, kx)),
        g=np.ascontiguousarray(rings._g.reshape(ky, kx)),
        counts=np.ascontiguousarray(rings.counts),
        gain=float(counts[0]), read_var=float(counts[1]),
        klow=klow, A=np.ascontiguousarray(A, np.float32), B=np.ascontiguousarray(B, np.float32),
        idx=np.ascontiguousarray(idx, np.int64), w=np.ascontiguousarray(w, np.float32),
    )
    # extra operators of nbfast: ring-ordered pixels, flat int32 interpolation tables,
    # transposed factors
    rflat = rings.ring.ravel()
    ops["order"] = np.argsort(rflat, kind="stable").astype(np.uint32)
    ops["starts"] = np.concatenate([[0], np.cumsum(np.bincount(rflat, minlength=rings.n_rings))]).astype(np.int64)
    ops["j0f"] = rings.j0.astype(np.uint32)
    ops["j1f"] = rings.j1.astype(np.uint32)
    ops["idx32"] = idx.astype(np.uint32)
    ops["ff"] = np.ascontiguousarray(rings.f, np.float32)
    ops["gf"] = np.ascontiguousarray(rings._g, np.float32)
    # ring-ordered interpolation tables (nbfast._ring_subtract_sorted); ring j's pixels
    # interpolate between rings j - 1, j or j, j + 1
    o_ = ops["order"].astype(np.intp)
    ops["j0s"] = np.ascontiguousarray(ops["j0f"][o_])
    ops["gs"] = np.ascontiguousarray(ops["gf"][o_])
    ops["fs"] = np.ascontiguousarray(ops["ff"][o_])
    rs = rflat[o_]
    assert np.all((ops["j0s"] == rs) | (ops["j0s"] == rs - 1))
    assert np.array_equal(ops["j1f"], ops["j0f"] + 1)
    ops["AT"] = np.ascontiguousarray(ops["A"].T)
    ops["BT"] = np.ascontiguousarray(ops["B"].T)
    flat = [b.reshape(-1, ky, kx) for b in blocks]
    shifts = [np.array([ky // 2, kx // 2], np.float64) - c.reshape(-1, 2) for c in centres]
    return dict(blocks=blocks, centres=centres, flat=flat, shifts=shifts, masks=masks, P=P,
                ops=ops, shape=(ky, kx), h=h, rank=A.shape[1], n=sum(len(f) for f in flat))


def run_numba_chunk(nb, frames, shifts, ops, nvec):
    out = np.empty((len(frames), nvec), np.float32)
    o = ops
    nb.pass2_chunk(frames, shifts, o["ring"], o["j0"], o["j1"], o["f"], o["g"], o["counts"],
                   o["gain"], o["read_var"], o["klow"], o["A"], o["B"], o["idx"], o["w"], out)
    return out


def run_fast_chunk(nb, frames, shifts, ops, nvec, blas_last=True, sorted_image=False):
    out = np.empty((len(frames), nvec), np.float32)
    o = ops
    args = (frames, shifts, o["order"], o["starts"], o["j0f"], o["j1f"], o["ff"], o["gf"],
            o["counts"], o["gain"], o["read_var"], o["klow"], o["A"], o["AT"], o["B"],
            o["BT"], o["idx32"], o["w"], blas_last, out)
    if nb.__name__ == "nbfast":  # the generic kernel: no such option
        nb.pass2_chunk(*args)
    else:
        nb.pass2_chunk(*args, sorted_image, o["j0s"], o["gs"], o["fs"])
    return out
