"""Writing a result or a store never deletes what it should not: not the input, not a
folder or file that is not a spedflow store of the kind being written; and a store
written again at the same path never reuses the old data's cached stages."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import spedflow
from spedflow.errors import ParameterError, StoreExistsError
from spedflow.simulate import simulate
from spedflow.workflows._common import prepare_run, store_identity


def _digest(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())


@pytest.fixture()
def project(tmp_path, sim_store):
    """A project folder holding a copy of the input store and a notes file."""
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copytree(sim_store, proj / "in.zarr")
    (proj / "notes.txt").write_text("beam time 2026-12-05")
    return proj


@pytest.mark.parametrize("out", ["in.zarr", ".", "in.zarr/res.zarr"])
def test_result_never_replaces_or_lands_in_the_input(project, out):
    """The result is refused where it would be, contain or lie inside the input, even with
    --overwrite; nothing is touched."""
    before = _digest(project)
    with pytest.raises(ParameterError, match="must not be"):
        prepare_run(project / "in.zarr", project / out, overwrite=True)
    assert _digest(project) == before


@pytest.mark.parametrize("kind", ["folder", "file", "input store"])
def test_overwrite_replaces_only_a_result(tmp_path, sim_store, kind):
    """--overwrite replaces an earlier result, but not a folder, a file or another input
    store found at the destination."""
    dest = tmp_path / "out.zarr"
    if kind == "folder":
        dest.mkdir()
        (dest / "precious.txt").write_text("keep me")
    elif kind == "file":
        dest.write_bytes(b"raw scan")
    else:
        simulate(dest, scan=(8, 8), detector=16, crystals=1, progress=False)
    before = _digest(tmp_path) if dest.is_dir() else dest.read_bytes()
    with pytest.raises(StoreExistsError, match="not a spedflow result store"):
        prepare_run(sim_store, dest, overwrite=True)
    assert (_digest(tmp_path) if dest.is_dir() else dest.read_bytes()) == before


def test_overwrite_replaces_an_earlier_result(tmp_path, sim_store):
    out = tmp_path / "r.zarr"
    spedflow.segment(sim_store, method="vdf", out=out, local=True, progress=False)
    prepare_run(sim_store, out, overwrite=True)  # allowed: an earlier result


def test_simulate_overwrites_only_an_input_store(tmp_path):
    dest = tmp_path / "sim.zarr"
    dest.mkdir()
    (dest / "precious.txt").write_text("keep me")
    with pytest.raises(StoreExistsError, match="not a spedflow input store"):
        simulate(dest, scan=(8, 8), detector=16, crystals=1, progress=False, overwrite=True)
    assert (dest / "precious.txt").read_text() == "keep me"


def test_a_store_written_again_does_not_reuse_the_old_stages(tmp_path):
    """Simulated again at the same path with another seed (same shape and chunks), the
    store gets a new identity, and a run with the same cache gives what a fresh run on
    the new data gives, not the old data's segments."""
    store = tmp_path / "s.zarr"
    kw = dict(scan=(32, 32), detector=48, crystals=4, progress=False)
    simulate(store, seed=3, **kw)
    first = store_identity(store, *spedflow.io.open_input(store))
    out = tmp_path / "r.zarr"
    spedflow.segment(store, method="vdf", out=out, local=True, progress=False)
    simulate(store, seed=77, overwrite=True, **kw)
    assert store_identity(store, *spedflow.io.open_input(store)) != first
    spedflow.segment(store, method="vdf", out=out, local=True, progress=False, overwrite=True)
    fresh = tmp_path / "fresh.zarr"
    spedflow.segment(store, method="vdf", out=fresh, local=True, progress=False)
    got = zarr.open_group(str(out), mode="r")["segments/maps"][...]
    want = zarr.open_group(str(fresh), mode="r")["segments/maps"][...]
    np.testing.assert_array_equal(got, want)


