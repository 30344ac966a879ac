"""spedflow.cluster: where computations run, and the progress display."""

from __future__ import annotations

import io
import os
import re
import time

import dask
import dask.array as da
import numpy as np
import psutil
import pytest
from dask.utils import parse_bytes

from cluster_utils import ProcessCluster, free_port
from spedflow import cluster
from spedflow.cluster import (client_for, compute, local_scheduler, parse_memory_limit,
                              persist_with_progress, resolve_address, scheduler_workers,
                              set_progress)
from spedflow.errors import InputError, ParameterError

BAR = r"{label}: \[#+\s*\] 100% \d+ {unit}/s in \d+s"


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    """A real `dask scheduler` + 2 `dask worker` processes on 127.0.0.1."""
    with ProcessCluster(n_workers=2, workdir=tmp_path_factory.mktemp("dask")) as pc:
        yield pc


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(cluster.ENV_SCHEDULER, raising=False)
    set_progress(True)
    with dask.config.set({"scheduler-address": None}):
        yield
    set_progress(True)


def _listening(pids):
    """(ip, port) of every listening TCP socket of the given processes."""
    out = []
    for pid in pids:
        proc = psutil.Process(pid)
        conns = getattr(proc, "net_connections", proc.connections)(kind="inet")
        out += [c.laddr for c in conns if c.status == psutil.CONN_LISTEN]
    return out


# ------------------------------------------------------------------ local cluster

def _allocator_env():
    return tuple(os.environ.get(k) for k in
                 ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS"))


def test_large_local_workers_get_the_allocator_settings():
    with client_for(n_workers=1, memory_limit="3GB", quiet=True) as client:
        assert set(client.run(_allocator_env).values()) == {
            (str(16 * 2**20), str(64 * 2**20), "1")}


def test_worker_environ_keeps_a_users_allocator_settings():
    from spedflow.cluster import WORKER_MALLOC_ENV, worker_environ
    env = worker_environ()
    assert env["OMP_NUM_THREADS"] == 1 and env["MALLOC_MMAP_THRESHOLD_"] == 16 * 2**20
    assert env["MALLOC_TRIM_THRESHOLD_"] == WORKER_MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]
    mine = {"MALLOC_TRIM_THRESHOLD_": 0, "OMP_NUM_THREADS": 1}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": mine}):
        assert worker_environ() == mine



def test_local_cluster_listens_on_loopback_only(capsys):
    with client_for(n_workers=2, memory_limit="600MB") as client:
        local = client.cluster
        assert local.scheduler_address.startswith("tcp://127.0.0.1:")
        # asked of the scheduler itself: Client.scheduler_info() returns its cached copy,
        # which lists no workers, when the query fails (seen once under a full xdist run)
        workers = scheduler_workers(client)
        assert len(workers) == 2
        for addr, info in workers.items():
            assert addr.startswith("tcp://127.0.0.1:")
            assert info["nanny"].startswith("tcp://127.0.0.1:")
            assert info["nthreads"] == 1
            assert info["memory_limit"] == parse_bytes("600MB")
        # Every socket any process of the cluster listens on (scheduler, dashboard/
        # HTTP server and nannies in this process, the worker processes) is loopback.
        me = psutil.Process()
        pids = [me.pid] + [c.pid for c in me.children(recursive=True)]
        addrs = _listening(pids)
        dash_port = int(client.dashboard_link.split(":")[2].split("/")[0])
        assert dash_port in {a.port for a in addrs}
        assert addrs and all(a.ip == "127.0.0.1" for a in addrs), addrs
        x = da.arange(10_000, chunks=999)
        assert x.sum().compute() == np.arange(10_000).sum()
        # 600 MB workers keep distributed's allocator setting (a kept heap would count
        # towards their tight limit) and its thread pins
        assert set(client.run(_allocator_env).values()) == {(None, "65536", "1")}
    err = capsys.readouterr().err
    assert re.search(r"dask scheduler tcp://127\.0\.0\.1:\d+, dashboard http://127\.0\.0\.1:"
                     r"\d+/status.*2 workers x 1 thread", err)


