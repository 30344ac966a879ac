"""Write simulated SPED data with ground truth as an ordinary spedflow input store.

The data are generated chunk by chunk from a scene drawn once from ``seed``
(:mod:`._scene`), in a thread pool (NumPy's matrix products, random draws and
the Blosc codec release the GIL), so memory stays at a few chunks whatever the
size of the set, and the result does not depend on the chunking or the number
of workers.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from .._version import __version__
from ..config import check_range, params_from_dict, params_to_dict
from ..errors import ParameterError
from ..io import DATA, atomic_store, create_array, creation_stamp, nav_chunks
from ..io._progress import ProgressBar
from . import _kernels as K
from ._scene import SimParams, make_scene, scene_attrs

__all__ = ["SimParams", "simulate", "simulate_array"]

TRUTH = "truth"


# --------------------------------------------------------------------------- validation
def _pair(name: str, value, low: int) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ParameterError(f"`{name}` must be an integer or a pair of integers (got {value!r})")
    for v in value:
        check_range(name, v, low=low, integer=True)
    return int(value[0]), int(value[1])


def _validate(scan, detector, crystals, seed, options) -> tuple:
    scan = _pair("scan", scan, 4)
    detector = _pair("detector", detector, 16)
    check_range("crystals", crystals, low=0, integer=True)
    check_range("seed", seed, low=0, integer=True)
    params = params_from_dict(SimParams, options)
    return scan, detector, int(crystals), int(seed), params


# --------------------------------------------------------------------------- blocks
def _block(scene: dict, y0: int, y1: int, x0: int, x1: int, expected=None) -> np.ndarray:
    """Counts of the patterns ``[y0:y1, x0:x1]``: render, Poisson noise, clip, cast."""
    ys, xs = np.arange(y0, y1), np.arange(x0, x1)
    if expected is None:
        expected = K.expected_counts(scene, ys, xs)
    dtype = np.uint8 if scene["saturate"] == "8bit" else np.uint16
    out = K.poisson_by_position(expected, scene["seed"], ys, xs, dtype)
    d = scene.get("defects")
    if d is not None:
        hot, dead = d["hot"], d["dead"]
        out[..., hot[:, 0], hot[:, 1]] = min(round(d["hot_level"]), np.iinfo(dtype).max)
        out[..., dead[:, 0], dead[:, 1]] = 0
    return out


def _truth_patterns(scene: dict) -> np.ndarray:
    """(C, Ky, Kx) float32: each crystal's spots, beam at (Ky//2, Kx//2), weights sum 1."""
    Ky, Kx = scene["detector"]
    centre = (Ky // 2, Kx // 2)
    crystals, groups = scene["crystals"], scene["groups"]
    if not crystals:
        return np.zeros((0, Ky, Kx), np.float32)
    spots = [groups[c["group"]] for c in crystals]
    return K.spot_images(np.concatenate([g["spots"] for g in spots]),
                         np.concatenate([g["weights"] for g in spots]),
                         np.repeat(np.arange(len(spots)), [len(g["spots"]) for g in spots]),
                         len(spots), centre, scene["spot_sigma"], (Ky, Kx)).astype(np.float32)


def _crystal_thickness_full(scene: dict, i: int) -> np.ndarray:
    """(Y, X) float32 projected thickness of crystal ``i``, computed in its bounding box only."""
    Y, X = scene["scan"]
    c = scene["crystals"][i]
    reach = float(np.linalg.norm(c["half"])) + 1
    y0, y1 = max(0, int(c["centre"][0] - reach)), min(Y, int(c["centre"][0] + reach) + 1)
    x0, x1 = max(0, int(c["centre"][1] - reach)), min(X, int(c["centre"][1] + reach) + 1)
    out = np.zeros((Y, X), np.float32)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = K.crystal_thickness([c], np.arange(y0, y1), np.arange(x0, x1))[0]
    return out


def _mask(scene: dict, i: int, thickness: np.ndarray) -> np.ndarray:
    c = scene["crystals"][i]
    return thickness > scene["mask_fraction"] * c["thickness_max"]


def _meta(scene: dict, params: SimParams, shape, dtype, crystals: int) -> dict:
    Ky, Kx = scene["detector"]
    rscale = params.reciprocal_scale if params.reciprocal_scale is not None \
        else 0.0325 * 144 / min(Ky, Kx)
    return {"kind": "input", "version": __version__, "source": "simulate",
            "original_shape": list(shape), "original_dtype": np.dtype(dtype).name,
            "scan_step": {"value": float(params.scan_step), "units": "nm"},
            "reciprocal_scale": {"value": float(rscale), "units": "1/A"},
            "simulation": {"scan": list(scene["scan"]), "detector": [Ky, Kx],
                           "crystals": crystals, "seed": scene["seed"],
                           "params": params_to_dict(params)},
            "created": creation_stamp(), "complete": True}


# --------------------------------------------------------------------------- public
def simulate(dest: str | os.PathLike, *, scan: int | tuple[int, int] = (64, 64),
             detector: int | tuple[int, int] = 128, crystals: int = 10, seed: int = 0,
             overwrite: bool = False, progress: bool = True,
             chunks: tuple[int, int] | None = None, workers: int | None = None,
             **options) -> Path:
    """Simulate SPED data of nanocrystals on holey carbon and write an input store.

    The store is an ordinary spedflow input store (``data`` and the
    ``spedflow`` attributes, see docs/DESIGN.md) plus the ground truth:

    ``truth/masks`` bool (C, Y, X)
        Where each crystal's projected thickness exceeds ``mask_fraction`` of its
        maximum.
    ``truth/patterns`` float32 (C, Ky, Kx)
        Each crystal's noise-free Bragg spots alone (no beam, film or glare),
        beam at (Ky // 2, Kx // 2), spot weights summing to 1 (spots cut by the
        detector edge lose their outside part).
    ``truth/groups`` int32 (C,)
        Orientation group of each crystal (same group = same pattern).
    ``truth/thickness`` float32 (C, Y, X)
        Projected thickness, scan pixels.
    ``truth/beam_centres`` float32 (Y, X, 2)
        Beam centre (ky, kx) of every pattern, detector px (the descan model).

    ``truth`` attrs ``simulation`` describe each crystal (group, shape, size,
    thickness_max, n_spots, scattered_fraction_max), the descan polynomial and
    the optics. The mean counts of a pattern, as fractions of the dose D, are
    ``T ((1-g) beam + g glare) + f_film film + sum_c kappa power_c t_c spots_c``
    with ``T = 1 - f_film - sum_c kappa power_c t_c`` (what is scattered leaves
    the beam), every term shifted with the descanned beam; then Poisson noise.

    Parameters
    ----------
    dest : path
        Store to create (written as ``dest.partial`` and renamed when complete).
    scan : int or (int, int)
        Scan size (Y, X), probe positions.
    detector : int or (int, int)
        Detector size (Ky, Kx), pixels.
    crystals : int
        Number of crystals C.
    seed : int
        Seed of the scene and of the noise; equal seeds give identical data for
        any ``chunks`` and ``workers``.
    overwrite : bool
        Replace an existing ``dest``.
    progress : bool
        Show a progress bar on stderr.
    chunks : (int, int) or None
        Navigation chunk (cy, cx) of ``data``. None: ``spedflow.io.nav_chunks``.
    workers : int or None
        Threads generating chunks. None: the number of CPUs.
    **options
        Fields of :class:`SimParams` (shape, size_range, groups, dose,
        saturate, ...).

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    ParameterError
        A bad size, count or option (before anything is written).
    StoreExistsError
        ``dest`` exists and ``overwrite`` is false.
    """
    scan, detector, crystals, seed, params = _validate(scan, detector, crystals, seed, options)
    if chunks is not None:
        chunks = _pair("chunks", chunks, 1)
    check_range("workers", workers, low=1, integer=True, allow_none=True)
    scene = make_scene(scan, detector, crystals, seed, params)
    dtype = np.uint8 if params.saturate == "8bit" else np.uint16
    shape = (*scan, *detector)
    cy, cx = chunks if chunks is not None else nav_chunks(shape, dtype)[:2]
    cy, cx = min(cy, scan[0]), min(cx, scan[1])
    dest = Path(dest)
    with atomic_store(dest, overwrite=overwrite, replaces="input") as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        data = create_array(root, DATA, shape, dtype, chunks=(cy, cx, *detector))
        _write_truth(root, scene)
        blocks = [(y0, min(y0 + cy, scan[0]), x0, min(x0 + cx, scan[1]))
                  for y0 in range(0, scan[0], cy) for x0 in range(0, scan[1], cx)]
        bar = ProgressBar(len(blocks), cy * cx * np.prod(detector) * np.dtype(dtype).itemsize,
                          label="simulate ", enabled=bool(progress))

        def job(b):
            y0, y1, x0, x1 = b
            data[y0:y1, x0:x1] = _block(scene, y0, y1, x0, x1)

        n_workers = int(workers) if workers is not None else (os.cpu_count() or 1)
        bar.start()
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            for _ in pool.map(job, blocks):
                bar.update(1)
        bar.close()
        root.attrs["spedflow"] = _meta(scene, params, shape, dtype, crystals)
    return dest


def _write_truth(root: zarr.Group, scene: dict) -> None:
    Y, X = scene["scan"]
    Ky, Kx = scene["detector"]
    C = len(scene["crystals"])
    truth = root.create_group(TRUTH)
    masks = create_array(truth, "masks", (C, Y, X), bool, chunks=(1, Y, X))
    thick = create_array(truth, "thickness", (C, Y, X), np.float32, chunks=(1, Y, X))
    for i in range(C):  # one crystal at a time: memory Y * X, not C * Y * X
        t = _crystal_thickness_full(scene, i)
        thick[i] = t
        masks[i] = _mask(scene, i, t)
    create_array(truth, "patterns", (C, Ky, Kx), np.float32,
                 chunks=(1, Ky, Kx))[...] = _truth_patterns(scene)
    create_array(truth, "groups", (C,), np.int32)[...] = np.array(
        [c["group"] for c in scene["crystals"]], np.int32)
    rows = max(1, (16 * 2**20) // (X * 8))
    centres = create_array(truth, "beam_centres", (Y, X, 2), np.float32, chunks=(min(rows, Y), X, 2))
    for y0 in range(0, Y, rows):
        ys = np.arange(y0, min(Y, y0 + rows))
        centres[y0:ys[-1] + 1] = K.beam_centres(scene["descan"], ys, np.arange(X)).astype(np.float32)
    truth.attrs["simulation"] = scene_attrs(scene)


def simulate_array(*, scan: int | tuple[int, int] = (16, 16), detector: int | tuple[int, int] = 32,
                   crystals: int = 3, seed: int = 0, **options) -> tuple[np.ndarray, dict]:
    """Simulate a small set in memory (same model and seeds as :func:`simulate`).

    Parameters
    ----------
    scan, detector, crystals, seed, **options
        As for :func:`simulate`.

    Returns
    -------
    data : (Y, X, Ky, Kx) uint16 (uint8 with ``saturate="8bit"``) array
        Identical to the ``data`` array :func:`simulate` writes for the same
        arguments.
    truth : dict
        ``masks`` (C, Y, X) bool, ``patterns`` (C, Ky, Kx) float32, ``groups``
        (C,) int32, ``thickness`` (C, Y, X) float32, ``beam_centres`` (Y, X, 2)
        float32, ``expected`` (Y, X, Ky, Kx) float32 noise-free mean counts,
        ``attrs`` (the ``truth`` attributes of the store).
    """
    scan, detector, crystals, seed, params = _validate(scan, detector, crystals, seed, options)
    scene = make_scene(scan, detector, crystals, seed, params)
    ys, xs = np.arange(scan[0]), np.arange(scan[1])
    expected = K.expected_counts(scene, ys, xs)
    data = _block(scene, 0, scan[0], 0, scan[1], expected)
    C = len(scene["crystals"])
    thickness = np.stack([_crystal_thickness_full(scene, i) for i in range(C)]) if C \
        else np.zeros((0, *scan), np.float32)
    masks = np.stack([_mask(scene, i, thickness[i]) for i in range(C)]) if C \
        else np.zeros((0, *scan), bool)
    truth = {"masks": masks, "patterns": _truth_patterns(scene),
             "groups": np.array([c["group"] for c in scene["crystals"]], np.int32),
             "thickness": thickness,
             "beam_centres": K.beam_centres(scene["descan"], ys, xs).astype(np.float32),
             "expected": expected, "attrs": scene_attrs(scene)}
    return data, truth
