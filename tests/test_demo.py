"""``spedflow demo`` simulates again when asked for another data set than last time."""

from __future__ import annotations

import zarr

from spedflow.demo import run_demo


def _made(store):
    meta = zarr.open_group(str(store), mode="r").attrs["spedflow"]
    return meta["simulation"]["seed"], meta["created"]


def test_demo_follows_its_options_in_an_existing_folder(tmp_path, capsys):
    """A second demo in the same folder with another --seed simulates that seed (it used to
    reuse the old store silently); the same options again reuse the store."""
    kw = dict(scan=(24, 24), detector=32, progress=False)
    run_demo(tmp_path, seed=0, **kw)
    out = capsys.readouterr()
    assert out.out.count("recall") == 2 and out.err == ""  # the scores, also without progress
    seed0 = _made(tmp_path / "simulated.zarr")
    run_demo(tmp_path, seed=1, **kw)
    seed1 = _made(tmp_path / "simulated.zarr")
    assert seed0[0] == 0 and seed1[0] == 1 and seed1[1] != seed0[1]
    run_demo(tmp_path, seed=1, **kw)
    assert _made(tmp_path / "simulated.zarr") == seed1
    assert (tmp_path / "index.html").is_file()
    out = capsys.readouterr()
    assert out.out.count("VDF result ") == out.out.count("NMF result ") == 2  # tables headed
    # with progress on, the reuse is said
    run_demo(tmp_path, seed=1, scan=(24, 24), detector=32, progress=True)
    assert _made(tmp_path / "simulated.zarr") == seed1
    assert f"reusing {tmp_path / 'simulated.zarr'}, simulated before" in capsys.readouterr().err