def test_dashboard_port_taken_after_the_check_moves_without_a_warning(monkeypatch, recwarn):
    """Another process may bind the dashboard port between our check and the scheduler's
    bind (two runs started at once). The dashboard moves to a free port, and the user
    sees the one line naming it, not distributed's three-line warning."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(cluster, "_dashboard_address", lambda: f"127.0.0.1:{port}")
        with client_for(n_workers=1, memory_limit="600MB", quiet=True) as client:
            moved = int(client.dashboard_link.split(":")[2].split("/")[0])
    assert moved != port
    assert not [w for w in recwarn if "already in use" in str(w.message)]


def test_defaults_from_machine():
    mem = 64 * 2**30
    assert cluster.default_n_workers(memory=mem, cores=8) == 8
    # memory-bound: 80 % of 2 GiB allows one 1-GiB worker, never zero
    assert cluster.default_n_workers(memory=2 * 2**30, cores=8) == 1
    assert cluster.default_n_workers(memory=2**20, cores=8) == 1
    total = cluster._physical_memory()
    assert parse_memory_limit(None, 4) == int(0.8 * total / 4)
    assert parse_memory_limit("auto", 2) == int(0.8 * total / 2)
    assert parse_memory_limit("2GB", 1) == 2_000_000_000
    assert parse_memory_limit("1.5 GiB", 1) == int(1.5 * 2**30)
    assert parse_memory_limit(2**30, 1) == 2**30


def test_memory_limit_over_physical_warns():
    total = cluster._physical_memory()
    with pytest.warns(RuntimeWarning, match="exceeds physical memory"):
        parse_memory_limit(total, 2)


# ------------------------------------------------------------------ remote scheduler

def test_remote_scheduler_computes(processes, capsys):
    x = da.from_array(np.arange(3000, dtype=np.int64).reshape(60, 50), chunks=(7, 13))
    with client_for(processes.address) as client:
        assert client.scheduler.address == processes.address
        assert len(client.scheduler_info()["workers"]) == 2
        assert x.sum().compute() == np.arange(3000).sum()
    assert f"dask scheduler {processes.address}" in capsys.readouterr().err


def test_randomised_svd_on_a_cluster_ships_its_matrices_beside_the_graph(processes):
    """The scree's random starts and Q blocks (the client makes them between passes) go
    to the workers as scattered data, not inside each pass's graph: no "Sending large
    graph" warning at distributed's 10 MB threshold (lowered here to 200 kB to see it on
    a small matrix), and the same result as in-process."""
    import warnings

    from spedflow.cluster import scattered
    from spedflow.decompose._scree import randomized_svd
    assert scattered([1]) is None  # in-process: nothing to ship
    # made by the workers, so that the graph holds no data of its own
    x = da.random.default_rng(0).standard_normal((3000, 400), chunks=(300, 400)).astype(np.float32)
    u0, s0, v0 = randomized_svd(x, 20, n_power_iter=2)
    with client_for(processes.address), dask.config.set(
            {"distributed.admin.large-graph-warning-threshold": "200kB"}):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="Sending large graph")
            u1, s1, v1 = randomized_svd(x, 20, n_power_iter=2)
    np.testing.assert_allclose(s1, s0, rtol=1e-6)
    np.testing.assert_allclose(np.abs(u1.T @ u0).diagonal(), 1, rtol=1e-5)


def _blas_threads() -> list:
    from threadpoolctl import threadpool_info
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def test_workers_run_one_blas_thread(processes, tmp_path):
    """A run pins every worker's BLAS to one thread, as in-process runs are (a bare
    `dask worker` leaves OpenBLAS on every core, and a product split over threads sums
    in another order), a worker that joins during the run included; on a cluster it
    does not own, only for the run."""
    from cluster_utils import start_worker
    env = {"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}  # as on a bigger machine
    late = None
    try:
        with client_for(processes.address) as client:
            got = client.run(_blas_threads)
            assert got and all(t == [1] * len(t) and t for t in got.values()), got
            late = start_worker(processes.address, tmp_path, name="late", env=env)
            client.wait_for_workers(3)
            got = client.run(_blas_threads)
            assert len(got) == 3 and all(t == [1] * len(t) and t for t in got.values()), got
        # after the run the workers' BLAS is theirs again (the late one's two threads)
        from distributed import Client
        with Client(processes.address) as plain:
            got = plain.run(_blas_threads)
            late_addr = [w for w, i in plain.scheduler_info()["workers"].items()
                         if i["name"] == "late"]
            assert max(got[late_addr[0]]) == 2, got
            # a client the caller made: set up for the run, released after it
            with cluster.given_client(plain):
                assert all(t == [1] * len(t) and t for t in plain.run(_blas_threads).values())
            assert max(plain.run(_blas_threads)[late_addr[0]]) == 2
    finally:
        if late is not None:
            late.stop(grace=1.0)


def test_env_variable_then_config(processes, monkeypatch, capsys):
    monkeypatch.setenv(cluster.ENV_SCHEDULER, processes.address)
    with client_for(quiet=True) as client:
        assert client.scheduler.address == processes.address
        assert da.ones(100, chunks=30).sum().compute() == 100
    assert capsys.readouterr().err == ""
    monkeypatch.delenv(cluster.ENV_SCHEDULER)
    with dask.config.set({"scheduler-address": processes.address}):
        with client_for(quiet=True) as client:
            assert client.scheduler.address == processes.address


def test_address_resolution_order(monkeypatch):
    monkeypatch.setenv(cluster.ENV_SCHEDULER, "tcp://10.0.0.2:8786")
    with dask.config.set({"scheduler-address": "tcp://10.0.0.3:8786"}):
        assert resolve_address("tls://10.0.0.1:8786") == "tls://10.0.0.1:8786"
        assert resolve_address() == "tcp://10.0.0.2:8786"
        monkeypatch.delenv(cluster.ENV_SCHEDULER)
        assert resolve_address() == "tcp://10.0.0.3:8786"
    assert resolve_address() is None
    assert resolve_address("node7:8786") == "tcp://node7:8786"


def test_unreachable_scheduler_is_input_error():
    port = free_port()
    with pytest.raises(InputError, match=rf"cannot connect .*127\.0\.0\.1:{port}.*dask scheduler"):
        with client_for(f"tcp://127.0.0.1:{port}", timeout=1):
            pass


def test_started_cluster_serves_the_body_and_closes_after_it():
    """``cluster.starting``: the body runs while a real local cluster starts; the
    module's dask calls wait for it and run there; it is closed after the body."""
    seen = {}
    with cluster.starting(client_for(n_workers=1, memory_limit="1GB", quiet=True,
                                     dashboard=False)):
        seen["body_started"] = time.monotonic()
        x = da.arange(1000, chunks=100)
        (total,) = compute(x.sum(), label="sum")  # waits for the cluster (cluster.ready)
        client = cluster._pick_client(None, {})
        seen["workers"] = len(scheduler_workers(client))
        seen["processed"] = sum(client.run(lambda dask_worker: dask_worker.state.transition_counter)
                                .values())
    assert total == 499500
    assert seen["workers"] == 1 and seen["processed"] > 0  # it ran on the cluster's worker
    assert client.status == "closed"
    assert cluster._starting is None
    assert cluster._pick_client(None, {}) is None  # dask runs locally again


