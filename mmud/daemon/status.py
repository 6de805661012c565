"""The human-readable vm<N>/status summary and the rates it shows."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

# Rates are averaged over at least this long, so the figures do not flicker between reads.
RATE_WINDOW_SECONDS = 1.0
# The per-second rates the summary shows: the loop's speed and the MMU's busiest paths.
RATE_STATS = ("pf_fixed", "pf_guest", "exits", "mmu_cache_miss", "mmu_shadow_zapped")


class RateMeter:
    """Per-second rates of steps and a few stats, from samples at least a window apart."""

    def __init__(self) -> None:
        self._t = time.monotonic()
        self._steps = 0
        self._stats: dict[str, int] = {}
        self._rates: dict[str, float] = {}

    def update(self, steps: int, stats: dict[str, int]) -> dict[str, float]:
        now = time.monotonic()
        dt = now - self._t
        if dt >= RATE_WINDOW_SECONDS:
            rates = {"steps": (steps - self._steps) / dt}
            rates.update({n: (stats.get(n, 0) - self._stats.get(n, 0)) / dt for n in RATE_STATS})
            self._rates = {n: max(r, 0.0) for n, r in rates.items()}  # none below 0 after a clear
            self._t, self._steps, self._stats = now, steps, dict(stats)
        return self._rates


def render_status(vm: Any, state: str, rates: dict[str, float], failure: str | None, *, pid: int,
                  state_write_failures: int | None = None,
                  run_control: Sequence[tuple[str, str]] = (), recording: str | None = None) -> str:
    """One `key: value` line each, like /proc/meminfo, so both people and scripts can read it.

    `pid` is the process that holds the VM (the simulation's): the `<pid>` of its
    `kvm/<pid>-<fd>/` directory, what `kvm_stat -p` takes.  `state_write_failures`, with a
    state directory, is how many records it refused so far (a full disk: docs/isolation.md).
    `run_control` are the lines of vm<N>/break and `step N` (mmud/daemon/breakpoints.py),
    after the step count they concern.  `recording` names the run's recording file
    (docs/replay.md), with why it stopped if it did.
    """
    lines = [
        ("state", state),
        ("pid", str(pid)),
        ("memory", f"{vm.mem_mb} MiB"),
        ("vcpus", str(len(vm.vcpus))),
        ("workload", vm.workload_name or "none"),
        ("seed", str(vm.seed)),
        ("steps", str(vm.steps)),
        *run_control,
        ("shadow pages", f"{vm.mmu.n_used_mmu_pages} / {vm.mmu.n_max_mmu_pages}"),
    ]
    if state_write_failures is not None:
        lines.append(("state write failures", str(state_write_failures)))
    if recording is not None:
        lines.append(("recording", recording))
    if failure:
        lines.append(("failure", failure))
    lines += [(f"{n}/s", f"{rates.get(n, 0.0):.0f}") for n in ("steps", *RATE_STATS)]
    return _render_lines(lines)


def _render_lines(lines: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in lines) + 1
    return "".join(f"{k + ':':<{width}} {v}\n" for k, v in lines)


def render_failed_status(last: str, cause: str, steps: int) -> str:
    """vm<N>/status once the simulation process is gone (rendered by the main process).

    The last published status with `state: failed`, every rate at 0 (nothing runs) and a
    `failure:` line naming the cause and the last step count seen, in place of a guest
    crash's line.  `pid:` still names the process that held the VM.
    """
    failure = ("failure", f"simulation process {cause}; last step seen {steps}")
    lines: list[tuple[str, str]] = []
    for line in last.splitlines():
        key, _, value = line.partition(":")
        if key == "failure":
            continue  # a guest crash before the process died: the process's end replaces it
        if key.endswith("/s"):
            if failure not in lines:
                lines.append(failure)
            value = "0"
        elif key == "state":
            value = "failed"
        lines.append((key, value.strip()))
    if failure not in lines:
        lines.append(failure)
    return _render_lines(lines)
