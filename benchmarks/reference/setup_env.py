#!/usr/bin/env python
"""Create (or reuse) the virtual environment holding the reference implementation.

The reference implementation of Bergh et al. 2020 is pyxem (with hyperspy). It is
never a dependency of spedflow: it lives in its own virtual environment, by default
``benchmarks/work/venv-pyxem`` (``benchmarks/work/`` is gitignored).

Usage::

    python benchmarks/reference/setup_env.py [--venv DIR] [--pyxem VERSION]

Idempotent: an existing venv whose pins are already satisfied is reused; the script
prints the python path to use and the installed versions (also as JSON on the last
line, for the benchmark runner).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = HERE.parent / "work" / "venv-pyxem"

# pyxem 0.21 is the newest release on PyPI and still ships the segment utilities of
# the paper (pyxem.utils._deprecated / pyxem.utils.segment_utils, deprecated since 0.18).
PYXEM = "0.21.0"
# What run_reference.py itself imports on top of pyxem's own requirements. pyxem 0.21
# pins zarr<3, so the reference side reads and writes the Zarr v3 stores with the small
# numcodecs-based codec in _zarr3.py instead of the zarr package.
EXTRA = ["scikit-learn", "numcodecs", "crc32c"]   # crc32c: verify chunk checksums

PROBE = r"""
import json, importlib, sys, warnings
warnings.simplefilter("ignore")
out = {"python": sys.version.split()[0]}
for name in ("pyxem", "hyperspy", "numpy", "scipy", "skimage", "sklearn", "dask", "numcodecs", "crc32c", "numba"):
    try:
        out[name] = getattr(importlib.import_module(name), "__version__", "installed")
    except Exception as exc:  # noqa: BLE001 - report, do not fail the probe
        out[name] = f"unavailable ({type(exc).__name__}: {exc})"
print(json.dumps(out))
"""


def venv_python(root: Path) -> Path:
    """Path of the interpreter inside venv ``root``."""
    return root / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def probe(python: Path) -> dict:
    """Versions of the packages the reference run needs, as seen by ``python``."""
    res = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr else "probe failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="venv directory")
    ap.add_argument("--pyxem", default=PYXEM, help=f"pyxem version to pin (default {PYXEM})")
    ap.add_argument("--force", action="store_true", help="reinstall even if the pins are met")
    args = ap.parse_args(argv)

    root = args.venv.resolve()
    py = venv_python(root)
    if not py.exists():
        print(f"creating venv {root}", file=sys.stderr)
        venv.EnvBuilder(with_pip=True, clear=False).create(root)
    versions = probe(py)
    if args.force or versions.get("pyxem") != args.pyxem or any(
            str(versions.get(k, "unavailable")).startswith("unavailable")
            for k in ("hyperspy", "numcodecs", "crc32c", "sklearn", "skimage")) or "error" in versions:
        cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check",
               f"pyxem=={args.pyxem}", *EXTRA]
        print("+ " + " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=sys.stderr)  # stdout: JSON only
        versions = probe(py)
    if "error" in versions or str(versions.get("pyxem", "")).startswith("unavailable"):
        print(f"the reference environment is broken: {versions}", file=sys.stderr)
        return 1
    for k, v in versions.items():
        print(f"{k:10s} {v}", file=sys.stderr)
    print(f"python     {py}", file=sys.stderr)
    print(json.dumps({"python_path": str(py), **versions}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
