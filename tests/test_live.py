"""Live mode: a store written chunk by chunk by another process is followed as it
lands, and the final run reuses what was computed live."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

WRITER = textwrap.dedent("""
    import glob, sys, time, zarr
    from spedflow.simulate import simulate_array
    from spedflow.io import create_array
    dest, delay, hot = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    blocks = sys.argv[4] if len(sys.argv) > 4 else None  # see below
    data, truth = simulate_array(scan=(32, 32), detector=48, crystals=4, seed=3, hot_pixels=hot)
    g = zarr.open_group(dest, mode="w")
    a = create_array(g, "data", data.shape, data.dtype, chunks=(8, 8) + data.shape[2:])
    g.attrs["spedflow"] = {"kind": "input", "complete": False, "source": "writer"}
    for i in range(4):
        for j in range(4):
            a[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8] = data[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8]
            time.sleep(delay)
        # with a glob of live block files: the last chunk row waits (up to 60 s) until
        # one exists, as a slow acquisition would on a loaded machine
        t0 = time.monotonic()
        while blocks and i == 2 and not glob.glob(blocks) and time.monotonic() - t0 < 60:
            time.sleep(0.1)
    g.attrs["spedflow"] = {"kind": "input", "complete": True, "source": "writer",
                           "hot": truth["attrs"]["hot_pixels"]}
""")


@pytest.mark.parametrize("hot", [0, 3])
def test_watch_follows_a_store_being_written(tmp_path, hot):
    """With hot pixels, live mode finds them on its sample (the first eight chunks) and
    the batch run at the end is given them: the same repaired data, so it reuses every live block."""
    from spedflow.workflows.live import watch
    store, out = tmp_path / "live.zarr", tmp_path / "result.zarr"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    # live mode starts after eight chunks (its sample) and must make its first blocks
    # before the scan is complete: the writer's last row waits for one
    writer = subprocess.Popen([sys.executable, str(script), str(store), "0.25", str(hot),
                               str(tmp_path / "result.zarr.cache" / "beam_peaks-*" / "blocks" / "*.npz")])
    try:
        result = watch(store, method="vdf", out=out, poll=0.1, timeout=120, progress=False)
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0
    res = zarr.open_group(str(result), mode="r")
    assert res["segments/maps"].shape[1:] == (32, 32)
    assert res["vectors"].shape[0] > 0
    # the per-chunk products were made live, before the scan was complete: pass 1's block
    # files (beam centres and peaks) start before the store's completion, even with the
    # default descan fit (the peaks move to its frame at the end). They start once eight
    # chunks have landed: the first 512 patterns are the sample the noise is measured on.
    complete_time = (store / "zarr.json").stat().st_mtime
    cache = tmp_path / "result.zarr.cache"
    blocks = sorted(cache.glob("beam_peaks-*/blocks/*.npz"))
    assert len(blocks) == 16
    assert min(p.stat().st_mtime for p in blocks) < complete_time
    assert res.attrs["spedflow"]["params"]["preprocess"]["descan"] == "quadratic"
    attrs = res.attrs["spedflow"]
    truth_hot = zarr.open_group(str(store), mode="r").attrs["spedflow"].get("hot", [])
    assert len(attrs["resolved"]["bad_pixels"]) >= hot
    assert {tuple(p) for p in truth_hot} <= {tuple(p) for p in attrs["resolved"]["bad_pixels"]}
    # and the batch run on the finished store, with the same fixed choices, agrees
    from spedflow.api import segment
    again = segment(store, method="vdf", out=tmp_path / "batch.zarr", local=True, progress=False,
                    overrides={"preprocess": {"beam_radius": attrs["resolved"]["beam_radius"],
                                              "bad_pixels": attrs["resolved"]["bad_pixels"]
                                              or "none"},
                               "peaks": {"gain": attrs["resolved"]["gain"],
                                         "read_variance": attrs["resolved"]["read_variance"]}},
                    cache=tmp_path / "batch.cache")
    b = zarr.open_group(str(again), mode="r")
    np.testing.assert_allclose(b["vectors"][:], res["vectors"][:], atol=1e-4)
    np.testing.assert_allclose(b["segments/maps"][:], res["segments/maps"][:], rtol=1e-5, atol=1e-3)


def test_watch_nmf_final_run_reuses_the_live_blocks(tmp_path):
    """NMF live mode writes the beam and Poisson blocks under the keys the final run
    looks for: one stage of each in the cache (a second one would be a recomputation)."""
    from spedflow.workflows.live import watch
    store = tmp_path / "live.zarr"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writer = subprocess.Popen([sys.executable, str(script), str(store), "0.1", "2"])
    try:
        watch(store, method="nmf", out=tmp_path / "nmf.zarr", poll=0.1, timeout=120,
              progress=False)
    finally:
        writer.wait(timeout=120)
    cache = tmp_path / "nmf.zarr.cache"
    for stage in ("beam", "poisson"):
        dirs = sorted(cache.glob(f"{stage}-*"))
        assert len(dirs) == 1, dirs
        assert len(list(dirs[0].glob("blocks/*.npz"))) == 16


CAMERA_WRITER = textwrap.dedent("""
    import sys, time, zarr, numpy as np
    from spedflow.simulate import simulate_array
    from spedflow.io import create_array
    dest, c = sys.argv[1], int(sys.argv[2])
    data, _ = simulate_array(scan=(24, 24), detector=48, crystals=4, seed=5)
    data = (data.astype(np.uint32) * 3 + 20).astype(np.uint16)  # 3 units per count, dark level 20
    g = zarr.open_group(dest, mode="w")
    a = create_array(g, "data", data.shape, data.dtype, chunks=(c, c) + data.shape[2:])
    g.attrs["spedflow"] = {"kind": "input", "complete": False, "source": "writer"}
    for i in range(0, 24, c):
        for j in range(0, 24, c):
            a[i:i + c, j:j + c] = data[i:i + c, j:j + c]
        time.sleep(0.05)
    g.attrs["spedflow"] = {"kind": "input", "complete": True, "source": "writer"}
