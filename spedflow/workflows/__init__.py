"""The two segmentation workflows of Bergh et al. (2020), stage by stage."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..config import params_to_dict, to_toml
from ..errors import ParameterError
from ._cache import StageCache

log = logging.getLogger("spedflow")

__all__ = ["config_class", "default_config_toml", "parameter_summaries", "run_workflow", "StageCache"]


def config_class(method: str):
    if method == "vdf":
        from .vdf import VDFConfig
        return VDFConfig
    if method == "nmf":
        from .nmf import NMFConfig
        return NMFConfig
    raise ParameterError(f"`method` must be 'vdf' or 'nmf' (got {method!r})")


def default_config_toml(method: str) -> str:
    """The default parameters of a workflow as a TOML file, each parameter under a
    comment that says what it is (the first sentence of its description in the
    parameter class's docstring, see :func:`parameter_summaries`)."""
    cfg = config_class(method)()
    lines = [f"# spedflow {method} workflow parameters (defaults).",
             "# Parameters left out keep their default; those commented out are derived from the",
             "# data (e.g. from the measured direct-beam radius) unless given a value.",
             f"# Use: spedflow segment STORE.zarr --method {method} --config this.toml --out RESULT.zarr",
             "# Each parameter's full description: the docstring of its section's class,",
             f"# e.g. help(type(spedflow.load_config({method!r}).{dataclasses.fields(cfg)[1].name})).", ""]
    values = params_to_dict(cfg)
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        about = parameter_summaries(type(sub))
        lines.append(f"[{section.name}]")
        said = None
        for f in dataclasses.fields(sub):
            if about.get(f.name) != said:  # parameters described together: said once
                for text in _wrap(about.get(f.name, "")):
                    lines.append(f"# {text}")
            said = about.get(f.name)
            if getattr(sub, f.name) is None:
                lines.append(f"# {f.name} = (derived from the data; set a value to fix it)")
            else:
                line = to_toml({f.name: values[section.name][f.name]}).strip()
                lines.append(line)
        lines.append("")
    return "\n".join(lines)


def parameter_summaries(cls) -> dict[str, str]:
    """``{name: first sentence of its description}`` from the numpy-style "Parameters"
    section of ``cls``'s docstring (names written ``name : type``, the description
    indented under it)."""
    import inspect
    import re
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    name, body = None, []

    def close():
        if name is not None and body:
            text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`.]+)`", r"\1", " ".join(body))  # :func:`a.b` -> b
            text = text.replace("``", "")
            # the first sentence: up to a full stop that ends no abbreviation
            first = re.split(r"(?<=[a-z0-9)\]])(?<!\bal)(?<!\be\.g)(?<!\bi\.e)(?<!\bcf)\.\s",
                             text, maxsplit=1)[0].rstrip(".")
            for n in name:
                out[n] = first + "."

    for line in doc.splitlines():
        m = re.match(r"^(\w+(?:\s*,\s*\w+)*)\s*:\s*\S", line)
        if m:
            close()
            name, body = [n.strip() for n in m.group(1).split(",")], []
        elif name is not None and line.startswith("    ") and line.strip():
            body.append(line.strip())
        elif name is not None and not line.strip() and body:
            close()
            name, body = None, []
    close()
    return out


def _wrap(text: str, width: int = 86) -> list[str]:
    import textwrap
    return textwrap.wrap(text, width) if text else []


def run_workflow(method: str, plan, cfg, *, cache=None, context=None) -> Path:
    """Run ``method`` on a prepared plan: in the current dask context, or in ``context``
    (e.g. :func:`spedflow.cluster.client_for`'s), entered once this run holds its stage
    cache, so that a second run on the same cache waits before it starts a cluster."""
    import contextlib
    cache = StageCache(cache if cache is not None else Path(str(plan.out) + ".cache"))
    if method == "vdf":
        from .vdf import run_vdf as run
    else:
        from .nmf import run_nmf as run
    from ..io import check_destination
    from ._common import note_rewrites
    with cache.in_use() as waited:
        if waited:  # the run waited for may have written this very result
            check_destination(plan.out, plan.overwrite, sources=[plan.store], replaces="result")
        with context if context is not None else contextlib.nullcontext():
            out = run(note_rewrites(plan, cache), cfg, cache)
    removed, freed = cache.prune_stale()
    if removed:
        log.info("stage cache: removed %d stages written by other spedflow code (%.1f MB)",
                 removed, freed / 2**20)
    return out
