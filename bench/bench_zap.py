"""Zapping every shadow page, fast, slow and legacy, and the MMIO spte fast path (issue 6).

The guest has every page faulted in through a 2 MiB-page direct map (one direct shadow page
per 2 MiB); two more vCPUs run beside the zap as scheduler tasks, each flushing and
re-reading a page of its own at every step (INVLPG takes mmu_lock), so that someone always
contends for the lock.

- `zap_<kind>_stall_ms[<size>]`: the longest any vCPU waited for the MMU lock during the
  zap. `fast` (kvm_zap_obsolete_pages) breaks after ten pages when someone waits, `slow`
  (kvm_mmu_zap_all, v5.1+) after every page when someone waits: both stay flat as memory
  grows. `legacy` (kvm_mmu_zap_all before 2013) never breaks: its stall is its length.
- `zap_<kind>_total_ms[<size>]`: the zap from start to end, as the CPU time of its own steps
  (the vCPUs run on other CPUs). The slow zap restarts from the newest page after each
  break and also zaps what the vCPUs rebuilt meanwhile.
- `mmio_cached_cost_ratio`: cost of an access to the ioram device with its MMIO spte cached
  over the cost with mmio_caching=N (full fault and guest walk each time), side by side.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import mmud
from bench._common import figure, interleaved, median
from mmud.kvm.devices import IORAM_BASE
from mmud.kvm.mmu.zap import ZAP_KINDS
from mmud.kvm.vcpu import Vcpu

P, W, PS = 1, 2, 0x80
DIRECT_VA = 0xFFFF888000000000
MMIO_VA = 1 << 39  # pml4 entry 1, entry 0 below: one table per level


class Guest:
    """A vCPU on a direct map of all RAM with 2 MiB pages (tables built by the host)."""

    def __init__(self, mem_mb: int, params: dict[str, str] | None = None,
                 contenders: int = 0) -> None:
        self.vm = mmud.VM(mem_mb=mem_mb, vcpus=1 + contenders, params=params)
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
        for vcpu in self.vm.vcpus:
            vcpu.cr3 = pml4
        for k, vcpu in enumerate(self.vm.vcpus[1:], 1):
            self.vm.scheduler.add(f"vcpu{k}", self._contend(vcpu, DIRECT_VA + (k << 21)))

    @staticmethod
    def _contend(vcpu: Vcpu, va: int) -> Iterator[None]:
        """A vCPU that takes mmu_lock at every step: INVLPG of a page, then a read of it."""
        while True:
            vcpu.invlpg(va)
            vcpu.read_u64(va)
            yield

    def fault_all(self) -> None:
        read = self.vcpu.read_u64
        for i in range(self.pages):
            read(DIRECT_VA + (i << 12))

    def zap(self, kind: str) -> tuple[float, float]:
        """Fault everything in, zap all while the contenders run; (stall, total) in ms."""
        self.fault_all()
        run = self.vm.zap_all(kind)
        while self.vm.zap_in_progress:
            self.vm.step(100)
        return run.max_stall_ns / 1e6, run.cpu_ns / 1e6

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
        guest = Guest(mem_mb, contenders=2)
        results: dict[str, list[tuple[float, float]]] = {kind: [] for kind in ZAP_KINDS}
        for _ in range(1 if mem_mb >= 1024 or quick else 2):
            for kind in ZAP_KINDS:
                results[kind].append(guest.zap(kind))
        for kind in ZAP_KINDS:
            figure(f"zap_{kind}_stall_ms[{label}]", median([s for s, _ in results[kind]]), "ms")
            figure(f"zap_{kind}_total_ms[{label}]", median([t for _, t in results[kind]]), "ms")
        del guest
    cached, uncached = Guest(64), Guest(64, {"mmio_caching": "0"})
    n = 200 if quick else 5000
    samples = interleaved({"cached": lambda: [cached.mmio_reads(n)],
                           "uncached": lambda: [uncached.mmio_reads(n)]}, rounds=2 if quick else 7)
    figure("mmio_cached_cost_ratio", median(samples["cached"]) / median(samples["uncached"]), "ratio")
