"""`python -m bench [NAME…] [--quick]`: run the named benchmarks (default: all)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import bench
from bench._common import save

PREFIX = "bench_"


def available() -> list[str]:
    return sorted(m.name[len(PREFIX):] for m in pkgutil.iter_modules(bench.__path__)
                  if m.name.startswith(PREFIX))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("names", nargs="*", metavar="NAME", help=f"any of: {', '.join(available())}")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = p.parse_args(argv)
    unknown = set(args.names) - set(available())
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    for name in args.names or available():
        importlib.import_module(f"bench.{PREFIX}{name}").run(quick=args.quick)
    if not args.quick:  # a smoke run's figures are not measurements
        print(f"results merged into {save()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
