"""What a spedflow store holds: shape, chunking, compression, calibration, provenance."""

from __future__ import annotations

import math
import os
from typing import Any

import zarr

from ..errors import InputError
from ._store import DATA, _open_group, _walk_arrays

__all__ = ["store_info", "format_info"]


def store_info(path: str | os.PathLike) -> dict[str, Any]:
    """Describe a spedflow input or result store without reading its chunks.

    Parameters
    ----------
    path : str or path-like
        A Zarr v3 store written by ``ingest``, ``simulate`` or ``segment``.

    Returns
    -------
    dict
        ``path``, ``kind``, ``version``, ``complete``, ``source``, ``format``,
        ``scan_step`` / ``reciprocal_scale`` ({value, units}), ``truth`` (bool: a
        ``truth`` group with ``masks`` is present) and ``arrays``: a list of
        ``{name, shape, dtype, chunks, shards, n_chunks, nbytes, stored_bytes,
        ratio}`` (``ratio`` = uncompressed / stored bytes; ``n_chunks`` counts
        inner chunks). For an input store the ``data`` entry is also under ``data``.

    Raises
    ------
    InputError
        ``path`` is missing or not a Zarr store.
    """
    group = _open_group(path)
    meta = dict(group.attrs.get("spedflow", {}))
    arrays = []
    for name, arr in _walk_arrays(group):
        stored = arr.nbytes_stored()
        arrays.append({
            "name": name, "shape": list(arr.shape), "dtype": str(arr.dtype),
            "chunks": list(arr.chunks), "shards": list(arr.shards) if arr.shards else None,
            "n_chunks": math.prod(math.ceil(s / c) for s, c in zip(arr.shape, arr.chunks)),
            "nbytes": int(arr.nbytes), "stored_bytes": int(stored),
            "ratio": arr.nbytes / stored if stored else None,
        })
    info: dict[str, Any] = {
        "path": str(path), "kind": meta.get("kind"), "version": meta.get("version"),
        "complete": meta.get("complete"), "source": meta.get("source"), "format": meta.get("format"),
        "original_shape": meta.get("original_shape"), "original_dtype": meta.get("original_dtype"),
        "scan_step": meta.get("scan_step"), "reciprocal_scale": meta.get("reciprocal_scale"),
        "truth": "truth" in group and isinstance(group["truth"], zarr.Group) and "masks" in group["truth"],
        "arrays": arrays,
    }
    if meta.get("kind") == "result":  # what the run found, and why (from its attributes)
        info["result"] = {k: meta.get(k) for k in ("method", "counts", "n_components_reason",
                                                    "components_set_aside", "residual_components",
                                                    "timings")}
    data = next((a for a in arrays if a["name"] == DATA), None)
    if data is not None:
        info["data"] = data
    elif meta.get("kind") == "input":
        raise InputError(f"input store {str(path)!r} has no {DATA!r} array")
    return info


def format_info(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`store_info`'s dict, one fact per line."""
    lines = [f"store      {info['path']}",
             f"kind       {info.get('kind') or 'unknown (not written by spedflow)'}"
             + (f", spedflow {info['version']}" if info.get("version") else "")
             + ("" if info.get("complete") in (None, True) else "  ** INCOMPLETE **")]
    if info.get("source"):
        lines.append(f"source     {info['source']}" + (f" ({info['format']})" if info.get("format") else ""))
    if info.get("original_shape"):
        lines.append(f"original   {tuple(info['original_shape'])} {info.get('original_dtype', '')}")
    for key, label in (("scan_step", "scan step "), ("reciprocal_scale", "recip. px ")):
        cal = info.get(key)
        if isinstance(cal, dict):
            text = "uncalibrated" if cal.get("value") is None else f"{cal['value']:.6g} {cal.get('units') or ''}"
            lines.append(f"{label} {text}")
    if info.get("kind") == "input":
        lines.append(f"truth      {'yes' if info.get('truth') else 'no'}")
    lines += _result_lines(info.get("result"))
    for a in info.get("arrays", []):
        ratio = f"{a['ratio']:.2f}x" if a["ratio"] else "n/a (nothing stored)"
        shard = f", shards {tuple(a['shards'])}" if a["shards"] else ""
        lines.append(f"{a['name']:<10} {tuple(a['shape'])} {a['dtype']}, chunks {tuple(a['chunks'])}{shard}, "
                     f"{a['n_chunks']} chunks, {_size(a['nbytes'])} -> {_size(a['stored_bytes'])} "
                     f"stored ({ratio})")
    return "\n".join(lines)


def _result_lines(res: dict | None) -> list[str]:
    """What a result found: segments, the NMF rank and why, components set aside, and
    the time of the stages this run computed. Attributes of another form (a store
    written by hand or by another version) are left out, not an error: ``info`` must
    describe any store."""
    if not isinstance(res, dict):
        return []
    c = res.get("counts") if isinstance(res.get("counts"), dict) else {}
    if res.get("method") == "vdf":
        found = f"{c.get('vectors', '?')} vectors, {c.get('peaks', '?')} peaks"
    else:
        extra = res.get("residual_components")
        extra = (f" + {len(extra)} from the residual search"
                 if isinstance(extra, list) and extra else "")
        found = (f"{c.get('components', '?')} components{extra}, {c.get('kept', '?')} kept, "
                 f"merged into {c.get('merged', '?')}, each map cut into its crystals")
    lines = [f"method     {res.get('method')}: {c.get('segments', '?')} segments "
             f"in {c.get('patterns', '?')} patterns ({found})"]
    if isinstance(res.get("n_components_reason"), str):
        lines.append(f"rank       {res['n_components_reason']}")
    aside = res.get("components_set_aside")
    aside = [d for d in aside if isinstance(d, dict)] if isinstance(aside, list) else []
    for i, item in enumerate(aside):
        lines.append(f"{'set aside' if i == 0 else '':<10} component {item.get('component')}: "
                     f"{item.get('reason')}")
    t = res.get("timings")
    t = {k: v for k, v in t.items() if isinstance(v, (int, float))} if isinstance(t, dict) else {}
    if t:  # a rerun from the stage cache times only what it computed again
        lines.append(f"computed   {sum(t.values()):.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in t.items())
                     + ")")
    return lines


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
