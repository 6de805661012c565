"""Zapping every shadow page, fast and slow, and the MMIO spte fast path (issue 6).

- `zap_fast_stall_ms[<size>]`, `zap_slow_stall_ms[<size>]`: the longest time the MMU lock is
  held without a break — what a vCPU waiting for it stalls — for a guest whose every page
  has been faulted in through a 2 MiB-page direct map (one direct shadow page per 2 MiB).
  The fast zap breaks every BATCH_ZAP_PAGES pages, so its stall stays flat as memory grows;
  the slow zap holds the lock for the whole walk.
- `zap_fast_total_ms[<size>]`, `zap_slow_total_ms[<size>]`: time with the lock held in all.
- `mmio_cached_cost_ratio`: cost of an access to the ioram device with its MMIO spte cached
  over the cost with mmio_caching=N (full fault and guest walk each time), side by side.
"""

from __future__ import annotations

import time

import mmud
from bench._common import figure, interleaved, median
from mmud.kvm.devices import IORAM_BASE

P, W, PS = 1, 2, 0x80
DIRECT_VA = 0xFFFF888000000000
MMIO_VA = 1 << 39  # pml4 entry 1, entry 0 below: one table per level


class Guest:
    """A vCPU on a direct map of all RAM with 2 MiB pages (tables built by the host)."""

    def __init__(self, mem_mb: int, params: dict[str, str] | None = None) -> None:
        self.vm = mmud.VM(mem_mb=mem_mb, params=params)
        self.vcpu = self.vm.vcpus[0]
        self.pages = mem_mb << 8
        pml4, pdpt = 0x1000, 0x2000
        pmds = -(-mem_mb // 1024)
        write = self.vm.write_u64
        write(pml4 + 8 * ((DIRECT_VA >> 39) & 511), pdpt | P | W)
        for k in range(pmds):
            pmd = 0x3000 + 0x1000 * k
            write(pdpt + 8 * k, pmd | P | W)
            for i in range(min(512, mem_mb // 2 - 512 * k)):
                write(pmd + 8 * i, ((512 * k + i) << 21) | P | W | PS)
        # A user page mapped onto the ioram device, for the MMIO figure.
        for gpa, entry in ((pml4 + 8 * ((MMIO_VA >> 39) & 511), 0x100000 | P | W | 4),
                           (0x100000, 0x101000 | P | W | 4), (0x101000, 0x102000 | P | W | 4),
                           (0x102000, IORAM_BASE | P | W | 4)):
            write(gpa, entry)
        self.vcpu.cr3 = pml4

    def fault_all(self) -> None:
        read = self.vcpu.read_u64
        for i in range(self.pages):
            read(DIRECT_VA + (i << 12))

    def zap(self, fast: bool) -> tuple[float, float]:
        """Fault everything in, zap all; (stall, total) in ms."""
        self.fault_all()
        run = self.vm.zap_all(fast=fast)
        return run.max_hold_ns / 1e6, run.hold_ns / 1e6

    def mmio_reads(self, n: int) -> float:
        """Seconds per read of the ioram page."""
        read = self.vcpu.read_u64
        read(MMIO_VA, user=True)
        t0 = time.perf_counter()
        for _ in range(n):
            read(MMIO_VA, user=True)
        return (time.perf_counter() - t0) / n


def run(quick: bool = False) -> None:
    sizes = ((64, "64M"),) if quick else ((64, "64M"), (256, "256M"), (1024, "1G"), (4096, "4G"))
    for mem_mb, label in sizes:
        guest = Guest(mem_mb)
        results = {True: [], False: []}
        for fast in (True, False, True, False)[: 2 if mem_mb >= 1024 or quick else 4]:
            results[fast].append(guest.zap(fast))
        for fast, name in ((True, "fast"), (False, "slow")):
            figure(f"zap_{name}_stall_ms[{label}]", median([s for s, _ in results[fast]]), "ms")
            figure(f"zap_{name}_total_ms[{label}]", median([t for _, t in results[fast]]), "ms")
        del guest
    cached, uncached = Guest(64), Guest(64, {"mmio_caching": "0"})
    n = 200 if quick else 5000
    samples = interleaved({"cached": lambda: [cached.mmio_reads(n)],
                           "uncached": lambda: [uncached.mmio_reads(n)]}, rounds=2 if quick else 7)
    figure("mmio_cached_cost_ratio", median(samples["cached"]) / median(samples["uncached"]), "ratio")
