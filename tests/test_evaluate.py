"""Scoring against the simulated truth: perfect, empty, permuted, partial and binned
answers, the assignment against brute force, the store reader, bad input."""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
import zarr

from spedflow.errors import InputError, ParameterError
from spedflow.evaluate import bin_masks, evaluate, format_evaluation, score_segmentation
from spedflow.io import create_array
from spedflow.simulate import simulate_array


@pytest.fixture(scope="module")
def truth():
    _, t = simulate_array(scan=(30, 27), detector=32, crystals=6, seed=4)
    return t


def _finite(scores):
    for k, v in scores.items():
        if isinstance(v, float):
            assert math.isfinite(v), k


def test_truth_scores_perfect(truth):
    s = score_segmentation(truth["masks"].astype(np.float32), truth["patterns"],
                           truth["masks"], truth["patterns"])
    assert s["n_truth"] == s["n_segments"] == s["n_matched"] == 6
    assert s["recall"] == s["precision"] == s["mean_iou"] == s["mean_best_iou"] == 1.0
    assert s["mean_correlation"] == pytest.approx(1.0, abs=1e-6)
    assert [r["segment"] for r in s["per_crystal"]] == list(range(6))
    assert s["exclude_radius"] > 0
    _finite(s)


def test_permuted_answer_is_perfect(truth):
    perm = np.random.default_rng(0).permutation(6)
    maps = truth["masks"][perm] * np.float32(3.5)  # map values other than 1
    s = score_segmentation(maps, truth["patterns"][perm] * 7, truth["masks"], truth["patterns"])
    assert s["recall"] == s["precision"] == s["mean_iou"] == 1.0
    assert s["mean_correlation"] == pytest.approx(1.0, abs=1e-6)
    assert [r["segment"] for r in s["per_crystal"]] == np.argsort(perm).tolist()


def test_empty_answer_is_zero(truth):
    s = score_segmentation(np.zeros((0, 30, 27)), np.zeros((0, 32, 32)), truth["masks"],
                           truth["patterns"])
    assert s["n_segments"] == s["n_matched"] == 0
    assert s["recall"] == s["precision"] == s["mean_iou"] == s["mean_best_iou"] == 0.0
    assert s["mean_correlation"] == 0.0
    assert all(r["segment"] is None for r in s["per_crystal"])
    _finite(s)
    assert "recall 0.000" in format_evaluation(s)


def test_all_zero_maps_and_no_truth():
    s = score_segmentation(np.zeros((2, 5, 5)), np.zeros((2, 8, 8)), np.zeros((0, 5, 5), bool),
                           np.zeros((0, 8, 8)))
    assert s["recall"] == s["precision"] == 0.0 and s["n_truth"] == 0
    _finite(s)


def test_half_answer(truth):
    s = score_segmentation(truth["masks"][:3].astype(float), truth["patterns"][:3],
                           truth["masks"], truth["patterns"])
    assert s["recall"] == 0.5 and s["precision"] == 1.0 and s["mean_iou"] == 1.0


def test_wrong_patterns_lower_correlation(truth):
    maps = truth["masks"].astype(float)
    s = score_segmentation(maps, truth["patterns"][::-1], truth["masks"], truth["patterns"])
    assert s["recall"] == 1.0 and s["mean_correlation"] < 0.5


