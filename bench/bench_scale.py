"""Guests as large as KVM allows (docs/memslots-mmio.md, "Guest RAM: layout and limits").

- `vm_create_ms[1T]`: `mmud.VM(mem_mb=1 << 20, workload="kernel")` — the two memslots and the
  guest kernel's boot, its direct map of all RAM included (median of 3).
- `rss_mb[1T]`: growth of this process's resident set from before that VM was created to
  after 20,000 steps of its kernel workload; goal ≤ 300 (guest RAM, rmap heads and dirty
  bitmaps are committed as the guest touches them).
- `zap_fast_stall_ms[64G]`: bench/bench_zap.py's measurement (mmud/campaign/zap_guest.py)
  on a 64 GiB guest: the longest a vCPU waited for the MMU lock in a fast zap of every
  shadow page, all RAM faulted in, after bench_zap's warm-up.
- `get_dirty_log_ms[64G]`: bench/bench_dirty.py's measurement on a 64 GiB guest: one
  KVM_GET_DIRTY_LOG of each of its two memslots, every page dirty.

`--quick` runs a 1 TiB guest for 2,000 steps and the last two figures at 1 GiB.
"""

from __future__ import annotations

import time

import mmud
from bench._common import figure, median
from bench.bench_dirty import get_dirty_log_ms
from bench.bench_zap import warm_up
from mmud.campaign.zap_guest import Guest

STEPS = 20_000
TiB_MB = 1 << 20


def rss_mb() -> float:
    """VmRSS of this process (/proc/self/status), in MiB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def create_ms() -> tuple[mmud.VM, float]:
    t0 = time.perf_counter()
    vm = mmud.VM(mem_mb=TiB_MB, vcpus=2, seed=1, workload="kernel")
    return vm, (time.perf_counter() - t0) * 1000


def run(quick: bool = False) -> None:
    before = rss_mb()
    vm, first = create_ms()
    vm.step(STEPS // 10 if quick else STEPS)
    grown = rss_mb() - before
    del vm
    samples = [first] + ([] if quick else [create_ms()[1] for _ in range(2)])
    figure("vm_create_ms[1T]", median(samples), "ms")
    figure("rss_mb[1T]", grown, "MiB")
    mem_mb, label = (1024, "1G") if quick else (64 << 10, "64G")
    warm_up()
    stall, _total = Guest(mem_mb, contenders=2).zap("fast")
    figure(f"zap_fast_stall_ms[{label}]", stall, "ms")
    figure(f"get_dirty_log_ms[{label}]", get_dirty_log_ms(mem_mb, 1 if quick else 3), "ms")
