"""Dirty logging and live migration (docs/dirty-logging.md).

- `dirty_log_write_ratio`: guest write throughput (stores per second of the `stream`
  workload) with dirty logging on in its memslot and a harvest every HARVEST_STEPS steps,
  over the same VM without logging; two VMs of the same seed stepped side by side in
  interleaved rounds (median). With logging on, the first store to a page after each
  harvest takes the fast page fault.
- `get_dirty_log_ms[64M|1G|4G]`: KVM_GET_DIRTY_LOG of the RAM of a guest of that size (one
  slot, or two above the PCI hole) with every page dirty and the stream workload's working
  set mapped writable (median of a few).
- `migration_rounds`, `migration_pages_sent`: pre-copy of a running `kernel` guest of 64 MiB.
"""

from __future__ import annotations

import time

import numpy as np

import mmud
from bench._common import figure, interleaved, median

HARVEST_STEPS = 500
SIZES = {"64M": 64, "1G": 1024, "4G": 4096}


def _writer(log_dirty: bool, steps: int):
    vm = mmud.VM(mem_mb=64, seed=1, workload="stream")
    vm.step(3000)  # boot and demand paging of the working set
    if log_dirty:
        vm.log_dirty_pages(0)

    def measure() -> list[float]:
        writes0 = vm.workload.counters["writes"]
        t0 = time.perf_counter()
        for _ in range(steps // HARVEST_STEPS):
            vm.step(HARVEST_STEPS)
            if log_dirty:
                vm.get_dirty_log(0)
        return [(vm.workload.counters["writes"] - writes0) / (time.perf_counter() - t0)]

    return measure


def get_dirty_log_ms(mem_mb: int, reps: int) -> float:
    """One KVM_GET_DIRTY_LOG of each memslot of the guest's RAM (two above the PCI hole)
    with every page dirty, in ms (median of `reps`)."""
    vm = mmud.VM(mem_mb=mem_mb, seed=1, workload="stream")
    slots = [slot.id for slot in vm.memslots]
    for slot in slots:
        vm.log_dirty_pages(slot)
    vm.step(3000)
    samples = []
    for _ in range(reps):
        vm.step(HARVEST_STEPS)  # the fast path makes the working set writable again
        for memslot in vm.memslots:  # what mark_page_dirty() of every page leaves
            memslot.dirty_bitmap[:] = np.uint64(2**64 - 1)
        t0 = time.perf_counter()
        for slot in slots:
            vm.get_dirty_log(slot)
        samples.append((time.perf_counter() - t0) * 1000)
    return median(samples)


def run(quick: bool = False) -> None:
    steps = HARVEST_STEPS * (2 if quick else 20)
    samples = interleaved({"on": _writer(True, steps), "off": _writer(False, steps)},
                          rounds=2 if quick else 7)
    figure("dirty_log_write_ratio", median(samples["on"]) / median(samples["off"]), "ratio")
    for name, mem_mb in SIZES.items():
        if quick and mem_mb > 64:
            continue
        figure(f"get_dirty_log_ms[{name}]", get_dirty_log_ms(mem_mb, 1 if quick else 3), "ms")
    vm = mmud.VM(mem_mb=64, vcpus=2, seed=1, workload="kernel")
    vm.step(500 if quick else 3000)
    result = mmud.migrate(vm)
    assert result.identical
    figure("migration_rounds", len(result.rounds), "rounds")
    figure("migration_pages_sent", result.pages_sent, "pages")
