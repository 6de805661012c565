"""Benchmarks, run as `python -m bench [NAME…] [--quick]` (no name: all of them).

Each `bench/bench_<name>.py` exposes `run(quick: bool = False)` and reports figures through
`bench._common.figure`; the figures of a run are merged into `bench/results.json`.

Conventions: each figure is printed as one line `<figure> = <value> <unit>` and written under
the same name to `bench/results.json` (not by a `--quick` smoke run).  A figure comparing two
variants is measured side by side in the same run (interleaved rounds, median) and named
`…_ratio`; a figure measured at several sizes carries the size in brackets
(`get_dirty_log_ms[1G]`).  Benchmarks never decide whether the test suite passes.
"""
