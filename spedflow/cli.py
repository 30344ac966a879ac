"""The ``spedflow`` command: parse, build parameters, call the library, exit code.

Every user mistake ends in one line on stderr and a non-zero exit code; ``-v`` adds
the traceback for bug reports. Nothing here computes: each command calls one
function of the Python API.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import re
import sys
from pathlib import Path

from . import _version
from .errors import SpedflowError

log = logging.getLogger("spedflow")

EXIT_USER = 2      # the user's input was wrong
EXIT_INTERNAL = 3  # a bug in spedflow or a library
EXIT_INTERRUPT = 130


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 64,64,128,128, got {text!r}")
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {text!r}")
    return shape


def _scan(text: str) -> tuple[int, int]:
    s = _shape(text)
    if len(s) == 1:
        return (s[0], s[0])
    if len(s) != 2:
        raise argparse.ArgumentTypeError(f"expected N or NY,NX, got {text!r}")
    return s  # type: ignore[return-value]


def _calibration(example: str):
    """The argument type of a calibration, VALUE[:UNITS] (also ``VALUE UNITS`` or
    ``VALUEUNITS``, as in 3.03nm). A bare number is passed on as a number: the API's
    default units (nm for a scan step, 1/nm for a detector scale)."""
    from .config import CALIBRATION_TEXT

    def parse(text: str) -> tuple[float, str] | float:
        m = CALIBRATION_TEXT.fullmatch(text)
        if not m:
            raise argparse.ArgumentTypeError(f"expected VALUE[:UNITS] like {example}, got {text!r}")
        return (float(m.group(1)), m.group(2)) if m.group(2) else float(m.group(1))
    parse.__name__ = "calibration"  # argparse names the type in its message
    return parse


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message):
        self.exit(EXIT_USER, f"spedflow: error: {message} (see `{self.prog} --help`)\n")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, unless the help already says its default, or
    there is none to say (None, False, a count of 0)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False) or action.default == [] or \
                (isinstance(action, argparse._CountAction) and not action.default):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    fmt = _DefaultsFormatter
    p = _Parser(
        prog="spedflow", formatter_class=fmt,
        description="Out-of-core nanocrystal segmentation of scanning (precession) electron "
                    "diffraction data (Bergh et al. 2020): ingest -> segment -> report.")
    p.add_argument("--version", action="version", version=f"spedflow {_version.__version__}")
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug); tracebacks on error")
    g.add_argument("-q", "--quiet", action="count", default=0,
                   help="no progress bars or progress messages, only warnings about the data "
                        "and errors (-qq: errors only)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def add(name, help_):
        return sub.add_parser(name, help=help_, description=help_, parents=[common], formatter_class=fmt)

    p.command_parser = sub.choices.__getitem__  # the parser of one command, by name


    c = add("ingest", "Stream a 4-D data set (npy, raw, zarr, blo, mib, hspy, zspy, emd, fpd hdf5) into a chunked Zarr v3 store.")
    c.add_argument("src", help="source file or store")
    c.add_argument("dest", help="destination .zarr store")
    c.add_argument("--shape", type=_shape, help="Y,X,KY,KX for raw binary files")
    c.add_argument("--dtype", help="dtype of raw binary files, e.g. uint16 or >u2")
    c.add_argument("--offset", type=int, default=0, help="header bytes to skip in raw binary files")
    c.add_argument("--array", help="dataset / array name inside an HDF5 or Zarr source")
    c.add_argument("--scan", type=_scan, help="scan shape NY,NX (or N for N x N) of the patterns in order, row "
                   "by row; needed for a stack of patterns (N, KY, KX) (1,N for a line scan)")
    c.add_argument("--chunk-mb", type=float, default=16.0, help="target uncompressed chunk size in MB")
    c.add_argument("--shards", type=_shape, help="optional shard shape Y,X,KY,KX (multiples of the chunks)")
    c.add_argument("--scan-step", type=_calibration("3.03:nm"),
                   help="override the scan step, VALUE[:UNITS] e.g. 3.03:nm (nm if no units)")
    c.add_argument("--reciprocal-scale", type=_calibration("0.03246:1/A"),
                   help="override the detector calibration per pixel, VALUE[:UNITS] e.g. 0.03246:1/A "
                        "(1/nm if no units)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing destination")

    c = add("simulate", "Write a simulated SPED data set of overlapping nanocrystals with ground truth.")
    c.add_argument("dest", help="destination .zarr store")
    c.add_argument("--scan", type=_scan, default=(64, 64), help="scan size N or NY,NX")
    c.add_argument("--detector", type=_scan, default=(128, 128), help="detector size in pixels: N or NY,NX")
    c.add_argument("--crystals", type=_positive_int, default=10, help="number of crystals")
    c.add_argument("--shape", choices=("cube", "sphere", "rod", "mixed"), default="cube",
                   help="crystal shape (mixed: drawn per orientation)")
    c.add_argument("--seed", type=int, default=0, help="random seed")
    c.add_argument("--saturate-8bit", action="store_true", help="clip to 8 bits as on the ASTAR camera")
    c.add_argument("--dose", type=float, help="mean counts per pattern (default: the simulator's)")
    c.add_argument("--hot-pixels", type=int, default=0, metavar="N",
                   help="N hot detector pixels (4x the beam's peak in every pattern)")
    c.add_argument("--dead-pixels", type=int, default=0, metavar="N",
                   help="N dead detector pixels (0 in every pattern)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing destination")

    c = add("info", "Describe a store: shape, dtype, chunks, compression, calibration.")
    c.add_argument("path", help="input or result store")
    c.add_argument("--verify", action="store_true", help="re-read every chunk and check its checksum")

    c = add("segment", "Run a segmentation workflow on a store and write a result store.")
    c.add_argument("store", help="input store (from ingest or simulate)")
    c.add_argument("--method", choices=("vdf", "nmf"), default="vdf", help="workflow of Bergh et al. 2020")
    c.add_argument("--out", required=True, help="result .zarr store")
    c.add_argument("--config", help="TOML parameter file (see `spedflow params METHOD`)")
    c.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one parameter, e.g. --set preprocess.nav_binning=2 (repeatable)")
    c.add_argument("--cache", help="stage cache directory (default: OUT.cache beside the result)")
    c.add_argument("--scheduler", help="dask scheduler address tcp://HOST:PORT or tls://... (default: $SPEDFLOW_SCHEDULER, else a local cluster)")
    c.add_argument("--workers", type=_positive_int, help="local cluster: number of worker processes")
    c.add_argument("--threads", type=_positive_int, help="local cluster: threads per worker")
    c.add_argument("--memory-limit", help="local cluster: memory limit per worker, e.g. 2GB")
    c.add_argument("--no-cluster", action="store_true", help="run in this process with dask's threaded scheduler")
    c.add_argument("--tls-ca-file", help="CA certificate for a tls:// scheduler")
    c.add_argument("--tls-cert", help="client certificate for a tls:// scheduler")
    c.add_argument("--tls-key", help="client key for a tls:// scheduler")
    c.add_argument("--report", metavar="DIR", help="also write the HTML report into DIR")
    c.add_argument("--overwrite", action="store_true", help="replace an existing result")

    c = add("evaluate", "Score a result against the simulated truth stored in the input store.")
    c.add_argument("result", help="result store (from segment)")
    c.add_argument("store", nargs="?", default=None,
                   help="the simulated input store it was made from (holds truth/; default: the "
                        "input the result records)")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")

    c = add("params", "Print the default parameter file of a workflow (TOML).")
    c.add_argument("method", choices=("vdf", "nmf"), help="workflow")

    c = add("report", "Write PNG figures and one self-contained HTML page for a result.")
    c.add_argument("result", help="result store (from segment)")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--store", help="input store, for difference patterns and truth (default: the result's input)")

    c = add("export", "Export segment maps and patterns to npy, tiff and HyperSpy (.hspy) files.")
    c.add_argument("result", help="result store (from segment)")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--format", action="append", choices=("npy", "tiff", "hspy"),
                   help="formats to write (repeatable; default all)")

    c = add("fetch", "Download a public data set from the registry (checksum verified), then ingest it.")
    c.add_argument("name", nargs="?", help="data set name; omit to list the registry")
    c.add_argument("--dest", help="destination .zarr store (default NAME.zarr)")
    c.add_argument("--cache-dir", help="download directory (default: pooch's cache)")
    c.add_argument("--url", help="override the download URL (e.g. a mirror)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing destination store")

    c = add("demo", "Simulate a paper-like data set, run both workflows, score them and write the report.")
    c.add_argument("--out", default="spedflow-demo", help="output directory")
    c.add_argument("--scan", type=_scan, default=(64, 64), help="scan size N or NY,NX")
    c.add_argument("--detector", type=_positive_int, default=128, help="detector size in pixels")
    c.add_argument("--seed", type=int, default=0, help="random seed of the simulation")
    c.add_argument("--overwrite", action="store_true", help="replace an existing demo directory's results")

    c = add("watch", "Process a store that is still being written by an acquisition; finalise when complete.")
    c.add_argument("store", help="input store being written (data array created with its full shape)")
    c.add_argument("--method", choices=("vdf", "nmf"), default="vdf", help="workflow of Bergh et al. 2020")
    c.add_argument("--out", required=True, help="result store (.zarr)")
    c.add_argument("--config", help="TOML parameter file (see `spedflow params`)")
    c.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one parameter, as for segment (repeatable)")
    c.add_argument("--poll", type=float, default=1.0, help="seconds between looks at the store")
    c.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds without new data")
    c.add_argument("--overwrite", action="store_true", help="replace an existing result")
    return p


def _setup_logging(verbose: int, quiet: int) -> None:
    """Log level: -qq errors; -q and the default warnings (a clipped beam, a short scree:
    things about the data a scripted run must still show); -v progress; -vv debug."""
    if quiet:
        level = logging.ERROR if quiet > 1 else logging.WARNING
    else:
        level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="spedflow: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)  # also where the root logger had handlers already
    for handler in logging.getLogger().handlers:  # libraries' own loggers (distributed's
        handler.setLevel(level)                    # INFO) reach the root handler too
        if _no_cancel_traceback not in handler.filters:
            handler.addFilter(_no_cancel_traceback)
    if verbose < 2:
        quieter = max(level, logging.WARNING)
        logging.getLogger("distributed").setLevel(quieter)  # if it is imported already
        # distributed sets its logger's level from dask's config when it is imported
        # (later, by the command): without this, -v showed its INFO chatter, and a
        # traceback from the comms it closes at shutdown
        import dask
        dask.config.set({"logging.distributed": logging.getLevelName(quieter).lower()})
    import warnings
    if quiet > 1:
        warnings.simplefilter("ignore")
    else:
        warnings.formatwarning = lambda m, c, f, l, line=None: f"spedflow: warning: {m}\n"


def _no_cancel_traceback(record: logging.LogRecord) -> bool:
    """Drop a library's log of a task cancelled while the command stops (after Ctrl-C,
    distributed logged the scheduler's cancelled progress feed with its traceback)."""
    import asyncio
    return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


