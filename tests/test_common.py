"""Kernels of the workflow layer against brute force."""

import numpy as np
import pytest

from spedflow.workflows._common import annular_image, radial_profiles


@pytest.mark.parametrize("shape", [(3, 4, 32, 32), (5, 24, 40)])
def test_radial_profiles_equal_a_brute_force_loop(shape):
    rng = np.random.default_rng(1)
    frames = rng.poisson(3.0, shape).astype(np.float32)
    ky, kx = shape[-2:]
    centres = np.stack([rng.uniform(5, ky - 5, shape[:-2]), rng.uniform(5, kx - 5, shape[:-2])], -1)
    centres.reshape(-1, 2)[0] = np.nan  # no beam found: the detector centre is used
    n_bins = 20
    got = radial_profiles(frames, centres, n_bins)
    assert got.shape == shape[:-2] + (n_bins,)
    yy, xx = np.mgrid[:ky, :kx]
    for f, c, g in zip(frames.reshape(-1, ky, kx), centres.reshape(-1, 2), got.reshape(-1, n_bins)):
        c = np.where(np.isfinite(c), c, [ky // 2, kx // 2])
        r = np.hypot(yy - np.rint(c[0]), xx - np.rint(c[1]))
        ref = [f[(r >= i) & (r < i + 1)].sum() for i in range(n_bins)]
        np.testing.assert_allclose(g, ref, rtol=1e-6)
    # the annular image sums the rings it is asked for
    np.testing.assert_allclose(annular_image(got, 3, 9), got[..., 3:9].sum(-1), rtol=1e-6)


def test_beam_radius_from_a_sample_of_chunks_equals_the_whole_scans(tmp_path):
    """The radius pass 1 needs before it starts, from <= 5 chunks, is the whole scan's."""
    from spedflow import preprocess
    from spedflow.simulate import simulate
    from spedflow.workflows._common import prepare_run, sample_beam_radius
    store = simulate(tmp_path / "s.zarr", progress=False, scan=(40, 40), detector=64, crystals=6,
                     seed=4, chunks=(8, 8))  # 25 chunks: the sample is a fifth of the scan
    plan = prepare_run(store, tmp_path / "out.zarr")
    data = plan.data()
    c = preprocess.beam_centres(data).compute(scheduler="synchronous")
    whole = float(preprocess.estimate_beam_radius(data, c).compute(scheduler="synchronous"))
    assert sample_beam_radius(plan) == pytest.approx(whole, rel=0.02)


@pytest.mark.parametrize("inner,outer", [(5.9, 20), (0, 7.5), (3, 3.2)])
def test_annular_sums_equal_the_image_from_radial_profiles(inner, outer):
    from spedflow.workflows._common import annular_sums
    rng = np.random.default_rng(2)
    frames = rng.poisson(2.0, (4, 6, 32, 40)).astype(np.float32)
    centres = rng.normal([16, 20], 0.8, (4, 6, 2))  # a few distinct rounded centres
    centres[1, 2] = [3.2, 37.9]                     # one far off, near a corner
    centres[0, 0] = np.nan                          # none found: the detector centre
    n = int(np.ceil(outer)) + 2
    ref = annular_image(radial_profiles(frames, centres, n), inner, outer)
    got = annular_sums(frames, centres, inner, outer)
    assert got.shape == (4, 6)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_few_measured_beam_centres_are_warned_about(caplog):
    from spedflow.workflows._common import found_fraction
    m = np.full((10, 10, 2), np.nan)
    m[:3] = 64.0  # 30 % found, all in three scan rows: the fit extrapolates
    with caplog.at_level("WARNING", logger="spedflow"):
        assert found_fraction(m) == pytest.approx(0.3)
    assert "found in only 30 %" in caplog.text
    caplog.clear()
    m[:8] = 64.0
    with caplog.at_level("WARNING", logger="spedflow"):
        assert found_fraction(m) == pytest.approx(0.8)
    assert caplog.text == ""
    with caplog.at_level("INFO", logger="spedflow"):  # -v counts them (dropped frames?)
        found_fraction(m)
    assert "no beam centre found in 20 of 100 patterns" in caplog.text


def test_collected_warnings_are_kept_and_replayed(tmp_path, caplog):
    """A stage records the warnings it logged, even with the logger at ERROR (-qq), and
    a rerun from the cache logs them again."""
    import logging

    from spedflow.workflows._cache import StageCache
    from spedflow.workflows._common import collected_warnings, log, replay_warnings
    st = StageCache(tmp_path).stage("x", "key")
    saved = log.level
    log.setLevel(logging.ERROR)
    try:
        with collected_warnings() as notes:
            log.warning("the beam is %s", "clipped")
            log.info("not a warning")
    finally:
        log.setLevel(saved)
    assert notes == ["the beam is clipped"] and log.level == saved
    st.save_attrs(warnings=notes)
    st.mark_complete()
    with caplog.at_level(logging.WARNING, logger="spedflow"):
        replay_warnings(st)
    assert {r.getMessage() for r in caplog.records} == {"the beam is clipped"}


def test_prune_stale_removes_only_complete_stages_of_other_code(tmp_path):
    """Stages another spedflow wrote (the marker of an older version, or of other code)
    can never be reused: pruned. This code's stages, an interrupted stage (resumable)
    and anything that is not a stage stay."""
    from spedflow.workflows._cache import StageCache
    cache = StageCache(tmp_path)
    mine = cache.stage("peaks", "a")
    mine.save("x", np.arange(5))
    mine.mark_complete()
    for name, marker in (("nmf-0123456789abcdef", "ok\n"), ("matrix-00000000000000aa", "0.1.0+ff\n"),
                         ("poisson-fedcba9876543210", None), ("notes", "ok\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.bin").write_bytes(b"0" * 1000)
        if marker is not None:
            (tmp_path / name / "COMPLETE").write_text(marker)
    stale = ["nmf-0123456789abcdef", "matrix-00000000000000aa"]
    # while another run holds the cache (it may be reading those stages), nothing goes
    with StageCache(tmp_path).in_use():
        assert cache.prune_stale() == (0, 0)
    assert all((tmp_path / name).exists() for name in stale)
    removed, freed = cache.prune_stale()
    assert removed == 2 and freed >= 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [mine.path.name, "poisson-fedcba9876543210", "notes", ".lock", ".writer"])
    assert mine.complete and cache.prune_stale() == (0, 0)


def test_a_second_run_on_one_cache_waits_for_the_first(tmp_path, caplog):
    """Two runs on one stage cache (the same result, or the same --cache): the second
    waits, saying so, until the first (another process) has ended, then goes on."""
    import subprocess
    import sys
    import time

    from spedflow.workflows._cache import StageCache
    cache = tmp_path / "c"
    first = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from spedflow.workflows._cache import StageCache\n"
         f"with StageCache({str(cache)!r}).in_use():\n"
         "    print('holding', flush=True); time.sleep(2.0)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding"
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="spedflow"):
            with StageCache(cache).in_use() as said:
                waited = time.monotonic() - t0
    finally:
        first.wait(timeout=30)
    assert waited > 1.0 and said is True  # the first held the cache for 2 s after saying so
    assert any("another spedflow run is using the stage cache" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="spedflow"):
        with StageCache(cache).in_use() as said:  # nobody else: no wait, no message
            pass
    assert not caplog.records and said is False


@pytest.mark.parametrize("sizes", [[], [0, 0], [3], [5, 0, 7, 2, 11, 1], [20]])
def test_rows_are_written_part_by_part_as_their_concatenation(tmp_path, sizes):
    """A table streamed into the result in whole chunks (parts that end inside a chunk
    wait for the next) reads back as the concatenation of its parts."""
    import zarr

    from spedflow.workflows._common import Rows, _write_rows
    rng = np.random.default_rng(len(sizes))
    parts = [rng.random((n, 5)).astype(np.float32) for n in sizes]
    g = zarr.open_group(str(tmp_path / "r.zarr"), mode="w")
    # chunks of 4 rows: parts cross chunk boundaries and fill several chunks at once
    _write_rows(g, "peaks", Rows(iter(parts), 5), chunk_bytes=4 * 5 * 4)
    got = g["peaks"][...]
    want = np.concatenate(parts) if parts else np.zeros((0, 5), np.float32)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("local", [True, False])
def test_stored_stacks_are_copied_into_the_result_as_they_are(tmp_path, local):
    """A stage's zarr stack goes into the result with its values, dtype and chunks; the
    local copy is of files (checksummed chunks as stored) and stays apart from its
    source, which a later run may rewrite in place."""
    import zarr
    from zarr.storage import MemoryStore

    from spedflow.io import create_array
    from spedflow.workflows._common import _copy_stored
    rng = np.random.default_rng(3)
    stack = rng.random((5, 6, 7)).astype(np.float32)
    src_group = zarr.open_group(str(tmp_path / "cache.zarr") if local else MemoryStore(), mode="w")
    source = create_array(src_group, "images", stack.shape, stack.dtype, chunks=(1, 6, 7))
    source[...] = stack
    result = zarr.open_group(str(tmp_path / "r.zarr"), mode="w")
    _copy_stored(source, result.require_group("vdf"), "images")
    source[0] = -1  # the cache rewritten after the result was made
    got = zarr.open_group(str(tmp_path / "r.zarr"), mode="r")["vdf/images"]
    assert got.dtype == np.float32 and got.chunks == (1, 6, 7)
    np.testing.assert_array_equal(got[...], stack)


@pytest.mark.parametrize("clip", [None, 400.0])
def test_a_clipped_beam_is_warned_about(caplog, clip):
    """A direct beam clipped flat (an 8-bit camera at high dose) is reported even when its
    half-maximum radius still measures the beam; an unclipped one is not."""
    import logging

    from spedflow.workflows._common import beam_scales
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:48, :48]
    frames = []
    for _ in range(40):
        cy, cx = 24 + rng.uniform(-1, 1, 2)
        beam = 1000.0 * (np.hypot(yy - cy, xx - cx) <= 3.0)
        for gy, gx in ((-12, 5), (12, -5), (4, 14), (-4, -14)):  # precession discs, beam-sized
            beam += 150.0 * (np.hypot(yy - cy - gy, xx - cx - gx) <= 3.0)
        f = rng.poisson(beam + 2.0).astype(np.float32)
        frames.append(f if clip is None else np.minimum(f, clip))
    with caplog.at_level(logging.WARNING, logger="spedflow"):
        radius, glare = beam_scales(np.stack(frames))
    warned = [r.getMessage() for r in caplog.records if "clipped" in r.getMessage()]
    assert radius == pytest.approx(3.0, abs=0.6) and glare is None
    assert bool(warned) == (clip is not None), warned