""")


@pytest.mark.parametrize("method", ["vdf", "nmf"])
def test_watch_measures_the_noise_on_small_chunks(tmp_path, method, monkeypatch):
    """Chunks of 2 x 2 positions (a large detector's) are too few patterns for the noise
    measurement: live mode waits until the landed chunks hold the batch run's sample.
    On the first chunk alone, live VDF stopped ("too few patterns") and live NMF took
    the camera's dark level as 0."""
    from spedflow.workflows import live
    from spedflow.workflows.live import watch
    samples = []
    begin = live._begin

    def recorded(plan, cfg, cache, state, method, blocks):
        samples.append(sum(b.shape[0] * b.shape[1] for b in blocks))
        return begin(plan, cfg, cache, state, method, blocks)

    monkeypatch.setattr(live, "_begin", recorded)
    store = tmp_path / "live.zarr"
    script = tmp_path / "writer.py"
    script.write_text(CAMERA_WRITER)
    writer = subprocess.Popen([sys.executable, str(script), str(store), "2"])
    try:
        result = watch(store, method=method, out=tmp_path / "r.zarr", poll=0.05, timeout=120,
                       progress=False)
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0
    assert len(samples) == 1 and 512 <= samples[0] < 576, samples  # live mode started, once
    resolved = zarr.open_group(str(result), mode="r").attrs["spedflow"]["resolved"]
    # as the batch run measures them on its sample, spread over the finished scan (the
    # estimator itself reads 3.3 units per count on this simulation, 18 for the level)
    from spedflow.io import open_input
    from spedflow.peaks.lazy import measure_counts
    gain, read_var = measure_counts(open_input(store)[0])
    if method == "vdf":
        assert resolved["gain"] == pytest.approx(gain, rel=0.05)
        assert resolved["gain"] == pytest.approx(3.0, rel=0.15)
    else:  # the dark level, less read-out variance / gain (none here)
        assert resolved["dark_level"] == pytest.approx(-read_var / gain, rel=0.1)
        assert resolved["dark_level"] == pytest.approx(20.0, rel=0.15)
    # the live blocks were reused: one stage of per-chunk products, every chunk in it
    stage = "beam_peaks" if method == "vdf" else "poisson"
    dirs = sorted((tmp_path / "r.zarr.cache").glob(f"{stage}-*"))
    assert len(dirs) == 1 and len(list(dirs[0].glob("blocks/*.npz"))) == 144


def test_watch_gives_up_when_nothing_lands(tmp_path):
    import pytest

    from spedflow.errors import InputError
    from spedflow.io import create_array
    from spedflow.workflows.live import watch
    g = zarr.open_group(str(tmp_path / "stalled.zarr"), mode="w")
    create_array(g, "data", (16, 16, 32, 32), np.uint16, chunks=(8, 8, 32, 32))
    with pytest.raises(InputError, match="no new chunk landed"):
        watch(tmp_path / "stalled.zarr", out=tmp_path / "r.zarr", poll=0.1, timeout=1.0, progress=False)


def test_watch_takes_set_overrides(tmp_path):
    """`spedflow watch --set` sets a parameter as `segment --set` does (the errors of
    both advise --set); a misspelt one is refused in one line before anything runs."""
    from spedflow.simulate import simulate
    store = simulate(tmp_path / "s.zarr", scan=(16, 16), detector=32, crystals=3, seed=2,
                     progress=False)
    run = [sys.executable, "-m", "spedflow", "watch", str(store), "-q", "--timeout", "60"]
    bad = subprocess.run(run + ["--out", str(tmp_path / "b.zarr"), "--set", "vectors.min_pattern=3"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "min_pattern" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    ok = subprocess.run(run + ["--out", str(tmp_path / "r.zarr"), "--set", "vectors.min_patterns=3"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    attrs = zarr.open_group(str(tmp_path / "r.zarr"), mode="r").attrs["spedflow"]
    assert attrs["params"]["vectors"]["min_patterns"] == 3


def test_store_identity_ignores_attributes_written_later(tmp_path):
    """An acquisition may write the store's attributes after its first chunks: live mode
    plans on the store as it finds it, and the final run must get the same cache keys
    (with `source` in the identity, the NMF final run recomputed its beam stage when live
    mode had planned before the writer set it, seen under load)."""
    from spedflow.io import create_array
    from spedflow.workflows._common import store_identity
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    a = create_array(g, "data", (4, 4, 8, 8), np.uint16, chunks=(2, 2, 8, 8))
    before = store_identity(tmp_path / "s.zarr", a, {})
    g.attrs["spedflow"] = {"kind": "input", "complete": True, "source": "writer"}
    assert store_identity(tmp_path / "s.zarr", a, dict(g.attrs["spedflow"])) == before


def test_watch_waits_for_a_run_holding_its_cache(tmp_path, caplog):
    """Live mode writes its blocks under the cache's writer lock, as a batch run does:
    while another run holds the cache it writes nothing, says why, and goes on after."""
    import threading
    import time

    from spedflow.simulate import simulate
    from spedflow.workflows._cache import StageCache
    from spedflow.workflows.live import watch
    store = simulate(tmp_path / "s.zarr", scan=(16, 16), detector=32, crystals=2, seed=4,
                     progress=False)
    out = tmp_path / "r.zarr"
    cache = StageCache(tmp_path / "r.zarr.cache")
    results, errors = [], []

    def run():
        try:
            results.append(watch(store, method="vdf", out=out, poll=0.05, timeout=60, progress=False))
        except Exception as exc:  # reported below, not lost in the thread
            errors.append(exc)

    caplog.set_level("WARNING", logger="spedflow")
    with cache.in_use():  # another run (of this process, on its own file handles)
        t = threading.Thread(target=run)
        t.start()
        t0 = time.monotonic()
        while "another spedflow run is using the stage cache" not in caplog.text:
            assert time.monotonic() - t0 < 120 and t.is_alive(), (errors, caplog.text)
            time.sleep(0.05)
        assert not list(cache.root.glob("*/blocks/*.npz"))  # nothing written while held
    t.join(timeout=300)
    assert not errors, errors
    assert results and zarr.open_group(str(results[0]), mode="r")["segments/maps"].shape[1:] == (16, 16)
    assert list(cache.root.glob("beam_peaks-*/blocks/*.npz"))
