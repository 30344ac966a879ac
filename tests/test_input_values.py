"""What values a store may hold: read-out noise below zero is data, values far below
zero are not (refused before anything is computed)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from spedflow.errors import InputError
from spedflow.io import create_array


def _store_with(src, dest, data):
    """A copy of the simulated store ``src`` (its truth) holding ``data`` instead."""
    import shutil
    shutil.copytree(src, dest)
    g = zarr.open_group(str(dest), mode="r+")
    chunks = g["data"].chunks
    del g["data"]
    create_array(g, "data", data.shape, data.dtype, chunks=chunks)[...] = data
    return dest


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from spedflow.simulate import simulate
    d = tmp_path_factory.mktemp("values")
    counts = simulate(d / "counts.zarr", scan=(32, 32), detector=64, crystals=5, seed=6,
                      progress=False)
    raw = zarr.open_group(str(counts), mode="r")["data"][:]
    rng = np.random.default_rng(1)
    # a CCD: 7.3 data units per count, its dark level subtracted, read-out noise of 4
    # units: about half the dark pixels read below zero
    ccd = (raw * 7.3 + rng.normal(0, 4.0, raw.shape)).astype(np.float32)
    return {"counts": counts, "ccd": _store_with(counts, d / "ccd.zarr", ccd),
            "inverted": _store_with(counts, d / "inverted.zarr", -raw.astype(np.float32)),
            "dir": d}


@pytest.mark.parametrize("method", ["vdf", "nmf"])
def test_dark_subtracted_camera_is_accepted(stores, method):
    """Read-out noise below zero is accepted, and the crystals found are those of the
    same scan recorded in counts."""
    from spedflow.api import segment
    from spedflow.evaluate import evaluate
    ccd = zarr.open_group(str(stores["ccd"]), mode="r")["data"][:]
    assert (ccd < 0).mean() > 0.2
    d = stores["dir"]
    a = evaluate(segment(stores["ccd"], method=method, out=d / f"ccd.{method}.zarr", local=True,
                         progress=False), stores["ccd"])
    b = evaluate(segment(stores["counts"], method=method, out=d / f"counts.{method}.zarr",
                         local=True, progress=False), stores["counts"])
    assert a["recall"] >= b["recall"] - 0.2 and a["precision"] >= b["precision"] - 0.2
    assert a["recall"] >= 0.6


def test_values_far_below_zero_are_refused(stores):
    from spedflow.api import segment
    with pytest.raises(InputError, match="not intensities or read-out noise"):
        segment(stores["inverted"], method="vdf", out=stores["dir"] / "x.zarr", local=True,
                progress=False)
    assert not (stores["dir"] / "x.zarr").exists()
