"""Both workflows on a real dask cluster: equality with the in-process run, a worker
killed mid-run, interrupt and resume, and a late-stage parameter change.

Every run here goes through the real command line (``python -m spedflow segment``)
in a child process, against a real ``dask scheduler`` and ``dask worker`` processes
on 127.0.0.1 (see ``cluster_utils``). The reference for every comparison is one
in-process run per workflow (``spedflow.segment(..., local=True)``) on the same store.

How exact the comparisons are, and why
--------------------------------------
* VDF workflow: bit-for-bit. Every pass is a per-pattern kernel on one chunk; the
  only cross-chunk reductions (peak-position histogram, beam statistics) are summed
  on the client from the block files in a fixed order, and everything after works on
  the gathered small arrays. Where a task runs cannot change a single bit.
* NMF workflow: within 1e-5 relative. The streamed SVD and NMF reduce over chunks
  with a fixed dask tree, so the order of additions is the same on any scheduler;
  only a BLAS library that splits one product differently with a different thread
  count (workers pin BLAS to one thread, the threaded scheduler may not) could
  change the last bits. In practice the results are identical.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

import spedflow
from cluster_utils import ProcessCluster, start_cli, start_worker, wait_exit
from conftest import SIM_STORE
from spedflow.simulate import simulate

pytestmark = pytest.mark.cluster

#: Workers as in production: one thread per process, an explicit memory limit.
WORKER_KW = dict(nthreads=1, memory_limit="1GB")

#: The NMF's accuracy knobs, lowered to keep the test fast: the comparison is
#: between schedulers for the same parameters, so a short, truncated
#: decomposition tests exactly the same machinery (the stage graph, the tree
#: reductions, the block-major row order) as a converged one.
NMF_SET = {"scree": {"n_components": 8, "n_power_iter": 0},
           "nmf": {"n_components": 5, "max_epochs": 5, "init": "random"}}

#: Result arrays compared between runs (those a workflow does not write are skipped).
COMPARED = ("segments/maps", "segments/patterns", "vectors", "peaks", "vdf/images",
            "vdf/labels", "vdf/segment_vectors", "nmf/factors", "nmf/loadings",
            "nmf/labels", "beam/centres", "beam/fitted")

TIMEOUT = 240.0  # seconds a child run may take before the test gives up on it


def _set_args(overrides: dict) -> list[str]:
    return [a for sec, vals in overrides.items() for k, v in vals.items()
            for a in ("--set", f"{sec}.{k}={v!r}" if isinstance(v, str) else f"{sec}.{k}={v}")]


# ----------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The ``sim_store`` data set, written with 12 x 12-pattern chunks (16 blocks).

    Enough blocks that two workers share every pass and a kill or an interrupt
    lands between blocks of one stage.
    """
    path = tmp_path_factory.mktemp("dist_sim") / "sim.zarr"
    return simulate(path, progress=False, chunks=(12, 12), **SIM_STORE)


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """In-process runs of both workflows: {method: result path} (cache beside it)."""
    root = tmp_path_factory.mktemp("dist_ref")
    out = {}
    for method, overrides in (("vdf", None), ("nmf", NMF_SET)):
        out[method] = spedflow.segment(store, method=method, out=root / f"{method}.zarr",
                                       overrides=overrides, local=True, progress=False)
    return out


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A real scheduler and 2 single-threaded workers with a memory limit."""
    with ProcessCluster(n_workers=2, workdir=tmp_path_factory.mktemp("dask"),
                        **WORKER_KW) as pc:
        yield pc


# ----------------------------------------------------------------------- helpers

def _assert_same_result(result, expected, *, rtol: float = 0.0) -> None:
    """Every compared array of two result stores equal (``rtol=0``: bitwise)."""
    a, b = zarr.open_group(str(result), mode="r"), zarr.open_group(str(expected), mode="r")
    compared = 0
    for name in COMPARED:
        if name not in b:
            continue
        assert name in a, f"{name} missing from {result}"
        x, y = a[name][...], b[name][...]
        assert x.shape == y.shape, f"{name}: shape {x.shape} != {y.shape}"
        if rtol == 0 or not np.issubdtype(y.dtype, np.floating):
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            scale = float(np.abs(y).max()) if y.size else 0.0
            np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale, err_msg=name)
        compared += 1
    assert compared >= 6
    ra, rb = a.attrs["spedflow"], b.attrs["spedflow"]
    assert ra["params"] == rb["params"]
    assert ra["counts"] == rb["counts"]


def _segment_args(store, method: str, out, *extra) -> list[str]:
    return ["segment", str(store), "--method", method, "--out", str(out), *map(str, extra)]


def _run_cli(args, log, timeout: float = TIMEOUT) -> str:
    """Run the CLI to completion; assert exit 0; return its output."""
    proc = start_cli(args, log)
    code = wait_exit(proc, timeout)
    text = proc.log()
    assert code == 0, f"exit {code}:\n{proc.log_tail(40)}"
    return text


def _wait_for(predicate, proc, what: str, timeout: float = TIMEOUT, poll: float = 0.005):
    """Poll ``predicate`` until true; fail if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if not proc.alive():
            pytest.fail(f"the run ended (exit {proc.proc.returncode}) before {what}:\n"
                        f"{proc.log_tail(40)}")
        time.sleep(poll)
    proc.stop(grace=1.0)
    pytest.fail(f"{what} did not happen within {timeout:g} s:\n{proc.log_tail(40)}")