def test_error_in_the_body_closes_the_started_cluster():
    with pytest.raises(ValueError, match="in the body"):
        with cluster.starting(client_for(n_workers=1, memory_limit="1GB", quiet=True,
                                         dashboard=False)):
            cluster.ready()
            client = cluster._pick_client(None, {})
            raise ValueError("in the body")
    assert client.status == "closed"
    assert cluster._starting is None


def test_start_that_fails_is_raised_where_the_cluster_is_needed():
    """An unreachable scheduler: the body's first dask call raises the start's error;
    an error of the body before that is the one raised."""
    port = free_port()
    after = []
    with pytest.raises(InputError, match=rf"cannot connect .*127\.0\.0\.1:{port}"):
        with cluster.starting(client_for(f"tcp://127.0.0.1:{port}", timeout=1)):
            compute(da.ones(4).sum(), label="sum")
            after.append("computed")
    assert after == []
    with pytest.raises(KeyError, match="before the cluster"):
        with cluster.starting(client_for(f"tcp://127.0.0.1:{port}", timeout=1)):
            raise KeyError("before the cluster")
    assert cluster._starting is None


def test_bad_cluster_arguments_raise_before_anything_starts():
    """client_for checks its arguments at the call (so ``spedflow.segment`` refuses
    them before it reads any data), not when the cluster is entered."""
    with pytest.raises(ParameterError, match="memory_limit"):
        client_for(memory_limit="lots")
    with pytest.raises(ParameterError, match="port number"):
        client_for("h:bar")


