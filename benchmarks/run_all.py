"""The spedflow benchmark suite, in one command.

    python benchmarks/run_all.py --size smoke|small|medium|large [--only STEP ...]
        [--skip STEP ...] [--work DIR] [--results DIR]

Steps (in order; ``--only``/``--skip`` choose among them):

``io``         I/O floor: one decompressing read pass over the main set (``io_floor.json``)
``workflows``  both workflows end to end on the main set: wall, stages, patterns/s,
               ratio to the I/O floor, process-tree peak RSS, quality (``workflows.json``)
``weak``       weak scaling over 4 set sizes, both workflows (``weak_scaling.json``)
``strong``     1 vs 2 local worker processes on one set (``strong_scaling.json``)
``bounded``    a set >= 4x the total worker memory limit completes (``bounded_memory.json``)
``reference``  spedflow vs the pyxem reference harness on the same set (``reference.json``)
``nmf_quality`` benchmarks/bench_nmf_quality.py, if present (``nmf_quality.json``)
``components`` the per-kernel benchmarks of the other scripts (``components.json``)
``plots``      PNGs of the above (plot_results.py)

Every JSON carries the machine (cores, memory, CPU model, versions) and the load average
before and after: the machine may be shared, and other work competing for the cores
shows up in the wall times. A step that fails is recorded as such and the suite goes on.
Simulated sets are kept in the work folder (default ``benchmarks/work/suite``,
gitignored) and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure as M  # noqa: E402
import bench_scaling as S  # noqa: E402
import bench_workflows as W  # noqa: E402

STEPS = ("io", "workflows", "weak", "strong", "bounded", "reference", "nmf_quality",
         "components", "plots")

CLUSTER = ["--workers", "2", "--threads", "1"]  # the 2-core machine, one process per core

# Sizes. detector: pixels; main: scan of the set for io/workflows; weak: 4 scans (data
# grows as scan**2); strong: scan; bounded: (scan, memory limit per worker) with data
# >= 4x (2 workers x limit); peer: scan of the set both tools run on in full (the
# reference is single-process and slow, so it gets its own smaller set; both tools see
# the same set, and its per-pattern times extrapolate); nmf_binned: scans whose NMF runs
# with nav_binning=2 (full resolution impractical in the session); weak_args: segment
# arguments of the weak-scaling runs when they differ (large: 2 x 1 GB workers, so the
# 8.6 GB set is > 4x the total worker memory and memory must stay flat).
SIZES = {
    "smoke": dict(detector=64, main=12, weak=[8, 10, 12, 16], strong=None, bounded=None,
                  peer=None, segment_args=["--no-cluster"], nmf_binned=[], timeout=300,
                  default_skip=("strong", "bounded", "reference", "nmf_quality", "components")),
    "small": dict(detector=128, main=32, weak=[16, 24, 32, 48], strong=48,
                  bounded=None, peer=24, segment_args=CLUSTER, nmf_binned=[],
                  timeout=1800, default_skip=()),
    "medium": dict(detector=128, main=64, weak=[64, 96, 128, 192], strong=128,
                   bounded=(384, "512MB"), peer=32, segment_args=CLUSTER, nmf_binned=[],
                   bounded_methods=("vdf",), bounded_args=["--set", "preprocess.nav_binning=2"],
                   timeout=3600, default_skip=()),
    "large": dict(detector=128, main=128, weak=[64, 128, 256, 512], strong=256,
                  bounded=(512, "512MB"), peer=128, segment_args=CLUSTER, nmf_binned=[512],
                  weak_args=CLUSTER + ["--memory-limit", "1GB"],
                  bounded_methods=("vdf", "nmf"), bounded_args=["--set", "preprocess.nav_binning=2"],
                  timeout=3 * 3600, default_skip=()),
}

REFERENCE_PY = M.HERE / "work" / "venv-pyxem" / "bin" / "python"
REFERENCE_SCRIPT = M.HERE / "reference" / "run_reference.py"


class Suite:
    def __init__(self, size: str, work: Path, results: Path, methods=("vdf", "nmf"),
                 reuse_reference: bool = False):
        self.size = size
        self.methods = tuple(methods)
        self.reuse_reference = reuse_reference
        self.cfg = SIZES[size]
        self.work = work / size
        self.results = results / size
        self.work.mkdir(parents=True, exist_ok=True)
        self.results.mkdir(parents=True, exist_ok=True)
        self.machine = M.machine()

    # -- helpers ---------------------------------------------------------------------------
    def store(self, scan: int) -> dict:
        det = self.cfg["detector"]
        return S.ensure_store(self.work / f"sim_{scan}x{scan}_{det}.zarr", scan, det,
                              timeout=self.cfg["timeout"])

    def save(self, name: str, obj: dict, t0: float, load0) -> Path:
        obj = {"size": self.size, "step": name, "machine": self.machine,
               "written": time.strftime("%Y-%m-%d %H:%M"), "load_avg_before": load0,
               "load_avg_after": M.load_avg(),
               "step_wall_s": round(time.perf_counter() - t0, 1), **obj}
        path = self.results / f"{name}.json"
        # a run of some methods only (--methods vdf) keeps the other methods' rows of the
        # existing file, marked with the run that produced them, and the replaced rows
        # (reference, weak and strong scaling)
        if name == "reference" and "methods" in obj and path.exists():
            old = json.loads(path.read_text())
            self._merge_earlier(obj, old, (old.get("methods") or {}).items(),
                                obj["methods"].__setitem__)
            earlier = old.get("earlier_notes", []) + ([old["notes"]] if old.get("notes") else [])
            if earlier:
                obj["earlier_notes"] = earlier
        if name in ("weak_scaling", "strong_scaling") and "rows" in obj and path.exists():
            old = json.loads(path.read_text())
            self._merge_earlier(obj, old, ((r.get("method"), r) for r in old.get("rows", [])),
                                lambda m, row: obj["rows"].append(row))
            obj["rows"].sort(key=lambda r: (r.get("scan", 0), r.get("method", ""),
                                            r.get("workers", 0)))
            if name == "weak_scaling":
                obj["summary"] = S.summarise_weak(obj["rows"])
            if old.get("note") and old.get("note") != obj.get("note"):
                obj["earlier_note"] = old["note"]
        return M.write_json(path, obj)

    def _merge_earlier(self, obj: dict, old: dict, rows, keep) -> None:
        """File the earlier ``(method, row)`` pairs: rows of the methods run now go to
        ``superseded_<method>_rows``, the others are passed to ``keep`` (marked
        ``carried_over_from``); earlier superseded rows stay in front."""
        when = old.get("written", "an earlier session")
        for m, row in rows:
            if m in self.methods:
                obj.setdefault(f"superseded_{m}_rows", []).append(
                    {"superseded": f"re-run on {obj['written']}", **row})
            else:
                row.setdefault("carried_over_from", f"the run of {when}")
                keep(m, row)
        for k in ("superseded_vdf_rows", "superseded_nmf_rows"):
            obj[k] = old.get(k, []) + obj.get(k, [])
            if not obj[k]:
                del obj[k]

    # -- steps ------------------------------------------------------------------------------
    def io(self):
        st = self.store(self.cfg["main"])
        return "io_floor", {"set": st, "io_floor": M.io_floor(st["path"])}

    def workflows(self):
        st = self.store(self.cfg["main"])
        res = W.bench_store(st["path"], self.methods, work=self.work / "runs",
                            segment_args=self.cfg["segment_args"], timeout=self.cfg["timeout"])
        return "workflows", {"set": st, **res}

    def weak(self):
        stores = [self.store(s) for s in self.cfg["weak"]]
        margs = {("nmf", s): ["--set", "preprocess.nav_binning=2"] for s in self.cfg["nmf_binned"]}
        seg_args = self.cfg.get("weak_args", self.cfg["segment_args"])
        rows = S.weak_scaling(stores, self.methods, work=self.work / "runs",
                              segment_args=seg_args, method_args=margs,
                              timeout=self.cfg["timeout"])
        note = ("NMF on scans %s ran with preprocess.nav_binning=2 (full resolution impractical "
                "in the session): 4x fewer patterns in the NMF stages" % self.cfg["nmf_binned"]
                if self.cfg["nmf_binned"] else None)
        return "weak_scaling", {"sets": stores, "segment_args": seg_args,
                                "rows": rows, "summary": S.summarise_weak(rows), "note": note}

    def strong(self):
        if not self.cfg["strong"]:
            return "strong_scaling", {"skipped": f"no strong-scaling set at size {self.size}"}
        st = self.store(self.cfg["strong"])
        rows = S.strong_scaling(st, self.methods, work=self.work / "runs",
                                timeout=self.cfg["timeout"])
        return "strong_scaling", {"set": st, "rows": rows}

    def bounded(self):
        if not self.cfg["bounded"]:
            return "bounded_memory", {"skipped": f"no set >= 4x a workable worker limit at size "
                                                 f"{self.size} (a worker alone needs ~200 MB)"}
        scan, limit = self.cfg["bounded"]
        st = self.store(scan)
        extra = self.cfg.get("bounded_args", [])
        methods = [m for m in self.cfg.get("bounded_methods", self.methods) if m in self.methods]
        rows = [S.bounded_memory(st, m, work=self.work / "runs", memory_limit=limit, extra=extra,
                                 timeout=self.cfg["timeout"]) for m in methods]
        note = (f"run with {' '.join(extra)} to fit the session: every byte of the set is still "
                "read and streamed through the workers; later stages see 4x fewer patterns"
                if extra else None)
        return "bounded_memory", {"set": st, "rows": rows, "note": note}

    def reference(self):
        if not self.cfg["peer"]:
            return "reference", {"skipped": f"no peer set at size {self.size}"}
        st = self.store(self.cfg["peer"])
        if not REFERENCE_PY.exists():
            return "reference", {"set": st, "skipped": f"no reference venv at {REFERENCE_PY}: "
                                                       "run benchmarks/reference/setup_env.py"}
        out = {"set": st, "reference_python": str(REFERENCE_PY), "methods": {}}
        earlier = {}
        path = self.results / "reference.json"
        if self.reuse_reference and path.exists():
            old = json.loads(path.read_text())
            for m, row in (old.get("methods") or {}).items():
                ref = row.get("reference", {})
                if ref.get("returncode") == 0 and "algorithm_s" in ref:
                    src = (ref.get("reused_from") or row.get("carried_over_from")
                           or "the run of " + old.get("written", "an earlier session"))
                    earlier[m] = {**ref, "reused_from": src}
        for m in self.methods:
            out["methods"][m] = compare_reference(st, m, self.work / "runs",
                                                  self.cfg["segment_args"], self.cfg["timeout"],
                                                  reuse=earlier.get(m))
        return "reference", out

    def nmf_quality(self):
        script = M.HERE / "bench_nmf_quality.py"
        if not script.exists():
            return "nmf_quality", {"skipped": "benchmarks/bench_nmf_quality.py not present"}
        return "nmf_quality", run_script(script, self.results / "nmf_quality_raw.json",
                                         self.cfg["timeout"])

    def components(self):
        out = {}
        ingest_gb = {"smoke": "0.01", "small": "0.05", "medium": "0.25", "large": "1"}[self.size]
        out["ingest"] = run_script(M.HERE / "bench_ingest.py", self.results / "ingest.json",
                                   self.cfg["timeout"], json_flag="--out",
                                   args=["--sizes", ingest_gb, "--workdir", str(self.work / "ingest")])
        out["preprocess"] = run_script(M.HERE / "bench_preprocess.py", None, self.cfg["timeout"])
        out["peaks"] = run_script(M.HERE / "bench_peaks.py", None, self.cfg["timeout"])
        return "components", out

    def plots(self):
        import plot_results
        made = plot_results.plot_all(self.results)
        return None, {"pngs": [str(p) for p in made]}


def compare_reference(st: dict, method: str, work: Path, segment_args, timeout, *,
                      reuse: dict | None = None) -> dict:
    """Reference harness and spedflow on the same store: times, speed-ups, memory, quality.

    ``reuse``: an earlier reference row for this store (``--reuse-reference``); only
    spedflow is run and the row says where the reference figures come from.
    """
    work.mkdir(parents=True, exist_ok=True)
    if reuse is not None:
        return _with_spedflow(reuse, st, method, work, segment_args, timeout)
    ref_out, ref_json = work / f"ref_{method}.zarr", work / f"ref_{method}.json"
    for p in (ref_out, ref_json):
        if p.is_dir():
            import shutil
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    M.drop_page_cache(st["path"])
    cmd = [str(REFERENCE_PY), str(REFERENCE_SCRIPT), st["path"], "--method", method,
           "--out", str(ref_out), "--json", str(ref_json)]
    load0 = M.load_avg()
    run = M.run_tree(cmd, timeout=timeout)
    ref = {"cmd": run["cmd"], "returncode": run["returncode"], "wall_s": run["wall_s"],
           "cpu_s": run["cpu_s"],
           "peak_rss_mb": round(run["peak_rss_bytes"] / 1e6, 1), "load_avg_before": load0,
           "load_avg_after": M.load_avg()}
    if run["returncode"] != 0 or not ref_json.exists():
        ref["error"] = (run["stderr"] or run["stdout"]).strip().splitlines()[-8:]
    else:
        info = json.loads(ref_json.read_text())
        ref.update({k: info.get(k) for k in ("tool", "timings", "ms_per_pattern", "total_s",
                                             "algorithm_s", "patterns", "crop", "segments",
                                             "versions", "note")})
        try:
            ref["quality"] = W.quality(ref_out, st["path"])
        except Exception as exc:
            ref["quality"] = {"error": f"{type(exc).__name__}: {exc}"}
    return _with_spedflow(ref, st, method, work, segment_args, timeout)


def _with_spedflow(ref: dict, st: dict, method: str, work: Path, segment_args, timeout) -> dict:
    """Run spedflow on the peer set and put its figures next to the reference's."""
    sp = W.run_segment(st["path"], method, work / f"peer_{method}.zarr", segment_args=segment_args,
                       timeout=timeout)
    res = {"reference": ref, "spedflow": sp}
    if ref["returncode"] == 0 and sp.get("returncode") == 0 and "algorithm_s" in ref:
        n = sp["patterns"]
        res["reference_s"] = {"end_to_end": ref["wall_s"], "algorithm": ref["algorithm_s"],
                              "cpu": ref["cpu_s"]}
        res["spedflow_s"] = {"end_to_end": sp["wall_s"], "algorithm": sp["stage_sum_s"],
                             "cpu": sp["cpu_s"]}
        res["speedup"] = {k: round(res["reference_s"][k] / res["spedflow_s"][k], 2)
                          for k in ("end_to_end", "algorithm", "cpu") if res["spedflow_s"][k]}
        res["ms_per_pattern"] = {
            "reference_algorithm": round(1e3 * ref["algorithm_s"] / ref["patterns"], 3),
            "spedflow_stages": round(1e3 * sp["stage_sum_s"] / n, 3)}
        res["extrapolated_s_for_512x512"] = {
            "reference_algorithm": round(ref["algorithm_s"] / ref["patterns"] * 512 * 512, 0),
            "spedflow_stages": round(sp["stage_sum_s"] / n * 512 * 512, 0),
            "note": "linear in patterns; spedflow's measured weak scaling says whether that holds"}
        res["peak_rss_mb"] = {"reference": ref["peak_rss_mb"], "spedflow": sp["peak_rss_mb"]}
    print(f"[reference] {method}: ref {ref['wall_s']:.1f} s, spedflow {sp['wall_s']:.1f} s",
          file=sys.stderr, flush=True)
    return res