def _stage_dirs(cache: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(Path(cache).iterdir()) if p.is_dir()}


def _one_stage(cache: Path, name: str) -> Path:
    dirs = [p for p in Path(cache).glob(f"{name}-*") if p.is_dir()]
    return dirs[0] if len(dirs) == 1 else None


def _worker_transitions(address: str) -> dict[str, int]:
    """Task state transitions each worker of the cluster has made so far."""
    from distributed import Client
    with Client(address, timeout=10, set_as_default=False) as client:
        return client.run(lambda dask_worker: dask_worker.state.transition_counter)


def _mtimes(paths) -> dict[Path, int]:
    return {Path(p): os.stat(p).st_mtime_ns for p in paths}


# ----------------------------------------------------------------------- 1. equality

@pytest.mark.parametrize("method", ["vdf", "nmf"])
def test_cli_on_cluster_equals_local_run(method, store, reference, dask_cluster, tmp_path):
    out = tmp_path / f"{method}.zarr"
    overrides = NMF_SET if method == "nmf" else {}
    before = _worker_transitions(dask_cluster.address)
    text = _run_cli(_segment_args(store, method, out, "--scheduler", dask_cluster.address,
                                  *_set_args(overrides)), tmp_path / "cli.log")
    assert f"dask scheduler {dask_cluster.address}" in text  # it really used the cluster
    assert not (tmp_path / f"{method}.zarr.partial").exists()
    # VDF: bitwise; NMF: 1e-5 relative (see the module docstring)
    _assert_same_result(out, reference[method], rtol=0.0 if method == "vdf" else 1e-5)
    # the work ran on both workers, not in the client process
    after = _worker_transitions(dask_cluster.address)
    assert len(before) == 2 and after.keys() == before.keys()
    assert all(after[w] > before[w] for w in before), (before, after)


# ----------------------------------------------------------------------- 2. a worker dies

def test_worker_killed_mid_run_recovers(store, reference, dask_cluster, tmp_path):
    """SIGKILL a worker while the peak pass runs; a replacement joins; result unchanged."""
    pc = dask_cluster
    out = tmp_path / "vdf.zarr"
    cache = Path(str(out) + ".cache")
    run = start_cli(_segment_args(store, "vdf", out, "--scheduler", pc.address, "-v"),
                    tmp_path / "cli.log")
    try:
        def peak_blocks():
            return list(cache.glob("beam_peaks-*/blocks/*.npz"))
        _wait_for(peak_blocks, run, "the first peak block was written")
        victim = pc.workers.pop(0)
        os.kill(victim.pid, signal.SIGKILL)
        done_at_kill = len(peak_blocks())
        peaks_complete_at_kill = any(cache.glob("beam_peaks-*/COMPLETE"))
        assert victim.proc.wait(timeout=10) == -signal.SIGKILL
        victim.stop(grace=1.0)
        assert run.alive(), "the run ended before the kill"
        # a replacement joins the running computation (the module's cluster is whole again)
        pc.workers.append(start_worker(pc.address, pc.workdir, name=f"worker-{time.time_ns()}",
                                       **WORKER_KW))
        code = wait_exit(run, TIMEOUT)
    finally:
        run.stop(grace=1.0)
    assert code == 0, f"exit {code}:\n{run.log_tail(40)}"
    # the kill landed inside the peak pass, with blocks still to do
    assert not peaks_complete_at_kill and 1 <= done_at_kill < 16, done_at_kill
    assert "Remove worker" in pc.scheduler.log()  # the scheduler noticed the loss
    assert len(_worker_transitions(pc.address)) == 2  # survivor + replacement
    assert len(list(cache.glob("beam_peaks-*/blocks/*.npz"))) == 16
    _assert_same_result(out, reference["vdf"])


# ----------------------------------------------------------------------- 3. interrupt/resume

