"""The Python API: what the CLI calls, one import away in a notebook.

>>> import spedflow
>>> spedflow.simulate("demo.zarr", scan=48)              # doctest: +SKIP
>>> data = spedflow.open_store("demo.zarr")               # xarray over dask  # doctest: +SKIP
>>> res = spedflow.segment("demo.zarr", method="vdf", out="vdf.zarr")      # doctest: +SKIP
>>> spedflow.open_result(res)["segments/maps"]           # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import InputError, ParameterError

__all__ = ["open_store", "open_result", "segment", "load_config"]


def open_store(path, *, array: str = "data"):
    """Open a spedflow input store as a lazy ``xarray.DataArray``.

    Returns
    -------
    (scan_y, scan_x, ky, kx) xarray.DataArray backed by dask, with coordinates in
    calibrated units where the store knows them (``attrs["units"]`` per axis) and the
    store's metadata in ``attrs``.
    """
    import dask.array as da
    import xarray as xr

    from .io import open_input
    arr, meta = open_input(path, array=array)
    data = da.from_zarr(arr)
    dims = ("scan_y", "scan_x", "ky", "kx")
    return xr.DataArray(data, dims=dims, coords=_coords(dims, data.shape, meta),
                        name="patterns", attrs={"spedflow": meta, "path": str(path)})


def _coords(dims, shape, meta: dict, patterns=None) -> dict:
    """Coordinates of the scan and detector axes among ``dims`` (of ``shape``), in the
    units of a store's or result's calibration (the report's reading of it, older
    results' too), else pixels: a scan axis from 0 in steps of a binned scan pixel,
    which sits at its raw pixels' centre; a detector axis centred on the beam at pixel
    ``n // 2``. ``patterns``: a result's pattern shape (its detector binning)."""
    import xarray as xr

    from .report._load import _calibration, _pair
    cal = _calibration(meta, {}, patterns, None)
    b, d = _pair(meta.get("nav_binning"))[0], _pair(meta.get("detector_binning"))[0]
    step, k = cal.scan_step or float(b), cal.k_scale or float(d)
    out = {}
    for dim, n in zip(dims, shape):
        if dim in ("scan_y", "scan_x"):
            values = (b - 1) / 2 * step / b + step * np.arange(n)
            units = cal.scan_units if cal.scan_step else "px"
        elif dim in ("ky", "kx"):
            values, units = k * (np.arange(n) - n // 2), cal.k_units if cal.k_scale else "px"
        else:
            continue
        out[dim] = xr.Variable(dim, values, attrs={"units": units})
    return out


def open_result(path) -> dict:
    """Open a result store: a dict of lazy ``xarray.DataArray`` keyed by array path,
    plus ``"attrs"`` (the run's parameters, timings, counts)."""
    import dask.array as da
    import xarray as xr
    from .io._store import _open_group, _walk_arrays
    g = _open_group(path)
    meta = dict(g.attrs.get("spedflow", {}))
    if meta.get("kind") != "result" and "segments" not in g:
        raise InputError(f"{str(path)!r} is not a spedflow result (made by `spedflow segment`); "
                         "open an input store with spedflow.open_store")
    out: dict[str, Any] = {"attrs": meta}
    patterns = g["segments/patterns"].shape[-2:] if "segments/patterns" in g else None
    dims_by_name = {
        "segments/maps": ("segment", "scan_y", "scan_x"),
        "segments/patterns": ("segment", "ky", "kx"),
        "vdf/images": ("vector", "scan_y", "scan_x"),
        "nmf/factors": ("component", "ky", "kx"),
        "nmf/loadings": ("component", "scan_y", "scan_x"),
        "nmf/beam_mask": ("ky", "kx"),
        "nmf/edge_mask": ("ky", "kx"),
        "vectors": ("vector", "g"),
        "peaks": ("peak", "column"),
        "beam/centres": ("scan_y", "scan_x", "yx"),
        "beam/fitted": ("scan_y", "scan_x", "yx"),
        "overview/annular_vdf": ("scan_y", "scan_x"),
        "overview/total_counts": ("scan_y", "scan_x"),
        "overview/mean_pattern": ("ky", "kx"),
    }
    for name, arr in _walk_arrays(g):
        dims = dims_by_name.get(name, tuple(f"{name.replace('/', '_')}_{i}" for i in range(arr.ndim)))
        if len(dims) != arr.ndim:
            dims = tuple(f"dim_{i}" for i in range(arr.ndim))
        coords = _coords(dims, arr.shape, meta, patterns)
        out[name] = xr.DataArray(da.from_zarr(arr), dims=dims, coords=coords, name=name,
                                 attrs=dict(arr.attrs))
    return out


def load_config(method: str, config=None, overrides: Mapping | None = None):
    """The resolved run configuration of a workflow.

    ``config`` may be a path to a TOML file, a dict, or a config dataclass; ``overrides``
    a nested dict applied on top (``{"preprocess": {"nav_binning": 2}}``), or one keyed
    by dotted names as ``--set`` takes them (``{"preprocess.nav_binning": 2}``).
    """
    from .config import params_from_dict, read_toml
    from .workflows import config_class
    cls = config_class(method)
    if config is None:
        data: dict = {}
    elif isinstance(config, (str, os.PathLike)):
        data = read_toml(config)
    elif isinstance(config, Mapping):
        data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
    elif isinstance(config, cls):
        from .config import params_to_dict
        data = params_to_dict(config)
    else:
        raise ParameterError(f"`config` must be a TOML path, a dict or a {cls.__name__} (got {type(config).__name__})")
    named = f"{str(config)}: " if isinstance(config, (str, os.PathLike)) else ""
    _check_sections(method, cls, data, named)
    if named:  # the file on its own first: an error then is the file's
        try:
            params_from_dict(cls, data)
        except ParameterError as exc:
            raise ParameterError(f"{named}{exc}") from None
    extra = nested_overrides(overrides)
    _check_sections(method, cls, extra, "")
    for section, values in extra.items():
        data.setdefault(section, {})
        data[section] = {**data[section], **values}
    return params_from_dict(cls, data)


def nested_overrides(overrides: Mapping | None) -> dict:
    """``overrides`` as ``{section: {name: value}}``: dotted names (``"peaks.threshold"``,
    as ``--set`` takes them) and tables, mixed."""
    out: dict = {}
    for section, values in (overrides or {}).items():
        if not isinstance(values, Mapping) and isinstance(section, str) and "." in section:
            section, name = section.split(".", 1)  # {"peaks.threshold": 6}
            values = {name: values}
        if not isinstance(values, Mapping):
            raise ParameterError(f"override {section!r} must be a table of parameters "
                                 "({'peaks': {'threshold': 6}}) or name one ('peaks.threshold')")
        out[section] = {**out.get(section, {}), **values}
    return out


def _check_sections(method, cls, data, named: str) -> None:
    """A section of the other workflow's (an NMF file run with --method vdf) named as such."""
    from .workflows import config_class
    other = "nmf" if method == "vdf" else "vdf"
    mine = {f.name for f in dataclasses.fields(cls)}
    theirs = {f.name for f in dataclasses.fields(config_class(other))}
    for section in data:
        if section not in mine and section in theirs:
            raise ParameterError(f"{named}section [{section}] belongs to the {other} workflow "
                                 f"(--method {other}), not {method}")


def segment(store, *, method: str = "vdf", out, config=None, overrides: Mapping | None = None,
            cache=None, overwrite: bool = False, client=None, scheduler: str | None = None,
            n_workers: int | None = None, threads_per_worker: int | None = None,
            memory_limit=None, local: bool | None = None, tls_ca_file=None, tls_cert=None,
            tls_key=None, progress: bool = True) -> Path:
    """Run a whole workflow (``"vdf"`` or ``"nmf"``) on ``store`` and write ``out``.

    Where it runs: an existing ``client``; else ``scheduler`` (or
    ``$SPEDFLOW_SCHEDULER``); else, by default (``local=None``), in this process with
    dask's threaded scheduler for data under 1 GB and on a local cluster on 127.0.0.1
    sized to the machine above that; ``local=True`` always runs in this process,
    ``local=False`` always on a cluster (the scheduler's, else the local one, which
    ``n_workers``, ``threads_per_worker`` and ``memory_limit`` shape).
    Returns the path of the result store (see docs/DESIGN.md for its layout).
    """
    if method not in ("vdf", "nmf"):
        raise ParameterError(f"`method` must be 'vdf' or 'nmf' (got {method!r})")
    _check_where(client, local, scheduler, n_workers, threads_per_worker, memory_limit,
                 (tls_ca_file, tls_cert, tls_key))
    cfg = load_config(method, config, overrides)
    from .workflows._common import prepare_run, validate
    plan = prepare_run(store, out, overwrite=overwrite)  # validates before any cluster starts
    validate(plan, cfg)
    if cache is not None:
        from .io import check_side_directory
        check_side_directory(cache, what="the stage cache", sources=[store, out])
    from . import cluster
    with cluster.progress_switched(progress):
        return _run(method, plan, cfg, cache, client, local, scheduler, n_workers, threads_per_worker,
                    memory_limit, tls_ca_file, tls_cert, tls_key, progress)


def _check_where(client, local, scheduler, n_workers, threads_per_worker, memory_limit,
                 tls) -> None:
    """Refuse where-to-run arguments that contradict each other (they were ignored)."""
    from . import cluster
    named = {"scheduler (--scheduler)": scheduler, "n_workers (--workers)": n_workers,
             "threads_per_worker (--threads)": threads_per_worker,
             "memory_limit (--memory-limit)": memory_limit,
             "a TLS file (--tls-*)": next((t for t in tls if t is not None), None)}
    given = [k for k, v in named.items() if v is not None]
    if local and given:
        raise ParameterError(f"`local=True` (--no-cluster) runs in this process, and "
                             f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for a "
                             "cluster: give one or the other")
    if client is None:
        cluster.refuse_tls_without_scheduler(cluster.resolve_address(scheduler),
                                             any(t is not None for t in tls))


def _run(method, plan, cfg, cache, client, local, scheduler, n_workers, threads_per_worker,
         memory_limit, tls_ca_file, tls_cert, tls_key, progress):
    from . import cluster
    from .workflows import run_workflow
    if client is not None or local or (local is None and scheduler is None
                                       and not os.environ.get("SPEDFLOW_SCHEDULER")
                                       and _small(plan)):
        ctx = cluster.given_client(client) if client is not None else cluster.local_scheduler()
    else:  # the cluster starts while the client measures the data's sample (cluster.starting)
        ctx = cluster.starting(cluster.client_for(
            scheduler, n_workers=n_workers, threads_per_worker=threads_per_worker,
            memory_limit=memory_limit, tls_ca_file=tls_ca_file, tls_cert=tls_cert,
            tls_key=tls_key, quiet=not progress))
    # one BLAS thread per dask thread: the workers already use every core
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1):
        return run_workflow(method, plan, cfg, cache=cache, context=ctx)


def _small(plan) -> bool:
    """Data sets under ~1 GB run in-process by default: starting a cluster costs more."""
    return plan.nbytes < 2**30