def test_remote_ignores_local_only_options(processes):
    with pytest.warns(RuntimeWarning, match="n_workers, memory_limit apply to a local"):
        with client_for(processes.address, n_workers=3, memory_limit="2GB", quiet=True):
            pass


@pytest.mark.parametrize("exc, kwargs, match", [
    (ParameterError, {"memory_limit": "lots"}, r"`memory_limit` must be a size like"),
    (ParameterError, {"memory_limit": "1MB"}, r"`memory_limit` must be >= 256 MiB"),
    (ParameterError, {"memory_limit": True}, r"`memory_limit` must be a size"),
    (ParameterError, {"memory_limit": [1]}, r"`memory_limit` must be a size"),
    (ParameterError, {"n_workers": 0}, r"`n_workers` must be >= 1"),
    (ParameterError, {"threads_per_worker": 1.5}, r"`threads_per_worker` must be a whole"),
    (ParameterError, {"timeout": 0}, r"`timeout` must be > 0"),
    (ParameterError, {"scheduler": "http://h:8786"}, r"unknown protocol 'http'"),
    (ParameterError, {"scheduler": ":8786"}, r"must look like tcp://HOST:PORT"),
    (ParameterError, {"scheduler": 8786}, r"must be an address string"),
    (ParameterError, {"scheduler": "h:bar"}, r"with a port number from 1 to 65535"),
    (ParameterError, {"scheduler": "tcp://h"}, r"with a port number from 1 to 65535"),
    (ParameterError, {"scheduler": "h:8786/x"}, r"with a port number"),
    (ParameterError, {"scheduler": "[::1]:70000"}, r"with a port number"),
    (InputError, {"scheduler": "tls://127.0.0.1:1"}, r"uses TLS but no client certificate"),
    (InputError, {"scheduler": "tls://127.0.0.1:1", "tls_ca_file": "/nonexistent/ca.pem",
                  "tls_cert": "/nonexistent/c.pem"}, r"`tls_ca_file` file .* does not exist"),
    (ParameterError, {"security": "yes"}, r"`security` must be a distributed"),
])
def test_bad_arguments(exc, kwargs, match):
    with pytest.raises(exc, match=match):
        with client_for(**kwargs):
            pass


def test_tls_files_with_tcp_address(tmp_path):
    for name in ("ca.pem", "c.pem"):
        (tmp_path / name).write_text("x")
    with pytest.raises(ParameterError, match=r"not tls://; use tls://127\.0\.0\.1:1"):
        with client_for("tcp://127.0.0.1:1", tls_ca_file=tmp_path / "ca.pem",
                        tls_cert=tmp_path / "c.pem"):
            pass
    with pytest.raises(ParameterError, match="needs both `tls_ca_file` and `tls_cert`"):
        with client_for("tls://127.0.0.1:1", tls_cert=tmp_path / "c.pem"):
            pass


def test_tls_files_without_address(tmp_path):
    for name in ("ca.pem", "c.pem"):
        (tmp_path / name).write_text("x")
    with pytest.raises(ParameterError, match="without a scheduler address"):
        with client_for(tls_ca_file=tmp_path / "ca.pem", tls_cert=tmp_path / "c.pem"):
            pass


def test_required_encryption_with_tcp_address():
    with dask.config.set({"distributed.comm.require-encryption": True}):
        with pytest.raises(InputError, match="requires encryption"):
            with client_for("tcp://127.0.0.1:1"):
                pass


# ------------------------------------------------------------------ compute / progress

def _collections():
    a = np.random.default_rng(0).random((40, 30))
    x = da.from_array(a, chunks=(7, 11))
    cube = da.from_array(np.arange(2 * 5 * 7).reshape(2, 5, 7), chunks=(1, 2, 3))
    return x.sum(), (x * 2).mean(axis=0), x.T, cube + 1


