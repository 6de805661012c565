"""What the kvmmmu tracepoints cost (docs/tracing.md).

Throughput is guest steps per second of the `kernel` workload (64 MiB, seed 7, isolation off:
bench/_stripped.py's `kernel_vm`), one VM per variant in one process, 1,000 steps each, round
by round (ABBA); a ratio is the median over rounds of the two variants' ratio in the round
(bench_audit's method):
- `trace_off_ratio`: every event off relative to the hooks-removed build (every `# observer`
  line deleted: the tracepoints' hooks are the MMU observer's).
- `trace_all_on_ratio`: every event on in the top-level instance (tracing/events/enable = 1:
  kvmmmu and kvm) and drained as trace_pipe text after each batch (TraceFs.pipe, in the timed
  interval), relative to off.
- `trace_pipe_events_per_s`: a running daemon (isolation off) records every event into a
  buffer large enough to lose none until it holds PIPE_EVENTS (1,000,000; 20,000 with --quick);
  then tracing stops and the VM pauses, and one reader drains tracing/trace_pipe through the
  mount with O_NONBLOCK reads of 1 MiB until EAGAIN: lines read per second of that drain.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import mmud
from bench._common import figure, interleaved, paired_ratio, put
from bench.bench_daemon import running_daemon
from bench._stripped import kernel_vm, without_hooks
from mmud.kvm.trace.tracefs import TraceFs


def _stepper(vm: mmud.VM, steps: int, drain: TraceFs | None = None) -> Callable[[], list[float]]:
    def measure() -> list[float]:
        t = time.perf_counter()
        vm.step(steps)
        if drain is not None:
            while drain.pipe(1 << 16):
                pass
        return [steps / (time.perf_counter() - t)]
    return measure


PIPE_EVENTS = 1_000_000
RING_BYTES_PER_EVENT = 64  # more than any event takes in the ring (header + payload)
FILL_TIMEOUT_SECONDS = 600


def _entries(tracing: Path) -> int:
    stats = (tracing / "per_cpu/cpu0/stats").read_text()
    m = re.search(r"^entries: (\d+)$", stats, re.M)
    assert m is not None, stats
    return int(m[1])


def pipe_rate(quick: bool) -> None:
    target = 20_000 if quick else PIPE_EVENTS
    with running_daemon("--param", "address_space_isolation=0") as (mnt, _log, _pid):
        tracing = mnt / "tracing"
        put(tracing / "buffer_size_kb", f"{target * RING_BYTES_PER_EVENT // 1024 + 1408}\n")
        put(tracing / "events/enable", "1\n")
        deadline = time.monotonic() + FILL_TIMEOUT_SECONDS
        while _entries(tracing) < target:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the ring did not reach {target} events")
            time.sleep(0.2)
        put(tracing / "tracing_on", "0\n")
        put(mnt / "vm0/state", "pause\n")
        fd = os.open(tracing / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        lines = 0
        t = time.perf_counter()
        try:
            while True:
                try:
                    lines += os.read(fd, 1 << 20).count(b"\n")
                except BlockingIOError:
                    break
        finally:
            os.close(fd)
        elapsed = time.perf_counter() - t
    assert lines >= target, (lines, target)
    figure("trace_pipe_events_per_s", lines / elapsed, "events/s")


def run(quick: bool = False) -> None:
    rounds = 4 if quick else 100
    steps = 250 if quick else 1000
    with without_hooks() as stripped:
        vms = {"stripped": kernel_vm(stripped), "off": kernel_vm(mmud), "all_on": kernel_vm(mmud)}
        fs = TraceFs(vms["all_on"].module.trace)
        fs.write("events/enable", "1\n")
        for vm in vms.values():
            vm.step(300)
        fs.pipe(1 << 30)
        samples = interleaved({
            "stripped": _stepper(vms["stripped"], steps),
            "off": _stepper(vms["off"], steps),
            "all_on": _stepper(vms["all_on"], steps, fs),
        }, rounds)
    figure("trace_off_ratio", paired_ratio(samples, "off", "stripped"), "ratio")
    figure("trace_all_on_ratio", paired_ratio(samples, "all_on", "off"), "ratio")
    pipe_rate(quick)
