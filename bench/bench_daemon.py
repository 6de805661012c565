"""Control-plane latency of the running daemon (docs/daemon.md).

- `param_read_p99_ms_idle` / `_running`: p99 of one open/read/close of
  parameters/mmu_audit from this (client) process, with the VM paused and with it running
  flat out.  Rounds alternate between the two states.  Target: ≤ 1 ms while running.  What
  decides it is whether the machine has a core free for the reader and the FUSE threads:
  with one busy process beside the daemon on two cores, p99 is 3–4 ms paused as much as
  running (a FUSE thread waits for a scheduler slice at some of the six requests), and
  renicing the simulation changes nothing; with the cores free, about 0.4 ms.
- `toggle_to_effect_ms`: from just before the write(2) to parameters/mmu_audit until the
  simulation process applied it, read from the `applied_ns` of its `param_set` log event
  (CLOCK_MONOTONIC is one clock for all processes); stores land after any round of the
  loop, or inside a step at the audit's store points (docs/daemon.md).  Target: under 20 ms.
- `toggle_to_effect_ms[audit_full_4G]` / `_p99_ms[…]`: the same on a 4 GiB guest (2 vCPUs)
  with the full audit at every point (`mmu_audit_ratelimit_ms=0`, scope full), after the
  kernel workload ran `WARM_SECONDS` to build its shadow pages (`shadow_pages[audit_full_4G]`,
  the lines of vm0/mmu/pages).  Every other toggle switches the audit off while its runs go
  on, each tens of milliseconds: the store lands at the audit's next store point
  (docs/audit.md).  Target: p99 ≤ 20 ms.  `--quick` uses 256 MiB.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench._common import figure, interleaved, median, percentile, put

START_TIMEOUT_SECONDS = 60.0
WARM_SECONDS = 60.0  # the 4 GiB guest's kernel workload before the toggles
AUDIT_ON_SECONDS = 0.05  # between two toggles of the 4 GiB guest: runs are under way


@contextlib.contextmanager
def running_daemon(*args: str) -> Iterator[tuple[Path, Path, int]]:
    """A `python -m mmud run [args]` on a scratch mount point; yields (mount point, its log,
    its pid)."""
    with tempfile.TemporaryDirectory(prefix="mmud-bench-") as tmp:
        mnt, log = Path(tmp, "mnt"), Path(tmp, "daemon.log")
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "mmud", "run", "--mount", str(mnt), *args],
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            while '"mounted"' not in log.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mmud did not mount:\n{log.read_text()}")
                time.sleep(0.05)
            yield mnt, log, proc.pid
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)


def _read_latencies(mnt: Path, state: bytes, n: int) -> list[float]:
    put(mnt / "vm0/state", state)
    path = mnt / "parameters/mmu_audit"
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            f.read()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def _applied_ns(log: Path) -> list[int]:
    """applied_ns of every mmu_audit store the simulation logged, in order."""
    events = (json.loads(line[line.index("{"):]) for line in log.read_text().splitlines()
              if '"param_set"' in line)
    return [e["applied_ns"] for e in events if e.get("name") == "mmu_audit"]


def _toggle_delays(mnt: Path, log: Path, n: int, pause: float = 0.005) -> list[float]:
    put(mnt / "vm0/state", b"run")
    already = len(_applied_ns(log))
    starts = []
    for i in range(n):
        time.sleep(pause)  # let the loop get back into a step batch (or audit runs)
        starts.append(time.monotonic_ns())
        put(mnt / "parameters/mmu_audit", b"1\n" if i % 2 == 0 else b"0\n")
    applied = _applied_ns(log)[already:]
    return [(a - s) / 1e6 for s, a in zip(starts, applied, strict=True)]


def run(quick: bool = False) -> None:
    rounds, per_round, toggles = (2, 50, 10) if quick else (10, 300, 200)
    with running_daemon() as (mnt, log, _):
        pooled = interleaved({"idle": lambda: _read_latencies(mnt, b"pause", per_round),
                              "running": lambda: _read_latencies(mnt, b"run", per_round)},
                             rounds)
        for state, samples in pooled.items():
            figure(f"param_read_p50_ms_{state}", median(samples), "ms")
            figure(f"param_read_p99_ms_{state}", percentile(samples, 99), "ms")
        delays = _toggle_delays(mnt, log, toggles)
        figure("toggle_to_effect_ms", median(delays), "ms")
        figure("toggle_to_effect_p99_ms", percentile(delays, 99), "ms")
    audit_full_toggles(quick)


def audit_full_toggles(quick: bool) -> None:
    mem, warm, toggles = ("256M", 5.0, 20) if quick else ("4G", WARM_SECONDS, 200)
    with running_daemon("--mem", mem, "--vcpus", "2",
                        "--param", "mmu_audit_ratelimit_ms=0") as (mnt, log, _):
        put(mnt / "vm0/state", b"run")
        time.sleep(warm)
        pages = len((mnt / "vm0/mmu/pages").read_text().splitlines()) - 1
        figure(f"shadow_pages[audit_full_{mem}]", pages, "pages")
        delays = _toggle_delays(mnt, log, toggles, AUDIT_ON_SECONDS)
        runs = int((mnt / "kvm/mmu_audit_runs").read_text())
        figure(f"audit_runs[audit_full_{mem}]", runs, "runs")
        figure(f"toggle_to_effect_ms[audit_full_{mem}]", median(delays), "ms")
        figure(f"toggle_to_effect_p99_ms[audit_full_{mem}]", percentile(delays, 99), "ms")