@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
def test_compute_local_matches_dask(scheduler, capsys):
    cols = _collections()
    expected = dask.compute(*cols, scheduler="synchronous")
    got = compute(*cols, 5, label="stage", n_patterns=1200, scheduler=scheduler)
    assert len(got) == 5 and got[4] == 5
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    err = capsys.readouterr().err
    assert re.search(BAR.format(label="stage", unit="patterns"), err), err


def test_assemble_gathers_in_batches(processes):
    """A chunked result is gathered a few chunks at a time into one array: the same
    array for any batch size, and no chunk is left on the workers."""
    from spedflow.cluster import _assemble
    a = np.random.default_rng(2).random((23, 17, 5))
    x = da.from_array(a, chunks=(4, 6, 5)) * 3  # uneven edge chunks, 6 x 3 grid
    with client_for(processes.address, quiet=True) as client:
        for batch_bytes in (1, 4 * 6 * 5 * 8 * 4, 2**30):
            futures = client.compute(x.to_delayed().ravel().tolist())
            np.testing.assert_array_equal(_assemble(x, futures, batch_bytes=batch_bytes), a * 3)
            assert all(f._cleared for f in futures)  # released as copied


def _store_target(tmp_path, shape, chunks):
    import zarr
    g = zarr.open_group(str(tmp_path / "t.zarr"), mode="w")
    return g.create_array("x", shape=shape, chunks=chunks, dtype="f8")


def test_store_writes_every_chunk_and_brings_nothing_back(processes, tmp_path):
    """cluster.store on real workers: the target holds the source, and the client's
    memory does not hold it (da.store(compute=False), computed chunk by chunk, did)."""
    import psutil

    from spedflow.cluster import store
    a = np.random.default_rng(3).random((64, 48, 128))  # 3 MB
    x = da.from_array(a, chunks=(16, 24, 128)) + 1
    target = _store_target(tmp_path, a.shape, (16, 24, 128))
    with client_for(processes.address, quiet=True):
        rss = psutil.Process().memory_info().rss
        big = da.zeros((2048, 4096), chunks=(256, 4096), dtype="f8") + 1  # 64 MB
        store(big, _store_target(tmp_path / "big", big.shape, (256, 4096)), label="big")
        assert psutil.Process().memory_info().rss - rss < 48 * 2**20
        store(x, target, label="small")
    np.testing.assert_array_equal(target[...], a + 1)


def test_store_local_and_its_errors(tmp_path):
    from spedflow.cluster import store
    a = np.arange(6 * 10, dtype="f8").reshape(6, 10)
    x = da.from_array(a, chunks=(2, 5))
    target = _store_target(tmp_path, a.shape, (2, 5))
    store(x, target, label="local")
    np.testing.assert_array_equal(target[...], a)
    one = _store_target(tmp_path / "one", a.shape, a.shape)
    store(da.from_array(a, chunks=-1) * 2, one, label="one chunk")
    np.testing.assert_array_equal(one[...], a * 2)
    with pytest.raises(InputError, match="shape"):
        store(x, _store_target(tmp_path / "s", (6, 9), (2, 5)), label="s")
    with pytest.raises(InputError, match="do not tile"):  # two tasks would share chunks
        store(x, _store_target(tmp_path / "c", a.shape, (4, 5)), label="c")


def test_compute_distributed_matches_dask(processes, capsys):
    cols = _collections()
    expected = dask.compute(*cols, scheduler="synchronous")
    with client_for(processes.address, quiet=True) as client:
        got = compute(*cols, label="vdf", client=client)  # explicit client
        got_default = compute(*cols, label="vdf2")  # the default client
    for g, g2, e in zip(got, got_default, expected):
        np.testing.assert_array_equal(g, e)
        np.testing.assert_array_equal(g2, e)
    err = capsys.readouterr().err
    assert re.search(BAR.format(label="vdf", unit="tasks"), err), err
    assert re.search(BAR.format(label="vdf2", unit="tasks"), err), err


def test_local_scheduler_overrides_default_client(processes):
    with client_for(processes.address, quiet=True):
        with local_scheduler(2):
            assert dask.base.get_scheduler() is dask.threaded.get
            assert dask.config.get("num_workers") == 2
            assert cluster._pick_client(None, {}) is None


