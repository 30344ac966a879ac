"""Export a result's segment maps and patterns to files other programs read.

- ``npy``: plain NumPy stacks (no pickling needed to read them back);
- ``tiff``: float32 ImageJ hyperstacks (one slice per segment) with the pixel size;
- ``hspy``: HyperSpy signals via rosettasciio, navigation axis ``segment``; the patterns
  carry ``signal_type = "electron_diffraction"`` so pyxem loads them as
  ``ElectronDiffraction2D``, with reciprocal axes centred on the direct beam.

matplotlib is not imported here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError, ParameterError
from .io import check_side_directory
from .report._load import Calibration, input_store_path, load_result

__all__ = ["export_result", "FORMATS"]

FORMATS = ("npy", "tiff", "hspy")


def _check_formats(formats) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    try:
        fmts = tuple(str(f).lower().lstrip(".") for f in formats)
    except TypeError:
        raise ParameterError(f"`formats` must be a sequence of {FORMATS} (got {formats!r})") from None
    fmts = tuple("tiff" if f == "tif" else f for f in fmts)
    bad = [f for f in fmts if f not in FORMATS]
    if bad:
        raise ParameterError(f"`formats` must be drawn from {FORMATS} (got {bad[0]!r})")
    if not fmts:
        raise ParameterError(f"`formats` must name at least one of {FORMATS} (got none)")
    return tuple(dict.fromkeys(fmts))


def _axes(kind: str, shape, cal: Calibration) -> list[dict]:
    """HyperSpy axes dicts: ``segment`` navigates; the two image axes are the signal."""
    s, ny, nx = shape
    axes = [{"name": "segment", "size": int(s), "scale": 1.0, "offset": 0.0, "units": "",
             "navigate": True}]
    if kind == "patterns":
        k = cal.k_scale or 1.0
        units = cal.k_units if cal.k_scale else "px"
        for name, n in (("ky", ny), ("kx", nx)):
            axes.append({"name": name, "size": int(n), "scale": float(k),
                         "offset": float(-(n // 2) * k), "units": units, "navigate": False})
    else:
        step = cal.scan_step or 1.0
        units = cal.scan_units if cal.scan_step else "px"
        for name, n in (("y", ny), ("x", nx)):
            axes.append({"name": name, "size": int(n), "scale": float(step), "offset": 0.0,
                         "units": units, "navigate": False})
    return axes


def _hdf5_safe(d):
    """A metadata tree h5py can store: dicts kept, everything else as a scalar or JSON text."""
    if isinstance(d, dict):
        return {str(k): _hdf5_safe(v) for k, v in d.items()}
    if isinstance(d, (bool, int, float, str)):
        return d
    return json.dumps(d, default=str)


def _write_hspy(path: Path, data: np.ndarray, kind: str, cal: Calibration, meta: dict):
    from rsciio.hspy import file_writer
    title = f"spedflow segment {kind}"
    signal = {
        "data": data,
        "axes": _axes(kind, data.shape, cal),
        "metadata": {
            "General": {"title": title, "original_filename": str(meta.get("_result_name", ""))},
            "Signal": {"signal_type": "electron_diffraction" if kind == "patterns" else ""},
        },
        "original_metadata": {"spedflow": _hdf5_safe({k: v for k, v in meta.items()
                                                      if not k.startswith("_")})},
        "tmp_parameters": {}, "attributes": {"_lazy": False}, "package_info": {},
        "learning_results": {}, "models": {},
    }
    file_writer(str(path), signal, show_progressbar=False)


def _write_tiff(path: Path, data: np.ndarray, kind: str, cal: Calibration):
    import tifffile
    if kind == "patterns":
        scale, units = cal.k_scale, cal.k_units
    else:
        scale, units = cal.scan_step, cal.scan_units
    md = {"axes": "ZYX", "Labels": [f"S{i}" for i in range(data.shape[0])]}
    kwargs = {}
    if scale:
        # ImageJ's description is ASCII: Å -> A, µ -> u (ImageJ reads "um" as micrometre)
        md["unit"] = units.replace("Å", "A").replace("µ", "u").replace("μ", "u").encode(
            "ascii", "replace").decode()
        kwargs["resolution"] = (1.0 / scale, 1.0 / scale)
    tifffile.imwrite(path, data, imagej=True, metadata=md, **kwargs)


#: File extension of each format.
_EXT = {"npy": "npy", "tiff": "tif", "hspy": "hspy"}


def export_result(result_path, out_dir, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write the segment maps and patterns of a result in the requested formats.

    Parameters
    ----------
    result_path : str or Path
        Result store (Zarr v3, attrs ``spedflow.kind == "result"``).
    out_dir : str or Path
        Destination directory, created if needed; earlier exports there are replaced.
    formats : sequence of {"npy", "tiff", "hspy"}
        Which files to write.

    Returns
    -------
    list of Path
        Files written: ``segment_maps.<ext>`` (S, Y', X') float32 in binned scan pixels and
        ``segment_patterns.<ext>`` (S, Ky, Kx) float32 with the beam at (Ky//2, Kx//2).

    Raises
    ------
    ParameterError
        Unknown format.
    InputError
        Not a result store, no segments in it, or ``out_dir`` is a file.
    """
    fmts = _check_formats(formats)
    out = Path(out_dir)
    v = load_result(result_path, segments_only=True)
    check_side_directory(out, what="`out_dir`",
                         sources=[result_path, input_store_path(v.meta, result_path)])
    # the report draws what it can of a damaged result; an export of half of one would
    # pass for the whole (or sit next to an earlier export's other half)
    damaged = v.notes.damaged  # (only segments/* were read)
    if damaged:
        raise InputError(f"result {str(result_path)!r}: {damaged[0]}; nothing exported "
                         f"(`spedflow info --verify` names damaged chunks)")
    stacks = {"maps": v.maps, "patterns": v.patterns}
    if all(a is None for a in stacks.values()):
        raise InputError(f"result {str(result_path)!r} has no segments/maps or segments/patterns to export")
    if any(a is not None and a.shape[0] == 0 for a in stacks.values()):
        raise InputError(f"result {str(result_path)!r} holds no segments (the run found no "
                         "crystals); nothing exported")
    out.mkdir(parents=True, exist_ok=True)
    meta = {**v.meta, "_result_name": Path(str(result_path)).name}
    written: list[Path] = []
    for kind, arr in stacks.items():
        if arr is None:  # an earlier export's files of a kind this result lacks would pass as its
            for fmt in fmts:
                (out / f"segment_{kind}.{_EXT[fmt]}").unlink(missing_ok=True)
            continue
        data = np.ascontiguousarray(arr, dtype=np.float32)
        stem = out / f"segment_{kind}"
        if "npy" in fmts:
            p = stem.with_suffix(".npy")
            np.save(p, data, allow_pickle=False)
            written.append(p)
        if "tiff" in fmts:
            p = stem.with_suffix(".tif")
            _write_tiff(p, data, kind, v.calibration)
            written.append(p)
        if "hspy" in fmts:
            p = stem.with_suffix(".hspy")
            _write_hspy(p, data, kind, v.calibration, meta)
            written.append(p)
    return written
