"""spedflow: out-of-core, distributed nanocrystal segmentation of SPED / 4D-STEM data.

The public API, in the order the data flows::

    spedflow.ingest(src, "scan.zarr")              # any microscope format -> Zarr v3
    spedflow.simulate("sim.zarr")                  # or a simulated set with truth
    data = spedflow.open_store("scan.zarr")        # lazy xarray (scan_y, scan_x, ky, kx)
    spedflow.segment("scan.zarr", method="vdf", out="vdf.zarr")   # a whole workflow
    res = spedflow.open_result("vdf.zarr")         # its arrays, lazily, and attributes
    spedflow.evaluate("vdf.zarr", "sim.zarr")      # score against simulated truth
    spedflow.write_report("vdf.zarr", "report/")   # figures + one HTML page

Each stage is a function of its own, taking dask arrays and the parameter dataclasses
the TOML files hold: ``spedflow.preprocess`` (bin_nav, beam_centres, align,
subtract_background_dog, preprocess), ``spedflow.peaks`` (find_peaks, unique_vectors),
``spedflow.vdf`` (vdf_images), ``spedflow.decompose`` (poisson_statistics, scree,
choose_n_components, nmf, classify_components), ``spedflow.segment``
(watershed_image, watershed_stack, merge_vdf_segments, merge_components).
Interoperability: ``spedflow.to_hyperspy`` and ``spedflow.from_array`` (which also takes
a lazy HyperSpy signal).
"""

import importlib as _importlib

from . import _interrupt
from ._version import __version__

_interrupt.install_for_command()  # before the second of imports below

__all__ = [
    "__version__", "ingest", "simulate", "open_store", "open_result", "segment", "load_config",
    "evaluate", "write_report", "export_result", "to_hyperspy", "from_array", "verify_store",
    "default_config_toml", "client_for",
    "preprocess", "peaks", "vdf", "decompose", "segment_", "io", "workflows", "cluster",
]

_LAZY = {
    "ingest": ("spedflow.io", "ingest"),
    "verify_store": ("spedflow.io", "verify_store"),
    "open_store": ("spedflow.api", "open_store"),
    "open_result": ("spedflow.api", "open_result"),
    "load_config": ("spedflow.api", "load_config"),
    "write_report": ("spedflow.report", "write_report"),
    "export_result": ("spedflow.export", "export_result"),
    "to_hyperspy": ("spedflow.interop", "to_hyperspy"),
    "from_array": ("spedflow.interop", "from_array"),
    "default_config_toml": ("spedflow.workflows", "default_config_toml"),
    "client_for": ("spedflow.cluster", "client_for"),
    # subpackages: `spedflow.segment` is the workflow function, the stage package is
    # `spedflow.segment_` here (and importable as the module spedflow.segment)
}


# ``spedflow.segment`` is the one-call workflow function. The stage subpackage of the
# same name is imported first, so that Python does not later bind the module over the
# function when some other module imports it; it stays reachable as ``segment_`` and
# through ``sys.modules["spedflow.segment"]`` (``from spedflow.segment import ...``).
from . import segment as segment_  # noqa: E402
from .api import segment  # noqa: E402,F811
# the same holds for `simulate` and `evaluate` (subpackage/module and function)
from . import simulate as _simulate_pkg  # noqa: E402
from . import evaluate as _evaluate_mod  # noqa: E402
simulate = _simulate_pkg.simulate  # noqa: F811
evaluate = _evaluate_mod.evaluate  # noqa: F811


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = _importlib.import_module(module)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value
        return value
    if name in ("preprocess", "peaks", "vdf", "decompose", "io", "workflows", "cluster", "report",
                "config", "errors", "datasets", "interop", "api", "export", "demo"):
        return _importlib.import_module(f"spedflow.{name}")
    raise AttributeError(f"module 'spedflow' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