def test_interrupted_local_run_resumes(store, reference, tmp_path):
    out = tmp_path / "vdf.zarr"
    cache = Path(str(out) + ".cache")
    args = _segment_args(store, "vdf", out, "--no-cluster", "-v")
    run = start_cli(args, tmp_path / "first.log")
    try:
        _wait_for(lambda: any(cache.glob("beam_peaks-*/blocks/*.npz")), run,
                  "a block of pass 1 (beam centres and peaks) was written")
        run.proc.send_signal(signal.SIGINT)  # Ctrl-C
        code = wait_exit(run, 60.0)
    finally:
        run.stop(grace=1.0)
    assert code == 130, f"exit {code}:\n{run.log_tail(40)}"
    assert "interrupted" in run.log()
    # (b) nothing that looks like a result, and at most a partial one
    assert not out.exists()
    assert set(p.name for p in tmp_path.iterdir()) <= {"vdf.zarr.cache", "vdf.zarr.partial",
                                                       "first.log"}
    radius, scan = _one_stage(cache, "radius"), _one_stage(cache, "beam_peaks")
    assert radius is not None and scan is not None
    assert not (scan / "COMPLETE").exists(), "interrupted too late: pass 1 had finished"
    blocks = sorted((scan / "blocks").glob("*.npz"))
    assert 1 <= len(blocks) < 16
    before = _mtimes([radius / "COMPLETE", *blocks])
    # a block the interrupt cut short mid-write (the command does not wait for its threads)
    torn = scan / "blocks" / "3_3.npz.tmp4242"
    torn.write_bytes(b"half a block")

    text = _run_cli(args, tmp_path / "second.log")
    # (a) the measured radius and the finished blocks were reused, not recomputed
    assert _mtimes(before) == before
    m = re.search(r"beam centres and peaks: reusing (\d+) of 16 finished blocks", text)
    assert m and int(m.group(1)) >= len(blocks), text[-2000:]
    assert _one_stage(cache, "radius") == radius and _one_stage(cache, "beam_peaks") == scan
    assert len(list((scan / "blocks").glob("*.npz"))) == 16
    assert not torn.exists()
    # (c) the resumed result equals a clean run's, bit for bit
    assert not Path(str(out) + ".partial").exists()
    _assert_same_result(out, reference["vdf"])


# ----------------------------------------------------------------------- 4. late parameter

def test_late_parameter_change_reuses_earlier_stages(store, reference, tmp_path):
    """``--set watershed.min_size=12`` reruns only watershed and merge: one new
    watershed stage (the labels of the new parameter), nothing earlier rewritten."""
    from spedflow.segment import WatershedParams, watershed_stack

    ref = Path(reference["vdf"])
    cache = tmp_path / "cache"
    shutil.copytree(str(ref) + ".cache", cache)  # a private copy of the finished stages
    stages = _stage_dirs(cache)
    assert {n.split("-")[0] for n in stages} == {"pixels", "radius", "counts", "noise_factors",
                                                "beam_peaks", "peaks", "vdf", "watershed"}
    before = _mtimes(p for d in stages.values() for p in d.rglob("*"))

    out = tmp_path / "vdf.zarr"
    text = _run_cli(_segment_args(store, "vdf", out, "--no-cluster", "-v", "--cache", cache,
                                  "--set", "watershed.min_size=12"), tmp_path / "cli.log")
    # one watershed stage was added, nothing in the existing ones was rewritten
    added = set(_stage_dirs(cache)) - set(stages)
    assert len(added) == 1 and added.pop().startswith("watershed-")
    assert set(stages) <= set(_stage_dirs(cache))
    assert _mtimes(before) == before
    for name in ("beam_peaks", "vdf"):
        assert f"stage {name} ..." not in text
    assert "stage watershed ..." in text and "stage merge ..." in text

    new, old = zarr.open_group(str(out), mode="r"), zarr.open_group(str(ref), mode="r")
    assert new.attrs["spedflow"]["params"]["watershed"]["min_size"] == 12
    # everything before the watershed is the same ...
    for name in ("vectors", "peaks", "vdf/images", "beam/centres", "beam/fitted"):
        np.testing.assert_array_equal(new[name][...], old[name][...], err_msg=name)
    # ... and the watershed labels are those of the new parameter on the same images
    images = old["vdf/images"][...]
    expected = watershed_stack(da.from_array(images, chunks=(1, *images.shape[1:])),
                               WatershedParams(min_size=12)).compute(scheduler="synchronous")
    np.testing.assert_array_equal(new["vdf/labels"][...], expected)
    counts = new.attrs["spedflow"]["counts"]
    assert counts["vdf_segments"] == sum(len(np.unique(lab[lab > 0])) for lab in expected)
