"""Smoke test of the benchmark suite: it runs at the smallest size and writes valid
JSON and PNGs. No timing is asserted (benchmarks measure, tests assert)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _measure as M  # noqa: E402
import plot_results  # noqa: E402
import run_all  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image as mpimg
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_mem_timeline_attributes_memory_to_the_process_that_holds_it(tmp_path):
    import mem_timeline
    # the command itself holds ~200 MB, a child of it ~120 MB, at different times
    code = ("import subprocess, sys, time, numpy as np; a = np.ones(25_000_000); time.sleep(1.0); "
            "del a; subprocess.run([sys.executable, '-c', "
            "'import numpy as np, time; b = np.ones(15_000_000); time.sleep(1.0)'])")
    out = tmp_path / "t.json"
    assert mem_timeline.main(["--json", str(out), "--every", "0.1", "--",
                              sys.executable, "-c", code]) == 0
    rec = json.loads(out.read_text())
    peaks = {}
    for _, snap in rec["rows"]:
        for k, v in snap.items():
            kind = k.split(":")[0]
            peaks[kind] = max(peaks.get(kind, 0), v)
    assert peaks["client"] > 200 and 120 < peaks["other"] < 200
    with pytest.raises(SystemExit):
        mem_timeline.main(["--json", str(out)])  # no command


def test_run_tree_sees_children_memory():
    # a child that allocates ~200 MB in a grandchild: the tree sampler must see it
    code = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'import numpy as np, time; a = np.ones(25_000_000); time.sleep(1.5)'])")
    run = M.run_tree([sys.executable, "-c", code], interval=0.1)
    assert run["returncode"] == 0
    assert run["peak_rss_bytes"] > 200e6
    assert run["rss_samples"] >= 3
    # the process started itself holds none of it
    assert 0 < run["peak_root_rss_bytes"] < 150e6


def test_io_floor_reads_everything(tmp_path):
    import zarr
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    data = np.random.default_rng(0).integers(0, 50, (5, 7, 8, 8), dtype=np.uint16)
    g.create_array("data", shape=data.shape, chunks=(2, 3, 8, 8), dtype=data.dtype)[...] = data
    fl = M.io_floor(tmp_path / "s.zarr")
    assert fl["checksum"] == int(data.sum())
    assert fl["patterns"] == 35 and fl["n_chunks"] == 9 and fl["nbytes"] == data.nbytes
    assert fl["seconds"] > 0 and fl["patterns_per_s"] > 0


def test_loglog_slope():
    import bench_scaling as S
    x = [1, 2, 4, 8]
    assert S.loglog_slope(x, [3 * v for v in x]) == pytest.approx(1.0)
    assert S.loglog_slope(x, [5, 5, 5, 5]) == pytest.approx(0.0)
    assert S.loglog_slope([1], [1]) is None


def test_last_json():
    text = 'chatter {not json}\n{"a": {"b": 1}}\nmore\n{"c": 2}\n'
    assert run_all._last_json(text) == {"c": 2}
    assert run_all._last_json("nothing") is None


def test_suite_smoke(tmp_path):
    """run_all at the smoke size: I/O floor, one workflow end to end, plots."""
    results, work = tmp_path / "results", tmp_path / "work"
    rc = run_all.main(["--size", "smoke", "--only", "io", "workflows", "plots",
                       "--methods", "vdf", "--work", str(work), "--results", str(results)])
    assert rc == 0
    out = results / "smoke"
    io = json.loads((out / "io_floor.json").read_text())
    assert io["io_floor"]["patterns"] == 144 and io["io_floor"]["mb_per_s"] > 0
    assert io["machine"]["logical_cores"] >= 1 and len(io["load_avg_before"]) == 3
    wf = json.loads((out / "workflows.json").read_text())
    vdf = wf["runs"]["vdf"]
    assert vdf["returncode"] == 0, vdf.get("error")
    assert vdf["patterns"] == 144 and vdf["peak_rss_mb"] > 0
    assert 0 < vdf["peak_client_rss_mb"] <= vdf["peak_rss_mb"]
    assert set(vdf["timings"]) <= set(vdf["patterns_per_s"])
    assert vdf["ratio_to_io_floor"]["end_to_end"] > 0
    assert 0 <= vdf["quality"]["recall"] <= 1
    _valid_png(out / "stages.png")


def _fake_run(method, wall, **kw):
    stages = {"beam": wall * 0.2, "peaks": wall * 0.3} if method == "vdf" else \
        {"beam": wall * 0.2, "nmf": wall * 0.4}
    return {"method": method, "returncode": 0, "wall_s": wall, "stage_sum_s": sum(stages.values()),
            "timings": stages, "peak_rss_mb": 300.0, **kw}


def test_plots_from_results(tmp_path):
    """Every plot is drawn from JSON of the shape the suite writes."""
    weak = {"rows": [dict(_fake_run(m, 10 * gb, extra_args=[]), gb=gb, io_floor_s=gb)
                     for gb in (0.1, 0.4, 1.6) for m in ("vdf", "nmf")]}
    weak["rows"][-1]["extra_args"] = ["--set", "preprocess.nav_binning=2"]
    strong = {"rows": [dict(_fake_run(m, 20 / w), workers=w) for w in (1, 2) for m in ("vdf", "nmf")]}
    runs = {m: dict(_fake_run(m, 5.0), overhead_s=1.5, patterns_per_s={"end_to_end": 100.0})
            for m in ("vdf", "nmf")}
    ref = {"methods": {m: {"reference": {"returncode": 0}, "spedflow": {"returncode": 0},
                           "reference_s": {"end_to_end": 100.0, "algorithm": 90.0},
                           "spedflow_s": {"end_to_end": 10.0, "algorithm": 5.0}}
                       for m in ("vdf", "nmf")}}
    for name, obj in (("weak_scaling", weak), ("strong_scaling", strong),
                      ("workflows", {"runs": runs, "io_floor": {"seconds": 0.5}}),
                      ("reference", ref)):
        M.write_json(tmp_path / f"{name}.json", obj)
    made = plot_results.plot_all(tmp_path)
    assert sorted(p.name for p in made) == ["reference.png", "stages.png", "strong_scaling.png",
                                            "weak_scaling.png"]
    for p in made:
        _valid_png(p)


def test_quality_plot_of_every_suite_found(tmp_path):
    """quality_sets.png: one panel per quality suite whose JSON is in the folder (two
    here, one of them VDF only), nothing when there is none."""
    assert plot_results.plot_quality(tmp_path, tmp_path / "q.png") is None
    rows = [{"set": s, "method": m, "recall": 0.5 + 0.1 * i, "precision": 1.0}
            for i, s in enumerate(("a", "b", "c")) for m in ("vdf", "nmf")]
    M.write_json(tmp_path / "quality.json", {"rows": rows})
    M.write_json(tmp_path / "third.json", {"rows": [r for r in rows if r["method"] == "vdf"]})
    made = plot_results.plot_all(tmp_path)
    assert [p.name for p in made] == ["quality_sets.png"]
    _valid_png(made[0])

def test_quality_benchmark_keeps_the_rows_it_did_not_rerun(tmp_path):
    """`bench_quality.py --methods vdf` updates quality.json instead of dropping the NMF rows."""
    import bench_quality
    out = tmp_path / "quality.json"
    old = [{"set": s, "method": m, "recall": 0.5} for s in ("small", "mgo") for m in ("vdf", "nmf")]
    out.write_text(json.dumps({"rows": old + [{"set": "gone", "method": "vdf", "recall": 1.0}]}))
    merged = bench_quality.merge_earlier([{"set": "mgo", "method": "vdf", "recall": 0.9}], out)
    assert [(r["set"], r["method"], r["recall"], r.get("carried_over", False)) for r in merged] == [
        ("small", "vdf", 0.5, True), ("small", "nmf", 0.5, True),
        ("mgo", "vdf", 0.9, False), ("mgo", "nmf", 0.5, True)]
    assert bench_quality.merge_earlier([], tmp_path / "absent.json") == []


@pytest.mark.parametrize("step", ["strong_scaling", "weak_scaling"])
def test_scaling_rerun_keeps_other_methods_and_files_the_replaced_rows(tmp_path, step):
    """A re-run of one method keeps the other method's rows (marked carried over) and
    files its own earlier rows under superseded_<method>_rows instead of dropping them."""
    suite = run_all.Suite("smoke", tmp_path / "work", tmp_path / "results", methods=("vdf",))
    path = suite.results / f"{step}.json"
    path.write_text(json.dumps({"written": "earlier", "rows": [
        {"method": "vdf", "workers": 2, "scan": 8, "gb": 0.1, "wall_s": 9.0, "cpu_s": 9.0,
         "peak_rss_mb": 1.0},
        {"method": "nmf", "workers": 2, "scan": 8, "gb": 0.1, "wall_s": 20.0, "cpu_s": 20.0,
         "peak_rss_mb": 1.0}]}))
    new = {"method": "vdf", "workers": 2, "scan": 8, "gb": 0.1, "wall_s": 5.0, "cpu_s": 5.0,
           "peak_rss_mb": 1.0}
    suite.save(step, {"rows": [new]}, time.perf_counter(), [0.0, 0.0, 0.0])
    d = json.loads(path.read_text())
    assert sorted((r["method"], r["wall_s"]) for r in d["rows"]) == [("nmf", 20.0), ("vdf", 5.0)]
    assert next(r for r in d["rows"] if r["method"] == "nmf")["carried_over_from"]
    assert [r["wall_s"] for r in d["superseded_vdf_rows"]] == [9.0]


@pytest.mark.cluster
def test_worker_faults_benchmark_reports_every_process(tmp_path, capsys):
    import bench_worker_faults
    import spedflow
    store = spedflow.simulate(tmp_path / "s.zarr", scan=(12, 12), detector=48, crystals=4,
                              seed=1, progress=False)
    assert bench_worker_faults.main([str(store), "--memory-limit", "600MB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["spedflow"].endswith("__init__.py")
    roles = [p["role"] for p in out["processes"]]
    assert roles.count("client") == 1 and len(roles) >= 2
    assert all(p["minor_faults"] > 0 and p["max_rss_mb"] > 0 for p in out["processes"])
    assert out["timings_s"]["beam_peaks"] > 0


def test_foreign_simulator_writes_a_store_evaluate_reads(tmp_path):
    """benchmarks/foreign_sim.py makes a store with truth that spedflow segments and
    ``spedflow.evaluate`` scores (a tiny set: the benchmark's ten take minutes)."""
    import foreign_sim

    import spedflow
    from spedflow.evaluate import evaluate
    meta = foreign_sim.simulate("tiny", out=tmp_path, scan=(16, 18), det=(64, 56), n_cryst=2,
                                shapes="ellipse", spot_r=2, peak=200, beam_ratio=50,
                                size=(0.5, 0.6), seed=3)
    store = foreign_sim.build("tiny", tmp_path)
    assert len(meta["n_spots"]) == 2 and not (tmp_path / "tiny.npy").exists()
    res = spedflow.segment(store, method="vdf", out=tmp_path / "r.zarr", local=True,
                           progress=False)
    scores = evaluate(res, store)
    assert scores["n_truth"] == 2
    assert 0.0 <= scores["recall"] <= 1.0


def test_third_simulator_nests_a_grain_of_the_same_phase_inside_each_bent_one(tmp_path):
    """benchmarks/third_sim.py: a "nestbent" set holds pairs of a bent grain and a small
    grain inside it, of the same lattice at another orientation (the same spot count,
    the small grain's vectors not on the larger one's lattice); the store segments and
    scores (a tiny set)."""
    import third_sim

    import spedflow
    from spedflow.evaluate import evaluate
    from spedflow.segment._lattice import same_lattice
    meta = third_sim.simulate("nestbent_tiny", tmp_path, scan=(32, 32), det="counting", K=64,
                              p2p=1.0, dose=2e4, seed=3)
    store = third_sim.build("nestbent_tiny", tmp_path)
    masks = np.load(tmp_path / "nestbent_tiny_masks.npy")
    assert meta["n_grains"] >= 2 and meta["n_grains"] % 2 == 0
    rng = np.random.default_rng(3)
    grains = third_sim.build_grains("nestbent_tiny", rng, 32, 32, 0.42 * 128)
    for host, inner in zip(grains[::2], grains[1::2]):
        assert inner.mask.any() and not (inner.mask & ~host.mask).any()
        assert len(inner.g) == len(host.g)  # a rotation keeps every |g|
        assert not same_lattice(inner.g, host.g[np.hypot(*host.g.T) < 30])
    assert masks.shape[0] == meta["n_grains"]
    res = spedflow.segment(store, method="vdf", out=tmp_path / "r.zarr", local=True,
                           progress=False)
    scores = evaluate(res, store)
    assert scores["n_truth"] == meta["n_grains"]


def test_kinematic_simulator_makes_mgo_patterns_and_a_scorable_store(tmp_path):
    """benchmarks/kinematic_sim.py: MgO 200 at 1/4.212 A^-1 x 2, no mixed-parity
    reflection, 111 far weaker than 200; a zone-axis crystal at [001] shows the 200 family
    strongest; a tiny set writes the truth spedflow.evaluate reads."""
    import kinematic_sim as K

    import spedflow
    from spedflow.evaluate import evaluate
    hkl, g, F2 = K.reflection_table("MgO", 1.0)
    assert not (np.ptp(hkl % 2, axis=1) != 0).any()
    i200 = np.nonzero((hkl == [2, 0, 0]).all(1))[0][0]
    i111 = np.nonzero((hkl == [1, 1, 1]).all(1))[0][0]
    assert abs(np.linalg.norm(g[i200]) - 2 / 4.212) < 1e-9 and F2[i111] < 0.1 * F2[i200]
    R, _ = K.zone_rotation(np.random.default_rng(0), "MgO", "001", 0.0)
    I = K.precession_intensity(g @ R.T, F2, [200.0], 1.0)[:, 0]
    assert sorted(np.abs(hkl[np.argsort(-I)[:4]]).sum(1)) == [2, 2, 2, 2]
    cfg = dict(K.SETS["mgo128"], scan=(24, 24), n=3, K=64, calib=0.03, seed=5)
    meta = K.simulate("tiny", tmp_path, **cfg)
    store = K.build("tiny", tmp_path)
    assert meta["crystals"][0]["group"] == meta["crystals"][1]["group"]   # the overlapping pair
    res = spedflow.segment(store, method="vdf", out=tmp_path / "r.zarr", local=True,
                           progress=False)
    assert evaluate(res, store)["n_truth"] == meta["n_crystals"]


def test_rank_benchmark_counts_a_planted_rank_against_each_floor(tmp_path):
    """bench_rank on an NMF stage cache's matrix of planted rank 4 (plus Poisson noise):
    one rank per draw and per group of three, each the planted rank, written to JSON."""
    import bench_rank
    import zarr

    from spedflow.io import create_array
    rng = np.random.default_rng(0)
    loadings = rng.random((24 * 24, 4)) ** 4 * 40
    x = rng.poisson(loadings @ rng.random((4, 150)) + 0.5).astype(np.float32)
    (tmp_path / "s.nmf.zarr").mkdir()
    g = zarr.open_group(str(tmp_path / "s.nmf.zarr.cache" / "matrix-0" / "matrix.zarr"), mode="w")
    create_array(g, "x", (24, 24, 150), np.float32, chunks=(8, 24, 150))[:] = x.reshape(24, 24, 150)
    out = tmp_path / "rank.json"
    assert bench_rank.main([str(tmp_path), "--draws", "6", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["set"] == "s" and row["shape"] == [576, 150]
    assert len(row["ranks_1"]) == 6 and len(row["ranks_3"]) == 2
    assert set(row["ranks_1"]) == set(row["ranks_3"]) == {4}, row
    assert row["spread_1"] == max(row["ranks_1"]) - min(row["ranks_1"])
    with pytest.raises(SystemExit):
        bench_rank.main([str(tmp_path), "--draws", "4"])


def test_paired_benchmark_runs_both_versions_alternately(tmp_path):
    """Both trees run (the base from a git worktree), alternating, each with a fresh
    stage cache; the JSON holds every run and the medians."""
    import shutil

    import bench_paired
    from spedflow.simulate import simulate
    repo = BENCH.parent
    if subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    store = tmp_path / "s.zarr"
    simulate(store, scan=12, detector=64, seed=0, progress=False)  # the suite's smoke set
    work = tmp_path / "work"
    try:
        out = bench_paired.main([str(store), "--base", "HEAD", "--pairs", "1", "--work", str(work),
                                 "--json", str(tmp_path / "p.json"), "--", "--no-cluster"])
    finally:
        for tree in work.glob("tree-*"):
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)],
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    assert [r["version_of"] for r in out["rows"]] == ["base", "this"]
    assert out["rows"][0]["tree"] != out["rows"][1]["tree"]
    assert out["rows"][1]["tree"] == str(repo)
    for r in out["rows"]:
        assert r["wall_s"] > 0 and r["timings"]["beam_peaks"] > 0 and r["peak_rss_mb"] > 0
    saved = json.loads((tmp_path / "p.json").read_text())
    assert set(saved["median"]) == {"base", "this"} and len(saved["rows"]) == 2


def test_camera_benchmark_records_the_demo_counts_as_other_cameras():
    """`bench_cameras.py`: the CCD adds its dark level (20) and read-out noise (sigma 3) to
    the counts; the spread keeps every electron, shared among neighbouring pixels."""
    import bench_cameras
    rng = np.random.default_rng(0)
    raw = rng.poisson(2.0, (4, 5, 32, 32)).astype(np.uint16)
    assert bench_cameras._camera(raw, "counts", rng) is raw
    ccd = bench_cameras._camera(raw, "ccd_dark", rng)
    assert ccd.dtype == np.float32
    assert (ccd - raw).mean() == pytest.approx(20.0, abs=0.05)
    assert (ccd - raw).std() == pytest.approx(3.0, rel=0.02)
    spread = bench_cameras._camera(raw, "spread", rng)
    assert spread.sum() == pytest.approx(raw.sum(), rel=1e-3)
    assert spread.var() < 0.5 * raw.var()


def test_binning_benchmark_scores_each_factor(tmp_path):
    import bench_binning
    out = tmp_path / "b.json"
    assert bench_binning.main(["--methods", "vdf", "--factors", "1", "2", "--scan", "24",
                               "--detector", "96", "--work", str(tmp_path / "w"),
                               "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["detector_binning"] for r in rows] == [1, 2]
    for r in rows:
        assert "error" not in r, r
        assert 0 <= r["recall"] <= 1 and r["peak_rss_mb"] > 0
    import zarr
    g = zarr.open_group(str(tmp_path / "w" / "vdf_b2.zarr"), mode="r")
    assert g["segments/patterns"].shape[1:] == (48, 48)


def test_a_twins_shared_reflections_make_no_crystal_of_their_own(tmp_path):
    """benchmarks/third_sim.py's twins (mirror bicrystals sharing every third row of
    reflections): the shared reflections' VDF images show both halves, and their group
    covers the pair. One half came in fragments, each with fewer vectors than that
    group, so the shared-reflection rule let it stand before the folding joined them
    (10 segments for 9 crystals); judged again after the folding it goes."""
    import third_sim

    import spedflow
    from spedflow.evaluate import evaluate
    meta = third_sim.simulate("twin_s13", tmp_path, scan=(40, 40), det="counting", K=96,
                              p2p=1.0, dose=2e4, seed=13)
    store = third_sim.build("twin_s13", tmp_path)
    res = spedflow.segment(store, method="vdf", out=tmp_path / "r.zarr", local=True,
                           progress=False)
    scores = evaluate(res, store)
    assert scores["n_truth"] == meta["n_grains"] == 9
    assert scores["n_matched"] == 9 and scores["n_segments"] == 9
