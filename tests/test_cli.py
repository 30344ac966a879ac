"""The command line: every user mistake is one line on stderr, exit code 2, no
traceback, and nothing that existed before is modified."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster_utils import child_start
from spedflow.cli import build_parser, main
from spedflow.interop import from_array


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


@pytest.fixture(scope="module")
def files(tmp_path_factory, sim_store):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    good = rng.poisson(2.0, (4, 4, 16, 16)).astype(np.uint16)
    np.save(d / "good.npy", good)
    np.save(d / "empty.npy", np.zeros((0, 4, 16, 16), np.uint16))
    np.save(d / "obj.npy", np.array([_Exploit()], dtype=object), allow_pickle=True)
    (d / "raw.bin").write_bytes(good.tobytes()[:-10])
    (d / "notes.xyz").write_text("not data")
    from_array(np.zeros((8, 8, 16, 16), np.uint16), d / "zeros.zarr", progress=False)
    nan = rng.random((8, 8, 16, 16)).astype(np.float32)
    nan[3, 3, 2, 2] = np.nan
    from_array(nan, d / "nan.zarr", progress=False)
    # counts above 32767 stored as int16 wrap to large negative values
    from_array((good.astype(np.int32) * 9000 + 2000).astype(np.int16), d / "wrapped.zarr",
               progress=False)
    import zarr
    zarr.open_group(str(d / "nodata.zarr"), mode="w")
    (d / "exists.zarr").mkdir()
    (d / "exists.zarr" / "keep.txt").write_text("precious")
    (d / "bad.toml").write_text("[peaks]\nthreshold = \n")
    (d / "unknown.toml").write_text("[peaks]\nthreshhold = 3\n")
    (d / "unknown_section.toml").write_text("[peak]\nthreshold = 3\n")
    (d / "binary.toml").write_bytes(bytes(range(256)))
    from_array(good, d / "damaged.zarr", progress=False)
    from_array(good[:2, :2], d / "two_by_two.zarr", progress=False)
    chunk = next(p for p in sorted((d / "damaged.zarr" / "data").rglob("*")) if p.is_file()
                 and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: the chunk's CRC32C no longer matches
    chunk.write_bytes(bytes(raw))
    return d, Path(sim_store)


CASES = [
    # (id, argv template, expected message fragment)
    ("ingest-missing", ["ingest", "{d}/nope.npy", "{d}/o1.zarr"], "does not exist"),
    ("ingest-unknown-format", ["ingest", "{d}/notes.xyz", "{d}/o2.zarr"], "xyz"),
    ("ingest-empty", ["ingest", "{d}/empty.npy", "{d}/o3.zarr"], "empty"),
    ("ingest-pickle", ["ingest", "{d}/obj.npy", "{d}/o4.zarr"], "only integer or float"),
    ("ingest-raw-no-shape", ["ingest", "{d}/raw.bin", "{d}/o5.zarr", "--dtype", "uint16"],
     "needs `--shape` and `--dtype`: the array's shape"),  # the CLI's words
    ("ingest-raw-size-mismatch", ["ingest", "{d}/raw.bin", "{d}/o6.zarr", "--shape", "4,4,16,16",
                                  "--dtype", "uint16"], "bytes"),
    ("ingest-dest-exists", ["ingest", "{d}/good.npy", "{d}/exists.zarr"], "exists"),
    ("ingest-bad-shape-arg", ["ingest", "{d}/raw.bin", "{d}/o7.zarr", "--shape", "4,a"], "integers"),
    ("simulate-dest-exists", ["simulate", "{d}/exists.zarr", "--scan", "8"], "exists"),
    ("simulate-bad-scan", ["simulate", "{d}/o8.zarr", "--scan", "0"], "positive"),
    ("info-missing", ["info", "{d}/nope.zarr"], "does not exist"),
    ("segment-missing-store", ["segment", "{d}/nope.zarr", "--out", "{d}/r1.zarr"], "does not exist"),
    ("segment-raw-file", ["segment", "{d}/good.npy", "--out", "{d}/r0.zarr"], "spedflow ingest"),
    ("segment-no-data-array", ["segment", "{d}/nodata.zarr", "--out", "{d}/r2.zarr"], "no array"),
    ("segment-all-zero", ["segment", "{d}/zeros.zarr", "--out", "{d}/r3.zarr"], "only zeros"),
    ("segment-nan", ["segment", "{d}/nan.zarr", "--out", "{d}/r4.zarr"], "NaN or infinite values in some patterns"),
    ("segment-wrapped-int16", ["segment", "{d}/wrapped.zarr", "--out", "{d}/r4b.zarr"],
     "signed type wrapped"),
    ("segment-result-exists", ["segment", "{s}", "--out", "{d}/exists.zarr"], "exists"),
    ("segment-config-missing", ["segment", "{s}", "--out", "{d}/r5.zarr", "--config", "{d}/no.toml"],
     "does not exist"),
    ("segment-config-not-toml", ["segment", "{s}", "--out", "{d}/r6.zarr", "--config", "{d}/bad.toml"],
     "not valid TOML"),
    ("segment-config-unknown-key", ["segment", "{s}", "--out", "{d}/r7.zarr", "--config",
                                    "{d}/unknown.toml"], "threshhold"),
    ("segment-config-unknown-section", ["segment", "{s}", "--out", "{d}/r8.zarr", "--config",
                                        "{d}/unknown_section.toml"], "peak"),
    ("segment-set-negative-binning", ["segment", "{s}", "--out", "{d}/r9.zarr", "--set",
                                      "preprocess.nav_binning=-1"], "nav_binning"),
    ("segment-set-malformed", ["segment", "{s}", "--out", "{d}/r10.zarr", "--set", "binning=2"],
     "SECTION.KEY=VALUE"),
    ("segment-set-negative-sigma", ["segment", "{s}", "--out", "{d}/r11.zarr", "--set",
                                    "preprocess.dog_sigma_low=-1"], "dog_sigma_low"),
    ("segment-bad-method", ["segment", "{s}", "--out", "{d}/r12.zarr", "--method", "pca"], "method"),
    ("segment-binning-not-dividing", ["segment", "{s}", "--out", "{d}/r13.zarr", "--set",
                                      "preprocess.nav_binning=5", "--no-cluster"],
     "factors that do and leave 8 x 8 positions or more: 2, 3, 4, 6; or crop the scan"),
    ("segment-detector-binning-not-dividing", ["segment", "{s}", "--out", "{d}/r13b.zarr", "--set",
                                               "preprocess.detector_binning=5", "--no-cluster"],
     "does not divide the detector shape (64, 64); factors that do and leave 32 px or more "
     "a side: 2"),
    ("segment-binning-beyond-the-scan", ["segment", "{s}", "--out", "{d}/r13d.zarr", "--set",
                                         "preprocess.nav_binning=60", "--no-cluster"],
     "larger than the scan (48, 48): binned, no scan position would be left"),
    ("segment-detector-binned-too-far", ["segment", "{s}", "--out", "{d}/r13c.zarr", "--set",
                                         "preprocess.detector_binning=4", "--no-cluster"],
     "16 x 16 px patterns"),
    ("segment-nmf-too-many-components", ["segment", "{s}", "--method", "nmf", "--out", "{d}/r14.zarr",
                                         "--set", "nmf.n_components=100000", "--no-cluster"],
     "n_components"),
    ("segment-result-is-the-input", ["segment", "{s}", "--out", "{s}", "--overwrite"], "must not be"),
    ("segment-result-inside-the-input", ["segment", "{s}", "--out", "{s}/r.zarr"], "must not be"),
    ("segment-overwrite-a-folder", ["segment", "{s}", "--out", "{d}/exists.zarr", "--overwrite"],
     "not a spedflow result store"),
    ("segment-overwrite-the-working-folder", ["segment", "{s}", "--out", ".", "--overwrite"],
     "not a spedflow result store"),
    ("segment-overwrite-an-input-store", ["segment", "{s}", "--out", "{d}/zeros.zarr", "--overwrite"],
     "not a spedflow result store"),
    ("segment-set-value-apart", ["segment", "{s}", "--out", "{d}/r25.zarr", "--set", "vdf.radius", "2"],
     "unrecognized arguments: 2 (see `spedflow segment --help`)"),
    ("ingest-scan-step-not-a-length", ["ingest", "{d}/good.npy", "{d}/o9.zarr", "--scan-step", "3.03:1/A"],
     "`--scan-step` units '1/A' are not a length"),
    ("ingest-reciprocal-scale-not-a-number", ["ingest", "{d}/good.npy", "{d}/o10.zarr",
                                              "--reciprocal-scale", "x:1/A"], "like 0.03246:1/A"),
    ("evaluate-an-input-store", ["evaluate", "{s}"], "is an input store, not a result"),
    # the user's own words and paths are quoted as given, not taken for options
    ("segment-set-without-section", ["segment", "{s}", "--out", "{d}/r26.zarr", "--set", "method=nmf"],
     "--set expects SECTION.KEY=VALUE, got 'method=nmf'"),
    ("segment-missing-store-with-key-value-path", ["segment", "{d}/method=vdf/x.zarr", "--out",
                                                   "{d}/r27.zarr"], "method=vdf/x.zarr' does not exist"),
    ("simulate-dest-exists-hint", ["simulate", "{d}/exists.zarr", "--scan", "8"], "overwrite=True in Python"),
    ("segment-disc-wider-than-detector", ["segment", "{s}", "--out", "{d}/r15.zarr", "--set",
                                          "vdf.radius=500", "--no-cluster"], "vdf.radius"),
    ("segment-infinite-radius", ["segment", "{s}", "--out", "{d}/r16.zarr", "--set", "vdf.radius=inf",
                                 "--no-cluster"], "finite"),
    ("segment-marker-wider-than-scan", ["segment", "{s}", "--out", "{d}/r17.zarr", "--set",
                                        "watershed.marker_radius=1000", "--no-cluster"], "marker_radius"),
    ("segment-min-patterns-above-scan", ["segment", "{s}", "--out", "{d}/r18.zarr", "--set",
                                         "vectors.min_patterns=100000", "--no-cluster"], "min_patterns"),
    ("segment-nmf-beam-mask-wider-than-detector", ["segment", "{s}", "--method", "nmf", "--out",
                                                  "{d}/r24.zarr", "--set", "nmf.beam_mask_radius=500",
                                                  "--no-cluster"], "nmf.beam_mask_radius"),
    ("segment-min-size-above-scan", ["segment", "{s}", "--out", "{d}/r22.zarr", "--set",
                                     "watershed.min_size=100000", "--no-cluster"], "watershed.min_size"),
    ("segment-scan-too-small-for-the-noise", ["segment", "{d}/two_by_two.zarr", "--out", "{d}/r23.zarr",
                                              "--no-cluster"], "peaks.gain and peaks.read_variance"),
    ("segment-two-problems-named-together",
     ["segment", "{s}", "--out", "{d}/r21.zarr", "--set", "vectors.min_patterns=100000", "--set",
      "watershed.marker_radius=1000", "--no-cluster"], "(its larger side); `vectors.min_patterns`"),
    ("segment-config-binary", ["segment", "{s}", "--out", "{d}/r19.zarr", "--config", "{d}/binary.toml"],
     "not a text"),
    ("simulate-overwrite-a-folder", ["simulate", "{d}/exists.zarr", "--scan", "8", "--overwrite"],
     "not a spedflow input store"),
    ("segment-damaged-chunk", ["segment", "{d}/damaged.zarr", "--out", "{d}/r20.zarr", "--no-cluster"],
     "damaged"),
    ("evaluate-no-truth", ["evaluate", "{d}/r-none.zarr", "{d}/zeros.zarr"], "does not exist"),
    ("params-bad-method", ["params", "kmeans"], "invalid choice"),
    ("report-missing", ["report", "{d}/nope.zarr", "--out", "{d}/rep"], "does not exist"),
    ("fetch-unknown", ["fetch", "no_such_data"], "unknown data set"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_error(case, files, capsys, monkeypatch):
    d, s = files
    monkeypatch.chdir(d)
    _, argv, fragment = case
    argv = [a.format(d=d, s=s) for a in argv]
    before = _tree_hash(d), _tree_hash(s)
    code = _run(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("spedflow: error:"), err
    assert fragment.lower() in lines[0].lower(), err
    assert "Traceback" not in err
    assert (_tree_hash(d), _tree_hash(s)) == before, "an existing file changed"
    assert not (d / "pwned_by_pickle").exists()


def _run(argv) -> int:
    """main(), with argparse's own exits turned into return codes."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def test_help_of_every_command_shows_defaults(capsys):
    for cmd in ("ingest", "simulate", "info", "segment", "evaluate", "params", "report", "export",
                "fetch", "watch", "demo"):
        assert _run([cmd, "--help"]) == 0
        out = capsys.readouterr().out
        assert "usage: spedflow " + cmd in out
        if cmd in ("simulate", "segment", "demo"):
            assert "(default:" in out


