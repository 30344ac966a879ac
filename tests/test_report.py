"""The HTML report: every applicable figure, self-contained, escaped, tolerant of gaps."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from spedflow.errors import InputError
from spedflow.io import create_array

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures

def _spots(shape, centres, sigma=1.0):
    """(Ky, Kx) sum of Gaussian spots at absolute positions ``centres``."""
    yy, xx = np.indices(shape)
    out = np.zeros(shape, np.float32)
    for cy, cx in centres:
        out += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2)).astype(np.float32)
    return out


def _fake_scene(scan=(12, 14), k=(32, 32), seed=0):
    """Three crystals (two overlapping) with known spot sets; beam at (k//2, k//2)."""
    rng = np.random.default_rng(seed)
    ny, nx = scan
    yy, xx = np.indices(scan)
    masks = np.stack([
        (yy - 3.5) ** 2 + (xx - 4) ** 2 < 9,
        (yy - 7) ** 2 + (xx - 9) ** 2 < 12,
        (yy - 5) ** 2 + (xx - 6.5) ** 2 < 5,     # overlaps the first two
    ])
    c = (k[0] // 2, k[1] // 2)
    vec_sets = [[(-8, 0), (8, 0)], [(0, -9), (0, 9), (6, 6)], [(-6, -6), (6, -6)]]
    vectors = np.array([v for s in vec_sets for v in s], np.float32)
    membership = np.zeros((3, len(vectors)), bool)
    start = 0
    for i, s in enumerate(vec_sets):
        membership[i, start:start + len(s)] = True
        start += len(s)
    patterns = np.stack([_spots(k, [(c[0] + gy, c[1] + gx) for gy, gx in s]) for s in vec_sets])
    weights = masks * (0.5 + rng.random(masks.shape)).astype(np.float32)
    return masks, weights.astype(np.float32), patterns, vectors, membership


def make_fake_input(path, *, scan=(12, 14), k=(32, 32), binning=2, seed=0):
    """A small input store: raw data (unbinned, with a beam and a descan), plus truth/."""
    masks, weights, patterns, _, _ = _fake_scene(scan, k, seed)
    ny, nx = scan[0] * binning, scan[1] * binning
    beam = _spots(k, [(k[0] // 2, k[1] // 2)], sigma=1.5) * 20
    up = np.repeat(np.repeat(weights, binning, 1), binning, 2)      # (C, ny, nx)
    data = np.einsum("cyx,cab->yxab", up, patterns) + beam[None, None]
    g = zarr.open_group(str(path), mode="w")
    create_array(g, "data", data.shape, np.float32, chunks=(5, 7) + k)[...] = data.astype(np.float32)
    create_array(g, "truth/masks", (3,) + scan, bool)[...] = masks
    create_array(g, "truth/patterns", patterns.shape, np.float32)[...] = patterns
    create_array(g, "truth/groups", (3,), np.int32)[...] = np.arange(3)
    g.attrs["spedflow"] = {"kind": "input", "version": "test", "source": "fake",
                           "original_shape": list(data.shape), "original_dtype": "float32",
                           "scan_step": {"value": 3.0, "units": "nm"},
                           "reciprocal_scale": {"value": 0.03, "units": "1/Å"}, "complete": True}
    return path


def make_fake_result(path, method="vdf", *, scan=(12, 14), k=(32, 32), drop=(), attrs=None,
                     input_path=None, seed=0):
    """A result store following docs/DESIGN.md, small enough for fast tests.

    ``drop`` names arrays (e.g. ``"overview/annular_vdf"``) to leave out; ``attrs``
    updates the ``spedflow`` attrs.
    """
    masks, weights, patterns, vectors, membership = _fake_scene(scan, k, seed)
    s = masks.shape[0]
    ny, nx = scan
    g = zarr.open_group(str(path), mode="w")
    arrays = {
        "segments/maps": weights,
        "segments/patterns": patterns,
        "overview/annular_vdf": (weights.sum(0) + 0.1).astype(np.float32),
        "overview/mean_pattern": (patterns.mean(0) + _spots(k, [(k[0] // 2, k[1] // 2)], 1.5) * 5
                                  ).astype(np.float32),
        "beam/centres": np.stack(np.broadcast_arrays(
            k[0] // 2 + 0.3 * np.sin(np.arange(ny))[:, None] + np.zeros((1, nx)),
            k[1] // 2 + 0.02 * np.arange(nx)[None, :] + np.zeros((ny, 1))), -1).astype(np.float32),
    }
    arrays["beam/fitted"] = np.full((ny, nx, 2), k[0] // 2, np.float32)
    # each pattern's total: a beam current flickering from line to line
    arrays["overview/total_counts"] = np.repeat(
        1e4 * (1 + 0.1 * (-1.0) ** np.arange(ny))[:, None], nx, axis=1).astype(np.float32)
    if method == "vdf":
        peaks = []
        for (y, x) in np.argwhere(weights.max(0) > 0):
            for i in np.nonzero(masks[:, y, x])[0]:
                for gy, gx in vectors[membership[i]]:
                    peaks.append((y, x, gy + k[0] // 2, gx + k[1] // 2, weights[i, y, x]))
        arrays.update({
            "vectors": vectors,
            "peaks": np.array(peaks, np.float32),
            "vdf/images": np.einsum("cn,cyx->nyx", membership, weights).astype(np.float32),
            # (K, 2) rows (segment, vector) as the workflow writes them
            "vdf/segment_vectors": np.argwhere(membership).astype(np.int32),
            "vdf/segment_intensities": np.full(int(membership.sum()), 2.0, np.float32),
            "overview/peak_histogram": np.zeros(k, np.float32),
        })
        for y, x, py, px, _ in peaks:
            arrays["overview/peak_histogram"][int(round(py)), int(round(px))] += 1
        extra = {"resolved": {"beam_radius": 1.5, "vdf": {"radius": 2.0}},
                 "counts": {"patterns": ny * nx, "peaks": len(peaks), "vectors": len(vectors),
                            "segments": s}}
        params = {"preprocess": {"nav_binning": 2}, "peaks": {"threshold": 0.05},
                  "vdf": {"aperture_radius": 2.0}}
    else:
        e = 5
        factors = np.concatenate([patterns, np.ones((2,) + k, np.float32) * 0.1]).astype(np.float32)
        loadings = np.concatenate([weights, np.ones((2,) + scan, np.float32)]).astype(np.float32)
        evr = (0.5 ** np.arange(12)).astype(np.float32)
        evr /= evr.sum()
        arrays.update({"nmf/factors": factors, "nmf/loadings": loadings,
                       "scree/explained_variance_ratio": evr,
                       "segments/component": np.arange(s, dtype=np.int32)})
        extra = {"n_components": e, "n_components_reason": "largest gap in log variance after #4",
                 "components_set_aside": [
                     {"component": 3, "reason": "background: loading nearly uniform"},
                     {"component": 4, "reason": "amorphous film"}],
                 "merge_groups": [[0], [1, 5], [2]],
                 "resolved": {"beam_radius": 1.5, "beam_mask_radius": 3.0}}
        params = {"preprocess": {"nav_binning": 2}, "nmf": {"n_components": None,
                                                             "beam_radius": 3.0}}
    for name, a in arrays.items():
        if name in drop:
            continue
        create_array(g, name, a.shape, a.dtype)[...] = a
    cal = {"scan_step": {"value": 3.0, "units": "nm"},
           "reciprocal_scale": {"value": 0.03, "units": "1/Å"}}
    meta = {"kind": "result", "method": method, "nav_binning": 2, "params": params,
            "version": "0.0-test", "input": str(input_path) if input_path else "/nonexistent.zarr",
            "input_meta": {"kind": "input", **cal}, **cal,
            "timings": {"preprocess": 1.5, "peaks": 2.25, "segment": 0.5}, **extra}
    meta.update(attrs or {})
    g.attrs["spedflow"] = meta
    return path


# --------------------------------------------------------------------------- helpers

_IMG_SRC = re.compile(r"<img[^>]*\bsrc=['\"]([^'\"]*)['\"]", re.I)


def _check_self_contained(text: str) -> list[bytes]:
    assert not re.search(r"\b(src|href)\s*=\s*['\"]?\s*(https?:|file:|//)", text, re.I)
    assert "<script" not in text.lower()
    assert "<link" not in text.lower()
    pngs = []
    for src in _IMG_SRC.findall(text):
        assert src.startswith("data:image/png;base64,"), src[:40]
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw.startswith(b"\x89PNG\r\n\x1a\n") and len(raw) > 100
        pngs.append(raw)
    return pngs


def _decode_png(raw: bytes) -> np.ndarray:
    import io
    from matplotlib.image import imread
    return imread(io.BytesIO(raw), format="png")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The VDF (with its input store: difference patterns) and NMF reports, made once."""
    from spedflow.report import write_report
    base = tmp_path_factory.mktemp("reports")
    inp = make_fake_input(base / "in.zarr")
    out = {}
    for method in ("vdf", "nmf"):
        res = make_fake_result(base / f"{method}.zarr", method,
                               input_path=inp if method == "vdf" else None)
        html_path = write_report(res, base / f"rep_{method}")
        out[method] = (html_path.parent, html_path.read_text())
    return out


@pytest.fixture
def fast_png(monkeypatch):
    """Build every figure but skip rasterising it (tests of which figures are made)."""
    import io
    from matplotlib.image import imsave
    from spedflow.report import _figures
    buf = io.BytesIO()
    imsave(buf, np.eye(8), format="png")
    tiny = buf.getvalue()
    monkeypatch.setattr(_figures, "figure_png", lambda fig, dpi=100: tiny)


# --------------------------------------------------------------------------- tests

VDF_FIGS = {"overview", "segments", "vectors", "beam", "dose"}
NMF_FIGS = {"overview", "scree", "nmf_components", "segments", "beam", "dose"}


@pytest.mark.parametrize("method,expected", [("vdf", VDF_FIGS | {"differences"}),
                                             ("nmf", NMF_FIGS)])
def test_report_writes_every_applicable_figure(rendered, method, expected):
    out, text = rendered[method]
    written = {p.stem for p in out.glob("*.png")}
    assert written == expected
    pngs = _check_self_contained(text)
    # every figure plus one thumbnail per segment
    assert len(pngs) == len(expected) + 3
    for raw in pngs:
        img = _decode_png(raw)
        assert img.ndim == 3 and img.shape[0] > 5
    for f in expected:
        assert f"id='{f}'" in text
    # counts, timings and parameters are in the page
    assert "segments" in text and "preprocess" in text and "2.25" in text
    if method == "nmf":
        assert "amorphous film" in text and "largest gap" in text
        assert "#1 + #5" in text and "from component" in text
    else:
        assert "unique vectors" in text and "1/Å" in text


@pytest.mark.parametrize("method", ["vdf", "nmf"])
def test_figures_are_not_blank(rendered, method):
    out, _ = rendered[method]
    for png in out.glob("*.png"):
        img = _decode_png(png.read_bytes())[..., :3]
        assert img.std() > 0.05, png.name  # not a uniform canvas


def test_difference_patterns_default_to_recorded_input(tmp_path, fast_png):
    from spedflow.report import write_report
    inp = make_fake_input(tmp_path / "in.zarr")
    res = make_fake_result(tmp_path / "r.zarr", "nmf", input_path=inp)
    write_report(res, tmp_path / "rep")       # store_path from the result's attrs
    assert (tmp_path / "rep" / "differences.png").exists()


def test_data_patterns_at_matches_manual_binning(tmp_path):
    """The few data patterns read for the differences equal a brute-force bin + shift."""
    from scipy import ndimage
    from spedflow.report._differences import data_patterns_at
    from spedflow.report._load import load_result
    inp = make_fake_input(tmp_path / "in.zarr")
    res = make_fake_result(tmp_path / "r.zarr", "vdf", input_path=inp)
    v = load_result(res)
    data = zarr.open_group(str(inp), mode="r")["data"]
    full = np.asarray(data[...], np.float64)
    pos = np.array([[0, 0], [5, 6], [11, 13]])
    got = data_patterns_at(v, data, pos)
    for i, (y, x) in enumerate(pos):
        p = full[2 * y:2 * y + 2, 2 * x:2 * x + 2].sum(axis=(0, 1))
        cy, cx = v.beam_fitted[y, x]
        want = ndimage.shift(p, (16 - cy, 16 - cx), order=1, mode="constant")
        np.testing.assert_allclose(got[i], want, rtol=1e-6)


@pytest.mark.parametrize("form", ["table", "matrix", "labels"])
def test_membership_forms_agree(form):
    from spedflow.report._html import _membership, _vector_counts
    from spedflow.report._load import ResultView
    _, weights, patterns, vectors, mem = _fake_scene()
    stored = {"table": np.argwhere(mem).astype(np.int32), "matrix": mem,
              "labels": mem.argmax(axis=0).astype(np.int64)}[form]
    v = ResultView(path=Path("x"), meta={}, method="vdf", maps=weights, patterns=patterns,
                   vectors=vectors, segment_vectors=stored)
    np.testing.assert_array_equal(_membership(v), mem)
    np.testing.assert_array_equal(_vector_counts(v), mem.sum(axis=1))


def test_beam_radius_from_profile():
    from spedflow.report._differences import beam_radius
    yy, xx = np.indices((64, 64))
    disc = np.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / (2 * 3.0 ** 2))[None]
    r = beam_radius(disc)
    hwhm = 3.0 * np.sqrt(2 * np.log(2))
    assert 2 * hwhm - 1 <= r <= 2 * hwhm + 2
    assert beam_radius(disc, {"nmf": {"beam_radius": 12}}) == 12
    assert beam_radius(disc, {"nmf": {"beam_radius": 100}}) == 16  # quarter of the detector


def test_attr_strings_are_escaped(tmp_path, fast_png):
    from spedflow.report import write_report
    evil = "<script>alert(1)</script>"
    res = make_fake_result(
        tmp_path / "r.zarr", "nmf",
        attrs={"version": evil, "input": evil, "n_components_reason": evil,
               "components_set_aside": {"3": evil}, "params": {evil: evil, "a": {"b": evil}},
               "timings": {evil: 1.0}, "evaluation": {evil: 0.5, "f1": evil}})
    text = write_report(res, tmp_path / "rep").read_text()
    assert "<script" not in text.lower()
    assert "&lt;script&gt;" in text
    _check_self_contained(text)


def test_evaluation_attrs_are_shown(tmp_path, fast_png):
    from spedflow.report import write_report
    res = make_fake_result(tmp_path / "r.zarr", "vdf",
                           attrs={"evaluation": {"recall": 0.75, "precision": 1.0,
                                                 "per_crystal": {"c0": 0.9}}})
    text = write_report(res, tmp_path / "rep").read_text()
    assert "Evaluation" in text and "recall" in text and "0.75" in text and "per_crystal.c0" in text


@pytest.mark.parametrize("method,drop,missing", [
    ("vdf", ("overview/annular_vdf",), set()),                 # falls back to the maps
    ("vdf", ("beam/centres",), {"beam"}),
    ("vdf", ("overview/total_counts",), {"dose"}),              # a result before 0.28
    ("vdf", ("vectors", "peaks", "overview/peak_histogram"), {"vectors"}),
    ("vdf", ("overview/peak_histogram",), set()),               # histogram from the peaks
    ("vdf", ("segments/maps",), {"overview", "segments"}),
    ("vdf", ("segments/patterns", "vdf/segment_vectors"), {"segments"}),
    ("nmf", ("scree/explained_variance_ratio",), {"scree"}),
    ("nmf", ("nmf/factors", "nmf/loadings"), {"nmf_components"}),
    ("nmf", ("nmf/loadings", "beam/fitted"), set()),            # patterns only; no residual
])
def test_missing_optional_arrays_skip_figures(tmp_path, fast_png, method, drop, missing):
    from spedflow.report import write_report
    res = make_fake_result(tmp_path / "r.zarr", method, drop=drop)
    text = write_report(res, tmp_path / "rep").read_text()
    written = {p.stem for p in (tmp_path / "rep").glob("*.png")}
    expected = (VDF_FIGS if method == "vdf" else NMF_FIGS) - missing
    assert written == expected
    _check_self_contained(text)
    if missing:
        assert "skipped" in text


def test_malformed_array_is_a_note_not_an_error(tmp_path, fast_png):
    from spedflow.report import write_report
    res = make_fake_result(tmp_path / "r.zarr", "vdf", drop=("beam/centres",))
    g = zarr.open_group(str(res), mode="a")
    create_array(g, "beam/centres", (4,), np.float32)  # wrong dimensionality
    text = write_report(res, tmp_path / "rep").read_text()
    assert "beam/centres has shape (4,)" in text


def _corrupt_first_chunk(array_dir):
    chunk = next(p for p in sorted(array_dir.rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"garbage")


@pytest.mark.parametrize("damage,match", [
    ("drop_patterns", "segments/patterns is missing"),
    ("corrupt_maps", "segments/maps could not be read"),
    ("malformed_optional", "beam/centres has shape"),
    ("corrupt_peaks", "peaks could not be read"),       # read for the peak histogram
    ("peaks_group", "peaks has shape"),
])
def test_strict_report_of_a_damaged_result_raises_after_writing(tmp_path, fast_png, damage, match):
    from spedflow.report import write_report
    drop = {"drop_patterns": ("segments/patterns",), "malformed_optional": ("beam/centres",),
            "corrupt_peaks": ("overview/peak_histogram",), "peaks_group": ("peaks",)}
    res = make_fake_result(tmp_path / "r.zarr", "vdf", drop=drop.get(damage, ()))
    if damage == "corrupt_maps":
        _corrupt_first_chunk(res / "segments" / "maps")
    if damage == "corrupt_peaks":
        _corrupt_first_chunk(res / "peaks")
    if damage == "peaks_group":
        zarr.open_group(str(res), mode="a").create_group("peaks")
    if damage == "malformed_optional":
        create_array(zarr.open_group(str(res), mode="a"), "beam/centres", (4,), np.float32)
    # not strict (the API's default): a note in the page, no error
    assert "report.html" in str(write_report(res, tmp_path / "lenient"))
    with pytest.raises(InputError, match=match) as info:
        write_report(res, tmp_path / "rep", strict=True)
    assert (tmp_path / "rep" / "report.html").exists()  # written first: what could be read
    assert "report.html" in str(info.value) and "\n" not in str(info.value)


def test_strict_report_of_a_result_without_optional_arrays_passes(tmp_path, fast_png):
    from spedflow.report import write_report
    res = make_fake_result(tmp_path / "r.zarr", "vdf",
                           drop=("beam/centres", "vectors", "peaks", "overview/peak_histogram"))
    assert write_report(res, tmp_path / "rep", strict=True).exists()


def test_cli_report_of_a_damaged_result_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys
    res = make_fake_result(tmp_path / "r.zarr", "nmf")
    _corrupt_first_chunk(res / "segments" / "patterns")
    run = subprocess.run([sys.executable, "-m", "spedflow", "report", str(res), "--out",
                          str(tmp_path / "rep")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "segments/patterns could not be read" in lines[0], run.stderr
    assert (tmp_path / "rep" / "report.html").exists()


@pytest.mark.parametrize("setup,kwargs,exc,match", [
    ("none", {}, InputError, "does not exist"),
    ("input", {}, InputError, "not a spedflow result"),
    ("file_out", {}, InputError, "not a directory"),
    ("result", {"store_path": "/nonexistent/in.zarr"}, InputError, "store_path"),
])
def test_bad_inputs(tmp_path, setup, kwargs, exc, match):
    from spedflow.report import write_report
    path = tmp_path / "r.zarr"
    out = tmp_path / "rep"
    if setup == "input":
        make_fake_input(path)
    elif setup in ("file_out", "result"):
        make_fake_result(path)
    if setup == "file_out":
        out.write_text("x")
    with pytest.raises(exc, match=match):
        write_report(path, out, **kwargs)


def test_segment_colours_distinct_and_stable():
    from spedflow.report import segment_colours
    for n in (3, 10, 15, 40):
        c = segment_colours(n)
        assert c.shape == (n, 4)
        assert len({tuple(np.round(x, 3)) for x in c}) == n
    np.testing.assert_array_equal(segment_colours(40)[:25], segment_colours(60)[:25])


def test_report_does_not_touch_pyplot(rendered):
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt
        assert plt.get_fignums() == []


def _chromium():
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_screenshot_in_headless_chromium(rendered):
    out, _ = rendered["nmf"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "screenshot_report.py"),
         str(out / "report.html"), "--height", "2000"],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all images loaded" in proc.stdout
    shot = out / "report_screenshot.png"
    img = _decode_png(shot.read_bytes())
    assert img.shape[:2] == (2000, 1400) and img[..., :3].std() > 0.02


def test_dollar_signs_in_store_strings_do_not_reach_mathtext():
    from spedflow.report._figures import fig_nmf_components, fig_scree, figure_png
    from spedflow.report._load import Calibration
    evil = "costs $5 and $\\frac{x}{$ unbalanced"
    fig_png = figure_png(fig_scree(np.array([0.5, 0.3, 0.2]), 2, evil))
    assert fig_png.startswith(b"\x89PNG")
    f = np.ones((2, 8, 8), np.float32)
    assert figure_png(fig_nmf_components(f, f, Calibration(), {1: evil})).startswith(b"\x89PNG")
    cal = Calibration(scan_step=2.0, scan_units="n$m", k_scale=0.1, k_units="1/$A")
    assert figure_png(fig_nmf_components(f, f, cal, {1: evil})).startswith(b"\x89PNG")


def test_subtract_radial_median_removes_symmetric_background_keeps_spots():
    from spedflow.report._differences import subtract_radial_median
    yy, xx = np.indices((33, 33))
    r = np.hypot(yy - 16, xx - 16)
    halo = 50 * np.exp(-r / 6)
    spots = _spots((33, 33), [(16, 26), (6, 16)], sigma=0.8) * 10
    got = subtract_radial_median((halo + spots)[None])[0]
    # brute-force reference: the median of each one-pixel ring
    ring = np.rint(r).astype(int)
    ref = halo + spots
    for k in np.unique(ring):
        ref[ring == k] -= np.median((halo + spots)[ring == k])
    np.testing.assert_allclose(got, np.clip(ref, 0, None), atol=1e-9)
    assert got[16, 26] > 9 and got[6, 16] > 9           # spots kept
    # the halo is gone up to its variation across one ring (< 10 % of its peak)
    away = (r > 3) & (spots < 1e-3)
    assert got[away].max() < 0.1 * halo.max() and got[away].mean() < 0.01 * halo.max()


def test_parameters_show_the_values_the_run_used(tmp_path, fast_png):
    """A parameter left to the data reads "auto" as set and its resolved value as used;
    the quantities measured on the data are listed too."""
    import re
    from spedflow.report import write_report
    res = make_fake_result(tmp_path / "r.zarr", "vdf", attrs={
        "params": {"preprocess": {"nav_binning": 2}, "peaks": {"num_sigma": 2}},
        "resolved": {"beam_radius": 2.978, "gain": 7.25,
                     "preprocess": {"nav_binning": 2, "dog_sigma_low": 1.489},
                     "peaks": {"num_sigma": 2, "threshold": 4.988, "gain": None}}})
    text = write_report(res, tmp_path / "rep").read_text()
    rows = {m[0]: m[1:] for m in re.findall(
        r"<tr><td>([^<]+)</td><td[^>]*>([^<]*)</td><td[^>]*>([^<]*)</td></tr>", text)}
    assert rows["preprocess.dog_sigma_low"] == ("auto", "1.489")
    assert rows["peaks.threshold"] == ("auto", "4.988")
    assert rows["preprocess.nav_binning"] == ("2", "2")
    assert rows["measured: beam_radius"][1] == "2.978"
    assert rows["measured: gain"][1] == "7.25"
    assert rows["peaks.gain"] == ("auto", "7.25")  # measured, recorded at the top


def test_a_long_title_fits_a_one_segment_figure():
    """A one-segment grid is about two inches wide: its title is wrapped to fit, not cut
    at both ends (a line scan's report showed "nt maps (top) and patterns (b")."""
    from spedflow.report._figures import fig_segments, figure_png
    from spedflow.report._load import Calibration
    fig = fig_segments(np.ones((1, 1, 48)), np.ones((1, 64, 64)), Calibration(),
                       title="VDF segments: segment maps (top) and patterns (bottom)")
    figure_png(fig)  # lays the figure out
    box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width, (box, fig.bbox.width)
    assert "\n" in fig._suptitle.get_text()