def test_progress_off_prints_nothing(processes, capsys):
    set_progress(False)
    cols = _collections()
    got = compute(*cols, label="quiet", scheduler="synchronous")
    with client_for(processes.address, quiet=True):
        got2 = compute(*cols, label="quiet")
    for g, g2, e in zip(got, got2, dask.compute(*cols, scheduler="synchronous")):
        np.testing.assert_array_equal(g, e)
        np.testing.assert_array_equal(g2, e)
    assert capsys.readouterr().err == ""
    with pytest.raises(ParameterError, match="`enabled` must be True or False"):
        set_progress("no")


def _boom(block):
    raise ZeroDivisionError("bad chunk")


def test_errors_propagate_and_bar_says_failed(processes, capsys):
    x = da.ones(20, chunks=5).map_blocks(_boom, dtype=float)
    with pytest.raises(ZeroDivisionError, match="bad chunk"):
        compute(x.sum(), label="local", scheduler="synchronous")
    with client_for(processes.address, quiet=True):
        with pytest.raises(ZeroDivisionError, match="bad chunk"):
            compute(x.sum(), label="remote")
    err = capsys.readouterr().err
    assert re.search(r"local: .* FAILED", err) and re.search(r"remote: .* FAILED", err)
    # a Ctrl-C is no failure: the bar says it was interrupted
    y = da.ones(20, chunks=5).map_blocks(_ctrl_c, meta=np.array((), float))
    with pytest.raises(KeyboardInterrupt):
        compute(y.sum(), label="stopped", scheduler="synchronous")
    err = capsys.readouterr().err
    assert re.search(r"^stopped: .* interrupted$", err, re.M) and "FAILED" not in err, err


def _ctrl_c(block):
    raise KeyboardInterrupt


def test_persist_with_progress(processes, capsys):
    x = da.from_array(np.arange(200.0).reshape(20, 10), chunks=(3, 4))
    (p,) = persist_with_progress(x * 3, label="persist", scheduler="synchronous")
    np.testing.assert_array_equal(p.compute(scheduler="synchronous"), np.arange(200.0).reshape(20, 10) * 3)
    with client_for(processes.address, quiet=True):
        (q,) = persist_with_progress(x * 3, label="persist-remote", n_patterns=200)
        assert len(q.dask) == q.npartitions  # only the persisted chunks remain
        np.testing.assert_array_equal(q.compute(), np.arange(200.0).reshape(20, 10) * 3)
    err = capsys.readouterr().err
    assert re.search(BAR.format(label="persist", unit="tasks"), err)
    assert re.search(BAR.format(label="persist-remote", unit="patterns"), err)


@pytest.mark.parametrize("kwargs, match", [
    ({"label": ""}, "`label` must be a non-empty string"),
    ({"label": "x", "n_patterns": -1}, "`n_patterns` must be >= 0"),
    ({"label": "x", "n_patterns": 2.5}, "`n_patterns` must be a whole number"),
])
def test_compute_bad_arguments(kwargs, match):
    with pytest.raises(ParameterError, match=match):
        compute(da.ones(3), **kwargs)


class _FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_format_and_tty_redraw():
    line = cluster._ProgressLine("peaks", 2000, stream=io.StringIO(), width=10)
    # 45 % done after 9 s of 2000 patterns: 100 patterns/s, 11 s to go
    assert line.format(45, 100, 9.0) == "peaks: [####      ]  45% 100 patterns/s ETA 11s"
    assert line.format(0, 100, 1.0).endswith("ETA ?")
    assert line.format(100, 100, 125.0).endswith("in 2m05s")
    tty = _FakeTTY()
    line = cluster._ProgressLine("nmf", None, stream=tty, width=4, min_interval=0.0)
    line.update(1, 4)
    line.update(2, 4)
    line.finish(4, 4)
    text = tty.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and "tasks/s" in text
    # non-terminal: one line per 10 % step at most, plus the final line
    log = io.StringIO()
    line = cluster._ProgressLine("log", None, stream=log, min_interval=0.0)
    for i in range(101):
        line.update(i, 100)
    line.finish(100, 100)
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and "10%" in lines[0] and "100%" in lines[-1]  # no "0 %" line
    assert "\r" not in log.getvalue()