def test_entry_point_runs_as_a_program():
    out = subprocess.run([sys.executable, "-m", "spedflow", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("spedflow ")


def test_params_prints_toml_that_loads_back(tmp_path, capsys):
    import tomllib

    from spedflow.api import load_config
    for method in ("vdf", "nmf"):
        assert main(["params", method]) == 0
        text = capsys.readouterr().out
        (tmp_path / f"{method}.toml").write_text(text)
        data = tomllib.loads(text)
        assert "preprocess" in data
        cfg = load_config(method, tmp_path / f"{method}.toml")
        assert cfg == load_config(method)
        # parameters derived from the data are named, commented out, in their section
        watershed = text[text.index("[watershed]"):].split("\n\n")[0]
        assert "# smooth = (derived from the data" in watershed
        assert "# beam_radius = (derived" in text[text.index("[preprocess]"):].split("\n\n")[0]


@pytest.mark.parametrize("verbose, quiet, level", [(0, 0, logging.WARNING), (1, 0, logging.INFO),
                                                   (2, 0, logging.DEBUG), (0, 1, logging.WARNING),
                                                   (0, 2, logging.ERROR)])
def test_quiet_keeps_warnings_about_the_data(verbose, quiet, level):
    """-q drops progress, not warnings (a clipped beam must show in a scripted run);
    -qq drops the warnings too."""
    from spedflow.cli import _setup_logging
    root = logging.getLogger()
    saved = root.level, [h.level for h in root.handlers]
    try:
        _setup_logging(verbose, quiet)
        assert logging.getLogger("spedflow").getEffectiveLevel() == level
        assert all(h.level == level for h in root.handlers)
    finally:
        root.setLevel(saved[0])
        for h, lv in zip(root.handlers, saved[1]):
            h.setLevel(lv)
    args = build_parser().parse_args(["info", "x.zarr"] + (["-" + "q" * quiet] if quiet else []))
    assert args.quiet == quiet


@pytest.mark.parametrize("flags", [["-q"], ["-qq"], ["-vv"]])
def test_quiet_is_for_that_command_only(sim_store, capsys, flags):
    """main(["...", "-q"]) called from Python (a notebook, a script) does not turn the
    progress bar off for the caller's later computations, nor change its logging, its
    warning filters and format, or dask's log level for distributed."""
    import warnings

    import dask

    from spedflow import cluster
    cluster.set_progress(True)
    root = logging.getLogger()

    def state():
        return (root.level, list(root.handlers), [h.level for h in root.handlers],
                [list(h.filters) for h in root.handlers], logging.getLogger("distributed").level, list(warnings.filters),
                warnings.formatwarning, dask.config.get("logging.distributed", None))

    before = state()
    assert main(["info", str(sim_store)] + flags) == 0
    assert state() == before
    assert cluster.progress_enabled()
    cluster.set_progress(False)
    try:
        assert main(["info", str(sim_store)]) == 0
        assert not cluster.progress_enabled()   # the caller's choice, kept
    finally:
        cluster.set_progress(True)


@pytest.mark.parametrize("argv, local", [
    ([], None),                                   # the API's rule: in-process under 1 GB
    (["--no-cluster"], True),
    (["--workers", "2"], False),                  # a local cluster's shape: start one
    (["--threads", "1"], False),
    (["--memory-limit", "1GB"], False),
])
def test_segment_runs_in_process_unless_a_cluster_is_asked_for(argv, local):
    """Without options the CLI leaves the choice to the API (in this process for data
    under 1 GB, as the README says); --workers/--threads/--memory-limit ask for a local
    cluster whatever the size; --no-cluster never starts one."""
    from spedflow.cli import _local, build_parser
    args = build_parser().parse_args(["segment", "s.zarr", "--out", "r.zarr", *argv])
    assert _local(args) is local


def test_segment_says_what_it_found(tmp_path, capsys):
    """The run's one line on stdout names the result and what it holds (the counts the
    result records), without -v."""
    import zarr

    from spedflow.simulate import simulate
    store = simulate(tmp_path / "tiny.zarr", scan=(16, 16), detector=32, crystals=3, seed=2,
                     progress=False)
    capsys.readouterr()
    out = tmp_path / "r.zarr"
    assert main(["segment", str(store), "--out", str(out), "--no-cluster", "-q"]) == 0
    counts = zarr.open_group(str(out), mode="r").attrs["spedflow"]["counts"]
    n = counts["segments"]
    assert capsys.readouterr().out == (f"wrote {out}: {n} crystal{'s' if n != 1 else ''} "
                                       f"(segments) from {counts['vectors']} diffraction vectors\n")
    # an NMF result's counts: its kept components
    from spedflow.cli import _found
    g = zarr.open_group(str(tmp_path / "nmf.zarr"), mode="w")
    g.attrs["spedflow"] = {"kind": "result", "method": "nmf",
                           "counts": {"segments": 1, "components": 9, "kept": 4}}
    assert _found(tmp_path / "nmf.zarr") == "1 crystal (segments) from 4 of 9 NMF components"
    # components the residual search added count among those it chose from
    g.attrs["spedflow"] = {"kind": "result", "method": "nmf",
                           "counts": {"segments": 2, "components": 1, "kept": 2,
                                      "residual_components": 1}}
    assert _found(tmp_path / "nmf.zarr") == ("2 crystals (segments) from 2 of 2 NMF components "
                                             "(1 from the residual search)")
    # a result of another form: nothing said, and no error after a written run
    for attrs in ({"kind": "result", "counts": "?"}, {"kind": "result"}, {}):
        g.attrs["spedflow"] = attrs
        assert _found(tmp_path / "nmf.zarr") == ""
    assert _found(tmp_path / "missing.zarr") == ""


@pytest.mark.parametrize("given, expected", [
    ("3.03", {"value": 3.03, "units": "nm"}),              # the API's default units
    ("3.03:nm", {"value": 3.03, "units": "nm"}),
    ("3.03nm", {"value": 3.03, "units": "nm"}),
    ("30.3 A", {"value": 30.3, "units": "A"}),
    ("1e1:pm", {"value": 10.0, "units": "pm"}),
])
def test_scan_step_takes_units_in_several_spellings(given, expected, tmp_path):
    import zarr
    np.save(tmp_path / "x.npy", np.ones((2, 3, 8, 8), np.uint16))
    assert main(["ingest", str(tmp_path / "x.npy"), str(tmp_path / "x.zarr"), "--scan-step", given,
                 "-q"]) == 0
    assert zarr.open_group(str(tmp_path / "x.zarr"), mode="r").attrs["spedflow"]["scan_step"] == expected


def test_simulate_takes_a_rectangular_detector_and_a_crystal_shape(tmp_path, capsys):
    """The CLI offers what the Python API does: a non-square detector and rod/sphere crystals."""
    import zarr
    store = tmp_path / "s.zarr"
    assert main(["simulate", str(store), "--scan", "8,12", "--detector", "16,24", "--crystals", "2",
                 "--shape", "rod", "-q"]) == 0
    g = zarr.open_group(str(store), mode="r")
    assert g["data"].shape == (8, 12, 16, 24)
    assert g.attrs["spedflow"]["simulation"]["params"]["shape"] == "rod"


def test_verbose_run_on_a_local_cluster_shows_spedflow_not_distributed(tmp_path, sim_store):
    """-v is spedflow's progress; distributed's own INFO (its start-up lines, and the
    traceback of the comms it closes at shutdown) only with -vv."""
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "spedflow", "segment", str(sim_store), "--out",
                          str(tmp_path / "r.zarr"), "-v", "--workers", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "stage beam_peaks done" in run.stderr
    assert "Scheduler at" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]


def _command_script(tmp_path):
    """A script named ``spedflow`` that runs the command, as pip's console script does
    (whose worker processes import it again, under the ``__main__`` guard)."""
    script = tmp_path / "spedflow"
    script.write_text("import sys\nfrom spedflow.cli import main\nif __name__ == '__main__':\n"
                      "    sys.exit(main())\n")
    return script


def _interrupt_group(proc) -> None:
    """Ctrl-C at a terminal: SIGINT to every process of the command's group."""
    import os
    import signal
    os.killpg(proc.pid, signal.SIGINT)


@pytest.mark.parametrize("command, line", [
    ("segment", "spedflow: interrupted; finished stages are kept and a rerun resumes"),
    ("ingest", "spedflow: interrupted; the chunks written are kept and a rerun resumes"),
    ("fetch", "spedflow: interrupted; the download and ingest done so far are kept and a rerun resumes"),
    ("simulate", "spedflow: interrupted"),
    ("info", "spedflow: interrupted"),
])
def test_an_interrupt_says_what_a_rerun_resumes_from(command, line, monkeypatch, capsys):
    """Each command's Ctrl-C line names what it keeps (in its own words), or nothing where
    a rerun starts afresh; exit status 130. (Called in-process: the command itself also
    ends its process at once, see the tests above.)"""
    from spedflow import cli

    def stopped(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli._COMMANDS, command, stopped)
    args = argparse.Namespace(command=command, verbose=0)
    assert cli._dispatch(args) == 130
    assert capsys.readouterr().err == line + "\n"


def _interrupt_at_first_bar(proc, timeout: float) -> str:
    """Ctrl-C once the command's first progress bar is drawn (its tasks are running);
    return everything it wrote on stderr."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "patterns/s" in line or "tasks/s" in line:
            break
    _interrupt_group(proc)
    _, rest = proc.communicate(timeout=timeout)
    return "".join(lines) + rest


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
@pytest.mark.parametrize("how", ["script", "-m"])
def test_ctrl_c_while_the_command_imports_is_one_line(tmp_path, sim_store, how):
    """Ctrl-C in the command's first second (numpy, scipy, dask imports, before main()
    runs): one line, no traceback, and the process ends by the interrupt."""
    import subprocess
    import time
    cmd = ([sys.executable, str(_command_script(tmp_path))] if how == "script"
           else [sys.executable, "-m", "spedflow"])
    proc = subprocess.Popen(cmd + ["info", str(sim_store)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=child_start)
    time.sleep(0.2)  # python itself is up; spedflow's imports are not done
    _interrupt_group(proc)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # the machine imported everything in 0.2 s: nothing to check
        pytest.skip("the command finished before the interrupt")
    assert proc.returncode in (130, -2), err
    assert err == "spedflow: interrupted\n" or err.startswith("spedflow: interrupted"), err
    assert "Traceback" not in err, err


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
def test_ctrl_c_during_a_local_cluster_run_is_one_line(tmp_path, sim_store):
    """Ctrl-C once a local cluster runs the workflow: the workers (which get the
    terminal's SIGINT too) leave it to the command, which closes them and says one
    line; no worker traceback or cancelled-task warnings."""
    import subprocess
    proc = subprocess.Popen([sys.executable, str(_command_script(tmp_path)), "segment", str(sim_store),
                             "--out", str(tmp_path / "r.zarr"), "--workers", "2", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=child_start)
    err = _interrupt_at_first_bar(proc, timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt")
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "CancelledError" not in err, err[-3000:]
    assert err.rstrip().endswith("spedflow: interrupted; finished stages are kept and a rerun resumes"), err[-3000:]


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
def test_ctrl_c_does_not_wait_for_work_still_running_in_threads(tmp_path, sim_store):
    """An in-process run (--no-cluster) interrupted while its threads still work (a
    chunk's kernels, numba compiling them on a first run) ends at once: Python's own
    exit waits for every thread, which held the command long after "interrupted". Here
    the command's process also runs a thread that would hold it for 10 minutes."""
    import subprocess
    script = tmp_path / "spedflow"
    script.write_text("import sys, threading, time\nfrom spedflow.cli import main\n"
                      "if __name__ == '__main__':\n"
                      "    threading.Thread(target=time.sleep, args=(600,)).start()\n"
                      "    sys.exit(main())\n")
    proc = subprocess.Popen([sys.executable, str(script), "segment", str(sim_store), "--out",
                             str(tmp_path / "r.zarr"), "--no-cluster"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=child_start)
    try:
        err = _interrupt_at_first_bar(proc, timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the interrupted command waited for its threads")
    assert proc.returncode == 130, err[-3000:]
    assert err.rstrip().endswith("spedflow: interrupted; finished stages are kept and a rerun resumes"), err[-3000:]
    assert not (tmp_path / "r.zarr").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
def test_ctrl_c_that_python_drops_still_ends_the_command(tmp_path):
    """A KeyboardInterrupt raised where Python drops it (in a finaliser, a callback: here
    a loop that swallows it) left the command running to the end; the first Ctrl-C
    also starts a watchdog that ends the command with status 130 after a grace time."""
    import subprocess
    import time
    script = tmp_path / "spedflow"
    script.write_text("import sys, time\nimport spedflow._interrupt as I\n"
                      "from spedflow.cli import _interrupt_line\n"
                      "if __name__ == '__main__':\n"
                      "    I._GRACE = 1.0\n"
                      "    I.set_interrupt_line(_interrupt_line('segment'))\n"
                      "    while True:\n"
                      "        try:  # 'ready' inside: the interrupt lands where it is dropped\n"
                      "            print('ready', flush=True)\n"
                      "            time.sleep(100)\n"
                      "        except KeyboardInterrupt:  # dropped, as in a __del__\n"
                      "            pass\n")
    proc = subprocess.Popen([sys.executable, str(script), "segment"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=child_start)
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    _interrupt_group(proc)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the dropped interrupt left the command running")
    assert proc.returncode == 130 and 1.0 <= time.monotonic() - t0 < 30
    assert err.strip().endswith("spedflow: interrupted; finished stages are kept and a rerun "
                                "resumes")


@pytest.mark.parametrize("argv, orig, expected", [
    (["/venv/bin/spedflow", "segment"], ["/venv/bin/python", "/venv/bin/spedflow", "segment"], True),
    (["-m", "segment"], ["python", "-m", "spedflow", "segment"], True),       # while importing
    (["/src/spedflow/__main__.py", "segment"], ["python", "-X", "dev", "-m", "spedflow"], True),
    (["-m"], ["python", "-mspedflow"], True),
    (["-m"], ["python", "-X", "importtime", "-W", "error", "-B", "-m", "spedflow"], True),
    (["-m"], ["python", "-X", "dev", "-m", "spedflowx"], False),
    (["-m"], ["python", "-m", "pytest"], False),
    (["notebook.py"], ["python", "notebook.py"], False),
    (["-c"], ["python", "-c", "import spedflow"], False),
    ([""], ["python"], False),                                               # the REPL
])
def test_is_command_tells_the_command_from_other_users_of_spedflow(argv, orig, expected):
    """Only the ``spedflow`` command (script or ``-m``) swaps the interrupt traceback for
    a line; a notebook or a script importing spedflow keeps Python's own."""
    from spedflow._interrupt import is_command
    assert is_command(argv, orig) is expected
