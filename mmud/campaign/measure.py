"""Side-by-side measurement: variants run in alternating rounds, and ratios taken within a
round, so that a machine whose speed drifts (other work, frequency changes) moves every
variant alike. The benchmarks (bench/) and the campaigns' overhead kind both measure so.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable


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
