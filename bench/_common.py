"""What every benchmark shares: figures, results.json, interleaved variants, percentiles."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

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


def percentile(samples: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), nearest rank: with 100 samples p99 is the second largest."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def interleaved(variants: dict[str, Callable[[], list[float]]],
                rounds: int) -> dict[str, list[float]]:
    """Run each variant once per round, alternating, so drift in the machine hits all alike;
    odd rounds run them in reverse order (ABBA), so that a drift within a round does too.

    Each call returns a batch of samples; the result pools every variant's samples.
    """
    pooled: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name in list(variants)[:: -1 if r % 2 else 1]:
            pooled[name].extend(variants[name]())
    return pooled


def paired_ratio(samples: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a's sample over b's sample from the same round (one sample per
    variant and round): the machine's drift between rounds cancels out."""
    return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)
