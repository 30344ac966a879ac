#!/usr/bin/env python
"""Run a spedflow workflow on a SLURM cluster through dask-jobqueue.

Run it on a login node (it stays there as the dask client and scheduler host and
submits the worker jobs)::

    pip install spedflow dask-jobqueue
    python deploy/slurm/spedflow_slurm.py /shared/scan.zarr --out /shared/vdf.zarr \\
        --method vdf --jobs 4 --cores 16 --memory 64GB --walltime 02:00:00 \\
        --partition compute [--account proj123] [--tls]

Each SLURM job runs ``--cores`` single-threaded worker processes (one thread per
process: see ``spedflow/cluster.py``) sharing ``--memory``; dask gives each
process memory/processes as its limit. The store and the result must lie on a file
system every node mounts at the same path. ``--tls`` encrypts and authenticates all
traffic with throw-away certificates (``Security.temporary()``), which dask-jobqueue
ships to the jobs through ``--shared-temp-directory``.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", help="input store (spedflow ingest / simulate)")
    ap.add_argument("--out", required=True, help="result .zarr store (shared file system)")
    ap.add_argument("--method", choices=("vdf", "nmf"), default="vdf")
    ap.add_argument("--config", help="TOML parameter file")
    ap.add_argument("--jobs", type=int, default=2, help="number of SLURM jobs (2)")
    ap.add_argument("--cores", type=int, default=8, help="cores per job (8)")
    ap.add_argument("--memory", default="32GB", help="memory per job (32GB)")
    ap.add_argument("--walltime", default="01:00:00", help="per job (01:00:00)")
    ap.add_argument("--partition", help="SLURM partition (queue)")
    ap.add_argument("--account", help="SLURM account")
    ap.add_argument("--local-directory", default="$TMPDIR",
                    help="node-local spill directory ($TMPDIR)")
    ap.add_argument("--log-directory", default="spedflow-slurm-logs")
    ap.add_argument("--tls", action="store_true", help="encrypt with temporary certificates")
    ap.add_argument("--shared-temp-directory", default=".",
                    help="shared directory for --tls certificates (.)")
    ap.add_argument("--overwrite", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dask_jobqueue import SLURMCluster
    from distributed import Client
    from distributed.security import Security

    import spedflow
    from spedflow.cluster import worker_environ

    # the workers' environment as spedflow's local clusters have it (allocator settings)
    kwargs = {"job_script_prologue": [
        f'export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON="{worker_environ()!r}"']}
    if args.tls:
        kwargs.update(security=Security.temporary(), protocol="tls://",
                      shared_temp_directory=args.shared_temp_directory)
    cluster = SLURMCluster(
        cores=args.cores, processes=args.cores, memory=args.memory,
        walltime=args.walltime, queue=args.partition, account=args.account,
        local_directory=args.local_directory, log_directory=args.log_directory,
        job_name="spedflow", **kwargs)
    try:
        cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            print(f"spedflow: {args.jobs} SLURM jobs requested; dashboard "
                  f"{client.dashboard_link}", file=sys.stderr)
            client.wait_for_workers(1)  # queued jobs join as they start
            out = spedflow.segment(args.store, method=args.method, out=args.out,
                                   config=args.config, overwrite=args.overwrite,
                                   client=client)
        print(f"spedflow: result written to {out}", file=sys.stderr)
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