def test_data_rewritten_in_place_does_not_reuse_the_old_stages(tmp_path, caplog):
    """Chunks written into the store's existing array (data cleaned in place) change
    neither its shape nor its metadata: a rerun into the same result used to return the
    old data's crystals from the cache in a second. It now computes the stages again,
    says so, gives what a fresh run gives, and reuses them on the next run."""
    import logging
    store = tmp_path / "s.zarr"
    simulate(store, seed=3, scan=(32, 32), detector=48, crystals=4, progress=False)
    out = tmp_path / "r.zarr"
    first = spedflow.segment(store, method="vdf", out=out, local=True, progress=False)
    assert zarr.open_group(str(first), mode="r")["segments/maps"].shape[0] > 0
    other = tmp_path / "o.zarr"
    simulate(other, seed=77, scan=(32, 32), detector=48, crystals=4, progress=False)
    data = zarr.open_group(str(store), mode="r+")["data"]
    data[:] = zarr.open_group(str(other), mode="r")["data"][:]  # the same array, new contents
    with caplog.at_level(logging.WARNING, logger="spedflow"):
        spedflow.segment(store, method="vdf", out=out, local=True, progress=False, overwrite=True)
    assert any("chunk files" in r.message and "computed again" in r.message for r in caplog.records)
    fresh = spedflow.segment(store, method="vdf", out=tmp_path / "fresh.zarr", local=True, progress=False)
    got = zarr.open_group(str(out), mode="r")["segments/maps"][...]
    want = zarr.open_group(str(fresh), mode="r")["segments/maps"][...]
    np.testing.assert_array_equal(got, want)
    # unchanged since: the stages are reused, without the warning
    caplog.clear()
    stages = sorted(p.name for p in Path(str(out) + ".cache").iterdir())
    with caplog.at_level(logging.WARNING, logger="spedflow"):
        spedflow.segment(store, method="vdf", out=out, local=True, progress=False, overwrite=True)
    assert not any("chunk files" in r.message for r in caplog.records)
    assert sorted(p.name for p in Path(str(out) + ".cache").iterdir()) == stages
    # a record of the chunk files that cannot be read: computed again, not the old stages
    book = next(Path(str(out) + ".cache").glob("data_files-*.json"))
    book.write_text("{not json")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spedflow"):
        spedflow.segment(store, method="vdf", out=out, local=True, progress=False, overwrite=True)
    assert any("unreadable" in r.message for r in caplog.records)
    assert len(list(Path(str(out) + ".cache").iterdir())) > len(stages)


@pytest.mark.parametrize("cache", ["in.zarr", "in.zarr/c", "r.zarr", "r.zarr/c", "notes.txt"])
def test_stage_cache_never_lands_in_a_store(project, cache):
    """--cache is refused where its stage folders would land in the input or the result
    (`spedflow info` then warned about unknown objects in the input), or on a file."""
    from spedflow.errors import InputError
    before = _digest(project)
    with pytest.raises((ParameterError, InputError), match="stage cache"):
        spedflow.segment(project / "in.zarr", out=project / "r.zarr", cache=project / cache,
                         local=True, progress=False)
    assert _digest(project) == before


def test_report_and_export_folders_never_land_in_a_store(tmp_path, project):
    """The report and export folders are checked like the cache; the CLI checks
    --report before it runs the workflow, not after."""
    import subprocess
    import sys
    from spedflow.export import export_result
    from spedflow.report import write_report
    from test_report import make_fake_result
    res = make_fake_result(tmp_path / "r.zarr", "vdf", input_path=project / "in.zarr")
    other = shutil.copytree(project / "in.zarr", tmp_path / "other.zarr")
    before, before_res = _digest(project), _digest(res)
    for bad in [project / "in.zarr", project / "in.zarr" / "rep", res, res / "rep"]:
        with pytest.raises(ParameterError, match="must not be|a spedflow input store"):
            write_report(res, bad)
        with pytest.raises(ParameterError, match="must not be|a spedflow input store"):
            export_result(res, bad, formats=("npy",))
    for write in (lambda d: write_report(res, d), lambda d: export_result(res, d, formats=("npy",))):
        with pytest.raises(ParameterError, match="spedflow input store"):
            write(other)
    assert _digest(project) == before and _digest(res) == before_res
    # a folder that holds the stores is fine: what is written there has its own names
    export_result(res, tmp_path, formats=("npy",))
    assert (tmp_path / "segment_maps.npy").is_file() and _digest(res) == before_res
    out = tmp_path / "cli.zarr"
    r = subprocess.run([sys.executable, "-m", "spedflow", "segment", str(project / "in.zarr"),
                        "--out", str(out), "--report", str(project / "notes.txt"), "-q",
                        "--no-cluster"], capture_output=True, text=True)
    assert r.returncode == 2 and "not a directory" in r.stderr, r.stderr
    assert not out.exists()  # refused before the run
