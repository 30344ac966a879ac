"""Moving between spedflow and HyperSpy / pyxem (and plain NumPy / dask arrays).

HyperSpy and pyxem are not dependencies of spedflow: these functions import them only
when called, and say how to install them if they are missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import dask.array as da
import numpy as np

from ._version import __version__
from .errors import InputError, ParameterError
from .io import DATA, atomic_store, create_array, creation_stamp, nav_chunks
from .io._ingest import _parse_calibration, _stored_dtype
from .io._store import check_4d

__all__ = ["from_array", "to_hyperspy"]


def _calib(name, value, default_units):
    """A calibration as ``ingest`` takes it (checked the same way); none: 1 px."""
    parsed = _parse_calibration(name, value, default_units)
    return {"value": 1.0, "units": "px"} if parsed is None else parsed


def _stride(data, dims, stored) -> float:
    """How many of the store's steps one step of a crop's axes ``dims`` spans (1 for a
    plain crop, 2 for ``[::2]``), from its coordinates; refused where the axes' steps
    differ or are uneven (one calibration holds one step)."""
    factors = []
    for d in dims:
        c = np.asarray(data.coords[d].values, np.float64) if d in data.coords else None
        if c is None or c.size < 2:
            continue
        steps = np.abs(np.diff(c))
        if not steps.all():
            raise ParameterError(f"the array repeats {d} positions: a crop by a list of "
                                 f"indices with repeats has no calibration of one step")
        if not np.allclose(steps, steps[0], rtol=1e-6, atol=0):
            raise ParameterError(f"the array's {d} positions are not evenly spaced (a crop by a "
                                 f"list of indices): its calibration would not be one step")
        factors.append(steps[0] / stored)
    if not factors:
        return 1.0
    if not np.allclose(factors, factors[0], rtol=1e-6):
        raise ParameterError(f"the array's {' and '.join(dims)} are cropped with different steps "
                             f"({' and '.join(f'{f:g}' for f in factors)} of the store's): a "
                             f"calibration holds one step for both")
    f = float(factors[0])
    return float(round(f)) if abs(f - round(f)) < 1e-6 * f else f  # a slice's stride: whole


def from_array(data, dest: str | os.PathLike, *, scan_step=None, reciprocal_scale=None,
               overwrite: bool = False, progress: bool = True) -> Path:
    """Write a NumPy / dask array or a (lazy) HyperSpy signal as a spedflow input store.

    Parameters
    ----------
    data : (scan_y, scan_x, ky, kx) numpy.ndarray, dask.array.Array, xarray.DataArray or HyperSpy signal
        A HyperSpy ``Signal2D`` with two navigation axes; its axes calibration is used
        unless ``scan_step`` / ``reciprocal_scale`` are given. A lazy signal stays lazy:
        it is streamed chunk by chunk. An ``xarray.DataArray`` of :func:`spedflow.open_store`
        (a crop of a scan: ``open_store(STORE)[:200, :256]``) keeps its store's calibration.
    dest : path of the store to create.
    scan_step, reciprocal_scale : float, (value, units), {"value", "units"} or str, optional
        As for :func:`spedflow.ingest` ("3.03 nm", "3.03:nm", (3.03, "nm"); a number is
        in nm, 1/nm); none: 1 px. A crop with a stride (``[::2]``) of an
        ``open_store`` array takes that many of the store's steps.

    Returns
    -------
    pathlib.Path of the store.
    """
    source = "array"
    if hasattr(data, "axes_manager") and hasattr(data, "data"):  # a HyperSpy signal
        am = data.axes_manager
        if am.navigation_dimension != 2 or am.signal_dimension != 2:
            raise InputError(f"the signal must have 2 navigation and 2 signal axes "
                             f"(got {am.navigation_dimension} and {am.signal_dimension})")
        from .io._readers import _calibration
        nav, sig = am.navigation_axes, am.signal_axes
        # an axis without units (HyperSpy's "<undefined>") or scale is uncalibrated: px
        for_step, for_scale = (_calibration(a.scale, a.units) for a in (nav[0], sig[0]))
        if scan_step is None and for_step["value"] is not None:
            scan_step = {"value": for_step["value"], "units": for_step["units"]}
        if reciprocal_scale is None and for_scale["value"] is not None:
            reciprocal_scale = {"value": for_scale["value"], "units": for_scale["units"]}
        source = f"hyperspy signal {getattr(data.metadata.General, 'title', '')!s}"
        data = data.data  # hyperspy stores (nav_y, nav_x, sig_y, sig_x) in array order
    elif hasattr(data, "dims") and hasattr(data, "attrs") and hasattr(data, "data"):  # xarray
        given = (data.attrs or {}).get("spedflow") or {}
        for_step, for_scale = given.get("scan_step") or {}, given.get("reciprocal_scale") or {}
        # a crop with a stride ([::2]) has a step of that many of the store's
        if scan_step is None and for_step.get("value"):
            scan_step = {**for_step, "value": for_step["value"]
                         * _stride(data, ("scan_y", "scan_x"), for_step["value"])}
        if reciprocal_scale is None and for_scale.get("value"):
            reciprocal_scale = {**for_scale, "value": for_scale["value"]
                                * _stride(data, ("ky", "kx"), for_scale["value"])}
        if given.get("source"):
            source = f"a part of {given['source']}"
        data = data.data
    if isinstance(data, np.ndarray):
        arr = da.from_array(data, chunks=nav_chunks(data.shape, data.dtype) if data.ndim == 4 else -1)
    elif isinstance(data, da.Array):
        arr = data
    else:
        raise ParameterError(f"`data` must be a numpy/dask array or a HyperSpy signal "
                             f"(got {type(data).__name__})")
    check_4d(arr, "`data`")
    original_dtype = str(arr.dtype)
    stored = _stored_dtype(arr.dtype)  # as ingest stores it: float16 as float32
    if stored != arr.dtype.newbyteorder("="):
        arr = arr.astype(stored)
    import zarr
    chunks = nav_chunks(arr.shape, arr.dtype)
    arr = arr.rechunk(chunks)
    meta = {"kind": "input", "version": __version__, "source": source, "format": "array",
            "original_shape": list(arr.shape), "original_dtype": original_dtype,
            "scan_step": _calib("scan_step", scan_step, "nm"),
            "reciprocal_scale": _calib("reciprocal_scale", reciprocal_scale, "1/nm"),
            "created": creation_stamp(), "complete": False}
    from . import cluster
    with atomic_store(dest, overwrite=overwrite, replaces="input") as tmp, \
            cluster.progress_switched(progress):
        root = zarr.open_group(str(tmp), mode="w")
        z = create_array(root, DATA, arr.shape, arr.dtype, chunks=chunks)
        cluster.store(arr, z, label="write store", n_patterns=int(arr.shape[0] * arr.shape[1]))
        root.attrs["spedflow"] = {**meta, "complete": True}
    return Path(dest)


def _hyperspy():
    try:
        import hyperspy.api as hs
    except ImportError:
        raise InputError("HyperSpy is not installed: `pip install hyperspy` (and pyxem for "
                         "diffraction signal types) to exchange signals with it") from None
    return hs


def to_hyperspy(path, what: str = "data", *, lazy: bool = True):
    """A spedflow store or result as a HyperSpy signal (pyxem's type when installed).

    Parameters
    ----------
    path : an input store or a result store.
    what : str
        ``"data"`` (input store: the 4-D patterns, lazy), ``"segment_patterns"``,
        ``"segment_maps"``, ``"vdf_images"``, ``"nmf_factors"``, ``"nmf_loadings"``.
    lazy : bool
        Return a lazy signal backed by the store (default), or load into memory.

    Returns
    -------
    hyperspy Signal2D (or pyxem ElectronDiffraction2D for patterns when pyxem is
    installed) with calibrated axes.
    """
    hs = _hyperspy()
    from .api import open_result, open_store
    names = {"segment_patterns": "segments/patterns", "segment_maps": "segments/maps",
             "vdf_images": "vdf/images", "nmf_factors": "nmf/factors", "nmf_loadings": "nmf/loadings"}
    if what == "data":
        xa = open_store(path)
        arr = xa.data
        step, rec = xa.attrs["spedflow"].get("scan_step") or {}, xa.attrs["spedflow"].get("reciprocal_scale") or {}
        axes = [_axis("scan_y", arr.shape[0], step, True), _axis("scan_x", arr.shape[1], step, True),
                _axis("ky", arr.shape[2], rec, False, centred=True),
                _axis("kx", arr.shape[3], rec, False, centred=True)]
        diffraction = True
    elif what in names:
        res = open_result(path)
        if names[what] not in res:
            raise InputError(f"result {str(path)!r} has no {names[what]!r} (method "
                             f"{res['attrs'].get('method')!r})")
        arr = res[names[what]].data
        attrs = res["attrs"]
        diffraction = what in ("segment_patterns", "nmf_factors")
        cal = (attrs.get("reciprocal_scale") if diffraction else attrs.get("scan_step")) or {}
        if not diffraction and cal:
            cal = {"value": float(cal.get("value", 1)) * attrs.get("nav_binning", 1), "units": cal.get("units")}
        axes = [{"name": "index", "size": arr.shape[0], "navigate": True},
                _axis("y", arr.shape[1], cal, False, centred=diffraction),
                _axis("x", arr.shape[2], cal, False, centred=diffraction)]
    else:
        raise ParameterError(f"`what` must be one of data, {', '.join(names)} (got {what!r})")
    sig = hs.signals.Signal2D(arr if lazy else np.asarray(arr))
    if lazy:
        sig = sig.as_lazy()
    for ax, spec in zip(sig.axes_manager._axes, axes):
        ax.name, ax.scale, ax.offset, ax.units = spec["name"], spec.get("scale", 1.0), spec.get("offset", 0.0), spec.get("units", "px")
    sig.metadata.General.title = f"spedflow {what}"
    if diffraction:
        try:
            import pyxem  # noqa: F401
            sig.set_signal_type("electron_diffraction")
        except Exception:
            pass
    return sig


def _axis(name, size, cal, navigate, centred=False):
    scale = float((cal or {}).get("value", 1.0) or 1.0)
    units = (cal or {}).get("units", "px")
    return {"name": name, "size": size, "scale": scale, "units": units, "navigate": navigate,
            "offset": -(size // 2) * scale if centred else 0.0}
