"""The campaign kinds, by name: each a module with `jobs`, `run`, `summarize` and `plot`.

The registry names modules instead of importing them, so that starting a campaign loads only
the kind it runs (a kind's own dependencies stay its own) and a kind whose module is missing
is a clear error when it is asked for, not an import failure at start-up.

The interface every kind module provides:

    jobs(axes: dict[str, list], quick: bool) -> list[dict[str, object]]
        the job list from the spec's [axes] ([quick] already applied by the engine when
        quick); each job a flat JSON-able dict of parameters.
    run(job: dict[str, object], out: pathlib.Path) -> dict[str, object]
        runs one job in the job process and returns its metrics (flat JSON scalars); `out`
        is the job's artifact directory. A guest crash raises mmud.sched.TaskFailed.
    summarize(df: pandas.DataFrame) -> str      markdown for summary.md
    plot(df: pandas.DataFrame, out: pathlib.Path) -> list[pathlib.Path]   headless PNGs

`summarize` and `plot` get every row of results.parquet — job, the axes, the metrics (NaN
where a job ended without them), outcome, message, duration_s, worker, rerun — and pick the
rows they need by `outcome`. Metric names must differ from axis names. mmud.campaign.tables
renders a frame as markdown and mmud.campaign.plots makes headless figures.

A kind may also define `TIMINGS`, the names of its metrics that are wall-clock timings
(`mmud campaign rerun` does not compare them). Kinds import pandas and matplotlib inside
`summarize` and `plot` only: the job processes that run them never load either.
"""

from __future__ import annotations

import importlib
from types import ModuleType

KINDS: dict[str, str] = {
    "detect": "mmud.campaign.kinds.detect",
    "overhead": "mmud.campaign.kinds.overhead",
    "zap": "mmud.campaign.kinds.zap",
    "smoke": "mmud.campaign.kinds.smoke",
    "fuzz": "mmud.campaign.kinds.fuzz",
    "access": "mmud.campaign.kinds.access",
}

INTERFACE = ("jobs", "run", "summarize", "plot")


class UnknownKind(LookupError):
    """A spec names a kind that is not registered or whose module cannot be loaded."""


def load(kind: str) -> ModuleType:
    """The module of `kind`, imported on first use."""
    try:
        path = KINDS[kind]
    except KeyError:
        raise UnknownKind(f"unknown campaign kind {kind!r} (known: {', '.join(sorted(KINDS))})") from None
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as e:
        if e.name is not None and (e.name == path or path.startswith(e.name + ".")):
            raise UnknownKind(f"campaign kind {kind!r} is registered but its module {path} "
                              "does not exist") from None
        raise
    missing = [name for name in INTERFACE if not callable(getattr(module, name, None))]
    if missing:
        raise UnknownKind(f"campaign kind {kind!r}: module {path} lacks {', '.join(missing)}")
    return module


def timings(module: ModuleType) -> frozenset[str]:
    """The metrics of a kind that are wall-clock timings, not compared by rerun."""
    return frozenset(getattr(module, "TIMINGS", ()))
