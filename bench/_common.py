"""What every benchmark shares: figures, results.json, interleaved variants, percentiles."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

from mmud.campaign.measure import interleaved, paired_ratio

__all__ = ["figure", "interleaved", "median", "paired_ratio", "percentile", "put", "save"]

RESULTS = Path(__file__).with_name("results.json")

_recorded: dict[str, dict[str, float | str]] = {}


def figure(name: str, value: float, unit: str) -> None:
    """Print `<figure> = <value> <unit>` and record it for results.json."""
    print(f"{name} = {value:.4g} {unit}", flush=True)
    _recorded[name] = {"value": value, "unit": unit}


def save() -> Path:
    """Merge this run's figures into results.json (figures of other benchmarks are kept)."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.update(_recorded)
    RESULTS.write_text(json.dumps(dict(sorted(results.items())), indent=2) + "\n")
    return RESULTS


def put(path: Path, text: str | bytes) -> None:
    """One write(2) of `text` to a control file, as `echo` or `dd` makes it."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode() if isinstance(text, str) else text)
    finally:
        os.close(fd)


def percentile(samples: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), nearest rank: with 100 samples p99 is the second largest."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)