def _progress(args) -> bool:
    return not args.quiet


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser, which names its own --help
        parser.command_parser(args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    # -v / -q and the warning format are for this command only: main() called from
    # Python (a notebook, a test) leaves the caller's logging, warnings and progress
    # settings as it found them
    with _caller_settings_kept():
        _setup_logging(args.verbose, args.quiet)
        try:
            from . import cluster
        except ImportError:
            return _dispatch(args)
        with cluster.progress_switched(_progress(args)):
            return _dispatch(args)


_MISSING = object()


@contextlib.contextmanager
def _caller_settings_kept():
    """On exit, the root logger's level, handlers and their levels and filters, the ``distributed``
    logger's level, dask's ``logging.distributed`` setting and the warning filters and
    format are as they were on entry (what :func:`_setup_logging` changes)."""
    import warnings

    import dask
    root = logging.getLogger()
    level, handlers, levels = root.level, list(root.handlers), [h.level for h in root.handlers]
    handler_filters = [list(h.filters) for h in handlers]
    distributed = logging.getLogger("distributed").level
    filters, formatwarning = list(warnings.filters), warnings.formatwarning
    saved = dask.config.config.get("logging", _MISSING)
    saved = saved if saved is _MISSING else copy.deepcopy(saved)
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:  # basicConfig's, added for this command
                root.removeHandler(h)
        for h, lv, fs in zip(handlers, levels, handler_filters):
            h.setLevel(lv)
            h.filters[:] = fs
        root.setLevel(level)
        logging.getLogger("distributed").setLevel(distributed)
        warnings.filters[:] = filters
        warnings.formatwarning = formatwarning
        if saved is _MISSING:
            dask.config.config.pop("logging", None)
        else:
            dask.config.config["logging"] = saved


#: What an interrupted command leaves for its rerun to resume from (none: starts afresh).
_KEPT_ON_INTERRUPT = {"segment": "finished stages are", "watch": "finished stages are",
                      "demo": "finished stages are", "ingest": "the chunks written are",
                      "fetch": "the download and ingest done so far are"}


def _interrupt_line(command: str) -> str:
    kept = _KEPT_ON_INTERRUPT.get(command)
    return "spedflow: interrupted" + (f"; {kept} kept and a rerun resumes" if kept else "")


def _dispatch(args) -> int:
    """Run the command; every user mistake becomes one line on stderr and exit 2."""
    from ._interrupt import set_interrupt_line
    set_interrupt_line(_interrupt_line(args.command))
    try:
        return int(_COMMANDS[args.command](args) or 0)
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(_interrupt_line(args.command), file=sys.stderr)
        from ._interrupt import exit_now, is_command, said_interrupted
        said_interrupted()
        if is_command():
            exit_now(EXIT_INTERRUPT)
        return EXIT_INTERRUPT
    except (SpedflowError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
            NotADirectoryError) as exc:
        if args.verbose:
            raise
        print(f"spedflow: error: {_cli_words(_one_line(exc), args.command)}", file=sys.stderr)
        return EXIT_USER
    except ValueError as exc:
        if args.verbose:
            raise
        if "checksum" in str(exc).lower():  # zarr's CRC32C codec: a damaged chunk file
            print(f"spedflow: error: a chunk of a store is damaged ({_one_line(exc)}); "
                  f"`spedflow info --verify STORE` names it", file=sys.stderr)
            return EXIT_USER
        print(f"spedflow: internal error: ValueError: {_one_line(exc)} (rerun with -v for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as exc:  # a bug: still one line unless -v
        if args.verbose:
            raise
        print(f"spedflow: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with -v for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


#: Parameter names of the Python API that a command's option spells otherwise.
_OPTION_OF = {"out_dir": "--out", "n_workers": "--workers", "threads_per_worker": "--threads"}


def _cli_words(text: str, command: str | None) -> str:
    """An error message of the Python API in the command's words: a parameter named in
    backticks that is one of ``command``'s options becomes the option (`scan_step` ->
    `--scan-step`). Only backticked names: the rest of a message quotes paths and the
    user's own input, which must stay as given."""
    if not command:
        return text
    try:
        sub = build_parser().command_parser(command)
    except KeyError:
        return text
    options = {a.dest: a.option_strings[-1] for a in sub._actions
               if any(o.startswith("--") for o in a.option_strings)}
    options.update({k: v for k, v in _OPTION_OF.items() if v in options.values()})
    if not options:
        return text
    names = "|".join(re.escape(n) for n in sorted(options, key=len, reverse=True))
    return re.sub(rf"`({names})`", lambda m: f"`{options[m.group(1)]}`", text)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.strerror}: {exc.filename!r}"
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


# --- commands -------------------------------------------------------------------

def cmd_ingest(args) -> int:
    from .io import ingest
    ingest(args.src, args.dest, overwrite=args.overwrite, chunk_bytes=int(args.chunk_mb * 2**20),
           shards=args.shards, shape=args.shape, dtype=args.dtype, offset=args.offset, array=args.array,
           scan=args.scan, scan_step=_calib_dict(args.scan_step), reciprocal_scale=_calib_dict(args.reciprocal_scale),
           progress=_progress(args))
    print(f"wrote {args.dest}")
    return 0


def _calib_dict(c):
    if c is None or isinstance(c, float):  # a bare number: the API's default units
        return c
    return {"value": c[0], "units": c[1]}


def cmd_simulate(args) -> int:
    from .simulate import simulate
    kw = {}
    if args.saturate_8bit:
        kw["saturate"] = "8bit"
    if args.dose is not None:
        kw["dose"] = args.dose
    if args.shape != "cube":
        kw["shape"] = args.shape
    if args.hot_pixels:
        kw["hot_pixels"] = args.hot_pixels
    if args.dead_pixels:
        kw["dead_pixels"] = args.dead_pixels
    simulate(args.dest, scan=args.scan, detector=args.detector, crystals=args.crystals, seed=args.seed,
             overwrite=args.overwrite, progress=_progress(args), **kw)
    print(f"wrote {args.dest}")
    return 0


def cmd_info(args) -> int:
    from .io import format_info, store_info, verify_store
    print(format_info(store_info(args.path)))
    if args.verify:
        bad = verify_store(args.path)
        if bad:
            for line in bad:
                print(f"CORRUPT {line}")
            print(f"spedflow: error: {len(bad)} chunk(s) failed verification", file=sys.stderr)
            return EXIT_USER
        print("verify: every chunk matches its checksum")
    return 0


def _parse_set(items):
    import tomllib
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SpedflowError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        section, name = key.strip().split(".", 1)
        try:
            parsed = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value.strip()  # a bare word: treat as a string
        out.setdefault(section, {})[name] = parsed
    return out


def _local(args):
    """``local`` for :func:`spedflow.segment`: True with --no-cluster; False when a local
    cluster's shape is given (--workers, --threads, --memory-limit); else None, the
    API's rule (in this process under 1 GB of data, else a local cluster)."""
    if args.no_cluster:
        return True
    if any(v is not None for v in (args.workers, args.threads, args.memory_limit)):
        return False
    return None


def cmd_segment(args) -> int:
    from . import api
    overrides = _parse_set(args.set)
    if args.report:  # refused before the run, not after it
        from .io import check_side_directory
        check_side_directory(args.report, what="--report", sources=[args.store, args.out])
    result = api.segment(
        args.store, method=args.method, out=args.out, config=args.config, overrides=overrides,
        cache=args.cache, overwrite=args.overwrite, scheduler=args.scheduler, n_workers=args.workers,
        threads_per_worker=args.threads, memory_limit=args.memory_limit, local=_local(args),
        tls_ca_file=args.tls_ca_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
        progress=_progress(args))
    _say_wrote(result)
    if args.report:
        from .report import write_report
        html = write_report(result, args.report, store_path=args.store)
        print(f"report: {Path(html).resolve()}")
    return 0


def _say_wrote(result) -> None:
    found = _found(result)
    print(f"wrote {result}" + (f": {found}" if found else ""))


def _found(result) -> str:
    """What a run found, in a few words (from the result's counts; "" where they cannot
    be read: the result is written, its summary is not worth an error)."""
    import zarr
    try:
        meta = zarr.open_group(str(result), mode="r").attrs.get("spedflow")
    except Exception:  # noqa: BLE001
        return ""
    counts = meta.get("counts") if isinstance(meta, dict) else None
    if not isinstance(counts, dict) or not isinstance(counts.get("segments"), int):
        return ""
    n = counts["segments"]
    text = f"{n} crystal{'s' if n != 1 else ''} (segments)"
    if meta.get("method") == "vdf" and isinstance(counts.get("vectors"), int):
        return text + f" from {counts['vectors']} diffraction vectors"
    if meta.get("method") == "nmf" and isinstance(counts.get("components"), int) \
            and isinstance(counts.get("kept"), int):
        extra = counts.get("residual_components")  # the residual search's, after the global ones
        if isinstance(extra, int) and extra > 0:
            return text + (f" from {counts['kept']} of {counts['components'] + extra} NMF "
                           f"components ({extra} from the residual search)")
        return text + f" from {counts['kept']} of {counts['components']} NMF components"
    return text


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, format_evaluation
    scores = evaluate(args.result, args.store)
    if args.json:
        import json
        print(json.dumps(scores, indent=2, default=float))
    else:
        print(format_evaluation(scores))
    return 0


def cmd_params(args) -> int:
    from .workflows import default_config_toml
    sys.stdout.write(default_config_toml(args.method))
    return 0


def cmd_report(args) -> int:
    from .report import write_report
    html = write_report(args.result, args.out, store_path=args.store, strict=True)
    print(f"report: {Path(html).resolve()}")
    return 0


def cmd_export(args) -> int:
    from .export import export_result
    files = export_result(args.result, args.out, formats=tuple(args.format or ("npy", "tiff", "hspy")))
    for f in files:
        print(f"wrote {f}")
    return 0


def cmd_fetch(args) -> int:
    from .datasets import fetch, format_registry
    if not args.name:
        print(format_registry())
        return 0
    dest = fetch(args.name, dest=args.dest, cache_dir=args.cache_dir, url=args.url,
                 overwrite=args.overwrite, progress=_progress(args))
    print(f"wrote {dest}")
    return 0


def cmd_watch(args) -> int:
    from .workflows.live import watch
    result = watch(args.store, method=args.method, out=args.out, config=args.config,
                   overrides=_parse_set(args.set), poll=args.poll,
                   timeout=args.timeout, overwrite=args.overwrite, progress=_progress(args))
    _say_wrote(result)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    html = run_demo(args.out, scan=args.scan, detector=args.detector, seed=args.seed,
                    overwrite=args.overwrite, progress=_progress(args))
    print(f"report: {Path(html).resolve()}")
    return 0


_COMMANDS = {
    "demo": cmd_demo,
    "ingest": cmd_ingest, "simulate": cmd_simulate, "info": cmd_info, "segment": cmd_segment,
    "evaluate": cmd_evaluate, "params": cmd_params, "report": cmd_report, "export": cmd_export,
    "fetch": cmd_fetch, "watch": cmd_watch,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