def test_stage_keys_change_with_the_code_not_only_the_version(tmp_path):
    """A copy of spedflow with one edited source line gives other stage keys (its cache
    is never reused by other code of the same version); an unedited copy the same."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import spedflow
    src = Path(spedflow.__file__).parent
    code = ("from spedflow.workflows._cache import stage_key, code_fingerprint;"
            "print(code_fingerprint(), stage_key('peaks', {'a': 1}))")

    def keys(root):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**__import__("os").environ, "PYTHONPATH": str(root)},
                             cwd=tmp_path, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout.split()

    for name in ("same", "edited"):
        shutil.copytree(src, tmp_path / name / "spedflow",
                        ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "edited" / "spedflow" / "segment" / "_merge.py"
    target.write_text(target.read_text() + "\n# an edit\n")
    from spedflow.workflows._cache import code_fingerprint
    same, edited = keys(tmp_path / "same"), keys(tmp_path / "edited")
    assert same[0] == code_fingerprint()  # a copy of this code: this code's keys
    assert same[0].startswith(spedflow.__version__ + "+")
    assert edited[0].split("+")[0] == same[0].split("+")[0]  # the same version
    assert edited != same and edited[1] != same[1]
    assert keys(tmp_path / "same") == same  # and stable


def test_pattern_totals_equal_a_float64_sum():
    from spedflow.workflows._common import pattern_totals
    rng = np.random.default_rng(3)
    frames = rng.poisson(3.0, (5, 7, 33, 40)).astype(np.float32)
    got = pattern_totals(frames)
    assert got.shape == (5, 7) and got.dtype == np.float64
    np.testing.assert_allclose(got, frames.sum(axis=(-2, -1), dtype=np.float64), rtol=1e-6)


def _block_sums(block, offset):
    return {"sum": np.asarray(block, np.float64).sum(axis=(2, 3)), "offset": np.asarray(offset)}


def test_run_blocks_resumes_block_by_block_and_says_so(tmp_path, capsys, caplog):
    """Blocks written before (an interrupted run) are kept and not recomputed; the run
    says it resumes next to its progress bar; a torn temporary file is removed."""
    import logging

    import dask
    import dask.array as da

    from spedflow import cluster
    from spedflow.workflows._cache import StageCache, load_block
    from spedflow.workflows._common import run_blocks

    data = da.from_array(np.arange(4 * 6 * 3 * 3, dtype=np.uint16).reshape(4, 6, 3, 3),
                         chunks=(2, 3, 3, 3))
    stage = StageCache(tmp_path).stage("test", "key")
    with dask.config.set(scheduler="synchronous"):
        paths = run_blocks(stage, data, _block_sums, label="sums", n_patterns=24)
    assert len(paths) == 4
    for p in paths[1:]:  # as if interrupted after the first block
        p.unlink()
    first = paths[0].stat().st_mtime_ns
    torn = paths[0].with_name("1_1.npz.tmp77")
    torn.write_bytes(b"half")
    caplog.set_level(logging.WARNING, logger="spedflow")  # the default: -v logs it instead
    with cluster.progress_switched(True), dask.config.set(scheduler="synchronous"):
        again = run_blocks(stage, data, _block_sums, label="sums", n_patterns=24)
    assert again == paths and paths[0].stat().st_mtime_ns == first and not torn.exists()
    assert "sums: resuming, 1 of 4 blocks finished before" in capsys.readouterr().err
    whole = np.arange(4 * 6 * 3 * 3, dtype=np.float64).reshape(4, 6, 3, 3).sum(axis=(2, 3))
    for p, (i, j) in zip(paths, [(0, 0), (0, 3), (2, 0), (2, 3)]):
        b = load_block(p)
        np.testing.assert_array_equal(b["sum"], whole[i:i + 2, j:j + 3])
        assert tuple(b["offset"]) == (i, j)