@pytest.mark.parametrize("b", [1, 2, 3, (2, 3)])
def test_binned_truth_is_perfect(truth, b):
    by, bx = (b, b) if isinstance(b, int) else b
    out = (30 // by, 27 // bx)
    maps = bin_masks(truth["masks"], out, b).astype(np.float32)
    s = score_segmentation(maps, truth["patterns"], truth["masks"], truth["patterns"], nav_binning=b)
    n = int((maps.reshape(6, -1) > 0).any(1).sum())  # a crystal smaller than a bin vanishes
    assert n >= 5
    assert s["recall"] == s["precision"] == n / 6 and s["mean_iou"] == 1.0
    assert s["nav_binning"] == [by, bx]


@pytest.mark.parametrize("shape,b", [((7, 9), 2), ((7, 9), 3), ((8, 8), 4), ((5, 6), (2, 3))])
def test_bin_masks_brute_force(shape, b):
    rng = np.random.default_rng(1)
    masks = rng.random((3, *shape)) > 0.5
    by, bx = (b, b) if isinstance(b, int) else b
    for out in {(shape[0] // by, shape[1] // bx), (-(-shape[0] // by), -(-shape[1] // bx))}:
        got = bin_masks(masks, out, b)
        ref = np.zeros((3, *out), bool)
        for c, i, j in itertools.product(range(3), range(out[0]), range(out[1])):
            block = masks[c, i * by:(i + 1) * by, j * bx:(j + 1) * bx]
            ref[c, i, j] = block.sum() > block.size / 2
        np.testing.assert_array_equal(got, ref)


def test_detector_binned_patterns(truth):
    p = truth["patterns"].reshape(6, 16, 2, 16, 2).sum(axis=(2, 4))
    s = score_segmentation(truth["masks"].astype(float), p, truth["masks"], truth["patterns"])
    assert s["mean_correlation"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_assignment_maximises_total_iou(seed):
    rng = np.random.default_rng(seed)
    truth_m = rng.random((4, 6, 6)) > 0.5
    maps = (rng.random((3, 6, 6)) > 0.5).astype(float)
    s = score_segmentation(maps, np.ones((3, 8, 8)), truth_m, np.ones((4, 8, 8)), iou_threshold=0.01)
    iou = np.array(s["iou"])
    for c in range(4):  # brute-force IoU
        for k in range(3):
            p = maps[k] > 0
            u = (truth_m[c] | p).sum()
            assert iou[c, k] == pytest.approx((truth_m[c] & p).sum() / u if u else 0.0)
    best = max(sum(iou[c, k] for c, k in zip(rows, range(3)))
               for rows in itertools.permutations(range(4), 3))
    got = sum(r["iou"] for r in s["per_crystal"])
    assert got == pytest.approx(best)


def test_hungarian_beats_greedy():
    # crystal A overlaps both segments; greedy would give A the best one and leave B unmatched
    t = np.zeros((2, 1, 10), bool)
    t[0, 0, 0:6] = True   # A
    t[1, 0, 4:10] = True  # B
    m = np.zeros((2, 1, 10))
    m[0, 0, 1:8] = 1      # IoU A 5/8, B 4/9
    m[1, 0, 0:5] = 1      # IoU A 5/6, B 1/10
    s = score_segmentation(m, np.ones((2, 8, 8)), t, np.ones((2, 8, 8)), iou_threshold=0.4)
    assert s["n_matched"] == 2


def _write_result(path, maps, patterns, nav_binning):
    g = zarr.open_group(str(path), mode="w")
    create_array(g, "segments/maps", maps.shape, np.float32)[...] = maps
    create_array(g, "segments/patterns", patterns.shape, np.float32)[...] = patterns
    g.attrs["spedflow"] = {"kind": "result", "nav_binning": nav_binning}
    return path


def test_evaluate_store(sim_store, tmp_path, monkeypatch):
    g = zarr.open_group(str(sim_store), mode="r")
    masks, pats = g["truth/masks"][...], g["truth/patterns"][...]
    maps = bin_masks(masks, (24, 24), 2).astype(np.float32)
    res = _write_result(tmp_path / "r.zarr", maps, pats, 2)
    s = evaluate(res, sim_store)
    assert s["recall"] == s["precision"] == 1.0
    assert s["mean_correlation"] == pytest.approx(1.0, abs=1e-6)
    assert s["groups"] == g["truth/groups"][...].tolist()
    text = format_evaluation(s)
    assert "recall 1.000" in text and len(text.splitlines()) == 6 + len(masks)
    assert text.splitlines()[0] == f"result {res} against the truth of {sim_store}"
    # the store defaults to the input the result records
    with pytest.raises(InputError, match="does not record an input store"):
        evaluate(res)
    r = zarr.open_group(str(res), mode="r+")
    r.attrs["spedflow"] = {**r.attrs["spedflow"], "input": str(sim_store)}
    assert evaluate(res)["recall"] == 1.0
    # a relative path, as a run records it: relative to the directory the run started
    # in, or the store beside the result (`spedflow demo` ran as `spedflow-demo/...`)
    run = tmp_path / "run"
    run.mkdir()
    r.attrs["spedflow"] = {**r.attrs["spedflow"], "input": os.path.relpath(sim_store, run)}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="does not record an input store"):
        evaluate(res)
    monkeypatch.chdir(run)
    assert evaluate(res)["recall"] == 1.0
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "sim.zarr").symlink_to(sim_store, target_is_directory=True)
    r.attrs["spedflow"] = {**r.attrs["spedflow"], "input": "sub/sim.zarr"}
    assert evaluate(res)["recall"] == 1.0                   # relative to the result's folder
    (tmp_path / "sim.zarr").symlink_to(sim_store, target_is_directory=True)
    for moved in ("elsewhere/sim.zarr", "/no/such/folder/sim.zarr"):
        r.attrs["spedflow"] = {**r.attrs["spedflow"], "input": moved}
        assert evaluate(res)["recall"] == 1.0               # by its name beside the result
    # a recorded name that is the result's own is not the input
    r.attrs["spedflow"] = {**r.attrs["spedflow"], "input": "elsewhere/r.zarr"}
    with pytest.raises(InputError, match="does not record an input store"):
        evaluate(res)
    # the two the wrong way round: said so
    with pytest.raises(InputError, match="the arguments are the other way round"):
        evaluate(sim_store, res)


def test_the_table_says_why_a_crystal_was_missed(sim_store, tmp_path):
    """A crystal under the watershed's smallest segment, and one of the orientation of a
    matched crystal, are each named with the reason; the method heads the table."""
    g = zarr.open_group(str(sim_store), mode="r")
    masks, pats, groups = g["truth/masks"][...], g["truth/patterns"][...], g["truth/groups"][...]
    areas = masks.sum(axis=(1, 2))
    _, counts = np.unique(groups, return_counts=True)
    twin = int(np.flatnonzero(counts[groups] > 1)[0])         # one of a pair of one orientation
    small = int(np.argmin(np.where(counts[groups] > 1, np.inf, areas)))  # of its own orientation
    keep = [c for c in range(len(masks)) if c not in (twin, small)]
    res = _write_result(tmp_path / "r.zarr", masks[keep].astype(np.float32), pats[keep], 1)
    r = zarr.open_group(str(res), mode="r+")
    r.attrs["spedflow"] = {**r.attrs["spedflow"], "method": "vdf",
                           "params": {"watershed": {"min_size": int(areas[small]) + 1}}}
    s = evaluate(res, sim_store)
    assert s["areas"] == areas.tolist() and s["min_size"] == areas[small] + 1
    lines = format_evaluation(s).splitlines()
    assert lines[0].startswith("VDF result ")
    assert f"crystal {small}: {areas[small]} scan positions, under watershed.min_size = " \
           f"{areas[small] + 1}" in lines
    partner = next(c for c in keep if groups[c] == groups[twin])
    assert any(line.startswith(f"crystal {twin}: of one orientation with crystal {partner}, "
                               "which is matched") for line in lines)
    assert sum(line.startswith("crystal ") and ":" in line for line in lines) == 2
    # a larger min_size than the small crystal's area, no note for it
    r.attrs["spedflow"] = {**r.attrs["spedflow"], "params": {"watershed": {"min_size": 1}}}
    assert not any(line.startswith(f"crystal {small}:")
                   for line in format_evaluation(evaluate(res, sim_store)).splitlines())


def test_evaluate_errors(sim_store, tmp_path):
    g = zarr.open_group(str(sim_store), mode="r")
    pats = g["truth/patterns"][...]
    res = _write_result(tmp_path / "r.zarr", np.zeros((1, 24, 24)), pats[:1], 1)
    with pytest.raises(InputError, match="result scan size 24 along Y"):
        evaluate(res, sim_store)
    no_truth = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    no_truth.attrs["spedflow"] = {"kind": "input"}
    with pytest.raises(InputError, match="has no truth/ group"):
        evaluate(res, tmp_path / "plain.zarr")
    with pytest.raises(InputError, match="does not exist"):
        evaluate(tmp_path / "missing.zarr", sim_store)
    with pytest.raises(InputError, match="has no 'segments/maps'"):
        evaluate(tmp_path / "plain.zarr", sim_store)
    with pytest.raises(InputError, match="is an input store, not a result: give the result"):
        evaluate(sim_store)
    bad = _write_result(tmp_path / "b.zarr", np.zeros((1, 48, 48)), np.zeros((1, 30, 30)), 1)
    with pytest.raises(InputError, match="not an integer detector binning"):
        evaluate(bad, sim_store)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(iou_threshold=0), ParameterError, "`iou_threshold` must be > 0"),
    (dict(iou_threshold=1.5), ParameterError, "`iou_threshold` must be <= 1"),
    (dict(nav_binning=0), ParameterError, "`nav_binning` must be >= 1"),
    (dict(nav_binning=(1, 2, 3)), ParameterError, "`nav_binning` must be an integer or a pair"),
    (dict(exclude_radius=-1), ParameterError, "`exclude_radius` must be >= 0"),
    (dict(maps=np.zeros((5, 5))), InputError, "`maps` must be 3-D"),
    (dict(patterns=np.zeros((3, 8, 8))), InputError, "`maps` has 2 segments but `patterns` has 3"),
    (dict(truth_patterns=np.zeros((1, 8, 8))), InputError, "`truth_masks` has 2 crystals"),
    (dict(maps=np.zeros((2, 4, 5))), InputError, "result scan size 4 along Y"),
])
def test_bad_input(kwargs, exc, match):
    args = dict(maps=np.zeros((2, 5, 5)), patterns=np.zeros((2, 8, 8)),
                truth_masks=np.zeros((2, 5, 5), bool), truth_patterns=np.zeros((2, 8, 8)))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        score_segmentation(args.pop("maps"), args.pop("patterns"), args.pop("truth_masks"),
                           args.pop("truth_patterns"), **args)


def test_a_result_scored_against_another_store_is_warned_about(tmp_path, caplog):
    """The result records the creation mark of the store it was made from; scoring it
    against another store (here one simulated with another seed) warns, against its own
    does not."""
    import logging

    import spedflow
    from spedflow.simulate import simulate
    kw = dict(scan=(24, 24), detector=32, crystals=3, progress=False)
    own, other = simulate(tmp_path / "a.zarr", seed=0, **kw), simulate(tmp_path / "b.zarr", seed=5, **kw)
    result = spedflow.segment(own, method="vdf", out=tmp_path / "r.zarr", local=True, progress=False)
    with caplog.at_level(logging.WARNING, logger="spedflow"):
        evaluate(result, own)
        assert not [r for r in caplog.records if "another store" in r.getMessage()]
        evaluate(result, other)
    assert [r for r in caplog.records if "another store" in r.getMessage()]
