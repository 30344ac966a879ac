"""The two segmentation workflows of Bergh et al. (2020), stage by stage."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import params_to_dict, to_toml
from ..errors import ParameterError
from ._cache import StageCache

__all__ = ["config_class", "default_config_toml", "run_workflow", "StageCache"]


def config_class(method: str):
    if method == "vdf":
        from .vdf import VDFConfig
        return VDFConfig
    if method == "nmf":
        from .nmf import NMFConfig
        return NMFConfig
    raise ParameterError(f"`method` must be 'vdf' or 'nmf' (got {method!r})")


def default_config_toml(method: str) -> str:
    """The default parameters of a workflow as a commented TOML file."""
    cfg = config_class(method)()
    head = (f"# spedflow {method} workflow parameters (defaults).\n"
            "# Parameters left out keep their default; those commented out are derived from the\n"
            "# data (e.g. from the measured direct-beam radius) unless given a value.\n"
            f"# Use: spedflow segment STORE.zarr --method {method} --config this.toml --out RESULT.zarr\n\n")
    text = head + to_toml(params_to_dict(cfg))
    # name the parameters derived from the data, as comments under their section
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        auto = [f.name for f in dataclasses.fields(sub) if getattr(sub, f.name) is None]
        if not auto:
            continue
        note = "".join(f"# {name} = (derived from the data; set a value to fix it)\n" for name in auto)
        header = f"[{section.name}]\n"
        if header in text:
            start = text.index(header)
            end = text.find("\n\n", start)
            end = len(text) if end < 0 else end + 1
            text = text[:end] + note + text[end:]
        else:
            text = text.rstrip("\n") + "\n\n" + header + note
    return text


def run_workflow(method: str, plan, cfg, *, cache=None) -> Path:
    """Run ``method`` on a prepared plan inside the current dask context."""
    cache = StageCache(cache if cache is not None else Path(str(plan.out) + ".cache"))
    if method == "vdf":
        from .vdf import run_vdf
        return run_vdf(plan, cfg, cache)
    from .nmf import run_nmf
    return run_nmf(plan, cfg, cache)
