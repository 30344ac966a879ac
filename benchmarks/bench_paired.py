"""Paired end-to-end runs of two versions of spedflow on the same store, alternating.

On a shared or noisy machine the spread between runs of one command (~10 % on the 2-core
machines of this project) hides changes of that size; runs of the two versions taken
back to back, alternating, see the same machine. The base version is a ``git worktree``
of ``--base`` (made under ``--work`` once); this checkout is the other. Each run is
``python -m spedflow segment STORE --method M --out R -q --overwrite ARGS...`` in a fresh
stage cache with the store's page cache dropped, started outside both trees with the
tree on ``PYTHONPATH`` (``python -m`` imports a ``spedflow/`` in its working directory
ahead of ``PYTHONPATH``).

Prints and writes (``--json``) every run's wall time, CPU time, peak RSS of the process
tree and per-stage times, and per version the median of each.

    python benchmarks/bench_paired.py STORE --base REV [--pairs 2] [--method vdf]
        [--json F] [--work DIR] [-- SEGMENT ARGS...]

e.g. ``python benchmarks/bench_paired.py benchmarks/work/suite/large/sim_256x256_128.zarr
--base d905292 -- --workers 2 --threads 1 --memory-limit 1GB``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import _measure as M  # noqa: E402


def worktree(rev: str, work: Path) -> Path:
    """A checkout of ``rev`` under ``work`` (made once, reused)."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                         capture_output=True, text=True)
    if sha.returncode != 0:
        raise SystemExit(f"bench_paired: {rev!r} is not a commit of {REPO}")
    sha = sha.stdout.strip()
    path = work / f"tree-{sha[:12]}"
    if not (path / "spedflow").is_dir():
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), sha],
                       check=True, capture_output=True)
    return path


def one_run(tree: Path, store: Path, out: Path, method: str, extra: list[str]) -> dict:
    for old in (out, Path(str(out) + ".cache")):  # a fresh stage cache every run
        shutil.rmtree(old, ignore_errors=True)
    M.drop_page_cache(store)
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "spedflow", "segment", str(store), "--method", method,
           "--out", str(out), "-q", "--overwrite", *extra]
    with tempfile.TemporaryDirectory() as cwd:  # outside both trees
        r = M.run_tree(cmd, env=env, cwd=cwd)
    if r["returncode"] != 0:
        raise SystemExit(f"bench_paired: run failed ({r['cmd']}):\n{r['stderr'][-2000:]}")
    import zarr
    attrs = zarr.open_group(str(out), mode="r").attrs["spedflow"]  # what the run wrote
    return {"tree": str(tree), "version": attrs["version"], "wall_s": r["wall_s"],
            "cpu_s": r["cpu_s"], "peak_rss_mb": round(r["peak_rss_bytes"] / 2**20, 1),
            "timings": {k: round(v, 3) for k, v in attrs["timings"].items()}, "cmd": r["cmd"]}


def medians(rows: list[dict]) -> dict:
    out = {k: round(statistics.median(r[k] for r in rows), 3)
           for k in ("wall_s", "cpu_s", "peak_rss_mb")}
    for stage in rows[0]["timings"]:
        out[stage] = round(statistics.median(r["timings"].get(stage, 0.0) for r in rows), 3)
    return out


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--base", required=True, help="git revision to compare this checkout with")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--method", default="vdf", choices=("vdf", "nmf"))
    ap.add_argument("--work", type=Path, default=HERE / "work" / "paired")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not (args.store / "zarr.json").exists():
        raise SystemExit(f"bench_paired: {args.store} is not a zarr store")
    store = args.store.resolve()
    trees = {"base": worktree(args.base, args.work.resolve()), "this": REPO}
    load0 = M.load_avg()
    rows = []
    for i in range(args.pairs):
        for name, tree in trees.items():  # alternating: base, this, base, this, ...
            out = args.work.resolve() / f"result-{name}.zarr"
            row = {"version_of": name, "pair": i, **one_run(tree, store, out, args.method, extra)}
            rows.append(row)
            stages = " ".join(f"{k} {v:.1f}" for k, v in row["timings"].items())
            print(f"[paired] {name:4s} {row['version']:8s} {row['wall_s']:7.1f} s "
                  f"{row['peak_rss_mb']:7.0f} MB  {stages}", flush=True)
    summary = {name: medians([r for r in rows if r["version_of"] == name]) for name in trees}
    for name, m in summary.items():
        print(f"[paired] median {name}: " + ", ".join(f"{k} {v}" for k, v in m.items()))
    result = {"store": str(store), "base": args.base, "method": args.method,
              "segment_args": extra, "pairs": args.pairs, "machine": M.machine(),
              "load_avg_before": load0, "load_avg_after": M.load_avg(), "rows": rows, "median": summary}
    if args.json:
        M.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