def test_ingest_progress_bar_in_a_log_has_a_line_per_tenth():
    """The ingest bar redraws itself with carriage returns on a terminal only; a log file
    or a notebook gets a line per tenth of the work and the finished line."""
    from spedflow.io._progress import ProgressBar
    log = io.StringIO()
    bar = ProgressBar(20, 1e6, label="ingest ", stream=log, min_interval=0.0).start()
    for _ in range(20):
        bar.update()
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in log.getvalue()  # a line per tenth, then the end
    assert "2/20 chunks" in lines[0] and "20/20 chunks" in lines[-1]
    tty = _FakeTTY()
    bar = ProgressBar(3, 1e6, label="ingest ", stream=tty, min_interval=0.0).start()
    for _ in range(3):
        bar.update()
    bar.close()
    assert tty.getvalue().count("\r") == 5


def test_a_cluster_without_workers_fails_instead_of_hanging():
    """All workers gone (killed, out of memory) and none replaced: the run stops with a
    one-line error after the grace period instead of waiting forever."""
    import dask.array as da
    from distributed import Client, LocalCluster

    from spedflow import cluster as cl
    from spedflow.errors import ClusterError
    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=None) as lc, Client(lc) as client:
        futures = client.compute([da.ones(10, chunks=5).sum()])
        with pytest.raises(ClusterError, match="no workers"):
            cl.wait_for(client, futures, no_workers_timeout=1.0, poll=0.5)


def _hold_memory(fraction, dask_worker):
    """Allocate (and touch) memory the worker does not manage, up to ``fraction`` of its limit."""
    import psutil
    rss = psutil.Process().memory_info().rss
    need = int(fraction * dask_worker.memory_manager.memory_limit) - rss
    dask_worker._spedflow_test_hold = np.ones(max(need, 0), np.uint8)
    return need


def test_a_cluster_whose_workers_stay_paused_fails_instead_of_hanging():
    """A worker held above dask's pause threshold (80 % of its limit) by memory it cannot
    spill never runs another task: the run stops with a one-line error instead of waiting
    forever (the same cluster runs the task once the memory is released)."""
    import dask.array as da
    from distributed import Client, LocalCluster

    from spedflow import cluster as cl
    from spedflow.errors import ClusterError
    with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=None,
                      memory_limit="700MB") as lc, Client(lc) as client:
        assert list(client.run(_hold_memory, 0.87).values())[0] > 0
        deadline = time.monotonic() + 30
        while not all(w["status"] == "paused" for w in client.scheduler_info()["workers"].values()):
            assert time.monotonic() < deadline, "the worker did not pause"
            time.sleep(0.2)
        futures = client.compute([da.ones(10, chunks=5).sum()])
        with pytest.raises(ClusterError, match="paused at their memory limit"):
            cl.wait_for(client, futures, paused_timeout=2.0, poll=0.5)
        client.run(lambda dask_worker: delattr(dask_worker, "_spedflow_test_hold"))
        cl.wait_for(client, futures, paused_timeout=30.0, poll=0.5)  # it resumes and finishes
        assert client.gather(futures) == [10.0]


def test_routine_shuffle_warnings_are_not_shown(caplog):
    """A p2p rechunk on a real local cluster: distributed's scheduler logs its start and
    end as warnings; they are dropped, as routine (its other warnings are not)."""
    import logging
    # (its own level: other tests of this process may have quietened distributed's loggers)
    name = cluster._SHUFFLE_LOGGER
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger=name):
        with client_for(n_workers=1, memory_limit="1GB", quiet=True, dashboard=False):
            x = da.ones((64, 64), chunks=(8, 64)).rechunk((64, 8), method="p2p")
            (total,) = compute(x.sum(), label="sum")
    assert total == 64 * 64
    shuffle = [r.getMessage() for r in caplog.records if r.name == name]
    assert not [m for m in shuffle if "Shuffle" in m], shuffle
    with caplog.at_level(logging.INFO, logger=name):
        logging.getLogger(name).warning("Shuffle %s failed", "x")  # its other warnings pass
    assert any(r.getMessage() == "Shuffle x failed" for r in caplog.records)
