"""`mmud campaign run SPEC …` and `mmud campaign rerun DIR JOB`: the arguments and exits.

This module imports only the standard library at start-up: `mmud run` must not pay for
Dask and pandas, nor need the `campaign` extra. A user error (a bad spec, an unusable
directory, a cluster that refuses the campaign, the extra not installed) prints one
`mmud campaign: …` line and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_USAGE = 2
EXTRA = "mmud campaign needs the campaign extra: pip install 'mmud[campaign]'"


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `campaign` subcommand, under `mmud`'s subparsers."""
    p = sub.add_parser("campaign", help="run a campaign of simulation jobs on Dask "
                       "(docs/campaigns.md)")
    commands = p.add_subparsers(dest="campaign_command", required=True)
    run = commands.add_parser("run", help="run the jobs of a spec; write results, summary, plots")
    run.add_argument("spec", type=Path, metavar="SPEC", help="the campaign spec (campaigns/*.toml)")
    run.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                     help="submit to this Dask scheduler instead of a local cluster")
    run.add_argument("--workers", type=positive, metavar="N",
                     help="worker processes of the local cluster (default: the CPU count)")
    run.add_argument("--out", type=Path, metavar="DIR",
                     help="results directory (default: ./campaign-<spec name>[-quick])")
    run.add_argument("--resume", action="store_true", help="skip the jobs already in DIR's journal")
    run.add_argument("--quick", action="store_true", help="the spec's reduced [quick] grid")
    rerun = commands.add_parser("rerun", help="run one job of a campaign again, alone, here")
    rerun.add_argument("dir", type=Path, metavar="DIR")
    rerun.add_argument("job", metavar="JOB", help="the job's id (a unique prefix will do)")


def _run(args: argparse.Namespace) -> int:
    from mmud.campaign import cluster, engine, spec

    if args.scheduler and args.workers:
        raise spec.SpecError("--workers sizes the local cluster; with --scheduler the cluster "
                             "has the workers it has")
    loaded = spec.load(args.spec)
    out = args.out or Path(f"campaign-{args.spec.stem}{'-quick' if args.quick else ''}")
    if args.scheduler:
        address = args.scheduler
        return engine.run(loaded, lambda: cluster.remote(address), out,
                          quick=args.quick, resume=args.resume)
    workers = args.workers or os.cpu_count() or 1
    return engine.run(loaded, lambda: cluster.local(workers), out,
                      quick=args.quick, resume=args.resume)


def main(args: argparse.Namespace) -> int:
    try:
        from mmud.campaign.cluster import ClusterError
        from mmud.campaign.spec import SpecError

        try:
            if args.campaign_command == "run":
                return _run(args)
            from mmud.campaign.rerun import rerun

            return rerun(args.dir, args.job)
        except (SpecError, ClusterError) as e:
            print(f"mmud campaign: {e}", file=sys.stderr)
            return EXIT_USAGE
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in {"dask", "distributed", "pandas", "pyarrow",
                                               "matplotlib", "tqdm"}:
            print(f"{EXTRA} ({e})", file=sys.stderr)
            return EXIT_USAGE
        raise
