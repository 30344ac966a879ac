"""How much the NMF workflow's automatic rank moves with the random sign flip.

The rank is the number of scree components above the signflip noise floor
(``spedflow.decompose.scree``), and the floor is a random draw. For each set in the
given work directories, the normalised matrix an NMF run left in its stage cache
(``NAME.nmf.zarr.cache/matrix-*/matrix.zarr``) is decomposed once with the scree's
defaults (40 components, 2 power iterations, 10 oversamples) together with ``--draws``
independent sign flips, all in the same passes. The rank is then counted against each
draw's floor alone (``scree.noise_draws = 1``) and against the mean of disjoint groups
of three (the default, 3). Prints and writes (``--out``) per set the ranks found and
their spread (largest minus smallest).

    python benchmarks/bench_rank.py [WORK_DIR ...] [--draws 15] [--out benchmarks/results/rank.json]

The work directories default to those of bench_quality and bench_foreign (both
simulators); run those first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import dask
import numpy as np

HERE = Path(__file__).resolve().parent


def matrix_of(result: Path):
    """The newest normalised matrix in the stage cache of an NMF result, as a dask array."""
    from spedflow.workflows.nmf import _block_major
    found = sorted((result.parent / (result.name + ".cache")).glob("matrix-*/matrix.zarr"),
                   key=lambda p: p.stat().st_mtime)
    return _block_major(found[-1])[0] if found else None


def ranks(matrix, draws: int, group: int = 3, k: int = 40):
    from spedflow.decompose import ScreeParams
    from spedflow.decompose._scree import noise_draw_seeds, randomized_svds
    sp = ScreeParams()
    m = matrix.rechunk({0: max(1, (32 << 20) // (4 * matrix.shape[1]))}).persist()
    n, p = m.shape
    m64 = m.astype(np.float64)
    mean, sumsq = dask.compute(m64.mean(axis=0), (m64 ** 2).sum())
    total = float(sumsq - n * np.dot(mean, mean))
    k = int(min(k, n - 1, p))
    variants = [(0, None)] + noise_draw_seeds(0, draws)  # the draws of scree(seed=0)
    svds = randomized_svds(m, k, variants, n_power_iter=sp.n_power_iter,
                           n_oversamples=int(max(min(sp.n_oversamples, min(n, p) - k), 0)), mean=mean)
    evr = svds[0][1] ** 2 / total
    edges = np.array([v[1][0] ** 2 / total for v in svds[1:]])
    single = [int((evr > e).sum()) for e in edges]
    grouped = [int((evr > edges[i:i + group].mean()).sum())
               for i in range(0, draws - group + 1, group)]
    return {"shape": [int(n), int(p)], "edge_cv": round(float(edges.std() / edges.mean()), 4),
            "ranks_1": single, "ranks_3": grouped,
            "spread_1": max(single) - min(single), "spread_3": max(grouped) - min(grouped)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", nargs="*", type=Path,
                    default=[HERE / "work" / d for d in ("quality", "foreign", "third")])
    ap.add_argument("--draws", type=int, default=15, help="sign flips per set (a multiple of 3)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "rank.json")
    args = ap.parse_args(argv)
    if args.draws < 3 or args.draws % 3:
        ap.error("--draws must be a positive multiple of 3")
    rows = []
    for work in args.work:
        for result in sorted(work.glob("*.nmf.zarr")):
            matrix = matrix_of(result)
            if matrix is None:
                continue
            row = {"work": work.name, "set": result.name[:-len(".nmf.zarr")],
                   **ranks(matrix, args.draws)}
            rows.append(row)
            print(f"{row['work']:8s} {row['set']:28s} floor cv {row['edge_cv']:.3f}  "
                  f"1 draw: {row['ranks_1']} (spread {row['spread_1']})  "
                  f"mean of 3: {row['ranks_3']} (spread {row['spread_3']})", flush=True)
    import spedflow
    summary = {f"sets_moving_{t}": sum(r[f"spread_{t}"] > 0 for r in rows) for t in (1, 3)}
    summary.update({f"mean_spread_{t}": round(float(np.mean([r[f"spread_{t}"] for r in rows])), 2)
                    for t in (1, 3)} if rows else {})
    summary["sets"] = len(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"spedflow": spedflow.__version__, "draws": args.draws,
                                    "rows": rows, "summary": summary}, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
