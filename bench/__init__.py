"""Benchmarks, run as `python -m bench [NAME…] [--quick]` (DESIGN.md §6).

Each `bench/bench_<name>.py` exposes `run(quick: bool = False)` and reports figures through
`bench._common.figure`; the figures of a run are merged into `bench/results.json`.
"""