def run_script(script: Path, out_json: Path | None, timeout, *, json_flag: str | None = None,
               args=()) -> dict:
    """Run another engineer's benchmark script; collect its JSON (file or printed) or text."""
    cmd = [sys.executable, str(script), *args]
    if out_json is not None:
        if json_flag is None:
            helptext = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                                      text=True, timeout=120).stdout
            json_flag = "--json" if "--json" in helptext else "--out" if "--out" in helptext else None
        if json_flag:
            cmd += [json_flag, str(out_json)]
    run = M.run_tree(cmd, timeout=timeout)
    rec = {"cmd": run["cmd"], "returncode": run["returncode"], "wall_s": run["wall_s"],
           "cpu_s": run["cpu_s"], "peak_rss_mb": round(run["peak_rss_bytes"] / 1e6, 1)}
    if out_json is not None and out_json.exists():
        rec["result"] = json.loads(out_json.read_text())
    else:
        rec["result"] = _last_json(run["stdout"])
    if rec["result"] is None:
        rec["stdout"] = run["stdout"][-4000:]
    if run["returncode"] != 0:
        rec["stderr"] = run["stderr"][-2000:]
    return rec


def _last_json(text: str):
    """The last top-level JSON object printed in ``text`` (one starting a line), or None."""
    dec, found = json.JSONDecoder(), None
    for i in (j for j in range(len(text)) if text[j] == "{" and (j == 0 or text[j - 1] == "\n")):
        try:
            found = dec.raw_decode(text[i:])[0]
        except json.JSONDecodeError:
            continue
    return found


