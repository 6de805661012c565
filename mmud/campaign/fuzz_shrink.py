"""Shrink a failing operation sequence: delta debugging (Zeller's ddmin) over its operations.

Each candidate runs from a fresh VM (fuzz_run.run_ops); it "still fails" when it ends in the
same finding (Finding.signature: the kind and the message without its numbers). Operations
are built so that any subsequence is a valid run (mmud/campaign/fuzz_guest.py), so any of
them may go. The sequence is first cut
after the operation that showed the finding; then every operation of one name goes at once
where it can (drop_kinds); then ddmin removes chunks, halving their size until single
operations, within a budget of runs (a long sequence would otherwise cost quadratically
many).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mmud.campaign.fuzz_guest import Op
from mmud.campaign.fuzz_run import Config, Finding, run_ops

DEFAULT_RUNS = 400


@dataclass(frozen=True)
class Shrunk:
    ops: list[Op]
    finding: Finding
    runs: int  # candidate sequences run


def ddmin(items: Sequence[Op], fails: Callable[[list[Op]], bool], budget: int) -> tuple[list[Op], int]:
    """A smaller list for which `fails` still holds (1-minimal if the budget allows); the
    list and the number of calls made. `fails(items)` is assumed."""
    current = list(items)
    calls = 0
    parts = 2
    while len(current) >= 2 and calls < budget:
        size = -(-len(current) // parts)
        for start in range(0, len(current), size):
            candidate = current[:start] + current[start + size:]
            calls += 1
            if fails(candidate):
                current = candidate
                parts = max(parts - 1, 2)
                break
            if calls >= budget:
                break
        else:
            if parts >= len(current):
                break
            parts = min(len(current), parts * 2)
    return current, calls


def shrink(config: Config, ops: Sequence[Op], finding: Finding, budget: int = DEFAULT_RUNS) -> Shrunk:
    """The shortest sequence ddmin finds that ends in the same finding."""
    def fails(candidate: list[Op]) -> bool:
        found = run_ops(config, candidate).finding
        return found is not None and found.signature == finding.signature

    current = list(ops[:finding.op + 1])
    calls = 1
    if not fails(current):  # only the closing audit saw it: keep the whole sequence
        current = list(ops)
    current, more = drop_kinds(current, fails)
    calls += more
    current, more = ddmin(current, fails, max(budget - calls, 0))
    calls += more
    final = run_ops(config, current).finding
    assert final is not None, "every step keeps only failing sequences"
    return Shrunk(current, final, calls + 1)


def drop_kinds(items: list[Op], fails: Callable[[list[Op]], bool]) -> tuple[list[Op], int]:
    """Try dropping every operation of one name at once, name by name (the rarest first):
    most of a random sequence is operations of names the finding does not need, and this
    removes them in one run each, before ddmin's chunks."""
    calls = 0
    counts: dict[str, int] = {}
    for op in items:
        counts[op[0]] = counts.get(op[0], 0) + 1
    for name in sorted(counts, key=lambda n: (counts[n], n)):
        candidate = [op for op in items if op[0] != name]
        if len(candidate) < len(items) and candidate:
            calls += 1
            if fails(candidate):
                items = candidate
    return items, calls
