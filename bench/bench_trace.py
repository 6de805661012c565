"""What the kvmmmu tracepoints cost (issue 14).

Throughput is guest steps per second of the `kernel` workload (64 MiB, seed 7, isolation off:
bench/_stripped.py's `kernel_vm`), one VM per variant in one process, 1,000 steps each, round
by round (ABBA); a ratio is the median over rounds of the two variants' ratio in the round
(bench_audit's method):
- `trace_off_ratio`: every event off relative to the hooks-removed build (every `# observer`
  line deleted: the tracepoints' hooks are the MMU observer's).
- `trace_all_on_ratio`: every kvmmmu event on in the top-level instance (tracing/events/enable
  = 1) and drained as trace_pipe text after each batch (TraceFs.pipe, in the timed interval),
  relative to off.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import mmud
from bench._common import figure, interleaved, paired_ratio
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