def main(argv=None) -> int:
    M.check_checkout()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="smoke")
    ap.add_argument("--only", nargs="+", choices=STEPS, help="run only these steps")
    ap.add_argument("--skip", nargs="+", choices=STEPS, default=[], help="skip these steps")
    ap.add_argument("--methods", nargs="+", choices=["vdf", "nmf"], default=["vdf", "nmf"])
    ap.add_argument("--work", type=Path, default=M.HERE / "work" / "suite")
    ap.add_argument("--results", type=Path, default=M.HERE / "results")
    ap.add_argument("--reuse-reference", action="store_true",
                    help="reference step: keep the reference's figures from the existing "
                         "reference.json (marked as reused) and run spedflow only")
    args = ap.parse_args(argv)
    suite = Suite(args.size, args.work, args.results, args.methods,
                  reuse_reference=args.reuse_reference)
    steps = args.only or [s for s in STEPS if s not in suite.cfg["default_skip"]]
    steps = [s for s in STEPS if s in steps and s not in args.skip]
    failed = []
    for step in steps:
        t0, load0 = time.perf_counter(), M.load_avg()
        print(f"[suite] {args.size}: {step} (load {load0[0]})", file=sys.stderr, flush=True)
        try:
            name, obj = getattr(suite, step)()
        except Exception as exc:
            name, obj = step, {"error": f"{type(exc).__name__}: {exc}",
                               "traceback": traceback.format_exc().splitlines()[-6:]}
            failed.append(step)
        if name is not None:
            p = suite.save(name, obj, t0, load0)
            print(f"[suite] wrote {p} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        else:
            print(f"[suite] {step}: {obj}", file=sys.stderr, flush=True)
    if failed:
        print(f"[suite] failed steps: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
